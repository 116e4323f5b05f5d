"""Processes identified across restarts, from Linux's /proc: state, group, start time, boot id, sockets.

Linux only, standard library only (the worker ships it and imports it on its
start-up path). A pid alone is ambiguous (pids are recycled); a pid with its
start time (clock ticks since boot) and the boot id names one process for
good. The worker records them for its task's process group so that a
restarted worker, or the shutdown hook, signals that group only while it is
still the one started; the local stack (``cflow.local.services``) and the
Compute emulator's VM bookkeeping (``cflow.local.compute.vm``) ask "is this
still the process we started?" and "who is in this group?" the same way.
"""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
_TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
_TCP_LISTEN = "0A"


class ProcStat(NamedTuple):
    """The fields of ``/proc/PID/stat`` this package needs."""

    state: str  # R, S, D, Z (zombie), X (dead), ...
    pgid: int
    start_ticks: int  # clock ticks after boot when the process started


def parse_stat(text: bytes) -> ProcStat:
    """Parse the contents of a ``/proc/PID/stat`` file.

    Raises:
        ValueError, IndexError: not a stat line.
    """
    # The command name (field 2) may hold spaces and parentheses; the fields
    # after the last ')' are fixed: state is field 3, pgrp 5, starttime 22.
    fields = text[text.rindex(b")") + 2 :].split()
    return ProcStat(fields[0].decode(), int(fields[2]), int(fields[19]))


def read_stat(pid: int) -> ProcStat | None:
    """Return the ProcStat of ``pid``, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            return parse_stat(stat_file.read())
    except (OSError, ValueError, IndexError):
        return None


def iter_processes() -> Iterator[tuple[int, ProcStat]]:
    """Yield (pid, ProcStat) of every process that exists while we look (zombies included)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = read_stat(int(entry))
        if stat is not None:
            yield int(entry), stat


def is_alive(stat: ProcStat | None) -> bool:
    """True for a process that runs: it exists and is neither a zombie nor dead."""
    return stat is not None and stat.state not in ("Z", "X")


def live_group_members(pgid: int) -> list[int]:
    """Pids of the live processes (zombies excepted) whose process group is ``pgid``."""
    return [pid for pid, stat in iter_processes() if stat.pgid == pgid and is_alive(stat)]


def boot_id() -> str:
    """This boot's random id; with a start time it tells a process from a later one with the same pid."""
    try:
        with open(BOOT_ID_PATH) as boot_file:
            return boot_file.read().strip()
    except OSError:
        return ""


def listening_socket_inodes(port: int) -> set[int]:
    """Inodes of the TCP sockets (IPv4 or IPv6) listening on ``port`` on any address."""
    inodes: set[int] = set()
    for table in _TCP_TABLES:
        try:
            with open(table) as lines:
                next(lines, None)  # the header
                for line in lines:
                    fields = line.split()
                    # local_address is HEXADDR:HEXPORT; st is the state; inode is field 10.
                    if len(fields) > 9 and fields[3] == _TCP_LISTEN and int(fields[1].rpartition(":")[2], 16) == port:
                        inodes.add(int(fields[9]))
        except OSError:
            continue
    return inodes


def socket_inodes_of(pid: int) -> set[int]:
    """Inodes of the sockets ``pid`` holds open (empty if it is gone or not ours to look at)."""
    inodes: set[int] = set()
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for descriptor in descriptors:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{descriptor}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def group_listens_on(pgid: int, port: int) -> bool:
    """True if a live process of group ``pgid`` holds the socket listening on ``port``."""
    listening = listening_socket_inodes(port)
    return bool(listening) and any(listening & socket_inodes_of(pid) for pid in live_group_members(pgid))


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if there is no such process."""
    stat = read_stat(pid)
    return None if stat is None else stat.start_ticks


def process_started_at(pid: int) -> float | None:
    """The process's start as epoch seconds, or None if there is no such process."""
    ticks = process_start(pid)
    if ticks is None:
        return None
    try:
        boot_line = next(line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
    except (OSError, StopIteration):
        return None
    return int(boot_line.split()[1]) + ticks / os.sysconf("SC_CLK_TCK")
