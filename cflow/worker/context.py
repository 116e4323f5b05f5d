"""What every part of a worker works with: the run's settings, its clients, its files.

- ``WorkerSettings``: the run, as its run.json tells a worker.
- ``WorkerPubSub``, ``WorkerStorage``, ``WorkerMetadata``: the seams a worker
  calls (the real ones are ``cflow.gcp.pubsub.PubSub``,
  ``cflow.gcp.storage.RunStorage`` and ``cflow.gcp.metadata.Metadata``;
  tests pass in-memory ones).
- ``WorkerContext``: all of that for one VM (and its lane: which queue it
  pulls, ``cflow.lanes``), with the few calls every part makes (publish an
  event, ack, nack).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cflow.history import AttemptSpan
from cflow.protocol import Event, EventKind, Lane
from cflow.worker.workdir import WorkDir

if TYPE_CHECKING:
    from cflow.gcp.pubsub import Received

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs to know of its run, read from the run's run.json."""

    run_id: str
    bucket: str
    work_subscription: str
    work_topic: str
    events_topic: str
    task_command: tuple[str, ...]
    task_timeout: float
    max_attempts: int
    lease_seconds: int
    idle_poweroff_seconds: float
    combine: str = "none"  # the run's COMBINE: "concat" keeps a CSV output's header apart (cflow.worker.record)
    # The standard lane ("" for a run made before lanes) and when a preempted item moves to it (None: never).
    standard_subscription: str = ""
    standard_topic: str = ""
    preemptions_before_standard: int | None = None
    stage_inputs: bool = False  # STAGE_INPUTS: download the item's gs:// objects first (cflow.worker.staging)
    gpu_count: int = 0  # the VM's GPUs, for the task's CFLOW_GPU_COUNT

    def lane_subscription(self, lane: Lane) -> str:
        """The work subscription a worker of ``lane`` pulls."""
        return self.standard_subscription if lane == Lane.STANDARD and self.standard_subscription else self.work_subscription

    def lane_topic(self, lane: Lane) -> str:
        """The work topic of ``lane``: where an item of it is published again."""
        return self.standard_topic if lane == Lane.STANDARD and self.standard_topic else self.work_topic

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> WorkerSettings:
        """The settings in a run.json document (``cflow.run`` writes it). Raises KeyError if one is missing."""
        topics = manifest["topics"]
        # const.py as the run started (Config.to_dict()); a run recorded before a setting existed lacks it.
        started_with = manifest.get("settings") or {}
        return cls(
            run_id=manifest["run_id"],
            bucket=manifest["bucket"],
            work_subscription=topics["work_subscription"],
            work_topic=topics["work_topic"],
            events_topic=topics["events_topic"],
            task_command=tuple(manifest["task_command"]),
            task_timeout=float(manifest["task_timeout"]),
            max_attempts=int(manifest["max_attempts"]),
            lease_seconds=int(manifest["lease_seconds"]),
            idle_poweroff_seconds=float(manifest["idle_poweroff_seconds"]),
            combine=str(manifest.get("combine", "none")),
            standard_subscription=topics.get("standard_subscription", ""),
            standard_topic=topics.get("standard_topic", ""),
            preemptions_before_standard=manifest.get("preemptions_before_standard"),
            stage_inputs=bool(started_with.get("stage_inputs", False)),
            gpu_count=int(started_with.get("vm_gpu_count", 0)) if started_with.get("vm_gpu_type") else 0,
        )


class WorkerPubSub(Protocol):
    """The Pub/Sub calls a worker makes. Every method may raise the client's errors."""

    def pull(self, subscription: str, max_messages: int = 1, timeout: float = 30.0) -> list[Received]:
        """Up to ``max_messages`` messages; [] when none came within ``timeout`` seconds."""
        ...

    def publish(self, topic: str, data: bytes, attributes: dict[str, str]) -> str:
        """Publish one message and wait until the service has it; returns its id."""
        ...

    def publish_event(self, topic: str, event: Event, wait: bool = True) -> object:
        """Publish one event; with ``wait=False`` return at once."""
        ...

    def ack(self, subscription: str, ack_ids: list[str]) -> None: ...

    def nack(self, subscription: str, ack_id: str) -> None:
        """Hand a message back for immediate redelivery (it keeps its attributes)."""
        ...

    def extend_lease(self, subscription: str, ack_id: str, seconds: int) -> None: ...


class WorkerStorage(Protocol):
    """The run's Cloud Storage objects a worker reads and writes. Every method may raise the client's errors."""

    def is_done(self, item_id: str) -> bool: ...

    def attempt_recorded(self, item_id: str, attempt: int) -> bool: ...

    def upload_output(self, item_id: str, name: str, local_path: Path, offset: int = 0) -> None:
        """Upload an output file from byte ``offset`` on."""
        ...

    def upload_log(self, item_id: str, attempt: int, local_path: Path) -> str:
        """Upload an attempt's log; returns its gs:// URL."""
        ...

    def write_done_marker(self, item_id: str, info: dict[str, Any]) -> bool:
        """Create-once: False if another attempt recorded the item done first."""
        ...

    def write_failed_marker(self, item_id: str, info: dict[str, Any]) -> bool: ...

    def write_attempt_marker(self, item_id: str, attempt: int, info: dict[str, Any]) -> bool: ...

    def write_timeline_record(self, span: AttemptSpan) -> None:
        """Record the span of an attempt that leaves no marker (handed back, or a duplicate)."""
        ...

    def write_lane_marker(self, lane: str, item_id: str, info: dict[str, Any]) -> None:
        """Record that the item moved to ``lane`` (before it is published there)."""
        ...

    def download_input(self, url: str, local_path: Path) -> int:
        """Download an item's input object to ``local_path`` (STAGE_INPUTS); returns the bytes written."""
        ...


class WorkerMetadata(Protocol):
    """The VM's metadata server, as far as the worker loop, its control watch and the hand-back ask it."""

    def preempted(self) -> bool:
        """True once GCE is preempting this VM; False also when the server cannot tell."""
        ...

    def watch_attributes(self, last_etag: str | None, timeout_seconds: int = 60) -> tuple[dict[str, str], str]:
        """The instance's attributes once they differ from the answer with ETag ``last_etag`` (at once for None).

        Returns ``(attributes, etag)``; raises ``cflow.gcp.metadata.MetadataError`` when the server does not answer.
        """
        ...


@dataclass(frozen=True)
class WorkerContext:
    """One worker VM's run settings, clients and work directory.

    Args:
        settings: the run's ``WorkerSettings``.
        pubsub: the worker's Pub/Sub seam.
        storage: the run's Cloud Storage seam.
        metadata: the VM's metadata seam (for the preempted flag).
        work_dir: the VM's ``WorkDir``.
        vm_name: this VM's name, recorded in events and markers.
        clock: monotonic seconds (tests pass their own).
        sleep: how to wait (tests pass their own).
        lane: the queue this VM pulls (its metadata attribute ``LANE_ATTRIBUTE``).
    """

    settings: WorkerSettings
    pubsub: WorkerPubSub
    storage: WorkerStorage
    metadata: WorkerMetadata
    work_dir: WorkDir
    vm_name: str
    clock: Callable[[], float] = field(default=time.monotonic)
    sleep: Callable[[float], None] = field(default=time.sleep)
    lane: Lane = Lane.SPOT

    @property
    def work_subscription(self) -> str:
        """The subscription this VM pulls, acks and nacks on: its lane's."""
        return self.settings.lane_subscription(self.lane)

    @property
    def work_topic(self) -> str:
        """Where an item of this VM's lane is published again (a failed attempt's successor)."""
        return self.settings.lane_topic(self.lane)

    def publish_event(self, kind: EventKind, *, wait: bool = True, item: str | None = None, attempt: int | None = None,
                      seconds: float | None = None, reason: str | None = None, log_url: str | None = None,
                      detail: str | None = None, preemptions: int | None = None, lane: Lane | None = None,
                      backup: bool = False) -> None:
        """Tell the scheduler ``kind`` happened (fields left None are not sent).

        Never raises: an event is progress news, and losing one must not lose
        work. With ``wait=False`` it returns at once and a failure is only logged.
        """
        event: Event = {"type": kind.value, "vm": self.vm_name, "time": time.time()}
        if item is not None:
            event["item"] = item
        if attempt is not None:
            event["attempt"] = attempt
        if seconds is not None:
            event["seconds"] = seconds
        if reason is not None:
            event["reason"] = reason
        if log_url is not None:
            event["log"] = log_url
        if detail is not None:
            event["detail"] = detail
        if preemptions is not None:
            event["preemptions"] = preemptions
        if lane is not None:
            event["lane"] = lane.value
        if backup:
            event["backup"] = True
        try:
            self.pubsub.publish_event(self.settings.events_topic, event, wait=wait)
        except Exception as error:
            log.warning("could not publish %s event: %s", kind, error)

    def ack(self, ack_id: str) -> None:
        """Settle a work message whose result is recorded. A failure is logged: a redelivery is acked as a duplicate."""
        try:
            self.pubsub.ack(self.work_subscription, [ack_id])
        except Exception as error:
            log.warning("ack failed (%s); a redelivery will be acked as a duplicate", error)

    def nack(self, ack_id: str, item_id: str) -> None:
        """Hand a work message back. A failure is logged: its lease expiry redelivers it anyway."""
        try:
            self.pubsub.nack(self.work_subscription, ack_id)
        except Exception as error:
            log.warning("nack of %s failed (%s); its lease expiry will redeliver it", item_id, error)
