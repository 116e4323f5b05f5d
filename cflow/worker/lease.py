"""Keeping a pulled item's lease alive (and its log uploaded) while its task runs and its result is recorded."""

import logging
import threading
import time
from pathlib import Path

from cflow.worker.context import WorkerContext

log = logging.getLogger(__name__)

LOG_UPLOAD_INTERVAL_SECONDS = 30


class LeaseKeeper:
    """Keeps a running item's lease alive and its log uploaded, in a thread, until stopped or the item is gone.

    An extension happens under the hand-back lock and never once the VM is
    stopping (unless the worker is already recording the result), so it can
    not undo a nack. A failed extension or upload is logged and tried again
    next time.

    Args:
        context: the worker's ``WorkerContext``.
        item_id, attempt: the attempt whose log is uploaded.
        log_file: the attempt's local log.
        ack_id: the message whose lease is extended.
        upload_logs: upload the log now and then (a backup copy's is not: ``cflow.backups``).
    """

    def __init__(self, context: WorkerContext, item_id: str, attempt: int, log_file: Path, ack_id: str, upload_logs: bool = True) -> None:
        self.context = context
        self.item_id = item_id
        self.attempt = attempt
        self.log_file = log_file
        self.ack_id = ack_id
        self.upload_logs = upload_logs
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._keep, name=f"lease-{item_id}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop keeping the lease; returns once the thread has ended."""
        self.stopped.set()
        self.thread.join()

    def _keep(self) -> None:
        settings, work_dir = self.context.settings, self.context.work_dir
        extend_every = max(1.0, settings.lease_seconds / 3)
        last_log_upload = time.monotonic()
        while not self.stopped.wait(extend_every):
            with work_dir.handback_lock():
                record = work_dir.record_of(self.ack_id)
                if record is None:
                    return  # settled or handed back
                if work_dir.is_stopping() and not record.get("settling"):
                    return  # being handed back: an extension now could land after the nack
                try:
                    self.context.pubsub.extend_lease(self.context.work_subscription, self.ack_id, settings.lease_seconds)
                except Exception as error:
                    log.warning("lease extension for %s failed: %s", self.item_id, error)
            if self.upload_logs and time.monotonic() - last_log_upload >= LOG_UPLOAD_INTERVAL_SECONDS and not record.get("settling"):
                last_log_upload = time.monotonic()
                try:
                    # Once another copy recorded the item done, its log is the item's: a partial one must not replace it.
                    if not self.context.storage.is_done(self.item_id):
                        self.context.storage.upload_log(self.item_id, self.attempt, self.log_file)
                except Exception as error:
                    log.warning("log upload for %s failed: %s", self.item_id, error)
