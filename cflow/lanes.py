"""Spot, then standard, per item: the run's two lanes, and the scheduler's decisions about standard workers.

How it works:

- A run has two work queues, each its own Pub/Sub topic and subscription
  (``cflow.gcp.pubsub.RunTopics``): the Spot lane (the run's queue) and the
  standard lane. A worker's lane is set when it is created (its metadata
  attribute ``LANE_ATTRIBUTE`` and label, ``cflow.fleet``), and it pulls only
  its lane's subscription: standard VMs created for the standard lane never
  take a Spot-lane item, and Spot VMs never take a standard-lane one.
- The preemption count travels with the item: a preempted item is handed
  back by republishing it with ``ATTR_PREEMPTIONS`` raised by one, then
  acking the old message (``cflow.worker.handback``). So the count is exact
  whatever Pub/Sub does (its ``delivery_attempt`` also counts failures and
  lease expiries, and a nack keeps the old attributes). A republish that
  fails falls back to a nack: that preemption is then not counted.
- When the count reaches SPOT_PREEMPTIONS_BEFORE_STANDARD, the item goes to
  the standard lane's topic instead, after its lane marker
  (``lanes/standard/ITEM``, ``cflow.gcp.layout``) is written. The markers,
  not the workers' events, tell the scheduler which items are in the standard
  lane, so a lost event or a resumed scheduler still knows.
- The scheduler keeps ``min(STANDARD_WORKERS_MAX, standard-lane items not
  finished)`` standard workers (``StandardLane``) and deletes them once none
  is left. The Spot lane gets the rest of WORKER_NODE_CNT.
- SPOT_STOCKOUT_FALLBACK_MINUTES (``StockoutFallback``): once every zone has
  been out of Spot capacity that long, the Spot lane's new workers are
  standard VMs (still pulling the Spot lane), until a Spot creation succeeds
  again.
"""

import logging
from collections.abc import Mapping

from cflow.protocol import ATTR_PREEMPTIONS, LANE_ATTRIBUTE, Lane

log = logging.getLogger(__name__)


def preemptions_of(attributes: Mapping[str, str] | None) -> int:
    """The item's preemptions so far, as its work message says (0 when it does not say, or says nonsense)."""
    text = (attributes or {}).get(ATTR_PREEMPTIONS, "")
    return int(text) if text.isdigit() else 0


def with_preemptions(attributes: Mapping[str, str], preemptions: int) -> dict[str, str]:
    """A work message's attributes with its preemption count set."""
    return {**attributes, ATTR_PREEMPTIONS: str(preemptions)}


def lane_after_preemption(preemptions: int, preemptions_before_standard: int | None) -> Lane:
    """Where an item preempted ``preemptions`` times in all (this one included) goes next."""
    if preemptions_before_standard is not None and preemptions >= preemptions_before_standard:
        return Lane.STANDARD
    return Lane.SPOT


def lane_of_labels(labels: Mapping[str, str]) -> Lane:
    """A worker's lane from its labels (the label has the metadata attribute's name; a VM without it is of the Spot lane)."""
    return Lane.STANDARD if labels.get(LANE_ATTRIBUTE) == Lane.STANDARD else Lane.SPOT


class StandardLane:
    """How many standard workers the standard lane wants.

    Args:
        max_workers: STANDARD_WORKERS_MAX.
    """

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max_workers

    def wanted(self, unfinished: int) -> int:
        """Standard workers for ``unfinished`` standard-lane items (waiting or running): none once none is left."""
        return min(self.max_workers, max(unfinished, 0))


class StockoutFallback:
    """SPOT_STOCKOUT_FALLBACK_MINUTES: whether the Spot lane's new workers should be standard VMs for now.

    The scheduler tells it what creating Spot workers meets: every zone out
    of capacity (``all_zones_out``), or a Spot creation that went through
    (``spot_created``). Times are on the scheduler's monotonic clock.

    Args:
        minutes: the setting (None: never fall back).
    """

    def __init__(self, minutes: float | None) -> None:
        self.minutes = minutes
        self.all_out_since: float | None = None
        self.active_since: float | None = None  # when standard workers were first created instead
        self.ever_used_minutes: float | None = None  # how long Spot was out when it first happened, for the summary

    def all_zones_out(self, now: float) -> None:
        """Creating Spot workers found every zone out of capacity (its cooldown not over)."""
        if self.all_out_since is None:
            self.all_out_since = now

    def spot_created(self) -> None:
        """A Spot creation went through: Spot capacity is back."""
        self.all_out_since = None
        if self.active_since is not None:
            log.info("Spot capacity is back; new workers are Spot VMs again")
        self.active_since = None

    def use_standard(self, now: float) -> bool:
        """True while the Spot lane's new workers should be standard VMs.

        The first time it turns True it logs the one line the user sees.
        """
        if self.minutes is None or self.all_out_since is None:
            return False
        out_for = now - self.all_out_since
        if out_for < self.minutes * 60:
            return False
        if self.active_since is None:
            self.active_since = now
            if self.ever_used_minutes is None:
                self.ever_used_minutes = out_for / 60
            log.warning("every zone has been out of Spot capacity for %.0f min (SPOT_STOCKOUT_FALLBACK_MINUTES = %g): "
                        "creating standard workers instead", out_for / 60, self.minutes)
        return True

    @property
    def summary_line(self) -> str | None:
        """``standard workers created: every zone out of Spot capacity for M min``, or None if it never happened."""
        if self.ever_used_minutes is None:
            return None
        return f"standard workers created: every zone out of Spot capacity for {self.ever_used_minutes:.0f} min"
