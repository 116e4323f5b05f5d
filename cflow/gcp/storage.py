"""Cloud Storage: a run's package, outputs, logs, markers and combined results.

Everything of a run lives under ``gs://BUCKET/cflow/runs/RUN_ID/``:

    run.json               the run's settings and item count (written first)
    items.jsonl            the work items, one JSON object a line (for resume)
    package/package.tar.gz what workers download at boot
    outputs/ITEM/NAME      a task's output files
    logs/ITEM/attempt-N.log a task's stdout+stderr, one per attempt
    done/ITEM              done marker, created once (ifGenerationMatch=0)
    failed/ITEM            failed marker, created once
    attempts/ITEM/N        attempt N failed and was settled (successor queued), created once
    combined/NAME          the combined result

Done and failed markers are the source of truth for completion: a scheduler
restarted with the run's id reads them back.
"""

import json
import logging

from google.api_core import exceptions as google_exceptions

from cflow import tasks
from cflow.errors import CloudError, ConfigError

log = logging.getLogger(__name__)

RUNS_PREFIX = "cflow/runs/"


def _check_item_id(item_id):
    # Ids name objects: one that is not CFlow's own could climb out of the run's prefix.
    return tasks.validate_item_id(item_id)


def run_prefix(run_id):
    return f"{RUNS_PREFIX}{run_id}/"


class RunStorage:
    """One run's objects in one bucket.

    Args:
        client: a ``google.cloud.storage.Client``.
        bucket_name: the bucket (must exist unless ``ensure_bucket`` creates it).
        run_id: the run; every object name is under ``run_prefix(run_id)``.
    """

    def __init__(self, client, bucket_name, run_id):
        self.client = client
        self.bucket_name = bucket_name
        self.run_id = run_id
        self.prefix = run_prefix(run_id)
        self.bucket = client.bucket(bucket_name)

    # -- paths -------------------------------------------------------------

    def url(self, relative):
        return f"gs://{self.bucket_name}/{self.prefix}{relative}"

    def _blob(self, relative):
        return self.bucket.blob(self.prefix + relative)

    # -- bucket ------------------------------------------------------------

    def ensure_bucket(self, create_if_missing):
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

    # -- small JSON documents ---------------------------------------------

    def write_json(self, relative, document):
        self._blob(relative).upload_from_string(
            json.dumps(document, sort_keys=True), content_type="application/json"
        )

    def read_json(self, relative):
        """Returns the parsed document, or None if it does not exist."""
        try:
            return json.loads(self._blob(relative).download_as_bytes())
        except google_exceptions.NotFound:
            return None

    def write_manifest(self, manifest):
        self.write_json("run.json", manifest)

    def read_manifest(self):
        return self.read_json("run.json")

    def write_items(self, items):
        lines = (json.dumps({"id": item.id, "index": item.index, "args": list(item.args)}) for item in items)
        self._blob("items.jsonl").upload_from_string("\n".join(lines) + "\n", content_type="application/x-ndjson")

    def read_items(self):
        """Returns the run's items as dicts in item order, or None if never written."""
        try:
            text = self._blob("items.jsonl").download_as_text()
        except google_exceptions.NotFound:
            return None
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    # -- package -----------------------------------------------------------

    PACKAGE = "package/package.tar.gz"

    def upload_package(self, tar_gz_bytes):
        self._blob(self.PACKAGE).upload_from_string(tar_gz_bytes, content_type="application/gzip")
        return self.url(self.PACKAGE)

    def download_package(self):
        return self._blob(self.PACKAGE).download_as_bytes()

    # -- outputs and logs --------------------------------------------------

    def upload_output(self, item_id, name, local_path):
        """Raises ValueError if the item id or name could leave the item's folder (``../``, ``/``, NUL)."""
        _check_item_id(item_id)
        tasks.validate_output_name(name)
        self._blob(f"outputs/{item_id}/{name}").upload_from_filename(str(local_path))

    def list_output_names(self, item_id):
        prefix = f"{self.prefix}outputs/{item_id}/"
        return sorted(blob.name[len(prefix):] for blob in self.client.list_blobs(self.bucket_name, prefix=prefix))

    def recorded_output_names(self, item_id):
        """The outputs of the attempt recorded done (its done marker lists them).

        An item that ran twice may have left files of the other attempt under
        outputs/ITEM/; only the recorded attempt's files are its result.
        """
        marker = self.read_marker("done", item_id) or {}
        outputs = marker.get("outputs")
        return sorted(outputs) if isinstance(outputs, list) else self.list_output_names(item_id)

    def read_output(self, item_id, name):
        return self._blob(f"outputs/{item_id}/{name}").download_as_bytes()

    def log_path(self, item_id, attempt):
        return f"logs/{item_id}/attempt-{attempt}.log"

    def upload_log(self, item_id, attempt, local_path):
        _check_item_id(item_id)
        self._blob(self.log_path(item_id, attempt)).upload_from_filename(str(local_path), content_type="text/plain")
        return self.url(self.log_path(item_id, attempt))

    def read_log(self, item_id, attempt):
        try:
            return self._blob(self.log_path(item_id, attempt)).download_as_bytes().decode("utf-8", errors="replace")
        except google_exceptions.NotFound:
            return None

    def upload_combined(self, name, local_path):
        self._blob(f"combined/{name}").upload_from_filename(str(local_path))
        return self.url(f"combined/{name}")

    # -- markers -----------------------------------------------------------

    def _create_once(self, relative, document):
        """Create the object only if absent. Returns False if it already existed."""
        try:
            self._blob(relative).upload_from_string(
                json.dumps(document, sort_keys=True), content_type="application/json", if_generation_match=0
            )
            return True
        except google_exceptions.PreconditionFailed:
            return False

    def write_done_marker(self, item_id, info):
        """Record the item done. Returns False if another attempt already did."""
        return self._create_once(f"done/{_check_item_id(item_id)}", info)

    def write_failed_marker(self, item_id, info):
        """Record the item failed for good. Returns False if already recorded."""
        return self._create_once(f"failed/{_check_item_id(item_id)}", info)

    def write_attempt_marker(self, item_id, attempt, info):
        """Record that failed attempt ``attempt`` was settled. Returns False if already recorded."""
        return self._create_once(f"attempts/{_check_item_id(item_id)}/{int(attempt)}", info)

    def attempt_recorded(self, item_id, attempt):
        """True once ``write_attempt_marker`` recorded this attempt: a redelivery of it must not run."""
        return self._blob(f"attempts/{item_id}/{int(attempt)}").exists()

    def is_done(self, item_id):
        return self._blob(f"done/{item_id}").exists()

    def _list_ids(self, folder):
        prefix = f"{self.prefix}{folder}/"
        return {blob.name[len(prefix):] for blob in self.client.list_blobs(self.bucket_name, prefix=prefix)}

    def list_done_ids(self):
        return self._list_ids("done")

    def list_failed_ids(self):
        return self._list_ids("failed")

    def read_marker(self, folder, item_id):
        return self.read_json(f"{folder}/{item_id}")

    def list_run_ids(self):
        """Run ids that have a folder in this bucket (for ``cflow list``)."""
        iterator = self.client.list_blobs(self.bucket_name, prefix=RUNS_PREFIX, delimiter="/")
        prefixes = set()
        for page in iterator.pages:
            prefixes.update(page.prefixes)
        return sorted(p[len(RUNS_PREFIX):].rstrip("/") for p in prefixes)
