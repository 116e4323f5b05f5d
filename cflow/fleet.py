"""What a worker VM is made of: its instance properties for bulkInsert, and their lane variants.

``worker_instance_properties`` is the body of the run's workers as const.py
describes them (Spot or standard, as VM_SPOT says, in the Spot lane);
``lane_variant`` derives from it the body of a worker of another lane or
provisioning model (``cflow.lanes``): a standard VM of the standard lane, or
a standard VM of the Spot lane while Spot capacity is out. The lane is in
the VM's label and metadata attribute ``LANE_ATTRIBUTE``.

The boot script is init.sh (see its header). The shutdown script
(``SHUTDOWN_SCRIPT``, generated with the work directory's file names from
``cflow.protocol``) marks an idle worker stopping without starting Python, or
runs shutdown-signal.py from the downloaded package to hand the in-flight item
back.
"""

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cflow import protocol
from cflow.config import Config
from cflow.gcp.compute import RUN_LABEL

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


def worker_instance_properties(config: Config, run_id: str, package_url: str, init_script_text: str) -> dict[str, Any]:
    """The ``instanceProperties`` of a bulkInsert for this run's workers (the Spot lane's, Spot as VM_SPOT says)."""
    scheduling = dict(SPOT_SCHEDULING if config.vm_spot else STANDARD_SCHEDULING)
    labels = dict(config.vm_labels)
    labels.update({RUN_LABEL: run_id, "cflow-role": "worker", protocol.LANE_ATTRIBUTE: protocol.Lane.SPOT.value})
    return {
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
        "networkInterfaces": [
            {"network": "global/networks/default", "accessConfigs": [{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}]}
        ],
        "serviceAccounts": [{"email": config.vm_compute_service_account, "scopes": list(WORKER_SCOPES)}],
        "metadata": {
            "items": [
                {"key": "startup-script", "value": init_script_text},
                {"key": "shutdown-script", "value": SHUTDOWN_SCRIPT},
                {"key": "cflow-run", "value": run_id},
                {"key": "cflow-bucket", "value": config.bucket},
                {"key": "cflow-package", "value": package_url},
                {"key": protocol.LANE_ATTRIBUTE, "value": protocol.Lane.SPOT.value},
            ]
        },
    }


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
    variant["scheduling"] = scheduling
    variant["labels"] = {**variant.get("labels", {}), protocol.LANE_ATTRIBUTE: lane.value}
    items = [item for item in variant.get("metadata", {}).get("items", []) if item.get("key") != protocol.LANE_ATTRIBUTE]
    items.append({"key": protocol.LANE_ATTRIBUTE, "value": lane.value})
    variant["metadata"] = {**variant.get("metadata", {}), "items": items}
    return variant


def read_init_script(config: Config) -> str:
    """The text of init.sh beside const.py (the workers' startup-script)."""
    return (Path(config.base_dir) / "init.sh").read_text()
