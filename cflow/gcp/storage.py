"""Cloud Storage: the bucket (``Bucket``) and one run's objects in it (``RunStorage``).

Object names come from ``cflow.gcp.layout``, which documents the run's
folder. Done and failed markers are the source of truth for completion: a
scheduler restarted with the run's id reads them back. The run's history for
the report (``cflow.history``: each attempt's span, each VM's life) is kept
here too: spans as custom metadata on the markers and timeline records, so
``list_spans`` reads them all with a few listings.

Every method raises only CFlow's ``CloudError`` classes (``cflow.errors``);
the ones a caller may expect (an object that does not exist, a marker that
is already there) are answers, not errors.
"""

import base64
import dataclasses
import datetime
import hashlib
import json
import logging
import mimetypes
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from google.api_core import exceptions as google_exceptions

from cflow import tasks
from cflow.combine import OutputShape, shapes_from_json, shapes_from_metadata, shapes_metadata
from cflow.config import split_gcs_url
from cflow.errors import CloudError, ConfigError, NotFound, PermissionDenied
from cflow.gcp import layout
from cflow.gcp.errors import translated
from cflow.history import AttemptSpan, span_metadata

log = logging.getLogger(__name__)

# The folders whose objects carry an attempt's span (see cflow.history).
SPAN_FOLDERS = (layout.markers(layout.DONE), layout.ATTEMPTS, layout.TIMELINE)


@dataclasses.dataclass(frozen=True)
class ListedRecord:
    """One object of a run's folder as a listing shows it, without its content."""

    name: str  # relative to the listed folder, e.g. ``000042`` or ``000042/2``
    updated: datetime.datetime
    metadata: dict[str, str]


class Bucket:
    """A bucket as a whole: it exists, the runs in it, the demo's inputs, a TASKS prefix, the workers' wheelhouse.

    Args:
        client: a ``google.cloud.storage.Client``.
        bucket_name: the bucket.
    """

    def __init__(self, client: Any, bucket_name: str) -> None:
        self.client = client
        self.bucket_name = bucket_name
        self.project = getattr(client, "project", None)

    @translated("storage")
    def ensure_exists(self, create_if_missing: bool) -> None:
        """Check the bucket exists; create it when ``create_if_missing`` (local mode).

        Raises:
            ConfigError: the bucket does not exist and may not be created here.
            CloudError: the bucket exists but this account may not use it.
        """
        try:
            self.client.get_bucket(self.bucket_name)
            return
        except google_exceptions.NotFound:
            if not create_if_missing:
                raise ConfigError(
                    f"BUCKET: bucket gs://{self.bucket_name} does not exist; create it "
                    f"(gcloud storage buckets create gs://{self.bucket_name}) or set BUCKET in const.py"
                ) from None
        except google_exceptions.Forbidden as error:
            raise CloudError(
                f"no access to bucket gs://{self.bucket_name} ({error.message}); "
                "grant the controller's account roles/storage.objectAdmin on it"
            ) from None
        try:
            self.client.create_bucket(self.bucket_name)
        except google_exceptions.Conflict:
            pass  # created meanwhile by another run: what we wanted

    @translated("storage")
    def list_object_names(self, prefix: str) -> list[str]:
        """The names of the objects under ``prefix`` (a gs:// TASKS), in the service's order."""
        return [blob.name for blob in self.client.list_blobs(self.bucket_name, prefix=prefix)]

    @translated("storage")
    def list_run_ids(self) -> list[str]:
        """Run ids that have a folder in this bucket, sorted (for ``cflow list``)."""
        iterator = self.client.list_blobs(self.bucket_name, prefix=layout.RUNS_PREFIX, delimiter="/")
        folders: set[str] = set()
        for page in iterator.pages:
            folders.update(page.prefixes)
        return sorted(layout.run_id_of_folder(folder) for folder in folders)

    @translated("storage")
    def stage_demo_inputs(self, objects: Mapping[str, bytes], content_type: str = "text/csv") -> int:
        """Upload the demo's inputs (``{name: bytes}``) under the demo folder, skipping those already there.

        Returns:
            How many were uploaded.
        """
        bucket = self.client.bucket(self.bucket_name)
        present = set(self.list_object_names(layout.DEMO_PREFIX))
        uploaded = 0
        for name, data in objects.items():
            object_name = layout.demo_object(name)
            if object_name not in present:
                bucket.blob(object_name).upload_from_string(data, content_type=content_type)
                uploaded += 1
        return uploaded

    def wheelhouse_url(self, sha256: str) -> str:
        """``gs://BUCKET/cflow/wheelhouse/SHA256.tar``."""
        return f"gs://{self.bucket_name}/{layout.wheelhouse(sha256)}"

    @translated("storage")
    def upload_wheelhouse(self, sha256: str, local_path: Path) -> bool:
        """Upload the workers' wheelhouse (``cflow.wheelhouse``) unless an object of the same bytes is already there.

        The name is the sha256 of the bytes, so an object of that name and
        size whose MD5 (which Cloud Storage keeps) matches is the same file:
        one metadata read, no download. Any other object of that name (a
        broken upload) is replaced.

        Returns:
            True if it uploaded, False if the bucket already had it (or another controller uploaded it meanwhile).
        """
        blob = self.client.bucket(self.bucket_name).get_blob(layout.wheelhouse(sha256))
        size = local_path.stat().st_size
        if blob is not None and blob.size == size and blob.md5_hash in (None, _base64_md5(local_path)):
            return False
        target = self.client.bucket(self.bucket_name).blob(layout.wheelhouse(sha256))
        try:
            target.upload_from_filename(str(local_path), content_type="application/x-tar",
                                        if_generation_match=blob.generation if blob is not None else 0)
        except google_exceptions.PreconditionFailed:
            return False  # another controller wrote it first
        return True


def _base64_md5(path: Path) -> str:
    """The MD5 of a file as Cloud Storage shows it (``md5Hash``: base64)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return base64.b64encode(digest.digest()).decode()


class RunStorage:
    """One run's objects in one bucket.

    Args:
        client: a ``google.cloud.storage.Client``.
        bucket_name: the bucket (must exist: see ``Bucket.ensure_exists``).
        run_id: the run; every object name is under ``layout.run_prefix(run_id)``.
    """

    def __init__(self, client: Any, bucket_name: str, run_id: str) -> None:
        self.client = client
        self.bucket_name = bucket_name
        self.run_id = run_id
        self.project = getattr(client, "project", None)
        self.prefix = layout.run_prefix(run_id)
        self.bucket = client.bucket(bucket_name)

    # -- paths -------------------------------------------------------------

    def url(self, relative: str = "") -> str:
        """``gs://BUCKET/cflow/runs/RUN_ID/RELATIVE``."""
        return layout.run_url(self.bucket_name, self.run_id, relative)

    def log_url(self, item_id: str, attempt: int) -> str:
        return self.url(layout.log(item_id, attempt))

    def _blob(self, relative: str) -> Any:
        return self.bucket.blob(self.prefix + relative)

    def _list(self, relative_prefix: str) -> list[tuple[str, Any]]:
        """``(name relative to the prefix, blob)`` of the run's objects under ``relative_prefix``."""
        prefix = self.prefix + relative_prefix
        return [(blob.name[len(prefix):], blob) for blob in self.client.list_blobs(self.bucket_name, prefix=prefix)]

    def _list_names(self, relative_prefix: str) -> set[str]:
        """The names (relative to the prefix) of the run's objects under ``relative_prefix``.

        Asks for names only: a listing page of full object resources is
        several times the bytes to send and parse (a million done markers).
        """
        prefix = self.prefix + relative_prefix
        blobs = self.client.list_blobs(self.bucket_name, prefix=prefix, fields="items(name),nextPageToken")
        return {blob.name[len(prefix):] for blob in blobs}

    # -- small JSON documents ---------------------------------------------

    def _write_json(self, relative: str, document: object) -> None:
        self._blob(relative).upload_from_string(json.dumps(document, sort_keys=True), content_type="application/json")

    def _read_json(self, relative: str) -> Any:
        """The parsed document, or None if it does not exist."""
        try:
            return json.loads(self._blob(relative).download_as_bytes())
        except google_exceptions.NotFound:
            return None

    @translated("storage")
    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        """Write run.json: last of a run's first objects (after the package and items.jsonl)."""
        self._write_json(layout.MANIFEST, manifest)

    @translated("storage")
    def read_manifest(self) -> dict[str, Any] | None:
        """run.json as a dict, or None if the run (or the bucket) does not exist."""
        return self._read_json(layout.MANIFEST)

    @translated("storage")
    def write_items(self, items: Iterable[tasks.WorkItem]) -> None:
        """Write items.jsonl, one item a line; through a temporary file, so a million items never sit in memory as one text."""
        with tempfile.TemporaryFile() as stream:
            for item in items:
                stream.write(json.dumps(item.to_dict()).encode() + b"\n")
            stream.seek(0)
            self._blob(layout.ITEMS).upload_from_file(stream, content_type="application/x-ndjson")

    @translated("storage")
    def read_items(self) -> tasks.ItemList | None:
        """The run's items in item order, or None if never written.

        Raises:
            MessageError: a line is not an item, or not the one its position says.
        """
        items = tasks.ItemList()
        with tempfile.TemporaryFile() as stream:
            try:
                self._blob(layout.ITEMS).download_to_file(stream)
            except google_exceptions.NotFound:
                return None
            # Twice through the file: the ids' width depends on the count.
            stream.seek(0)
            count = sum(1 for line in stream if line.strip())
            stream.seek(0)
            for index, line in enumerate(line for line in stream if line.strip()):
                item = tasks.WorkItem.from_dict(json.loads(line))
                if item.index != index or item.id != tasks.item_id(index, count):
                    raise tasks.MessageError(f"items.jsonl line {index + 1} holds item {item.id}, not the item at that place")
                items.append(item.args)
        return items

    @translated("storage")
    def mark_published(self, count: int, now: float) -> None:
        """Record that every unfinished item was published (a run killed before this publishes again)."""
        self._write_json(layout.PUBLISHED, {"count": count, "time": now})

    @translated("storage")
    def is_published(self) -> bool:
        return self._read_json(layout.PUBLISHED) is not None

    @translated("storage")
    def read_cancelled(self) -> dict[str, Any] | None:
        """cancelled.json (``{"time": EPOCH_SECONDS}``), or None if the run was never cancelled."""
        return self._read_json(layout.CANCELLED)

    @translated("storage")
    def mark_cancelled(self, now: float) -> dict[str, Any]:
        """Write cancelled.json unless it exists; a second cancel keeps the first time. Returns the record."""
        existing = self.read_cancelled()
        if existing is not None:
            return existing
        record = {"time": now}
        self._write_json(layout.CANCELLED, record)
        return record

    # -- package -----------------------------------------------------------

    def package_url(self) -> str:
        """The package's gs:// URL (what workers download), uploaded or not."""
        return self.url(layout.PACKAGE)

    @translated("storage")
    def upload_package(self, tar_gz_bytes: bytes) -> str:
        """Upload the package; returns its gs:// URL (what workers download)."""
        self._blob(layout.PACKAGE).upload_from_string(tar_gz_bytes, content_type="application/gzip")
        return self.package_url()

    # -- outputs and logs --------------------------------------------------

    @translated("storage")
    def upload_output(self, item_id: str, name: str, local_path: str | Path, offset: int = 0) -> None:
        """Upload an output file, from byte ``offset`` on (after a header kept apart, see ``cflow.combine.OutputShape``).

        Raises ValueError if the item id or name could leave the item's folder (``../``, ``/``, NUL).
        """
        # Ids and names become object names: one that is not CFlow's own could climb out of the run's prefix.
        tasks.validate_item_id(item_id)
        tasks.validate_output_name(name)
        blob = self._blob(layout.output(item_id, name))
        if not offset:
            blob.upload_from_filename(str(local_path))
            return
        size = Path(local_path).stat().st_size - offset
        with open(local_path, "rb") as stream:
            stream.seek(offset)
            # The content type upload_from_filename would have guessed from the name.
            blob.upload_from_file(stream, size=size, content_type=mimetypes.guess_type(str(local_path))[0])

    @translated("storage")
    def list_output_names(self, item_id: str) -> list[str]:
        return sorted(name for name, _ in self._list(layout.outputs_of(item_id)))

    @translated("storage")
    def recorded_output_names(self, item_id: str) -> list[str]:
        """The outputs of the attempt recorded done (its done marker lists them).

        An item that ran twice may have left files of the other attempt under
        outputs/ITEM/; only the recorded attempt's files are its result.
        """
        return self.recorded_outputs(item_id)[0]

    @translated("storage")
    def recorded_outputs(self, item_id: str) -> tuple[list[str], dict[str, OutputShape] | None]:
        """The recorded attempt's output names, and their shapes (None: its worker recorded none), from its done marker."""
        marker = self.read_marker(layout.DONE, item_id) or {}
        outputs = marker.get("outputs")
        names = sorted(outputs) if isinstance(outputs, list) else self.list_output_names(item_id)
        shapes = shapes_from_json(marker.get("output_shapes"))
        return names, shapes if shapes is not None and set(shapes) == set(names) else None

    @translated("storage")
    def done_output_shapes(self) -> dict[str, dict[str, OutputShape] | None]:
        """``{item_id: {name: shape}}`` of every done marker, from one listing (their metadata); None where it has none."""
        return {record.name: shapes_from_metadata(record.metadata) for record in self.list_records(layout.markers(layout.DONE))}

    @translated("storage")
    def read_output(self, item_id: str, name: str) -> bytes:
        return self._blob(layout.output(item_id, name)).download_as_bytes()

    # -- an item's inputs (STAGE_INPUTS: cflow.worker.staging) -------------

    @translated("storage")
    def download_input(self, url: str, local_path: Path) -> int:
        """Download the object ``gs://BUCKET/NAME`` (any bucket the account may read) to ``local_path``.

        Returns:
            The bytes written.
        Raises:
            ValueError: ``url`` is not ``gs://BUCKET/NAME``.
            NotFound: there is no such object (or bucket); nothing is left at ``local_path``.
            PermissionDenied: the account may not read it.
            CloudError: any other refusal.
        """
        bucket, name = split_gcs_url(url)
        if not name:
            raise ValueError(f"not the URL of an object: {url!r}")
        try:
            self.client.bucket(bucket).blob(name).download_to_filename(str(local_path))
        except google_exceptions.NotFound as error:
            local_path.unlink(missing_ok=True)
            raise NotFound(f"{url} does not exist", status=404, reason="notFound", message=error.message, service="storage") from None
        except google_exceptions.Forbidden as error:
            local_path.unlink(missing_ok=True)
            raise PermissionDenied(
                f"this VM's service account may not read {url}; grant it roles/storage.objectViewer on gs://{bucket}",
                status=403, reason="forbidden", message=error.message, service="storage",
            ) from None
        return local_path.stat().st_size

    @translated("storage")
    def upload_log(self, item_id: str, attempt: int, local_path: str | Path) -> str:
        """Upload an attempt's log (replacing a partial one of the same attempt); returns its gs:// URL."""
        tasks.validate_item_id(item_id)
        self._blob(layout.log(item_id, attempt)).upload_from_filename(str(local_path), content_type="text/plain")
        return self.log_url(item_id, attempt)

    @translated("storage")
    def read_log(self, item_id: str, attempt: int) -> str | None:
        """The log's text (undecodable bytes replaced), or None if that attempt has none."""
        try:
            return self._blob(layout.log(item_id, attempt)).download_as_bytes().decode("utf-8", errors="replace")
        except google_exceptions.NotFound:
            return None

    @translated("storage")
    def log_attempts(self, item_id: str) -> list[int]:
        """The attempt numbers that have a log for ``item_id``, ascending."""
        attempts = (layout.attempt_of_log(name) for name, _ in self._list(layout.logs_of(item_id)))
        return sorted(attempt for attempt in attempts if attempt is not None)

    @translated("storage")
    def count_logs(self) -> int:
        """Number of log objects: each attempt (and each preempted one) uploads one."""
        return len(self._list(layout.LOGS))

    @translated("storage")
    def upload_combined(self, name: str, local_path: str | Path) -> str:
        """Upload one combined file; returns its gs:// URL."""
        self.upload_file(layout.combined(name), Path(local_path))
        return self.url(layout.combined(name))

    # -- combining in the bucket (cflow.combine) ------------------------------

    @translated("storage")
    def compose(self, sources: Sequence[str], destination: str) -> None:
        """Join the run's objects ``sources`` (at most 32, in order) into ``destination``, replacing it.

        Its content type is the one its name suggests, as an upload's would be.
        """
        # Imported here: importing this module stays as light as it was (the package loads with the first client).
        from google.cloud.storage.retry import DEFAULT_RETRY

        target = self._blob(destination)
        target.content_type = mimetypes.guess_type(destination)[0] or "application/octet-stream"
        # Joining the same sources again gives the same object, so a retry is safe.
        target.compose([self._blob(source) for source in sources], retry=DEFAULT_RETRY)

    @translated("storage")
    def upload_bytes(self, relative: str, data: bytes) -> None:
        self._blob(relative).upload_from_string(data, content_type=mimetypes.guess_type(relative)[0] or "application/octet-stream")

    @translated("storage")
    def upload_file(self, relative: str, path: Path) -> None:
        self._blob(relative).upload_from_filename(str(path))

    @translated("storage")
    def download_file(self, relative: str, path: Path) -> None:
        self._blob(relative).download_to_filename(str(path))

    @translated("storage")
    def delete_object(self, relative: str) -> None:
        """Delete one of the run's objects; one already gone is fine."""
        from google.cloud.storage.retry import DEFAULT_RETRY

        try:
            self._blob(relative).delete(retry=DEFAULT_RETRY)
        except google_exceptions.NotFound:
            pass

    # -- markers -----------------------------------------------------------

    def _create_once(self, relative: str, document: object, metadata: dict[str, str] | None = None) -> bool:
        """Create the object only if absent, with ``metadata`` as its custom metadata. Returns False if it already existed."""
        blob = self._blob(relative)
        if metadata:
            blob.metadata = metadata
        try:
            blob.upload_from_string(json.dumps(document, sort_keys=True), content_type="application/json", if_generation_match=0)
            return True
        except google_exceptions.PreconditionFailed:
            return False

    @translated("storage")
    def write_done_marker(self, item_id: str, info: Mapping[str, Any]) -> bool:
        """Record the item done. Returns False if another attempt already did.

        The marker's metadata carries what a listing should show without
        opening it: the attempt's span and the outputs' shapes (``output_shapes``), when ``info`` has them.
        """
        metadata = {**(span_metadata(info) or {}), **shapes_metadata(info)}
        return self._create_once(layout.marker(layout.DONE, tasks.validate_item_id(item_id)), info, metadata or None)

    @translated("storage")
    def write_failed_marker(self, item_id: str, info: Mapping[str, Any]) -> bool:
        """Record the item failed for good. Returns False if already recorded."""
        return self._create_once(layout.marker(layout.FAILED, tasks.validate_item_id(item_id)), info)

    @translated("storage")
    def write_attempt_marker(self, item_id: str, attempt: int, info: Mapping[str, Any]) -> bool:
        """Record that failed attempt ``attempt`` was settled (its span as metadata too). Returns False if already recorded."""
        return self._create_once(layout.attempt_marker(tasks.validate_item_id(item_id), attempt), info, span_metadata(info))

    @translated("storage")
    def attempt_recorded(self, item_id: str, attempt: int) -> bool:
        """True once ``write_attempt_marker`` recorded this attempt: a redelivery of it must not run."""
        return bool(self._blob(layout.attempt_marker(item_id, attempt)).exists())

    @translated("storage")
    def is_done(self, item_id: str) -> bool:
        return bool(self._blob(layout.marker(layout.DONE, item_id)).exists())

    @translated("storage")
    def is_finished(self, item_id: str) -> bool:
        """True once the item has a done or a failed marker."""
        return self.is_done(item_id) or self.read_marker(layout.FAILED, item_id) is not None

    @translated("storage")
    def marker_times(self, kind: str) -> dict[str, datetime.datetime]:
        """``{item_id: when its marker was written}`` of one kind (``layout.DONE`` or ``layout.FAILED``)."""
        return {name: blob.updated for name, blob in self._list(layout.markers(kind)) if name}

    @translated("storage")
    def list_done_ids(self) -> set[str]:
        return self._list_names(layout.markers(layout.DONE))

    @translated("storage")
    def list_failed_ids(self) -> set[str]:
        return self._list_names(layout.markers(layout.FAILED))

    @translated("storage")
    def read_marker(self, kind: str, item_id: str) -> dict[str, Any] | None:
        """The marker's JSON (``layout.DONE`` or ``layout.FAILED``), or None if the item has none."""
        return self._read_json(layout.marker(kind, item_id))

    # -- the run's history (for the report) -----------------------------------

    @translated("storage")
    def write_timeline_record(self, span: AttemptSpan) -> None:
        """Record the span of an attempt that leaves no marker of its own (handed back, or a duplicate)."""
        blob = self._blob(layout.timeline_record(tasks.validate_item_id(span.item), span.attempt, span.vm, span.ended))
        blob.metadata = span.to_metadata()
        blob.upload_from_string(json.dumps({"item": span.item, **span.fields()}, sort_keys=True), content_type="application/json")

    @translated("storage")
    def list_records(self, folder: str) -> list[ListedRecord]:
        """The objects under one of the run's folders (e.g. ``layout.markers(layout.DONE)``), with their metadata."""
        return [ListedRecord(name, blob.updated, dict(blob.metadata or {})) for name, blob in self._list(folder) if name]

    @translated("storage")
    def list_spans(self) -> list[AttemptSpan]:
        """Every attempt's span the run's markers and timeline records carry (those without one are skipped)."""
        spans = []
        for folder in SPAN_FOLDERS:
            for record in self.list_records(folder):
                span = AttemptSpan.from_metadata(layout.item_of_record(record.name), record.metadata)
                if span is not None:
                    spans.append(span)
        return spans

    @translated("storage")
    def write_vm_history(self, document: Mapping[str, Any]) -> None:
        """Write vms.json (``cflow.history.VmHistory.to_document``), replacing the last one."""
        self._write_json(layout.VM_HISTORY, document)

    @translated("storage")
    def write_scheduler_account(self, document: Mapping[str, Any]) -> None:
        """Write scheduler.json (VM time and cost, backups, fallback, cost cap), replacing the last one."""
        self._write_json(layout.SCHEDULER_ACCOUNT, document)

    @translated("storage")
    def read_scheduler_account(self) -> dict[str, Any] | None:
        """scheduler.json as a dict, or None if the scheduler has not written one."""
        return self._read_json(layout.SCHEDULER_ACCOUNT)

    # -- lanes (cflow.lanes) -----------------------------------------------------

    @translated("storage")
    def write_lane_marker(self, lane: str, item_id: str, info: Mapping[str, Any]) -> None:
        """Record that ``item_id`` moved to ``lane`` (written again if it is there: the move is the same)."""
        self._write_json(layout.lane_marker(lane, tasks.validate_item_id(item_id)), info)

    @translated("storage")
    def list_lane_ids(self, lane: str) -> set[str]:
        """The items moved to ``lane``."""
        return {name for name, _ in self._list(layout.lane_markers(lane)) if name}

    @translated("storage")
    def read_vm_history(self) -> dict[str, Any] | None:
        """vms.json as a dict, or None if the scheduler has not written one."""
        return self._read_json(layout.VM_HISTORY)
