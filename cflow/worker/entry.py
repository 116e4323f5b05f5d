"""The worker VM's two entry points: ``main`` (startup-signal.py) and ``shutdown_main`` (shutdown-signal.py).

The worker finds its run from the VM's metadata (``cflow-run``,
``cflow-bucket``, and the lane whose queue it pulls, ``LANE_ATTRIBUTE``) and
its run.json in Cloud Storage, and keeps what the shutdown hook needs on the
VM's disk (``hook.json``). The hook sets the stop flag first, then builds its
clients from that file, touching no network before its hand-back: GCE gives
a Spot VM 30 s in all, and the metadata server or Cloud Storage may be slow
or gone by then. Without the file (no worker started on this boot) it asks
the metadata server and run.json as the worker does. The worker also starts
the ``ControlWatch`` that hears the scheduler's word (``cflow.worker.control``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from cflow.procinfo import process_started_at
from cflow.protocol import LANE_ATTRIBUTE, Lane, LoopEnd
from cflow.worker.context import WorkerContext, WorkerSettings
from cflow.worker.control import ControlWatch
from cflow.worker.handback import hand_back, hand_back_inflight
from cflow.worker.loop import Worker
from cflow.worker.workdir import HookSettings, WorkDir

if TYPE_CHECKING:
    from cflow.gcp.metadata import Metadata

log = logging.getLogger(__name__)


def _default_work_root() -> Path:
    # The package is unpacked in WORK_ROOT/package: this file is package/cflow/worker/entry.py.
    return Path(__file__).resolve().parents[3]


def _vm_context(work_root: Path, metadata: Metadata) -> tuple[WorkerContext, HookSettings]:
    """Everything both entry points work with: run settings, clients, this VM's name; and what the hook keeps of it.

    Raises:
        SystemExit: the VM was not started by CFlow, or its run is gone.
    """
    from cflow.gcp.clients import build_worker_clients
    from cflow.gcp.pubsub import PubSub
    from cflow.gcp.storage import RunStorage

    run_id = metadata.attribute("cflow-run")
    bucket = metadata.attribute("cflow-bucket")
    if not run_id or not bucket:
        raise SystemExit("cflow worker: this VM has no cflow-run/cflow-bucket metadata; it was not started by CFlow")
    target = "local" if os.environ.get("CFLOW_EMULATED_VM") == "1" else "gcp"
    project, vm_name = metadata.get("project/project-id"), metadata.instance_name()
    if not project or not vm_name:
        raise SystemExit("cflow worker: the metadata server gave no project id or instance name")
    clients = build_worker_clients(target, project)
    storage = RunStorage(clients.storage, bucket, run_id)
    manifest = storage.read_manifest()
    if manifest is None:
        raise SystemExit(f"cflow worker: run {run_id} has no run.json in gs://{bucket}; was the run cancelled?")
    settings = WorkerSettings.from_manifest(manifest)
    pubsub = PubSub(clients.publisher, clients.subscriber)
    lane = Lane.STANDARD if metadata.attribute(LANE_ATTRIBUTE) == Lane.STANDARD else Lane.SPOT
    context = WorkerContext(settings, pubsub, storage, metadata, WorkDir(work_root), vm_name, lane=lane)
    return context, HookSettings(manifest=manifest, project=project, vm_name=vm_name, target=target, lane=lane.value)


def _hook_context(work_root: Path, metadata: Metadata, kept: HookSettings) -> WorkerContext:
    """The shutdown hook's context from what the worker kept on disk: no request is made building it."""
    from cflow.gcp.clients import build_worker_clients, vm_credentials
    from cflow.gcp.pubsub import PubSub
    from cflow.gcp.storage import RunStorage

    settings = WorkerSettings.from_manifest(kept["manifest"])
    clients = build_worker_clients(kept["target"], kept["project"], credentials=vm_credentials(kept["target"]))
    storage = RunStorage(clients.storage, settings.bucket, settings.run_id)
    lane = Lane.STANDARD if kept.get("lane") == Lane.STANDARD else Lane.SPOT
    return WorkerContext(settings, PubSub(clients.publisher, clients.subscriber), storage, metadata, WorkDir(work_root), kept["vm_name"],
                         lane=lane)


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("google", "urllib3", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(work_root: str | os.PathLike[str] | None = None) -> int:
    """startup-signal.py: work until the queue stays empty, then power the VM off. Returns the exit status (0)."""
    _configure_logging()
    root = Path(work_root or _default_work_root())
    work_dir = WorkDir(root)
    if work_dir.is_stopping():
        # init.sh started us in the parent's boot: a flag from this boot means the VM is going down.
        if not work_dir.stop_flag_is_stale(process_started_at(os.getppid())):
            log.info("this VM is shutting down; not taking work")
            return 0
        work_dir.clear_stop()
    from cflow.gcp.metadata import Metadata

    metadata = Metadata()
    context, kept = _vm_context(root, metadata)
    work_dir.write_hook_settings(kept)
    # A predecessor killed mid-item (SIGKILL, OOM) left its record: stop its
    # orphaned task and hand the item back now rather than after its lease.
    recovered = hand_back_inflight(context, reason="worker died", take_settling=True)
    if recovered:
        log.info("handed back item %s left by a worker that died", recovered)
    log.info("worker %s on run %s (%s lane)", context.vm_name, context.settings.run_id, context.lane)
    control = ControlWatch(metadata)
    control.start()
    if Worker.from_context(context, control).run() == LoopEnd.IDLE:
        # A safety net for a controller that is gone: an idle VM stops billing.
        log.info("idle for %.0f s; powering off", context.settings.idle_poweroff_seconds)
        metadata.power_off()
    return 0


def shutdown_main(work_root: str | os.PathLike[str] | None = None) -> int:
    """shutdown-signal.py: stop the worker taking work (first, before anything slow), then hand the in-flight item back.

    Returns the exit status (0).
    """
    root = Path(work_root or _default_work_root())
    WorkDir(root).request_stop()
    from cflow.gcp.metadata import Metadata

    _configure_logging()
    metadata = Metadata()
    kept = WorkDir(root).read_hook_settings()
    context = _hook_context(root, metadata, kept) if kept is not None else _vm_context(root, metadata)[0]
    item_id = hand_back(context)
    log.info("shutdown (%s): %s", "preempted" if metadata.preempted() else "stop or delete",
             f"handed back {item_id}" if item_id else "nothing in flight to hand back")
    return 0
