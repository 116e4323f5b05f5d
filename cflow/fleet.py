"""What a worker VM is made of: its instance properties for bulkInsert and their lane variants, its name, and which setting made each part.

- ``worker_instance_properties``: the body of the run's workers as const.py
  describes them (Spot or standard, as VM_SPOT says, in the Spot lane):
  machine type, scheduling with ``maxRunDuration`` from MAX_RUN_HOURS,
  network interface from VM_NETWORK, VM_SUBNETWORK and VM_EXTERNAL_IP, disk,
  service account, metadata, and the GPUs of VM_GPU_TYPE (``cflow.gpus``).
- ``lane_variant``: from that body, the body of a worker of another lane or
  provisioning model (``cflow.lanes``): a standard VM of the standard lane,
  or a standard VM of the Spot lane while Spot capacity is out. The lane is
  in the VM's label and metadata attribute ``LANE_ATTRIBUTE``; a body with
  GPUs keeps ``onHostMaintenance: TERMINATE``.
- ``vm_name`` / ``vm_number``; ``creation_request_id``: the ``requestId`` of a
  bulkInsert, derived from the run and the VM names.
- ``setting_to_change``: which const.py setting a GCE refusal of that body
  blames, and how to fix it (GCE names the field, resource or policy; this
  module knows which setting filled it).

The boot script is init.sh (see its header); a stock worker's metadata also
names the run's wheelhouse (``cflow.wheelhouse``), where it installs its
Python packages from. The shutdown script
(``SHUTDOWN_SCRIPT``, generated with the work directory's file names from
``cflow.protocol``) marks an idle worker stopping without starting Python, or
runs shutdown-signal.py from the downloaded package to hand the in-flight item
back.
"""

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from cflow import gpus, protocol
from cflow.config import Config
from cflow.errors import CloudError
from cflow.gcp.compute import RUN_LABEL, cflow_request_id
from cflow.zones import region_of

if TYPE_CHECKING:
    from cflow.wheelhouse import WheelhouseRef

# Workers need Pub/Sub and their run's objects, nothing else.
WORKER_SCOPES = (
    "https://www.googleapis.com/auth/pubsub",
    "https://www.googleapis.com/auth/devstorage.read_write",
    "https://www.googleapis.com/auth/logging.write",
)


def _shutdown_script() -> str:
    """The VM's metadata shutdown-script, with the work directory's file names taken from ``cflow.protocol``."""
    return f"""#!/bin/bash
# CFlow: hand the in-flight work item back before this VM goes (see shutdown-signal.py).
CFLOW_DIR="${{HOME:-/root}}/cflow"
PYTHON=python3
VENV="${{CFLOW_VM_ROOT:-}}/opt/cflow/venv"
if [ -x "$VENV/bin/python3" ]; then PYTHON="$VENV/bin/python3"; fi
# Nothing running or being recorded: mark the worker stopping under its own
# hand-back lock and skip starting Python (seconds per VM when a whole fleet is
# deleted). Any item the worker pulls from now on sees the mark under that lock
# and is nacked.
IDLE='[ ! -e "$1/{protocol.INFLIGHT_FILE}" ] && [ ! -e "$1/{protocol.SETTLING_FILE}" ] && touch "$1/{protocol.STOPPING_FLAG}"'
if command -v flock >/dev/null && [ -d "$CFLOW_DIR" ] && flock "$CFLOW_DIR/{protocol.HANDBACK_LOCK}" sh -c "$IDLE" sh "$CFLOW_DIR"; then
  echo "$(date -u +%FT%TZ) shutdown: nothing in flight" >>"$CFLOW_DIR/{protocol.SHUTDOWN_LOG}"
  exit 0
fi
exec "$PYTHON" "$CFLOW_DIR/{protocol.PACKAGE_DIR}/{protocol.SHUTDOWN_ENTRY}" >>"$CFLOW_DIR/{protocol.SHUTDOWN_LOG}" 2>&1
"""


SHUTDOWN_SCRIPT = _shutdown_script()


def vm_name(config: Config, run_id: str, number: int) -> str:
    """The name of the run's worker number ``number``: PREFIX-RUN_ID-0001."""
    return f"{config.vm_name_prefix}-{run_id}-{number:04d}"


def vm_number(config: Config, run_id: str, name: str) -> int | None:
    """The number of a VM named by ``vm_name``, or None for other names."""
    prefix = f"{config.vm_name_prefix}-{run_id}-"
    tail = name[len(prefix):] if name.startswith(prefix) else ""
    return int(tail) if tail.isdigit() else None


def boot_image(config: Config) -> str:
    """The boot disk's ``sourceImage``: a ``projects/...`` path, or the full URL as written in const.py.

    VM_IMAGE_NAME "family/NAME" (the newest image of the family) and a plain
    image name both live in the run's project.
    """
    if config.vm_boot == "stock":
        return config.vm_stock_image
    name = config.vm_image_name
    assert name is not None, "cflow.config requires VM_IMAGE_NAME when VM_BOOT is 'image'"
    if name.startswith(("projects/", "https://")):
        return name
    return f"projects/{config.project}/global/images/{name}"


SPOT_SCHEDULING = {
    "provisioningModel": "SPOT",
    # A preempted worker deletes itself: nothing stays billed, and the
    # scheduler creates a replacement on its next step.
    "instanceTerminationAction": "DELETE",
    "onHostMaintenance": "TERMINATE",
    "automaticRestart": False,
}
STANDARD_SCHEDULING = {"provisioningModel": "STANDARD", "onHostMaintenance": "MIGRATE", "automaticRestart": True}
# What makes a body Spot or standard; lane_variant replaces these and keeps the rest (a time limit, say).
_PROVISIONING_KEYS = ("provisioningModel", "preemptible", "instanceTerminationAction", "onHostMaintenance", "automaticRestart")


def creation_request_id(run_id: str, zone: str, names: Sequence[str]) -> str:
    """The ``requestId`` of the bulkInsert that creates ``names``: the same creation sent again gets the same id.

    Names are never reused within a run (and run ids are not reused), so two different creations never share one.
    """
    return cflow_request_id("cflow-workers", run_id, zone, *names)


def network_url(config: Config) -> str:
    """The interface's ``network``: VM_NETWORK as a path GCE takes."""
    return config.vm_network if "/" in config.vm_network else f"global/networks/{config.vm_network}"


def subnetwork_url(config: Config) -> str | None:
    """The interface's ``subnetwork``, or None to let GCE take the network's own subnetwork in the zone's region."""
    if config.vm_subnetwork is None:
        return None
    if "/" in config.vm_subnetwork:
        return config.vm_subnetwork
    return f"regions/{region_of(config.vm_zone)}/subnetworks/{config.vm_subnetwork}"


def network_interface(config: Config) -> dict[str, Any]:
    """The workers' one network interface; an external IP only with VM_EXTERNAL_IP (no access config otherwise)."""
    interface: dict[str, Any] = {"network": network_url(config)}
    subnetwork = subnetwork_url(config)
    if subnetwork is not None:
        interface["subnetwork"] = subnetwork
    if config.vm_external_ip:
        interface["accessConfigs"] = [{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}]
    return interface


def worker_instance_properties(
    config: Config, run_id: str, package_url: str, init_script_text: str, wheelhouse: "WheelhouseRef | None" = None
) -> dict[str, Any]:
    """The ``instanceProperties`` of a bulkInsert for this run's workers (the Spot lane's, Spot as VM_SPOT says).

    ``wheelhouse``: where a stock worker installs its Python packages from
    (``cflow.wheelhouse``; None when the workers have them).
    """
    scheduling: dict[str, Any] = dict(SPOT_SCHEDULING if config.vm_spot else STANDARD_SCHEDULING)
    if config.vm_gpu_type is not None:
        # GCE cannot live-migrate a VM with GPUs and refuses MIGRATE: it stops for host maintenance instead.
        scheduling["onHostMaintenance"] = gpus.ON_HOST_MAINTENANCE
    if config.max_run_hours is not None:
        # GCE deletes the worker when it has run this long, even if no controller is left to do it.
        scheduling["maxRunDuration"] = {"seconds": str(round(config.max_run_hours * 3600))}
        scheduling["instanceTerminationAction"] = "DELETE"
    labels = dict(config.vm_labels)
    labels.update({RUN_LABEL: run_id, "cflow-role": "worker", protocol.LANE_ATTRIBUTE: protocol.Lane.SPOT.value})
    properties: dict[str, Any] = {
        "machineType": config.vm_type,
        "scheduling": scheduling,
        "labels": labels,
        "disks": [
            {
                "boot": True,
                "autoDelete": True,
                "initializeParams": {"sourceImage": boot_image(config), "diskSizeGb": str(config.vm_disk_gb)},
            }
        ],
        "networkInterfaces": [network_interface(config)],
        "serviceAccounts": [{"email": config.vm_compute_service_account, "scopes": list(WORKER_SCOPES)}],
        "metadata": {
            "items": [
                {"key": "startup-script", "value": init_script_text},
                {"key": "shutdown-script", "value": SHUTDOWN_SCRIPT},
                {"key": "cflow-run", "value": run_id},
                {"key": "cflow-bucket", "value": config.bucket},
                {"key": "cflow-package", "value": package_url},
                {"key": protocol.LANE_ATTRIBUTE, "value": protocol.Lane.SPOT.value},
                *(wheelhouse.metadata_items() if wheelhouse is not None else []),
                *gpus.metadata_items(config),
            ]
        },
    }
    if config.vm_gpu_type is not None:
        properties["guestAccelerators"] = gpus.guest_accelerators(config)
    return properties


def lane_variant(properties: Mapping[str, Any], lane: protocol.Lane, spot: bool) -> dict[str, Any]:
    """The body of a worker of ``lane``, Spot or standard, made from the run's ``worker_instance_properties``.

    Only what makes a VM Spot or standard changes in ``scheduling`` (a time
    limit stays, and with it its termination action); the lane goes into the
    label and the metadata attribute ``LANE_ATTRIBUTE``.
    """
    variant = copy.deepcopy(dict(properties))
    scheduling = dict(variant.get("scheduling") or {})
    kept_action = scheduling.get("instanceTerminationAction")
    for key in _PROVISIONING_KEYS:
        scheduling.pop(key, None)
    scheduling.update(SPOT_SCHEDULING if spot else STANDARD_SCHEDULING)
    if not spot and kept_action is not None and ("maxRunDuration" in scheduling or "terminationTime" in scheduling):
        scheduling["instanceTerminationAction"] = kept_action  # GCE needs it beside a time limit
    if variant.get("guestAccelerators"):
        # GCE cannot live-migrate a VM with GPUs and refuses MIGRATE, standard VMs too.
        scheduling["onHostMaintenance"] = gpus.ON_HOST_MAINTENANCE
    variant["scheduling"] = scheduling
    variant["labels"] = {**variant.get("labels", {}), protocol.LANE_ATTRIBUTE: lane.value}
    items = [item for item in variant.get("metadata", {}).get("items", []) if item.get("key") != protocol.LANE_ATTRIBUTE]
    items.append({"key": protocol.LANE_ATTRIBUTE, "value": lane.value})
    variant["metadata"] = {**variant.get("metadata", {}), "items": items}
    return variant


def read_init_script(config: Config) -> str:
    """The text of init.sh beside const.py (the workers' startup-script)."""
    return (Path(config.base_dir) / "init.sh").read_text()


class SettingToChange(NamedTuple):
    """The const.py setting a refusal blames, and how to fix it (one clause, for the end of a line)."""

    setting: str
    fix: str


def _image_setting(config: Config) -> SettingToChange:
    if config.vm_boot == "image":
        return SettingToChange("VM_IMAGE_NAME", "set VM_IMAGE_NAME to an image that exists (`cflow image build` makes one)")
    return SettingToChange("VM_STOCK_IMAGE", "set VM_STOCK_IMAGE to a public image, e.g. 'projects/debian-cloud/global/images/family/debian-12'")


def _settings_by_part(config: Config) -> list[tuple[str, SettingToChange]]:
    """(part of a field, resource path or constraint, setting): the first part found in GCE's answer decides."""
    network, region = config.vm_network.rsplit("/", 1)[-1], region_of(config.vm_zone)
    external_ip = SettingToChange(
        "VM_EXTERNAL_IP",
        "set VM_EXTERNAL_IP = False in const.py (the workers then need Private Google Access on the subnetwork or Cloud NAT; "
        "see \"Running on GCP\" in the README)",
    )
    return [
        ("vmExternalIpAccess", external_ip),
        ("accessConfigs", external_ip),
        ("subnetwork", SettingToChange(
            "VM_SUBNETWORK",
            f"set VM_SUBNETWORK to a subnetwork of {network} in {region} (`gcloud compute networks subnets list --network {network}`), "
            "or None for the network's own",
        )),
        ("networks/", SettingToChange(
            "VM_NETWORK",
            f"create it (gcloud compute networks create {network} --subnet-mode=auto) or set VM_NETWORK in const.py "
            "to one of `gcloud compute networks list`",
        )),
        ("network", SettingToChange("VM_NETWORK", "set VM_NETWORK in const.py to one of `gcloud compute networks list`")),
        ("machineType", SettingToChange(
            "VM_TYPE", f"set VM_TYPE to a machine type the zones offer (`gcloud compute machine-types list --zones {config.vm_zone}`)"
        )),
        ("guestCpus", SettingToChange("VM_TYPE", "set VM_TYPE to a smaller machine type")),
        ("acceleratorCount", SettingToChange(
            "VM_GPU_COUNT", "set VM_GPU_COUNT to a card count VM_GPU_TYPE attaches to VM_TYPE (1, 2 or 4 for most types)"
        )),
        ("accelerator", SettingToChange(
            "VM_GPU_TYPE",
            f"set VM_GPU_TYPE to a type the zones offer (`gcloud compute accelerator-types list --filter=zone:{config.vm_zone}`), or None",
        )),
        ("serviceAccount", SettingToChange(
            "VM_COMPUTE_SERVICE_ACCOUNT",
            "set VM_COMPUTE_SERVICE_ACCOUNT to an account that exists and that the controller may act as "
            "(roles/iam.serviceAccountUser on it), or 'default'",
        )),
        ("diskSizeGb", SettingToChange("VM_DISK_GB", "set VM_DISK_GB to at least the image's size")),
        ("sourceImage", _image_setting(config)),
        ("images/", _image_setting(config)),
        ("requireShieldedVm", _image_setting(config)),
        ("trustedImageProjects", _image_setting(config)),
        ("maxRunDuration", SettingToChange("MAX_RUN_HOURS", "set MAX_RUN_HOURS between 30 seconds and 120 days, or None")),
        ("instanceTerminationAction", SettingToChange("MAX_RUN_HOURS", "set MAX_RUN_HOURS = None")),
        ("provisioningModel", SettingToChange("VM_SPOT", "set VM_SPOT = False for standard VMs")),
        ("labels", SettingToChange("VM_LABELS", "fix VM_LABELS (lowercase keys and values)")),
        ("zones/", SettingToChange("VM_ZONE", "pick zones from `gcloud compute zones list` for VM_ZONE and VM_FALLBACK_ZONES")),
    ]


def setting_to_change(error: CloudError, config: Config) -> SettingToChange | None:
    """The setting whose value made GCE refuse the workers, from what the refusal names; None when none is to blame.

    The policy constraint is read first, then the request field, then the resource.
    """
    table = _settings_by_part(config)
    for named in (error.constraint, error.field, error.resource):
        if not named:
            continue
        for part, blamed in table:
            if part in named:
                return blamed
    return None
