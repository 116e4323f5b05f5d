"""GPUs on the workers (VM_GPU_TYPE, VM_GPU_COUNT): what the body asks for, how GCE counts and places them, what they cost.

- ``guest_accelerators``: the body's ``guestAccelerators``; the type is a bare
  name in a bulkInsert's ``instanceProperties`` and a zonal URL
  (``zones/ZONE/acceleratorTypes/TYPE``) in an ``instances.insert`` body, as
  GCE takes them. ``ON_HOST_MAINTENANCE``: GCE cannot live-migrate a VM with
  GPUs, so it refuses ``MIGRATE``; ``cflow.fleet`` sets ``TERMINATE``.
- ``metadata_items``: the VM's ``cflow-gpu-count`` attribute; init.sh reads
  it and, above 0, runs ``DRIVER_SCRIPT`` (``gpu_driver.sh`` beside this
  module, which installs the NVIDIA driver the way Google documents) before
  the worker starts. ``gpu_count`` is what the task sees as ``CFLOW_GPU_COUNT``.
- ``gpu_quota_metric``: the regional quota a worker's GPUs count in
  (``NVIDIA_T4_GPUS``; ``PREEMPTIBLE_NVIDIA_T4_GPUS`` for Spot once the region
  has that quota, as GCE counts them). The project-wide one is
  ``PROJECT_GPU_METRIC``. ``cflow.preflight`` checks both, and which zones
  offer the type.
- ``machine_type_problem``: T4, P4, P100 and V100 attach only to N1 machine types.
- ``accelerators_of`` a worker body, ``describe``, ``worker_hourly_price``
  and ``price_note``: a worker's GPUs as the dry run and the summary name
  them, and its price from PRICES (machine type plus GPUs).
"""

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cflow.config import Config

log = logging.getLogger(__name__)

DRIVER_SCRIPT = Path(__file__).with_name("gpu_driver.sh")
# The instance metadata attribute init.sh reads: how many GPUs the VM has (absent: none).
GPU_COUNT_ATTRIBUTE = "cflow-gpu-count"
ON_HOST_MAINTENANCE = "TERMINATE"
PROJECT_GPU_METRIC = "GPUS_ALL_REGIONS"
# GCE attaches these only to N1 machine types (L4 and A100 come with their own G2 and A2 types).
N1_ONLY_TYPES = ("nvidia-tesla-t4", "nvidia-tesla-p4", "nvidia-tesla-p100", "nvidia-tesla-v100")


class HasLimit(Protocol):
    """A quota as ``cflow.gcp.compute.Quota`` holds it (only its limit is read here)."""

    @property
    def limit(self) -> float: ...


def gpu_count(config: "Config") -> int:
    """GPUs per worker: VM_GPU_COUNT with a VM_GPU_TYPE, else 0."""
    return config.vm_gpu_count if config.vm_gpu_type is not None else 0


def guest_accelerators(config: "Config", zone: str | None = None) -> list[dict[str, Any]]:
    """The body's ``guestAccelerators``; [] without VM_GPU_TYPE.

    Args:
        zone: None for a bulkInsert's ``instanceProperties`` (the bare type
            name); a zone for an ``instances.insert`` body (its zonal URL).
    """
    if config.vm_gpu_type is None:
        return []
    accelerator_type = config.vm_gpu_type if zone is None else f"zones/{zone}/acceleratorTypes/{config.vm_gpu_type}"
    return [{"acceleratorType": accelerator_type, "acceleratorCount": config.vm_gpu_count}]


def metadata_items(config: "Config") -> list[dict[str, str]]:
    """The metadata attribute that makes init.sh install the driver at boot; [] without GPUs."""
    count = gpu_count(config)
    return [{"key": GPU_COUNT_ATTRIBUTE, "value": str(count)}] if count else []


def type_name(accelerator_type: str) -> str:
    """``nvidia-tesla-t4`` from a bare name or any URL of the type."""
    return accelerator_type.rsplit("/", 1)[-1]


def quota_metric_name(accelerator_type: str, preemptible: bool = False) -> str:
    """The quota metric of a GPU type as GCE names it: "nvidia-tesla-t4" -> "NVIDIA_T4_GPUS" (or "PREEMPTIBLE_NVIDIA_T4_GPUS")."""
    name = type_name(accelerator_type).removeprefix("nvidia-").removeprefix("tesla-")
    metric = f"NVIDIA_{name.upper().replace('-', '_')}_GPUS"
    return f"PREEMPTIBLE_{metric}" if preemptible else metric


def gpu_quota_metric(accelerator_type: str, spot: bool, quotas: "Mapping[str, HasLimit]") -> str:
    """The regional quota metric a worker's GPUs of this type count in.

    Spot GPUs count in ``PREEMPTIBLE_<GPU>_GPUS`` once the region has that
    quota (a limit above 0); without it they count in the standard metric, as
    GCE documents for preemptible quota (and as ``cflow.preflight.cpu_metric``
    does for vCPUs).
    """
    preemptible = quota_metric_name(accelerator_type, preemptible=True)
    if spot and preemptible in quotas and quotas[preemptible].limit > 0:
        return preemptible
    return quota_metric_name(accelerator_type)


def machine_type_problem(accelerator_type: str, machine_type: str) -> str | None:
    """Why GCE would refuse this GPU type on this machine type, or None when CFlow knows no rule against it."""
    name = type_name(accelerator_type)
    if name in N1_ONLY_TYPES and not machine_type.startswith("n1-"):
        return f"{name} GPUs attach only to N1 machine types, and VM_TYPE is {machine_type}"
    return None


def accelerators_of(properties: Mapping[str, Any]) -> list[tuple[str, int]]:
    """``[(type name, count)]`` of a worker body's ``guestAccelerators`` ([] without GPUs)."""
    return [(type_name(str(entry["acceleratorType"])), int(entry.get("acceleratorCount", 1)))
            for entry in properties.get("guestAccelerators") or []]


def describe(accelerators: Sequence[tuple[str, int]]) -> str:
    """``1 x nvidia-tesla-t4`` (per worker), or "" without GPUs."""
    return ", ".join(f"{count} x {name}" for name, count in accelerators)


def worker_hourly_price(config: "Config", accelerators: Sequence[tuple[str, int]], spot: bool | None = None) -> float | None:
    """Estimated USD per worker-hour from PRICES: its machine type plus its GPUs.

    Args:
        accelerators: the worker's GPUs (``accelerators_of`` its body).
        spot: Spot prices if True; defaults to VM_SPOT.
    Returns:
        The price, or None when PRICES lacks the machine type or a GPU type.
    """
    total = config.hourly_price() if spot is None else config.hourly_price(spot=spot)
    for name, count in accelerators:
        gpu = config.hourly_price(name, spot=spot)
        if total is None or gpu is None:
            return None
        total += gpu * count
    return total


def price_note(config: "Config", accelerators: Sequence[tuple[str, int]], spot: bool | None = None) -> str:
    """What PRICES says one worker costs: ``$0.04/hour per Spot n1-standard-4 + 1 x $0.11/hour per nvidia-tesla-t4``.

    Names the entry PRICES lacks when there is no estimate.
    """
    spot = config.vm_spot if spot is None else spot
    machine = config.hourly_price(spot=spot)
    if machine is None:
        return f"no estimate: add {config.vm_type} to PRICES in const.py"
    parts = [f"${machine}/hour per {'Spot' if spot else 'standard'} {config.vm_type}"]
    for name, count in accelerators:
        gpu = config.hourly_price(name, spot=spot)
        if gpu is None:
            return f"no estimate: add {name} to PRICES in const.py"
        parts.append(f"{count} x ${gpu}/hour per {name}")
    return " + ".join(parts)
