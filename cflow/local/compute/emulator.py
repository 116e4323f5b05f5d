"""``ComputeEmulator``: the Compute Engine emulator assembled and run in-process."""

import dataclasses
import logging
import os
import random
import resource
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable

from cflow.errors import CflowError
from cflow.local import ENV_COMPUTE, ENV_PUBSUB, ENV_STORAGE, LOCAL_PROJECT
from cflow.local.compute import rootfs
from cflow.local.compute.auth import BearerTokenCheck, TokenFileError, read_token_file
from cflow.local.compute.catalog import Catalog
from cflow.local.compute.console import SerialConsole
from cflow.local.compute.disk_images import DiskImages
from cflow.local.compute.engine import ComputeEngine
from cflow.local.compute.faults import Faults
from cflow.local.compute.guest_root import GuestRoots
from cflow.local.compute.metadata import MetadataServers
from cflow.local.compute.policy import OrganizationPolicy
from cflow.local.compute.quotas import QuotaLimits, QuotaSetting
from cflow.local.compute.rate_limit import RateLimiter
from cflow.local.compute.request_ids import RequestIds
from cflow.local.compute.server import ApiServer, Dispatcher, engine_routes
from cflow.local.compute.timers import TimerQueue
from cflow.local.compute.vm import GuestLauncher, PowerOff, ProcessTable, SlowGuests, Watchdog

logger = logging.getLogger(__name__)


class EmulatorOptionError(CflowError):
    """An option of ``cflow emulator compute`` is invalid."""


@dataclasses.dataclass
class EmulatorOptions:
    """How the emulator runs; every field matches a ``cflow emulator compute`` option.

    ``zone_capacity`` maps zone -> max live VMs; ``shutdown_grace_s`` None keeps
    GCE's grace periods (30 s Spot/preemptible, 90 s standard); ``state_dir``
    None is a temporary directory deleted at stop; ``rate_limit_per_minute``
    None is no rate quota; ``resource_not_ready`` False accepts delete and
    stop of a VM that is booting or stopping (GCE refuses them). ``quotas`` are the
    ``--quota`` settings; ``cpu_quota`` is ``--quota CPUS=N`` (the settings
    win over it). ``deny_external_ip`` is the organization policy
    ``constraints/compute.vmExternalIpAccess`` denying every VM;
    ``default_network`` False is ``--no-default-network``; ``vm_root`` names a
    real root for every VM (``rootfs.RECIPES``), None shares the host's
    filesystem; ``auth_token_file`` set, every API request must carry
    ``Authorization: Bearer <its token>``. ``slow_vms`` is the fraction of
    VMs that get only 1/``slow_factor`` of the time.
    """

    host: str = "127.0.0.1"
    port: int = 0
    project: str = LOCAL_PROJECT
    state_dir: str | None = None
    pubsub_emulator_host: str | None = None
    storage_emulator_host: str | None = None
    shutdown_grace_s: float | None = None
    preempt_mean_s: float | None = None
    zone_capacity: dict[str, int] = dataclasses.field(default_factory=dict)
    cpu_quota: int | None = None
    quotas: list[QuotaSetting] = dataclasses.field(default_factory=list)
    deny_external_ip: bool = False
    default_network: bool = True
    error_rate: float = 0.0
    boot_delay_s: float = 0.0
    seed: int | None = None
    rate_limit_per_minute: int | None = None
    resource_not_ready: bool = True
    slow_vms: float = 0.0
    slow_factor: float = 5.0
    vm_root: str | None = None
    auth_token_file: str | None = None

    def validate(self, known_zones: set[str]) -> None:
        """Raises EmulatorOptionError for values the emulator cannot honour."""
        if self.vm_root is not None:
            if self.vm_root not in rootfs.RECIPES:
                raise EmulatorOptionError(f"--vm-root {self.vm_root!r} is unknown; use one of: {', '.join(sorted(rootfs.RECIPES))}")
            problem = rootfs.host_problem()
            if problem:
                raise EmulatorOptionError(f"--vm-root {self.vm_root}: {problem}")
        if not 0.0 <= self.error_rate < 1.0:
            raise EmulatorOptionError(f"--error-rate {self.error_rate} must be in [0, 1); use e.g. 0.1 for 10% of requests")
        durations = (("--shutdown-grace", self.shutdown_grace_s), ("--preempt-mean-s", self.preempt_mean_s), ("--boot-delay", self.boot_delay_s))
        for name, value in durations:
            if value is not None and value < 0:
                raise EmulatorOptionError(f"{name} {value} must not be negative")
        if not 0.0 <= self.slow_vms <= 1.0:
            raise EmulatorOptionError(f"--slow-vms {self.slow_vms} must be a fraction from 0 to 1; use e.g. 0.1 for a tenth of the VMs")
        if self.slow_factor < 1.0:
            raise EmulatorOptionError(f"--slow-factor {self.slow_factor} must be at least 1; use e.g. 5 for VMs five times slower")
        if self.rate_limit_per_minute is not None and self.rate_limit_per_minute < 1:
            raise EmulatorOptionError(f"--rate-limit-per-minute {self.rate_limit_per_minute} must be at least 1; leave it out for no limit")
        if self.cpu_quota is not None and self.cpu_quota < 0:
            raise EmulatorOptionError(f"--cpu-quota {self.cpu_quota} must not be negative")
        for zone, capacity in self.zone_capacity.items():
            if zone not in known_zones:
                raise EmulatorOptionError(f"--zone-capacity names unknown zone {zone!r}; known zones: {', '.join(sorted(known_zones))}")
            if capacity < 0:
                raise EmulatorOptionError(f"--zone-capacity {zone}={capacity} must not be negative")
        known_regions = {zone.rsplit("-", 1)[0] for zone in known_zones}
        for setting in self.quotas:
            if setting.region is not None and setting.region not in known_regions:
                raise EmulatorOptionError(
                    f"--quota {setting.region}:{setting.metric} names unknown region {setting.region!r}; known regions: {', '.join(sorted(known_regions))}"
                )

    def quota_limits(self) -> QuotaLimits:
        """The quotas' limits: ``cpu_quota`` as CPUS in every region, then the ``--quota`` settings."""
        shorthand = [QuotaSetting("CPUS", float(self.cpu_quota))] if self.cpu_quota is not None else []
        return QuotaLimits([*shorthand, *self.quotas])


def _raise_open_file_limit() -> None:
    # Each VM holds a listening socket; the default soft limit (1024) caps a fleet early.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard))
        except (ValueError, OSError):
            pass


@dataclasses.dataclass(frozen=True)
class _Running:
    """What ``start`` set going, for ``stop`` to end in order."""

    server: ApiServer
    engine: ComputeEngine
    timers: TimerQueue
    power_off: PowerOff
    metadata_servers: MetadataServers
    watchdog: Watchdog
    console: SerialConsole
    slow_guests: SlowGuests | None


class ComputeEmulator:
    """Compute Engine v1 at ``http://H:P/compute/v1/``, each VM a local process group.

    Args:
        options: an EmulatorOptions.
        wall_clock: ``time.time``-like, for resource timestamps.
        monotonic: ``time.monotonic``-like, for delays and deadlines.

    ``start()`` returns the base URL; ``stop()`` powers every VM off (shutdown
    scripts within the grace period, then kills) and releases everything.
    """

    def __init__(self, options: EmulatorOptions, wall_clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self._wall_clock = wall_clock
        self._monotonic = monotonic
        self._temporary_state_dir: str | None = None
        self._running: _Running | None = None
        self._stopped = threading.Event()
        self.base_url: str | None = None
        self.engine: ComputeEngine | None = None
        self.state_dir: str | None = None
        self.watchdog: Watchdog | None = None

    def start(self) -> str:
        """Starts serving; returns the base URL ``http://H:P/compute/v1/``.

        Raises:
            EmulatorOptionError: an option is invalid, or the address cannot be listened on.
        """
        options = self.options
        options.validate(set(Catalog("").zone_names()))
        token_check = None
        if options.auth_token_file is not None:
            try:
                token_check = BearerTokenCheck(read_token_file(options.auth_token_file))
            except TokenFileError as error:
                raise EmulatorOptionError(str(error)) from None
        root_dir = None
        if options.vm_root is not None:
            # Built once per machine (about a minute), before the API answers.
            try:
                root_dir = str(rootfs.RootCache().ensure(rootfs.recipe_named(options.vm_root)))
            except rootfs.VmRootError as error:
                raise EmulatorOptionError(str(error)) from None
        _raise_open_file_limit()
        try:
            server = ApiServer((options.host, options.port), token_check=token_check)
        except OSError as error:
            raise EmulatorOptionError(
                f"cannot listen on {options.host}:{options.port} ({error.strerror}); pick another --port, or 0 for any free port"
            ) from None
        if options.state_dir:
            state_dir = os.path.abspath(options.state_dir)
            os.makedirs(state_dir, exist_ok=True)
        else:
            state_dir = self._temporary_state_dir = tempfile.mkdtemp(prefix="cflow-compute-")
        self.state_dir = state_dir
        host, port = server.server_address[:2]
        url_host = "127.0.0.1" if host in ("0.0.0.0", "") else str(host)
        base_url = self.base_url = f"http://{url_host}:{port}/compute/v1/"
        catalog = Catalog(base_url)

        marker_prefix = f"{secrets.token_hex(6)}-"
        watchdog = self.watchdog = Watchdog(marker_prefix)
        watchdog.start()
        vm_environment = {ENV_COMPUTE: base_url}
        if options.pubsub_emulator_host:
            vm_environment[ENV_PUBSUB] = options.pubsub_emulator_host
        if options.storage_emulator_host:
            vm_environment[ENV_STORAGE] = options.storage_emulator_host
        metadata_servers = MetadataServers("127.0.0.1")
        console = SerialConsole(self._wall_clock)
        roots = GuestRoots(root_dir, metadata_servers) if root_dir is not None else None
        launcher = GuestLauncher(state_dir, marker_prefix, vm_environment, watchdog, console, root=roots)
        power_off = PowerOff(launcher, ProcessTable(marker_prefix), self._monotonic)
        timers = TimerQueue(self._monotonic)
        faults = Faults(options.error_rate, options.zone_capacity, options.preempt_mean_s, options.seed, slow_fraction=options.slow_vms)
        slow_guests = SlowGuests(ProcessTable(marker_prefix), options.slow_factor, self._monotonic) if options.slow_vms > 0 else None
        engine = self.engine = ComputeEngine(
            base_url=base_url,
            catalog=catalog,
            faults=faults,
            launcher=launcher,
            power_off=power_off,
            disk_images=DiskImages(state_dir),
            metadata_ports=metadata_servers,
            timers=timers,
            wall_clock=self._wall_clock,
            boot_delay_s=options.boot_delay_s,
            shutdown_grace_s=options.shutdown_grace_s,
            id_random=random.Random(None if options.seed is None else options.seed + 1),
            refuse_not_ready=options.resource_not_ready,
            quota_limits=options.quota_limits(),
            policy=OrganizationPolicy(deny_external_ip=options.deny_external_ip),
            default_network=options.default_network,
            slow_guests=slow_guests,
        )
        rate_limiter = RateLimiter(options.rate_limit_per_minute, self._wall_clock) if options.rate_limit_per_minute else None
        server.dispatcher = Dispatcher(engine_routes(engine), faults, rate_limiter, RequestIds(engine.core))
        metadata_servers.start(engine.guest_metadata)
        console.start()
        power_off.start()
        if slow_guests is not None:
            slow_guests.start()
        timers.start()
        engine.start()
        server_thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="compute-api", daemon=True)
        server_thread.start()
        self._running = _Running(server, engine, timers, power_off, metadata_servers, watchdog, console, slow_guests)
        logger.info("compute emulator: state in %s, watchdog pid %s", state_dir, watchdog.pid)
        if roots is not None:
            logger.info("compute emulator: %s", roots.describe())
        return base_url

    def stop(self) -> None:
        """Powers off every VM (in parallel), then stops serving. Idempotent."""
        running = self._running
        if self._stopped.is_set() or running is None:
            return
        self._stopped.set()
        if running.slow_guests is not None:
            running.slow_guests.stop()  # the VMs' shutdown scripts run at full speed, and nothing is left stopped
        running.engine.shutdown()
        running.server.shutdown()
        running.server.server_close()
        running.timers.stop()
        running.power_off.stop()
        running.metadata_servers.stop()
        running.watchdog.close()
        running.console.stop()
        if self._temporary_state_dir:
            shutil.rmtree(self._temporary_state_dir, ignore_errors=True)

    def __enter__(self) -> "ComputeEmulator":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
