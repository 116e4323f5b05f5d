"""When and how long to wait before trying again: the one backoff policy of CFlow's cloud calls.

``Backoff`` is the policy (exponential from a first delay, capped, with
jitter) and ``Backoff.call`` sends a request again while its failure is
transient. Compute's requests (``Compute._execute``) and its batched deletes
(``Compute.delete_vms``) use it; Pub/Sub and Cloud Storage calls are retried
by their own clients' built-in policies. The scheduler's failure budget
(``cflow.scheduler.StepFailureBudget``) waits by the same policy.

Sleep and randomness are passed in, so tests run without waiting.
"""

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# As googleapiclient's own num_retries used to be: 7 tries in all.
DEFAULT_RETRIES = 6


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter.

    The wait before retry ``n`` (1, 2, ...) is ``min(max_delay, first_delay *
    2 ** (n - 1))``, scaled by a random factor in ``[1 - jitter, 1]`` so that
    many clients refused at once do not come back at once.

    Attributes:
        retries: how many times a failed call is sent again (0: never).
        first_delay: seconds before the first retry, before jitter.
        max_delay: the cap on one wait, before jitter.
        jitter: fraction of each wait that is random (0: exact waits).
        sleep: ``time.sleep``-like.
        random: returns a float in [0, 1).
    """

    retries: int = DEFAULT_RETRIES
    first_delay: float = 0.5
    max_delay: float = 8.0
    jitter: float = 0.5
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)
    random: Callable[[], float] = field(default=random.random, compare=False)

    def delay(self, retry_number: int) -> float:
        """Seconds to wait before retry ``retry_number`` (counted from 1)."""
        base = min(self.max_delay, self.first_delay * 2 ** max(retry_number - 1, 0))
        return base * (1.0 - self.jitter + self.jitter * self.random())

    def wait(self, retry_number: int) -> float:
        """Sleep before retry ``retry_number``; returns the seconds slept."""
        seconds = self.delay(retry_number)
        self.sleep(seconds)
        return seconds

    def call(self, function: Callable[[], T], is_transient: Callable[[BaseException], bool]) -> T:
        """``function()``, sent again after a wait while it fails transiently, up to ``retries`` times.

        Returns:
            What ``function`` returned.
        Raises:
            The last error: one that is not transient, or the one of the last try.
        """
        for retry_number in range(self.retries + 1):
            if retry_number:
                self.wait(retry_number)
            try:
                return function()
            except Exception as error:
                if retry_number == self.retries or not is_transient(error):
                    raise
                log.debug("transient failure (%s); retry %d of %d", error, retry_number + 1, self.retries)
        raise AssertionError("unreachable: the last try returns or raises")
