"""What every resource part of the Compute emulator shares: state, ids, the lock, operations, timers.

The emulator is one ``ComputeCore`` and a part per resource (``zones``,
``instances``, ``disks``, ``images``, ``operations``; the VM state machine in
``lifecycle``, what guests see in ``guest_metadata``), wired in ``engine``.
A part keeps no lock of its own: every table below, and every record in it,
is read and changed only while holding ``core.lock``. A new resource is a new
part (its table here if other parts read it, else in the part) and a route
table in ``server``.

Operations are made here (``new_operation``) because every part answers
with one; ``finish_operation`` wakes whoever waits in operations.wait.
"""

import dataclasses
import random
import threading
import uuid
from collections.abc import Callable
from typing import Any

from cflow.local.compute import api_errors
from cflow.local.compute.catalog import Catalog
from cflow.local.compute.faults import Faults
from cflow.local.compute.resources import Disk, Instance, Operation, OperationKey, ResourceKey, fingerprint, rfc3339
from cflow.local.compute.timers import TimerQueue

MAX_KEPT_OPERATIONS = 20000

WallClock = Callable[[], float]


@dataclasses.dataclass(slots=True)
class ProjectMetadata:
    """A project's ``commonInstanceMetadata``: what every VM of it sees under ``project/attributes/``."""

    items: list[dict[str, str]]
    fingerprint: str
    version: int = 0


class ComputeCore:
    """The emulator's shared state and services.

    Args:
        base_url: ``http://H:P/compute/v1/`` (selfLinks point here).
        catalog: zones, machine types and images.
        faults: the fault injector (capacity, quota, preemption, API errors).
        timers: runs timed work (boot steps, preemptions, the reaper).
        wall_clock: ``time.time``-like, for resource timestamps.
        id_random: a ``random.Random`` for resource ids and operation names.

    Attributes:
        lock: guards every table and record of every part.
        changed: notified on every state change (operations.wait waits on it).
        metadata_changed: notified when what a guest sees changes (metadata ``wait_for_change``).
        closing: True once the emulator is shutting down; new work is refused.
        instances, instances_by_id, disks, operations: the tables parts share.
        image_trees: (project, image name) -> the image's content on the host.
        project_metadata: project -> its common instance metadata (``project_metadata_of``).
    """

    def __init__(
        self, *, base_url: str, catalog: Catalog, faults: Faults, timers: TimerQueue, wall_clock: WallClock, id_random: random.Random
    ) -> None:
        self.base_url = base_url
        self.catalog = catalog
        self.faults = faults
        self.timers = timers
        self.wall_clock = wall_clock
        self.id_random = id_random
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.metadata_changed = threading.Condition(self.lock)
        self.closing = False
        self.instances: dict[ResourceKey, Instance] = {}
        self.instances_by_id: dict[int, Instance] = {}
        self.disks: dict[ResourceKey, Disk] = {}
        self.operations: dict[OperationKey, Operation] = {}
        self.image_trees: dict[tuple[str, str], str] = {}
        self.project_metadata: dict[str, ProjectMetadata] = {}
        self._used_ids: set[int] = set()
        self._operation_sequence = 0

    def now(self) -> str:
        """The wall-clock time as GCE writes timestamps."""
        return rfc3339(self.wall_clock())

    def new_id(self) -> int:
        """A fresh resource id (63 bits, never handed out before)."""
        while True:
            candidate = self.id_random.getrandbits(63) | (1 << 62)
            if candidate not in self._used_ids:
                self._used_ids.add(candidate)
                return candidate

    def zone_url(self, project: str, zone: str) -> str:
        """``BASE/projects/P/zones/Z``."""
        return f"{self.base_url}projects/{project}/zones/{zone}"

    def check_zone(self, zone: str) -> None:
        """Raises ApiError 400 for a zone the catalog does not know."""
        if self.catalog.region_of(zone) is None:
            raise api_errors.invalid_field("zone", zone, "Unknown zone.")

    def project_metadata_of(self, project: str) -> "ProjectMetadata":
        """The project's common instance metadata (empty until set; hold the lock)."""
        metadata = self.project_metadata.get(project)
        if metadata is None:
            metadata = self.project_metadata[project] = ProjectMetadata(items=[], fingerprint=fingerprint([[], 0]))
        return metadata

    def refuse_if_closing(self) -> None:
        """Raises ApiError 503 once the emulator is shutting down (hold the lock)."""
        if self.closing:
            raise api_errors.backend_error()

    # Operations (hold the lock).

    def new_operation(
        self,
        project: str,
        zone: str | None,
        operation_type: str,
        target_link: str,
        target_id: int | None = None,
        user: str | None = None,
        region: str | None = None,
    ) -> Operation:
        """Records a RUNNING operation (``zone`` None: a global one, or a regional one of ``region``) and returns it.

        Only the newest ``MAX_KEPT_OPERATIONS`` are kept: beyond that a tenth of
        the DONE ones, oldest first, are forgotten.
        """
        self._operation_sequence += 1
        now = self.wall_clock()
        random_bits = self.id_random.getrandbits
        operation = Operation(
            id=self.new_id(),
            name=f"operation-{int(now * 1000)}-{random_bits(52):013x}-{random_bits(32):08x}-{random_bits(32):08x}",
            project=project,
            zone=zone,
            operation_type=operation_type,
            target_link=target_link,
            target_id=target_id,
            status="RUNNING",
            progress=0,
            insert_ts=rfc3339(now),
            start_ts=rfc3339(now),
            user=user or f"cflow-emulator@{project}.iam.gserviceaccount.com",
            sequence=self._operation_sequence,
            region=region,
        )
        self.operations[operation.key] = operation
        if len(self.operations) > MAX_KEPT_OPERATIONS:
            for key in [key for key, old in self.operations.items() if old.status == "DONE"][: len(self.operations) // 10]:
                del self.operations[key]
        return operation

    def new_operation_group_id(self) -> str:
        """A fresh ``operationGroupId`` (a UUID, as GCE's)."""
        return str(uuid.UUID(int=self.id_random.getrandbits(128), version=4))

    def finish_operation(
        self, operation: Operation, errors: list[dict[str, Any]] | None = None, http_code: int | None = None, http_message: str | None = None
    ) -> None:
        """Marks the operation DONE (with ``errors``, if any) and wakes its waiters; a DONE one is left as it is."""
        if operation.status == "DONE":
            return
        operation.status = "DONE"
        operation.progress = 100
        operation.end_ts = self.now()
        if errors:
            operation.errors = errors
            operation.http_error_code = http_code
            operation.http_error_message = http_message
        if operation.bulk_status is not None:
            operation.bulk_status["status"] = "DONE"
        self.changed.notify_all()

    def fail_operation_later(self, operation: Operation, delay_s: float, errors: list[dict[str, Any]], http_code: int, http_message: str) -> None:
        """Finishes the operation with ``errors`` after ``delay_s`` (an error GCE reports while the operation runs)."""

        def fail() -> None:
            with self.lock:
                self.finish_operation(operation, errors, http_code, http_message)

        self.timers.call_later(delay_s, fail)

    def operation(self, project: str, zone: str | None, name: str, region: str | None = None) -> Operation:
        """Returns the operation of that scope; raises ApiError 404 if there is none (any more)."""
        operation = self.operations.get((project, zone, name))
        if operation is None or operation.region != region:
            raise api_errors.not_found(f"{operations_path(project, zone, region)}/{name}")
        return operation


def operations_path(project: str, zone: str | None, region: str | None = None) -> str:
    """``projects/P/zones/Z/operations``, ``projects/P/regions/R/operations``, or ``projects/P/global/operations``."""
    if zone is not None:
        return f"projects/{project}/zones/{zone}/operations"
    if region is not None:
        return f"projects/{project}/regions/{region}/operations"
    return f"projects/{project}/global/operations"
