"""What the scheduler tells a running worker, through the VM's own metadata: stop a copy, drain.

The scheduler sets an attribute on the worker's VM (``instances.setMetadata``,
``cflow.gcp.compute.Compute.set_metadata_attributes``); the worker's
``ControlWatch`` thread holds a ``?wait_for_change=true`` long poll on the
metadata server, so it hears the change at once without polling anything on
the per-item hot path. The loop and the task's watch only read two fields in
memory:

- ``STOP_ITEM_ATTRIBUTE`` = ITEM: the item is done elsewhere (a backup copy,
  or the original, won: ``cflow.backups``); if this VM runs a copy of it,
  stop that copy and ack it without a result.
- ``DRAIN_ATTRIBUTE`` = "true": the run reached its cost cap
  (``cflow.costs``); finish the running item and take no new one.

A watch that cannot reach the server retries with a growing wait; the run
loses nothing meanwhile (a copy not stopped runs to its end and is acked as a
duplicate; a worker not drained is deleted by the scheduler when idle).
"""

import logging
import threading

from cflow.protocol import DRAIN_ATTRIBUTE, STOP_ITEM_ATTRIBUTE
from cflow.worker.context import WorkerMetadata

log = logging.getLogger(__name__)

# How long one long poll is held; the server answers at once on a change.
WATCH_TIMEOUT_SECONDS = 60
RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS = 1.0, 30.0


class ControlWatch:
    """Watches this VM's metadata attributes for the scheduler's word, in a daemon thread.

    Args:
        metadata: the VM's metadata seam (``watch_attributes``).
        timeout_seconds: how long each long poll is held.
    """

    def __init__(self, metadata: WorkerMetadata, timeout_seconds: int = WATCH_TIMEOUT_SECONDS) -> None:
        self.metadata = metadata
        self.timeout_seconds = timeout_seconds
        self._stop_item: str | None = None
        self._draining = False
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="control-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (the thread ends after its current long poll; it is a daemon, nobody waits for it)."""
        self._ended.set()

    def should_stop(self, item_id: str) -> bool:
        """True if the scheduler said ``item_id`` is done elsewhere: a copy of it running here must stop."""
        return self._stop_item == item_id

    @property
    def draining(self) -> bool:
        """True once the scheduler said to take no new item."""
        return self._draining

    def apply(self, attributes: dict[str, str]) -> None:
        """Take the scheduler's word from the VM's attributes (what the thread does with each answer)."""
        stop_item = attributes.get(STOP_ITEM_ATTRIBUTE) or None
        if stop_item != self._stop_item and stop_item is not None:
            log.info("the scheduler says item %s is done elsewhere", stop_item)
        self._stop_item = stop_item
        draining = attributes.get(DRAIN_ATTRIBUTE, "").lower() == "true"
        if draining and not self._draining:
            log.info("the scheduler says to take no new item (the run's cost cap)")
        self._draining = draining

    def _watch(self) -> None:
        etag: str | None = None
        wait = RETRY_FIRST_SECONDS
        while not self._ended.is_set():
            try:
                attributes, etag = self.metadata.watch_attributes(etag, self.timeout_seconds)
            except Exception as error:
                log.debug("watching the VM's metadata failed (%s); trying again in %.0f s", error, wait)
                etag = None
                if self._ended.wait(wait):
                    return
                wait = min(wait * 2, RETRY_MAX_SECONDS)
                continue
            wait = RETRY_FIRST_SECONDS
            self.apply(attributes)
