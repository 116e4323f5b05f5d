"""The run's package: what a worker downloads at boot.

It holds the ``cflow`` package, the user's ``task/`` folder and the worker
entry scripts, and never ``credential/``: workers use their VM's own service
account.
"""

import io
import tarfile
from pathlib import Path

import cflow
from cflow.errors import ConfigError

ENTRY_SCRIPTS = ("init.sh", "startup-signal.py", "shutdown-signal.py")
SKIPPED_PARTS = {"__pycache__", ".git", ".pytest_cache", "credential"}


def _included(path):
    return not (SKIPPED_PARTS & set(path.parts)) and path.suffix != ".pyc"


def package_files(base_dir):
    """``(path in archive, local path)`` pairs for the package, in a stable order.

    Raises:
        ConfigError: an entry script or task/ is missing beside const.py.
    """
    base_dir = Path(base_dir)
    missing = [name for name in (*ENTRY_SCRIPTS, "task") if not (base_dir / name).exists()]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} missing in {base_dir}; keep const.py in the CFlow project folder beside them"
        )
    files = []
    code_dir = Path(cflow.__file__).resolve().parent
    for path in sorted(code_dir.rglob("*")):
        if path.is_file() and _included(path.relative_to(code_dir.parent)):
            files.append((path.relative_to(code_dir.parent).as_posix(), path))
    task_dir = base_dir / "task"
    for path in sorted(task_dir.rglob("*")):
        if path.is_file() and _included(path.relative_to(base_dir)):
            files.append((path.relative_to(base_dir).as_posix(), path))
    for name in ENTRY_SCRIPTS:
        files.append((name, base_dir / name))
    return files


def build_package(base_dir):
    """Returns the package as tar.gz bytes (file modes kept, so task scripts stay executable)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, path in package_files(base_dir):
            archive.add(str(path), arcname=name, recursive=False)
    return buffer.getvalue()
