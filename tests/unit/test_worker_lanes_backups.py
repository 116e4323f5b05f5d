"""The worker's side of lanes, backups and the cost cap: hand-back by republish, backup copies, stop and drain."""

import json
import sys
import threading
import time

import pytest

from cflow import tasks
from cflow.backups import backup_attributes
from cflow.gcp.pubsub import Received
from cflow.lanes import preemptions_of, with_preemptions
from cflow.protocol import DRAIN_ATTRIBUTE, STOP_ITEM_ATTRIBUTE, Lane
from cflow.worker import WorkDir, Worker, WorkerContext, hand_back
from cflow.worker.control import ControlWatch
from tests.fakes import FakeMetadata, FakePubSub, FakeStorage, received
from tests.unit.test_worker import make_settings, wait_until, write_task


@pytest.fixture
def work_dir(tmp_path):
    directory = WorkDir(tmp_path / "vm")
    directory.package.mkdir(parents=True)
    return directory


ITEM = tasks.WorkItem(id="000005", index=5, args=("a b",))


def received_with(item, attempt, ack_id="ack-1", preemptions=0, backup=False):
    data, attributes = tasks.encode_message(item, attempt)
    if preemptions:
        attributes = with_preemptions(attributes, preemptions)
    if backup:
        attributes = backup_attributes(attributes)
    return Received(ack_id=ack_id, data=data, attributes=attributes, delivery_attempt=1)


def inflight_record(work_dir, preemptions, backup=False):
    log_file = work_dir.root / "partial.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text("half way\n")
    record = {"item": ITEM.id, "attempt": 2, "ack_id": "ack-9", "log": str(log_file), "started": time.time() - 5}
    if backup:
        record["backup"] = True
    else:
        record.update(data=tasks.encode_message(ITEM, 2)[0].decode(), preemptions=preemptions)
    work_dir.write_inflight(record)


def hook_context(work_dir, pubsub, storage, threshold=3, lane=Lane.SPOT, metadata=None):
    settings = make_settings(("true",), preemptions_before_standard=threshold, standard_topic="standard-topic",
                             standard_subscription="standard-sub")
    return WorkerContext(settings, pubsub, storage, metadata or FakeMetadata(preempted=True), work_dir, "vm-1", lane=lane)


# -- a preemption is counted in the message ----------------------------------------------


def test_a_preempted_item_goes_back_with_its_count_raised_then_the_old_message_is_acked(work_dir):
    pubsub, storage = FakePubSub(), FakeStorage()
    inflight_record(work_dir, preemptions=1)

    assert hand_back(hook_context(work_dir, pubsub, storage)) == ITEM.id

    (topic, data, attributes), = pubsub.published
    assert topic == "work-topic" and tasks.decode_message(data, attributes) == (ITEM, 2) and preemptions_of(attributes) == 2
    assert pubsub.kinds().index("publish") < pubsub.kinds().index("ack")  # a crash between them duplicates, never loses
    assert ("nack", "ack-9") not in pubsub.calls
    event = pubsub.events[-1]
    assert (event["type"], event["preemptions"], event["lane"]) == ("preempted", 2, "spot")
    assert not any(name.startswith("lanes/") for name in storage.objects)
    assert b"half way" in storage.objects[f"logs/{ITEM.id}/attempt-2.log"]


def test_at_the_threshold_the_item_moves_to_the_standard_lane_after_its_marker(work_dir):
    pubsub, storage = FakePubSub(), FakeStorage()
    publish = pubsub.publish

    def noted_publish(topic, data, attributes):
        storage.calls.append(("publish", topic))
        return publish(topic, data, attributes)

    setattr(pubsub, "publish", noted_publish)  # noqa: B010 (a method of the fake, replaced for this test)
    inflight_record(work_dir, preemptions=2)

    hand_back(hook_context(work_dir, pubsub, storage, threshold=3))

    (topic, _data, attributes), = pubsub.published
    assert topic == "standard-topic" and preemptions_of(attributes) == 3
    assert json.loads(storage.objects[f"lanes/standard/{ITEM.id}"])["preemptions"] == 3
    # The marker first: the scheduler must never miss an item that waits in the standard lane.
    assert storage.calls.index(("lane-marker", "standard", ITEM.id)) < storage.calls.index(("publish", "standard-topic"))
    assert pubsub.events[-1]["lane"] == "standard"


def test_without_the_setting_or_when_the_republish_fails_the_item_is_nacked_as_before(work_dir):
    pubsub, storage = FakePubSub(), FakeStorage()
    inflight_record(work_dir, preemptions=5)
    hand_back(hook_context(work_dir, pubsub, storage, threshold=None))
    assert ("nack", "ack-9") in pubsub.calls and pubsub.published == []

    work_dir.clear_stop()
    pubsub = FakePubSub()

    def refuse(topic, data, attributes):
        raise RuntimeError("Pub/Sub unreachable")

    setattr(pubsub, "publish", refuse)  # noqa: B010 (a method of the fake, replaced for this test)
    inflight_record(work_dir, preemptions=0)
    hand_back(hook_context(work_dir, pubsub, storage))
    assert ("nack", "ack-9") in pubsub.calls and "preemptions" not in pubsub.events[-1]


class AskedMetadata(FakeMetadata):
    """Notes each preempted question in the Pub/Sub fake's journal, so its order against the hand-back shows."""

    def __init__(self, journal, preempted=True):
        super().__init__(preempted)
        self.journal = journal

    def preempted(self):
        self.journal.append(("metadata", "preempted"))
        return super().preempted()


@pytest.mark.parametrize("threshold, lane", [(None, Lane.SPOT), (3, Lane.STANDARD)])
def test_where_no_republish_can_follow_the_hook_nacks_before_asking_the_metadata_server(work_dir, threshold, lane):
    pubsub, storage = FakePubSub(), FakeStorage()
    inflight_record(work_dir, preemptions=1)
    context = hook_context(work_dir, pubsub, storage, threshold=threshold, lane=lane, metadata=AskedMetadata(pubsub.calls))

    hand_back(context)

    assert pubsub.calls[0] == ("nack", "ack-9") and ("metadata", "preempted") in pubsub.calls


@pytest.mark.parametrize("preempted, first_to_pubsub", [(True, "publish"), (False, "nack")])
def test_a_spot_lane_hook_asks_whether_preempted_first_since_the_answer_decides_the_hand_back(work_dir, preempted, first_to_pubsub):
    pubsub, storage = FakePubSub(), FakeStorage()
    inflight_record(work_dir, preemptions=1)
    context = hook_context(work_dir, pubsub, storage, metadata=AskedMetadata(pubsub.calls, preempted=preempted))

    hand_back(context)

    assert pubsub.calls[0] == ("metadata", "preempted")
    assert pubsub.calls[1][0] == first_to_pubsub
    assert (pubsub.published != []) is preempted


def test_the_hook_keeps_the_workers_lane_from_the_settings_on_disk(work_dir, monkeypatch):
    from cflow.gcp.metadata import Metadata
    from cflow.worker import entry

    manifest = {"run_id": "0101-0000-abcd", "bucket": "bucket", "task_command": ["true"], "task_timeout": 30,
                "max_attempts": 3, "lease_seconds": 60, "idle_poweroff_seconds": 120,
                "topics": {"work_subscription": "projects/p/subscriptions/w", "work_topic": "projects/p/topics/w",
                           "events_topic": "projects/p/topics/e"}}
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:9")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    kept = {"manifest": manifest, "project": "p", "vm_name": "vm-7", "target": "local"}
    work_dir.write_hook_settings({**kept, "lane": "standard"})
    assert entry._hook_context(work_dir.root, Metadata(), work_dir.read_hook_settings()).lane == Lane.STANDARD
    work_dir.write_hook_settings(kept)  # written by a worker from before the lanes
    assert entry._hook_context(work_dir.root, Metadata(), work_dir.read_hook_settings()).lane == Lane.SPOT


def test_a_preempted_backup_copy_is_dropped_without_its_log(work_dir):
    pubsub, storage = FakePubSub(), FakeStorage()
    inflight_record(work_dir, preemptions=0, backup=True)

    hand_back(hook_context(work_dir, pubsub, storage))

    assert ("ack", ("ack-9",)) in pubsub.calls and ("nack", "ack-9") not in pubsub.calls and pubsub.published == []
    assert (pubsub.events[-1]["type"], pubsub.events[-1]["backup"]) == ("duplicate", True)
    assert not any(name.startswith("logs/") for name in storage.objects)  # the original's log is left alone


# -- a worker's lane -------------------------------------------------------------------


def test_a_standard_worker_pulls_its_lane_and_a_failed_attempt_stays_there_with_its_count(work_dir):
    command = write_task(work_dir, "import sys; sys.exit(3)")
    pubsub, storage = FakePubSub(), FakeStorage()
    settings = make_settings(command, standard_topic="standard-topic", standard_subscription="standard-sub", idle_poweroff_seconds=0.0)
    worker = Worker(settings, pubsub, storage, FakeMetadata(), work_dir, "vm-1", lane=Lane.STANDARD)
    pubsub.queue.append(received_with(ITEM, 1, preemptions=3))

    assert worker.run(pull_timeout=0.01) == "idle"

    assert ("pull", "standard-sub") in pubsub.calls and ("pull", "work-sub") not in pubsub.calls
    (topic, data, attributes), = pubsub.published
    assert topic == "standard-topic" and tasks.decode_message(data, attributes) == (ITEM, 2) and preemptions_of(attributes) == 3


# -- backup copies ----------------------------------------------------------------------


def test_a_backup_copy_that_wins_records_the_item_done_as_the_backup(work_dir):
    command = write_task(work_dir, "import os; open(os.path.join(os.environ['CFLOW_OUTPUT_DIR'], 'r.txt'), 'w').write('x')")
    pubsub, storage = FakePubSub(), FakeStorage()
    worker = Worker(make_settings(command), pubsub, storage, FakeMetadata(), work_dir, "vm-1")

    assert worker.process(received_with(ITEM, 2, backup=True)) == "done"

    marker = json.loads(storage.objects[f"done/{ITEM.id}"])
    assert marker["backup"] is True and marker["attempt"] == 2 and marker["outputs"] == ["r.txt"]
    assert [(e["type"], e.get("backup")) for e in pubsub.events] == [("started", True), ("done", True)]


def test_a_failed_backup_copy_is_only_dropped(work_dir):
    command = write_task(work_dir, "import sys; print('bad luck'); sys.exit(4)")
    pubsub, storage = FakePubSub(), FakeStorage()
    worker = Worker(make_settings(command), pubsub, storage, FakeMetadata(), work_dir, "vm-1")

    assert worker.process(received_with(ITEM, 2, backup=True)) == "duplicate"

    assert pubsub.published == []  # no successor: the original owns the attempts
    assert [name for name in storage.objects if not name.startswith("timeline/")] == []  # no log, no attempt marker
    assert pubsub.kinds()[-1] == "ack"
    assert pubsub.events[-1]["reason"] == "backup copy failed (exit status 4)"


def test_a_backup_copy_of_an_item_already_done_is_acked_without_running(work_dir, tmp_path):
    sentinel = tmp_path / "ran"
    command = write_task(work_dir, f"open({str(sentinel)!r}, 'w').write('x')")
    pubsub, storage = FakePubSub(), FakeStorage()
    storage.objects[f"done/{ITEM.id}"] = b"{}"
    worker = Worker(make_settings(command), pubsub, storage, FakeMetadata(), work_dir, "vm-1")

    assert worker.process(received_with(ITEM, 2, backup=True)) == "duplicate"
    assert not sentinel.exists()


# -- the scheduler's word: stop a copy, drain ----------------------------------------------

SLEEPER = "import sys, time; print('started', flush=True); open(sys.argv[1], 'w').write('x'); time.sleep(600)"


def test_a_copy_whose_item_is_done_elsewhere_is_stopped_at_once_and_acked_without_a_result(work_dir, tmp_path):
    started = tmp_path / "started"
    command = write_task(work_dir, SLEEPER)
    pubsub, storage, metadata = FakePubSub(), FakeStorage(), FakeMetadata()
    control = ControlWatch(metadata)
    worker = Worker(make_settings(command), pubsub, storage, metadata, work_dir, "vm-1", control=control)
    item = tasks.WorkItem(id="000006", index=6, args=(str(started),))
    outcome: dict[str, object] = {}
    thread = threading.Thread(target=lambda: outcome.update(value=worker.process(received(item, 1, ack_id="ack-6"))))
    thread.start()
    wait_until(started.exists, what="the task to start")

    storage.objects["done/000006"] = b"{}"  # the other copy won
    began = time.monotonic()
    control.apply({STOP_ITEM_ATTRIBUTE: "000006"})
    thread.join(timeout=15)

    assert outcome["value"] == "duplicate" and time.monotonic() - began < 2.0
    assert ("ack", ("ack-6",)) in pubsub.calls and ("nack", "ack-6") not in pubsub.calls
    assert pubsub.events[-1]["type"] == "duplicate" and pubsub.events[-1]["reason"] == "stopped: done by another copy"
    assert "logs/000006/attempt-1.log" not in storage.objects  # the winner's log stays the item's
    assert not work_dir.inflight.exists()


def test_a_stop_for_an_item_that_is_not_done_hands_it_back(work_dir, tmp_path):
    started = tmp_path / "started"
    command = write_task(work_dir, SLEEPER)
    pubsub, storage, metadata = FakePubSub(), FakeStorage(), FakeMetadata()
    control = ControlWatch(metadata)
    worker = Worker(make_settings(command), pubsub, storage, metadata, work_dir, "vm-1", control=control)
    outcome: dict[str, object] = {}
    item = tasks.WorkItem(id="000007", index=7, args=(str(started),))
    thread = threading.Thread(target=lambda: outcome.update(value=worker.process(received(item, 1, ack_id="ack-7"))))
    thread.start()
    wait_until(started.exists, what="the task to start")
    control.apply({STOP_ITEM_ATTRIBUTE: "000007"})
    thread.join(timeout=15)

    assert outcome["value"] == "interrupted" and ("nack", "ack-7") in pubsub.calls


def test_a_stop_for_another_item_leaves_the_running_one_alone():
    control = ControlWatch(FakeMetadata())
    control.apply({STOP_ITEM_ATTRIBUTE: "000001", "startup-script": "#!/bin/bash"})
    assert control.should_stop("000001") and not control.should_stop("000002") and not control.draining
    control.apply({})
    assert not control.should_stop("000001")


def test_a_draining_worker_takes_no_new_item(work_dir):
    pubsub, storage, metadata = FakePubSub(), FakeStorage(), FakeMetadata()
    control = ControlWatch(metadata)
    control.apply({DRAIN_ATTRIBUTE: "true"})
    worker = Worker(make_settings((sys.executable, "-c", "pass"), idle_poweroff_seconds=0.0), pubsub, storage, metadata, work_dir, "vm-1",
                    control=control, sleep=lambda seconds: None)
    pubsub.queue.append(received(ITEM, 1))

    assert worker.run(pull_timeout=0.01) == "idle"
    assert "pull" not in pubsub.kinds() and len(pubsub.queue) == 1
    assert [e["type"] for e in pubsub.events] == ["idle"]


def test_the_watch_hears_the_metadata_server_in_its_thread():
    metadata = FakeMetadata()
    metadata.set_attributes(**{DRAIN_ATTRIBUTE: "true"})
    control = ControlWatch(metadata)
    control.start()
    try:
        wait_until(lambda: control.draining, what="the watch to hear the drain")
    finally:
        control.stop()
