"""The stock workers' Python packages as one wheelhouse in the bucket: made once per set of versions, installed at boot with no index and no apt.

A stock worker (``VM_BOOT = "stock"``) boots an image that has Python but
not the Google clients. Rather than every VM asking the Debian mirror and
PyPI at every boot (which a VM without an external IP cannot reach), the
controller, which has the network:

1. says what the workers need (``WheelhouseSpec``): ``package.WORKER_PACKAGES``
   at this controller's versions (``package.worker_constraints``), for the
   workers' platform (``DEBIAN_12``: Debian 12's CPython 3.11 on x86_64), and
   the pip wheel that installs them (``INSTALLER``);
2. makes it once on this machine (``WheelhouseCache.ensure``: ``pip download
   --only-binary=:all: --platform ...`` into
   ``~/.cache/cflow/wheelhouse/KEY/``, KEY the spec's hash), as one tar whose
   bytes depend only on the wheels in it;
3. uploads it to ``gs://BUCKET/cflow/wheelhouse/SHA256.tar``
   (``layout.wheelhouse``), named by the sha256 of its bytes, unless that
   object is already there (``publish``);

and names it to the workers (``WheelhouseRef``: instance metadata
``cflow-wheelhouse`` and ``cflow-wheelhouse-sha256``, and run.json's
``wheelhouse``). init.sh fetches it with the VM's own token, checks its
sha256 before it opens it, makes /opt/cflow/venv with ``python3 -m venv
--without-pip`` (Debian's python3 has venv but not ensurepip without the
python3-venv package) and installs with the pip wheel run as a program,
``--isolated --no-index``: nothing on the VM reaches a package registry.

The archive (``ARCHIVE_*`` names):

    requirements.txt   NAME==VERSION of every wheel in wheels/: what init.sh installs
    wheels/*.whl       the packages and everything they need, for the workers' platform
    pip.whl            pip itself, run as ``python3 pip.whl/pip install ...``

A known limit of ``pip download --platform``: environment markers
(``; python_version < "3.12"``) are judged by the controller's Python, not
the workers'. A controller on another Python minor version could leave out a
dependency that only 3.11 needs; the worker's pip then stops with "No
matching distribution" (one line on the serial console) instead of
installing half.

``prepare_for_run`` is the one call ``cflow run`` makes; ``cflow image
build`` has its build VM install the same wheelhouse (``prepare``), through
init.sh, so an image holds the bytes a stock worker would install.
"""

import dataclasses
import fcntl
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cflow.errors import CflowError
from cflow.package import WORKER_PACKAGES, worker_constraints

if TYPE_CHECKING:
    from cflow.config import Config
    from cflow.gcp.storage import Bucket

logger = logging.getLogger(__name__)

# Bump when the archive's layout or the way it is made changes.
FORMAT_VERSION = 1
# The pip that installs the wheels on the worker: pinned, so the same
# versions make the same archive on every controller.
INSTALLER = "pip==26.3"
ARCHIVE_REQUIREMENTS = "requirements.txt"
ARCHIVE_WHEELS = "wheels/"
ARCHIVE_INSTALLER = "pip.whl"
ARCHIVE_NAME = "wheelhouse.tar"
# Instance metadata that names the run's wheelhouse to init.sh.
METADATA_URL = "cflow-wheelhouse"
METADATA_SHA256 = "cflow-wheelhouse-sha256"
DOWNLOAD_TIMEOUT_S = 900
_WHEEL_NAME = re.compile(r"(?P<name>[^-]+)-(?P<version>[^-]+)(?:-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl")
_NO_WHEEL = re.compile(r"(?:No matching distribution found for|Could not find a version that satisfies the requirement) (\S+)")


class WheelhouseError(CflowError):
    """The workers' wheelhouse cannot be made or stored here."""

    exit_status = 1


@dataclasses.dataclass(frozen=True)
class WorkerPlatform:
    """The Python the workers run, as ``pip download`` is told it.

    Attributes:
        description: for messages, e.g. "Debian 12, CPython 3.11, x86_64".
        python_version, implementation, abi: ``--python-version``, ``--implementation``, ``--abi``.
        platforms: ``--platform`` tags, the most specific first (pip prefers them in this order).
    """

    description: str
    python_version: str
    implementation: str
    abi: str
    platforms: tuple[str, ...]

    def pip_arguments(self) -> list[str]:
        """The ``pip download`` options that select wheels for this platform (binary wheels only)."""
        arguments = ["--only-binary=:all:", "--python-version", self.python_version, "--implementation", self.implementation, "--abi", self.abi]
        for platform in self.platforms:
            arguments += ["--platform", platform]
        return arguments


# Debian 12 (bookworm): python3 is CPython 3.11, glibc 2.36, so any manylinux
# wheel up to manylinux_2_36 installs (the GCE debian-12 image and the emulator's
# --vm-root debian-12 alike).
DEBIAN_12 = WorkerPlatform(
    description="Debian 12, CPython 3.11, x86_64",
    python_version="3.11",
    implementation="cp",
    abi="cp311",
    platforms=(
        *(f"manylinux_2_{minor}_x86_64" for minor in range(36, 4, -1)),
        "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64",
    ),
)  # fmt: skip


def _pins_of(constraints: str) -> tuple[str, ...]:
    """The ``NAME==VERSION`` lines of a constraints text, without comments, sorted."""
    return tuple(sorted(line.strip() for line in constraints.splitlines() if line.strip() and not line.lstrip().startswith("#")))


@dataclasses.dataclass(frozen=True)
class WheelhouseSpec:
    """What goes in a wheelhouse.

    Attributes:
        packages: what the workers import (``package.WORKER_PACKAGES``).
        pins: ``NAME==VERSION`` of those and all they need (``package.worker_constraints``).
        platform: the workers' Python.
        installer: the pip requirement that installs them on the worker.
    """

    packages: tuple[str, ...]
    pins: tuple[str, ...]
    platform: WorkerPlatform = DEBIAN_12
    installer: str = INSTALLER

    @classmethod
    def for_this_controller(cls, platform: WorkerPlatform = DEBIAN_12) -> "WheelhouseSpec":
        """``WORKER_PACKAGES`` at the versions this controller runs."""
        return cls(packages=WORKER_PACKAGES, pins=_pins_of(worker_constraints()), platform=platform)

    @property
    def key(self) -> str:
        """A short hash of the spec: its entry in the local cache (the same pins make the same key)."""
        text = json.dumps({**dataclasses.asdict(self), "format": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def constraints_text(self) -> str:
        """The pins as a pip constraints file."""
        return "".join(f"{pin}\n" for pin in self.pins)


@dataclasses.dataclass(frozen=True)
class BuiltWheelhouse:
    """A wheelhouse archive on this machine."""

    path: Path
    sha256: str
    size: int


@dataclasses.dataclass(frozen=True)
class WheelhouseRef:
    """Where a run's workers find their wheelhouse, and the sha256 they check it against."""

    url: str  # gs://BUCKET/cflow/wheelhouse/SHA256.tar
    sha256: str

    def to_dict(self) -> dict[str, str]:
        """run.json's ``wheelhouse``."""
        return {"url": self.url, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, document: Mapping[str, Any] | None) -> "WheelhouseRef | None":
        """Read run.json's ``wheelhouse`` back (None for a run that has none)."""
        if not document:
            return None
        return cls(url=str(document["url"]), sha256=str(document["sha256"]))

    def metadata_items(self) -> list[dict[str, str]]:
        """The instance metadata items init.sh reads."""
        return [{"key": METADATA_URL, "value": self.url}, {"key": METADATA_SHA256, "value": self.sha256}]


class WheelDownloader(Protocol):
    """Puts the wheels of a spec into a folder (``PipDownloader``)."""

    def __call__(self, spec: WheelhouseSpec, dest: Path, log_path: Path) -> None:
        """Download ``spec``'s packages, what they need, and its installer, as wheels for its platform, into ``dest``.

        Raises:
            WheelhouseError: one line saying what is missing and how to fix it (the full output in ``log_path``).
        """
        ...


class PipDownloader:
    """``WheelDownloader`` with this controller's pip (its configuration, index and proxy included).

    Args:
        run: ``subprocess.run``-like, for pip.
        python: the Python whose pip runs (default: this one).
    """

    def __init__(self, run: Callable[..., "subprocess.CompletedProcess[bytes]"] = subprocess.run, python: str = sys.executable) -> None:
        self._run = run
        self._python = python

    def __call__(self, spec: WheelhouseSpec, dest: Path, log_path: Path) -> None:
        """See ``WheelDownloader``.

        Raises:
            WheelhouseError: this Python has no pip, or pip could not get a wheel of every package.
        """
        if self._python == sys.executable and importlib.util.find_spec("pip") is None:
            raise WheelhouseError(
                f"this controller's Python ({sys.executable}) has no pip, which downloads the workers' packages once; "
                "install it (python3 -m ensurepip, or apt-get install python3-pip)"
            )
        constraints = dest.parent / "constraints.txt"
        constraints.write_text(spec.constraints_text())
        command = [
            self._python, "-m", "pip", "download", "--no-input", "--disable-pip-version-check", "--progress-bar", "off",
            *spec.platform.pip_arguments(), "--dest", str(dest), "-c", str(constraints), *spec.packages, spec.installer,
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            try:
                result = self._run(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=DOWNLOAD_TIMEOUT_S, check=False)
            except subprocess.TimeoutExpired:
                raise WheelhouseError(f"pip download of the workers' packages took over {DOWNLOAD_TIMEOUT_S} s; see {log_path}, then try again") from None
        if result.returncode != 0:
            output = log_path.read_text(errors="replace")
            missing = _NO_WHEEL.search(output)
            if missing:
                raise WheelhouseError(
                    f"no wheel of {missing.group(1)} for the workers ({spec.platform.description}) on the package index; "
                    "install a version of it that has one on this controller (the workers get this controller's versions), "
                    f"or boot from an image that has the packages (VM_BOOT = \"image\"); see {log_path}"
                )
            last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "no output")
            raise WheelhouseError(f"pip download of the workers' packages failed (exit status {result.returncode}: {last}); "
                                  f"this controller needs the package index once per set of versions; see {log_path}")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cflow/wheelhouse`` (``~/.cache/cflow/wheelhouse``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cflow" / "wheelhouse"


def requirements_of(wheel_names: Sequence[str]) -> str:
    """requirements.txt of the archive: ``NAME==VERSION`` of each wheel, sorted.

    Raises:
        WheelhouseError: a file name is not a wheel's.
    """
    lines = []
    for name in wheel_names:
        match = _WHEEL_NAME.fullmatch(name)
        if not match:
            raise WheelhouseError(f"{name} is not a wheel's file name; delete it from the wheelhouse cache ({default_cache_dir()}) and run again")
        lines.append(f"{match.group('name')}=={match.group('version')}\n")
    return "".join(sorted(lines))


def write_archive(wheels_dir: Path, archive_path: Path) -> None:
    """Pack the wheels of ``wheels_dir`` as the archive described above: same wheels, same bytes.

    Every member has a fixed time, owner and mode, in name order, so the
    archive's sha256 (its name in the bucket) depends only on the wheels.

    Raises:
        WheelhouseError: no pip wheel, or a file that is not a wheel, in ``wheels_dir``.
    """
    names = sorted(path.name for path in wheels_dir.iterdir() if path.is_file())
    installers = [name for name in names if name.startswith("pip-") and name.endswith(".whl")]
    if len(installers) != 1:
        raise WheelhouseError(f"{wheels_dir} has {len(installers)} pip wheels, not one; delete it and run again")
    packages = [name for name in names if name not in installers]
    members: list[tuple[str, bytes | Path]] = [(ARCHIVE_REQUIREMENTS, requirements_of(packages).encode()), (ARCHIVE_INSTALLER, wheels_dir / installers[0])]
    members += [(ARCHIVE_WHEELS + name, wheels_dir / name) for name in packages]
    with tarfile.open(archive_path, "w", format=tarfile.PAX_FORMAT) as archive:
        for member_name, content in members:
            info = tarfile.TarInfo(member_name)
            info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, 0, "", ""
            if isinstance(content, bytes):
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
            else:
                info.size = content.stat().st_size
                with open(content, "rb") as stream:
                    archive.addfile(info, stream)


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class WheelhouseCache:
    """Wheelhouses made on this machine: ``KEY/wheelhouse.tar`` under ``cache_dir`` (``KEY.log``: pip's output; ``KEY.lock``).

    Args:
        cache_dir: where they live (default ``default_cache_dir()``).
        download: puts a spec's wheels in a folder (default ``PipDownloader()``).
        say: where progress lines go (default: this module's logger).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        download: WheelDownloader | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._download = download or PipDownloader()
        self._say = say or logger.info

    def path(self, spec: WheelhouseSpec) -> Path:
        """Where the archive of ``spec`` is (it may not exist yet)."""
        return self.cache_dir / spec.key / ARCHIVE_NAME

    def ensure(self, spec: WheelhouseSpec) -> BuiltWheelhouse:
        """The archive of ``spec``, downloading its wheels first if it is not cached.

        A lock file makes a second controller wait for the first one's
        download; the wheels go to a ``.partial`` folder renamed when
        complete, so a killed download is never used.

        Raises:
            WheelhouseError: as the downloader.
        """
        archive = self.path(spec)
        if not archive.is_file():
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            with open(self.cache_dir / f"{spec.key}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not archive.is_file():  # not made while we waited
                    self._make(spec, archive.parent)
        return BuiltWheelhouse(path=archive, sha256=file_sha256(archive), size=archive.stat().st_size)

    def _make(self, spec: WheelhouseSpec, entry: Path) -> None:
        partial = entry.with_name(entry.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # left by a download that was killed; we hold the lock
        wheels = partial / "wheels"
        wheels.mkdir(parents=True)
        log_path = self.cache_dir / f"{spec.key}.log"
        self._say(f"downloading the workers' packages once for {spec.platform.description} (pip download; log: {log_path})")
        try:
            self._download(spec, wheels, log_path)
            write_archive(wheels, partial / ARCHIVE_NAME)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        # Only the archive is kept: it holds every wheel.
        shutil.rmtree(wheels)
        os.rename(partial, entry)


def publish(bucket: "Bucket", built: BuiltWheelhouse, say: Callable[[str], None] | None = None) -> WheelhouseRef:
    """Put ``built`` in the bucket unless the same bytes are already there; returns what the workers are told.

    Raises:
        CloudError: Cloud Storage refused (``cflow.gcp.storage``).
    """
    say = say or logger.info
    uploaded = bucket.upload_wheelhouse(built.sha256, built.path)
    url = bucket.wheelhouse_url(built.sha256)
    if uploaded:
        say(f"uploaded the workers' wheelhouse ({built.size / 1e6:.1f} MB) to {url}")
    else:
        logger.info("the workers' wheelhouse is already in the bucket: %s", url)
    return WheelhouseRef(url=url, sha256=built.sha256)


def stock_vms_install(config: "Config", vm_root: str | None) -> bool:
    """True when a VM booted from the stock image installs the packages itself: on GCP, or locally on a real root (``vm_root``).

    An emulated VM that shares this machine's filesystem uses this machine's packages.
    """
    return not config.is_local or vm_root is not None


def needed(config: "Config", vm_root: str | None) -> bool:
    """True when the run's workers install their packages at boot: they boot the stock image, and ``stock_vms_install``.

    An image made by ``cflow image build`` has them.
    """
    return config.vm_boot == "stock" and stock_vms_install(config, vm_root)


def local_vm_root(stack_dir: Path | None) -> str | None:
    """The real root the running local stack in ``stack_dir`` boots its VMs on (``--vm-root``), or None."""
    if stack_dir is None:
        return None
    from cflow.local.stack import LocalStack

    info = LocalStack(stack_dir).info()
    return info.vm_root if info is not None else None


def prepare(bucket: "Bucket", say: Callable[[str], None] | None = None, cache: WheelhouseCache | None = None) -> WheelhouseRef:
    """This controller's workers' wheelhouse, made if not cached and uploaded if the bucket lacks it.

    Raises:
        WheelhouseError: the wheels cannot be downloaded.
        CloudError: Cloud Storage refused.
    """
    cache = cache or WheelhouseCache(say=say)
    return publish(bucket, cache.ensure(WheelhouseSpec.for_this_controller()), say)


def prepare_for_run(
    config: "Config",
    bucket: "Bucket",
    stack_dir: Path | None,
    say: Callable[[str], None] | None = None,
    cache: WheelhouseCache | None = None,
) -> WheelhouseRef | None:
    """The wheelhouse the run's workers install from (``prepare``); None when they need none (see ``needed``).

    Raises:
        WheelhouseError: the wheels cannot be downloaded.
        CloudError: Cloud Storage refused.
    """
    if not needed(config, local_vm_root(stack_dir) if config.is_local else None):
        return None
    return prepare(bucket, say, cache)
