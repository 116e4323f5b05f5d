"""The run view: one run's record read back from Cloud Storage for the operator commands.

Also what the commands check before they read: that a run id and an item id
are ones CFlow makes, and the errors they end with (``OperatorError``).
Completion comes from the run's done/ and failed/ markers, attempts from its
logs/, VMs from one Compute list by the run's label; nothing needs the
scheduler's memory. The run's history for its report (each attempt's span,
each VM's life: ``cflow.history``) is read here too, and where an item's log
can be opened: locally a file on this machine, on GCP its gs:// URL.
"""

import contextlib
import dataclasses
import datetime
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cflow.errors import CflowError, CloudError, NotFound, PermissionDenied, ServiceUnreachable
from cflow.gcp import layout
from cflow.history import AttemptSpan, VmRecord, vm_records_from_document

if TYPE_CHECKING:
    from cflow.gcp.compute import Compute, Vm
    from cflow.gcp.storage import ListedRecord, RunStorage
    from cflow.tasks import WorkItem

T = TypeVar("T")
# An object's name in the bucket -> where its bytes lie on this machine (the local stack's files), if known.
LocalFiles = Callable[[str], Path | None]

# A run id ends up in object names and in a VM label value, so it is held to
# the label value rule; that also keeps "../x" from leaving the runs folder.
RUN_ID_RE = re.compile(r"[a-z0-9][-_a-z0-9]{0,62}")


@dataclasses.dataclass(frozen=True)
class FailedItem:
    """An item that failed for good, as its failed marker and its logs tell it.

    Attributes:
        item_id: the item's id.
        label: its id and shortened fields (``cflow.tasks.item_label``).
        fields: its fields (the task's arguments).
        reason: why its last attempt failed ("exit status 7", "timed out").
        attempts: how many attempts it had, if the marker says.
        log_attempt: the attempt whose log is shown (the last one with a log), or None.
        log: where that log can be read (``RunView.log_location``), or None if none was uploaded.
    """

    item_id: str
    label: str
    fields: tuple[str, ...]
    reason: str
    attempts: int | None
    log_attempt: int | None
    log: str | None


class OperatorError(CflowError):
    """A run, item or log asked for is not there, or an operation could not complete."""

    exit_status = 1


class RunNotFound(OperatorError):
    """The bucket has no run.json for the run id."""


def check_run_id(run_id: object) -> str:
    """Returns ``run_id``; raises CflowError (usage) when it cannot be a run id."""
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id):
        raise CflowError(
            f"{run_id!r} is not a run id (lowercase letters, digits and -, like 0612-1530-ab12); "
            "`cflow list` shows the runs"
        )
    return run_id


def check_item_id(item_id: str, run_id: str, item_count: int) -> str:
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


@contextlib.contextmanager
def storage_errors(bucket_name: str) -> Iterator[None]:
    """Cloud Storage refusing this account, or not answering, as one line naming the bucket."""
    try:
        yield
    except PermissionDenied as error:
        if error.service != "storage":
            raise
        raise CloudError(
            f"no access to bucket gs://{bucket_name} ({error.message}); "
            "grant this account roles/storage.objectAdmin on it"
        ) from None
    except ServiceUnreachable as error:
        if error.service != "storage":
            raise
        raise CloudError(
            f"cannot reach Cloud Storage for gs://{bucket_name}; check the network (locally: `cflow local status`)"
        ) from None


def list_vms(compute: "Compute", run_id: str) -> "list[Vm]":
    """The run's VMs; a Compute refusal becomes one line naming the run."""
    try:
        return compute.list_run_vms(run_id)
    except CloudError as error:
        raise CloudError(f"listing the VMs of run {run_id} failed: {error.message}") from None


class RunView:
    """One run's record in Cloud Storage, as the operator commands read it.

    Every read turns Cloud Storage refusing access or not answering into one
    line naming the bucket; listings of a bucket that is gone are empty.

    Args:
        storage: the run's ``RunStorage`` (its run id checked with ``check_run_id``).
        local_files: locally, where an object's bytes lie on this machine
            (``cflow.local.stored_runs.object_path``); None on GCP.
    """

    def __init__(self, storage: "RunStorage", local_files: LocalFiles | None = None) -> None:
        self.storage = storage
        self.run_id = storage.run_id
        self.bucket_name = storage.bucket_name
        self.local_files = local_files

    def _read(self, read: Callable[[], T]) -> T:
        with storage_errors(self.bucket_name):
            return read()

    def _listing(self, read: Callable[[], T], empty: T) -> T:
        with storage_errors(self.bucket_name):
            try:
                return read()
            except NotFound:
                return empty

    def manifest(self) -> dict[str, Any]:
        """Returns run.json as a dict.

        Raises:
            RunNotFound: the bucket (or the run in it) does not exist.
            CloudError: no access to the bucket.
        """
        manifest = self._read(self.storage.read_manifest)
        if manifest is None:
            raise RunNotFound(f"run {self.run_id} not found in gs://{self.bucket_name}; `cflow list` shows the runs there")
        return manifest

    def items(self) -> list[str]:
        """The run's item ids in item order (from items.jsonl)."""
        return [item.id for item in self.work_items()]

    def work_items(self) -> "Sequence[WorkItem]":
        """The run's items with their fields, in item order (from items.jsonl, held compactly; empty if it has none)."""
        return self._read(self.storage.read_items) or []

    def marker_times(self, kind: str) -> dict[str, datetime.datetime]:
        """``{item_id: time the marker was written}`` of ``kind`` (``layout.DONE`` or ``layout.FAILED``)."""
        return self._listing(lambda: self.storage.marker_times(kind), {})

    def done_and_failed(self) -> tuple[dict[str, datetime.datetime], dict[str, datetime.datetime]]:
        """The done and the failed markers' times; an item done by another attempt is not failed."""
        done = self.marker_times(layout.DONE)
        failed = {item: at for item, at in self.marker_times(layout.FAILED).items() if item not in done}
        return done, failed

    def count_logs(self) -> int:
        """Number of log objects: each attempt (and each preempted one) uploads one."""
        return self._listing(self.storage.count_logs, 0)

    def log_attempts(self, item_id: str) -> list[int]:
        """The attempt numbers that have a log for ``item_id``, ascending."""
        return self._listing(lambda: self.storage.log_attempts(item_id), [])

    def read_log(self, item_id: str, attempt: int) -> str | None:
        """The log's text (undecodable bytes replaced), or None if that attempt has none."""
        return self._read(lambda: self.storage.read_log(item_id, attempt))

    def log_url(self, item_id: str, attempt: int) -> str:
        return self.storage.log_url(item_id, attempt)

    def log_file(self, item_id: str, attempt: int) -> Path | None:
        """Locally, the file on this machine that holds the log, if it is there; None on GCP."""
        if self.local_files is None:
            return None
        path = self.local_files(self.storage.prefix + layout.log(item_id, attempt))
        return path if path is not None and path.is_file() else None

    def log_location(self, item_id: str, attempt: int) -> str:
        """Where the user can read a log: locally its file (or the command that prints it), on GCP its gs:// URL."""
        path = self.log_file(item_id, attempt)
        if path is not None:
            return str(path)
        if self.local_files is not None:
            return f"`cflow logs {self.run_id} {item_id} --attempt {attempt}`"
        return self.log_url(item_id, attempt)

    def is_finished(self, item_id: str) -> bool:
        return self._read(lambda: self.storage.is_finished(item_id))

    def read_marker(self, kind: str, item_id: str) -> dict[str, Any] | None:
        return self._read(lambda: self.storage.read_marker(kind, item_id))

    def failed_item(self, item_id: str, fields: tuple[str, ...] = ()) -> FailedItem:
        """What the failed marker of ``item_id`` says, and where its last log is (one or two reads)."""
        from cflow.tasks import item_label

        marker = self.read_marker(layout.FAILED, item_id) or {}
        attempt = layout.attempt_of_log(marker.get("log"))
        if attempt is None:
            attempts = self.log_attempts(item_id)
            attempt = attempts[-1] if attempts else None
        count = marker.get("attempts")
        return FailedItem(
            item_id=item_id,
            label=item_label(item_id, fields),
            fields=fields,
            reason=str(marker.get("reason") or "unknown reason"),
            attempts=count if isinstance(count, int) else None,
            log_attempt=attempt,
            log=self.log_location(item_id, attempt) if attempt is not None else None,
        )

    def cancelled(self) -> dict[str, Any] | None:
        """cancelled.json as a dict, or None if the run was never cancelled."""
        return self._read(self.storage.read_cancelled)

    # -- the run's history, for its report ------------------------------------

    def records(self, folder: str) -> "list[ListedRecord]":
        """The objects under one of the run's folders, with their times and metadata (a gone bucket: [])."""
        return self._listing(lambda: self.storage.list_records(folder), [])

    def spans(self) -> list[AttemptSpan]:
        """Every attempt span the run's markers and timeline records carry."""
        return self._listing(self.storage.list_spans, [])

    def lane_items(self, lane: str) -> set[str]:
        """The items moved to ``lane`` (``cflow.lanes``; a gone bucket: none)."""
        return self._listing(lambda: self.storage.list_lane_ids(lane), set())

    def scheduler_account(self) -> dict[str, Any]:
        """The scheduler's account (scheduler.json: VM time and cost, backups, fallback, cost cap); {} before its first write."""
        return self._read(self.storage.read_scheduler_account) or {}

    def vm_records(self) -> list[VmRecord]:
        """The run's VMs as its scheduler last wrote them (vms.json); [] before the first write."""
        return vm_records_from_document(self._read(self.storage.read_vm_history))
