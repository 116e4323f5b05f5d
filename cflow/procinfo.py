"""Processes identified across restarts, from Linux's /proc.

A pid alone can be reused once its process is gone; the boot id and the
process's start time together name one process for good. The worker records
them for its task's process group so that a restarted worker, or the shutdown
hook, signals that group only while it is still the one started.
"""

import os
from pathlib import Path


def boot_id() -> str:
    """This boot's id (changes at every boot), or "" where /proc has none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields from its closing one.
    return int(stat[stat.rfind(")") + 2 :].split()[19])


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
