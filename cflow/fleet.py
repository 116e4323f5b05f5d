"""What a worker VM is made of: its instance properties for bulkInsert.

The boot script is init.sh (see its header); the shutdown script runs
shutdown-signal.py from the downloaded package to hand the in-flight item back.
"""

from pathlib import Path

from cflow.gcp.compute import RUN_LABEL

# Workers need Pub/Sub and their run's objects, nothing else.
WORKER_SCOPES = (
    "https://www.googleapis.com/auth/pubsub",
    "https://www.googleapis.com/auth/devstorage.read_write",
    "https://www.googleapis.com/auth/logging.write",
)

SHUTDOWN_SCRIPT = """#!/bin/bash
# CFlow: hand the in-flight work item back before this VM goes (see shutdown-signal.py).
CFLOW_DIR="${HOME:-/root}/cflow"
PYTHON=python3
VENV="${CFLOW_VM_ROOT:-}/opt/cflow/venv"
if [ -x "$VENV/bin/python3" ]; then PYTHON="$VENV/bin/python3"; fi
# Nothing running or being recorded: mark the worker stopping under its own
# hand-back lock and skip starting Python (seconds per VM when a whole fleet is
# deleted). Any item the worker pulls from now on sees the mark under that lock
# and is nacked.
IDLE='[ ! -e "$1/inflight.json" ] && [ ! -e "$1/settling.json" ] && touch "$1/stopping"'
if command -v flock >/dev/null && [ -d "$CFLOW_DIR" ] && flock "$CFLOW_DIR/handback.lock" sh -c "$IDLE" sh "$CFLOW_DIR"; then
  echo "$(date -u +%FT%TZ) shutdown: nothing in flight" >>"$CFLOW_DIR/shutdown.log"
  exit 0
fi
exec "$PYTHON" "$CFLOW_DIR/package/shutdown-signal.py" >>"$CFLOW_DIR/shutdown.log" 2>&1
"""


def vm_name(config, run_id, number):
    return f"{config.vm_name_prefix}-{run_id}-{number:04d}"


def vm_number(config, run_id, name):
    """The number of a VM named by ``vm_name``, or None for other names."""
    prefix = f"{config.vm_name_prefix}-{run_id}-"
    tail = name[len(prefix):] if name.startswith(prefix) else ""
    return int(tail) if tail.isdigit() else None


def boot_image(config):
    """The boot disk's ``sourceImage``: a ``projects/...`` path, or the full URL as written in const.py.

    VM_IMAGE_NAME "family/NAME" (the newest image of the family) and a plain
    image name both live in the run's project.
    """
    if config.vm_boot == "stock":
        return config.vm_stock_image
    name = config.vm_image_name
    if name.startswith(("projects/", "https://")):
        return name
    return f"projects/{config.project}/global/images/{name}"


def worker_instance_properties(config, run_id, package_url, init_script_text):
    """The ``instanceProperties`` of a bulkInsert for this run's workers."""
    if config.vm_spot:
        scheduling = {
            "provisioningModel": "SPOT",
            # A preempted worker deletes itself: nothing stays billed, and the
            # scheduler creates a replacement on its next step.
            "instanceTerminationAction": "DELETE",
            "onHostMaintenance": "TERMINATE",
            "automaticRestart": False,
        }
    else:
        scheduling = {"provisioningModel": "STANDARD", "onHostMaintenance": "MIGRATE", "automaticRestart": True}
    labels = dict(config.vm_labels)
    labels.update({RUN_LABEL: run_id, "cflow-role": "worker"})
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
            ]
        },
    }


def read_init_script(config):
    return (Path(config.base_dir) / "init.sh").read_text()
