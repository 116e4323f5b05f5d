"""The run's package: what a worker downloads at boot.

It holds the ``cflow`` package, the user's ``task/`` folder and the worker
entry scripts, and never ``credential/``: workers use their VM's own service
account. It also holds ``constraints.txt`` (``worker_constraints``): the
versions this controller runs of the packages a stock worker installs and of
everything they need, the run's record of them; the workers' wheelhouse
(``cflow.wheelhouse``) is downloaded at these versions, so workers run what
the controller was tested with.
"""

import importlib.metadata
import importlib.util
import io
import py_compile
import re
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import cflow
from cflow.errors import ConfigError

ENTRY_SCRIPTS = ("init.sh", "startup-signal.py", "shutdown-signal.py")
# What a stock worker installs from the run's wheelhouse (cflow.wheelhouse).
WORKER_PACKAGES = ("google-cloud-pubsub", "google-cloud-storage", "google-auth")
CONSTRAINTS_NAME = "constraints.txt"
_REQUIREMENT = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")
SKIPPED_PARTS = {"__pycache__", ".git", ".pytest_cache", "credential"}
# Never imported on a worker (the cloud in a box runs beside the controller):
# shipped as source only, not compiled as well.
CONTROLLER_ONLY = "cflow/local/"


def _included(path: Path) -> bool:
    return not (SKIPPED_PARTS & set(path.parts)) and path.suffix != ".pyc"


def package_files(base_dir: str | Path) -> list[tuple[str, Path]]:
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
            _refuse_keys(path, base_dir)
            files.append((path.relative_to(base_dir).as_posix(), path))
    for name in ENTRY_SCRIPTS:
        files.append((name, base_dir / name))
    return files


# What a service-account key file or a PEM private key contains. Built at
# run time because this module ships too (compiled as well), and the
# package is checked for these bytes.
KEY_MARKERS = tuple(bytes.fromhex(h) for h in (
    "22707269766174655f6b657922",  # the JSON field a service-account key file has
    "2d2d2d2d2d424547494e2050524956415445204b45592d2d2d2d2d",  # PEM private key header
    "2d2d2d2d2d424547494e20525341205052495641544520",  # PEM RSA private key header (prefix)
))


def _refuse_keys(path: Path, base_dir: Path) -> None:
    """Workers use their VM's own account: a key in task/ must never ship with the package."""
    with open(path, "rb") as stream:
        head = stream.read(65536)
    if any(marker in head for marker in KEY_MARKERS):
        raise ConfigError(
            f"{path.relative_to(base_dir)} looks like a private key; keys never go to workers: "
            "move it to credential/ (controller only) or delete it"
        )


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def worker_constraints(
    packages: Iterable[str] = WORKER_PACKAGES,
    distribution: Callable[[str], importlib.metadata.Distribution] = importlib.metadata.distribution,
) -> str:
    """pip constraints (``NAME==VERSION`` lines) pinning ``packages`` and all they require to this controller's versions.

    Requirements are followed through extras (``google-api-core[grpc]``); one
    whose environment marker keeps it off this controller is not installed here
    and stays unpinned, as does anything not installed. Local version labels
    (``+cpu``) are dropped: a public index only has the public version.
    """
    pins: dict[str, str] = {}
    wanted: list[tuple[str, frozenset[str]]] = [(name, frozenset()) for name in packages]
    expanded: set[tuple[str, frozenset[str]]] = set()
    while wanted:
        name, extras = wanted.pop()
        key = (_normalised(name), extras)
        if key in expanded:
            continue
        expanded.add(key)
        try:
            found = distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        pins[_normalised(found.metadata["Name"] or name)] = f"{found.metadata['Name'] or name}=={found.version.split('+')[0]}"
        for requirement in found.requires or []:
            text, _, marker = requirement.partition(";")
            needs_extra = _EXTRA_MARKER.search(marker)
            if needs_extra and _normalised(needs_extra.group(1)) not in extras:
                continue
            match = _REQUIREMENT.match(text)
            if match:
                wanted.append((match.group(1), frozenset(_normalised(extra) for extra in (match.group(2) or "").split(",") if extra.strip())))
    header = (
        "# The versions of the workers' Python packages on the controller that built this package\n"
        "# (cflow/package.py); the workers' wheelhouse was downloaded at these versions (cflow/wheelhouse.py).\n"
    )
    return header + "".join(f"{pins[key]}\n" for key in sorted(pins))


def build_package(base_dir: str | Path) -> bytes:
    """Returns the package as tar.gz bytes (file modes kept, so task scripts stay executable).

    CFlow's own modules also go in compiled (``__pycache__``, hash-checked),
    so a booting worker does not compile them again on every VM; and
    ``constraints.txt`` (``worker_constraints``) at the top.
    """
    buffer = io.BytesIO()
    # gzip level 6 (gzip's own default, not tarfile's 9): half the time for a 1% larger package.
    with tempfile.TemporaryDirectory() as scratch, tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as archive:
        for name, path in package_files(base_dir):
            archive.add(str(path), arcname=name, recursive=False)
            if name.startswith("cflow/") and not name.startswith(CONTROLLER_ONLY) and name.endswith(".py"):
                _add_bytecode(archive, name, path, Path(scratch) / "module.pyc")
        constraints = worker_constraints().encode()
        info = tarfile.TarInfo(CONSTRAINTS_NAME)
        info.size = len(constraints)
        info.mode = 0o644
        info.mtime = int(time.time())
        archive.addfile(info, io.BytesIO(constraints))
    return buffer.getvalue()


def _add_bytecode(archive: tarfile.TarFile, name: str, path: Path, scratch_file: Path) -> None:
    """Add ``name``'s compiled module where the importer looks for it.

    Hash-checked: the importer compares it with the source's hash, not with
    file times, so it stays valid after the download and is never stale. It
    is named for this Python version (``cpython-311``...): a worker on
    another version just ignores it and compiles as before.
    """
    try:
        py_compile.compile(str(path), cfile=str(scratch_file), dfile=name, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    except py_compile.PyCompileError:
        return  # the worker reports the syntax error itself when it imports the module
    data = scratch_file.read_bytes()
    info = tarfile.TarInfo(importlib.util.cache_from_source(name))
    info.size = len(data)
    info.mode = 0o644
    info.mtime = int(path.stat().st_mtime)
    archive.addfile(info, io.BytesIO(data))
