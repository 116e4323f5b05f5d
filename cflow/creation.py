"""Where and how many workers to ask GCE for, and what each kind of refusal changes.

Deciding apart from acting (as Ray's autoscaler does): ``CreationPolicy``
decides, the scheduler (``cflow.scheduler``) acts on its decisions with
bulkInsert. A refusal is classified once, in ``cflow.gcp.errors``; here each
class has its one reaction (as SkyPilot's recovery strategies), a small
method that returns what it changed:

| refusal (``cflow.errors``)                     | reaction                                                  |
|------------------------------------------------|-----------------------------------------------------------|
| ``TransientError`` (5xx, 429, rate limit,      | ``WaitAndRetry``: no creation until a growing, jittered   |
| ``resourceNotReady``)                          | wait has passed (the seam already retried the request)    |
| ``ZoneStockout``                               | ``NextZone``: the zone cools down; the next one is asked  |
| ``QuotaExceeded`` (at once, or in the          | ``QuotaCooldown``: that metric of that region cools down, |
| operation)                                     | its zones are skipped, the next ask there is halved; a    |
|                                                | limit of 0 holds no worker ever: that region is done      |
| anything else (a missing network, a policy,    | ``StopCreating``: no more creation; with no worker alive  |
| a bad image or account, every region's quota   | the scheduler ends the run (``WorkersRefused``, exit 2)   |
| at 0)                                          |                                                           |

Time is passed in (``now``), so every reaction is tested without waiting.

A stockout is of one provisioning model: a zone out of Spot VMs may still
have standard ones (``cflow.lanes``), so the methods that ask about zones
take the model (``spot``) they create; a caller that creates one model only
leaves it None.
"""

import dataclasses
import logging
from collections.abc import Sequence

from cflow.errors import CloudError, QuotaExceeded, TransientError, ZoneStockout
from cflow.gcp.retry import Backoff
from cflow.zones import region_of

log = logging.getLogger(__name__)

STOCKOUT_COOLDOWN_SECONDS = 120.0
QUOTA_COOLDOWN_SECONDS = 60.0
# After the seam's own retries failed: wait 5, 10, 20 ... s (at most 2 minutes, half of it random) between creations.
TRANSIENT_BACKOFF = Backoff(first_delay=5.0, max_delay=120.0, jitter=0.5)
# What a quota cooldown of a project-wide metric (e.g. GPUS_ALL_REGIONS) is keyed by.
ALL_REGIONS = "*"


@dataclasses.dataclass(frozen=True)
class Ask:
    """Ask for ``count`` workers in ``zone``."""

    zone: str
    count: int


@dataclasses.dataclass(frozen=True)
class WaitAndRetry:
    """A transient refusal: no creation before ``until``."""

    error: CloudError
    until: float

    def describe(self, zone: str, now: float) -> str:
        return f"creating VMs in {zone} failed for now ({self.error.message}); asking again in {self.until - now:.0f} s"


@dataclasses.dataclass(frozen=True)
class NextZone:
    """A stockout: ``zone`` cools down until ``until``; the next zone is asked."""

    zone: str
    until: float

    def describe(self, zone: str, now: float) -> str:
        return f"zone {zone} has no capacity (stockout); trying the next zone"


@dataclasses.dataclass(frozen=True)
class QuotaCooldown:
    """A quota refusal: ``metric`` of ``region`` cools down until ``until`` (forever when its limit is 0)."""

    error: QuotaExceeded
    region: str
    until: float

    def describe(self, zone: str, now: float) -> str:
        metric = self.error.metric or "a quota"
        if self.until == float("inf"):
            return f"{metric} quota in {self.region} is 0: no worker fits there ({self.error.message})"
        return (f"quota: {self.error.message} (ask for more quota or lower WORKER_NODE_CNT); carrying on with the VMs it "
                f"allows and asking {self.region} for more every {QUOTA_COOLDOWN_SECONDS:.0f} s")


@dataclasses.dataclass(frozen=True)
class StopCreating:
    """A refusal no retry mends: no more workers are asked for."""

    error: CloudError

    def describe(self, zone: str, now: float) -> str:
        return f"creating workers is refused for good: {self.error.message}"


# What a refusal changed; each says it in one line with ``describe(zone, now)``, which the scheduler logs.
Reaction = WaitAndRetry | NextZone | QuotaCooldown | StopCreating


class CreationPolicy:
    """Decides where to ask for workers and how many, and reacts to each refusal.

    Args:
        zones: the zones in the order to try them (VM_ZONE, then VM_FALLBACK_ZONES).
        transient_backoff: the waits after transient refusals in a row.
    """

    def __init__(self, zones: Sequence[str], transient_backoff: Backoff = TRANSIENT_BACKOFF) -> None:
        self.zones = tuple(zones)
        self.transient_backoff = transient_backoff
        self.zone_cooldown_until: dict[tuple[str, bool | None], float] = {}  # (zone, spot) -> until
        self.quota_cooldown_until: dict[tuple[str, str], float] = {}  # (region or ALL_REGIONS, metric) -> until
        self.region_cap: dict[str, int] = {}  # at most this many per ask after a quota refusal there
        self.transient_until = 0.0
        self.transient_in_a_row = 0
        self.stopped: StopCreating | None = None

    # -- deciding ----------------------------------------------------------

    def _region_cooling(self, region: str, now: float) -> bool:
        return any(until > now for (where, _metric), until in self.quota_cooldown_until.items() if where in (region, ALL_REGIONS))

    def _region_done(self, region: str) -> bool:
        """A quota of the region (or a project-wide one) has a limit of 0: no worker fits there, ever."""
        return any(until == float("inf") for (where, _metric), until in self.quota_cooldown_until.items() if where in (region, ALL_REGIONS))

    def usable_zone(self, now: float, spot: bool | None = None) -> str | None:
        """The first zone neither stocked out (for the ``spot`` model) nor in a region whose quota cools down, or None."""
        for zone in self.zones:
            if self.zone_cooldown_until.get((zone, spot), 0.0) <= now and not self._region_cooling(region_of(zone), now):
                return zone
        return None

    def every_zone_out_of_capacity(self, now: float, spot: bool | None = None) -> bool:
        """True when every zone is cooling down after a stockout (not a quota) of the ``spot`` model: worth telling the user once."""
        return all(self.zone_cooldown_until.get((zone, spot), 0.0) > now for zone in self.zones)

    def next_ask(self, wanted: int, now: float, spot: bool | None = None) -> Ask | None:
        """Where to ask for up to ``wanted`` workers of the ``spot`` model now, or None (stopped, waiting, or no zone usable)."""
        if self.stopped is not None or wanted <= 0 or now < self.transient_until:
            return None
        zone = self.usable_zone(now, spot)
        if zone is None:
            return None
        cap = self.region_cap.get(region_of(zone))
        return Ask(zone, min(wanted, cap) if cap else wanted)

    # -- reacting ----------------------------------------------------------

    def created(self, ask: Ask) -> None:
        """GCE accepted ``ask`` (its operation may still fail: ``refused`` is told then)."""
        self.transient_in_a_row = 0

    def refused(self, error: CloudError, zone: str, count: int, now: float, spot: bool | None = None) -> Reaction:
        """React to GCE refusing ``count`` workers of the ``spot`` model in ``zone`` (at once, or in the bulkInsert's operation).

        Returns:
            What the refusal changed; ``stopped`` is set when it is a ``StopCreating``.
        """
        if isinstance(error, TransientError):
            return self._transient(error, now)
        if isinstance(error, ZoneStockout):
            return self._stockout(zone, now, spot)
        if isinstance(error, QuotaExceeded):
            return self._quota(error, zone, count, now)
        return self._stop(error)

    def _transient(self, error: TransientError, now: float) -> Reaction:
        self.transient_in_a_row += 1
        self.transient_until = now + self.transient_backoff.delay(self.transient_in_a_row)
        return WaitAndRetry(error, self.transient_until)

    def _stockout(self, zone: str, now: float, spot: bool | None) -> Reaction:
        until = now + STOCKOUT_COOLDOWN_SECONDS
        self.zone_cooldown_until[(zone, spot)] = until
        return NextZone(zone, until)

    def _quota(self, error: QuotaExceeded, zone: str, count: int, now: float) -> Reaction:
        region = error.region or region_of(zone)
        if error.metric and error.metric.endswith("_ALL_REGIONS"):
            region = ALL_REGIONS
        key = (region, error.metric or "")
        if error.limit == 0:
            # A limit of 0 holds no worker, ever: this region is done; if every zone's is, creation is.
            self.quota_cooldown_until[key] = float("inf")
            if all(self._region_done(region_of(zone)) for zone in self.zones):
                return self._stop(error)
            return QuotaCooldown(error, region, float("inf"))
        until = now + QUOTA_COOLDOWN_SECONDS
        self.quota_cooldown_until[key] = max(until, self.quota_cooldown_until.get(key, 0.0))
        if region != ALL_REGIONS:
            self.region_cap[region] = max(1, count // 2)
        return QuotaCooldown(error, region, until)

    def _stop(self, error: CloudError) -> StopCreating:
        self.stopped = StopCreating(error)
        return self.stopped


def refused_line(error: CloudError, blamed: tuple[str, str] | None) -> str:
    """The one line that ends a run whose workers GCE refuses: GCE's reason and message, and the setting to change.

    Args:
        error: the refusal.
        blamed: (setting, fix) of the setting to blame (``cflow.fleet.setting_to_change``), or None.
    """
    said = " ".join(error.message.split())
    quoted = f"{error.reason}: {said}" if error.reason else said
    if isinstance(error, QuotaExceeded):
        where = f" in {error.region}" if error.region else ""
        limit = f" (limit {error.limit:g})" if error.limit is not None else ""
        return (f"no worker fits the {error.metric or 'Compute Engine'} quota{where}{limit} (GCE: {quoted}); "
                "ask for more quota (https://console.cloud.google.com/iam-admin/quotas) or lower WORKER_NODE_CNT or VM_TYPE")
    if blamed is None:
        return f"Compute Engine refused to create the run's workers (GCE: {quoted}); fix the cause and start the run again"
    setting, fix = blamed
    return f"{setting}: Compute Engine refused to create the run's workers (GCE: {quoted}); {fix}"
