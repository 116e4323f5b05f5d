"""Operator commands on a run, from what it keeps in Cloud Storage: status, logs, cancel, combine, list.

They work from another terminal while a run goes on and after it ended:
completion is read from the run's done/ and failed/ markers, attempts from its
logs/, VMs from one Compute aggregatedList by the run's label. Nothing here
needs the scheduler's memory, and in local mode nothing starts a stack: the
commands use the one that is running, or say how to start it.

A cancelled run has ``cancelled.json`` (``{"time": EPOCH_SECONDS}``) in its
folder; outputs and logs are kept.
"""

import argparse
import contextlib
import dataclasses
import datetime
import logging
import os
import re
import sys
import time
from pathlib import Path

from cflow.errors import EXIT_INTERRUPTED, EXIT_OK, CflowError, CloudError, StackError

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "const.py"
CANCELLED_FILE = "cancelled.json"
FOLLOW_INTERVAL_SECONDS = 2.0
CANCEL_DEADLINE_SECONDS = 300.0
CANCEL_POLL_SECONDS = 1.0
FAILED_LOG_TAIL_LINES = 5
# A run id ends up in object names and in a VM label value, so it is held to
# the label value rule; that also keeps "../x" from leaving the runs folder.
RUN_ID_RE = re.compile(r"[a-z0-9][-_a-z0-9]{0,62}")
LOG_NAME_RE = re.compile(r"attempt-([0-9]+)\.log")

STATE_FINISHED = "finished"
STATE_CANCELLED = "cancelled"
STATE_IN_PROGRESS = "in progress"


class OperatorError(CflowError):
    """A run, item or log asked for is not there, or an operation could not complete."""

    exit_status = 1


class RunNotFound(OperatorError):
    """The bucket has no run.json for the run id."""


# ---------------------------------------------------------------- the parser


def add_parser(subparsers):
    """Register ``status``, ``logs``, ``cancel``, ``combine`` and ``list`` on ``subparsers``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH",
                        help="settings file naming the bucket (default: ./const.py)")
    where = common.add_mutually_exclusive_group()
    where.add_argument("--local", dest="target", action="store_const", const="local",
                       help="look on the local cloud in a box (overrides TARGET)")
    where.add_argument("--gcp", dest="target", action="store_const", const="gcp",
                       help="look on Google Cloud (overrides TARGET)")
    common.add_argument("--stack-dir", default=None, metavar="DIR",
                        help="running local stack's folder (default: .cflow/local beside const.py); never started here")

    status = subparsers.add_parser(
        "status", parents=[common],
        help="show a run's items, attempts, VMs and time left",
        description="Show a run's progress from Cloud Storage and Compute: items queued, running (estimated "
        "from live VMs), done and failed; attempts and retries; VMs by state; elapsed and estimated time left.",
    )
    status.add_argument("run_id", metavar="RUN_ID", help="the run's id, as `cflow run` printed it (see `cflow list`)")
    status.set_defaults(func=status_command)

    logs = subparsers.add_parser(
        "logs", parents=[common],
        help="print an item's log, or every failed item with the end of its log",
        description="With ITEM: print that item's log (its latest attempt unless --attempt). "
        "Without ITEM: list the run's failed items with their reason, log URL and last lines.",
    )
    logs.add_argument("run_id", metavar="RUN_ID", help="the run's id")
    logs.add_argument("item", metavar="ITEM", nargs="?", help="the item's id, e.g. 000042")
    logs.add_argument("--attempt", type=int, metavar="N", help="print attempt N instead of the latest")
    logs.add_argument("--follow", "-f", action="store_true",
                      help=f"re-read the log every {FOLLOW_INTERVAL_SECONDS:g} s, printing what is new, "
                      "until the item is done or failed (Ctrl-C stops)")
    logs.set_defaults(func=logs_command)

    cancel = subparsers.add_parser(
        "cancel", parents=[common],
        help="stop a run: delete its VMs, topics and subscriptions (outputs and logs are kept)",
        description="Cancel a run: delete its VMs (and wait until they are gone), its Pub/Sub topics and "
        "subscriptions, and mark it cancelled. Outputs and logs stay in Cloud Storage. Cancelling twice is fine.",
    )
    cancel.add_argument("run_id", metavar="RUN_ID", help="the run's id")
    cancel.add_argument("--yes", "-y", action="store_true", help="do not ask; needed when not on a terminal")
    cancel.set_defaults(func=cancel_command)

    combine = subparsers.add_parser(
        "combine", parents=[common],
        help="combine the done items' outputs again, into RESULT_DIR/RUN_ID and the bucket",
        description="Concatenate each output file across the run's done items, in item order, into "
        "RESULT_DIR/RUN_ID/ (RESULT_DIR from const.py), and upload the result to the run's combined/ folder.",
    )
    combine.add_argument("run_id", metavar="RUN_ID", help="the run's id")
    combine.set_defaults(func=combine_command)

    listing = subparsers.add_parser(
        "list", parents=[common],
        help="list the runs in the bucket, newest first",
        description="List the runs kept in the bucket of const.py, newest first, with their item counts and state.",
    )
    listing.set_defaults(func=list_command)


# ---------------------------------------------------------------- clients


@dataclasses.dataclass
class Session:
    """What every operator command needs: the settings and built clients."""

    config: object  # cflow.config.Config
    clients: object  # cflow.gcp.clients.Clients

    @property
    def bucket(self):
        return self.config.bucket

    def run(self, run_id):
        """The ``RunView`` of ``run_id`` in the config's bucket (not yet checked to exist)."""
        return RunView(self.clients.storage, self.bucket, run_id)

    def compute(self):
        from cflow.gcp.compute import Compute

        return Compute(self.clients.compute, self.clients.project)


def open_session(args):
    """Load const.py and build the clients for its target.

    Locally, only a running stack is used: its endpoints are put into
    ``os.environ``, where the Pub/Sub and Storage clients read them.

    Raises:
        ConfigError: const.py is missing or invalid.
        StackError: local target and no stack is running in the stack folder.
    """
    from cflow.config import load_config
    from cflow.gcp.clients import build_clients

    config = load_config(args.config, {"TARGET": args.target} if args.target else None)
    if not config.is_local:
        return Session(config, build_clients("gcp", config.project, config.credential_file))
    from cflow.local.stack import LocalStack

    stack_dir = Path(args.stack_dir) if args.stack_dir else config.base_dir / ".cflow" / "local"
    info = LocalStack(stack_dir).info()
    if info is None:
        raise StackError(
            f"no local stack is running in {stack_dir}; start it with `cflow local up --dir {stack_dir}` "
            "(or pass --stack-dir to the folder of a running one)"
        )
    os.environ.update(info.env())
    return Session(config, build_clients("local", config.project))


# ---------------------------------------------------------------- reading a run


def check_run_id(run_id):
    """Returns ``run_id``; raises CflowError (usage) when it cannot be a run id."""
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id):
        raise CflowError(
            f"{run_id!r} is not a run id (lowercase letters, digits and -, like 0612-1530-ab12); "
            "`cflow list` shows the runs"
        )
    return run_id


def check_item_id(item_id, run_id, item_count):
    """Returns ``item_id`` if it is one of the run's items.

    Raises:
        CflowError: not an item id at all (e.g. ``../x``), exit 2.
        OperatorError: a well-formed id the run does not have, exit 1.
    """
    from cflow.tasks import item_id as make_item_id
    from cflow.tasks import validate_item_id

    try:
        validate_item_id(item_id)
    except ValueError as error:
        raise CflowError(f"{error} (item ids look like 000042; `cflow status {run_id}` shows the count)") from None
    if int(item_id) >= item_count or make_item_id(int(item_id), item_count) != item_id:
        last = make_item_id(max(item_count - 1, 0), item_count)
        raise OperatorError(
            f"run {run_id} has no item {item_id}; its items are {make_item_id(0, item_count)} to {last}"
        )
    return item_id


class RunView:
    """One run's record in Cloud Storage, read (and marked cancelled) by the operator commands.

    Args:
        storage_client: a ``google.cloud.storage.Client``.
        bucket_name: the bucket holding the run.
        run_id: the run; checked with ``check_run_id``.
    Raises:
        CflowError: ``run_id`` is not a run id.
    """

    def __init__(self, storage_client, bucket_name, run_id):
        from cflow.gcp.storage import RunStorage

        self.client = storage_client
        self.bucket_name = bucket_name
        self.run_id = check_run_id(run_id)
        self.storage = RunStorage(storage_client, bucket_name, run_id)

    def manifest(self):
        """Returns run.json as a dict.

        Raises:
            RunNotFound: the bucket (or the run in it) does not exist.
            CloudError: no access to the bucket.
        """
        with storage_errors(self.bucket_name):
            manifest = self.storage.read_manifest()
        if manifest is None:
            raise RunNotFound(f"run {self.run_id} not found in gs://{self.bucket_name}; `cflow list` shows the runs there")
        return manifest

    def _list(self, relative_prefix):
        from google.api_core import exceptions as google_exceptions

        prefix = self.storage.prefix + relative_prefix
        with storage_errors(self.bucket_name):
            try:
                return [(blob.name[len(prefix):], blob) for blob in self.client.list_blobs(self.bucket_name, prefix=prefix)]
            except google_exceptions.NotFound:
                return []

    def marker_times(self, folder):
        """``{item_id: time the marker was written (datetime)}`` of ``folder`` ("done" or "failed")."""
        return {name: blob.updated for name, blob in self._list(f"{folder}/") if name}

    def count_logs(self):
        """Number of log objects: each attempt (and each preempted one) uploads one."""
        return len(self._list("logs/"))

    def log_attempts(self, item_id):
        """The attempt numbers that have a log for ``item_id``, ascending."""
        attempts = []
        for name, _ in self._list(f"logs/{item_id}/"):
            match = LOG_NAME_RE.fullmatch(name)
            if match:
                attempts.append(int(match.group(1)))
        return sorted(attempts)

    def read_log(self, item_id, attempt):
        """The log's text (undecodable bytes replaced), or None if that attempt has none."""
        from google.api_core import exceptions as google_exceptions

        # Not RunStorage.read_log: it passes download_as_text an `errors`
        # argument google-cloud-storage does not take.
        blob = self.storage.bucket.blob(self.storage.prefix + self.storage.log_path(item_id, attempt))
        with storage_errors(self.bucket_name):
            try:
                return blob.download_as_bytes().decode("utf-8", errors="replace")
            except google_exceptions.NotFound:
                return None

    def is_finished(self, item_id):
        with storage_errors(self.bucket_name):
            return self.storage.is_done(item_id) or self.storage.read_marker("failed", item_id) is not None

    def read_marker(self, folder, item_id):
        with storage_errors(self.bucket_name):
            return self.storage.read_marker(folder, item_id)

    def cancelled(self):
        """cancelled.json as a dict, or None if the run was never cancelled."""
        with storage_errors(self.bucket_name):
            return self.storage.read_json(CANCELLED_FILE)

    def mark_cancelled(self, now):
        """Write cancelled.json unless it exists; a second cancel keeps the first time. Returns the record."""
        existing = self.cancelled()
        if existing is not None:
            return existing
        record = {"time": now}
        with storage_errors(self.bucket_name):
            self.storage.write_json(CANCELLED_FILE, record)
        return record


@contextlib.contextmanager
def storage_errors(bucket_name):
    """Turn Cloud Storage refusals and an unreachable endpoint into one-line CloudErrors."""
    import requests
    from google.api_core import exceptions as google_exceptions

    try:
        yield
    except google_exceptions.Forbidden as error:
        raise CloudError(
            f"no access to bucket gs://{bucket_name} ({error.message}); "
            "grant this account roles/storage.objectAdmin on it"
        ) from None
    except requests.exceptions.ConnectionError:
        raise CloudError(
            f"cannot reach Cloud Storage for gs://{bucket_name}; check the network (locally: `cflow local status`)"
        ) from None


# ---------------------------------------------------------------- status


@dataclasses.dataclass(frozen=True)
class RunStatus:
    """A run's progress as ``cflow status`` shows it.

    ``running`` is an estimate: the live VMs, at most the items left, since
    which item a VM holds is only known to the scheduler.
    """

    run_id: str
    bucket: str
    state: str
    total: int
    done: int
    failed: int
    running: int
    attempts: int
    vms: dict  # status -> count
    created: float | None
    elapsed: float | None  # seconds since created, or until the run ended
    cancelled_at: float | None = None

    @property
    def left(self):
        return max(self.total - self.done - self.failed, 0)

    @property
    def queued(self):
        return max(self.left - self.running, 0)

    @property
    def retries(self):
        return max(self.attempts - self.done - self.failed, 0)

    @property
    def seconds_left(self):
        """elapsed / done * left while the run goes on and something is done; else None."""
        if self.state != STATE_IN_PROGRESS or not self.done or self.elapsed is None:
            return None
        return self.elapsed / self.done * self.left


def read_status(view, compute, now):
    """Build a run's ``RunStatus``.

    Args:
        view: the run's ``RunView``.
        compute: ``cflow.gcp.compute.Compute`` of the run's project.
        now: wall-clock seconds (``time.time()``).
    Raises:
        RunNotFound, CloudError.
    """
    from cflow.scheduler import LIVE_STATES

    manifest = view.manifest()
    done_times = view.marker_times("done")
    failed_times = {item: at for item, at in view.marker_times("failed").items() if item not in done_times}
    total = int(manifest.get("item_count", 0))
    vms = {}
    for vm in list_vms(compute, view.run_id):
        vms[vm.status] = vms.get(vm.status, 0) + 1
    live = sum(count for status, count in vms.items() if status in LIVE_STATES)
    cancelled = view.cancelled()
    finished = len(done_times) + len(failed_times) >= total
    state = STATE_FINISHED if finished else STATE_CANCELLED if cancelled else STATE_IN_PROGRESS
    created = manifest.get("created")
    ended = None
    if finished and (done_times or failed_times):
        ended = max([*done_times.values(), *failed_times.values()]).timestamp()
    elif state == STATE_CANCELLED:
        ended = cancelled.get("time")
    elapsed = None
    if created is not None:
        elapsed = max((ended if ended is not None else now) - created, 0.0)
    left = max(total - len(done_times) - len(failed_times), 0)
    return RunStatus(
        run_id=view.run_id,
        bucket=view.bucket_name,
        state=state,
        total=total,
        done=len(done_times),
        failed=len(failed_times),
        running=min(live, left) if state == STATE_IN_PROGRESS else 0,
        attempts=view.count_logs(),
        vms=vms,
        created=created,
        elapsed=elapsed,
        cancelled_at=cancelled.get("time") if cancelled else None,
    )


def list_vms(compute, run_id):
    """The run's VMs; a Compute refusal becomes a CloudError."""
    from googleapiclient.errors import HttpError

    from cflow.gcp.compute import error_message

    try:
        return compute.list_run_vms(run_id)
    except HttpError as error:
        raise CloudError(f"listing the VMs of run {run_id} failed: {error_message(error)}") from None


def format_duration(seconds):
    """``42 s``, ``3 min 05 s``, ``2 h 03 min``: short and readable."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_time(epoch_seconds):
    """Local time, to the second."""
    return datetime.datetime.fromtimestamp(epoch_seconds).strftime("%Y-%m-%d %H:%M:%S")


def _aligned(rows):
    width = max(len(label) for label, _ in rows) + 1
    return [f"{label + ':':<{width}} {value}" for label, value in rows]


def status_lines(status):
    """The lines ``cflow status`` prints for ``status``."""
    state = status.state
    if state == STATE_CANCELLED and status.cancelled_at:
        state = f"cancelled at {format_time(status.cancelled_at)}"
    rows = [
        ("run", f"{status.run_id} (gs://{status.bucket}/cflow/runs/{status.run_id}/)"),
        ("state", state),
        ("items", str(status.total)),
        ("  queued", str(status.queued)),
        ("  running", f"{status.running} (estimate: live VMs, at most the items left)"),
        ("  done", str(status.done)),
        ("  failed", str(status.failed) + (f" (`cflow logs {status.run_id}` shows them)" if status.failed else "")),
        ("attempts", f"{status.attempts} ({status.retries} retries)"),
        ("VMs", ", ".join(f"{count} {name}" for name, count in sorted(status.vms.items())) or "none"),
    ]
    if status.created is not None:
        rows.append(("created", format_time(status.created)))
    if status.elapsed is not None:
        rows.append(("elapsed" if status.state == STATE_IN_PROGRESS else "took", format_duration(status.elapsed)))
    if status.seconds_left is not None:
        rows.append(("time left", f"~{format_duration(status.seconds_left)} (estimate)"))
    return _aligned(rows)


def status_command(args, out=None, now=time.time):
    out = out or sys.stdout
    session = open_session(args)
    status = read_status(session.run(args.run_id), session.compute(), now())
    print("\n".join(status_lines(status)), file=out, flush=True)
    return EXIT_OK


# ---------------------------------------------------------------- logs


def logs_command(args, out=None, err=None, sleep=time.sleep):
    out = out or sys.stdout
    err = err or sys.stderr
    if args.item is None and (args.attempt is not None or args.follow):
        raise CflowError(f"--attempt and --follow need an ITEM: `cflow logs {args.run_id} ITEM ...`")
    if args.attempt is not None and args.attempt < 1:
        raise CflowError(f"--attempt {args.attempt}: attempts are numbered from 1")
    session = open_session(args)
    view = session.run(args.run_id)
    manifest = view.manifest()
    if args.item is None:
        print("\n".join(failed_items_lines(view, manifest)), file=out, flush=True)
        return EXIT_OK
    item_id = check_item_id(args.item, view.run_id, int(manifest.get("item_count", 0)))
    if args.follow:
        return LogFollower(view, item_id, out, err, sleep=sleep, attempt=args.attempt).run()
    attempts = view.log_attempts(item_id)
    attempt = args.attempt if args.attempt is not None else (attempts[-1] if attempts else None)
    text = view.read_log(item_id, attempt) if attempt is not None else None
    if text is None:
        if attempt is None:
            raise OperatorError(
                f"item {item_id} of run {view.run_id} has no log yet (no attempt has ended); "
                f"`cflow logs {view.run_id} {item_id} --follow` waits for it"
            )
        have = ", ".join(map(str, attempts)) or "none"
        raise OperatorError(f"item {item_id} of run {view.run_id} has no log for attempt {attempt}; attempts with a log: {have}")
    logged = ", ".join(map(str, attempts))
    print(f"item {item_id}, attempt {attempt} (attempts logged: {logged}): "
          f"{view.storage.url(view.storage.log_path(item_id, attempt))}", file=err, flush=True)
    out.write(text)
    if text and not text.endswith("\n") and hasattr(out, "isatty") and out.isatty():
        out.write("\n")  # so the shell prompt does not land on the log's last line
    out.flush()
    return EXIT_OK


def _attempt_of_log_url(url):
    match = LOG_NAME_RE.search(url or "")
    return int(match.group(1)) if match else None


def failed_items_lines(view, manifest):
    """For each failed item: its reason, attempts, log URL and the last lines of that log."""
    done = set(view.marker_times("done"))
    failed = sorted(item for item in view.marker_times("failed") if item not in done)
    total = int(manifest.get("item_count", 0))
    if not failed:
        return [f"run {view.run_id}: no failed items ({len(done)} done of {total})"]
    lines = [f"run {view.run_id}: {len(failed)} failed item(s) of {total}"]
    for item_id in failed:
        marker = view.read_marker("failed", item_id) or {}
        attempt = _attempt_of_log_url(marker.get("log"))
        if attempt is None:
            attempts = view.log_attempts(item_id)
            attempt = attempts[-1] if attempts else None
        attempts_text = f" after {marker['attempts']} attempt(s)" if marker.get("attempts") else ""
        lines.append("")
        lines.append(f"item {item_id}: {marker.get('reason', 'unknown reason')}{attempts_text}")
        text = view.read_log(item_id, attempt) if attempt is not None else None
        if text is None:
            lines.append("  log: none was uploaded")
            continue
        lines.append(f"  log: {view.storage.url(view.storage.log_path(item_id, attempt))}")
        tail = text.rstrip("\n").splitlines()[-FAILED_LOG_TAIL_LINES:]
        lines.extend(f"  | {line}" for line in tail)
    return lines


class LogFollower:
    """Prints an item's log as it grows, until the item is done or failed (or the run is cancelled).

    Each pass checks for the end first and then reads the log, so the pass
    that sees the marker still prints the final log (workers upload the log
    before writing the marker). Without a pinned attempt it follows the
    latest one, announcing each new attempt.

    Args:
        view: the run's ``RunView``.
        item_id: a checked item id.
        out: where the log text goes; err: where notes go.
        sleep: ``sleep(seconds)``, called between passes.
        interval: seconds between passes.
        attempt: follow only this attempt; None follows the latest.
    """

    def __init__(self, view, item_id, out, err, sleep=time.sleep, interval=FOLLOW_INTERVAL_SECONDS, attempt=None):
        self.view = view
        self.item_id = item_id
        self.out = out
        self.err = err
        self.sleep = sleep
        self.interval = interval
        self.pinned_attempt = attempt
        self.attempt = None
        self.shown = ""

    def run(self):
        """Follow until the end. Returns EXIT_OK, or EXIT_INTERRUPTED on Ctrl-C."""
        try:
            while True:
                ended = self.view.is_finished(self.item_id)
                cancelled = not ended and self.view.cancelled() is not None
                self.show_new()
                if ended or cancelled:
                    how = "finished" if ended else "its run was cancelled"
                    print(f"item {self.item_id}: {how}; stopped following", file=self.err, flush=True)
                    return EXIT_OK
                self.sleep(self.interval)
        except KeyboardInterrupt:
            self.out.flush()
            return EXIT_INTERRUPTED

    def show_new(self):
        """Print what the log gained since the last pass."""
        if self.pinned_attempt is not None:
            attempt = self.pinned_attempt
        else:
            attempts = self.view.log_attempts(self.item_id)
            attempt = attempts[-1] if attempts else None
        if attempt is None:
            return
        if attempt != self.attempt:
            self.attempt, self.shown = attempt, ""
            print(f"--- item {self.item_id}, attempt {attempt} ---", file=self.err, flush=True)
        text = self.view.read_log(self.item_id, attempt)
        if text is None:
            return
        if not text.startswith(self.shown):
            # A preempted attempt's partial log is replaced when the same attempt runs again.
            print(f"--- item {self.item_id}, attempt {attempt}: log replaced, from the start ---", file=self.err, flush=True)
            self.shown = ""
        new = text[len(self.shown):]
        if new:
            self.out.write(new)
            self.out.flush()
        self.shown = text


# ---------------------------------------------------------------- cancel


def confirm(question, stdin, out):
    """Ask ``question`` on a terminal. Returns True for y/yes.

    Raises:
        CflowError (usage): ``stdin`` is not a terminal, so nobody can answer.
    """
    if not (hasattr(stdin, "isatty") and stdin.isatty()):
        raise CflowError("not asking without a terminal; pass --yes to confirm")
    out.write(question + " [y/N] ")
    out.flush()
    answer = stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def delete_vms_until_gone(compute, run_id, deadline_seconds=CANCEL_DEADLINE_SECONDS,
                          poll_seconds=CANCEL_POLL_SECONDS, clock=time.monotonic, sleep=time.sleep):
    """``Compute.delete_run_vms``, with a Compute refusal as one line."""
    from googleapiclient.errors import HttpError

    from cflow.gcp.compute import error_message

    try:
        return compute.delete_run_vms(run_id, deadline_seconds, poll_seconds, clock=clock, sleep=sleep)
    except HttpError as error:
        raise CloudError(f"deleting the VMs of run {run_id} failed: {error_message(error)}") from None


def cancel_run(session, view, manifest, now, deadline_seconds=CANCEL_DEADLINE_SECONDS, sleep=time.sleep):
    """Mark the run cancelled, delete its topics and subscriptions, then its VMs.

    Topics go before VMs so a scheduler still running fails on its next step
    instead of creating workers behind our back; the mark goes first so a
    cancel cut short still shows as cancelled and running it again finishes it.

    Returns:
        The number of VMs that were listed when the deletion started.
    Raises:
        OperatorError: VMs are still listed at the deadline.
    """
    from cflow.gcp.pubsub import PubSub, RunTopics

    view.mark_cancelled(now)
    if manifest.get("topics"):
        PubSub(session.clients.publisher, session.clients.subscriber).delete_run_topics(
            RunTopics.from_dict(manifest["topics"])
        )
    compute = session.compute()
    count = len(list_vms(compute, view.run_id))
    left = delete_vms_until_gone(compute, view.run_id, deadline_seconds, sleep=sleep)
    if left:
        raise OperatorError(
            f"run {view.run_id}: VMs still listed after {deadline_seconds:.0f} s: {', '.join(left)}; "
            f"run `cflow cancel {view.run_id} --yes` again"
        )
    return count


def cancel_command(args, out=None, stdin=None, now=time.time, sleep=time.sleep):
    out = out or sys.stdout
    stdin = stdin or sys.stdin
    session = open_session(args)
    view = session.run(args.run_id)
    manifest = view.manifest()
    if not args.yes:
        vm_count = len(list_vms(session.compute(), view.run_id))
        question = (f"cancel run {view.run_id}: delete {vm_count} VMs, its topics and subscriptions "
                    "(outputs and logs are kept)?")
        try:
            agreed = confirm(question, stdin, out)
        except CflowError:
            raise CflowError(f"cancel asks for confirmation, and there is no terminal; "
                             f"pass --yes: `cflow cancel {view.run_id} --yes`") from None
        if not agreed:
            print(f"run {view.run_id} not cancelled", file=out, flush=True)
            return 1
    deleted = cancel_run(session, view, manifest, now(), sleep=sleep)
    print(f"cancelled run {view.run_id}: deleted {deleted} VM(s) and its topics and subscriptions; "
          f"outputs and logs are kept in {view.storage.url('')}", file=out, flush=True)
    return EXIT_OK


# ---------------------------------------------------------------- combine


def combine_run(view, result_dir):
    """Concatenate the done items' outputs (items.jsonl order) into ``result_dir/RUN_ID`` and upload them.

    Returns:
        (``{name: local Path}``, number of done items, ``{name: gs:// URL}``).
    Raises:
        RunNotFound; OperatorError when no item is done or an output name is unsafe.
    """
    from cflow.combine import combine_concat

    view.manifest()
    with storage_errors(view.bucket_name):
        items = view.storage.read_items() or []
    done = set(view.marker_times("done"))
    done_in_order = [item["id"] for item in items if item["id"] in done]
    if not done_in_order:
        raise OperatorError(f"run {view.run_id} has no done items yet; nothing to combine (`cflow status {view.run_id}`)")
    dest = Path(result_dir) / view.run_id
    try:
        with storage_errors(view.bucket_name):
            combined = combine_concat(done_in_order, view.storage.recorded_output_names, view.storage.read_output, dest)
    except ValueError as error:
        raise OperatorError(f"run {view.run_id}: {error}; rename that output in the bucket or drop it") from None
    urls = {}
    with storage_errors(view.bucket_name):
        for name, path in combined.items():
            urls[name] = view.storage.upload_combined(name, path)
    return combined, len(done_in_order), urls


def combine_command(args, out=None):
    out = out or sys.stdout
    session = open_session(args)
    view = session.run(args.run_id)
    combined, done_count, urls = combine_run(view, session.config.result_dir)
    lines = [f"run {view.run_id}: combined {len(combined)} file(s) from {done_count} done item(s)"]
    if combined:
        width = max(len(str(path)) for path in combined.values())
        lines.extend(f"  {path!s:<{width}}  {urls[name]}" for name, path in combined.items())
    else:
        lines.append("  the done items have no output files")
    print("\n".join(lines), file=out, flush=True)
    return EXIT_OK


# ---------------------------------------------------------------- list


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """One line of ``cflow list``."""

    run_id: str
    created: float | None
    items: int | None
    done: int
    failed: int
    state: str


def list_runs(storage_client, bucket_name):
    """Every run in the bucket, newest first (runs without run.json last).

    Returns:
        A list of ``RunSummary``; [] when the bucket does not exist.
    """
    from google.api_core import exceptions as google_exceptions

    from cflow.gcp.storage import RunStorage

    with storage_errors(bucket_name):
        try:
            # list_run_ids does not depend on the run the RunStorage is for.
            run_ids = RunStorage(storage_client, bucket_name, "").list_run_ids()
        except google_exceptions.NotFound:
            return []
    summaries = []
    for run_id in run_ids:
        if not RUN_ID_RE.fullmatch(run_id):
            log.debug("skipping %r: not a run id", run_id)
            continue
        view = RunView(storage_client, bucket_name, run_id)
        with storage_errors(bucket_name):
            manifest = view.storage.read_manifest()
        done = set(view.marker_times("done"))
        failed = set(view.marker_times("failed")) - done
        if manifest is None:
            summaries.append(RunSummary(run_id, None, None, len(done), len(failed), "no run.json"))
            continue
        items = int(manifest.get("item_count", 0))
        if len(done) + len(failed) >= items:
            state = STATE_FINISHED
        elif view.cancelled() is not None:
            state = STATE_CANCELLED
        else:
            state = STATE_IN_PROGRESS
        summaries.append(RunSummary(run_id, manifest.get("created"), items, len(done), len(failed), state))
    summaries.sort(key=lambda summary: (summary.created is not None, summary.created or 0, summary.run_id), reverse=True)
    return summaries


def list_lines(summaries, bucket_name):
    """The aligned table ``cflow list`` prints."""
    if not summaries:
        return [f"no runs in gs://{bucket_name}"]
    header = ("RUN ID", "CREATED", "ITEMS", "DONE", "FAILED", "STATE")
    rows = [
        (s.run_id, format_time(s.created) if s.created is not None else "-", "-" if s.items is None else str(s.items),
         str(s.done), str(s.failed), s.state)
        for s in summaries
    ]
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]
    numeric = {2, 3, 4}

    def line(row):
        cells = [cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        return "  ".join(cells).rstrip()

    return [line(header), *(line(row) for row in rows)]


def list_command(args, out=None):
    out = out or sys.stdout
    session = open_session(args)
    summaries = list_runs(session.clients.storage, session.bucket)
    print("\n".join(list_lines(summaries, session.bucket)), file=out, flush=True)
    return EXIT_OK
