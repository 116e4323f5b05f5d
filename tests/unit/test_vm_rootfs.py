"""VM roots: recipes, and the cache that builds each once, atomically (cflow/local/compute/rootfs.py)."""

import dataclasses
import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from cflow.local.compute import rootfs
from cflow.local.compute.rootfs import RECIPES, RootCache, VmRootError

DEBIAN = RECIPES["debian-12"]


def test_the_debian_recipe_is_a_minimal_bookworm_with_what_the_gce_image_has():
    assert (DEBIAN.suite, DEBIAN.variant) == ("bookworm", "minbase")
    assert {"python3", "curl", "ca-certificates"} <= set(DEBIAN.packages)
    assert "python3-venv" not in DEBIAN.packages  # init.sh's stock path installs it, as on GCE


def test_the_key_names_the_recipe():
    assert DEBIAN.key == RECIPES["debian-12"].key
    assert dataclasses.replace(DEBIAN, packages=(*DEBIAN.packages, "vim")).key != DEBIAN.key
    assert RootCache("/cache").path(DEBIAN).name == f"debian-12-{DEBIAN.key}"


def test_an_unknown_root_is_one_line_naming_the_known_ones():
    with pytest.raises(VmRootError, match=r"'debian-11'.*debian-12"):
        rootfs.recipe_named("debian-11")


class FakeDebootstrap:
    """Stands in for ``unshare ... debootstrap``: makes a tiny tree in the target, or fails."""

    def __init__(self, returncode=0, started=None, release=None):
        self.returncode = returncode
        self.calls = []
        self.started = started
        self.release = release

    def __call__(self, command, **kwargs):
        self.calls.append(command)
        target = command[command.index(DEBIAN.suite) + 1]
        if self.started is not None:
            self.started.set()
            self.release.wait(10)
        (root := Path(target)).mkdir(parents=True)
        (root / "etc" / "apt").mkdir(parents=True)
        (root / "etc" / "apt" / "sources.list").write_text(f"deb {DEBIAN.mirror} {DEBIAN.suite} main\n")
        (root / "var" / "cache" / "apt" / "archives").mkdir(parents=True)
        (root / "var" / "cache" / "apt" / "archives" / "bash_5.2_amd64.deb").write_bytes(b"deb")
        kwargs["stdout"].write(b"I: Base system installed successfully.\n")
        return subprocess.CompletedProcess(command, self.returncode)


def cache_with(tmp_path, run):
    return RootCache(tmp_path / "cache", say=lambda line: None, run=run, which=lambda name: f"/usr/sbin/{name}")


def test_a_root_is_built_once_in_its_own_mount_namespace_and_looks_like_the_image(tmp_path):
    debootstrap = FakeDebootstrap()
    cache = cache_with(tmp_path, debootstrap)
    root = cache.ensure(DEBIAN)
    assert root == cache.path(DEBIAN) and cache.cached(DEBIAN)
    assert cache.ensure(DEBIAN) == root
    assert len(debootstrap.calls) == 1
    command = debootstrap.calls[0]
    assert command[:4] == ["unshare", "--mount", "--propagation", "private"]
    assert "--variant=minbase" in command and f"--include={','.join(DEBIAN.packages)}" in command
    sources = (root / "etc" / "apt" / "sources.list.d" / "debian.sources").read_text()
    assert "Suites: bookworm bookworm-updates" in sources and "Suites: bookworm-security" in sources
    assert not (root / "etc" / "apt" / "sources.list").exists()
    assert list((root / "var" / "cache" / "apt" / "archives").iterdir()) == []
    assert "Base system installed" in (tmp_path / "cache" / f"{root.name}.log").read_text()
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == [root.name, f"{root.name}.lock", f"{root.name}.log"]


def test_a_failed_build_leaves_nothing_to_use_and_the_next_one_starts_clean(tmp_path):
    cache = cache_with(tmp_path, FakeDebootstrap(returncode=1))
    with pytest.raises(VmRootError, match=r"debootstrap exit status 1\); see .*\.log"):
        cache.ensure(DEBIAN)
    assert not cache.cached(DEBIAN)
    assert not cache.path(DEBIAN).with_name(cache.path(DEBIAN).name + ".partial").exists()
    # A build killed half way left its partial tree: the next build replaces it.
    cache.path(DEBIAN).with_name(cache.path(DEBIAN).name + ".partial").mkdir()
    assert cache_with(tmp_path, FakeDebootstrap()).ensure(DEBIAN).is_dir()


def test_a_second_emulator_waits_for_the_first_ones_build(tmp_path):
    started, release = threading.Event(), threading.Event()
    first = FakeDebootstrap(started=started, release=release)
    second = FakeDebootstrap()
    results = []
    builder = threading.Thread(target=lambda: results.append(cache_with(tmp_path, first).ensure(DEBIAN)))
    builder.start()
    assert started.wait(10)
    waiter = threading.Thread(target=lambda: results.append(cache_with(tmp_path, second).ensure(DEBIAN)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()  # it waits on the lock, it does not build
    release.set()
    builder.join(10)
    waiter.join(10)
    assert len(results) == 2 and results[0] == results[1]
    assert second.calls == []


def test_without_debootstrap_the_error_says_how_to_get_it(tmp_path):
    cache = RootCache(tmp_path / "cache", say=lambda line: None, run=FakeDebootstrap(), which=lambda name: None)
    with pytest.raises(VmRootError, match="apt-get install debootstrap"):
        cache.ensure(DEBIAN)


def test_host_problems_are_named(tmp_path, monkeypatch):
    filesystems = tmp_path / "filesystems"
    filesystems.write_text("nodev\tproc\n\text4\n")
    monkeypatch.setattr(rootfs.os, "geteuid", lambda: 1000)
    assert "need root" in rootfs.host_problem(str(filesystems))
    monkeypatch.setattr(rootfs.os, "geteuid", lambda: 0)
    assert "no overlayfs" in rootfs.host_problem(str(filesystems))
    filesystems.write_text("nodev\tproc\nnodev\toverlay\n")
    assert "nsenter missing" in rootfs.host_problem(str(filesystems), which=lambda name: None if name == "nsenter" else "/bin/" + name)
    assert rootfs.host_problem(str(filesystems), which=lambda name: "/bin/" + name) is None


def test_vm_root_is_an_option_of_the_emulator_and_of_the_local_stack():
    from cflow.cli import build_parser
    from cflow.local.launchers import ComputeOptions

    parser = build_parser()
    assert parser.parse_args(["emulator", "compute", "--vm-root", "debian-12"]).vm_root == "debian-12"
    assert parser.parse_args(["local", "up", "--vm-root", "debian-12"]).vm_root == "debian-12"
    assert parser.parse_args(["emulator", "compute"]).vm_root is None
    assert ComputeOptions(vm_root="debian-12").to_argv() == ["--vm-root", "debian-12"]
    assert ComputeOptions.from_json(ComputeOptions(vm_root="debian-12").to_json()) == ComputeOptions(vm_root="debian-12")


def test_an_emulator_that_cannot_run_vms_on_a_real_root_refuses_the_option_in_one_line(monkeypatch):
    from cflow.local.compute.emulator import EmulatorOptionError, EmulatorOptions

    monkeypatch.setattr(rootfs, "host_problem", lambda: "this kernel has no overlayfs (not in /proc/filesystems); load it with `modprobe overlay`")
    with pytest.raises(EmulatorOptionError, match=r"^--vm-root debian-12: this kernel has no overlayfs .*modprobe overlay`$"):
        EmulatorOptions(vm_root="debian-12").validate({"us-central1-a"})
    with pytest.raises(EmulatorOptionError, match="is unknown; use one of: debian-12"):
        EmulatorOptions(vm_root="windows").validate({"us-central1-a"})


@pytest.mark.skipif(os.geteuid() != 0, reason="making a whiteout (a 0/0 character device) and trusted.* attributes needs root")
def test_an_image_of_a_disk_on_a_real_root_keeps_its_whiteouts_and_opaque_directories(tmp_path):
    from cflow.local.compute.disk_images import DiskImages

    disk = tmp_path / "vm"
    upper = disk / "root"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "motd").write_text("changed\n")
    os.mknod(upper / "etc" / "debian_version", stat.S_IFCHR, 0)  # deleted from the root
    (upper / "srv").mkdir()
    os.setxattr(upper / "srv", "trusted.overlay.opaque", b"y")  # replaced, not merged
    (disk / ".overlay" / "work").mkdir(parents=True)
    (disk / "serial-port-1.log").write_text("console")

    images = DiskImages(str(tmp_path / "state"))
    tree = images.tree_dir("p", "img", 1)
    images.capture(str(disk), tree)
    images.hold(tree)
    copy = tmp_path / "copy"
    images.restore(tree, str(copy))

    for root in (Path(tree), copy):
        whiteout = os.lstat(root / "root" / "etc" / "debian_version")
        assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
        assert os.getxattr(root / "root" / "srv", "trusted.overlay.opaque") == b"y"
        assert (root / "root" / "etc" / "motd").read_text() == "changed\n"
        assert not (root / ".overlay").exists() and not (root / "serial-port-1.log").exists()
