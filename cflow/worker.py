"""The worker loop (startup-signal.py) and the shutdown hook (shutdown-signal.py).

A worker pulls one item at a time. While the task runs, a keeper thread
extends the item's lease and uploads its log. Then, in this order: outputs,
log, done marker (create-only), done event, ack. A crash anywhere before the
ack lets the lease expire and Pub/Sub redeliver; a redelivered item that is
already done is acked without running again.

The shutdown hook and the worker share two files in the work directory:
``inflight.json`` (the item, attempt and ack id being worked on) and
``stopping`` (set by the hook so the worker neither acks nor counts a task
killed by the shutdown as a failed attempt).
"""

import json
import logging
import os
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
    """The worker's local files: package, per-attempt outputs and logs, and the hook's two files."""

    def __init__(self, root):
        self.root = Path(root)
        self.inflight = self.root / "inflight.json"
        self.stopping = self.root / "stopping"
        self.package = self.root / "package"

    def attempt_dir(self, item_id, attempt):
        return self.root / "attempts" / f"{item_id}-{attempt}"

    def write_inflight(self, record):
        partial = self.inflight.with_suffix(".tmp")
        partial.write_text(json.dumps(record))
        os.replace(partial, self.inflight)  # the hook never reads half a record

    def read_inflight(self):
        try:
            return json.loads(self.inflight.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def clear_inflight(self):
        self.inflight.unlink(missing_ok=True)

    def is_stopping(self):
        return self.stopping.exists()


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
    """

    def __init__(self, settings, pubsub, storage, metadata, work_dir, vm_name, clock=time.monotonic):
        self.settings = settings
        self.pubsub = pubsub
        self.storage = storage
        self.metadata = metadata
        self.work_dir = work_dir
        self.vm_name = vm_name
        self.clock = clock

    # -- loop --------------------------------------------------------------

    def run(self, pull_timeout=10.0):
        """Work until idle for ``idle_poweroff_seconds`` or told to stop. Returns the reason."""
        idle_since = self.clock()
        announced_idle = False
        while not self.work_dir.is_stopping():
            received = self.pubsub.pull(self.settings.work_subscription, max_messages=1, timeout=pull_timeout)
            if not received:
                if not announced_idle:
                    self._event("idle")
                    announced_idle = True
                if self.clock() - idle_since >= self.settings.idle_poweroff_seconds:
                    return "idle"
                continue
            self.process(received[0])
            idle_since = self.clock()
            announced_idle = False
        return "stopping"

    def process(self, received):
        """Run one pulled item to its end. Returns the outcome name."""
        try:
            item, attempt = tasks.decode_message(received.data, received.attributes)
        except ValueError as error:
            # Not ours to run; acking keeps it from looping, the event lets the user see it.
            log.error("dropping a malformed work message: %s", error)
            self._event("malformed", detail=str(error)[:200])
            self.pubsub.ack(self.settings.work_subscription, [received.ack_id])
            return "malformed"
        if self.storage.is_done(item.id):
            self._event("duplicate", item=item.id, attempt=attempt)
            self.pubsub.ack(self.settings.work_subscription, [received.ack_id])
            return "duplicate"

        attempt_dir = self.work_dir.attempt_dir(item.id, attempt)
        output_dir = attempt_dir / "output"
        output_dir.mkdir(parents=True, exist_ok=True)
        log_file = attempt_dir / "task.log"
        self.work_dir.write_inflight(
            {"item": item.id, "attempt": attempt, "ack_id": received.ack_id, "log": str(log_file)}
        )
        self._event("started", item=item.id, attempt=attempt)
        started = time.time()
        exit_status, timed_out = self._run_task(item, attempt, output_dir, log_file, received.ack_id)
        elapsed = round(time.time() - started, 3)

        if self.work_dir.is_stopping() or (exit_status != 0 and self.metadata.preempted()):
            # The shutdown hook hands the item back; a task killed by the shutdown is no failed attempt.
            return "interrupted"
        try:
            if exit_status == 0:
                return self._finish_done(item, attempt, output_dir, log_file, received.ack_id, elapsed)
            return self._finish_failed(item, attempt, log_file, received.ack_id, exit_status, timed_out, elapsed)
        finally:
            self.work_dir.clear_inflight()

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
        """Run the task with the item's fields as argv (no shell). Returns (exit status, timed out)."""
        command = list(self.settings.task_command) + list(item.args)
        with open(log_file, "wb") as log_stream:
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
                return 127, False
            record = self.work_dir.read_inflight() or {}
            record["task_pgid"] = process.pid
            self.work_dir.write_inflight(record)
            keeper = _LeaseKeeper(self, item, attempt, log_file, ack_id)
            keeper.start()
            try:
                try:
                    return process.wait(timeout=self.settings.task_timeout), False
                except subprocess.TimeoutExpired:
                    _kill_group(process)
                    log_stream.write(f"\ncflow: task timed out after {self.settings.task_timeout:g} s; killed\n".encode())
                    return process.returncode, True
            finally:
                keeper.stop()

    # -- endings -----------------------------------------------------------

    def _finish_done(self, item, attempt, output_dir, log_file, ack_id, elapsed):
        outputs = self._upload_outputs(item, output_dir, log_file)
        log_url = self.storage.upload_log(item.id, attempt, log_file)
        first = self.storage.write_done_marker(
            item.id,
            {"item": item.id, "attempt": attempt, "vm": self.vm_name, "seconds": elapsed, "outputs": outputs, "log": log_url},
        )
        self._event("done" if first else "duplicate", item=item.id, attempt=attempt, seconds=elapsed)
        self.pubsub.ack(self.settings.work_subscription, [ack_id])
        return "done" if first else "duplicate"

    def _finish_failed(self, item, attempt, log_file, ack_id, exit_status, timed_out, elapsed):
        log_url = self.storage.upload_log(item.id, attempt, log_file)
        reason = "timed out" if timed_out else f"exit status {exit_status}"
        if attempt >= self.settings.max_attempts:
            self.storage.write_failed_marker(
                item.id, {"item": item.id, "attempts": attempt, "reason": reason, "log": log_url, "vm": self.vm_name}
            )
            self._event("failed", item=item.id, attempt=attempt, reason=reason, log=log_url)
            self.pubsub.ack(self.settings.work_subscription, [ack_id])
            return "failed"
        data, attributes = tasks.encode_message(item, attempt + 1)
        self.pubsub.publish(self.settings.work_topic, data, attributes)
        self._event("retry", item=item.id, attempt=attempt, reason=reason, log=log_url, seconds=elapsed)
        self.pubsub.ack(self.settings.work_subscription, [ack_id])
        return "retry"

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

    def _event(self, kind, **fields):
        event = {"type": kind, "vm": self.vm_name, "time": time.time(), **fields}
        try:
            self.pubsub.publish_event(self.settings.events_topic, event)
        except Exception as error:  # events are progress news; losing one must not lose work
            log.warning("could not publish %s event: %s", kind, error)


class _LeaseKeeper:
    """Keeps a running item's lease alive and its log uploaded, until stopped."""

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
        extend_every = max(1.0, settings.lease_seconds / 3)
        last_log_upload = time.monotonic()
        while not self.stopped.wait(extend_every):
            try:
                self.worker.pubsub.extend_lease(settings.work_subscription, self.ack_id, settings.lease_seconds)
            except Exception as error:
                log.warning("lease extension for %s failed: %s", self.item.id, error)
            if time.monotonic() - last_log_upload >= LOG_UPLOAD_INTERVAL_SECONDS:
                last_log_upload = time.monotonic()
                try:
                    self.worker.storage.upload_log(self.item.id, self.attempt, self.log_file)
                except Exception as error:
                    log.warning("log upload for %s failed: %s", self.item.id, error)


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
    process.wait()


def hand_back(settings, pubsub, storage, metadata, work_dir, vm_name):
    """The shutdown hook: hand the in-flight item back at once and save its partial log.

    Called on preemption, stop or delete, within GCE's 30 s Spot grace. The
    message is nacked, so it keeps its attempt count: a preemption never uses
    up an attempt. Returns the item id handed back, or None.
    """
    work_dir.stopping.touch()
    record = work_dir.read_inflight()
    if not record:
        return None
    item_id, attempt = record["item"], record["attempt"]
    try:
        pubsub.nack(settings.work_subscription, record["ack_id"])
    except Exception as error:  # the lease expiry brings it back anyway
        log.warning("nack of %s failed (%s); its lease expiry will redeliver it", item_id, error)
    preempted = metadata.preempted()
    pubsub.publish_event(
        settings.events_topic,
        {"type": "preempted" if preempted else "interrupted", "item": item_id, "attempt": attempt, "vm": vm_name, "time": time.time()},
    )
    pgid = record.get("task_pgid")
    if pgid:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    log_file = Path(record["log"])
    if log_file.exists():
        with open(log_file, "a") as stream:
            stream.write(f"\ncflow: {'preempted' if preempted else 'shut down'}; item handed back\n")
        storage.upload_log(item_id, attempt, log_file)
    return item_id


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
    settings, pubsub, storage, metadata, work_dir, vm_name = _vm_context(work_root)
    work_dir.stopping.unlink(missing_ok=True)
    log.info("worker %s on run %s", vm_name, settings.run_id)
    reason = Worker(settings, pubsub, storage, metadata, work_dir, vm_name).run()
    if reason == "idle":
        # A safety net for a controller that is gone: an idle VM stops billing.
        log.info("idle for %.0f s; powering off", settings.idle_poweroff_seconds)
        metadata.power_off()
    return 0


def shutdown_main(work_root=None):
    """shutdown-signal.py: hand the in-flight item back."""
    _configure_logging()
    work_root = Path(work_root or Path(__file__).resolve().parent.parent.parent)
    settings, pubsub, storage, metadata, work_dir, vm_name = _vm_context(work_root)
    item_id = hand_back(settings, pubsub, storage, metadata, work_dir, vm_name)
    log.info("shutdown: %s", f"handed back {item_id}" if item_id else "nothing in flight")
    return 0
