"""An instance's ``scheduling``: GCE's rules for it, its defaults, and when a time-limited VM must end.

``check`` validates a Scheduling body (instances.insert, bulkInsert's
instanceProperties, instances.setScheduling after ``merged``) and returns it
with GCE's defaults filled in. The rules and their messages, as GCE answers
them (400, reason ``invalid`` unless said otherwise):

- a preemptible VM with ``provisioningModel`` STANDARD: "For preemptible,
  only allowed provisioning_model value is SPOT." (skypilot-org/skypilot#3235);
- a Spot or preemptible VM with ``automaticRestart`` true, or with
  ``onHostMaintenance`` other than TERMINATE: "Scheduling must have
  preemptible be false when AutomaticRestart is true." / "... when
  OnHostMaintenance isn't TERMINATE." on ``scheduling.preemptible``
  (percona/mongo_terraform_ansible#34, travis-ci/worker#487);
- ``instanceTerminationAction`` on a standard VM without a time limit: "You
  cannot specify a termination action for a VM instance that has the
  standard provisioning model (default). ..." (cloudpilot-ai/karpenter-provider-gcp#155);
- a time limit (``maxRunDuration`` or ``terminationTime``) needs an
  ``instanceTerminationAction`` (400 ``required``; a Spot VM has STOP by
  default), lies between 30 seconds and 120 days, and is refused on a
  legacy preemptible VM (https://cloud.google.com/compute/docs/instances/limit-vm-runtime,
  "Limitations"); ``terminationTime`` is RFC 3339 and must be in the future
  when the VM starts (``refuse_past_termination``).

``termination_deadline`` is when a running VM's time limit runs out: its
last start plus ``maxRunDuration``, or ``terminationTime``, whichever comes
first. ``lifecycle`` arms a timer for it.
"""

import datetime
from typing import Any

from cflow.local.compute import api_errors
from cflow.local.compute.resources import rfc3339

MIN_RUN_S = 30
MAX_RUN_S = 120 * 24 * 3600
MAX_NANOS = 999_999_999
PROVISIONING_MODELS = ("STANDARD", "SPOT")
TERMINATION_ACTIONS = ("STOP", "DELETE")
# Fields only a TERMINATED VM may change with setScheduling (the API reference: "You can only call
# this method on a stopped instance"); the host maintenance policy may change on a running VM.
STOPPED_ONLY_FIELDS = ("provisioningModel", "preemptible", "instanceTerminationAction", "maxRunDuration", "terminationTime")
# What GCE derives from the provisioning model when they are not given. Not the termination
# action: a change that makes it invalid must clear it (gcloud's --clear-instance-termination-action).
_DERIVED_FIELDS = ("preemptible", "automaticRestart", "onHostMaintenance")

Scheduling = dict[str, Any]


def _expect_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise api_errors.invalid_field(field, value, "Expected a boolean.")
    return value


def parse_duration(value: Any, field: str) -> tuple[int, int]:
    """(seconds, nanos) of a Duration ``{"seconds": "N", "nanos": N}``; raises 400 for anything else."""
    if not isinstance(value, dict):
        raise api_errors.invalid_field(field, "", "Expected a Duration object: {\"seconds\": \"N\", \"nanos\": N}.")
    seconds, nanos = value.get("seconds", 0), value.get("nanos", 0)
    if isinstance(seconds, str) and seconds.lstrip("-").isdigit():
        seconds = int(seconds)
    if not isinstance(seconds, int) or isinstance(seconds, bool):
        raise api_errors.invalid_field(f"{field}.seconds", seconds, "Expected an integer.")
    if not isinstance(nanos, int) or isinstance(nanos, bool) or not 0 <= nanos <= MAX_NANOS:
        raise api_errors.invalid_field(f"{field}.nanos", nanos, f"Must be from 0 to {MAX_NANOS} inclusive.")
    return seconds, nanos


def parse_rfc3339(value: Any, field: str) -> float:
    """Epoch seconds of an RFC 3339 timestamp with an offset (``2030-01-02T03:04:05Z``); raises 400 otherwise."""
    text = value if isinstance(value, str) else ""
    try:
        moment = datetime.datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None or "T" not in text.upper():
        raise api_errors.invalid_field(field, value, "Must be a timestamp in RFC 3339 text format, e.g. 2030-01-02T03:04:05Z.")
    return moment.timestamp()


def check(scheduling: Any, field: str) -> Scheduling:
    """Returns the full Scheduling with GCE's defaults for the provisioning model.

    Args:
        scheduling: the body's ``scheduling`` (None: all defaults).
        field: where it is in the request, for messages (``resource.scheduling``).
    Raises:
        ApiError: 400 as GCE refuses the combination (see the module docstring).
    """
    if scheduling is None:
        scheduling = {}
    if not isinstance(scheduling, dict):
        raise api_errors.invalid_field(field, "", "Expected an object.")
    model = scheduling.get("provisioningModel") or "STANDARD"
    if model not in PROVISIONING_MODELS:
        raise api_errors.invalid_field(f"{field}.provisioningModel", model, "The emulator supports STANDARD and SPOT.")
    preemptible = _expect_bool(scheduling.get("preemptible", False), f"{field}.preemptible")
    if preemptible and scheduling.get("provisioningModel") == "STANDARD":
        raise api_errors.invalid_field(f"{field}.provisioningModel", "STANDARD", "For preemptible, only allowed provisioning_model value is SPOT.")
    interruptible = model == "SPOT" or preemptible
    automatic_restart = _expect_bool(scheduling.get("automaticRestart", not interruptible), f"{field}.automaticRestart")
    on_host_maintenance = scheduling.get("onHostMaintenance") or ("TERMINATE" if interruptible else "MIGRATE")
    if on_host_maintenance not in ("MIGRATE", "TERMINATE"):
        raise api_errors.invalid_field(f"{field}.onHostMaintenance", on_host_maintenance, "Must be MIGRATE or TERMINATE.")
    if interruptible and automatic_restart:
        raise api_errors.invalid_field(f"{field}.preemptible", "true", "Scheduling must have preemptible be false when AutomaticRestart is true.")
    if interruptible and on_host_maintenance != "TERMINATE":
        raise api_errors.invalid_field(f"{field}.preemptible", "true", "Scheduling must have preemptible be false when OnHostMaintenance isn't TERMINATE.")
    result: Scheduling = {
        "onHostMaintenance": on_host_maintenance,
        "automaticRestart": automatic_restart,
        "preemptible": interruptible,
        "provisioningModel": model,
    }
    time_limit = _time_limit(scheduling, field, legacy_preemptible=preemptible and model != "SPOT")
    result.update(time_limit)
    time_limited = bool(time_limit)
    action = scheduling.get("instanceTerminationAction")
    if action in (None, "", "INSTANCE_TERMINATION_ACTION_UNSPECIFIED"):
        if model == "SPOT":
            result["instanceTerminationAction"] = "STOP"
        elif time_limited:
            raise api_errors.required(f"{field}.instanceTerminationAction")
        return result
    if action not in TERMINATION_ACTIONS:
        raise api_errors.invalid_field(f"{field}.instanceTerminationAction", action, "Must be STOP or DELETE.")
    if not (interruptible or time_limited):
        detail = (
            "You cannot specify a termination action for a VM instance that has the standard provisioning model (default). "
            "To use instance termination action, the VM instance must use the Spot, Reservation-Bound or Flex Start provisioning model."
        )
        raise api_errors.invalid_field(f"{field}.instanceTerminationAction", action, detail)
    result["instanceTerminationAction"] = action
    return result


def _time_limit(scheduling: Scheduling, field: str, legacy_preemptible: bool) -> Scheduling:
    """The checked ``maxRunDuration`` and ``terminationTime`` of a Scheduling ({} when it has neither)."""
    duration = scheduling.get("maxRunDuration")
    termination_time = scheduling.get("terminationTime")
    result: Scheduling = {}
    if duration is None and termination_time in (None, ""):
        return result
    if legacy_preemptible:
        name = "maxRunDuration" if duration is not None else "terminationTime"
        raise api_errors.invalid_field(
            f"{field}.{name}", "", "Preemptible VMs do not support a time limit; use a Spot VM (provisioningModel SPOT) instead."
        )
    if duration is not None:
        seconds, nanos = parse_duration(duration, f"{field}.maxRunDuration")
        if not MIN_RUN_S <= seconds + nanos / 1e9 <= MAX_RUN_S:
            raise api_errors.invalid_field(
                f"{field}.maxRunDuration", f"{seconds}s", f"The run duration must be between {MIN_RUN_S} seconds and 120 days ({MAX_RUN_S} seconds)."
            )
        result["maxRunDuration"] = {"seconds": str(seconds), "nanos": nanos} if nanos else {"seconds": str(seconds)}
    if termination_time not in (None, ""):
        # Shown as GCE writes every timestamp: milliseconds and an offset.
        result["terminationTime"] = rfc3339(parse_rfc3339(termination_time, f"{field}.terminationTime"))
    return result


def refuse_past_termination(scheduling: Any, now_s: float, field: str) -> None:
    """Raises 400 if a Scheduling's ``terminationTime`` has passed: the VM could never run.

    Checked at insert, start and setScheduling, on the Scheduling as sent
    (the message quotes the value the client sent) or as kept.
    """
    termination_time = scheduling.get("terminationTime") if isinstance(scheduling, dict) else None
    if termination_time and parse_rfc3339(termination_time, f"{field}.terminationTime") <= now_s:
        raise api_errors.invalid_field(f"{field}.terminationTime", termination_time, "The termination time must be in the future.")


def termination_deadline(scheduling: Scheduling, last_start_s: float) -> float | None:
    """Epoch seconds at which a VM that entered RUNNING at ``last_start_s`` reaches its time limit (None: no limit)."""
    deadlines = []
    duration = scheduling.get("maxRunDuration")
    if duration is not None:
        seconds, nanos = parse_duration(duration, "scheduling.maxRunDuration")
        deadlines.append(last_start_s + seconds + nanos / 1e9)
    if scheduling.get("terminationTime"):
        deadlines.append(parse_rfc3339(scheduling["terminationTime"], "scheduling.terminationTime"))
    return min(deadlines) if deadlines else None


def merged(current: Scheduling, change: Any, field: str = "scheduling") -> Scheduling:
    """The raw Scheduling an instances.setScheduling ``change`` asks for, to be ``check``-ed.

    Fields absent from ``change`` keep their value, an explicit null clears one
    (as gcloud's ``--clear-*`` flags send it). What GCE derives from the
    provisioning model (``preemptible``, ``automaticRestart``,
    ``onHostMaintenance``) is derived again when the model or ``preemptible``
    changes and the change does not say it.
    """
    if not isinstance(change, dict):
        raise api_errors.invalid_field(field, "", "Expected an object.")
    result = dict(current)
    if result.get("preemptible") and result.get("provisioningModel") == "STANDARD" and "provisioningModel" not in change:
        # A legacy preemptible VM shows the default model; sent back, it would read as a request for STANDARD.
        result.pop("provisioningModel")
    if "provisioningModel" in change or "preemptible" in change:
        for derived in _DERIVED_FIELDS:
            if derived not in change:
                result.pop(derived, None)
    for key, value in change.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def stopped_only_changes(current: Scheduling, wanted: Scheduling) -> list[str]:
    """The fields of ``STOPPED_ONLY_FIELDS`` whose value differs between two checked Schedulings."""
    return [name for name in STOPPED_ONLY_FIELDS if current.get(name) != wanted.get(name)]
