"""Handing an item back: nack it, or republish it with its preemption count raised; tell the scheduler; save its partial log.

Used by the shutdown hook (``hand_back``, on preemption, stop or delete), by
a worker that sees the stop flag or fails on an item, and by a worker
restarted after its predecessor died (``hand_back_inflight``). Every hand
back happens under the work directory's hand-back lock, so an item is either
recorded by the worker or handed back by exactly one side (see
``cflow.worker.workdir``).

A preempted item is handed back by republishing it with its preemption count
raised (to the standard lane once the count reaches
SPOT_PREEMPTIONS_BEFORE_STANDARD, after its lane marker), then acking the old
message: the count travels with the item (``cflow.lanes``). Without that
setting, or if the republish fails, it is nacked as before (the message
keeps its attempt count either way). A backup copy (``cflow.backups``) is
never handed back: the original still runs, so the copy is acked and dropped.

A handed-back attempt leaves no marker, so its span (where and when it ran,
and that it was preempted or interrupted) goes into a timeline record for the
run's report, written with its partial log after the lock is released
(``record_span``).
"""

import json
import logging
import time
from pathlib import Path

from cflow import tasks
from cflow.history import AttemptSpan
from cflow.lanes import lane_after_preemption, with_preemptions
from cflow.protocol import EventKind, Lane
from cflow.worker.context import WorkerContext
from cflow.worker.task import kill_recorded_task
from cflow.worker.workdir import TaskRecord

log = logging.getLogger(__name__)

# The hook waits this long for a worker that is recording a result; GCE gives
# a Spot VM's shutdown script 30 s in all.
HOOK_SETTLE_WAIT_SECONDS = 25.0


def hand_back_record(context: WorkerContext, record: TaskRecord, settling: bool = False) -> AttemptSpan | None:
    """Hand the record's message back (see the module docstring), tell the scheduler, and forget the record. Call with the lock held.

    The hand-back is the first request made: the metadata server is asked
    whether the VM is preempted before it only when the answer decides how
    the item goes back (a Spot-lane item that may be republished with its
    count raised); otherwise after (for the event).

    Args:
        settling: the record is the one in ``settling.json`` (else ``inflight.json``).
    Returns:
        The attempt's span until now, ending as preempted or interrupted (a
        dropped backup copy: duplicate), for ``record_span`` once the lock is
        released; None if the record does not say when it started.
    """
    if record.get("backup"):
        context.ack(record["ack_id"])
        kind = EventKind.DUPLICATE
        context.publish_event(kind, item=record["item"], attempt=record["attempt"], backup=True,
                              reason="backup copy dropped: " + ("preempted" if context.metadata.preempted() else "shut down"))
    elif _may_republish(context, record) and context.metadata.preempted() and (moved := _republish_preempted(context, record)) is not None:
        context.ack(record["ack_id"])
        kind = EventKind.PREEMPTED
        preemptions, lane = moved
        context.publish_event(kind, item=record["item"], attempt=record["attempt"], preemptions=preemptions, lane=lane)
    else:
        context.nack(record["ack_id"], record["item"])
        kind = EventKind.PREEMPTED if context.metadata.preempted() else EventKind.INTERRUPTED
        context.publish_event(kind, item=record["item"], attempt=record["attempt"])
    if settling:
        context.work_dir.clear_settling()
    else:
        context.work_dir.clear_inflight()
    started = record.get("started")
    if not isinstance(started, int | float):
        return None
    return AttemptSpan(record["item"], record["attempt"], context.vm_name, float(started), time.time(), kind)


def _may_republish(context: WorkerContext, record: TaskRecord) -> bool:
    """Whether a preemption would hand this record back by a republish: lanes on, a Spot-lane worker, the message kept."""
    return context.settings.preemptions_before_standard is not None and context.lane == Lane.SPOT and record.get("data") is not None


def _republish_preempted(context: WorkerContext, record: TaskRecord) -> tuple[int, Lane] | None:
    """Publish a preempted item again with its preemption count raised, to the lane that count sends it to.

    The standard lane's marker is written first: what the scheduler counts
    must never miss an item that is there. Returns ``(preemptions, lane)``,
    or None when it was not republished (a failure: the caller nacks it
    instead). Call only when ``_may_republish``.
    """
    threshold = context.settings.preemptions_before_standard
    data = record.get("data")
    if threshold is None or data is None:
        return None
    preemptions = record.get("preemptions", 0) + 1
    lane = lane_after_preemption(preemptions, threshold)
    try:
        item = tasks.WorkItem.from_dict(json.loads(data))
        message, attributes = tasks.encode_message(item, record["attempt"])
        if lane == Lane.STANDARD:
            context.storage.write_lane_marker(lane.value, item.id, {"item": item.id, "preemptions": preemptions, "vm": context.vm_name,
                                                                   "time": time.time()})
        context.pubsub.publish(context.settings.lane_topic(lane), message, with_preemptions(attributes, preemptions))
    except Exception as error:
        log.warning("could not publish item %s again with its preemption counted (%s); handing it back as it was", record["item"], error)
        return None
    if lane == Lane.STANDARD:
        log.info("item %s was preempted %d times: it moves to a standard VM", record["item"], preemptions)
    return preemptions, lane


def record_span(context: WorkerContext, span: AttemptSpan | None) -> None:
    """Write the timeline record of an attempt that leaves no marker (handed back, or a duplicate).

    Never raises: the span is for the report, and losing one must not lose work.
    """
    if span is None:
        return
    try:
        context.storage.write_timeline_record(span)
    except Exception as error:
        log.warning("could not record where item %s attempt %s ran (%s); the run's report will miss it", span.item, span.attempt, error)


def upload_partial_log(context: WorkerContext, item_id: str, attempt: int, log_file: Path, reason: str,
                       span: AttemptSpan | None = None) -> None:
    """Record the handed-back attempt's ``span``, note in its log why it ends here, and upload the log.

    An item another copy recorded done keeps that copy's log (``cflow.backups``).
    A failure is logged: the item is handed back already.
    """
    record_span(context, span)
    try:
        with open(log_file, "a") as stream:
            stream.write(f"\ncflow: {reason}; item handed back\n")
        if context.storage.is_done(item_id):
            return
        context.storage.upload_log(item_id, attempt, log_file)
    except Exception as error:
        log.warning("could not upload the partial log of %s: %s", item_id, error)


def hand_back_inflight(context: WorkerContext, reason: str | None, settle_wait_seconds: float = 0.0, take_settling: bool = False,
                       kill_task: bool = True, upload_log: bool = True) -> str | None:
    """Hand the running item back at once: nack (it keeps its attempt count), event, partial log.

    An item whose task has ended and whose result the worker is recording
    (``settling.json``) is left to it: we wait up to ``settle_wait_seconds``
    (on ``context.clock``) for it to be recorded, then leave it to the lease.

    Args:
        reason: a few words for the partial log ("worker died"); None: "preempted" or "shut down",
            asked of the metadata server after the nack.
        take_settling: hand back the item being recorded too (its recorder
            is dead).
        kill_task: SIGTERM the recorded task group (verified to be ours).
        upload_log: append a note to the partial log and upload it.
    Returns:
        The item id handed back (the running one if both were), or None.
    """
    work_dir = context.work_dir
    handed_back: list[tuple[TaskRecord, AttemptSpan | None]] = []
    deadline = context.clock() + settle_wait_seconds
    while True:
        with work_dir.handback_lock():
            running = work_dir.read_inflight()
            if running is not None:
                handed_back.append((running, hand_back_record(context, running)))
            settling = work_dir.read_settling()
            if settling is not None and take_settling:
                handed_back.append((settling, hand_back_record(context, settling, settling=True)))
                settling = None
        if settling is None:
            break
        if context.clock() >= deadline:
            log.info("item %s is being recorded by the worker; leaving it to finish (or to its lease)", settling["item"])
            break
        context.sleep(0.2)
    for record, span in handed_back:
        if kill_task:
            kill_recorded_task(record)
        log_file = Path(record["log"])
        # A backup copy's log would replace the log of the attempt it backs up, which still runs.
        if upload_log and log_file.exists() and not record.get("backup"):
            reason = reason or ("preempted" if context.metadata.preempted() else "shut down")
            upload_partial_log(context, record["item"], record["attempt"], log_file, reason, span=span)
        else:
            record_span(context, span)
    return handed_back[0][0]["item"] if handed_back else None


def hand_back(context: WorkerContext, settle_wait_seconds: float = HOOK_SETTLE_WAIT_SECONDS) -> str | None:
    """The shutdown hook: stop the worker taking work, hand the in-flight item back, save its partial log.

    Called on preemption, stop or delete, within GCE's 30 s Spot grace. The
    hand-back is the first request it makes to Pub/Sub or Cloud Storage: a
    nack, with whether the VM is preempted asked after; on a Spot-lane worker
    with SPOT_PREEMPTIONS_BEFORE_STANDARD set, the metadata server is asked
    first (2 s at most), since a preemption is handed back by a republish
    that counts it. Either way the item keeps its attempt count: a
    preemption never uses up an attempt. Returns the item id handed back, or None.
    """
    context.work_dir.request_stop()
    return hand_back_inflight(context, None, settle_wait_seconds=settle_wait_seconds)
