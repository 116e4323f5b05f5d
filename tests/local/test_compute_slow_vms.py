"""Compute emulator: the slow-VM fault (--slow-vms FRACTION --slow-factor X) slows a VM's every process and leaves none stopped."""

import glob
import os
import time

from tests.helpers import compute_client, instance_body, wait_operation, wait_until

PROJECT = "slow-project"
ZONE = "us-central1-a"
# Counts 50 ms steps, in the startup script's group and in a task of its own session (as a worker starts its task).
STARTUP = r"""
echo $$ > startup.pid
setsid bash -c 'echo $$ > task.pid; n=0; exec 3<> <(:); while true; do n=$((n+1)); echo $n > task.count; read -r -t 0.05 -u 3 || true; done' &
n=0; exec 3<> <(:); while true; do n=$((n+1)); echo $n > count; read -r -t 0.05 -u 3 || true; done
"""
SHUTDOWN = "date +%s.%N > shutdown-ran"


def vm_dir(state_dir, name):
    return wait_until(lambda: glob.glob(os.path.join(state_dir, "vms", f"{name}-*")), what=f"{name}'s disk")[0]


def read_int(path):
    try:
        with open(path) as handle:
            return int(handle.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def state_of(pid):
    """The process's state letter (T: stopped), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def create(compute, name):
    body = instance_body(name, zone=ZONE, startup_script=STARTUP, shutdown_script=SHUTDOWN)
    wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=body).execute())


def test_one_vm_in_two_is_slow_every_process_of_it_and_none_is_left_stopped(start_compute_emulator, tmp_path):
    state_dir = tmp_path / "state"
    with start_compute_emulator("--state-dir", state_dir, "--slow-vms", "0.5", "--slow-factor", "10", "--seed", "3") as emulator:
        compute = compute_client(emulator.base_url)
        create(compute, "first")
        create(compute, "second")
        disks = {name: vm_dir(state_dir, name) for name in ("first", "second")}
        slow = [name for name, disk in disks.items() if "this VM is slow" in open(os.path.join(disk, "serial-port-1.log")).read()]
        assert len(slow) == 1  # exactly half of the VMs, which one chosen by the seed
        fast = next(name for name in disks if name not in slow)
        for disk in disks.values():
            wait_until(lambda disk=disk: read_int(os.path.join(disk, "task.count")) > 0, what="the counters to start")
        before = {name: (read_int(os.path.join(disk, "count")), read_int(os.path.join(disk, "task.count"))) for name, disk in disks.items()}
        time.sleep(3)
        steps = {name: (read_int(os.path.join(disk, "count")) - before[name][0], read_int(os.path.join(disk, "task.count")) - before[name][1])
                 for name, disk in disks.items()}
        # ~60 steps in 3 s at full speed; a tenth of the time leaves a few per second.
        assert steps[fast][0] > 40 and steps[fast][1] > 40, steps
        assert steps[slow[0]][0] < steps[fast][0] / 3 and steps[slow[0]][1] < steps[fast][1] / 3, steps

        pids = [read_int(os.path.join(disks[slow[0]], name)) for name in ("startup.pid", "task.pid")]
        wait_until(lambda: any(state_of(pid) == "T" for pid in pids), what="the slow VM to be paused")
        deleted_at = time.time()
        wait_operation(compute, PROJECT, ZONE, compute.instances().delete(project=PROJECT, zone=ZONE, instance=slow[0]).execute())
        # Its shutdown script ran at full speed, and nothing of it is left (stopped or not).
        assert float(open(os.path.join(disks[slow[0]], "shutdown-ran")).read()) - deleted_at < 2.0
        wait_until(lambda: all(state_of(pid) is None for pid in pids), what="the slow VM's processes to be gone")

        create(compute, "third")  # the third of four: slow again? 2 of 4 are, so it or the fourth
        create(compute, "fourth")
        later = [name for name in ("third", "fourth") if "this VM is slow" in open(os.path.join(vm_dir(state_dir, name), "serial-port-1.log")).read()]
        assert len(later) == 1
        # Paused from its boot on, it may write its pid only in its first share of a period.
        later_pids = [wait_until(lambda: read_int(os.path.join(vm_dir(state_dir, later[0]), "startup.pid")), what="the later VM's pid")]
        wait_until(lambda: state_of(later_pids[0]) == "T", what="the later slow VM to be paused")
    # The emulator stopped with a slow VM running: it let it run, then powered it off.
    wait_until(lambda: state_of(later_pids[0]) is None, timeout=30, what="the slow VM's processes to be gone after the emulator stops")
