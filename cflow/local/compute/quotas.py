"""Allocation quotas: their limits (``--quota``), what each VM uses, and GCE's refusals.

Limits come from ``--quota METRIC=N`` (every region) and ``--quota
REGION:METRIC=N`` (one region; it wins over the former); ``--cpu-quota N``
is ``--quota CPUS=N``. A metric not set is generous (``GENEROUS_LIMIT``),
except the preemptible ones, which are 0 as in a GCE project that was never
granted preemptible quota.

What counts where, as GCE counts it:

- ``CPUS``: the vCPUs of a region's VMs that are not TERMINATED. Spot and
  preemptible VMs count here too unless the region has ``PREEMPTIBLE_CPUS``
  quota (a limit above 0, or any limit set with ``--quota``, 0 included: a
  grant capped by an override): then they count there instead (GCE: "After
  Compute Engine grants you preemptible CPU quota in that region, all
  preemptible instances count against that quota");
- ``NVIDIA_T4_GPUS`` and the other GPU metrics: the cards of a region's
  live VMs; a Spot VM's cards go to ``PREEMPTIBLE_NVIDIA_T4_GPUS`` when that
  quota is granted, by the same rule;
- ``GPUS_ALL_REGIONS``: every live VM's cards, in every region (project-wide);
- ``IN_USE_ADDRESSES``: one per access config (external IP) of a live VM;
- ``INSTANCES``: every VM of the region, TERMINATED ones included.

``regions.get`` also reports, without enforcing them, ``DISKS_TOTAL_GB``
(pd-standard disks) and ``SSD_TOTAL_GB`` (other disk types) of the region,
and ``STATIC_ADDRESSES`` (always 0: reserved addresses are not emulated), so
``gcloud compute regions list`` fills its columns.

Refusals: ``instances.insert`` and ``start`` answer 403 ``quotaExceeded``
(domain usageLimits) at once, "Quota 'CPUS' exceeded.  Limit: 8.0 in region
us-east1." ("... globally." for a project-wide metric). ``bulkInsert`` is
refused the same way at once when not one VM fits (GCE's upfront
validation); when some fit but fewer than ``minCount``, it is accepted and
its operation ends with code ``QUOTA_EXCEEDED``, the same message and a
``quotaInfo`` error detail (``usage_refusal_entry``).

``regions.get`` reports the regional metrics (``Quotas.region_quotas``);
``GPUS_ALL_REGIONS`` belongs to the project (``Quotas.project_quotas``, for
``projects.get``).
"""

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

from cflow.local.compute import api_errors
from cflow.local.compute.accelerators import GPU_MODELS, gpu_metric
from cflow.local.compute.core import ComputeCore
from cflow.local.compute.resources import Instance

GENEROUS_LIMIT = 100000.0
GPU_METRICS = tuple(model.quota_metric for model in GPU_MODELS)
PREEMPTIBLE_METRICS = ("PREEMPTIBLE_CPUS", *(f"PREEMPTIBLE_{metric}" for metric in GPU_METRICS))
REGIONAL_METRICS = ("CPUS", "INSTANCES", "IN_USE_ADDRESSES", *GPU_METRICS, *PREEMPTIBLE_METRICS)
PROJECT_METRICS = ("GPUS_ALL_REGIONS",)
ALL_METRICS = REGIONAL_METRICS + PROJECT_METRICS
REPORTED_ONLY_METRICS = ("DISKS_TOTAL_GB", "SSD_TOTAL_GB", "STATIC_ADDRESSES")

MetricScope = tuple[str, str | None]  # (metric, region), region None for a project-wide metric


@dataclasses.dataclass(frozen=True)
class QuotaSetting:
    """One ``--quota``: ``metric`` limited to ``limit`` in ``region`` (None: every region, or the project)."""

    metric: str
    limit: float
    region: str | None = None


def parse_quota_setting(text: str) -> QuotaSetting:
    """Reads ``METRIC=N`` or ``REGION:METRIC=N``.

    Raises:
        ValueError: the text is not of that form, or names a metric the emulator does not count.
    """
    scope, separator, number = text.partition("=")
    region, _, metric = scope.rpartition(":")
    if not separator or not metric or not number.strip().isdigit():
        raise ValueError(f"{text!r} is not METRIC=N or REGION:METRIC=N (e.g. CPUS=24 or us-central1:NVIDIA_T4_GPUS=1)")
    metric = metric.strip().upper()
    if metric not in ALL_METRICS:
        raise ValueError(f"{text!r} names unknown quota metric {metric}; known: {', '.join(ALL_METRICS)}")
    if region and metric in PROJECT_METRICS:
        raise ValueError(f"{text!r}: {metric} is project-wide; write {metric}={number.strip()} without a region")
    return QuotaSetting(metric, float(int(number)), region.strip() or None)


class QuotaLimits:
    """The limit of each metric in each region.

    Args:
        settings: the ``--quota`` settings, in order; a regional one wins over one for every region.
    """

    def __init__(self, settings: Iterable[QuotaSetting] = ()) -> None:
        self._everywhere: dict[str, float] = {}
        self._regional: dict[MetricScope, float] = {}
        for setting in settings:
            if setting.region is None:
                self._everywhere[setting.metric] = setting.limit
            else:
                self._regional[(setting.metric, setting.region)] = setting.limit

    def limit(self, metric: str, region: str | None) -> float:
        """The limit of ``metric`` in ``region`` (None for a project-wide metric)."""
        if (metric, region) in self._regional:
            return self._regional[(metric, region)]
        if metric in self._everywhere:
            return self._everywhere[metric]
        return 0.0 if metric in PREEMPTIBLE_METRICS else GENEROUS_LIMIT

    def is_set(self, metric: str, region: str | None) -> bool:
        """True when a ``--quota`` setting names ``metric`` for ``region`` (or for every region)."""
        return (metric, region) in self._regional or metric in self._everywhere

    def regions_named(self) -> set[str]:
        """The regions settings name (to check them against the zones)."""
        return {region for _, region in self._regional if region is not None}


@dataclasses.dataclass(frozen=True)
class VmShape:
    """What one VM takes from the quotas: its vCPUs, whether it is Spot/preemptible, external IPs and GPUs."""

    cpus: int
    preemptible: bool
    external_ips: int
    accelerators: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, instance: Instance) -> "VmShape":
        """The shape of an existing VM."""
        return cls(
            cpus=instance.cpus,
            preemptible=instance.is_spot_or_preemptible,
            external_ips=sum(len(interface.get("accessConfigs") or []) for interface in instance.network_interfaces),
            accelerators=tuple((entry["acceleratorType"], int(entry["acceleratorCount"])) for entry in instance.guest_accelerators),
        )


@dataclasses.dataclass(frozen=True)
class QuotaRefusal:
    """The metric that refuses, its limit and its region (None: project-wide)."""

    metric: str
    limit: float
    region: str | None

    @property
    def message(self) -> str:
        """GCE's message."""
        return api_errors.quota_message(self.metric, self.limit, self.region)

    def error(self) -> api_errors.ApiError:
        """The 403 quotaExceeded GCE answers at once."""
        return api_errors.quota_exceeded(self.metric, self.limit, self.region)

    def operation_error(self) -> dict[str, Any]:
        """The ``QUOTA_EXCEEDED`` entry of an operation's errors, with GCE's ``quotaInfo``."""
        scope = "project-region" if self.region is not None else "project"
        info: dict[str, Any] = {
            "metricName": f"compute.googleapis.com/{self.metric.lower()}",
            "limitName": f"{self.metric.replace('_', '-')}-per-{scope}",
            "limit": self.limit,
        }
        if self.region is not None:
            info["dimensions"] = {"region": self.region}
        return {"code": "QUOTA_EXCEEDED", "message": self.message, "errorDetails": [{"quotaInfo": info}]}


class Quotas:
    """Usage and limits of every project's quotas. Call every method holding ``core.lock``.

    Args:
        core: the shared state (usage is counted over ``core.instances``).
        limits: the QuotaLimits.
    """

    def __init__(self, core: ComputeCore, limits: QuotaLimits) -> None:
        self.core = core
        self.limits = limits

    def _granted(self, metric: str, region: str) -> bool:
        # A limit above 0 is a grant, as on GCE. A limit set on purpose, even 0,
        # is one too: it models a project whose preemptible quota was granted
        # and then capped (a quota override), where Spot VMs stop at that cap
        # instead of spilling into CPUS.
        return self.limits.limit(metric, region) > 0 or self.limits.is_set(metric, region)

    def charges(self, region: str, shape: VmShape, new: bool = True) -> dict[MetricScope, float]:
        """What one VM of ``shape`` in ``region`` counts against; ``new`` False leaves out INSTANCES (a VM that starts again)."""
        preemptible_cpus = shape.preemptible and self._granted("PREEMPTIBLE_CPUS", region)
        charges: dict[MetricScope, float] = {("PREEMPTIBLE_CPUS" if preemptible_cpus else "CPUS", region): float(shape.cpus)}
        cards = 0
        for type_name, count in shape.accelerators:
            metric = gpu_metric(type_name)
            if shape.preemptible and self._granted(f"PREEMPTIBLE_{metric}", region):
                metric = f"PREEMPTIBLE_{metric}"
            charges[(metric, region)] = charges.get((metric, region), 0.0) + count
            cards += count
        if cards:
            charges[("GPUS_ALL_REGIONS", None)] = float(cards)
        if shape.external_ips:
            charges[("IN_USE_ADDRESSES", region)] = float(shape.external_ips)
        if new:
            charges[("INSTANCES", region)] = 1.0
        return charges

    def usage(self, project: str) -> dict[MetricScope, float]:
        """What the project's VMs (and disks) use now, by metric and region."""
        used: dict[MetricScope, float] = {}
        for disk in self.core.disks.values():
            region = self.core.catalog.region_of(disk.zone)
            if disk.project == project and region is not None:
                disk_scope: MetricScope = ("DISKS_TOTAL_GB" if disk.disk_type == "pd-standard" else "SSD_TOTAL_GB", region)
                used[disk_scope] = used.get(disk_scope, 0.0) + disk.size_gb
        for instance in self.core.instances.values():
            if instance.project != project:
                continue
            live = instance.status != "TERMINATED"
            for scope, amount in self.charges(instance.region, VmShape.of(instance)).items():
                if live or scope[0] == "INSTANCES":
                    used[scope] = used.get(scope, 0.0) + amount
        return used

    def room(self, project: str, region: str, shape: VmShape, wanted: int, new: bool = True) -> tuple[int, QuotaRefusal | None]:
        """How many of ``wanted`` VMs of ``shape`` fit now; the refusal names the metric that stops the rest (None if all fit)."""
        used = self.usage(project)
        fit, refusal = wanted, None
        for (metric, scope_region), amount in self.charges(region, shape, new).items():
            if amount <= 0:
                continue
            limit = self.limits.limit(metric, scope_region)
            room = max(0, math.floor((limit - used.get((metric, scope_region), 0.0)) / amount))
            if room < fit:
                fit, refusal = room, QuotaRefusal(metric, limit, scope_region)
        return fit, refusal

    def region_quotas(self, project: str, region: str) -> list[dict[str, Any]]:
        """``regions.get``'s ``quotas``: metric, limit and usage of each regional metric (and the reported-only ones)."""
        used = self.usage(project)
        return [
            {"metric": metric, "limit": self.limits.limit(metric, region), "usage": used.get((metric, region), 0.0)}
            for metric in REGIONAL_METRICS + REPORTED_ONLY_METRICS
        ]

    def project_quotas(self, project: str) -> list[dict[str, Any]]:
        """The project-wide quotas (``projects.get``'s ``quotas``): ``GPUS_ALL_REGIONS``."""
        used = self.usage(project)
        return [{"metric": metric, "limit": self.limits.limit(metric, None), "usage": used.get((metric, None), 0.0)} for metric in PROJECT_METRICS]
