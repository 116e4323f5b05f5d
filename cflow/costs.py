"""What a run costs, and its cap: VM time by machine type and provisioning model, priced from PRICES.

- ``VmKind``: a machine type, Spot or standard (what PRICES prices).
- ``CostMeter``: the run's VM-seconds by kind, added up from the scheduler's
  listings (each live VM counts from one step to the next), and their cost.
- ``CostCap``: MAX_COST_USD: whether the cost so far has reached it. The
  scheduler (``cflow.scheduler``) acts on it: it stops creating, tells the
  workers to take no new item, lets the running ones finish, and the run
  ends cancelled with ``EXIT_COST_CAP``.
- ``worst_case`` and ``cap_line``: the dry run's estimate and the cap
  against it.

Prices are the user's estimates (PRICES in const.py), so every figure here
is one too. Nothing here talks to a service or reads a clock.
"""

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

# PRICES as Config holds it: machine type -> {"standard": USD/hour, "spot": USD/hour}.
Prices = Mapping[str, Mapping[str, float]]


@dataclasses.dataclass(frozen=True, order=True)
class VmKind:
    """A machine type, Spot or standard: what one line of PRICES prices."""

    machine_type: str
    spot: bool
    # The VM's GPUs, ``(type, count)`` each (VM_GPU_TYPE: ``cflow.gpus``); PRICES prices them per GPU.
    accelerators: tuple[tuple[str, int], ...] = ()

    @property
    def label(self) -> str:
        """``e2-small, Spot``."""
        gpus = "".join(f" + {count} x {name}" for name, count in self.accelerators)
        return f"{self.machine_type}{gpus}, {'Spot' if self.spot else 'standard'}"

    def hourly_price(self, prices: Prices) -> float | None:
        """USD per hour from PRICES (the machine type plus its GPUs), or None when PRICES lacks one of them."""
        column = "spot" if self.spot else "standard"
        total = 0.0
        for name, count in ((self.machine_type, 1), *self.accelerators):
            entry = prices.get(name)
            if entry is None:
                return None
            total += count * float(entry[column])
        return total


class CostMeter:
    """The run's VM time by kind, and what it costs.

    ``account`` is called once per scheduler step with the kinds of the VMs
    live in that step's listing: each counts for the time since the previous
    step (the first call only sets the clock). So a VM costs from the first
    listing that shows it booting until the last one that shows it live,
    within a step interval of GCE's own billing.
    """

    def __init__(self) -> None:
        self.seconds: dict[VmKind, float] = {}
        self._last_at: float | None = None

    def account(self, live: Iterable[VmKind], now: float) -> None:
        """Count ``now`` minus the previous call's time for each VM in ``live`` (a kind once per VM)."""
        if self._last_at is not None:
            elapsed = max(now - self._last_at, 0.0)
            for kind in live:
                self.seconds[kind] = self.seconds.get(kind, 0.0) + elapsed
        self._last_at = now

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def cost(self, prices: Prices) -> float | None:
        """USD so far; None when some VM time is of a machine type PRICES does not price."""
        total = 0.0
        for kind, seconds in self.seconds.items():
            price = kind.hourly_price(prices)
            if price is None:
                if seconds > 0:
                    return None
                continue
            total += seconds / 3600 * price
        return total

    def to_document(self) -> list[dict[str, Any]]:
        """The VM-seconds as JSON data, by kind (for the run's scheduler.json)."""
        return [{"machine_type": kind.machine_type, "spot": kind.spot, "seconds": round(seconds, 3),
                 **({"accelerators": [list(pair) for pair in kind.accelerators]} if kind.accelerators else {})}
                for kind, seconds in sorted(self.seconds.items())]

    def restore(self, document: object) -> None:
        """Carry on from what ``to_document`` wrote (a resumed run); malformed entries are skipped."""
        if not isinstance(document, list):
            return
        for entry in document:
            try:
                accelerators = tuple((str(name), int(count)) for name, count in entry.get("accelerators", []))
                kind = VmKind(str(entry["machine_type"]), bool(entry["spot"]), accelerators)
                self.seconds[kind] = self.seconds.get(kind, 0.0) + float(entry["seconds"])
            except (KeyError, TypeError, ValueError):
                log.debug("skipping a malformed VM-time entry %r", entry)


class CostCap:
    """MAX_COST_USD: the most the run may cost by PRICES.

    Args:
        max_usd: the cap (None: no cap).
        prices: PRICES.
    """

    def __init__(self, max_usd: float | None, prices: Prices) -> None:
        self.max_usd = max_usd
        self.prices = prices

    def reached(self, meter: CostMeter) -> bool:
        """True once the cost so far is at the cap or above. A cost PRICES cannot count never reaches it
        (config.py refuses a cap without a price for VM_TYPE)."""
        if self.max_usd is None:
            return False
        cost = meter.cost(self.prices)
        return cost is not None and cost >= self.max_usd


def worst_case(hourly_fleet_price: float, workers: int, item_count: int, max_attempts: int, task_timeout: float) -> float:
    """The most a run can cost if every attempt runs to TASK_TIMEOUT: rounds of items per worker, each attempt at full length."""
    rounds = -(-item_count // max(workers, 1))
    return hourly_fleet_price * rounds * max_attempts * task_timeout / 3600


def cap_line(max_usd: float, worst: float | None) -> str:
    """The dry run's line about MAX_COST_USD, against the worst-case estimate (None: none could be made)."""
    if worst is None:
        return f"${max_usd:.2f} (MAX_COST_USD); no worst case to compare it with"
    if worst <= max_usd:
        return f"${max_usd:.2f} (MAX_COST_USD); the worst case, ${worst:.2f}, is within it"
    return (f"${max_usd:.2f} (MAX_COST_USD); the worst case, ${worst:.2f}, is above it: at the cap the run stops creating, "
            "lets running items finish and cancels the rest (exit status 4)")
