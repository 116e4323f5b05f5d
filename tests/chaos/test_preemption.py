"""Spot VMs preempted at random moments (the Compute emulator's --preempt-mean-s): nothing lost, nothing twice."""

import json
import re

import pytest

from tests.chaos.conftest import ChaosProject, assert_each_item_once, item_ids, run_id_of, start_stack

pytestmark = pytest.mark.stack

# A VM lives 7 s on average; booting and starting the worker takes 1-2 s of that.
PREEMPT_MEAN_S = 7


@pytest.fixture(scope="module")
def preempting_stack(tmp_path_factory):
    stack, info = start_stack(tmp_path_factory, "preempting-stack", preempt_mean_s=PREEMPT_MEAN_S, shutdown_grace=2, seed=4)
    try:
        yield info
    finally:
        stack.down()


@pytest.fixture
def project(tmp_path, preempting_stack):
    return ChaosProject(tmp_path, preempting_stack)


def preemptions_in(err):
    return int(re.search(r"preemptions: (\d+)", err).group(1))


def done_markers(project, run_id):
    """The done markers of the run, read straight from the stack's Cloud Storage folder."""
    root = f"{project.stack.dir}/gcs/cflow-local-cflow/cflow/runs/{run_id}/done"
    import os

    return {name: json.loads(open(os.path.join(root, name)).read()) for name in os.listdir(root)}


def test_random_preemptions_lose_nothing_and_record_each_item_once(project):
    count = 18
    project.write_items([project.line("work", 1.0) for _ in range(count)], WORKER_NODE_CNT=3, VM_SPOT=True)

    status, out, err = project.run()

    assert status == 0, err
    run_id = run_id_of(out)
    assert_each_item_once(project, run_id, item_ids(count))
    assert preemptions_in(err) >= 1, err  # the scenario did happen
    markers = done_markers(project, run_id)
    assert sorted(markers) == item_ids(count)
    for item_id, marker in markers.items():
        # The marker names an attempt that really ran to its end (and only one marker exists per item).
        ends = [e for e in project.ledger() if e["item"] == item_id and e["event"] == "end"]
        assert ends and marker["attempt"] == 1, (item_id, marker)
    # Handed-back items kept their attempt count: a preemption never uses up an attempt.
    assert {entry["attempt"] for entry in project.ledger()} == {1}


def test_flaky_and_poison_items_under_preemption_keep_their_attempt_budget(project):
    lines = [project.line("work", 0.5) for _ in range(4)] + [project.line("flaky", 0.5) for _ in range(3)]
    lines.append(project.line("poison"))
    project.write_items(lines, WORKER_NODE_CNT=3, VM_SPOT=True, MAX_ATTEMPTS=3)

    status, out, err = project.run()

    assert status == 1, err
    assert "7 done, 1 failed of 8" in err
    failed_line = next(line for line in err.splitlines() if line.startswith("failed: item 000007"))
    assert "exit status 7" in failed_line and "logs/000007/attempt-3.log" in failed_line
    ledger = project.ledger()
    poison_failures = {e["attempt"] for e in ledger if e["item"] == "000007" and e["event"] == "fail"}
    assert poison_failures == {1, 2, 3}  # exactly MAX_ATTEMPTS failed attempts, preemptions not counted
    for item_id in ("000004", "000005", "000006"):
        assert {e["attempt"] for e in ledger if e["item"] == item_id and e["event"] == "fail"} == {1}
    results = project.results(run_id_of(out))
    assert [r["id"] for r in results] == item_ids(7)
    assert [r["attempt"] for r in results if r["mode"] == "flaky"] == [2, 2, 2]
