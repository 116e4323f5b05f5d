"""The local stack: Pub/Sub emulator, fake-gcs-server and the Compute emulator as one unit.

``LocalStack(stack_dir).up()`` starts the three services on free loopback
ports as background process groups that outlive the caller, waits until each
answers, and records them in ``STACK_DIR/stack.json``; ``down()`` stops them
again by the recorded pids, after checking each pid still is the process it
started. A start that fails stops what it had started and raises one
``StackError`` naming the service and its log. ``running_stack()`` is the
same as a context manager that stops only what it started.

What lives elsewhere: launching, waiting for and stopping one service
(``cflow.local.services``); the three programs and their options
(``cflow.local.launchers``); /proc (``cflow.procinfo``).

Layout of ``STACK_DIR``: ``stack.json`` (present while the stack runs),
``pubsub.log``, ``storage.log``, ``compute.log``, ``gcs/`` (Cloud Storage
objects), ``compute/`` (the Compute emulator's state), ``compute-token``
(0600: the bearer token the Compute emulator requires, fresh at every start,
unless ``ComputeOptions(auth=False)``; ``CFLOW_COMPUTE_TOKEN_FILE`` names it).
"""

import contextlib
import dataclasses
import fcntl
import http.client
import json
import logging
import os
import shlex
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NotRequired, TypedDict, cast

from cflow.errors import StackError
from cflow.local import (
    DEFAULT_STACK_DIR,
    ENV_COMPUTE,
    ENV_COMPUTE_TOKEN_FILE,
    ENV_PROJECT,
    ENV_PUBSUB,
    ENV_STORAGE,
    LOCAL_PROJECT,
    LOCAL_ZONE,
)
from cflow.local.launchers import (
    ComputeOptions,
    find_pubsub_emulator,
    find_storage_server,
    launch_compute_emulator,
    launch_pubsub_emulator,
    launch_storage_server,
    prepare_vm_root,
    read_token,
    require_compute_emulator,
    write_fresh_token,
)
from cflow.local.services import (
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Clock,
    PortPicker,
    Service,
    Sleep,
    free_loopback_port,
    stop_service,
)

__all__ = ["ComputeOptions", "LocalStack", "ServiceStatus", "StackInfo", "count_vms", "export_lines", "running_stack"]

logger = logging.getLogger(__name__)

ENV_ZONE = "CFLOW_ZONE"
STACK_FILE = "stack.json"
COMPUTE_TOKEN_FILE = "compute-token"
STACK_FORMAT = 1
# The Compute emulator runs every VM's shutdown script on SIGTERM; give it
# that grace plus this margin before we kill it.
COMPUTE_STOP_MARGIN_S = 20.0
COMPUTE_DEFAULT_GRACE_S = 90.0  # the emulator's default for standard VMs (Spot: 30)


# ---------------------------------------------------------------- the stack


@dataclasses.dataclass(frozen=True)
class StackInfo:
    """Where a running local stack answers."""

    pubsub_host: str  # "127.0.0.1:P"
    storage_url: str  # "http://127.0.0.1:S"
    compute_endpoint: str  # "http://127.0.0.1:C/compute/v1/"
    project: str
    zone: str
    dir: str
    vm_root: str | None = None  # the real root its VMs boot on (--vm-root), or None: they share this machine's
    compute_token_file: str | None = None  # the Compute emulator's bearer token (None: it answers anyone)

    def env(self) -> dict[str, str]:
        """Return the environment variables that point CFlow and the Google clients at this stack."""
        variables = {
            ENV_PUBSUB: self.pubsub_host,
            ENV_STORAGE: self.storage_url,
            ENV_COMPUTE: self.compute_endpoint,
            ENV_PROJECT: self.project,
            ENV_ZONE: self.zone,
        }
        if self.compute_token_file is not None:
            variables[ENV_COMPUTE_TOKEN_FILE] = self.compute_token_file
        return variables


@dataclasses.dataclass(frozen=True)
class ServiceStatus:
    """One line of ``cflow local status``."""

    name: str
    pid: int
    endpoint: str
    alive: bool
    log: str


class StackRecord(TypedDict):
    """What ``stack.json`` holds."""

    format: int
    project: str
    zone: str
    compute_options: dict[str, Any]
    services: dict[str, dict[str, Any]]  # name in SERVICE_ORDER -> Service.to_json()
    compute_token_file: NotRequired[str | None]


SERVICE_ORDER = ("pubsub", "storage", "compute")


class LocalStack:
    """The local stack living in ``stack_dir``: start it, find it, stop it.

    Args:
        stack_dir: directory for stack.json, logs and data (created on ``up``).
        start_timeout_s: how long each service may take to answer.
        clock, sleep: time source for deadlines and polling.
        pick_port: picks the loopback port of the Pub/Sub emulator and of
            fake-gcs-server (again for each retry).
    """

    def __init__(
        self,
        stack_dir: str | os.PathLike[str] = DEFAULT_STACK_DIR,
        start_timeout_s: float = START_TIMEOUT_S,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
        pick_port: PortPicker = free_loopback_port,
    ) -> None:
        self.dir = Path(stack_dir).absolute()
        self.start_timeout_s = start_timeout_s
        self.clock = clock
        self.sleep = sleep
        self.pick_port = pick_port
        # Popen handles of what this object started, so their exit status is collected.
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def stack_file(self) -> Path:
        """``STACK_DIR/stack.json``."""
        return self.dir / STACK_FILE

    def _lock(self) -> contextlib.closing[IO[str]]:
        """Serialise up/down on the same directory across processes."""
        self.dir.mkdir(parents=True, exist_ok=True)
        lock_file = open(self.dir / ".lock", "w")
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        return contextlib.closing(lock_file)

    def _read_record(self) -> StackRecord | None:
        try:
            record = json.loads(self.stack_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise StackError(
                f"{self.stack_file} is unreadable ({error}); delete it (after stopping the emulators it lists) and run `cflow local up`"
            ) from error
        if not isinstance(record, dict) or record.get("format") != STACK_FORMAT:
            raise StackError(
                f"{self.stack_file} was written by another cflow version; stop that stack with it, or delete the file, and run `cflow local up`"
            )
        return cast(StackRecord, record)

    @staticmethod
    def _services(record: StackRecord) -> dict[str, Service]:
        recorded = record["services"]
        return {name: Service.from_json(recorded[name]) for name in SERVICE_ORDER if name in recorded}

    def _info_from(self, record: StackRecord) -> StackInfo:
        services = self._services(record)
        return StackInfo(
            pubsub_host=services["pubsub"].endpoint,
            storage_url=services["storage"].endpoint,
            compute_endpoint=services["compute"].endpoint,
            project=record["project"],
            zone=record["zone"],
            dir=str(self.dir),
            vm_root=record["compute_options"].get("vm_root"),
            compute_token_file=record.get("compute_token_file"),
        )

    def _all_alive(self, record: StackRecord) -> bool:
        services = self._services(record)
        return set(services) == set(SERVICE_ORDER) and all(service.is_alive() for service in services.values())

    def info(self) -> StackInfo | None:
        """Return the running stack's StackInfo, or None unless all three services are alive.

        Raises:
            StackError: stack.json is unreadable or from another cflow version.
        """
        record = self._read_record()
        if record is None or not self._all_alive(record):
            return None
        return self._info_from(record)

    def up(self, compute_options: ComputeOptions | None = None) -> StackInfo:
        """Start the stack, or reuse the one running in ``stack_dir``; a partly dead one is restarted.

        Args:
            compute_options: ComputeOptions for the Compute emulator; None
                accepts whatever a running stack has (defaults for a new one).
        Returns:
            StackInfo.
        Raises:
            StackError: a service is missing or did not start (nothing is left
            running), or a running stack has other compute options.
        """
        return self.up_reporting_start(compute_options)[0]

    def up_reporting_start(self, compute_options: ComputeOptions | None = None) -> tuple[StackInfo, bool]:
        """As ``up``, but return (StackInfo, started): ``started`` is False when a running stack was reused."""
        with self._lock():
            record = self._read_record()
            if record is not None:
                recorded_options = ComputeOptions.from_json(record["compute_options"])
                if self._all_alive(record):
                    if compute_options is not None and compute_options != recorded_options:
                        raise StackError(
                            f"a local stack with other compute options is running in {self.dir}; stop it with `cflow local down --dir {self.dir}` first"
                        )
                    logger.info("reusing the local stack running in %s", self.dir)
                    return self._info_from(record), False
                logger.info("the local stack in %s is partly dead; restarting it", self.dir)
                self._stop_record(record)
                compute_options = compute_options or recorded_options
            return self._start(compute_options or ComputeOptions()), True

    def _start(self, compute_options: ComputeOptions) -> StackInfo:
        # Fail fast on a missing program before anything is started.
        find_pubsub_emulator()
        find_storage_server()
        require_compute_emulator()
        if compute_options.vm_root is not None:
            prepare_vm_root(compute_options.vm_root)
        logger.info("starting the local stack in %s", self.dir)
        started: list[Service] = []
        deadline_s, clock, sleep = self.start_timeout_s, self.clock, self.sleep
        try:
            # Each launcher stops its own service if it fails; what started before is stopped below.
            pubsub, process = launch_pubsub_emulator(self.dir / "pubsub.log", deadline_s, clock=clock, sleep=sleep, pick_port=self.pick_port)
            self._keep(started, pubsub, process)
            storage, process = launch_storage_server(
                self.dir / "gcs", self.dir / "storage.log", deadline_s, clock=clock, sleep=sleep, pick_port=self.pick_port
            )
            self._keep(started, storage, process)
            token_file = None
            if compute_options.auth:
                # A fresh token per start: whoever read an earlier stack's token cannot reach this one.
                token_file = self.dir / COMPUTE_TOKEN_FILE
                write_fresh_token(token_file)
            compute, process = launch_compute_emulator(
                self.dir / "compute", self.dir / "compute.log", pubsub.endpoint, storage.endpoint, compute_options, deadline_s, clock, sleep,
                token_file=token_file,
            )  # fmt: skip
            self._keep(started, compute, process)
        except BaseException:
            for service in reversed(started):
                stop_service(service, clock=self.clock, sleep=self.sleep)
            self._reap()
            raise
        record: StackRecord = {
            "format": STACK_FORMAT,
            "project": LOCAL_PROJECT,
            "zone": LOCAL_ZONE,
            "compute_options": compute_options.to_json(),
            "services": {name: service.to_json() for name, service in zip(SERVICE_ORDER, started)},
            "compute_token_file": str(token_file) if token_file is not None else None,
        }
        temporary = self.stack_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(record, indent=2) + "\n")
        temporary.replace(self.stack_file)
        info = self._info_from(record)
        logger.info("local stack up: Pub/Sub %s, Cloud Storage %s, Compute %s", info.pubsub_host, info.storage_url, info.compute_endpoint)
        return info

    def _keep(self, started: list[Service], service: Service, process: "subprocess.Popen[bytes]") -> None:
        started.append(service)
        self._processes.append(process)

    def down(self) -> list[str]:
        """Stop every service recorded in ``stack_dir``, the Compute emulator first (it stops its VMs).

        Returns:
            The names of the services that were still running and were stopped
            (empty if nothing was running).
        """
        with self._lock():
            record = self._read_record()
            if record is None:
                return []
            return self._stop_record(record)

    def _stop_record(self, record: StackRecord) -> list[str]:
        services = self._services(record)
        grace = ComputeOptions.from_json(record["compute_options"]).shutdown_grace
        timeouts = {"compute": (COMPUTE_DEFAULT_GRACE_S if grace is None else grace) + COMPUTE_STOP_MARGIN_S}
        stopped = []
        for name in reversed(SERVICE_ORDER):
            service = services.get(name)
            if service is None or not service.group_exists():
                continue
            logger.info("stopping the %s (pid %d)", service.name, service.pid)
            stop_service(
                service, timeouts.get(name, STOP_TIMEOUT_S), terminate_leader_only=(name == "compute"), clock=self.clock, sleep=self.sleep
            )
            stopped.append(name)
        self._reap()
        token_file = record.get("compute_token_file")
        if token_file:
            Path(token_file).unlink(missing_ok=True)
        self.stack_file.unlink(missing_ok=True)
        return stopped

    def _reap(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=1)
        self._processes = [process for process in self._processes if process.returncode is None]

    def status(self) -> tuple[list[ServiceStatus], dict[str, int] | None]:
        """Return (ServiceStatus list, VM counts by status or None): what ``stack.json`` records, checked live.

        The VM counts come from the Compute REST aggregatedList; None if the
        emulator does not answer. Returns ([], None) when there is no stack.
        """
        record = self._read_record()
        if record is None:
            return [], None
        services = self._services(record)
        statuses = [ServiceStatus(service.name, service.pid, service.endpoint, service.is_alive(), service.log) for service in services.values()]
        vm_counts = None
        compute = services.get("compute")
        if compute is not None and compute.is_alive():
            vm_counts = count_vms(compute.endpoint, record["project"], token_file=record.get("compute_token_file"))
        return statuses, vm_counts


def _http_json(url: str, timeout_s: float = 5.0, headers: dict[str, str] | None = None) -> Any:
    # Loopback only: bypass any proxy configured in the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout_s) as response:
        return json.load(response)


def count_vms(compute_endpoint: str, project: str, attempts: int = 3, token_file: str | None = None) -> dict[str, int] | None:
    """Count the project's VMs by status through the Compute REST aggregatedList.

    Args:
        token_file: the emulator's bearer token file, if it has one.
    Returns:
        {status: count}, or None if the emulator does not answer (or refuses us).
    """
    headers = {}
    if token_file is not None:
        try:
            headers["Authorization"] = f"Bearer {read_token(token_file)}"
        except OSError as error:
            logger.debug("cannot read the Compute emulator's token: %s", error)
            return None
    counts: dict[str, int] = {}
    url = f"{compute_endpoint}projects/{project}/aggregated/instances"
    while True:
        page = None
        # The emulator may be injecting transient 429/503 errors (--error-rate).
        for _ in range(attempts):
            try:
                page = _http_json(url, headers=headers)
                break
            except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as error:
                logger.debug("aggregatedList failed: %s", error)
        if page is None:
            return None
        for scoped in page.get("items", {}).values():
            for instance in scoped.get("instances", []):
                status = instance.get("status", "UNKNOWN")
                counts[status] = counts.get(status, 0) + 1
        token = page.get("nextPageToken")
        if not token:
            return counts
        url = f"{compute_endpoint}projects/{project}/aggregated/instances?pageToken={urllib.parse.quote(token)}"


@contextlib.contextmanager
def running_stack(stack_dir: str | os.PathLike[str] = DEFAULT_STACK_DIR, **compute_options: Any) -> Iterator[StackInfo]:
    """Use the local stack in ``stack_dir``: reuse a running one or start one, stopping only what we started.

    Args:
        stack_dir: as for LocalStack.
        **compute_options: ComputeOptions fields; none given accepts any running stack.
    Yields:
        StackInfo.
    Raises:
        StackError: as LocalStack.up.
    """
    stack = LocalStack(stack_dir)
    info, started = stack.up_reporting_start(ComputeOptions(**compute_options) if compute_options else None)
    try:
        yield info
    finally:
        if started:
            stack.down()


def export_lines(info: StackInfo) -> list[str]:
    """Return ``export NAME=VALUE`` shell lines for ``info.env()``, quoted for eval."""
    return [f"export {name}={shlex.quote(value)}" for name, value in info.env().items()]
