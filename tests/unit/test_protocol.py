"""The worker <-> scheduler protocol: the strings on the wire, and an event the scheduler must show the user."""

import json
import logging

from cflow import tasks
from cflow.gcp.pubsub import Received
from cflow.protocol import EventKind, LoopEnd, Outcome
from cflow.worker import WorkDir
from tests.unit.test_scheduler import make_scheduler
from tests.unit.test_worker import make_worker


def test_the_wire_strings_stay_as_they_are():
    # Workers and schedulers of different versions meet on the events topic: renaming a kind breaks the run.
    assert {kind.value for kind in EventKind} == {
        "started", "done", "retry", "failed", "duplicate", "preempted", "interrupted", "idle", "malformed"}
    assert {outcome.value for outcome in Outcome} == {
        "done", "duplicate", "retry", "failed", "interrupted", "stopping", "malformed", "handed back"}
    assert {end.value for end in LoopEnd} == {"idle", "stopping"}
    assert json.dumps({"type": EventKind.DONE}) == '{"type": "done"}'


def test_a_dropped_malformed_work_message_is_shown_by_the_scheduler(tmp_path, caplog):
    work_dir = WorkDir(tmp_path / "vm")
    worker, worker_pubsub, _storage = make_worker(work_dir, ["true"])
    forged = json.dumps({"id": "../../etc", "index": 0, "args": []}).encode()
    assert worker.process(Received("ack-x", forged, {tasks.ATTR_ITEM: "../../etc", tasks.ATTR_ATTEMPT: "1"}, 1)) == "malformed"

    scheduler, _compute, scheduler_pubsub, _run_storage, _clock = make_scheduler()
    scheduler_pubsub.pending_events += worker_pubsub.events
    with caplog.at_level(logging.WARNING, logger="cflow.scheduler"):
        scheduler.step()

    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("vm-1" in message and "not CFlow's" in message and "item id" in message for message in warnings), warnings
