"""Compute emulator: no VM process outlives the emulator, however it ends."""

import os
import signal
import time

import pytest

from tests.helpers import compute_client, instance_body, wait_operation, wait_until

PROJECT = "orphans-project"
ZONE = "us-central1-f"
# A child that escapes the process group (setsid), one that ignores SIGTERM, and a plain sleeper.
STARTUP = (
    "setsid sleep 1000 < /dev/null > /dev/null 2>&1 &\n"
    "bash -c 'trap \"\" TERM; while true; do sleep 0.1; done' &\n"
    "echo started > started.txt\n"
    "sleep 1000\n"
)


def processes_with(needle):
    """Pids of live processes whose environment contains ``needle`` (this test's state dir)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                if stat.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    continue
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if needle.encode() in environ.read():
                    found.append(int(entry))
        except (OSError, IndexError):
            continue
    return found


def boot_fleet(emulator, state_dir, count, shutdown_script=None):
    compute = compute_client(emulator.base_url)
    for index in range(count):
        body = instance_body(f"orphan-{index}", zone=ZONE, startup_script=STARTUP, shutdown_script=shutdown_script)
        wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=body).execute())
    needle = f"HOME={state_dir}"
    # Per VM: bash, setsid sleep, the TERM-proof loop (and its sleeps), sleep 1000.
    wait_until(lambda: len(processes_with(needle)) >= 4 * count, what="every VM process started")
    return needle


def test_sigterm_powers_every_vm_off_in_parallel_and_exits_zero(tmp_path, start_compute_emulator):
    with start_compute_emulator("--state-dir", tmp_path, shutdown_grace_s=2) as emulator:
        needle = boot_fleet(emulator, tmp_path, 3, shutdown_script="sleep 1; echo done > shutdown.txt")
        started = time.monotonic()
        emulator.process.send_signal(signal.SIGTERM)
        assert emulator.process.wait(30) == 0
        elapsed = time.monotonic() - started
    assert processes_with(needle) == []
    assert len(list(tmp_path.glob("vms/*/shutdown.txt"))) == 3
    # Three 2 s grace periods one after another would take 6 s.
    assert elapsed < 5


def test_sigkill_of_the_emulator_leaves_no_vm_process(tmp_path, start_compute_emulator):
    with start_compute_emulator("--state-dir", tmp_path) as emulator:
        needle = boot_fleet(emulator, tmp_path, 2)
        watchdogs = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _parent(pid) == emulator.pid and b"watchdog.py" in _cmdline(pid)]
        assert len(watchdogs) == 1
        emulator.process.send_signal(signal.SIGKILL)
        emulator.process.wait(10)
        wait_until(lambda: processes_with(needle) == [], timeout=15, what="VM processes killed by the watchdog")
        wait_until(lambda: not os.path.exists(f"/proc/{watchdogs[0]}") or _state(watchdogs[0]) == "Z", timeout=15, what="watchdog exit")


def _parent(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError):
        return None


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return "gone"


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read()
    except OSError:
        return b""


@pytest.mark.stack  # the emulator runs in this process, not behind a fixture
def test_the_in_process_api_stops_its_vms_too(tmp_path):
    from cflow.local.compute.emulator import ComputeEmulator, EmulatorOptions

    emulator = ComputeEmulator(EmulatorOptions(state_dir=str(tmp_path), shutdown_grace_s=1))
    base_url = emulator.start()
    try:
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/compute/v1/")
        compute = compute_client(base_url)
        body = instance_body("in-process", zone=ZONE, startup_script=STARTUP)
        wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=body).execute())
        needle = f"HOME={tmp_path}"
        wait_until(lambda: len(processes_with(needle)) >= 4, what="VM processes")
    finally:
        emulator.stop()
    assert processes_with(needle) == []
    assert emulator.watchdog is not None and emulator.watchdog.pid is not None
    assert _state(emulator.watchdog.pid) in ("gone", "Z")
