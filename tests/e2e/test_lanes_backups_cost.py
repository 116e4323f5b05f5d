"""Whole runs on the local stack: an item moved from Spot to a standard VM, a slow VM's item won by its backup copy, a cost cap.

Each runs scheduler.py as a user does. The first preempts the VM of one item
each time it starts on Spot (simulateMaintenanceEvent); the second has a
stack of its own whose Compute emulator makes one VM in four slow
(``--slow-vms 0.25 --slow-factor 10``); the third prices a VM-second so high
that a small MAX_COST_USD is reached a few seconds in.
"""

import json
import subprocess
import sys

import pytest

from tests.chaos.conftest import CHAOS_TASK, ChaosProject, StackClients, assert_each_item_once, item_ids, start_stack, vm_dirs
from tests.e2e.conftest import run_id_of, run_vms
from tests.helpers import wait_until

pytestmark = pytest.mark.stack


def cflow_status(project, run_id):
    """`cflow status RUN_ID` as a user runs it; returns its stdout."""
    command = [sys.executable, "-m", "cflow", "status", run_id, "--config", str(project.root / "const.py"), "--stack-dir", project.stack.dir]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=project.environment(), cwd=project.root)
    assert result.returncode == 0, result.stderr
    return result.stdout


def scheduling_of(compute, project_id, name):
    for vm in run_vms(compute, project_id):
        if vm["name"] == name:
            return vm["scheduling"]
    raise AssertionError(f"VM {name} is not listed")


def test_an_item_preempted_on_spot_again_and_again_ends_done_on_a_standard_vm(project, compute, local_stack, tmp_path):
    rendezvous = tmp_path / "rendezvous"
    rendezvous.mkdir()
    project.write(f"slow {rendezvous}\necho other\n", WORKER_NODE_CNT=2, VM_SPOT=True, SPOT_PREEMPTIONS_BEFORE_STANDARD=2,
                  STANDARD_WORKERS_MAX=1)

    scheduler = project.start()
    runs = []
    try:
        run_id = run_id_of(scheduler.stdout.readline())
        for number in range(8):
            started = rendezvous / f"started-{number}"
            run = wait_until(lambda started=started: started.exists() and json.loads(started.read_text()), 150, f"run {number} of the item")
            zone_and_model = scheduling_of(compute, local_stack.project, run["vm"])
            runs.append((run["vm"], zone_and_model["provisioningModel"], run["attempt"]))
            if zone_and_model["provisioningModel"] == "STANDARD":
                (rendezvous / "release").touch()
                break
            # GCE takes the Spot VM back while the item runs on it.
            zone = next(vm["zone"].rsplit("/", 1)[-1] for vm in run_vms(compute, local_stack.project) if vm["name"] == run["vm"])
            compute.instances().simulateMaintenanceEvent(project=local_stack.project, zone=zone, instance=run["vm"]).execute()
        _out, err = scheduler.communicate(timeout=180)
    finally:
        if scheduler.poll() is None:
            scheduler.kill()
            scheduler.wait()

    assert scheduler.returncode == 0, err
    models = [model for _vm, model, _attempt in runs]
    # Preempted on Spot (at least the 2 that move it: a hand-back cut short by the 2 s grace is not counted), then standard.
    assert models[-1] == "STANDARD" and models[:-1] == ["SPOT"] * (len(models) - 1) and len(models) >= 3, runs
    assert {attempt for _vm, _model, attempt in runs} == {1}  # a preemption never uses up an attempt
    assert [r["mode"] for r in project.results(run_id)] == ["slow", "echo"]
    assert "standard lane: 1 item(s) moved to standard VMs after 2 preemptions" in err
    assert run_vms(compute, local_stack.project, run_id) == []  # the standard worker went with the run's end
    assert "1 item(s) moved to standard VMs after 2 preemptions" in cflow_status(project, run_id)


# -- a slow VM and its item's backup copy --------------------------------------------------


ONE_SLEEP = 'if mode in ("work", "flaky"):\n    time.sleep(float(args[0]))'
# Work in 50 ms steps, as real work does: a slow VM, paused most of every second, slows it (one long sleep would sleep through the pauses).
IN_STEPS = 'if mode in ("work", "flaky"):\n    for _ in range(round(float(args[0]) * 20)):\n        time.sleep(0.05)'


class SteppingProject(ChaosProject):
    """The chaos project (its ledger and modes), its "work" done in 50 ms steps."""

    def __init__(self, root, stack):
        super().__init__(root, stack)
        assert ONE_SLEEP in CHAOS_TASK
        (root / "task" / "t.py").write_text(CHAOS_TASK.replace(ONE_SLEEP, IN_STEPS))


@pytest.fixture(scope="module")
def slow_stack(tmp_path_factory):
    stack, info = start_stack(tmp_path_factory, "slow-vm-stack", slow_vms=0.25, slow_factor=10, seed=5, shutdown_grace=2)
    try:
        yield info
    finally:
        stack.down()


def test_a_run_with_a_very_slow_vm_finishes_through_a_backup_copy_recording_each_item_once(tmp_path, slow_stack, monkeypatch):
    project = SteppingProject(tmp_path, slow_stack)
    # 3 s each: the three other workers drain the queue in ~12 s; the slow VM takes ~20 s over its item.
    count = 12
    project.write_items([project.line("work", 3.0) for _ in range(count)], WORKER_NODE_CNT=4, VM_SPOT=True)

    status, out, err = project.run(timeout=300)

    assert status == 0, err
    run_id = run_id_of(out)
    assert_each_item_once(project, run_id, item_ids(count))
    clients = StackClients(slow_stack, monkeypatch)
    storage = clients.run_storage(run_id)
    markers = {item: storage.read_marker("done", item) for item in item_ids(count)}
    won = sorted(item for item, marker in markers.items() if marker.get("backup"))
    assert won, err  # at least one item was finished by its backup copy
    launched, wins = (int(n) for n in next(line for line in err.splitlines() if line.startswith("backups: ")).split()[1::2])
    assert wins == len(won) and launched >= wins
    slow = [path.name.rsplit("-", 1)[0] for path in vm_dirs(slow_stack)
            if "this VM is slow" in (path / "serial-port-1.log").read_text(errors="replace") and run_id in path.name]
    assert slow, "the emulator made no VM of the run slow"
    spans = storage.list_spans()
    stopped_before_its_end = 0
    for item in won:
        ends = [entry for entry in project.ledger() if entry["item"] == item and entry["event"] == "end"]
        assert len(project.starts(item)) == 2, (item, project.ledger())
        # The slow copy left no result: stopped as done elsewhere (a duplicate), or handed back when the
        # run's end deleted its VM first (interrupted); never done.
        others = [span for span in spans if span.item == item and span.vm != markers[item]["vm"]]
        assert markers[item]["vm"] not in slow and all(span.vm in slow for span in others), (item, spans)
        assert {span.outcome for span in others} <= {"duplicate", "interrupted"}, (item, spans)
        stopped_before_its_end += len(ends) == 1
    assert stopped_before_its_end >= 1, project.ledger()
    assert clients.vms(run_id) == []


# -- the cost cap ------------------------------------------------------------------------------


def test_a_cost_cap_ends_the_run_cleanly_with_nothing_left_running(tmp_path, local_stack, monkeypatch):
    project = ChaosProject(tmp_path, local_stack)
    count = 20
    # $0.10 per VM-second: two workers reach $1 about 5 s after they are asked for.
    prices = {"e2-small": {"standard": 360.0, "spot": 360.0}}
    project.write_items([project.line("work", 2.0) for _ in range(count)], WORKER_NODE_CNT=2, PRICES=prices, MAX_COST_USD=1.0)

    status, out, err = project.run(timeout=240)

    assert status == 4, err
    run_id = run_id_of(out)
    summary = next(line for line in err.splitlines() if line.startswith(f"run {run_id}: "))
    done, not_run = int(summary.split()[2]), int(summary.split(", ")[2].split()[0])
    assert 0 < done < count and done + not_run == count and " 0 failed" in summary, summary
    assert "cost cap: MAX_COST_USD $1.00 reached" in err and f"{not_run} item(s) not run (cancelled, not failed)" in err
    # The items running at the cap finished: every start has its end, and each done item is recorded once.
    ledger = project.ledger()
    assert sorted(e["item"] for e in ledger if e["event"] == "start") == sorted(e["item"] for e in ledger if e["event"] == "end")
    assert len([r["id"] for r in project.results(run_id)]) == done
    clients = StackClients(local_stack, monkeypatch)
    assert clients.vms(run_id) == []
    manifest = clients.run_storage(run_id).read_manifest()
    assert not clients.subscription_exists(manifest["topics"]["work_subscription"])
    shown = cflow_status(project, run_id)
    assert "cancelled at" in shown and f"reached: {not_run} item(s) not run (cancelled, not failed)" in shown
