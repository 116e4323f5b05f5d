"""Input staging (STAGE_INPUTS): an item's gs:// objects downloaded before its task starts, the task given local paths.

What dsub's ``--input`` does, for every field of the item: a field that is
the URL of an object (``gs://BUCKET/NAME``, NAME not ending in "/") is
downloaded through the run's storage seam
(``cflow.gcp.storage.RunStorage.download_input``, never a shell) into the
attempt's input folder, at ``INPUT_DIR/BUCKET/NAME``, and the task gets that
path in the field's place. Every other field (a bucket or a prefix, a URL
inside a longer field, anything else) reaches the task as written. The same
URL twice is downloaded once. The input folder is ``$CFLOW_INPUT_DIR`` in the
task's environment, and goes with the attempt's folder once its result is
recorded.

The download is part of the attempt: the item's lease is kept while it runs,
and a download that fails (no such object, no permission, a name that cannot
be a local path) fails the attempt: ``StagingFailed``, whose ``log_line``
the worker writes to the item's log (``cflow.worker.task.run_task``).

Nothing here runs unless the run has STAGE_INPUTS.
"""

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from cflow.config import bucket_name_problem
from cflow.errors import CloudError, NotFound

log = logging.getLogger(__name__)

INPUT_DIR_NAME = "input"  # in the attempt's folder, beside output/ and task.log
# sysexits.h EX_NOINPUT ("an input file did not exist or was not readable"): the status of an attempt whose staging failed.
STAGING_FAILED_STATUS = 66
# Most filesystems' limit on one path component.
MAX_PART_BYTES = 255


class InputDownloads(Protocol):
    """What staging needs of the storage seam (``cflow.gcp.storage.RunStorage``)."""

    def download_input(self, url: str, local_path: Path) -> int:
        """Download ``gs://BUCKET/NAME`` to ``local_path``; returns the bytes written.

        Raises:
            NotFound: no such object; PermissionDenied, CloudError: the service refused.
        """
        ...


class StagingFailed(Exception):
    """An input could not be staged; the attempt fails.

    Args:
        url: the field that could not be staged.
        why: what went wrong, in a clause ("no such object").
    """

    def __init__(self, url: str, why: str) -> None:
        super().__init__(f"{url}: {why}")
        self.url = url
        self.why = why

    @property
    def log_line(self) -> str:
        """The one line the item's log gets."""
        return f"cflow: input {self.url} could not be staged: {self.why}; this attempt failed before the task started"


@dataclasses.dataclass(frozen=True)
class StagedInputs:
    """An item's fields after staging.

    Attributes:
        args: the fields, each staged URL replaced by its local path.
        files: URL -> local path, for every object downloaded.
    """

    args: tuple[str, ...]
    files: Mapping[str, Path]


def object_url(field: str) -> tuple[str, str] | None:
    """``(bucket, name)`` when ``field`` is the URL of an object, else None (the field is passed as written)."""
    if not field.startswith("gs://"):
        return None
    bucket, _, name = field[len("gs://"):].partition("/")
    if bucket_name_problem(bucket) is not None or not name or name.endswith("/"):
        return None
    return bucket, name


def local_path(input_dir: Path, bucket: str, name: str) -> Path:
    """Where ``gs://bucket/name`` is staged: ``input_dir/bucket/name``.

    Raises:
        StagingFailed: the object's name has a part that cannot be a file name
            here ("", ".", "..", or longer than 255 bytes), so it could not be
            staged without leaving the input folder or clashing.
    """
    parts = name.split("/")
    if any(part in ("", ".", "..") or len(part.encode()) > MAX_PART_BYTES for part in parts):
        raise StagingFailed(
            f"gs://{bucket}/{name}",
            f"its object name has an empty, '.' or '..' part, or one longer than {MAX_PART_BYTES} bytes, which cannot be a local path; "
            "rename the object, or pass it without STAGE_INPUTS",
        )
    return input_dir.joinpath(bucket, *parts)


def stage_inputs(storage: InputDownloads, args: Sequence[str], input_dir: Path) -> StagedInputs:
    """Download the objects ``args`` name into ``input_dir``; return the fields with local paths in their place.

    Args:
        storage: the run's storage seam.
        args: the item's fields.
        input_dir: the attempt's input folder (created here).
    Returns:
        A ``StagedInputs``.
    Raises:
        StagingFailed: one object could not be staged (the first that failed; none after it is tried).
    """
    input_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    staged: list[str] = []
    for field in args:
        parts = object_url(field)
        if parts is None:
            staged.append(field)
            continue
        if field not in files:
            files[field] = _download(storage, field, local_path(input_dir, *parts))
        staged.append(str(files[field]))
    if files:
        log.info("staged %d input(s) in %s", len(files), input_dir)
    return StagedInputs(tuple(staged), files)


def _download(storage: InputDownloads, url: str, path: Path) -> Path:
    """One object to ``path``. Raises StagingFailed saying why it could not."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        size = storage.download_input(url, path)
    except NotFound:
        raise StagingFailed(url, "no such object (check the item's field, or upload the object)") from None
    except CloudError as error:
        raise StagingFailed(url, str(error)) from None
    except OSError as error:
        raise StagingFailed(url, f"cannot be written to {path}: {error.strerror or error}") from None
    log.debug("staged %s (%d bytes) at %s", url, size, path)
    return path
