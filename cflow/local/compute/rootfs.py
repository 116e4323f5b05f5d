"""VM roots: the real Debian 12 filesystem ``--vm-root debian-12`` runs VMs on, built once and cached.

``RootRecipe`` says what a root holds: a minimal Debian (debootstrap's
``minbase``) plus what the GCE image has that CFlow's scripts and a user's
startup script count on (python3, curl, ca-certificates...). Its ``key`` (a
hash of the recipe) names its folder in the cache, so a changed recipe makes
a new root and an old one is never patched in place.

``RootCache.ensure`` returns the root's folder, building it first when it is
missing: debootstrap (in a mount namespace of its own, so an interrupted
build leaves no mount behind) into a ``.partial`` folder beside the entry,
then one rename, so a half-built root is never used; a lock file makes a
second emulator wait for the first one's build instead of building it again.
The build's output goes to ``NAME-KEY.log`` beside the root.

The cache lives in ``$XDG_CACHE_HOME/cflow/vm-roots/`` (``~/.cache/cflow/vm-roots/``).
What a VM does with the root (its overlay, namespace and metadata address)
lives in ``guest_root``.
"""

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from cflow.errors import CflowError

logger = logging.getLogger(__name__)

# Bump when the build steps below change what a root holds.
BUILD_STEPS_VERSION = 1
BUILD_TIMEOUT_S = 1800
# Programs a VM on a real root needs on the host (util-linux and coreutils).
HOST_PROGRAMS = ("unshare", "nsenter", "mount", "chroot", "mknod", "mktemp")


class VmRootError(CflowError):
    """A VM root cannot be built or used here."""


@dataclasses.dataclass(frozen=True)
class RootRecipe:
    """What one VM root holds.

    Attributes:
        name: what ``--vm-root`` calls it.
        suite, mirror, security_mirror: the Debian release and where its packages come from.
        variant: debootstrap's ``--variant``.
        packages: added with ``--include``: what the cloud image has that scripts assume.
    """

    name: str
    suite: str
    mirror: str
    security_mirror: str
    variant: str
    packages: tuple[str, ...]

    @property
    def key(self) -> str:
        """A short hash of the recipe and the build steps: the cache entry's name."""
        text = json.dumps({**dataclasses.asdict(self), "steps": BUILD_STEPS_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def sources(self) -> str:
        """The image's APT sources (deb822), as the GCE debian-12 image lists them: the release, its updates, security."""
        return (
            f"Types: deb\nURIs: {self.mirror}\nSuites: {self.suite} {self.suite}-updates\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
            f"Types: deb\nURIs: {self.security_mirror}\nSuites: {self.suite}-security\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        )


# The GCE debian-12 image has python3 and curl, and init.sh's stock path
# installs python3-venv itself; netbase and procps are there on GCE too
# (/etc/services, ps), and programs assume them.
RECIPES = {
    "debian-12": RootRecipe(
        name="debian-12",
        suite="bookworm",
        mirror="http://deb.debian.org/debian",
        security_mirror="http://deb.debian.org/debian-security",
        variant="minbase",
        packages=("python3", "curl", "ca-certificates", "netbase", "procps"),
    ),
}


def recipe_named(name: str) -> RootRecipe:
    """The recipe of ``--vm-root NAME``.

    Raises:
        VmRootError: no such root.
    """
    try:
        return RECIPES[name]
    except KeyError:
        raise VmRootError(f"--vm-root {name!r} is not a VM root this emulator can build; use one of: {', '.join(sorted(RECIPES))}") from None


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cflow/vm-roots`` (``~/.cache/cflow/vm-roots``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cflow" / "vm-roots"


def host_problem(filesystems: str = "/proc/filesystems", which: Callable[[str], str | None] = shutil.which) -> str | None:
    """Why VMs cannot run on a real root on this host (one line), or None when they can.

    They need root (mounts, namespaces, the metadata server on port 80), overlayfs,
    and util-linux's unshare and nsenter.
    """
    if os.geteuid() != 0:
        return "VMs on a real root need root (mounts, mount namespaces, port 80 for metadata.google.internal); run the emulator as root"
    try:
        with open(filesystems) as listing:
            known = {line.split()[-1] for line in listing if line.strip()}
    except OSError:
        known = set()
    if "overlay" not in known:
        return "this kernel has no overlayfs (not in /proc/filesystems); load it with `modprobe overlay`"
    missing = [program for program in HOST_PROGRAMS if which(program) is None]
    if missing:
        return f"{', '.join(missing)} missing on this host; install util-linux and coreutils"
    return None


class RootCache:
    """Built roots under ``cache_dir``: ``NAME-KEY/`` (the root), ``NAME-KEY.log``, ``NAME-KEY.lock``.

    Args:
        cache_dir: where roots live (default ``default_cache_dir()``).
        say: where progress lines go (default: this module's logger).
        run: ``subprocess.run``-like, for the build's commands.
        which: ``shutil.which``-like, to find debootstrap.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        say: Callable[[str], None] | None = None,
        run: Callable[..., "subprocess.CompletedProcess[bytes]"] = subprocess.run,
        which: Callable[[str], str | None] = shutil.which,
    ) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._say = say or logger.info
        self._run = run
        self._which = which

    def path(self, recipe: RootRecipe) -> Path:
        """Where the built root of ``recipe`` is (it may not exist yet)."""
        return self.cache_dir / f"{recipe.name}-{recipe.key}"

    def cached(self, recipe: RootRecipe) -> bool:
        """True when the root of ``recipe`` is built."""
        return self.path(recipe).is_dir()

    def ensure(self, recipe: RootRecipe) -> Path:
        """Returns the root of ``recipe``, building it first if it is not cached (about a minute).

        Raises:
            VmRootError: debootstrap is missing or the build failed (the log says why).
        """
        final = self.path(recipe)
        if final.is_dir():
            return final
        if self._which("debootstrap") is None:
            raise VmRootError(f"--vm-root {recipe.name} must be built once, and debootstrap is missing; install it (apt-get install debootstrap)")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(self.cache_dir / f"{final.name}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._say(f"waiting for another build of the {recipe.name} VM root to finish ({final})")
                fcntl.flock(lock, fcntl.LOCK_EX)
            if final.is_dir():  # built while we waited
                return final
            self._build(recipe, final)
        return final

    def _build(self, recipe: RootRecipe, final: Path) -> None:
        partial = final.with_name(final.name + ".partial")
        log_path = final.with_name(final.name + ".log")
        # Left by a build that was killed; we hold the lock, so nobody is writing it.
        shutil.rmtree(partial, ignore_errors=True)
        self._say(f"building the {recipe.name} VM root once with debootstrap (about a minute; log: {log_path})")
        command = [
            "unshare", "--mount", "--propagation", "private", "--",
            "debootstrap", f"--variant={recipe.variant}", f"--include={','.join(recipe.packages)}",
            recipe.suite, str(partial), recipe.mirror,
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            try:
                result = self._run(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S, check=False)
            except subprocess.TimeoutExpired:
                shutil.rmtree(partial, ignore_errors=True)
                raise VmRootError(f"building the {recipe.name} VM root took over {BUILD_TIMEOUT_S} s; see {log_path}, then try again") from None
        if result.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise VmRootError(f"building the {recipe.name} VM root failed (debootstrap exit status {result.returncode}); see {log_path}, then try again")
        self._finish_image(recipe, partial)
        os.rename(partial, final)
        self._say(f"{recipe.name} VM root ready in {final}")

    @staticmethod
    def _finish_image(recipe: RootRecipe, root: Path) -> None:
        """Make the debootstrapped tree look like the cloud image: its APT sources, no package cache, its recipe."""
        sources_dir = root / "etc" / "apt" / "sources.list.d"
        sources_dir.mkdir(parents=True, exist_ok=True)
        (sources_dir / "debian.sources").write_text(recipe.sources())
        (root / "etc" / "apt" / "sources.list").unlink(missing_ok=True)
        archives = root / "var" / "cache" / "apt" / "archives"
        for package in archives.glob("*.deb"):
            package.unlink()
        (root / "etc" / "cflow-vm-root.json").write_text(json.dumps({**dataclasses.asdict(recipe), "key": recipe.key}, indent=2) + "\n")
