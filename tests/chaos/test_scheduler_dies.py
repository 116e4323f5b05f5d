"""The scheduler killed, resumed, cancelled from elsewhere, interrupted: the run ends cleanly, nothing recorded twice."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.chaos.conftest import assert_each_item_once, is_done, item_ids, run_id_of, stopped_on_exit, wait_for_exit, wait_until

pytestmark = pytest.mark.stack

ITEMS = 10


def kill_scheduler_midway(project, clients, done_before_kill=3):
    """Start a run of ITEMS short items, SIGKILL its scheduler once some are done. Returns (run id, done ids, kill time)."""
    project.write_items([project.line("work", 0.5) for _ in range(ITEMS)], WORKER_NODE_CNT=2)
    with stopped_on_exit(project.start()) as scheduler:
        run_id = wait_until(lambda: "run id: " in project.output()[0] and run_id_of(project.output()[0]), 30, "the run id")
        storage = clients.run_storage(run_id)
        wait_until(lambda: len(done_ids(storage)) >= done_before_kill, 120, f"{done_before_kill} items to be done")
        scheduler.send_signal(signal.SIGKILL)
        scheduler.wait()
    killed_at = time.time()
    return run_id, done_ids(storage), killed_at


def done_ids(storage):
    from cflow.errors import NotFound

    try:
        return storage.list_done_ids()
    except NotFound:  # the run has not made its bucket yet
        return set()


def assert_nothing_recorded_done_ran_again(project, done_at_kill, killed_at):
    for item_id in done_at_kill:
        assert not [entry for entry in project.starts(item_id) if entry["time"] > killed_at], item_id


def test_sigkilled_scheduler_resumes_from_cloud_storage(project, clients):
    run_id, done_at_kill, killed_at = kill_scheduler_midway(project, clients)
    assert len(done_at_kill) < ITEMS

    status, _out, err = project.run("--resume", run_id)

    assert status == 0, err
    assert f"{ITEMS} done, 0 failed" in err
    assert_each_item_once(project, run_id, item_ids(ITEMS))
    assert_nothing_recorded_done_ran_again(project, done_at_kill, killed_at)
    assert clients.vms(run_id) == []


def test_resume_after_pubsub_lost_every_message_republishes_what_is_unfinished(project, clients):
    from cflow.gcp.pubsub import RunTopics

    run_id, done_at_kill, killed_at = kill_scheduler_midway(project, clients)
    # The local Pub/Sub emulator keeps nothing across a restart: the run's topics, subscriptions and queued items vanish.
    topics = RunTopics.from_dict(clients.run_storage(run_id).read_manifest()["topics"])
    clients.pubsub().delete_run_topics(topics)

    status, _out, err = project.run("--resume", run_id)

    assert status == 0, err
    assert "published" in err  # the unfinished items went out again
    assert_each_item_once(project, run_id, item_ids(ITEMS))
    assert_nothing_recorded_done_ran_again(project, done_at_kill, killed_at)
    assert not clients.subscription_exists(topics.work_subscription)


def cflow_command(project, *args):
    command = [sys.executable, "-m", "cflow", *args, "--config", str(project.root / "const.py"),
               "--stack-dir", project.stack.dir]
    return subprocess.run(command, cwd=project.root, capture_output=True, text=True, timeout=120, env=project.environment())


def test_cflow_cancel_stops_a_running_scheduler_cleanly(project, clients):
    from cflow.gcp.pubsub import RunTopics

    project.write_items([project.line("work", 0.1), *(project.line("slow") for _ in range(4))], WORKER_NODE_CNT=2)
    with stopped_on_exit(project.start()) as scheduler:
        run_id = wait_until(lambda: "run id: " in project.output()[0] and run_id_of(project.output()[0]), 30, "the run id")
        storage = clients.run_storage(run_id)
        wait_until(lambda: is_done(storage, "000000"), 120, "item 000000 to be done")
        wait_until(lambda: any(project.started(item_id) for item_id in item_ids(5)[1:]), 60, "a slow item to start")

        cancel = cflow_command(project, "cancel", run_id, "--yes")
        assert cancel.returncode == 0, cancel.stderr
        status = wait_for_exit(scheduler, 60)

    _out, err = project.output()
    assert status == 1
    assert "Traceback" not in err
    assert f"error: run {run_id} was cancelled" in err.splitlines()[-1]
    assert clients.vms(run_id) == []
    topics = RunTopics.from_dict(storage.read_manifest()["topics"])
    assert not clients.subscription_exists(topics.work_subscription)
    assert storage.list_output_names("000000") == ["result.jsonl"]  # outputs and logs are kept
    assert storage.read_log("000000", 1) is not None
    assert storage.read_cancelled() is not None

    resumed = project.run("--resume", run_id, timeout=60)
    assert resumed[0] == 1 and "was cancelled and cannot be resumed" in resumed[2]


def test_ctrl_c_with_yes_cancels_the_run_and_exits_130(project, clients):
    from cflow.gcp.pubsub import RunTopics

    project.write_items([project.line("slow") for _ in range(3)], WORKER_NODE_CNT=2)
    with stopped_on_exit(project.start("--yes")) as scheduler:
        run_id = wait_until(lambda: "run id: " in project.output()[0] and run_id_of(project.output()[0]), 30, "the run id")
        wait_until(lambda: any(project.started(item_id) for item_id in item_ids(3)), 120, "a slow item to start")
        os.kill(scheduler.pid, signal.SIGINT)
        status = wait_for_exit(scheduler, 90)

    _out, err = project.output()
    assert status == 130, err
    assert f"run {run_id} cancelled: VMs, topics and subscriptions deleted" in err
    assert "Traceback" not in err
    storage = clients.run_storage(run_id)
    assert storage.read_cancelled() is not None
    assert clients.vms(run_id) == []
    topics = RunTopics.from_dict(storage.read_manifest()["topics"])
    assert not clients.subscription_exists(topics.work_subscription)
