"""The run's history for its report: attempt spans the worker records, and the VM history the scheduler keeps."""

import json
import sys
import time
import types

import pytest

from cflow import tasks
from cflow.gcp.pubsub import RunTopics
from cflow.history import AttemptSpan, VmHistory, VmRecord, span_metadata, vm_records_from_document
from cflow.protocol import EventKind
from cflow.scheduler import VM_HISTORY_WRITE_SECONDS, Scheduler
from cflow.worker import WorkDir, Worker, WorkerContext, WorkerSettings, hand_back
from tests.fakes import FakeCompute, FakeMetadata, FakePubSub, FakeRunStorage, FakeSchedulerPubSub, FakeStorage, received

RUN = "0101-0000-abcd"


# ---------------------------------------------------------------- spans


def test_a_span_goes_into_metadata_and_comes_back():
    span = AttemptSpan("000042", 2, "vm-7", 1700000000.125, 1700000003.5, EventKind.PREEMPTED)

    metadata = span.to_metadata()

    assert all(isinstance(value, str) for value in metadata.values())
    assert AttemptSpan.from_metadata("000042", metadata) == span
    assert span_metadata({"item": "000042", **span.fields(), "log": "gs://x"}) == metadata


@pytest.mark.parametrize("metadata", [
    None, {}, {"attempt": "1", "vm": "v", "started": "1", "ended": "2"},  # no outcome: an older marker
    {"attempt": "x", "vm": "v", "started": "1", "ended": "2", "outcome": "done"},
    {"attempt": "1", "vm": "v", "started": "nan", "ended": "2", "outcome": "done"},
    {"attempt": "1", "vm": "v", "started": "1", "ended": "2", "outcome": "idle"},  # not an end of an item
])
def test_a_missing_or_bad_span_is_none(metadata):
    assert AttemptSpan.from_metadata("000001", metadata) is None


# ---------------------------------------------------------------- the worker records spans


def make_worker(tmp_path, body, metadata=None, **changes):
    work_dir = WorkDir(tmp_path / "vm")
    work_dir.package.mkdir(parents=True)
    script = work_dir.package / "task.py"
    script.write_text(body)
    settings = WorkerSettings(run_id=RUN, bucket="bucket", work_subscription="work-sub", work_topic="work-topic",
                              events_topic="events-topic", task_command=(sys.executable, str(script)), task_timeout=30.0,
                              max_attempts=changes.get("max_attempts", 3), lease_seconds=60, idle_poweroff_seconds=0.0)
    pubsub, storage = FakePubSub(), FakeStorage()
    return Worker(settings, pubsub, storage, metadata or FakeMetadata(), work_dir, "vm-1"), pubsub, storage, work_dir


def test_done_marker_carries_where_and_when_the_attempt_ran(tmp_path):
    worker, _, storage, _ = make_worker(tmp_path, "import time; time.sleep(0.2)")
    before = time.time()

    assert worker.process(received(tasks.WorkItem("000007", 7, ("a",)), 1)) == "done"

    marker = json.loads(storage.objects["done/000007"])
    span = AttemptSpan.from_fields("000007", marker)
    assert span is not None and span.outcome == EventKind.DONE and span.vm == "vm-1" and span.attempt == 1
    assert before - 0.001 <= span.started < span.ended <= time.time() + 0.001  # kept to the millisecond
    assert span.seconds == pytest.approx(marker["seconds"], abs=0.01)
    assert 0.2 <= span.seconds < 5


def test_failed_attempts_carry_retry_then_failed(tmp_path):
    worker, _, storage, _ = make_worker(tmp_path, "import sys; sys.exit(3)", max_attempts=2)
    item = tasks.WorkItem("000001", 1, ())

    assert worker.process(received(item, 1)) == "retry"
    assert worker.process(received(item, 2, ack_id="ack-2")) == "failed"

    outcomes = [json.loads(storage.objects[f"attempts/000001/{n}"])["outcome"] for n in (1, 2)]
    assert outcomes == ["retry", "failed"]


def test_a_preempted_attempt_leaves_a_timeline_record_from_its_start_to_the_hand_back(tmp_path):
    work_dir = WorkDir(tmp_path / "vm")
    log_file = work_dir.root / "partial.log"
    work_dir.root.mkdir(parents=True)
    log_file.write_text("half way\n")
    started = time.time() - 30
    work_dir.write_inflight({"item": "000010", "attempt": 2, "ack_id": "ack-77", "log": str(log_file), "started": started})
    storage = FakeStorage()
    settings = WorkerSettings(RUN, "bucket", "work-sub", "work-topic", "events-topic", ("true",), 30.0, 3, 60, 0.0)
    context = WorkerContext(settings, FakePubSub(), storage, FakeMetadata(preempted=True), work_dir, "vm-1")

    assert hand_back(context) == "000010"

    (name,) = [key for key in storage.objects if key.startswith("timeline/")]
    assert name.startswith("timeline/000010/2-vm-1-")
    span = AttemptSpan.from_fields("000010", json.loads(storage.objects[name]))
    assert span is not None
    assert span.outcome == EventKind.PREEMPTED and span.started == pytest.approx(started, abs=0.001)
    assert time.time() - 5 < span.ended <= time.time() + 0.001  # kept to the millisecond
    # The span is written after the nack, not in the way of it.
    kinds = [call[0] for call in storage.calls]
    assert kinds.index("timeline") < kinds.index("log")


class DoneMeanwhileStorage(FakeStorage):
    """Another copy of the item is recorded done while this one runs."""

    def is_done(self, item_id):
        done = any(call[0] == "is_done" for call in self.calls)
        self.calls.append(("is_done", item_id))
        return done


def test_a_copy_that_ran_while_another_was_recorded_done_leaves_a_timeline_record(tmp_path):
    worker, _, _, _ = make_worker(tmp_path, "pass")
    storage = DoneMeanwhileStorage()
    worker = Worker(worker.context.settings, worker.context.pubsub, storage, FakeMetadata(), worker.context.work_dir, "vm-1")

    assert worker.process(received(tasks.WorkItem("000003", 3, ()), 1)) == "duplicate"

    timeline = [json.loads(value) for key, value in storage.objects.items() if key.startswith("timeline/000003/1-vm-1-")]
    assert [record["outcome"] for record in timeline] == ["duplicate"]
    assert "done/000003" not in storage.objects


# ---------------------------------------------------------------- the scheduler keeps the VM history


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def make_scheduler(workers=2, spot=True):
    config = types.SimpleNamespace(worker_node_cnt=workers, zones=("us-central1-a",), vm_name_prefix="w", lease_seconds=30)
    items = tasks.make_items([[f"in-{i}"] for i in range(10)])
    compute, pubsub, storage = FakeCompute(), FakeSchedulerPubSub(), FakeRunStorage()
    clock, wall = Clock(), Clock(1_700_000_000.0)
    properties = {"machineType": "e2-small", "scheduling": {"provisioningModel": "SPOT" if spot else "STANDARD"}}
    scheduler = Scheduler(config, RUN, items, compute, pubsub, storage, RunTopics.for_run("p", RUN, "t", "s"),  # type: ignore[arg-type]
                          properties, clock=clock, wall_clock=wall)
    return scheduler, compute, pubsub, storage, clock, wall


def records(storage):
    return {record.name: record for record in vm_records_from_document(storage.vm_history)}


def test_vm_history_records_creation_running_preemption_and_gone():
    scheduler, compute, pubsub, storage, clock, wall = make_scheduler()
    scheduler.step()
    first = records(storage)
    assert sorted(first) == [f"w-{RUN}-0001", f"w-{RUN}-0002"]
    assert all(r.machine_type == "e2-small" and r.spot and r.created == wall.now and r.running is None for r in first.values())

    clock.now += 2
    wall.now += 2
    scheduler.step()  # now listed RUNNING (written at most every VM_HISTORY_WRITE_SECONDS)
    assert records(storage)[f"w-{RUN}-0001"].running is None

    clock.now += VM_HISTORY_WRITE_SECONDS
    wall.now += VM_HISTORY_WRITE_SECONDS
    pubsub.pending_events.append({"type": "preempted", "vm": f"w-{RUN}-0001", "item": "000003", "time": wall.now - 1})
    del compute.vms[f"w-{RUN}-0001"]  # a preempted Spot VM deletes itself
    scheduler.step()
    history = records(storage)
    assert history[f"w-{RUN}-0001"].running == 1_700_000_002.0
    assert history[f"w-{RUN}-0001"].preempted == wall.now - 1
    assert history[f"w-{RUN}-0001"].gone == wall.now
    assert history[f"w-{RUN}-0003"].created == wall.now  # its replacement
    assert history[f"w-{RUN}-0002"].gone is None


def test_vm_history_is_written_now_and_then_not_every_step():
    scheduler, _, _, storage, clock, _ = make_scheduler()
    for _ in range(10):
        scheduler.step()
        clock.now += 2
    assert storage.vm_history_writes == 1
    clock.now += VM_HISTORY_WRITE_SECONDS
    scheduler.step()
    assert storage.vm_history_writes == 2


def test_at_the_end_every_vm_is_gone_and_a_resumed_scheduler_carries_the_history_on():
    scheduler, _, _, storage, _, wall = make_scheduler(spot=False)
    scheduler.step()
    wall.now += 50
    scheduler.write_vm_history(fleet_gone=True)
    assert {r.gone for r in records(storage).values()} == {wall.now}
    assert not any(r.spot for r in records(storage).values())

    resumed, *_ = make_scheduler()
    resumed.storage = storage
    resumed.restore_vm_history()
    assert set(resumed.vm_history.records) == set(records(storage))


def test_vms_that_never_came_are_dropped_and_unknown_ones_are_added():
    history = VmHistory()
    history.asked_for(["a", "b"], "z", {"machineType": "zones/z/machineTypes/n2-standard-2"}, 10.0)
    history.listed([("a", "z", "PROVISIONING", False), ("x", "z", "RUNNING", False)], 11.0, {"PROVISIONING", "RUNNING"}, "e2-small", True)
    history.never_created(["a", "b"])

    assert set(history.records) == {"a", "x"}  # a was listed: it exists
    assert history.records["a"].machine_type == "n2-standard-2"
    assert history.records["x"] == VmRecord("x", "z", "e2-small", True, first_seen=11.0, running=11.0)
    document = history.to_document()
    assert [record.name for record in vm_records_from_document(document)] == ["a", "x"]
    assert vm_records_from_document({"vms": [{"zone": "no name"}]}) == []


def test_a_vm_preempted_between_two_listings_is_known_from_its_events_and_gone_at_the_next_listing():
    scheduler, compute, pubsub, storage, clock, wall = make_scheduler()
    scheduler.step()
    name = f"w-{RUN}-0001"
    del compute.vms[name]  # came up, ran, was preempted and deleted itself between two listings
    pubsub.pending_events += [{"type": "started", "vm": name, "item": "000000", "attempt": 1, "time": wall.now + 1},
                              {"type": "preempted", "vm": name, "item": "000000", "attempt": 1, "time": wall.now + 3}]
    clock.now += VM_HISTORY_WRITE_SECONDS
    wall.now += VM_HISTORY_WRITE_SECONDS
    scheduler.step()

    record = records(storage)[name]
    assert (record.first_seen, record.running) == (1_700_000_001.0, 1_700_000_001.0)
    assert record.preempted == 1_700_000_003.0
    assert record.gone == wall.now
