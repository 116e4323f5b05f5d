"""``cflow image build``: bake the workers' software into an image, through the Compute Engine API.

The seed's manual steps, automated: boot a standard VM from VM_STOCK_IMAGE
whose startup script (``build_script``) copies init.sh to /opt/cflow/init.sh
and has it install the Python client packages into /opt/cflow/venv from the
workers' wheelhouse in the bucket (``cflow.wheelhouse``: the same bytes a
stock worker installs, no apt-get, no package index; the build VM reads it
with VM_COMPUTE_SERVICE_ACCOUNT); wait until it says it is done on the
serial console; stop the VM; make an image of its boot disk in a family;
delete the VM. Workers booted from that image (``VM_BOOT = "image"``) skip
the install: init.sh finds the venv and uses it.

With ``--gpu`` the build script also installs the NVIDIA driver with
``cflow/gpu_driver.sh`` (Google's installer; see its header), so workers with
GPUs (VM_GPU_TYPE) boot with it ready. The installer reboots the build VM on
the way; the build script says so first (``REBOOT_NOTICE``), runs again after
the reboot, and the command keeps waiting for it. On the local emulator the
VM has no GPU: the script records what it would install in the image's
/opt/cflow/gpu-driver.log instead.

The same code builds on GCP and on the local Compute emulator. An emulated
image lives in the running local stack, so locally the command needs one
that is already up (a stack started just for the command would take the
image with it when it stops).
"""

import argparse
import dataclasses
import datetime
import functools
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from cflow.errors import CloudError, ConfigError, StackError
from cflow.package import WORKER_PACKAGES

if TYPE_CHECKING:
    from cflow.config import Config
    from cflow.gcp.compute import Compute
    from cflow.local.stack import StackInfo
    from cflow.wheelhouse import WheelhouseRef

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "const.py"
DEFAULT_FAMILY = "cflow-worker"
DEFAULT_TIMEOUT_S = 1800.0
BUILD_VM_PREFIX = "cflow-image-build"
BUILD_ROLE_LABEL = {"cflow-role": "image-build"}
# The build installs packages; any small standard machine does, in any zone.
BUILD_MACHINE_TYPE = "e2-standard-2"
# The build VM reads the wheelhouse from the bucket, nothing else.
BUILD_SCOPES = ("https://www.googleapis.com/auth/devstorage.read_only",)
POLL_INTERVAL_S = 2.0
QUIET_REPORT_EVERY_S = 30.0
MARKER = "cflow-image-build: "
READY_LINE = MARKER + "ready"
FAILED_LINE = MARKER + "failed"
# Said by the build script before a step that may reboot the VM: the end of the script that follows is not the build's end.
REBOOT_NOTICE = "the VM may reboot"
# How the serial console reports the startup script's end: the emulator writes
# "startup-script exit status N", GCE's guest agent "startup-script exit status N"
# or 'Script "startup-script" failed with error: exit status N'.
# Only the runner's own two forms: a script's own line ("...: startup-script: LINE")
# that mentions an exit status is not the script's end.
SCRIPT_EXIT_RE = re.compile(r'(?:: startup-script exit status (\d+)$|Script "startup-script" failed with error: exit status (\d+))')
NAME_RE = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")

BUILD_SCRIPT = r"""#!/bin/bash
# CFlow image build: the startup script of the build VM (`cflow image build`).
# It installs what workers need under /opt/cflow, then prints
# "cflow-image-build: ready", or "cflow-image-build: failed ..." on an error.
# The command waits for one of them on the serial console: on GCE a startup
# script's output goes there (google-startup-scripts.service logs to the
# journal and the console), on the emulator to the serial log.
#
# Every absolute path is prefixed with ${CFLOW_VM_ROOT:-}: empty on GCE, the
# VM's disk directory on the Compute emulator, whose VMs share the host's
# filesystem.
set -eEuo pipefail
ROOT="${CFLOW_VM_ROOT:-}"
VENV="$ROOT/opt/cflow/venv"
trap 'echo "cflow-image-build: failed: line $LINENO exited with status $?"' ERR

echo "cflow-image-build: started"
mkdir -p "$ROOT/opt/cflow"
if [ "${CFLOW_EMULATED_VM:-}" = "1" ]; then
  # An emulated VM runs on the host's Python: the host's packages stand in
  # for the ones a real build installs. So: a venv that sees them, no pip.
  echo "cflow-image-build: creating $VENV (emulated: the host's packages stand in)"
  python3 -m venv --system-site-packages --without-pip "$VENV"
  # A host that runs in a venv of its own keeps its packages there, not in
  # the base interpreter's site-packages that --system-site-packages adds.
  python3 -c 'import site; print("\n".join(site.getsitepackages()))' >"$(echo "$VENV"/lib/python3*/site-packages)/cflow-host.pth"
fi
cat >"$ROOT/opt/cflow/init.sh" <<'CFLOW_INIT_SH_END'
@INIT_SH@
CFLOW_INIT_SH_END
chmod 755 "$ROOT/opt/cflow/init.sh"
if [ "${CFLOW_EMULATED_VM:-}" != "1" ]; then
  # What a stock worker does at boot, once: the run's wheelhouse (instance
  # metadata cflow-wheelhouse), sha256 checked, installed with no index.
  echo "cflow-image-build: installing @PACKAGES@ from the workers' wheelhouse (init.sh, no package index)"
  CFLOW_INIT_INSTALL_ONLY=1 bash "$ROOT/opt/cflow/init.sh"
fi
"$VENV/bin/python3" -c 'import google.auth, google.cloud.pubsub, google.cloud.storage'
echo "cflow-image-build: the packages import in $VENV"
@GPU_STEP@sync
echo "cflow-image-build: ready"
"""


# The build script's GPU step (`cflow image build --gpu`): cflow/gpu_driver.sh, kept in the image too.
GPU_STEP = r"""cat >"$ROOT/opt/cflow/gpu_driver.sh" <<'CFLOW_GPU_DRIVER_END'
@GPU_DRIVER@
CFLOW_GPU_DRIVER_END
echo "cflow-image-build: installing the NVIDIA driver (gpu_driver.sh, Google's installer); @REBOOT_NOTICE@ on the way, and this script runs again after it"
bash "$ROOT/opt/cflow/gpu_driver.sh" image 2>&1 | sed -u 's/^/cflow-image-build:   /'
"""


class ImageBuildError(CloudError):
    """The build VM's script failed or did not finish, or the image could not be made."""


def build_script(init_script_text: str, gpu_driver_text: str | None = None) -> str:
    """The build VM's startup script, with ``init_script_text`` (init.sh) to copy to /opt/cflow/init.sh.

    ``gpu_driver_text``: cflow/gpu_driver.sh, for an image with the NVIDIA driver (``--gpu``); None: no GPU step.
    """
    if "\nCFLOW_INIT_SH_END\n" in f"\n{init_script_text}\n":
        raise ConfigError("init.sh contains the line CFLOW_INIT_SH_END, which the image build uses as a delimiter; remove it")
    gpu_step = ""
    if gpu_driver_text is not None:
        gpu_step = GPU_STEP.replace("@GPU_DRIVER@", gpu_driver_text.rstrip("\n")).replace("@REBOOT_NOTICE@", REBOOT_NOTICE)
    return (BUILD_SCRIPT.replace("@PACKAGES@", " ".join(WORKER_PACKAGES)).replace("@GPU_STEP@", gpu_step)
            .replace("@INIT_SH@", init_script_text.rstrip("\n")))


def default_image_name(family: str, now: datetime.datetime | None = None) -> str:
    """``FAMILY-YYYYMMDD-HHMMSS`` (UTC): sortable, and a new name at every build."""
    now = now or datetime.datetime.now(datetime.UTC)
    return f"{family}-{now:%Y%m%d-%H%M%S}"


def check_image_names(family: str, name: str) -> None:
    """Raises ConfigError unless ``family`` and ``name`` are valid image names (GCE's rule, 63 characters at most)."""
    if not NAME_RE.fullmatch(family):
        raise ConfigError(f"--family {family!r} is not a valid image family: lowercase letters, digits and -, starting with a letter, at most 63 characters")
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"--name {name!r} is not a valid image name: lowercase letters, digits and -, starting with a letter, "
                          "at most 63 characters; pass a shorter --name or --family")


def build_vm_body(
    name: str, zone: str, stock_image: str, disk_gb: int, labels: Mapping[str, str], startup_script: str,
    wheelhouse: "WheelhouseRef | None" = None, service_account: str | None = None,
) -> dict[str, Any]:
    """The instances.insert body of the build VM: standard (never Spot: a preempted build is wasted).

    With a ``wheelhouse`` it carries its metadata and ``service_account``
    with read-only Cloud Storage (to fetch it); without one (an emulated VM
    that uses this machine's packages), no service account.
    """
    metadata = [{"key": "startup-script", "value": startup_script}, *(wheelhouse.metadata_items() if wheelhouse else [])]
    body: dict[str, Any] = {
        "name": name,
        "machineType": f"zones/{zone}/machineTypes/{BUILD_MACHINE_TYPE}",
        "labels": {**labels, **BUILD_ROLE_LABEL},
        "scheduling": {"provisioningModel": "STANDARD", "onHostMaintenance": "MIGRATE", "automaticRestart": True},
        "disks": [
            {"boot": True, "autoDelete": True, "initializeParams": {"sourceImage": stock_image, "diskSizeGb": str(disk_gb)}}
        ],
        # As the workers have: the route to Cloud Storage on the default network.
        "networkInterfaces": [
            {"network": "global/networks/default", "accessConfigs": [{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}]}
        ],
        "metadata": {"items": metadata},
    }
    if wheelhouse is not None and service_account:
        body["serviceAccounts"] = [{"email": service_account, "scopes": list(BUILD_SCOPES)}]
    return body


@dataclasses.dataclass(frozen=True)
class BuildRequest:
    """What to build: the image's name and family, where, and from what."""

    image_name: str
    family: str
    zone: str
    stock_image: str
    disk_gb: int
    labels: dict[str, str]
    init_script_text: str
    timeout_s: float
    wheelhouse: "WheelhouseRef | None" = None  # what the build VM installs (None: an emulated VM uses this machine's packages)
    service_account: str | None = None  # reads the wheelhouse
    gpu_driver_text: str | None = None  # cflow/gpu_driver.sh: the image gets the NVIDIA driver (--gpu); None: no driver


class ImageBuilder:
    """Builds one image with a throwaway VM; the VM is deleted however the build ends.

    Args:
        compute: a ``cflow.gcp.compute.Compute``.
        out: where progress lines go (a text stream).
        clock: ``time.monotonic``-like, for the deadline.
        sleep: ``time.sleep``-like, between serial console reads.
        poll_interval_s: seconds between serial console reads.
    """

    def __init__(
        self,
        compute: "Compute",
        out: IO[str],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        self.compute = compute
        self.out = out
        self.clock = clock
        self.sleep = sleep
        self.poll_interval_s = poll_interval_s

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def build(self, request: BuildRequest, vm_name: str | None = None) -> dict[str, Any]:
        """Runs the whole build for a ``BuildRequest``. Returns the READY image's JSON.

        ``vm_name`` names the build VM (default: ``cflow-image-build-`` and 6 random hex digits).

        Raises:
            ImageBuildError: the build script failed or the deadline passed, or
                an operation (VM creation, stop, image creation) failed.
            CloudError: a refused request (one line, see ``cflow.errors``).
        """
        deadline = self.clock() + request.timeout_s
        vm_name = vm_name or f"{BUILD_VM_PREFIX}-{secrets.token_hex(3)}"
        script = build_script(request.init_script_text, request.gpu_driver_text)
        body = build_vm_body(vm_name, request.zone, request.stock_image, request.disk_gb, request.labels, script,
                             request.wheelhouse, request.service_account)
        self._say(f"creating build VM {vm_name} in {request.zone} from {request.stock_image}")
        operation = self.compute.insert_vm(request.zone, body)
        try:
            self._wait(operation, request.zone, f"creating build VM {vm_name}", deadline, fix=f"try another --zone than {request.zone}")
            self._wait_for_script(request.zone, vm_name, deadline)
            self._say(f"stopping {vm_name}")
            self._wait(self.compute.stop_vm(request.zone, vm_name), request.zone, f"stopping {vm_name}", deadline)
            self._say(f"creating image {request.image_name} (family {request.family}) from the disk of {vm_name}")
            operation = self.compute.insert_image_from_disk(
                request.image_name, request.family, request.zone, vm_name,
                f"CFlow worker image: {request.stock_image} with /opt/cflow/venv ({', '.join(WORKER_PACKAGES)}) and /opt/cflow/init.sh"
                + (", and the NVIDIA driver (/opt/cflow/gpu_driver.sh)" if request.gpu_driver_text is not None else ""),
            )
            self._wait(operation, None, f"creating image {request.image_name}", deadline)
            image = self.compute.get_image(request.image_name)
            if image.get("status") != "READY":
                raise ImageBuildError(f"image {request.image_name} is {image.get('status')} after its creation finished; delete it and build again")
            return image
        finally:
            self._delete_vm(request.zone, vm_name)

    def _wait(self, operation_name: str, zone: str | None, what: str, deadline: float, fix: str | None = None) -> dict[str, Any]:
        while True:
            operation = self.compute.wait_operation(operation_name, zone)
            if operation.get("status") == "DONE":
                errors = operation.get("error", {}).get("errors", [])
                if errors:
                    detail = errors[0].get("message") or errors[0].get("code", "unknown error")
                    raise ImageBuildError(f"{what} failed: {detail}" + (f"; {fix}" if fix else ""))
                return operation
            if self.clock() >= deadline:
                raise ImageBuildError(f"{what} did not finish before the deadline; raise --timeout or try again")

    def _wait_for_script(self, zone: str, vm_name: str, deadline: float) -> None:
        """Reads the serial console until the build script says ready; raises ImageBuildError on failure or at the deadline."""
        self._say(f"waiting for the build script on {vm_name} (serial console)")
        start, pending, last_news = 0, "", self.clock()
        started = last_news
        may_reboot = False
        while True:
            text, start = self.compute.serial_output(zone, vm_name, start)
            pending += text
            *lines, pending = pending.split("\n")
            for line in lines:
                if MARKER in line and REBOOT_NOTICE in line:
                    may_reboot = True
                elif may_reboot and FAILED_LINE not in line and SCRIPT_EXIT_RE.search(line.rstrip()):
                    # The VM rebooted (the step said it might): the script runs again, and says what it does.
                    may_reboot = False
                    self._say("  the build VM rebooted; waiting for the build script to carry on")
                    last_news = self.clock()
                    continue
                outcome = self._outcome_of(line, vm_name)
                if outcome == "ready":
                    self._say(f"build script finished on {vm_name} in {self.clock() - started:.0f} s")
                    return
                if line.find(MARKER) >= 0:
                    self._say(f"  {line[line.find(MARKER) + len(MARKER):].strip()}")
                    last_news = self.clock()
            now = self.clock()
            if now >= deadline:
                raise ImageBuildError(
                    f"the build script on {vm_name} did not finish within the deadline; raise --timeout, "
                    "or look at its output with `gcloud compute instances get-serial-port-output` during a new build"
                )
            if now - last_news >= QUIET_REPORT_EVERY_S:
                self._say(f"  still waiting for the build script ({now - started:.0f} s)")
                last_news = now
            self.sleep(self.poll_interval_s)

    @staticmethod
    def _outcome_of(line: str, vm_name: str) -> str | None:
        """'ready', None, or raises ImageBuildError for a line that says the script failed or ended without ready."""
        if READY_LINE in line and line.rstrip().endswith(READY_LINE):
            return "ready"
        if FAILED_LINE in line:
            raise ImageBuildError(f"the build script failed on {vm_name}: {line[line.find(FAILED_LINE):].strip()}; fix it (see the message) and build again")
        match = SCRIPT_EXIT_RE.search(line.rstrip())
        if match:
            raise ImageBuildError(f"the build script on {vm_name} ended with exit status {match.group(1) or match.group(2)} before it was ready; "
                                  "build again, or check VM_STOCK_IMAGE")
        return None

    def _delete_vm(self, zone: str, vm_name: str) -> None:
        try:
            operation = self.compute.delete_vm(zone, vm_name)
            if operation is not None:
                self.compute.wait_operation(operation, zone)
            self._say(f"deleted build VM {vm_name}")
        except (CloudError, OSError) as error:
            log.warning("could not delete build VM %s (%s); delete it with `gcloud compute instances delete %s --zone %s`", vm_name, error, vm_name, zone)


# ---------------------------------------------------------------- the command


def add_parser(subparsers: Any) -> None:
    """Register ``image`` with its sub-subcommand ``build``."""
    image = subparsers.add_parser("image", help="build the workers' VM image (VM_BOOT = \"image\")")
    actions = image.add_subparsers(dest="image_command", metavar="ACTION")
    image.set_defaults(func=lambda args: (image.print_help(), 2)[1])
    build = actions.add_parser(
        "build",
        help="bake the Python packages and init.sh into an image, and print the const.py lines that use it",
        description="Create a standard VM from VM_STOCK_IMAGE whose startup script installs the Google client "
        "packages into /opt/cflow/venv and copies init.sh to /opt/cflow/init.sh; wait for it on the serial console; "
        "stop the VM, create the image from its boot disk in the family, delete the VM (always, even on failure). "
        "Locally the image lives in the running local stack: start one first with `cflow local up`, since a stack "
        "started just for this command would take the image with it when it stops.",
    )
    build.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs")
    build.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH", help="settings file (default: ./const.py)")
    build.add_argument("--family", default=DEFAULT_FAMILY, metavar="F",
                       help=f"image family (default {DEFAULT_FAMILY}); VM_IMAGE_NAME = \"family/F\" boots its newest image")
    build.add_argument("--name", metavar="NAME", help="image name (default: F-YYYYMMDD-HHMMSS, UTC)")
    build.add_argument("--zone", metavar="Z", help="zone of the build VM (default: VM_ZONE)")
    where = build.add_mutually_exclusive_group()
    where.add_argument("--local", dest="target", action="store_const", const="local", help="build on the running local stack (overrides TARGET)")
    where.add_argument("--gcp", dest="target", action="store_const", const="gcp", help="build on Google Cloud (overrides TARGET)")
    build.add_argument("--stack-dir", default=None, metavar="DIR",
                       help="running local stack's folder (default: .cflow/local beside const.py); never started here")
    build.add_argument("--gpu", action="store_true",
                       help="also install the NVIDIA driver the way Google documents for Debian 12 (cflow/gpu_driver.sh), "
                       "for workers with GPUs (VM_GPU_TYPE); the build VM reboots on the way")
    build.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                       help=f"give up after S seconds in all, deleting the build VM (default {DEFAULT_TIMEOUT_S:g})")
    build.set_defaults(func=build_command)


def _compute_for(config: "Config", stack_dir: str | None) -> "tuple[Compute, StackInfo | None]":
    """The Compute seam for the config's target, and locally the running stack it uses (never one started here)."""
    from cflow.gcp.clients import build_compute, build_local_compute, credentials_for
    from cflow.gcp.compute import Compute

    if not config.is_local:
        credentials, _ = credentials_for("gcp", config.credential_file)
        return Compute(build_compute(credentials), config.project), None
    from cflow.local.stack import LocalStack

    folder = Path(stack_dir) if stack_dir else config.base_dir / ".cflow" / "local"
    info = LocalStack(folder).info()
    if info is None:
        raise StackError(
            f"no local stack is running in {folder}; start it with `cflow local up --dir {folder}` "
            "(the image lives in that stack, so it must outlive this command)"
        )
    return Compute(build_local_compute(info.compute_endpoint, info.compute_token_file), config.project), info


def _wheelhouse_for(config: "Config", stack: "StackInfo | None", say: Callable[[str], None]) -> "WheelhouseRef | None":
    """The workers' wheelhouse the build VM installs, in the bucket; None when the build VM uses this machine's packages (emulated)."""
    from cflow import wheelhouse
    from cflow.gcp.clients import build_storage_client
    from cflow.gcp.storage import Bucket

    if not wheelhouse.stock_vms_install(config, stack.vm_root if stack else None):
        return None
    if stack is not None:
        os.environ.update(stack.env())  # the storage client finds the stack's fake-gcs-server here
    bucket = Bucket(build_storage_client(config.target, config.project, config.credential_file), config.bucket)
    # As `cflow run`: locally the default bucket is made on demand, a bucket named in const.py must exist.
    bucket.ensure_exists(create_if_missing=config.is_local and config.bucket == f"{config.project}-cflow")
    return wheelhouse.prepare(bucket, say)


def build_command(args: argparse.Namespace, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """``cflow image build``: returns 0 and prints the image and the const.py lines, or raises a CflowError."""
    from cflow.config import load_config
    from cflow.fleet import read_init_script
    from cflow.gpus import DRIVER_SCRIPT

    out = out or sys.stdout
    err = err or sys.stderr
    if args.timeout <= 0:
        raise ConfigError(f"--timeout {args.timeout:g} must be a positive number of seconds")
    config = load_config(args.config, {"TARGET": args.target} if args.target else None)
    name = args.name or default_image_name(args.family)
    check_image_names(args.family, name)
    zone = args.zone or config.vm_zone
    compute, stack = _compute_for(config, args.stack_dir)
    if not compute.zone_exists(zone):
        raise ConfigError(f"zone {zone} does not exist in project {config.project}; pass --zone, e.g. {config.vm_zone}")
    compute.check_image(config.vm_stock_image)
    if compute.image_exists(name):
        raise ConfigError(f"image {name} already exists in project {config.project}; pass another --name")
    request = BuildRequest(
        image_name=name, family=args.family, zone=zone, stock_image=config.vm_stock_image, disk_gb=config.vm_disk_gb,
        labels=dict(config.vm_labels), init_script_text=read_init_script(config), timeout_s=args.timeout,
        wheelhouse=_wheelhouse_for(config, stack, functools.partial(print, file=err, flush=True)),
        service_account=config.vm_compute_service_account,
        gpu_driver_text=DRIVER_SCRIPT.read_text() if args.gpu else None,
    )
    image = ImageBuilder(compute, err).build(request)
    if args.gpu:
        print("the image has the NVIDIA driver: workers with VM_GPU_TYPE booted from it start their tasks without installing it",
              file=err, flush=True)
    print(f"image: {image['name']} (family {args.family}, project {config.project})", file=out)
    print("to boot the workers from it, put these lines in const.py:", file=out)
    print('VM_BOOT = "image"', file=out)
    print(f'VM_IMAGE_NAME = "family/{args.family}"', file=out, flush=True)
    return 0
