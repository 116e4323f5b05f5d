"""Kills every emulated VM process once the emulator is gone, however it died.

Run by the emulator as ``python -I -S watchdog.py MARKER_NAME MARKER_PREFIX``
with a pipe on stdin. The emulator writes ``track PGID`` / ``forget PGID``
lines; end-of-file (the emulator exited, even by SIGKILL) makes the watchdog
SIGKILL each tracked process group and every process whose environment
carries ``MARKER_NAME=MARKER_PREFIX...`` (children that left the group with
setsid), then exit. Standard library only, so it starts fast and small.
"""

import os
import signal
import sys
import time


def marked_pids(environ_prefix: bytes) -> list[int]:
    """Pids of the processes whose environment holds ``environ_prefix`` (``\\0NAME=PREFIX``)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ_file:
                environ = b"\0" + environ_file.read()
        except OSError:
            continue
        if environ_prefix in environ:
            pids.append(int(entry))
    return pids


def kill_all(process_groups: set[int], environ_prefix: bytes) -> None:
    """SIGKILL the process groups, then every marked process until none is left (10 s at most)."""
    for pgid in process_groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    # A process can fork between the scan and the kill; scan until none is left.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = [pid for pid in marked_pids(environ_prefix) if pid != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.05)


def main(argv: list[str]) -> int:
    """Track process groups from stdin until it closes, then kill everything; argv is (script, MARKER_NAME, MARKER_PREFIX)."""
    marker_name, marker_prefix = argv[1], argv[2]
    environ_prefix = f"\0{marker_name}={marker_prefix}".encode()
    # The emulator decides when VMs stop; terminal signals must not cut cleanup short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    process_groups = set()
    for line in sys.stdin:
        command, _, value = line.strip().partition(" ")
        if command == "track" and value.isdigit():
            process_groups.add(int(value))
        elif command == "forget" and value.isdigit():
            process_groups.discard(int(value))
    kill_all(process_groups, environ_prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
