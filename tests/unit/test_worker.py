"""The worker loop and shutdown hook against in-memory seams, with real task processes."""

import dataclasses
import json
import os
import sys
import time

import pytest

from cflow import tasks
from cflow.worker import WorkDir, Worker, WorkerContext, WorkerSettings, hand_back
from tests.fakes import FakeMetadata, FakePubSub, FakeStorage, received


def process_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def make_settings(command, **changes):
    settings = WorkerSettings(
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
    return dataclasses.replace(settings, **changes)


def make_context(work_dir, pubsub, storage, metadata=None, command=("true",)):
    """What the shutdown hook, or a restarted worker, works with."""
    return WorkerContext(make_settings(command), pubsub, storage, metadata or FakeMetadata(), work_dir, "vm-1")


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
    worker, _pubsub, storage = make_worker(work_dir, command)

    assert worker.process(received(tasks.WorkItem(id="000006", index=6, args=()), 1)) == "done"
    assert [k for k in storage.objects if k.startswith("outputs/")] == ["outputs/000006/good.csv"]
    assert b"not uploaded" in storage.objects["logs/000006/attempt-1.log"]


def test_missing_task_program_is_a_failed_attempt(work_dir):
    worker, _pubsub, storage = make_worker(work_dir, [str(work_dir.package / "no-such-program")])
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

    item_id = hand_back(make_context(work_dir, pubsub, storage, FakeMetadata(preempted=True)))

    assert item_id == "000010"
    assert ("nack", "ack-77") in pubsub.calls
    assert pubsub.events[-1]["type"] == "preempted" and pubsub.events[-1]["attempt"] == 2
    assert b"half way" in storage.objects["logs/000010/attempt-2.log"]
    assert work_dir.is_stopping()


def test_hand_back_with_nothing_in_flight_only_sets_stopping(work_dir):
    pubsub, storage = FakePubSub(), FakeStorage()
    assert hand_back(make_context(work_dir, pubsub, storage)) is None
    assert pubsub.calls == [] and work_dir.is_stopping()


# -- preemption at any moment, and the races between hook and worker ----------

import signal  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402

from cflow.procinfo import boot_id, process_start  # noqa: E402
from cflow.worker import hand_back_inflight  # noqa: E402
from cflow.worker.task import ExitWatch, kill_recorded_task  # noqa: E402
from cflow.worker.workdir import TaskRecord  # noqa: E402

COUNTING_TASK = """
import os, sys
with open(sys.argv[1], "a") as runs:
    runs.write(os.environ["CFLOW_TASK_ID"] + "\\n")
open(os.path.join(os.environ["CFLOW_OUTPUT_DIR"], "result.txt"), "w").write("result of " + os.environ["CFLOW_TASK_ID"])
"""


class VmDied(BaseException):
    """The VM vanished at this point (a BaseException, so no handler in the worker can catch it)."""


class DyingStorage(FakeStorage):
    def __init__(self, die_at):
        super().__init__()
        self.die_at = die_at

    def _maybe_die(self, operation):
        if operation == self.die_at:
            self.die_at = None
            raise VmDied(operation)

    def upload_output(self, item_id, name, local_path):
        self._maybe_die("output")
        super().upload_output(item_id, name, local_path)

    def upload_log(self, item_id, attempt, local_path):
        self._maybe_die("log")
        return super().upload_log(item_id, attempt, local_path)

    def write_done_marker(self, item_id, info):
        self._maybe_die("marker")
        return super().write_done_marker(item_id, info)


class DyingPubSub(FakePubSub):
    def __init__(self, die_at):
        super().__init__()
        self.die_at = die_at

    def publish_event(self, topic, event, wait=True):
        if event["type"] == "done" and self.die_at == "event":
            self.die_at = None
            raise VmDied("event")
        super().publish_event(topic, event)

    def ack(self, subscription, ack_ids):
        if self.die_at == "ack":
            self.die_at = None
            raise VmDied("ack")
        super().ack(subscription, ack_ids)


@pytest.mark.parametrize("dies_before", ["output", "log", "marker", "event", "ack", None])
def test_vm_dying_between_any_two_steps_loses_nothing_and_records_once(tmp_path, dies_before):
    runs = tmp_path / "runs.txt"
    storage = DyingStorage(dies_before)
    pubsub = DyingPubSub(dies_before)
    item = tasks.WorkItem(id="000011", index=11, args=(str(runs),))
    first_vm = WorkDir(tmp_path / "vm-a")
    first_vm.package.mkdir(parents=True)
    command = write_task(first_vm, COUNTING_TASK)
    settings = make_settings(command)

    first = Worker(settings, pubsub, storage, FakeMetadata(), first_vm, "vm-a")
    if dies_before is None:
        assert first.process(received(item, 1, ack_id="ack-a")) == "done"
    else:
        with pytest.raises(VmDied):
            first.process(received(item, 1, ack_id="ack-a"))
    marker_before_redelivery = "done/000011" in storage.objects

    # The lease runs out (or the hook nacked): the same message reaches another VM.
    second_vm = WorkDir(tmp_path / "vm-b")
    second_vm.package.mkdir(parents=True)
    second = Worker(settings, pubsub, storage, FakeMetadata(), second_vm, "vm-b")
    outcome = second.process(received(item, 1, ack_id="ack-b"))

    assert outcome == ("duplicate" if marker_before_redelivery else "done")
    assert runs.read_text().splitlines() == ["000011"] * (1 if marker_before_redelivery else 2)
    assert storage.objects["outputs/000011/result.txt"] == b"result of 000011"
    assert json.loads(storage.objects["done/000011"])["vm"] == ("vm-a" if marker_before_redelivery else "vm-b")
    assert ("ack", ("ack-b",)) in pubsub.calls


def wait_until(condition, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


BLOCKING_TASK = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # dies only by SIGKILL, after the kill grace
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(600)
"""


def test_stop_flag_mid_task_hands_back_before_killing_and_never_extends_after_the_nack(work_dir, tmp_path, monkeypatch):
    # The keeper ticks every second and the kill grace lasts 1.5 s: an unguarded keeper would extend after the nack.
    monkeypatch.setattr("cflow.worker.task.TASK_KILL_GRACE_SECONDS", 1.5)
    pid_file = tmp_path / "child.pid"
    command = write_task(work_dir, BLOCKING_TASK)
    worker, pubsub, storage = make_worker(work_dir, command, lease_seconds=1)  # the keeper extends every second
    item = tasks.WorkItem(id="000012", index=12, args=(str(pid_file),))
    outcome: dict[str, object] = {}
    thread = threading.Thread(target=lambda: outcome.update(value=worker.process(received(item, 1, ack_id="ack-12"))))
    thread.start()
    wait_until(pid_file.exists, what="the task to start")
    wait_until(lambda: ("extend", "ack-12", 1) in pubsub.calls, what="a lease extension")

    work_dir.request_stop()  # what the shutdown hook does first
    thread.join(timeout=20)

    assert outcome["value"] == "interrupted"
    calls = pubsub.calls
    nack_at = calls.index(("nack", "ack-12"))
    assert ("extend", "ack-12", 1) not in calls[nack_at:]
    assert pubsub.published == [] and ("ack", ("ack-12",)) not in calls  # no failed attempt counted
    assert [e["type"] for e in pubsub.events] == ["started", "interrupted"]
    assert b"handed back" in storage.objects["logs/000012/attempt-1.log"]
    child = int(pid_file.read_text())
    wait_until(lambda: not process_alive(child), what="the task's child to die")
    assert not work_dir.inflight.exists()


def test_task_failing_as_the_shutdown_begins_is_handed_back_not_republished(work_dir):
    # The task sets the stop flag itself just before failing: the hook's flag and the failure race.
    command = write_task(work_dir, "import os, sys; open(os.path.join(sys.argv[1], 'stopping'), 'w'); sys.exit(1)")
    worker, pubsub, storage = make_worker(work_dir, command)
    item = tasks.WorkItem(id="000013", index=13, args=(str(work_dir.root),))

    assert worker.process(received(item, 1, ack_id="ack-13")) == "interrupted"

    assert ("nack", "ack-13") in pubsub.calls
    assert pubsub.published == [] and "ack" not in pubsub.kinds()
    assert not any(name.startswith(("attempts/", "failed/")) for name in storage.objects)


class GatedStorage(FakeStorage):
    """upload_output blocks until the test opens the gate: a worker caught mid-upload."""

    def __init__(self):
        super().__init__()
        self.uploading = threading.Event()
        self.gate = threading.Event()

    def upload_output(self, item_id, name, local_path):
        self.uploading.set()
        assert self.gate.wait(20)
        super().upload_output(item_id, name, local_path)


def test_hook_waits_for_a_worker_recording_its_result_instead_of_nacking(work_dir, tmp_path):
    command = write_task(work_dir, COUNTING_TASK)
    pubsub, storage = FakePubSub(), GatedStorage()
    worker = Worker(make_settings(command), pubsub, storage, FakeMetadata(), work_dir, "vm-1")
    item = tasks.WorkItem(id="000014", index=14, args=(str(tmp_path / "runs.txt"),))
    outcome: dict[str, object] = {}
    hook: dict[str, object] = {}
    worker_thread = threading.Thread(target=lambda: outcome.update(value=worker.process(received(item, 1, ack_id="ack-14"))))
    worker_thread.start()
    assert storage.uploading.wait(20)

    hook_thread = threading.Thread(target=lambda: hook.update(
        value=hand_back(make_context(work_dir, pubsub, storage, FakeMetadata(preempted=True), command),
                        settle_wait_seconds=20)))
    hook_thread.start()
    wait_until(work_dir.is_stopping, what="the hook's stop flag")
    storage.gate.set()
    worker_thread.join(20)
    hook_thread.join(20)

    assert outcome["value"] == "done" and hook["value"] is None
    assert ("nack", "ack-14") not in pubsub.calls
    assert pubsub.kinds()[-1] == "ack"


def test_redelivered_attempt_whose_failure_is_recorded_is_acked_without_running(work_dir, tmp_path):
    sentinel = tmp_path / "ran"
    command = write_task(work_dir, f"open({str(sentinel)!r}, 'w').write('x')")
    worker, pubsub, storage = make_worker(work_dir, command)
    storage.objects["attempts/000015/1"] = b"{}"  # attempt 1 failed and attempt 2 is queued

    assert worker.process(received(tasks.WorkItem(id="000015", index=15, args=()), 1)) == "duplicate"
    assert not sentinel.exists() and pubsub.published == []
    assert pubsub.kinds() == ["event", "ack"]


def test_failed_attempt_is_recorded_after_its_successor_is_published(work_dir, monkeypatch):
    command = write_task(work_dir, "import sys; sys.exit(2)")
    worker, pubsub, storage = make_worker(work_dir, command)
    order = []
    storage_marker, pubsub_publish = storage.write_attempt_marker, pubsub.publish

    def write_attempt_marker(*args):
        order.append("marker")
        return storage_marker(*args)

    def publish(*args):
        order.append("publish")
        return pubsub_publish(*args)

    monkeypatch.setattr(storage, "write_attempt_marker", write_attempt_marker)
    monkeypatch.setattr(pubsub, "publish", publish)

    assert worker.process(received(tasks.WorkItem(id="000016", index=16, args=()), 1)) == "retry"
    assert order == ["publish", "marker"]
    assert "attempts/000016/1" in storage.objects


def start_orphan_group():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    wait_until(lambda: process_start(process.pid) is not None)
    return process


def test_restarted_worker_kills_the_orphaned_task_and_hands_its_item_back(work_dir):
    orphan = start_orphan_group()
    try:
        log_file = work_dir.root / "orphan.log"
        log_file.write_text("half way\n")
        work_dir.write_inflight({"item": "000017", "attempt": 1, "ack_id": "ack-17", "log": str(log_file),
                                 "task_pgid": orphan.pid, "task_start": process_start(orphan.pid),
                                 "boot_id": boot_id(), "settling": True})
        pubsub, storage = FakePubSub(), FakeStorage()

        item_id = hand_back_inflight(make_context(work_dir, pubsub, storage), reason="worker died", take_settling=True)

        assert item_id == "000017"
        assert orphan.wait(timeout=10) == -signal.SIGTERM
        assert ("nack", "ack-17") in pubsub.calls and pubsub.events[-1]["type"] == "interrupted"
        assert b"worker died" in storage.objects["logs/000017/attempt-1.log"]
        assert not work_dir.inflight.exists()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_a_recycled_pid_is_never_signalled():
    stranger = start_orphan_group()
    try:
        started = process_start(stranger.pid)
        assert started is not None
        record: TaskRecord = {"item": "000018", "attempt": 1, "ack_id": "ack-18", "log": "task.log",
                              "task_pgid": stranger.pid, "task_start": started, "boot_id": boot_id()}
        assert not kill_recorded_task({**record, "task_start": started - 1}, signal.SIGKILL)
        assert not kill_recorded_task({**record, "boot_id": "another-boot"}, signal.SIGKILL)
        assert stranger.poll() is None
        assert kill_recorded_task(record, signal.SIGKILL)
        assert stranger.wait(timeout=10) == -signal.SIGKILL
    finally:
        stranger.kill()
        stranger.wait()


def test_stop_flag_from_an_earlier_boot_is_stale(work_dir):
    work_dir.request_stop()
    flagged_at = work_dir.stopping.stat().st_mtime
    assert work_dir.stop_flag_is_stale(boot_started_at=flagged_at + 5)
    assert not work_dir.stop_flag_is_stale(boot_started_at=flagged_at - 5)


def test_failing_pulls_back_off_and_end_idle(work_dir):
    class BrokenPubSub(FakePubSub):
        def pull(self, subscription, max_messages=1, timeout=30.0):
            from google.api_core import exceptions

            self.calls.append(("pull", subscription))
            raise exceptions.NotFound("Subscription does not exist")

    now = [0.0]
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        now[0] += seconds

    worker = Worker(make_settings(["true"], idle_poweroff_seconds=30), BrokenPubSub(), FakeStorage(), FakeMetadata(),
                    work_dir, "vm-1", clock=lambda: now[0], sleep=sleep)
    assert worker.run(pull_timeout=0.01) == "idle"
    assert waits == sorted(waits) and waits[0] < waits[-1] <= 10


def test_hook_with_nothing_in_flight_sets_stop_and_the_worker_takes_no_new_item(work_dir):
    command = write_task(work_dir, "pass")
    worker, pubsub, storage = make_worker(work_dir, command)
    hand_back(make_context(work_dir, pubsub, storage, command=command))
    pubsub.queue.append(received(tasks.WorkItem(id="000019", index=19, args=()), 1))

    assert worker.run(pull_timeout=0.01) == "stopping"
    assert pubsub.queue  # left for another VM


def test_an_item_whose_processing_raises_is_handed_back_and_the_loop_goes_on(work_dir, monkeypatch):
    command = write_task(work_dir, "pass")
    pubsub, storage = FakePubSub(), FakeStorage()
    worker = Worker(make_settings(command), pubsub, storage, FakeMetadata(), work_dir, "vm-1", sleep=lambda seconds: None)
    failing_once = [True]
    is_done = storage.is_done

    def flaky_is_done(item_id):
        if failing_once.pop() if failing_once else False:
            raise ConnectionError("storage unreachable")
        return is_done(item_id)

    monkeypatch.setattr(storage, "is_done", flaky_is_done)
    pubsub.queue += [received(tasks.WorkItem(id="000020", index=20, args=()), 1, ack_id="ack-20a"),
                     received(tasks.WorkItem(id="000021", index=21, args=()), 1, ack_id="ack-21")]

    assert worker.run(pull_timeout=0.01) == "idle"
    assert ("nack", "ack-20a") in pubsub.calls
    assert "done/000021" in storage.objects


# -- recording one result while the next task runs ----------------------------

TWO_SPEED_TASK = """
import os, sys, time
with open(sys.argv[1], "a") as runs:
    runs.write(os.environ["CFLOW_TASK_ID"] + "\\n")
open(os.path.join(os.environ["CFLOW_OUTPUT_DIR"], "result.txt"), "w").write("result of " + os.environ["CFLOW_TASK_ID"])
if sys.argv[2:] == ["slow"]:
    time.sleep(600)
"""


def start_run(worker):
    outcome: dict[str, object] = {}
    thread = threading.Thread(target=lambda: outcome.update(value=worker.run(pull_timeout=0.01)))
    thread.start()
    return thread, outcome


def test_next_task_runs_while_the_previous_result_is_recorded(work_dir, tmp_path):
    runs = tmp_path / "runs.txt"
    command = write_task(work_dir, TWO_SPEED_TASK)
    pubsub, storage = FakePubSub(), GatedStorage()  # the first upload waits for the gate
    worker = Worker(make_settings(command), pubsub, storage, FakeMetadata(), work_dir, "vm-1")
    pubsub.queue += [received(tasks.WorkItem(id="000031", index=31, args=(str(runs),)), 1, ack_id="ack-31"),
                     received(tasks.WorkItem(id="000032", index=32, args=(str(runs),)), 1, ack_id="ack-32")]
    thread, outcome = start_run(worker)

    assert storage.uploading.wait(20)
    wait_until(lambda: runs.exists() and runs.read_text().split() == ["000031", "000032"], what="the second task")
    # The second task ran while the first result was still unrecorded.
    assert "done/000031" not in storage.objects
    assert json.loads(work_dir.settling.read_text())["item"] == "000031"
    storage.gate.set()
    thread.join(20)

    assert outcome["value"] == "idle"
    assert "done/000031" in storage.objects and "done/000032" in storage.objects
    assert [c for c in pubsub.calls if c[0] == "ack"] == [("ack", ("ack-31",)), ("ack", ("ack-32",))]
    assert [(e["type"], e.get("item")) for e in pubsub.events] == [
        ("started", "000031"), ("started", "000032"), ("done", "000031"), ("done", "000032"), ("idle", None)]
    assert not work_dir.inflight.exists() and not work_dir.settling.exists()


def test_hook_hands_back_the_running_item_at_once_and_waits_for_the_one_being_recorded(work_dir, tmp_path):
    runs = tmp_path / "runs.txt"
    command = write_task(work_dir, TWO_SPEED_TASK)
    pubsub, storage = FakePubSub(), GatedStorage()
    worker = Worker(make_settings(command), pubsub, storage, FakeMetadata(), work_dir, "vm-1")
    pubsub.queue += [received(tasks.WorkItem(id="000033", index=33, args=(str(runs),)), 1, ack_id="ack-33"),
                     received(tasks.WorkItem(id="000034", index=34, args=(str(runs), "slow")), 1, ack_id="ack-34")]
    thread, outcome = start_run(worker)
    assert storage.uploading.wait(20)
    wait_until(lambda: runs.exists() and "000034" in runs.read_text().split(), what="the slow task")
    wait_until(lambda: work_dir.read_inflight() is not None and "task_pgid" in work_dir.read_inflight(),
               what="the slow task's group in the record")

    hook: dict[str, object] = {}
    hook_thread = threading.Thread(target=lambda: hook.update(
        value=hand_back(make_context(work_dir, pubsub, storage, FakeMetadata(preempted=True), command),
                        settle_wait_seconds=20)))
    hook_thread.start()
    wait_until(lambda: ("nack", "ack-34") in pubsub.calls, what="the running item's nack")
    assert hook_thread.is_alive()  # still waiting for 000033's result
    assert ("nack", "ack-33") not in pubsub.calls
    storage.gate.set()
    hook_thread.join(20)
    thread.join(20)

    assert hook["value"] == "000034" and outcome["value"] == "stopping"
    assert "done/000033" in storage.objects and "done/000034" not in storage.objects
    assert ("ack", ("ack-33",)) in pubsub.calls and ("ack", ("ack-34",)) not in pubsub.calls
    assert b"preempted; item handed back" in storage.objects["logs/000034/attempt-1.log"]
    assert not work_dir.inflight.exists() and not work_dir.settling.exists()


def test_a_result_that_cannot_be_recorded_is_handed_back_and_the_loop_goes_on(work_dir, tmp_path, monkeypatch):
    runs = tmp_path / "runs.txt"
    command = write_task(work_dir, TWO_SPEED_TASK)
    worker, pubsub, storage = make_worker(work_dir, command)
    write_done_marker = storage.write_done_marker

    def failing_for_35(item_id, info):
        if item_id == "000035":
            raise ConnectionError("storage unreachable")
        return write_done_marker(item_id, info)

    monkeypatch.setattr(storage, "write_done_marker", failing_for_35)
    pubsub.queue += [received(tasks.WorkItem(id="000035", index=35, args=(str(runs),)), 1, ack_id="ack-35"),
                     received(tasks.WorkItem(id="000036", index=36, args=(str(runs),)), 1, ack_id="ack-36")]

    assert worker.run(pull_timeout=0.01) == "idle"

    assert ("nack", "ack-35") in pubsub.calls and ("ack", ("ack-35",)) not in pubsub.calls
    assert "done/000035" not in storage.objects and "done/000036" in storage.objects
    assert ("interrupted", "000035") in [(e["type"], e.get("item")) for e in pubsub.events]
    assert not work_dir.inflight.exists() and not work_dir.settling.exists()


def test_restarted_worker_hands_back_both_the_running_item_and_the_one_being_recorded(work_dir):
    log_file = work_dir.root / "partial.log"
    log_file.write_text("half way\n")
    with work_dir.handback_lock():
        work_dir.write_inflight({"item": "000038", "attempt": 2, "ack_id": "ack-38", "log": str(log_file)})
        work_dir.move_to_settling(work_dir.read_inflight())
        work_dir.write_inflight({"item": "000037", "attempt": 1, "ack_id": "ack-37", "log": str(log_file)})
    pubsub, storage = FakePubSub(), FakeStorage()

    item_id = hand_back_inflight(make_context(work_dir, pubsub, storage), reason="worker died", take_settling=True)

    assert item_id == "000037"
    assert {("nack", "ack-37"), ("nack", "ack-38")} <= set(pubsub.calls)
    assert "logs/000037/attempt-1.log" in storage.objects and "logs/000038/attempt-2.log" in storage.objects
    assert not work_dir.inflight.exists() and not work_dir.settling.exists()


@pytest.mark.parametrize("has_pidfd", [True, False])
def test_exit_watch_reports_a_running_task_then_its_exit_status(monkeypatch, has_pidfd):
    if not has_pidfd:  # a kernel without pidfd_open: the watch polls instead
        def no_pidfd(pid):
            raise OSError("pidfd_open: function not implemented")
        monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read(); sys.exit(7)"],
                               stdin=subprocess.PIPE)
    try:
        with ExitWatch(process) as watch:
            assert (watch.pidfd is not None) == has_pidfd
            assert watch.wait(0.05) is None
            assert process.stdin is not None
            process.stdin.close()  # the task reads to the end of its input, then exits
            assert watch.wait(30) == 7
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_process_hands_back_an_item_whose_result_cannot_be_recorded(work_dir, tmp_path, monkeypatch):
    command = write_task(work_dir, TWO_SPEED_TASK)
    worker, pubsub, storage = make_worker(work_dir, command)

    def unreachable(item_id, info):
        raise ConnectionError("storage unreachable")

    monkeypatch.setattr(storage, "write_done_marker", unreachable)
    item = tasks.WorkItem(id="000039", index=39, args=(str(tmp_path / "runs.txt"),))

    assert worker.process(received(item, 1, ack_id="ack-39")) == "handed back"
    assert ("nack", "ack-39") in pubsub.calls and ("ack", ("ack-39",)) not in pubsub.calls
    # Nothing left for the shutdown hook to wait for.
    assert not work_dir.settling.exists() and not work_dir.inflight.exists()


# -- the shutdown hook reaches the network first with its nack ---------------------


class JournalMetadata(FakeMetadata):
    """Notes each question asked of the metadata server in the Pub/Sub fake's journal."""

    def __init__(self, journal, preempted=True):
        super().__init__(preempted)
        self.journal = journal

    def preempted(self):
        self.journal.append(("metadata", "preempted"))
        return super().preempted()


def test_the_hook_nacks_before_it_asks_the_metadata_server_anything(work_dir):
    pubsub, storage = FakePubSub(), FakeStorage()
    log_file = work_dir.root / "partial.log"
    log_file.write_text("half way\n")
    work_dir.write_inflight({"item": "000011", "attempt": 1, "ack_id": "ack-9", "log": str(log_file)})

    hand_back(make_context(work_dir, pubsub, storage, JournalMetadata(pubsub.calls)))

    assert pubsub.calls[0] == ("nack", "ack-9")
    assert ("metadata", "preempted") in pubsub.calls
    assert b"cflow: preempted; item handed back" in storage.objects["logs/000011/attempt-1.log"]


def test_the_hook_builds_its_context_from_the_settings_the_worker_kept_without_a_request(work_dir, monkeypatch):
    from cflow.gcp.metadata import Metadata
    from cflow.gcp.storage import RunStorage
    from cflow.worker import entry

    manifest = {"run_id": "0101-0000-abcd", "bucket": "bucket", "task_command": ["true"], "task_timeout": 30,
                "max_attempts": 3, "lease_seconds": 60, "idle_poweroff_seconds": 120,
                "topics": {"work_subscription": "projects/p/subscriptions/w", "work_topic": "projects/p/topics/w",
                           "events_topic": "projects/p/topics/e"}}
    work_dir.write_hook_settings({"manifest": manifest, "project": "p", "vm_name": "vm-7", "target": "local"})

    def no_request(*args, **kwargs):
        raise AssertionError("the hook made a request before its nack")

    monkeypatch.setattr(Metadata, "get", no_request)
    monkeypatch.setattr(RunStorage, "read_manifest", no_request)
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:9")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")

    context = entry._hook_context(work_dir.root, Metadata(), work_dir.read_hook_settings())

    assert context.vm_name == "vm-7"
    assert context.settings == WorkerSettings.from_manifest(manifest)
    assert context.storage.run_id == "0101-0000-abcd"


def test_missing_or_unreadable_hook_settings_leave_the_hook_to_ask_as_the_worker_does(work_dir):
    assert work_dir.read_hook_settings() is None
    work_dir.hook_settings.write_text('{"manifest": ')  # e.g. a full disk cut the worker's write short
    assert work_dir.read_hook_settings() is None
