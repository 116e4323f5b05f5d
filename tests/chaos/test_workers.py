"""Workers that die, items delivered twice, tasks that hang: every item's result lands exactly once."""

import os
import signal

import pytest

from tests.chaos.conftest import (
    assert_each_item_once,
    is_done,
    item_ids,
    process_alive,
    run_id_of,
    stopped_on_exit,
    vm_dirs,
    wait_for_exit,
    wait_until,
    worker_processes,
)

pytestmark = pytest.mark.stack


def test_sigkilled_worker_is_restarted_and_its_item_runs_again(project, local_stack):
    # The ledger counts the slow item's runs: no backup copy of it (three quick items done would allow one).
    project.write_items([project.line("slow"), *(project.line("work", 0.2) for _ in range(3))], WORKER_NODE_CNT=2, BACKUP_TASKS=False)

    with stopped_on_exit(project.start()) as scheduler:
        first = wait_until(lambda: project.started("000000").get(0), 120, "the slow item to start")
        workers = wait_until(lambda: worker_processes(local_stack, first["vm"]), 10, "the VM's worker process")
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)

        # init.sh starts a new worker on the same VM; it stops the orphaned task and hands the item back.
        restarted = wait_until(lambda: [pid for pid in worker_processes(local_stack, first["vm"]) if pid != workers[0]],
                             30, "init.sh to restart the worker")
        wait_until(lambda: not process_alive(first["pid"]), 30, "the orphaned task to be stopped")
        second = wait_until(lambda: project.started("000000").get(1), 60, "the slow item to run again")
        assert second["attempt"] == 1  # a dead worker is no failed attempt
        assert restarted
        project.release()
        status = wait_for_exit(scheduler, 120)

    out, err = project.output()
    assert status == 0, err
    assert_each_item_once(project, run_id_of(out), item_ids(4))
    assert [entry["event"] for entry in project.ledger() if entry["item"] == "000000"].count("end") == 1


def test_item_already_done_and_delivered_again_is_acked_without_running(project, local_stack, clients):
    from cflow import tasks

    project.write_items([project.line("work", 0.1), project.line("slow"), project.line("slow")], WORKER_NODE_CNT=2)

    with stopped_on_exit(project.start()) as scheduler:
        run_id = wait_until(lambda: "run id: " in project.output()[0] and run_id_of(project.output()[0]), 30, "the run id")
        storage = clients.run_storage(run_id)
        wait_until(lambda: is_done(storage, "000000"), 120, "item 000000 to be done")
        wait_until(lambda: project.started("000001") and project.started("000002"), 120, "both slow items to start")

        # A lost ack or a duplicate delivery, made by hand: the done item comes round again.
        manifest = storage.read_manifest()
        first_item = storage.read_items()[0]
        data, attributes = tasks.encode_message(tasks.WorkItem("000000", 0, first_item.args), 1)
        clients.pubsub().publish(manifest["topics"]["work_topic"], data, attributes)
        project.release("000001")

        def duplicate_acked():
            return any("item 000000 attempt 1 is already recorded; acked without running it again"
                       in (disk / "home" / "cflow" / "worker.log").read_text(errors="replace")
                       for disk in vm_dirs(local_stack) if (disk / "home" / "cflow" / "worker.log").exists())

        wait_until(duplicate_acked, 60, "a worker to ack the duplicate")
        project.release()
        status = wait_for_exit(scheduler, 120)

    _out, err = project.output()
    assert status == 0, err
    assert_each_item_once(project, run_id, item_ids(3))
    assert len(project.starts("000000")) == 1


def test_task_timeout_kills_the_whole_process_group_and_counts_as_a_failed_attempt(project):
    project.write_items([project.line("hang"), project.line("work", 0.1), project.line("work", 0.1)],
                        WORKER_NODE_CNT=2, TASK_TIMEOUT=1.5, MAX_ATTEMPTS=2)

    status, out, err = project.run()

    assert status == 1, err
    assert "2 done, 1 failed of 3" in err
    failed_line = next(line for line in err.splitlines() if line.startswith("failed: item 000000"))
    assert "timed out" in failed_line and "logs/000000/attempt-2.log" in failed_line
    assert [entry["attempt"] for entry in project.starts("000000")] == [1, 2]  # two attempts, then failed
    pids = [int(pid) for path in project.pid_dir.glob("000000-*.pids") for pid in path.read_text().split()]
    assert len(pids) == 4  # task and child, per attempt
    wait_until(lambda: not any(process_alive(pid) for pid in pids), 15, "every process of the timed-out tasks to die")
    assert_each_item_once(project, run_id_of(out), ["000001", "000002"])
