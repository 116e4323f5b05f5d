"""One run's lifecycle around the reconcile step: its record, resume check, cancel, combine, and state.

The scheduler (``cflow.scheduler``) keeps a run's fleet at the size its work
needs; everything else that happens to a run happens here, once, for both
``cflow run`` (``cflow.run``) and the operator commands (``cflow.ops``):

- ``new_manifest``: the run's record (run.json) when it starts;
  ``check_resumable``: a resumed run must still have the settings it started
  with (the workers read the task's settings from run.json, the scheduler the
  VM shape from const.py);
- ``cancel_run``: mark it cancelled (first, so a cancel cut short still
  shows), delete its topics (so a scheduler still running stops on its next
  step instead of creating workers), delete its VMs until they are gone;
- ``delete_command`` / ``left_behind_lines``: a VM of the run still there
  at the end, named with the exact gcloud command that deletes it;
- ``combine_outputs``: concatenate the done items' outputs into the run's
  combined/ folder (in the bucket where it can, ``cflow.combine``) and
  download them into RESULT_DIR/RUN_ID (unless COMBINE_DOWNLOAD = False);
- ``run_state``: finished, cancelled, or in progress.
"""

import dataclasses
import logging
import shlex
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cflow import combine
from cflow.errors import CloudError, ConfigError

if TYPE_CHECKING:
    from cflow.config import Config
    from cflow.gcp.compute import Compute, Vm
    from cflow.gcp.pubsub import PubSub, RunTopics
    from cflow.gcp.storage import RunStorage

log = logging.getLogger(__name__)

STATE_FINISHED = "finished"
STATE_CANCELLED = "cancelled"
STATE_IN_PROGRESS = "in progress"

CANCEL_DEADLINE_SECONDS = 300.0
CANCEL_POLL_SECONDS = 1.0

# The settings a run keeps from its start, as (const.py name, run.json key, value in the Config).
# The workers read these from run.json, so const.py may not quietly differ on resume.
TASK_SETTINGS: tuple[tuple[str, str, Callable[["Config"], Any]], ...] = (
    ("TASK_MODULE_CMD", "task_command", lambda config: list(config.task_module_cmd)),
    ("TASK_TIMEOUT", "task_timeout", lambda config: config.task_timeout),
    ("MAX_ATTEMPTS", "max_attempts", lambda config: config.max_attempts),
    ("LEASE_SECONDS", "lease_seconds", lambda config: config.lease_seconds),
)
# The workers' shape: the scheduler takes it from const.py when it creates a VM, so a
# resumed run with other values would mix two kinds of workers. Keys of Config.to_dict(),
# which run.json keeps as "settings".
VM_SHAPE_SETTINGS = (
    "vm_type", "vm_spot", "vm_boot", "vm_stock_image", "vm_image_name", "vm_disk_gb", "vm_compute_service_account", "vm_labels",
    "vm_gpu_type", "vm_gpu_count",
    # Read by the workers from the record's settings (WorkerSettings.from_manifest), as the task settings are.
    "stage_inputs",
)


def run_state(item_count: int, done: int, failed: int, cancelled: bool) -> str:
    """The run's state: finished once every item is done or failed, else cancelled or in progress."""
    if done + failed >= item_count:
        return STATE_FINISHED
    return STATE_CANCELLED if cancelled else STATE_IN_PROGRESS


# ---------------------------------------------------------------- the record


def new_manifest(config: "Config", run_id: str, project: str, topics: "RunTopics", item_count: int, package_url: str, now: float) -> dict[str, Any]:
    """run.json of a new run: what its workers and a resumed scheduler read back."""
    return {
        "run_id": run_id,
        "created": now,
        "target": config.target,
        "project": project,
        "bucket": config.bucket,
        "topics": topics.to_dict(),
        "task_command": list(config.task_module_cmd),
        "task_timeout": config.task_timeout,
        # The workers keep a CSV output's header apart only for a run that combines (cflow.worker.record).
        "combine": config.combine,
        "max_attempts": config.max_attempts,
        "lease_seconds": config.lease_seconds,
        "idle_poweroff_seconds": max(120, 3 * config.lease_seconds),
        # Read by the workers' shutdown hooks: when a preempted item moves to the standard lane (cflow.lanes).
        "preemptions_before_standard": config.spot_preemptions_before_standard if config.vm_spot else None,
        "item_count": item_count,
        "package": package_url,
        "settings": config.to_dict(),
    }


def _shown(value: object) -> str:
    if isinstance(value, list) and all(isinstance(part, str) for part in value):
        return repr(shlex.join(value))
    return repr(value)


def changed_settings(manifest: Mapping[str, Any], config: "Config") -> list[str]:
    """The run's settings that const.py now has otherwise, one ``NAME: X at the start, Y in const.py`` each.

    A setting the run's record does not have (an older run) is not compared.
    """
    changes = []
    for name, key, current in TASK_SETTINGS:
        if key in manifest and manifest[key] != current(config):
            changes.append(f"{name} {_shown(manifest[key])} at the start, {_shown(current(config))} in const.py")
    started_with = manifest.get("settings") or {}
    now = config.to_dict()
    for key in VM_SHAPE_SETTINGS:
        if key in started_with and started_with[key] != now.get(key):
            changes.append(f"{key.upper()} {_shown(started_with[key])} at the start, {_shown(now.get(key))} in const.py")
    return changes


def check_resumable(manifest: Mapping[str, Any], config: "Config", run_id: str) -> None:
    """Refuse to resume a run whose task or VM settings differ in const.py now.

    Raises:
        ConfigError: one line naming each differing setting with both values.
    """
    changes = changed_settings(manifest, config)
    if changes:
        raise ConfigError(
            f"run {run_id} started with other settings than {config.config_path.name} has now: {'; '.join(changes)}; "
            "put the run's values back to resume it, or start a new run"
        )


# ---------------------------------------------------------------- cancel


@dataclasses.dataclass(frozen=True)
class CancelOutcome:
    """What a cancel did: the VMs listed when it began deleting, and those still listed at its deadline (names, and the VMs)."""

    vms_found: int
    vms_left: list[str]
    left_behind: "tuple[Vm, ...]" = ()


def delete_command(project: str, vm: "Vm") -> str:
    """The gcloud command that deletes ``vm``."""
    return f"gcloud compute instances delete {vm.name} --zone {vm.zone} --project {project} --quiet"


def left_behind_lines(run_id: str, project: str, vms: "Sequence[Vm]") -> list[str]:
    """One line per VM of the run still there (it may still bill), each with the command that deletes it, then what to do."""
    lines = [f"still there: VM {vm.name} ({vm.status or 'unknown'} in {vm.zone}); delete it: {delete_command(project, vm)}" for vm in vms]
    lines.append(f"run {run_id} did not clean up: {len(vms)} VM(s) of its own are still there and may bill until deleted; "
                 f"run the commands above, or `cflow cancel {run_id} --yes`")
    return lines


def cancel_run(
    storage: "RunStorage",
    pubsub: "PubSub",
    compute: "Compute",
    topics: "RunTopics | None",
    now: float,
    deadline_seconds: float = CANCEL_DEADLINE_SECONDS,
    poll_seconds: float = CANCEL_POLL_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> CancelOutcome:
    """Cancel a run: mark it, delete its topics and subscriptions, delete its VMs until gone.

    Outputs and logs are kept. Cancelling twice is fine: the first mark's time is kept.

    Args:
        storage: the run's ``RunStorage``.
        pubsub, compute: the seams of the run's project.
        topics: the run's topics (None: an older run without them in its record).
        now: wall-clock seconds, recorded in cancelled.json.
        deadline_seconds: how long to wait for the VMs to be gone.
    Returns:
        A ``CancelOutcome``.
    Raises:
        CloudError: a refusal, naming what could not be done.
    """
    storage.mark_cancelled(now)
    if topics is not None:
        pubsub.delete_run_topics(topics)
    run_id = storage.run_id
    try:
        found = len(compute.list_run_vms(run_id))
    except CloudError as error:
        raise CloudError(f"listing the VMs of run {run_id} failed: {error.message}") from error
    try:
        left = compute.delete_run_vms(run_id, deadline_seconds, poll_seconds, clock=clock, sleep=sleep)
    except CloudError as error:
        raise CloudError(f"deleting the VMs of run {run_id} failed: {error.message}") from error
    return CancelOutcome(vms_found=found, vms_left=[vm.name for vm in left], left_behind=tuple(left))


# ---------------------------------------------------------------- combine


# One combined output: its gs:// URL, and the local file it was downloaded to (None: left in the bucket).
CombinedFile = combine.Combined


def done_in_item_order(item_ids: Iterable[str], done_ids: set[str] | Mapping[str, object]) -> list[str]:
    """The done ones of ``item_ids``, in item order."""
    return [item_id for item_id in item_ids if item_id in done_ids]


def combine_outputs(
    storage: "RunStorage", done_item_ids: Sequence[str], result_dir: str | Path, download: bool = True
) -> dict[str, CombinedFile]:
    """Concatenate the done items' outputs into the run's combined/ folder and download them into ``result_dir/RUN_ID``.

    Only each item's recorded outputs count (those its done marker lists).
    Joined in the bucket where the copies allow it (``cflow.combine``).

    Args:
        storage: the run's ``RunStorage``.
        done_item_ids: the done items, in item order.
        result_dir: RESULT_DIR.
        download: False leaves the combined files in the bucket only (COMBINE_DOWNLOAD = False).
    Returns:
        ``{name: CombinedFile}`` in name order.
    Raises:
        ValueError: an output name is unsafe (see ``cflow.tasks.validate_output_name``).
        CloudError: reading, joining or uploading failed.
    """
    dest = Path(result_dir) / storage.run_id if download else None
    return combine.combine_outputs(storage, done_item_ids, dest)
