"""Disk contents on the host: what ``images.insert`` captures, and what a VM made from that image starts with.

An emulated VM's boot disk is its disk directory (``vm.GuestLauncher.disk_dir``).
An image's content is a copy of that tree in ``STATE_DIR/images/PROJECT/NAME-ID/``,
without the emulator's own bookkeeping (``vm.BOOKKEEPING_PATHS``: the serial
log, the script files, the poweroff shim), which every boot writes anew, and
without sockets, FIFOs and device files, which a disk image cannot hold.
Symlinks are copied as symlinks; extended attributes are kept.

A VM on a real root (``guest_root``) has its disk in ``root/``, an overlay's
upper directory: what it deleted from the root is a whiteout there (a
character device 0/0), and a directory it replaced is marked opaque by an
extended attribute. Both are kept, so an image holds the deletions too.
"""

import logging
import os
import shutil
import stat
import threading
from collections.abc import Callable

from cflow.local.compute.vm import BOOKKEEPING_PATHS

logger = logging.getLogger(__name__)


class DiskImages:
    """Image trees on the host, safe against an image deleted while a VM is still being made from it.

    Args:
        state_dir: the emulator's state directory; trees live under ``state_dir/images/``.

    A VM created from an image ``hold``s its tree at once (under the engine's
    lock) and copies it at first boot (``restore``, outside the lock); a tree
    ``discard``ed meanwhile is removed only when the last hold is gone.
    """

    def __init__(self, state_dir: str) -> None:
        self.root = os.path.join(state_dir, "images")
        self._lock = threading.Lock()
        self._holds: dict[str, int] = {}
        self._discarded: set[str] = set()

    def tree_dir(self, project: str, name: str, image_id: int) -> str:
        """Where the content of image ``name`` (id ``image_id``) of ``project`` lives."""
        return os.path.join(self.root, project, f"{name}-{image_id}")

    def capture(self, disk_dir: str | None, tree_dir: str) -> int:
        """Copies the disk directory's tree into ``tree_dir``; returns its size in bytes.

        A disk with no directory (``disk_dir`` None: not a boot disk; or one
        that never booted) makes an empty image.

        Raises:
            OSError: the copy failed (``tree_dir`` is left out).
        """
        if disk_dir is None or not os.path.isdir(disk_dir):
            os.makedirs(tree_dir)
            return 0
        try:
            shutil.copytree(disk_dir, tree_dir, symlinks=True, ignore=self._ignore_for(disk_dir), copy_function=_copy_entry)
        except OSError as error:  # shutil.Error too: it lists every file that failed
            shutil.rmtree(tree_dir, ignore_errors=True)
            raise OSError(f"cannot copy {disk_dir} into an image: {error}") from None
        return _tree_size(tree_dir)

    def hold(self, tree_dir: str) -> None:
        """Keeps ``tree_dir`` on disk until ``restore`` or ``release`` for this hold."""
        with self._lock:
            self._holds[tree_dir] = self._holds.get(tree_dir, 0) + 1

    def release(self, tree_dir: str) -> None:
        """Drops one hold (the VM went before its first boot); removes a discarded tree with no holds left."""
        with self._lock:
            left = self._holds.get(tree_dir, 0) - 1
            if left > 0:
                self._holds[tree_dir] = left
                return
            self._holds.pop(tree_dir, None)
            remove = tree_dir in self._discarded
            self._discarded.discard(tree_dir)
        if remove:
            shutil.rmtree(tree_dir, ignore_errors=True)

    def restore(self, tree_dir: str, disk_dir: str) -> None:
        """Copies the image tree into a VM's disk directory, then drops the hold taken for it.

        Raises:
            OSError: the copy failed (the hold is dropped all the same).
        """
        try:
            shutil.copytree(tree_dir, disk_dir, symlinks=True, dirs_exist_ok=True, copy_function=_copy_entry)
        except shutil.Error as error:
            raise OSError(f"cannot copy image {tree_dir} into {disk_dir}: {error}") from None
        finally:
            self.release(tree_dir)

    def discard(self, tree_dir: str) -> None:
        """Removes an image's tree now, or when the last VM holding it has copied it."""
        with self._lock:
            if self._holds.get(tree_dir):
                self._discarded.add(tree_dir)
                return
        shutil.rmtree(tree_dir, ignore_errors=True)

    @staticmethod
    def _ignore_for(root: str) -> Callable[[str, list[str]], set[str]]:
        def ignore(directory: str, names: list[str]) -> set[str]:
            relative = os.path.relpath(directory, root)
            skipped = set()
            for name in names:
                path = os.path.normpath(os.path.join(relative, name))
                if path in BOOKKEEPING_PATHS:
                    skipped.add(name)
                    continue
                try:
                    mode = os.lstat(os.path.join(directory, name)).st_mode
                except FileNotFoundError:
                    skipped.add(name)  # gone while we looked: a temporary file of a process
                    continue
                if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode) or _is_whiteout(os.path.join(directory, name))):
                    skipped.add(name)
            return skipped

        return ignore


def _is_whiteout(path: str) -> bool:
    """True for an overlayfs whiteout: a character device with device number 0/0."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISCHR(status.st_mode) and status.st_rdev == 0


def _copy_entry(source: str, destination: str) -> str:
    """Copies a file with its metadata; a whiteout is made anew (it cannot be opened)."""
    # A running VM's files come and go (forceCreate); one deleted mid-copy is no part of the image.
    try:
        if _is_whiteout(source):
            if os.path.lexists(destination):
                os.unlink(destination)
            os.mknod(destination, stat.S_IFCHR | 0o000, 0)
            return destination
        return shutil.copy2(source, destination)
    except FileNotFoundError:
        return destination


def _tree_size(tree_dir: str) -> int:
    total = 0
    for directory, _, files in os.walk(tree_dir):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except FileNotFoundError:
                pass
    return total
