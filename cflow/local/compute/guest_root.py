"""A VM on a real root (``--vm-root``): its own disk as an overlay on the cached root, in a mount namespace of its own.

A VM's disk directory (``STATE_DIR/vms/NAME-ID/``) then holds:

- ``root/``: the overlay's upper directory: everything the VM changed on the
  cached root (``rootfs``), whiteouts for what it deleted. This is the VM's
  disk: ``images.insert`` captures it, and a VM made from that image starts
  with it.
- ``.overlay/work`` and ``.overlay/mnt``: the overlay's work directory and
  mount point (bookkeeping, never part of an image).

While the VM runs, one small process (the *holder*, ``sleep infinity`` in
the VM's process group) keeps the VM's namespaces alive: made by ``unshare
--mount --uts --propagation private`` (the VM's hostname is its name), the
mount namespace holds the overlay, ``/proc``,
a minimal ``/dev`` (null, zero, full, random, urandom, tty, pts, shm) and
a tmpfs ``/run``. Every script of the VM enters that namespace (``nsenter``)
and runs chrooted in the overlay, as root, from ``/``, with bash, like
GCE's script runner. Nothing is mounted on the host: the mounts exist only
in the namespace, which the kernel tears down when its last process exits,
so powering the VM off (or the watchdog killing it after the emulator died)
leaves no mount behind.

Networking is the host's (the VM reaches the emulators, and package
registries through the host's DNS and CA bundle). ``metadata.google.internal``
is the VM's own: its metadata server also listens on an address of its own
(``127.77.X.Y:80``, ``metadata.MetadataServers.open_guest_address``) and each
boot writes it into the VM's ``/etc/hosts``, as GCE's guest agent writes its
line; ``GCE_METADATA_IP`` names it too, since 169.254.169.254 cannot be one
VM's own without a network namespace. Each boot also writes
``/etc/resolv.conf`` and the CA bundle (the host's: an organisation's image
carries its CA) and ``poweroff``/``shutdown``/``halt`` in ``/usr/local/sbin``,
which power this VM off through its metadata server.

This is fidelity, not isolation: a VM shares the host's network, processes
and kernel, and a root process can leave a chroot; run only scripts you
would run on the host.

The environment of a script is a GCE service's: PATH, HOME=/root, LANG, the
emulators' endpoints, ``GCE_METADATA_IP`` and ``CFLOW_VM_MARKER``; not
``CFLOW_EMULATED_VM`` nor ``CFLOW_VM_ROOT``: scripts take the path they take
on GCE (init.sh installs its packages).
"""

import logging
import os
import shlex
import shutil
from collections.abc import Mapping
from typing import Protocol

logger = logging.getLogger(__name__)

UPPER_DIR = "root"
OVERLAY_DIR = ".overlay"
# Rewritten at every boot; never part of an image.
SHIM_DIR = os.path.join("usr", "local", "sbin")
SHIM_NAMES = ("poweroff", "shutdown", "halt")
BOOKKEEPING_PATHS = (OVERLAY_DIR, *(os.path.join(UPPER_DIR, SHIM_DIR, name) for name in SHIM_NAMES))
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
HOST_RESOLV_CONF = "/etc/resolv.conf"
# Where the runner puts a script inside the VM (a tmpfs: never on the disk).
SCRIPT_DIR_TEMPLATE = "/run/metadata-scriptsXXXXXXXX"
READY_LINE = b"cflow-vm-root ready"

# The holder: mounts the VM's root in this (new) namespace, says so, then keeps the namespace alive.
_HOLDER_SCRIPT = r"""set -eu
lower=$1 upper=$2 work=$3 root=$4 name=$5
echo "$name" >/proc/sys/kernel/hostname
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$root"
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount -t tmpfs -o mode=755,nosuid,size=64k tmpfs "$root/dev"
mknod -m 666 "$root/dev/null" c 1 3
mknod -m 666 "$root/dev/zero" c 1 5
mknod -m 666 "$root/dev/full" c 1 7
mknod -m 666 "$root/dev/random" c 1 8
mknod -m 666 "$root/dev/urandom" c 1 9
mknod -m 666 "$root/dev/tty" c 5 0
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$root/run"
echo "cflow-vm-root ready"
exec sleep infinity >/dev/null
"""

# A script's way in: copy it into the VM's /run, then run it chrooted there with bash, from /.
_ENTER_SCRIPT = r"""set -eu
root=$1 source=$2 name=$3
directory=$(mktemp -d "$root@SCRIPT_DIR@")
cp "$source" "$directory/$name"
chmod 755 "$directory/$name"
exec chroot "$root" /bin/bash -c "${directory#"$root"}/$name"
""".replace("@SCRIPT_DIR@", SCRIPT_DIR_TEMPLATE)

# poweroff, shutdown and halt in the VM: ask this VM's metadata server, as the
# plain VMs' shim does; bash's /dev/tcp needs nothing the VM could have removed.
_POWEROFF_SHIM = r"""#!/bin/bash
# Compute emulator: powers this VM off (shutdown script, then every process
# stops; the instance ends TERMINATED), as poweroff does on GCE.
case " $* " in *" -r "*|*" --reboot "*|*" -c "*) echo "$0: only powering off is emulated" >&2; exit 1;; esac
exec 3<>/dev/tcp/metadata.google.internal/80 || { echo "$0: cannot reach the metadata server" >&2; exit 1; }
printf 'POST /cflow-emulator/v1/poweroff HTTP/1.0\r\nHost: metadata.google.internal\r\nMetadata-Flavor: Google\r\nContent-Length: 0\r\n\r\n' >&3
read -r _ status _ <&3 || status=""
[ "$status" = 200 ] || { echo "$0: the metadata server refused (HTTP $status)" >&2; exit 1; }
"""


class GuestAddresses(Protocol):
    """Gives a VM an address of its own for metadata.google.internal (``metadata.MetadataServers``)."""

    def open_guest_address(self, vm_key: int) -> str:
        """Serves VM ``vm_key``'s metadata on port 80 of an address of its own; returns that address."""
        ...


class GuestRoots:
    """Lays out and enters VMs on the real root ``root_dir``.

    Args:
        root_dir: the cached root (``rootfs.RootCache.ensure``), the overlay's lower directory.
        addresses: gives each VM its metadata address.
        ca_bundle, resolv_conf: the host's files every boot copies into the VM.
    """

    def __init__(self, root_dir: str, addresses: GuestAddresses, ca_bundle: str = HOST_CA_BUNDLE, resolv_conf: str = HOST_RESOLV_CONF) -> None:
        for character in ",:":
            if character in root_dir:
                raise ValueError(f"the VM root's path {root_dir!r} contains {character!r}, which overlayfs options cannot hold")
        self.root_dir = root_dir
        self.addresses = addresses
        self.ca_bundle = ca_bundle
        self.resolv_conf = resolv_conf
        self._unshare = shutil.which("unshare") or "unshare"
        self._nsenter = shutil.which("nsenter") or "nsenter"

    @staticmethod
    def upper_dir(disk_dir: str) -> str:
        """The VM's disk content: the overlay's upper directory."""
        return os.path.join(disk_dir, UPPER_DIR)

    def prepare(self, disk_dir: str, name: str, vm_key: int, services: Mapping[str, str]) -> dict[str, str]:
        """Lays out the disk and writes this boot's files into it; returns the scripts' environment.

        Args:
            disk_dir: the VM's disk directory.
            name: the VM's name (its hostname).
            vm_key: the instance id (its metadata server).
            services: the emulators' endpoints every VM gets (PUBSUB_EMULATOR_HOST...).

        Raises:
            OSError: the disk cannot be written, or no metadata address is free.
        """
        for character in ",:":
            if character in disk_dir:
                raise OSError(f"the VM's disk path {disk_dir!r} contains {character!r}, which overlayfs options cannot hold; use another --state-dir")
        upper = self.upper_dir(disk_dir)
        for path in (upper, os.path.join(disk_dir, OVERLAY_DIR, "work"), os.path.join(disk_dir, OVERLAY_DIR, "mnt")):
            os.makedirs(path, exist_ok=True)
        address = self.addresses.open_guest_address(vm_key)
        hosts = (
            "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n"
            f"127.0.1.1\t{name}\n"
            f"{address} metadata.google.internal metadata  # Added by the Compute emulator: this VM's metadata server\n"
        )
        files = {os.path.join("etc", "hosts"): hosts, os.path.join("etc", "hostname"): name + "\n"}
        copied = {os.path.join("etc", "resolv.conf"): self.resolv_conf, os.path.join("etc", "ssl", "certs", "ca-certificates.crt"): self.ca_bundle}
        for relative, source in copied.items():
            try:
                with open(source) as host_file:
                    files[relative] = host_file.read()
            except OSError as error:
                logger.warning("VM %s gets no %s: %s", name, relative, error)
        for relative, text in files.items():
            _write_replacing(os.path.join(upper, relative), text, 0o644)
        for shim in SHIM_NAMES:
            _write_replacing(os.path.join(upper, SHIM_DIR, shim), _POWEROFF_SHIM, 0o755)
        environment = {"PATH": GUEST_PATH, "HOME": "/root", "LANG": "C.UTF-8", **services, "GCE_METADATA_IP": address}
        return environment

    def holder_command(self, disk_dir: str, name: str) -> list[str]:
        """The holder: new mount and UTS namespaces (hostname ``name``) with the VM's root mounted; prints ``READY_LINE``, then sleeps."""
        overlay = os.path.join(disk_dir, OVERLAY_DIR)
        return [
            self._unshare, "--mount", "--uts", "--propagation", "private", "--", "/bin/sh", "-c", _HOLDER_SCRIPT, "cflow-vm-root",
            self.root_dir, self.upper_dir(disk_dir), os.path.join(overlay, "work"), os.path.join(overlay, "mnt"), name,
        ]  # fmt: skip

    def script_command(self, holder_pid: int, disk_dir: str, script_path: str, script_name: str) -> list[str]:
        """Runs the host file ``script_path`` in the VM, as ``/run/metadata-scripts.../SCRIPT_NAME``, chrooted in its root."""
        mount_point = os.path.join(disk_dir, OVERLAY_DIR, "mnt")
        return [
            self._nsenter, f"--target={holder_pid}", "--mount", "--uts", "--", "/bin/sh", "-c", _ENTER_SCRIPT, "cflow-vm-script",
            mount_point, script_path, script_name,
        ]  # fmt: skip

    def describe(self) -> str:
        """One line for logs: which root VMs run on."""
        return f"VMs run on the real root {shlex.quote(self.root_dir)}"


def _write_replacing(path: str, text: str, mode: int) -> None:
    """Writes ``path`` anew, whatever was there (an overlay whiteout is a device file, which cannot be opened for writing)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.cflow-new"
    with open(temporary, "w") as stream:
        stream.write(text)
    os.chmod(temporary, mode)
    os.replace(temporary, path)
