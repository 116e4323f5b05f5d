"""One thread that runs due events (boot steps, preemptions, the reaper)."""

import heapq
import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class TimerHandle:
    """Returned by ``TimerQueue.call_later``; ``cancel()`` makes the call a no-op."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        """The callback will not run (if it has not yet)."""
        self.cancelled = True


class TimerQueue:
    """A heap of due callbacks served by a single thread.

    Args:
        monotonic: clock function returning seconds (``time.monotonic``).

    Callbacks run on the timer thread one after another, so they must be
    short; an exception in one is logged and does not stop the others.
    """

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self._heap: list[tuple[float, int, TimerHandle, Callable[..., Any], tuple[Any, ...]]] = []
        self._sequence = itertools.count()
        self._wakeup = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="compute-timers", daemon=True)

    def start(self) -> None:
        """Starts the thread that runs due callbacks."""
        self._thread.start()

    def call_later(self, delay_s: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        """Schedules ``callback(*args)`` after ``delay_s`` seconds; returns a TimerHandle."""
        handle = TimerHandle()
        with self._wakeup:
            heapq.heappush(self._heap, (self._monotonic() + max(0.0, delay_s), next(self._sequence), handle, callback, args))
            self._wakeup.notify()
        return handle

    def stop(self) -> None:
        """Stops the thread; pending callbacks are dropped."""
        with self._wakeup:
            self._stopped = True
            self._wakeup.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._stopped and (not self._heap or self._heap[0][0] > self._monotonic()):
                    timeout = self._heap[0][0] - self._monotonic() if self._heap else None
                    self._wakeup.wait(timeout)
                if self._stopped:
                    return
                _, _, handle, callback, args = heapq.heappop(self._heap)
            if handle.cancelled:
                continue
            try:
                callback(*args)
            except Exception:
                logger.exception("timer callback %s failed", getattr(callback, "__name__", callback))
