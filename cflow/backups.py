"""Backup tasks: which slow items get a second copy, and the work message that carries one.

As in MapReduce's backup tasks: once the queue is drained and workers sit
idle, the scheduler hands a second copy of the items that have run far
longer than the run's typical item to the idle workers. Whichever copy
records its done marker first wins (markers are created once); the scheduler
then tells the VM of the other copy to stop it (its metadata attribute
``STOP_ITEM_ATTRIBUTE``, watched by ``cflow.worker.control``), and that worker
acks it without a result and goes back to idle.

A backup copy is the item's message with ``ATTR_BACKUP`` set and the same
attempt number as the copy it backs up. It can only add a "done": if it
fails, is preempted or finds the item finished, it is dropped (acked, no
attempt marker, no successor, no log upload), since the original still runs
and owns the item's attempts; so its periodic log uploads are skipped too.

- ``BackupPolicy``: the decision, pure (times passed in): item times so far,
  the items running and since when, the idle workers -> which items get a
  copy now.
- ``BackupLedger``: what was launched, what is waiting for a worker, what won.
- ``backup_attributes``, ``is_backup``: the message's mark.
"""

import dataclasses
import logging
import statistics
from collections.abc import Collection, Mapping

from cflow.protocol import ATTR_BACKUP

log = logging.getLogger(__name__)

# An item gets a backup only once it has run this many times the run's median item time.
BACKUP_AFTER_MEDIAN_MULTIPLE = 2.0
# Items done before the median means anything.
MIN_ITEM_TIMES = 3


def backup_attributes(attributes: Mapping[str, str]) -> dict[str, str]:
    """A work message's attributes, marked as a backup copy."""
    return {**attributes, ATTR_BACKUP: "1"}


def is_backup(attributes: Mapping[str, str] | None) -> bool:
    """True for the attributes of a backup copy."""
    return (attributes or {}).get(ATTR_BACKUP) == "1"


class BackupPolicy:
    """Decides which running items get a backup copy now.

    Args:
        enabled: BACKUP_TASKS.
        multiple: how many median item times an item must have run.
        min_item_times: items done before any backup (the median needs them).
    """

    def __init__(self, enabled: bool, multiple: float = BACKUP_AFTER_MEDIAN_MULTIPLE, min_item_times: int = MIN_ITEM_TIMES) -> None:
        self.enabled = enabled
        self.multiple = multiple
        self.min_item_times = min_item_times
        self.item_times: list[float] = []

    def item_done(self, seconds: float) -> None:
        """An item was recorded done after ``seconds`` of its task."""
        if seconds >= 0:
            self.item_times.append(seconds)

    def median(self) -> float | None:
        """The median item time so far, or None before ``min_item_times`` items are done."""
        if len(self.item_times) < self.min_item_times:
            return None
        return statistics.median(self.item_times)

    def next_due(self, running_since: Mapping[str, float], backed_up: Collection[str]) -> float | None:
        """When the next running item without a backup becomes slow enough for one (on ``running_since``'s clock), or None."""
        if not self.enabled:
            return None
        median = self.median()
        starts = [started for item, started in running_since.items() if item not in backed_up]
        if median is None or not starts:
            return None
        return min(starts) + self.multiple * median

    def choose(self, running_since: Mapping[str, float], idle_workers: int, backed_up: Collection[str], now: float) -> list[str]:
        """The items to launch a backup copy of now, longest-running first.

        Args:
            running_since: item -> when its (only) copy started, for the items running now.
            idle_workers: workers that found the queue empty and hold no item (and no copy waiting for them).
            backed_up: items that had a backup already: at most one each.
            now: the clock ``running_since`` is on.
        Returns:
            At most ``idle_workers`` item ids; none while disabled or before the median is known.
        """
        if not self.enabled or idle_workers <= 0:
            return []
        median = self.median()
        if median is None:
            return []
        threshold = self.multiple * median
        slow = [(now - started, item) for item, started in running_since.items() if item not in backed_up and now - started > threshold]
        slow.sort(reverse=True)
        return [item for _, item in slow[:idle_workers]]


@dataclasses.dataclass
class BackupLedger:
    """The backups of one run: launched, waiting for a worker to pull them, and won.

    Attributes:
        launched: items a backup copy was published for.
        waiting: launched copies no worker has started yet (each holds an idle worker's place).
        won: how many backup copies recorded the item done first.
    """

    launched: set[str] = dataclasses.field(default_factory=set)
    waiting: set[str] = dataclasses.field(default_factory=set)
    won: int = 0

    def published(self, item_id: str) -> None:
        self.launched.add(item_id)
        self.waiting.add(item_id)

    def started(self, item_id: str) -> None:
        """A worker started the backup copy of ``item_id``."""
        self.waiting.discard(item_id)

    def finished(self, item_id: str, by_backup: bool) -> None:
        """``item_id`` was recorded done (by its backup copy if ``by_backup``) or failed: a copy still queued is moot."""
        self.waiting.discard(item_id)
        if by_backup:
            self.won += 1
