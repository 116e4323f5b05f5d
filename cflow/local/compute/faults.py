"""The failures a fleet meets on GCP, on demand: stockouts, API errors, preemptions, slow VMs (quotas live in ``quotas``).

A slow VM (``--slow-vms FRACTION --slow-factor X``) is chosen here, at boot;
``vm.SlowGuests`` then gives its processes only 1/X of the time.
"""

import random
import threading
from collections.abc import Mapping

from cflow.local.compute import api_errors


class Faults:
    """Decides which requests and VMs fail.

    Args:
        error_rate: fraction of API requests refused with 429 rateLimitExceeded
            or 503 backendError before anything is done.
        zone_capacity: {zone: max live VMs}; inserts beyond it stock out.
        preempt_mean_s: mean lifetime of a Spot/preemptible VM (None: never preempted by time).
        seed: random seed, so a faulty run can be replayed.
        slow_fraction: the fraction of booted VMs that are slow (0: none).
    """

    def __init__(
        self,
        error_rate: float = 0.0,
        zone_capacity: Mapping[str, int] | None = None,
        preempt_mean_s: float | None = None,
        seed: int | None = None,
        slow_fraction: float = 0.0,
    ) -> None:
        self.error_rate = error_rate
        self.zone_capacity = dict(zone_capacity or {})
        self.preempt_mean_s = preempt_mean_s
        self.slow_fraction = slow_fraction
        self._random = random.Random(seed)
        # Its own stream, so turning slow VMs on does not change which VMs are preempted when.
        self._slow_credit = random.Random(None if seed is None else seed + 2).random()
        self._lock = threading.Lock()

    def request_error(self, project: str) -> api_errors.ApiError | None:
        """Returns an ApiError to answer this request with, or None."""
        if self.error_rate <= 0:
            return None
        with self._lock:
            if self._random.random() >= self.error_rate:
                return None
            rate_limited = self._random.random() < 0.5
        return api_errors.rate_limit_exceeded(project) if rate_limited else api_errors.backend_error()

    def free_capacity(self, zone: str, live_in_zone: int) -> int | None:
        """Returns how many more VMs fit in ``zone`` (None: no limit)."""
        limit = self.zone_capacity.get(zone)
        return None if limit is None else max(0, limit - live_in_zone)

    def preemption_delay(self) -> float | None:
        """Returns seconds until a Spot VM that just started is preempted, or None."""
        if not self.preempt_mean_s:
            return None
        with self._lock:
            return self._random.expovariate(1.0 / self.preempt_mean_s)

    def slow_vm(self) -> bool:
        """Whether the VM booting now is slow.

        Exactly ``floor(phase + n * fraction)`` of the first n VMs booted are
        slow, spread evenly, the phase drawn from the seeded random: a run of
        10 VMs at 0.1 has one slow VM, which one depending on the seed.
        """
        if self.slow_fraction <= 0:
            return False
        with self._lock:
            self._slow_credit += self.slow_fraction
            if self._slow_credit >= 1.0:
                self._slow_credit -= 1.0
                return True
            return False
