"""The worker loop (startup-signal.py) and the shutdown hook (shutdown-signal.py).

A worker pulls one item at a time. While the task runs, a keeper thread
extends the item's lease and uploads its log. Then, in this order: outputs,
log, done marker (create-only), done event, ack. A failed attempt is
republished with its attempt count raised, then recorded (an attempt marker,
create-only), then acked. A VM that dies anywhere before the ack loses
nothing: the lease expires and Pub/Sub redelivers; a redelivered item that is
already done, or an attempt whose failure is already recorded, is acked
without running again.

The shutdown hook and the worker share files in the work directory:

- ``stopping``: set by the hook first thing; from then on the worker takes no
  new item and does not count a task that dies as a failed attempt.
- ``inflight.json``: the item, attempt and ack id whose task is running, and
  the task's process group.
- ``settling.json``: the item whose task has ended and whose result the worker
  is recording (outputs, log, marker, event, ack). The worker records it in a
  background thread while it pulls and starts the next item, so a busy worker
  loses only the pull and the task's start between two tasks. One result is
  recorded at a time.
- ``handback.lock``: an exclusive lock held while either side reads and
  changes those two files and acts on them (nack, lease extension, moving an
  item from running to settling). So each item is either settled by the
  worker or handed back (nacked) by exactly one of worker and hook, never
  both: the hook never nacks an item whose result the worker is recording,
  and no lease extension lands after a hand back.
"""

import contextlib
import fcntl
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cflow import tasks

log = logging.getLogger(__name__)

LOG_UPLOAD_INTERVAL_SECONDS = 30
TASK_KILL_GRACE_SECONDS = 5
# How often the worker looks for the hook's stop flag while a task runs.
STOP_POLL_SECONDS = 0.25
# The hook waits this long for a worker that is recording a result; GCE gives
# a Spot VM's shutdown script 30 s in all.
HOOK_SETTLE_WAIT_SECONDS = 25.0
PULL_ERROR_BACKOFF_MAX_SECONDS = 10.0


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs to know of its run, read from the run's run.json."""

    run_id: str
    bucket: str
    work_subscription: str
    work_topic: str
    events_topic: str
    task_command: tuple
    task_timeout: float
    max_attempts: int
    lease_seconds: int
    idle_poweroff_seconds: float

    @classmethod
    def from_manifest(cls, manifest):
        topics = manifest["topics"]
        return cls(
            run_id=manifest["run_id"],
            bucket=manifest["bucket"],
            work_subscription=topics["work_subscription"],
            work_topic=topics["work_topic"],
            events_topic=topics["events_topic"],
            task_command=tuple(manifest["task_command"]),
            task_timeout=float(manifest["task_timeout"]),
            max_attempts=int(manifest["max_attempts"]),
            lease_seconds=int(manifest["lease_seconds"]),
            idle_poweroff_seconds=float(manifest["idle_poweroff_seconds"]),
        )


class WorkDir:
    """The worker's local files: package, per-attempt outputs and logs, and the files shared with the hook."""

    def __init__(self, root):
        self.root = Path(root)
        self.inflight = self.root / "inflight.json"
        self.settling = self.root / "settling.json"
        self.stopping = self.root / "stopping"
        self.lock_file = self.root / "handback.lock"
        self.package = self.root / "package"

    def attempt_dir(self, item_id, attempt):
        return self.root / "attempts" / f"{item_id}-{attempt}"

    def fresh_attempt_dir(self, item_id, attempt):
        """An empty attempt folder (a killed predecessor's leftovers removed). Returns its path."""
        tasks.validate_item_id(item_id)  # the id names a local folder: nothing may escape the work dir
        path = self.attempt_dir(item_id, attempt)
        shutil.rmtree(path, ignore_errors=True)
        (path / "output").mkdir(parents=True)
        return path

    def write_inflight(self, record):
        _write_record(self.inflight, record)

    def read_inflight(self):
        return _read_record(self.inflight)

    def clear_inflight(self):
        self.inflight.unlink(missing_ok=True)

    def read_settling(self):
        return _read_record(self.settling)

    def clear_settling(self):
        self.settling.unlink(missing_ok=True)

    def move_to_settling(self, record):
        """The task has ended: its item is now being recorded, not run. Call with the lock held."""
        _write_record(self.settling, {**record, "settling": True})
        self.clear_inflight()

    def running_record(self, ack_id):
        """The in-flight record of the message ``ack_id``, or None (its task ended, or it was handed back)."""
        return _if_message(self.read_inflight(), ack_id)

    def settling_record(self, ack_id):
        """The settling record of the message ``ack_id``, or None."""
        return _if_message(self.read_settling(), ack_id)

    def record_of(self, ack_id):
        """The running or settling record of the message ``ack_id``, or None (settled or handed back)."""
        return self.running_record(ack_id) or self.settling_record(ack_id)

    def is_stopping(self):
        return self.stopping.exists()

    def request_stop(self):
        self.root.mkdir(parents=True, exist_ok=True)
        self.stopping.touch()

    @contextlib.contextmanager
    def handback_lock(self):
        """Hold the exclusive hand-back lock (between processes, and between threads of one).

        Each use opens the file anew: flock conflicts between open file
        descriptions, so the keeper thread and the main thread exclude each
        other too. The kernel drops the lock when its holder dies.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.lock_file, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _write_record(path, record):
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(record))
    os.replace(partial, path)  # the hook never reads half a record


def _read_record(path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _if_message(record, ack_id):
    """``record`` if it is the one of message ``ack_id``, else None."""
    return record if record is not None and record.get("ack_id") == ack_id else None


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
    """

    def __init__(self, settings, pubsub, storage, metadata, work_dir, vm_name, clock=time.monotonic, sleep=time.sleep):
        self.settings = settings
        self.pubsub = pubsub
        self.storage = storage
        self.metadata = metadata
        self.work_dir = work_dir
        self.vm_name = vm_name
        self.clock = clock
        self.sleep = sleep
        # The result being recorded in the background while the next task runs (see run()).
        self._recording = None  # (thread, ended item) or None

    # -- loop --------------------------------------------------------------

    def run(self, pull_timeout=10.0):
        """Work until idle for ``idle_poweroff_seconds`` or told to stop. Returns "idle" or "stopping".

        A task's result is recorded in a background thread while this loop
        pulls and starts the next item: on a busy worker the gap between two
        tasks is the pull and the start, not also five Cloud Storage and
        Pub/Sub calls. The loop waits for that recording before it says it
        is idle and before it returns.

        A pull that fails (the run's subscription deleted by a cancel, or
        recreated by a resumed scheduler, or the service down) counts as no
        work: the worker backs off and tries again, and powers off once idle.
        An item whose processing raises is handed back and the loop goes on.
        """
        idle_since = self.clock()
        announced_idle = False
        pull_failures = 0
        try:
            while not self.work_dir.is_stopping():
                try:
                    received = self.pubsub.pull(self.settings.work_subscription, max_messages=1, timeout=pull_timeout)
                    pull_failures = 0
                except Exception as error:
                    pull_failures += 1
                    if pull_failures == 1:
                        log.warning("pulling work failed (%s); retrying with backoff", error)
                    received = []
                    self.sleep(min(PULL_ERROR_BACKOFF_MAX_SECONDS, 0.5 * 2 ** min(pull_failures, 5)))
                if not received:
                    self._wait_for_recording()
                    if not announced_idle:
                        self._event("idle")
                        announced_idle = True
                    if self.clock() - idle_since >= self.settings.idle_poweroff_seconds:
                        return "idle"
                    continue
                try:
                    ended = self._run_item(received[0])
                    if isinstance(ended, _EndedTask):
                        self._record_in_background(ended)
                except Exception:
                    log.exception("processing a work item failed; handing it back")
                    hand_back_inflight(self.settings, self.pubsub, self.storage, self.metadata, self.work_dir,
                                       self.vm_name, reason="worker error")
                    # Also when it failed before it was recorded in flight; a second nack is harmless.
                    self._nack(received[0].ack_id, "the item")
                    self.sleep(1.0)
                idle_since = self.clock()
                announced_idle = False
            return "stopping"
        finally:
            self._wait_for_recording()

    def process(self, received):
        """Run one pulled item and record its result, in this thread.

        Returns the outcome: "done", "duplicate" (already done or this attempt
        already recorded; acked without running), "retry", "failed",
        "interrupted" (handed back: shutdown or preemption; no attempt used),
        "stopping" (not started: the VM is going down), "malformed", or
        "handed back" (the result could not be recorded).
        """
        ended = self._run_item(received)
        return self._record_or_hand_back(ended) if isinstance(ended, _EndedTask) else ended

    def _run_item(self, received):
        """Run one pulled item's task. Returns an outcome (see ``process``) or, when the
        result is still to be recorded, an ``_EndedTask`` whose item is in ``settling.json``."""
        try:
            item, attempt = tasks.decode_message(received.data, received.attributes)
        except ValueError as error:
            # Not ours to run; acking keeps it from looping, the event lets the user see it.
            log.error("dropping a malformed work message: %s", error)
            self._event("malformed", detail=str(error)[:200])
            self._settle_message(received.ack_id)
            return "malformed"
        if self._recording is not None and self._recording[1].item.id == item.id:
            self._wait_for_recording()  # the same item again (a republished copy): see its result first
        if self.storage.is_done(item.id) or self.storage.attempt_recorded(item.id, attempt):
            log.info("item %s attempt %s is already recorded; acked without running it again", item.id, attempt)
            self._event("duplicate", item=item.id, attempt=attempt)
            self._settle_message(received.ack_id)
            return "duplicate"

        attempt_dir = self.work_dir.fresh_attempt_dir(item.id, attempt)
        output_dir = attempt_dir / "output"
        log_file = attempt_dir / "task.log"
        log_file.touch()
        with self.work_dir.handback_lock():
            if self.work_dir.is_stopping():
                self._nack(received.ack_id, item.id)
                return "stopping"
            self.work_dir.write_inflight(
                {"item": item.id, "attempt": attempt, "ack_id": received.ack_id, "log": str(log_file)}
            )
        # Not waited for: the scheduler counts "started" for progress only.
        self._event("started", wait=False, item=item.id, attempt=attempt)
        keeper = _LeaseKeeper(self, item, attempt, log_file, received.ack_id)
        keeper.start()
        keeper_handed_over = False
        try:
            started = time.time()
            exit_status, ending = self._run_task(item, attempt, output_dir, log_file, received.ack_id)
            elapsed = round(time.time() - started, 3)
            if ending == "stopped":
                return "interrupted"
            # settling.json holds one record: the previous result must be recorded first.
            self._wait_for_recording()
            interrupted = handed_back = False
            with self.work_dir.handback_lock():
                record = self.work_dir.running_record(received.ack_id)
                ours = record is not None
                if exit_status != 0 and (self.work_dir.is_stopping() or self.metadata.preempted()):
                    # A task killed by the shutdown is no failed attempt: hand it back.
                    interrupted = True
                    if ours:
                        _hand_back_record(self.settings, self.pubsub, self.metadata, self.work_dir, self.vm_name, record)
                        handed_back = True
                elif ours:
                    # From here the hook leaves the item to us (it waits instead of nacking).
                    self.work_dir.move_to_settling(record)
            if interrupted:
                if handed_back:
                    self._upload_partial_log(item, attempt, log_file, "shut down")
                return "interrupted"
            keeper_handed_over = True
            return _EndedTask(item, attempt, received.ack_id, attempt_dir, exit_status, ending, elapsed, keeper)
        finally:
            if not keeper_handed_over:
                keeper.stop()

    # -- recording a result -------------------------------------------------

    def _record(self, ended):
        """Record an ended task's result (uploads, marker, event, ack); returns the outcome."""
        try:
            output_dir, log_file = ended.attempt_dir / "output", ended.attempt_dir / "task.log"
            if ended.exit_status == 0:
                outcome = self._finish_done(ended.item, ended.attempt, output_dir, log_file, ended.ack_id, ended.elapsed)
            else:
                outcome = self._finish_failed(ended.item, ended.attempt, log_file, ended.ack_id, ended.exit_status,
                                              ended.ending == "timed out", ended.elapsed)
            with self.work_dir.handback_lock():
                if self.work_dir.settling_record(ended.ack_id) is not None:
                    self.work_dir.clear_settling()
            shutil.rmtree(ended.attempt_dir, ignore_errors=True)
            return outcome
        finally:
            ended.keeper.stop()

    def _record_in_background(self, ended):
        thread = threading.Thread(target=self._record_or_hand_back, args=(ended,), name=f"record-{ended.item.id}",
                                  daemon=True)
        self._recording = (thread, ended)
        thread.start()

    def _record_or_hand_back(self, ended):
        """Record the result; if that fails, hand the item back. Returns the outcome."""
        try:
            return self._record(ended)
        except Exception:
            log.exception("recording the result of %s failed; handing it back", ended.item.id)
            with self.work_dir.handback_lock():
                record = self.work_dir.settling_record(ended.ack_id)
                if record is not None:
                    _hand_back_record(self.settings, self.pubsub, self.metadata, self.work_dir, self.vm_name, record,
                                      settling=True)
            # Also when it was already taken out of settling; a second nack is harmless.
            self._nack(ended.ack_id, ended.item.id)
            return "handed back"

    def _wait_for_recording(self):
        """Wait until the result being recorded in the background (if any) is recorded or handed back."""
        if self._recording is not None:
            self._recording[0].join()
            self._recording = None

    # -- the task ----------------------------------------------------------

    def _task_environment(self, item, attempt, output_dir):
        environment = dict(os.environ)
        # The task's python3 is the worker's own, which has the Google clients
        # (on a stock image they live in a venv, not the system Python).
        environment["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), environment.get("PATH", "")])
        environment.update(
            CFLOW_RUN_ID=self.settings.run_id,
            CFLOW_TASK_ID=item.id,
            CFLOW_ATTEMPT=str(attempt),
            CFLOW_OUTPUT_DIR=str(output_dir),
            CFLOW_BUCKET=self.settings.bucket,
        )
        return environment

    def _run_task(self, item, attempt, output_dir, log_file, ack_id):
        """Run the task with the item's fields as argv (no shell).

        Returns ``(exit status, ending)``; ending is "exited", "timed out"
        (its process group was killed), or "stopped" (the VM is going down:
        the item was handed back first, then the task's group was killed).
        """
        command = list(self.settings.task_command) + list(item.args)
        with open(log_file, "ab") as log_stream:
            try:
                process = subprocess.Popen(
                    command,
                    cwd=self.work_dir.package,
                    env=self._task_environment(item, attempt, output_dir),
                    stdin=subprocess.DEVNULL,
                    stdout=log_stream,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, so a timeout kills all of it
                )
            except OSError as error:
                log_stream.write(f"cflow: cannot start {command[0]!r}: {error}\n".encode())
                return 127, "exited"
            with self.work_dir.handback_lock():
                record = self.work_dir.running_record(ack_id)
                if record is not None:
                    # So the hook, or a worker restarted after this one is killed, can stop an orphaned task.
                    record.update(task_pgid=process.pid, task_start=_process_start(process.pid), boot_id=_boot_id())
                    self.work_dir.write_inflight(record)
            deadline = time.monotonic() + self.settings.task_timeout
            with _ExitWatch(process) as exit_watch:
                while True:
                    status = exit_watch.wait(min(STOP_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
                    if status is not None:
                        return status, "exited"
                    if self.work_dir.is_stopping() and process.poll() is None:
                        # Hand back before the kill: a Spot VM's grace is short, and the nack is what matters.
                        # (A task that has just ended is recorded instead, if the grace allows.)
                        hand_back_inflight(self.settings, self.pubsub, self.storage, self.metadata, self.work_dir,
                                           self.vm_name, reason="shut down", kill_task=False, upload_log=False)
                        _kill_group(process)
                        log_stream.flush()
                        self._upload_partial_log(item, attempt, log_file, "shut down")
                        return process.returncode, "stopped"
                    if process.poll() is not None:
                        return process.returncode, "exited"
                    if time.monotonic() >= deadline:
                        _kill_group(process)
                        log_stream.write(f"\ncflow: task timed out after {self.settings.task_timeout:g} s; "
                                         "its process group was killed\n".encode())
                        return process.returncode, "timed out"

    # -- endings -----------------------------------------------------------

    def _finish_done(self, item, attempt, output_dir, log_file, ack_id, elapsed):
        if self.storage.is_done(item.id):
            # Another attempt finished first (a duplicate delivery ran in parallel): keep its outputs.
            self._event("duplicate", item=item.id, attempt=attempt, seconds=elapsed)
            self._settle_message(ack_id)
            return "duplicate"
        outputs = self._upload_outputs(item, output_dir, log_file)
        log_url = self.storage.upload_log(item.id, attempt, log_file)
        first = self.storage.write_done_marker(
            item.id,
            {"item": item.id, "attempt": attempt, "vm": self.vm_name, "seconds": elapsed, "outputs": outputs, "log": log_url},
        )
        self._event("done" if first else "duplicate", item=item.id, attempt=attempt, seconds=elapsed)
        self._settle_message(ack_id)
        return "done" if first else "duplicate"

    def _finish_failed(self, item, attempt, log_file, ack_id, exit_status, timed_out, elapsed):
        log_url = self.storage.upload_log(item.id, attempt, log_file)
        reason = "timed out" if timed_out else f"exit status {exit_status}"
        info = {"item": item.id, "attempt": attempt, "reason": reason, "log": log_url, "vm": self.vm_name}
        if attempt >= self.settings.max_attempts:
            self.storage.write_failed_marker(item.id, {**info, "attempts": attempt})
            outcome = "failed"
            self._event("failed", item=item.id, attempt=attempt, reason=reason, log=log_url)
        else:
            # Successor first, then the record that this attempt is settled: a
            # redelivered copy of this attempt that finds the record knows its
            # successor is queued; a crash in between at worst duplicates it.
            data, attributes = tasks.encode_message(item, attempt + 1)
            self.pubsub.publish(self.settings.work_topic, data, attributes)
            outcome = "retry"
            self._event("retry", item=item.id, attempt=attempt, reason=reason, log=log_url, seconds=elapsed)
        self.storage.write_attempt_marker(item.id, attempt, info)
        self._settle_message(ack_id)
        return outcome

    def _upload_outputs(self, item, output_dir, log_file):
        names = []
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
            self.storage.upload_output(item.id, name, path)
            names.append(name)
        return names

    def _upload_partial_log(self, item, attempt, log_file, why):
        try:
            with open(log_file, "a") as stream:
                stream.write(f"\ncflow: {why}; item handed back\n")
            self.storage.upload_log(item.id, attempt, log_file)
        except Exception as error:  # the log is news; the item is already handed back
            log.warning("could not upload the partial log of %s: %s", item.id, error)

    def _settle_message(self, ack_id):
        try:
            self.pubsub.ack(self.settings.work_subscription, [ack_id])
        except Exception as error:
            # The result is recorded in Cloud Storage; a redelivery is acked as a duplicate.
            log.warning("ack failed (%s); a redelivery will be acked as a duplicate", error)

    def _nack(self, ack_id, item_id):
        try:
            self.pubsub.nack(self.settings.work_subscription, ack_id)
        except Exception as error:
            log.warning("nack of %s failed (%s); its lease expiry will redeliver it", item_id, error)

    def _event(self, kind, wait=True, **fields):
        _publish_event(self.pubsub, self.settings, kind, self.vm_name, wait=wait, **fields)


@dataclass(frozen=True)
class _EndedTask:
    """A task that has ended and whose result is still to be recorded (its item is in ``settling.json``)."""

    item: tasks.WorkItem
    attempt: int
    ack_id: str
    attempt_dir: Path
    exit_status: int
    ending: str  # "exited" or "timed out"
    elapsed: float
    keeper: "_LeaseKeeper"  # keeps the lease until the result is recorded


class _LeaseKeeper:
    """Keeps a running item's lease alive and its log uploaded, until stopped.

    An extension happens under the hand-back lock and never once the VM is
    stopping (unless the worker is already recording the result), so it can
    not undo a nack.
    """

    def __init__(self, worker, item, attempt, log_file, ack_id):
        self.worker = worker
        self.item = item
        self.attempt = attempt
        self.log_file = log_file
        self.ack_id = ack_id
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._keep, name=f"lease-{item.id}", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        self.stopped.set()
        self.thread.join()

    def _keep(self):
        settings = self.worker.settings
        work_dir = self.worker.work_dir
        extend_every = max(1.0, settings.lease_seconds / 3)
        last_log_upload = time.monotonic()
        while not self.stopped.wait(extend_every):
            with work_dir.handback_lock():
                record = work_dir.record_of(self.ack_id)
                if record is None:
                    return  # settled or handed back
                if work_dir.is_stopping() and not record.get("settling"):
                    return  # being handed back: an extension now could land after the nack
                try:
                    self.worker.pubsub.extend_lease(settings.work_subscription, self.ack_id, settings.lease_seconds)
                except Exception as error:
                    log.warning("lease extension for %s failed: %s", self.item.id, error)
            if time.monotonic() - last_log_upload >= LOG_UPLOAD_INTERVAL_SECONDS and not record.get("settling"):
                last_log_upload = time.monotonic()
                try:
                    self.worker.storage.upload_log(self.item.id, self.attempt, self.log_file)
                except Exception as error:
                    log.warning("log upload for %s failed: %s", self.item.id, error)


class _ExitWatch:
    """Waits for a task to exit and wakes the moment it does.

    ``Popen.wait(timeout)`` polls with sleeps that grow to 50 ms, so a task's
    end was noticed 25 ms late on average: on a busy worker that was most of
    the gap between two tasks. A pidfd becomes readable when the process
    exits; where the kernel has none (Linux < 5.3) we fall back to polling.
    """

    def __init__(self, process):
        self.process = process
        self.pidfd = None

    def __enter__(self):
        try:
            self.pidfd = os.pidfd_open(self.process.pid)
        except (AttributeError, OSError):
            self.pidfd = None
        return self

    def __exit__(self, *exc_info):
        if self.pidfd is not None:
            os.close(self.pidfd)

    def wait(self, seconds):
        """The exit status, or None if the task still runs after ``seconds``."""
        if self.pidfd is None:
            try:
                return self.process.wait(timeout=seconds)
            except subprocess.TimeoutExpired:
                return None
        select.select([self.pidfd], [], [], seconds)
        return self.process.poll()


def _kill_group(process):
    """SIGTERM the task's whole process group, then SIGKILL whatever is left after a grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        if sig == signal.SIGTERM:
            try:
                process.wait(timeout=TASK_KILL_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            # The leader may have exited while its children linger in the group.
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
    process.wait()


# -- processes, identified across restarts ------------------------------------


def _boot_id():
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid):
    """The process's start time in clock ticks since boot, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2 :].split()[19])


def _process_started_at(pid):
    """The process's start as epoch seconds, or None."""
    ticks = _process_start(pid)
    if ticks is None:
        return None
    try:
        boot_line = next(line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
    except (OSError, StopIteration):
        return None
    return int(boot_line.split()[1]) + ticks / os.sysconf("SC_CLK_TCK")


def _kill_recorded_task(record, sig=signal.SIGTERM):
    """Signal the task group named in an in-flight record, if it is still the one we started.

    A recycled pid is left alone: the record's boot id and start time must match
    a live leader (or the leader is gone, and then the kernel has not reused its
    pid as long as any member of its group lives).
    """
    pgid = record.get("task_pgid")
    if not pgid:
        return False
    if record.get("boot_id") != _boot_id():
        return False
    start = _process_start(pgid)
    if start is not None and start != record.get("task_start"):
        return False
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


# -- handing an item back (worker, restarted worker, shutdown hook) -----------


def _publish_event(pubsub, settings, kind, vm_name, wait=True, **fields):
    """Publish an event; with ``wait=False`` return at once and only log a failure."""
    event = {"type": kind, "vm": vm_name, "time": time.time(), **fields}
    try:
        pubsub.publish_event(settings.events_topic, event, wait=wait)
    except Exception as error:  # events are progress news; losing one must not lose work
        log.warning("could not publish %s event: %s", kind, error)


def _hand_back_record(settings, pubsub, metadata, work_dir, vm_name, record, settling=False):
    """Nack the record's message, tell the scheduler, and forget the record. Call with the lock held.

    Args:
        settling: the record is the one in ``settling.json`` (else ``inflight.json``).
    """
    item_id, attempt = record["item"], record["attempt"]
    try:
        pubsub.nack(settings.work_subscription, record["ack_id"])
    except Exception as error:  # the lease expiry brings it back anyway
        log.warning("nack of %s failed (%s); its lease expiry will redeliver it", item_id, error)
    preempted = metadata.preempted()
    _publish_event(pubsub, settings, "preempted" if preempted else "interrupted", vm_name, item=item_id, attempt=attempt)
    if settling:
        work_dir.clear_settling()
    else:
        work_dir.clear_inflight()


def hand_back_inflight(settings, pubsub, storage, metadata, work_dir, vm_name, reason, settle_wait_seconds=0.0,
                       take_settling=False, kill_task=True, upload_log=True, sleep=time.sleep, clock=time.monotonic):
    """Hand the running item back at once: nack (it keeps its attempt count), event, partial log.

    Used by the shutdown hook, by a worker that sees the stop flag or fails
    on an item, and by a worker restarted after its predecessor died. An
    item whose task has ended and whose result the worker is recording
    (``settling.json``) is left to it: we wait up to ``settle_wait_seconds``
    for it to be recorded, then leave it to the lease.

    Args:
        reason: a few words for the partial log ("preempted", "shut down").
        take_settling: hand back the item being recorded too (its recorder
            is dead).
        kill_task: SIGTERM the recorded task group (verified to be ours).
        upload_log: append a note to the partial log and upload it.
    Returns:
        The item id handed back (the running one if both were), or None.
    """
    handed_back = []
    deadline = clock() + settle_wait_seconds
    while True:
        with work_dir.handback_lock():
            running = work_dir.read_inflight()
            if running is not None:
                _hand_back_record(settings, pubsub, metadata, work_dir, vm_name, running)
                handed_back.append(running)
            settling = work_dir.read_settling()
            if settling is not None and take_settling:
                _hand_back_record(settings, pubsub, metadata, work_dir, vm_name, settling, settling=True)
                handed_back.append(settling)
                settling = None
        if settling is None:
            break
        if clock() >= deadline:
            log.info("item %s is being recorded by the worker; leaving it to finish (or to its lease)", settling["item"])
            break
        sleep(0.2)
    for record in handed_back:
        if kill_task:
            _kill_recorded_task(record)
        log_file = Path(record["log"])
        if upload_log and log_file.exists():
            try:
                with open(log_file, "a") as stream:
                    stream.write(f"\ncflow: {reason}; item handed back\n")
                storage.upload_log(record["item"], record["attempt"], log_file)
            except Exception as error:
                log.warning("could not upload the partial log of %s: %s", record["item"], error)
    return handed_back[0]["item"] if handed_back else None


def hand_back(settings, pubsub, storage, metadata, work_dir, vm_name, settle_wait_seconds=HOOK_SETTLE_WAIT_SECONDS):
    """The shutdown hook: stop the worker taking work, hand the in-flight item back, save its partial log.

    Called on preemption, stop or delete, within GCE's 30 s Spot grace. The
    message is nacked, so it keeps its attempt count: a preemption never uses
    up an attempt. Returns the item id handed back, or None.
    """
    work_dir.request_stop()
    reason = "preempted" if metadata.preempted() else "shut down"
    return hand_back_inflight(settings, pubsub, storage, metadata, work_dir, vm_name, reason,
                              settle_wait_seconds=settle_wait_seconds)


def stop_flag_is_stale(work_dir, boot_started_at):
    """True if the stop flag was left by an earlier boot of this VM (a stopped VM started again).

    Args:
        boot_started_at: epoch seconds when this boot's startup script began
            (None if unknown: the flag is then taken as stale).
    """
    try:
        flagged_at = work_dir.stopping.stat().st_mtime
    except FileNotFoundError:
        return False
    return boot_started_at is None or flagged_at < boot_started_at


# -- entry points (startup-signal.py, shutdown-signal.py) -----------------


def _vm_context(work_root):
    """Everything both entry points read: run settings, clients, this VM's name."""
    from cflow.gcp.clients import build_worker_clients
    from cflow.gcp.metadata import Metadata
    from cflow.gcp.pubsub import PubSub
    from cflow.gcp.storage import RunStorage

    metadata = Metadata()
    run_id = metadata.attribute("cflow-run")
    bucket = metadata.attribute("cflow-bucket")
    if not run_id or not bucket:
        raise SystemExit("cflow worker: this VM has no cflow-run/cflow-bucket metadata; it was not started by CFlow")
    target = "local" if os.environ.get("CFLOW_EMULATED_VM") == "1" else "gcp"
    clients = build_worker_clients(target, metadata.get("project/project-id"))
    storage = RunStorage(clients.storage, bucket, run_id)
    manifest = storage.read_manifest()
    if manifest is None:
        raise SystemExit(f"cflow worker: run {run_id} has no run.json in gs://{bucket}; was the run cancelled?")
    settings = WorkerSettings.from_manifest(manifest)
    pubsub = PubSub(clients.publisher, clients.subscriber)
    return settings, pubsub, storage, metadata, WorkDir(work_root), metadata.instance_name()


def _configure_logging():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("google", "urllib3", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(work_root=None):
    """startup-signal.py: work until the queue stays empty, then power the VM off."""
    _configure_logging()
    work_root = Path(work_root or Path(__file__).resolve().parent.parent.parent)
    work_dir = WorkDir(work_root)
    if work_dir.is_stopping():
        # init.sh started us in the parent's boot: a flag from this boot means the VM is going down.
        if not stop_flag_is_stale(work_dir, _process_started_at(os.getppid())):
            log.info("this VM is shutting down; not taking work")
            return 0
        work_dir.stopping.unlink(missing_ok=True)
    settings, pubsub, storage, metadata, work_dir, vm_name = _vm_context(work_root)
    # A predecessor killed mid-item (SIGKILL, OOM) left its record: stop its
    # orphaned task and hand the item back now rather than after its lease.
    recovered = hand_back_inflight(settings, pubsub, storage, metadata, work_dir, vm_name, reason="worker died",
                                   take_settling=True)
    if recovered:
        log.info("handed back item %s left by a worker that died", recovered)
    log.info("worker %s on run %s", vm_name, settings.run_id)
    reason = Worker(settings, pubsub, storage, metadata, work_dir, vm_name).run()
    if reason == "idle":
        # A safety net for a controller that is gone: an idle VM stops billing.
        log.info("idle for %.0f s; powering off", settings.idle_poweroff_seconds)
        metadata.power_off()
    return 0


def shutdown_main(work_root=None):
    """shutdown-signal.py: stop the worker taking work (first, before anything slow), then hand the in-flight item back."""
    work_root = Path(work_root or Path(__file__).resolve().parent.parent.parent)
    WorkDir(work_root).request_stop()
    _configure_logging()
    settings, pubsub, storage, metadata, work_dir, vm_name = _vm_context(work_root)
    item_id = hand_back(settings, pubsub, storage, metadata, work_dir, vm_name)
    log.info("shutdown (%s): %s", "preempted" if metadata.preempted() else "stop or delete",
             f"handed back {item_id}" if item_id else "nothing in flight to hand back")
    return 0
