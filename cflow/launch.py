"""A run's set-up before and around its reconcile loop, overlapped with what it waits on.

The order is what a worker needs when it boots: its run's package and
run.json in the bucket, its subscription in Pub/Sub. Those are made first
(each step's independent parts at once), then the fleet is asked for, and
the items are published while it boots: on GCP a VM takes 25-40 s to boot,
locally a fleet of 12 a few seconds, long enough for the publishing to
happen meanwhile.

- ``Preparation``: what needs no cloud (the Google client modules imported,
  the package built, the items loaded), done in a thread while the local
  stack starts (``cflow.run._cloud``).
- ``write_run_records``: the package and items.jsonl at once, then run.json
  (last: a run with run.json has both, and its workers find everything).
- ``BackgroundPublisher``: publishes the unfinished items in a thread once
  the first reconcile step has asked for the fleet; the run loop checks on it
  after every step, so a publishing error stops the run as it always did.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cflow.config import Config
    from cflow.gcp.storage import RunStorage
    from cflow.scheduler import Scheduler
    from cflow.tasks import WorkItem

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What a new run made without the cloud: its package and, unless TASKS is a gs:// prefix, its items."""

    package: bytes | None
    items: Sequence[WorkItem] | None


def _import_clients() -> None:
    """Import the Google client libraries (most of a controller's start-up CPU), so building the clients later is quick;
    and what the run's end uses (its report), so the end does not wait for imports either."""
    import cflow.gcp.clients
    import cflow.gcp.compute
    import cflow.gcp.pubsub
    import cflow.gcp.storage
    import cflow.ops.report
    import cflow.ops.view
    import cflow.scheduler

    cflow.gcp.clients.import_client_libraries()


def prepare_locally(config: Config, resume: bool) -> Prepared:
    """The package and the items of a new run (nothing for a resumed one, whose come from the bucket).

    Raises:
        ConfigError: the tasks file cannot be read, or a key would be packaged.
    """
    from cflow.package import build_package
    from cflow.tasks import load_items

    if resume:
        return Prepared(None, None)
    package = build_package(config.base_dir)
    items = load_items(config) if config.tasks_kind != "gcs" else None
    return Prepared(package, items)


class Preparation:
    """``prepare_locally`` (and the client imports) in a thread, started at once.

    Args:
        config: the run's settings.
        resume: a resumed run (its package and items are already in the bucket).
    """

    def __init__(self, config: Config, resume: bool) -> None:
        self._imported = threading.Event()
        self._result: Future[Prepared] = Future()
        self._thread = threading.Thread(target=self._run, args=(config, resume), name="prepare", daemon=True)
        self._thread.start()

    def _run(self, config: Config, resume: bool) -> None:
        try:
            _import_clients()
        except BaseException:
            log.debug("importing the client modules ahead failed; they are imported when used", exc_info=True)
        finally:
            self._imported.set()
        try:
            self._result.set_result(prepare_locally(config, resume))
        except BaseException as error:
            self._result.set_exception(error)

    def wait_for_imports(self) -> None:
        """Wait until the client modules are imported: two threads importing the same modules can trip over each other."""
        self._imported.wait()

    def result(self) -> Prepared:
        """The package and items.

        Raises:
            What ``prepare_locally`` raised.
        """
        return self._result.result()

    def settle(self) -> None:
        """Wait for the thread to end, whatever it made: a run that stops early must not exit under its feet
        (an interpreter shutting down beneath an import or a compile prints its own errors)."""
        self._thread.join()


def write_run_records(storage: RunStorage, package: bytes, items: Sequence[WorkItem], manifest: Mapping[str, Any]) -> None:
    """Upload the package and items.jsonl at once, then run.json (``manifest``).

    Raises:
        CloudError: an upload failed; run.json is then not written.
    """
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="records") as pool:
        uploads: list[Future[Any]] = [pool.submit(storage.upload_package, package), pool.submit(storage.write_items, items)]
        for upload in uploads:
            upload.result()
    storage.write_manifest(manifest)


class BackgroundPublisher:
    """Publishes a run's unfinished items in a thread while the fleet boots and the run loop goes on.

    The scheduler's done and failed items are read once, when it starts;
    a worker acks an item already done without running it again.

    Args:
        scheduler: the run's ``Scheduler`` (its markers read).
        storage: the run's ``RunStorage``, to record that every item went out (published.json).
        wall_clock: epoch seconds for that record.
    """

    def __init__(self, scheduler: Scheduler, storage: RunStorage, wall_clock: Callable[[], float] = time.time) -> None:
        self.scheduler = scheduler
        self.storage = storage
        self.wall_clock = wall_clock
        self._done: Future[int] = Future()
        self._thread: threading.Thread | None = None
        self._reported = False

    def start(self) -> None:
        """Start publishing (once; later calls do nothing)."""
        if self._thread is not None:
            return
        # A daemon: Ctrl-C or a failed run must not wait for the rest of a million items.
        self._thread = threading.Thread(target=self._publish, name="publish", daemon=True)
        self._thread.start()

    def _unfinished(self) -> Iterator[WorkItem]:
        finished_done, finished_failed = set(self.scheduler.done_ids), set(self.scheduler.failed_ids)
        return (item for item in self.scheduler.items if item.id not in finished_done and item.id not in finished_failed)

    def _publish(self) -> None:
        try:
            count = self.scheduler.publish_items(self._unfinished())
            self.storage.mark_published(count, self.wall_clock())
            self._done.set_result(count)
        except BaseException as error:
            self._done.set_exception(error)

    def news(self) -> str | None:
        """The line to show once publishing has ended ("published N work item(s)"), then None.

        Raises:
            What publishing raised (a ``CloudError``): the run stops as when it published before its loop.
        """
        if self._reported or not self._done.done():
            return None
        count = self._done.result()
        self._reported = True
        return f"published {count} work item(s)"

    def wait(self) -> int:
        """Wait for publishing to end. Returns the count.

        Raises:
            RuntimeError: it was never started. What publishing raised.
        """
        if self._thread is None:
            raise RuntimeError("BackgroundPublisher.wait before start")
        return self._done.result()
