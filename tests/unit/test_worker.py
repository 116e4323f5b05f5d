"""The worker loop and shutdown hook against in-memory seams, with real task processes."""

import json
import os
import sys
import time

import pytest

from cflow import tasks
from cflow.worker import WorkDir, Worker, WorkerSettings, hand_back
from tests.fakes import FakeMetadata, FakePubSub, FakeStorage, received


def process_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def make_settings(command, **changes):
    values = dict(
        run_id="0101-0000-abcd",
        bucket="bucket",
        work_subscription="work-sub",
        work_topic="work-topic",
        events_topic="events-topic",
        task_command=tuple(command),
        task_timeout=30.0,
        max_attempts=3,
        lease_seconds=60,
        idle_poweroff_seconds=0.0,
    )
    values.update(changes)
    return WorkerSettings(**values)


@pytest.fixture
def work_dir(tmp_path):
    directory = WorkDir(tmp_path / "vm")
    directory.package.mkdir(parents=True)
    return directory


def write_task(work_dir, body):
    script = work_dir.package / "task.py"
    script.write_text(body)
    return [sys.executable, str(script)]


def make_worker(work_dir, command, metadata=None, **changes):
    pubsub, storage = FakePubSub(), FakeStorage()
    worker = Worker(make_settings(command, **changes), pubsub, storage, metadata or FakeMetadata(), work_dir, "vm-1")
    return worker, pubsub, storage


ECHO_ARGS = """
import json, os, sys
out = os.environ["CFLOW_OUTPUT_DIR"]
open(os.path.join(out, "args.json"), "w").write(json.dumps({
    "argv": sys.argv[1:],
    "env": {k: os.environ[k] for k in ("CFLOW_RUN_ID", "CFLOW_TASK_ID", "CFLOW_ATTEMPT", "CFLOW_BUCKET")},
}))
print("hello from the task")
"""


def test_done_item_uploads_outputs_then_marker_then_event_then_ack(work_dir):
    command = write_task(work_dir, ECHO_ARGS)
    worker, pubsub, storage = make_worker(work_dir, command)
    item = tasks.WorkItem(id="000007", index=7, args=("a b", "$(rm -rf /)", "it's", "naïve;|&`x`", "line\nbreak"))

    assert worker.process(received(item, 1)) == "done"

    written = json.loads(storage.objects["outputs/000007/args.json"])
    assert written["argv"] == list(item.args)
    assert written["env"] == {"CFLOW_RUN_ID": "0101-0000-abcd", "CFLOW_TASK_ID": "000007", "CFLOW_ATTEMPT": "1", "CFLOW_BUCKET": "bucket"}
    assert b"hello from the task" in storage.objects["logs/000007/attempt-1.log"]
    order = [c[0] for c in storage.calls]
    assert order == ["output", "log", "done-marker"]
    assert pubsub.kinds()[-2:] == ["event", "ack"]
    assert [e["type"] for e in pubsub.events] == ["started", "done"]
    assert not work_dir.inflight.exists()


def test_failed_attempt_is_republished_with_attempt_raised(work_dir):
    command = write_task(work_dir, "import sys; print('boom'); sys.exit(3)")
    worker, pubsub, storage = make_worker(work_dir, command)
    item = tasks.WorkItem(id="000001", index=1, args=("x",))

    assert worker.process(received(item, 1)) == "retry"

    topic, data, attributes = pubsub.published[0]
    assert topic == "work-topic"
    again, attempt = tasks.decode_message(data, attributes)
    assert (again, attempt) == (item, 2)
    # republish strictly before the old message is acked: a crash between them duplicates, never loses
    assert pubsub.kinds().index("publish") < pubsub.kinds().index("ack")
    assert "done/000001" not in storage.objects
    assert pubsub.events[-1]["reason"] == "exit status 3"


def test_last_attempt_records_failed_with_log(work_dir):
    command = write_task(work_dir, "import sys; print('still broken'); sys.exit(1)")
    worker, pubsub, storage = make_worker(work_dir, command, max_attempts=2)
    item = tasks.WorkItem(id="000002", index=2, args=())

    assert worker.process(received(item, 2)) == "failed"

    marker = json.loads(storage.objects["failed/000002"])
    assert marker["attempts"] == 2 and marker["log"].endswith("logs/000002/attempt-2.log")
    assert b"still broken" in storage.objects["logs/000002/attempt-2.log"]
    assert pubsub.published == []
    assert pubsub.kinds()[-1] == "ack"


def test_item_already_done_is_acked_without_running(work_dir, tmp_path):
    sentinel = tmp_path / "ran"
    command = write_task(work_dir, f"open({str(sentinel)!r}, 'w').write('x')")
    worker, pubsub, storage = make_worker(work_dir, command)
    storage.objects["done/000003"] = b"{}"

    assert worker.process(received(tasks.WorkItem(id="000003", index=3, args=()), 1)) == "duplicate"
    assert not sentinel.exists()
    assert pubsub.kinds() == ["event", "ack"]


def test_timeout_kills_the_whole_process_group(work_dir, tmp_path):
    pid_file = tmp_path / "child.pid"
    body = f"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open({str(pid_file)!r}, "w").write(str(child.pid))
time.sleep(600)
"""
    command = write_task(work_dir, body)
    worker, pubsub, storage = make_worker(work_dir, command, task_timeout=1.5)

    assert worker.process(received(tasks.WorkItem(id="000004", index=4, args=()), 1)) == "retry"

    child_pid = int(pid_file.read_text())
    # The grandchild was in the task's process group: it was signalled and dies
    # (gone, or a zombie awaiting its reaper) within moments.
    deadline = time.monotonic() + 10
    while process_alive(child_pid):
        assert time.monotonic() < deadline, f"task grandchild {child_pid} survived the timeout kill"
        time.sleep(0.05)
    assert b"timed out" in storage.objects["logs/000004/attempt-1.log"]
    assert pubsub.events[-1]["reason"] == "timed out"


def test_task_killed_by_shutdown_is_not_a_failed_attempt(work_dir):
    command = write_task(work_dir, "import sys; sys.exit(143)")
    worker, pubsub, storage = make_worker(work_dir, command, metadata=FakeMetadata(preempted=True))

    assert worker.process(received(tasks.WorkItem(id="000005", index=5, args=()), 1)) == "interrupted"
    assert pubsub.published == [] and "ack" not in pubsub.kinds()
    assert not any(k.startswith("failed/") for k in storage.objects)


def test_outputs_that_would_escape_the_prefix_are_not_uploaded(work_dir):
    body = """
import os
out = os.environ["CFLOW_OUTPUT_DIR"]
os.makedirs(os.path.join(out, "sub"))
open(os.path.join(out, "sub", "nested.txt"), "w").write("n")
open(os.path.join(out, "good.csv"), "w").write("a\\n")
"""
    command = write_task(work_dir, body)
    worker, pubsub, storage = make_worker(work_dir, command)

    assert worker.process(received(tasks.WorkItem(id="000006", index=6, args=()), 1)) == "done"
    assert [k for k in storage.objects if k.startswith("outputs/")] == ["outputs/000006/good.csv"]
    assert b"not uploaded" in storage.objects["logs/000006/attempt-1.log"]


def test_missing_task_program_is_a_failed_attempt(work_dir):
    worker, pubsub, storage = make_worker(work_dir, [str(work_dir.package / "no-such-program")])
    assert worker.process(received(tasks.WorkItem(id="000008", index=8, args=()), 1)) == "retry"
    assert b"cannot start" in storage.objects["logs/000008/attempt-1.log"]


def test_run_returns_idle_when_queue_stays_empty(work_dir):
    command = write_task(work_dir, "pass")
    worker, pubsub, storage = make_worker(work_dir, command)
    item = tasks.WorkItem(id="000009", index=9, args=())
    pubsub.queue.append(received(item, 1))

    assert worker.run(pull_timeout=0.01) == "idle"
    assert "done/000009" in storage.objects
    assert [e["type"] for e in pubsub.events] == ["started", "done", "idle"]


def test_hand_back_nacks_in_flight_item_and_uploads_partial_log(work_dir):
    pubsub, storage = FakePubSub(), FakeStorage()
    log_file = work_dir.root / "partial.log"
    log_file.write_text("half way\n")
    work_dir.write_inflight({"item": "000010", "attempt": 2, "ack_id": "ack-77", "log": str(log_file)})

    item_id = hand_back(make_settings(["true"]), pubsub, storage, FakeMetadata(preempted=True), work_dir, "vm-1")

    assert item_id == "000010"
    assert ("nack", "ack-77") in pubsub.calls
    assert pubsub.events[-1]["type"] == "preempted" and pubsub.events[-1]["attempt"] == 2
    assert b"half way" in storage.objects["logs/000010/attempt-2.log"]
    assert work_dir.is_stopping()


def test_hand_back_with_nothing_in_flight_only_sets_stopping(work_dir):
    pubsub, storage = FakePubSub(), FakeStorage()
    assert hand_back(make_settings(["true"]), pubsub, storage, FakeMetadata(), work_dir, "vm-1") is None
    assert pubsub.calls == [] and work_dir.is_stopping()
