"""Recording an ended task's result: outputs, log, marker, event, then the ack.

A done attempt: outputs, log, done marker (create-only, so a second finisher
is detected), done event, ack. A failed attempt is republished with its
attempt count raised, then recorded (an attempt marker, create-only), then
acked; the last one writes the failed marker instead. A VM that dies
anywhere before the ack loses nothing: the lease expires and Pub/Sub
redelivers, and the markers make the redelivery a duplicate.

A backup copy (``cflow.backups``) can only add a "done": its done marker and
event say it was the backup; a failed backup copy is acked and dropped
(no log, no attempt marker, no successor: the original owns the attempts).

The done and attempt markers carry the attempt's span (where and when it ran,
``cflow.history``) for the run's report; a duplicate, which writes no marker,
leaves a timeline record instead, after its ack.

In a run that combines, a CSV output's first line is kept apart from its
body: the body is uploaded (the same one upload per output as ever) and the
line rides in the done marker with each output's shape
(``cflow.combine.OutputShape``), so the bucket can join the bodies under one
header without the controller reading them.
"""

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from cflow import tasks
from cflow.combine import OutputShape, body_offset, is_csv_name, shape_output, shapes_to_json
from cflow.history import AttemptSpan
from cflow.lanes import with_preemptions
from cflow.protocol import EventKind, Outcome
from cflow.worker.context import WorkerContext
from cflow.worker.handback import hand_back_record, record_span
from cflow.worker.lease import LeaseKeeper
from cflow.worker.task import TaskEnding, failure_reason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EndedTask:
    """A task that has ended and whose result is still to be recorded (its item is in ``settling.json``)."""

    item: tasks.WorkItem
    attempt: int
    ack_id: str
    attempt_dir: Path
    exit_status: int
    ending: TaskEnding  # EXITED, TIMED_OUT or STAGING_FAILED
    elapsed: float
    keeper: LeaseKeeper  # keeps the lease until the result is recorded
    started: float | None = None  # epoch seconds the attempt began (None: not known, no span is recorded)
    backup: bool = False  # a backup copy (cflow.backups)
    preemptions: int = 0  # the item's preemptions so far, carried to a failed attempt's successor

    def span(self, vm: str, outcome: EventKind) -> AttemptSpan | None:
        """Where and when this attempt ran, ending as ``outcome``; None if its start is not known."""
        if self.started is None:
            return None
        return AttemptSpan(self.item.id, self.attempt, vm, self.started, self.started + self.elapsed, outcome)


def record_or_hand_back(context: WorkerContext, ended: EndedTask) -> Outcome:
    """Record the result; if that fails, hand the item back (``Outcome.HANDED_BACK``). Never raises ``Exception``."""
    try:
        return record_result(context, ended)
    except Exception:
        log.exception("recording the result of %s failed; handing it back", ended.item.id)
        with context.work_dir.handback_lock():
            record = context.work_dir.settling_record(ended.ack_id)
            handed_back = hand_back_record(context, record, settling=True) if record is not None else None
        # Also when it was already taken out of settling; a second nack is harmless.
        context.nack(ended.ack_id, ended.item.id)
        if handed_back is not None:
            # Its task ended when it ended, not now: the span stops there.
            record_span(context, ended.span(context.vm_name, handed_back.outcome))
        return Outcome.HANDED_BACK


def record_result(context: WorkerContext, ended: EndedTask) -> Outcome:
    """Record an ended task's result (uploads, marker, event, ack) and forget it locally.

    Returns:
        ``DONE``, ``DUPLICATE`` (another attempt was recorded done first),
        ``RETRY`` or ``FAILED``.
    Raises:
        Whatever the storage or Pub/Sub seam raises; the item is then still
        in settling.json (see ``record_or_hand_back``).
    """
    try:
        output_dir, log_file = ended.attempt_dir / "output", ended.attempt_dir / "task.log"
        if ended.exit_status == 0:
            outcome = _finish_done(context, ended, output_dir, log_file)
        else:
            outcome = _finish_failed(context, ended, log_file, ended.ending == TaskEnding.TIMED_OUT)
        with context.work_dir.handback_lock():
            if context.work_dir.settling_record(ended.ack_id) is not None:
                context.work_dir.clear_settling()
        shutil.rmtree(ended.attempt_dir, ignore_errors=True)
        return outcome
    finally:
        ended.keeper.stop()


def _finish_done(context: WorkerContext, ended: EndedTask, output_dir: Path, log_file: Path) -> Outcome:
    storage, item, attempt, ack_id, elapsed = context.storage, ended.item, ended.attempt, ended.ack_id, ended.elapsed
    if storage.is_done(item.id):
        # Another attempt finished first (a duplicate delivery ran in parallel): keep its outputs.
        context.publish_event(EventKind.DUPLICATE, item=item.id, attempt=attempt, seconds=elapsed, backup=ended.backup)
        context.ack(ack_id)
        record_span(context, ended.span(context.vm_name, EventKind.DUPLICATE))
        return Outcome.DUPLICATE
    shapes = _upload_outputs(context, item, output_dir, log_file)
    log_url = storage.upload_log(item.id, attempt, log_file)
    span = ended.span(context.vm_name, EventKind.DONE)
    first = storage.write_done_marker(
        item.id,
        {"item": item.id, "attempt": attempt, "vm": context.vm_name, "seconds": elapsed, "outputs": list(shapes),
         "output_shapes": shapes_to_json(shapes), "log": log_url, **({"backup": True} if ended.backup else {}),
         **(span.fields() if span else {})},
    )
    context.publish_event(EventKind.DONE if first else EventKind.DUPLICATE, item=item.id, attempt=attempt, seconds=elapsed,
                          backup=ended.backup)
    context.ack(ack_id)
    if not first:
        record_span(context, ended.span(context.vm_name, EventKind.DUPLICATE))
    return Outcome.DONE if first else Outcome.DUPLICATE


def _finish_failed(context: WorkerContext, ended: EndedTask, log_file: Path, timed_out: bool) -> Outcome:
    settings, storage, item, attempt, ack_id = context.settings, context.storage, ended.item, ended.attempt, ended.ack_id
    reason = failure_reason(TaskEnding.TIMED_OUT if timed_out else ended.ending, ended.exit_status)
    if ended.backup:
        # The original copy still runs and owns the item's attempts: the failed backup is only dropped.
        log.info("the backup copy of item %s failed (%s); the original runs on", item.id, reason)
        context.publish_event(EventKind.DUPLICATE, item=item.id, attempt=attempt, seconds=ended.elapsed, backup=True,
                              reason=f"backup copy failed ({reason})")
        context.ack(ack_id)
        record_span(context, ended.span(context.vm_name, EventKind.DUPLICATE))
        return Outcome.DUPLICATE
    log_url = storage.upload_log(item.id, attempt, log_file)
    last = attempt >= settings.max_attempts
    span = ended.span(context.vm_name, EventKind.FAILED if last else EventKind.RETRY)
    info = {"item": item.id, "attempt": attempt, "reason": reason, "log": log_url, "vm": context.vm_name,
            **(span.fields() if span else {})}
    if last:
        storage.write_failed_marker(item.id, {**info, "attempts": attempt})
        outcome = Outcome.FAILED
        context.publish_event(EventKind.FAILED, item=item.id, attempt=attempt, reason=reason, log_url=log_url)
    else:
        # Successor first, then the record that this attempt is settled: a
        # redelivered copy of this attempt that finds the record knows its
        # successor is queued; a crash in between at worst duplicates it.
        data, attributes = tasks.encode_message(item, attempt + 1)
        context.pubsub.publish(context.work_topic, data, with_preemptions(attributes, ended.preemptions) if ended.preemptions else attributes)
        outcome = Outcome.RETRY
        context.publish_event(EventKind.RETRY, item=item.id, attempt=attempt, reason=reason, log_url=log_url, seconds=ended.elapsed)
    storage.write_attempt_marker(item.id, attempt, info)
    context.ack(ack_id)
    return outcome


def _upload_outputs(context: WorkerContext, item: tasks.WorkItem, output_dir: Path, log_file: Path) -> dict[str, OutputShape]:
    """Upload the task's output files; returns ``{name: shape}`` in name order.

    A name that could escape the item's prefix is noted in the log instead.
    """
    keep_headers_apart = context.settings.combine == "concat"
    shapes: dict[str, OutputShape] = {}
    for path in sorted(output_dir.rglob("*")):
        if not path.is_file():
            continue
        name = path.relative_to(output_dir).as_posix()
        try:
            tasks.validate_output_name(name)
        except ValueError as error:
            # Only flat, plain names may leave the VM: nothing escapes the run's prefix.
            with open(log_file, "a") as stream:
                stream.write(f"cflow: output {name!r} not uploaded: {error}\n")
            continue
        shape = shape_output(path, keep_headers_apart and is_csv_name(name))
        if shape.header is None:
            context.storage.upload_output(item.id, name, path)
        else:
            context.storage.upload_output(item.id, name, path, offset=body_offset(shape))
        shapes[name] = shape
    return shapes
