"""The worker loop: pull one item at a time, run its task, record its result while the next one runs.

``Worker.run`` is the loop startup-signal.py runs on a VM (through
``cflow.worker.entry.main``); ``Worker.process`` runs one pulled message in
the caller's thread. While a task runs, a ``LeaseKeeper`` extends the item's
lease and uploads its log; once it ends, its result is recorded
(``cflow.worker.record``) in a background thread while the loop pulls and
starts the next item. A redelivered item that is already done, or an attempt
whose failure is already recorded, is acked without running again.

The scheduler's word arrives through a ``ControlWatch`` (``cflow.worker.control``):
a copy of an item recorded done elsewhere is stopped and acked without a
result; a draining worker takes no new item. Both are read in memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cflow import tasks
from cflow.backups import is_backup
from cflow.history import AttemptSpan
from cflow.lanes import preemptions_of
from cflow.protocol import EventKind, Lane, LoopEnd, Outcome
from cflow.worker.context import WorkerContext, WorkerMetadata, WorkerPubSub, WorkerSettings, WorkerStorage
from cflow.worker.control import ControlWatch
from cflow.worker.handback import hand_back_inflight, hand_back_record, record_span, upload_partial_log
from cflow.worker.lease import LeaseKeeper
from cflow.worker.record import EndedTask, record_or_hand_back
from cflow.worker.task import TaskEnding, run_task
from cflow.worker.workdir import TaskRecord, WorkDir

if TYPE_CHECKING:
    from cflow.gcp.pubsub import Received

log = logging.getLogger(__name__)

PULL_ERROR_BACKOFF_MAX_SECONDS = 10.0


class Worker:
    """Pulls and runs work items until the queue stays empty.

    Args:
        settings: ``WorkerSettings`` of the run.
        pubsub: ``cflow.gcp.pubsub.PubSub``.
        storage: ``cflow.gcp.storage.RunStorage`` of the run.
        metadata: ``cflow.gcp.metadata.Metadata`` (for the preempted flag).
        work_dir: ``WorkDir``.
        vm_name: this VM's name, recorded in events and markers.
        clock: monotonic seconds (tests pass their own).
        sleep: how to wait between failed pulls (tests pass their own).
        lane: the queue this VM pulls (``cflow.lanes``).
        control: the scheduler's word (stop a copy, drain); None: it is never heard.
    """

    def __init__(self, settings: WorkerSettings, pubsub: WorkerPubSub, storage: WorkerStorage, metadata: WorkerMetadata,
                 work_dir: WorkDir, vm_name: str, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, lane: Lane = Lane.SPOT, control: ControlWatch | None = None) -> None:
        self.context = WorkerContext(settings, pubsub, storage, metadata, work_dir, vm_name, clock=clock, sleep=sleep, lane=lane)
        self.control = control
        # The result being recorded in the background while the next task runs (see run()).
        self._recording: tuple[threading.Thread, EndedTask] | None = None

    @classmethod
    def from_context(cls, context: WorkerContext, control: ControlWatch | None = None) -> Worker:
        """The worker of a VM whose context the entry point built."""
        return cls(context.settings, context.pubsub, context.storage, context.metadata, context.work_dir, context.vm_name,
                   clock=context.clock, sleep=context.sleep, lane=context.lane, control=control)

    # -- loop --------------------------------------------------------------

    def run(self, pull_timeout: float = 10.0) -> LoopEnd:
        """Work until idle for ``idle_poweroff_seconds`` or told to stop.

        A task's result is recorded in a background thread while this loop
        pulls and starts the next item: on a busy worker the gap between two
        tasks is the pull and the start, not also five Cloud Storage and
        Pub/Sub calls. The loop waits for that recording before it says it
        is idle and before it returns.

        A pull that fails (the run's subscription deleted by a cancel, or
        recreated by a resumed scheduler, or the service down) counts as no
        work: the worker backs off and tries again, and powers off once idle.
        An item whose processing raises is handed back and the loop goes on.

        Returns:
            ``LoopEnd.IDLE`` or ``LoopEnd.STOPPING``.
        """
        context = self.context
        idle_since = context.clock()
        announced_idle = False
        pull_failures = 0
        try:
            while not context.work_dir.is_stopping():
                try:
                    if self.control is not None and self.control.draining:
                        received = []  # the run's cost cap: no new item; the scheduler deletes this VM once idle
                        context.sleep(1.0)
                    else:
                        received = context.pubsub.pull(context.work_subscription, max_messages=1, timeout=pull_timeout)
                    pull_failures = 0
                except Exception as error:
                    pull_failures += 1
                    if pull_failures == 1:
                        log.warning("pulling work failed (%s); retrying with backoff", error)
                    received = []
                    context.sleep(min(PULL_ERROR_BACKOFF_MAX_SECONDS, 0.5 * 2 ** min(pull_failures, 5)))
                if not received:
                    self._wait_for_recording()
                    if not announced_idle:
                        context.publish_event(EventKind.IDLE)
                        announced_idle = True
                    if context.clock() - idle_since >= context.settings.idle_poweroff_seconds:
                        return LoopEnd.IDLE
                    continue
                try:
                    ended = self._run_item(received[0])
                    if isinstance(ended, EndedTask):
                        self._record_in_background(ended)
                except Exception:
                    log.exception("processing a work item failed; handing it back")
                    hand_back_inflight(context, reason="worker error")
                    # Also when it failed before it was recorded in flight; a second nack is harmless.
                    context.nack(received[0].ack_id, "the item")
                    context.sleep(1.0)
                idle_since = context.clock()
                announced_idle = False
            return LoopEnd.STOPPING
        finally:
            self._wait_for_recording()

    def process(self, received: Received) -> Outcome:
        """Run one pulled item and record its result, in this thread.

        Returns:
            What became of it (see ``cflow.protocol.Outcome``).
        """
        ended = self._run_item(received)
        return record_or_hand_back(self.context, ended) if isinstance(ended, EndedTask) else ended

    def _run_item(self, received: Received) -> Outcome | EndedTask:
        """Run one pulled item's task. Returns an outcome (see ``process``) or, when the
        result is still to be recorded, an ``EndedTask`` whose item is in ``settling.json``."""
        context = self.context
        work_dir = context.work_dir
        try:
            item, attempt = tasks.decode_message(received.data, received.attributes)
        except ValueError as error:
            # Not ours to run: acking keeps it from being delivered again and
            # again; the event makes the scheduler tell the user it was dropped.
            log.error("dropping a malformed work message: %s", error)
            context.publish_event(EventKind.MALFORMED, detail=str(error)[:200])
            context.ack(received.ack_id)
            return Outcome.MALFORMED
        preemptions, backup = preemptions_of(received.attributes), is_backup(received.attributes)
        if self._recording is not None and self._recording[1].item.id == item.id:
            self._wait_for_recording()  # the same item again (a republished copy): see its result first
        if context.storage.is_done(item.id) or context.storage.attempt_recorded(item.id, attempt):
            log.info("item %s attempt %s is already recorded; acked without running it again", item.id, attempt)
            context.publish_event(EventKind.DUPLICATE, item=item.id, attempt=attempt, backup=backup)
            context.ack(received.ack_id)
            return Outcome.DUPLICATE

        attempt_dir = work_dir.fresh_attempt_dir(item.id, attempt)
        output_dir = attempt_dir / "output"
        log_file = attempt_dir / "task.log"
        log_file.touch()
        started = time.time()
        with work_dir.handback_lock():
            if work_dir.is_stopping():
                context.nack(received.ack_id, item.id)
                return Outcome.STOPPING
            inflight: TaskRecord = {"item": item.id, "attempt": attempt, "ack_id": received.ack_id, "log": str(log_file), "started": started}
            if backup:
                inflight["backup"] = True
            elif context.settings.preemptions_before_standard is not None and context.lane == Lane.SPOT:
                # So a preemption can publish it again with its count raised (cflow.lanes).
                inflight["data"] = bytes(received.data).decode("utf-8")
                inflight["preemptions"] = preemptions
            work_dir.write_inflight(inflight)
        # Not waited for: the scheduler counts "started" for progress only.
        context.publish_event(EventKind.STARTED, wait=False, item=item.id, attempt=attempt, backup=backup)
        # A backup copy's log would replace the log of the attempt it backs up, which still runs: it uploads only if it wins.
        keeper = LeaseKeeper(context, item.id, attempt, log_file, received.ack_id, upload_logs=not backup)
        keeper.start()
        keeper_handed_over = False
        control = self.control
        try:
            exit_status, ending = run_task(
                context, item, attempt, output_dir, log_file, received.ack_id,
                hand_back_running=lambda: hand_back_inflight(context, reason="shut down", kill_task=False, upload_log=False),
                done_elsewhere=(lambda: control.should_stop(item.id)) if control is not None else None,
            )
            elapsed = round(time.time() - started, 3)
            if ending == TaskEnding.STOPPED:
                if not backup:
                    upload_partial_log(context, item.id, attempt, log_file, "shut down")
                return Outcome.INTERRUPTED
            if ending == TaskEnding.DONE_ELSEWHERE:
                return self._stopped_copy(item, attempt, received.ack_id, started, backup)
            # settling.json holds one record: the previous result must be recorded first.
            self._wait_for_recording()
            interrupted = handed_back = False
            handed_back_span = None
            with work_dir.handback_lock():
                record = work_dir.running_record(received.ack_id)
                if exit_status != 0 and (work_dir.is_stopping() or context.metadata.preempted()):
                    # A task killed by the shutdown is no failed attempt: hand it back.
                    interrupted = True
                    if record is not None:
                        handed_back_span = hand_back_record(context, record)
                        handed_back = True
                elif record is not None:
                    # From here the hook leaves the item to us (it waits instead of nacking).
                    work_dir.move_to_settling(record)
            if interrupted:
                if handed_back and not backup:
                    upload_partial_log(context, item.id, attempt, log_file, "shut down", span=handed_back_span)
                elif handed_back:
                    record_span(context, handed_back_span)
                return Outcome.INTERRUPTED
            keeper_handed_over = True
            return EndedTask(item, attempt, received.ack_id, attempt_dir, exit_status, ending, elapsed, keeper, started,
                             backup=backup, preemptions=preemptions)
        finally:
            if not keeper_handed_over:
                keeper.stop()

    def _stopped_copy(self, item: tasks.WorkItem, attempt: int, ack_id: str, started: float, backup: bool) -> Outcome:
        """The scheduler stopped this copy because another one recorded the item done: ack it without a result.

        Its log is not uploaded (it would replace the winner's). If the item is
        somehow not done after all, it is handed back instead.
        """
        context = self.context
        with context.work_dir.handback_lock():
            record = context.work_dir.running_record(ack_id)
            if record is None:
                return Outcome.INTERRUPTED  # the shutdown hook handed it back meanwhile
            context.work_dir.clear_inflight()
        if not context.storage.is_done(item.id):
            log.warning("item %s was stopped as done elsewhere, but it has no done marker; handing it back", item.id)
            context.nack(ack_id, item.id)
            return Outcome.INTERRUPTED
        context.ack(ack_id)
        context.publish_event(EventKind.DUPLICATE, item=item.id, attempt=attempt, backup=backup, reason="stopped: done by another copy",
                              seconds=round(time.time() - started, 3))
        record_span(context, AttemptSpan(item.id, attempt, context.vm_name, started, time.time(), EventKind.DUPLICATE))
        log.info("item %s attempt %s was done by another copy; this copy was stopped", item.id, attempt)
        return Outcome.DUPLICATE

    # -- recording a result in the background ---------------------------------

    def _record_in_background(self, ended: EndedTask) -> None:
        thread = threading.Thread(target=record_or_hand_back, args=(self.context, ended), name=f"record-{ended.item.id}",
                                  daemon=True)
        self._recording = (thread, ended)
        thread.start()

    def _wait_for_recording(self) -> None:
        """Wait until the result being recorded in the background (if any) is recorded or handed back."""
        if self._recording is not None:
            self._recording[0].join()
            self._recording = None
