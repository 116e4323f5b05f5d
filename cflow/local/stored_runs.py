"""A local stack's Cloud Storage for the commands that read runs, whether or not the stack is running.

The local stack keeps its Cloud Storage objects in fake-gcs-server's
filesystem backend under ``STACK_DIR/gcs`` (see ``cflow.local.stack``), and
they stay there after the stack stops. ``stack_storage(stack_dir)`` yields
where to reach them: the running stack's server, or fake-gcs-server started
alone on that folder for as long as the block runs and stopped by its pid
after. It never starts the Pub/Sub or Compute emulator and never touches
stack.json, so the run's objects are read through the same storage seam as
ever.

``object_path`` is where one object's bytes lie on this machine, so a message
can name a log as a file the user can open.
"""

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cflow.errors import StackError
from cflow.local.launchers import launch_storage_server
from cflow.local.services import stop_and_reap
from cflow.local.stack import LocalStack, StackInfo

log = logging.getLogger(__name__)

# The folder of STACK_DIR that holds the Cloud Storage objects, as cflow.local.stack lays it out.
STORAGE_DIR = "gcs"


@dataclasses.dataclass(frozen=True)
class StackStorage:
    """Where a local stack's Cloud Storage answers for now.

    Attributes:
        url: ``http://127.0.0.1:PORT`` (what ``STORAGE_EMULATOR_HOST`` must be).
        stack: the running stack, or None when the server was started for this block alone.
    """

    url: str
    stack: StackInfo | None


def storage_root(stack_dir: str | os.PathLike[str]) -> Path:
    """``STACK_DIR/gcs``: the filesystem backend's root, one folder per bucket."""
    return Path(stack_dir).absolute() / STORAGE_DIR


def object_path(stack_dir: str | os.PathLike[str], bucket: str, object_name: str) -> Path:
    """Where the bytes of ``gs://BUCKET/OBJECT_NAME`` of the local stack in ``stack_dir`` lie (the file may not exist)."""
    return storage_root(stack_dir) / bucket / object_name


@contextlib.contextmanager
def stack_storage(stack_dir: str | os.PathLike[str]) -> Iterator[StackStorage]:
    """The Cloud Storage of the local stack in ``stack_dir``, running or not, for the duration of the block.

    Yields:
        ``StackStorage``: the running stack's server, or one started on its
        objects for this block and stopped (by its pid) when the block ends.
    Raises:
        StackError: nothing was ever kept in ``stack_dir`` (no run used it),
        or the server did not start (the message names its log).
    """
    stack_dir = Path(stack_dir).absolute()
    info = LocalStack(stack_dir).info()
    if info is not None:
        yield StackStorage(info.storage_url, info)
        return
    root = storage_root(stack_dir)
    if not root.is_dir():
        raise StackError(
            f"no local run has kept anything in {stack_dir} (it has no {STORAGE_DIR}/ folder); "
            "pass --stack-dir to the folder of the stack the run used"
        )
    # The server's log goes to a folder of its own: the stack's logs stay the stack's.
    log_dir = Path(tempfile.mkdtemp(prefix="cflow-storage-"))
    started_at = time.monotonic()
    service, process = launch_storage_server(root, log_dir / "storage.log")
    log.debug("started fake-gcs-server (pid %d) on %s in %.2f s", service.pid, root, time.monotonic() - started_at)
    try:
        yield StackStorage(service.endpoint, None)
    finally:
        stop_and_reap(service, process)
        shutil.rmtree(log_dir, ignore_errors=True)
