"""Background services of the local stack: launch one, wait until it answers, stop it by its pid.

A ``Service`` is a process group we started (``launch_background``), named
by its leader's pid *and* start time, so a recycled pid is never signalled.
``wait_until_ready`` polls a readiness probe; ``launch_on_free_port`` picks a
loopback port, launches, waits, and on any failure to start stops that
attempt and tries another port (the one place that retries).
``stop_service`` sends SIGTERM, then SIGKILL to the whole group.

Failures to start are ``ServiceStartError`` (a ``StackError``: one line for
the user, naming the service and its log):

- ``ServiceExited``: the process ended while starting (e.g. its port was taken);
- ``PortAnsweredByAnother``: the port answered, but not as our service
  (garbage, a reset, or a listener that is not ours);
- ``ServiceSilent``: it stayed alive and silent past the deadline.
"""

import contextlib
import dataclasses
import functools
import http.client
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cflow import procinfo
from cflow.errors import StackError

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0
PORT_ATTEMPTS = 3
POLL_INTERVAL_S = 0.1

Clock = Callable[[], float]
Sleep = Callable[[float], None]
ReadinessProbe = Callable[[], bool]
PortPicker = Callable[[], int]


class ServiceStartError(StackError):
    """A service we launched did not become ready (it has been stopped, or is being stopped)."""


class ServiceExited(ServiceStartError):
    """The service's process ended while starting."""


class PortAnsweredByAnother(ServiceStartError):
    """The service's port answered, but not as the service: another program holds it."""


class ServiceSilent(ServiceStartError):
    """The service stayed alive but did not answer within the deadline."""


class ForeignAnswer(Exception):
    """Raised by a readiness probe: what answered on the port is not the service we launched."""


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
    argv: tuple[str, ...]
    log_offset: int = 0  # where this run's output starts in ``log``

    @property
    def pgid(self) -> int:
        """The process group id (the leader was started in a session of its own)."""
        return self.pid

    def is_alive(self) -> bool:
        """True while the process we started is running (not a zombie, not a recycled pid)."""
        # A zombie counts as dead: the process that started it (maybe the one
        # that ran `up`) may not have collected it yet.
        stat = procinfo.read_stat(self.pid)
        return procinfo.is_alive(stat) and self._is_ours(stat)

    def _is_ours(self, stat: procinfo.ProcStat | None) -> bool:
        return stat is not None and stat.start_ticks == self.start_time and self.boot_id == procinfo.boot_id()

    def group_exists(self) -> bool:
        """True while any live member of our process group is left (the leader may be gone already)."""
        if self.boot_id != procinfo.boot_id():
            return False
        stat = procinfo.read_stat(self.pid)
        if procinfo.is_alive(stat) and not self._is_ours(stat):
            return False  # the pid belongs to someone else now, so our group is gone
        return bool(procinfo.live_group_members(self.pgid))

    def to_json(self) -> dict[str, Any]:
        """The record kept in stack.json."""
        return {**dataclasses.asdict(self), "argv": list(self.argv), "pgid": self.pgid}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Service":
        """Read a record written by ``to_json`` (unknown keys are ignored)."""
        fields = {field.name for field in dataclasses.fields(cls)}
        known = {key: value for key, value in data.items() if key in fields}
        return cls(**{**known, "argv": tuple(data["argv"])})


def free_loopback_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def launch_background(
    name: str, argv: Sequence[str], log_path: str | os.PathLike[str], endpoint: str, env: Mapping[str, str] | None = None
) -> tuple[Service, subprocess.Popen[bytes]]:
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
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as error:
            raise StackError(f"cannot start the {name} ({argv[0]}): {error.strerror}; check its installation") from error
    stat = procinfo.read_stat(process.pid)
    start_time = stat.start_ticks if stat else -1
    service = Service(name, process.pid, start_time, procinfo.boot_id(), endpoint, str(log_path), tuple(argv), log_offset)
    logger.debug("started %s: pid %d, log %s", name, process.pid, log_path)
    return service, process


def log_tail(service: Service, lines: int = 3) -> str:
    """The last ``lines`` lines the service wrote in this run, joined on one line."""
    try:
        with open(service.log, "rb") as log:
            log.seek(service.log_offset)
            text = log.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def wait_until_ready(
    service: Service, is_ready: ReadinessProbe, deadline_s: float, clock: Clock = time.monotonic, sleep: Sleep = time.sleep
) -> None:
    """Poll ``is_ready()`` until it is true.

    Args:
        is_ready: True once the service answers, False while it does not yet;
            raises ForeignAnswer when what answers is not the service.
    Raises:
        ServiceExited: the process exited.
        PortAnsweredByAnother: the probe raised ForeignAnswer.
        ServiceSilent: ``deadline_s`` passed.
        Each message names the log file (and quotes its last lines when the process exited).
    """
    deadline = clock() + deadline_s
    while True:
        try:
            if is_ready():
                return
        except ForeignAnswer as answer:
            raise PortAnsweredByAnother(f"the {service.name} did not start: {answer}; see {service.log}") from None
        if not service.is_alive():
            raise ServiceExited(f"the {service.name} exited while starting; see {service.log} ({log_tail(service)})")
        if clock() > deadline:
            raise ServiceSilent(f"the {service.name} did not answer within {deadline_s:.0f} s; see {service.log}")
        sleep(POLL_INTERVAL_S)


def stop_service(
    service: Service,
    timeout_s: float = STOP_TIMEOUT_S,
    terminate_leader_only: bool = False,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
) -> bool:
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
        sleep(POLL_INTERVAL_S)
    logger.warning("the %s did not stop within %.0f s of SIGTERM; killing it", service.name, timeout_s)
    _signal_group(service, signal.SIGKILL)
    deadline = clock() + timeout_s
    while clock() < deadline and service.group_exists():
        sleep(POLL_INTERVAL_S)
    return True


def _signal_group(service: Service, signum: int) -> None:
    try:
        os.killpg(service.pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def stop_and_reap(service: Service, process: "subprocess.Popen[bytes]", clock: Clock = time.monotonic, sleep: Sleep = time.sleep) -> None:
    """Stop a service we launched and collect its leader's exit status."""
    stop_service(service, clock=clock, sleep=sleep)
    process.wait()


# ---------------------------------------------------------------- HTTP readiness


def http_answers(url: str, timeout_s: float = 2.0, headers: Mapping[str, str] | None = None) -> bool:
    """True if ``url`` answers 2xx (asked with ``headers``); False while nothing answers yet (or answers an HTTP error).

    Raises:
        ForeignAnswer: something answered that does not speak HTTP, or reset
        the connection: not a server that is starting, but another program.
    """
    # Loopback only: bypass any proxy configured in the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=dict(headers or {})), timeout=timeout_s) as response:
            return 200 <= response.status < 300
    except urllib.error.HTTPError:
        return False  # an HTTP answer, just not a good one (yet)
    except urllib.error.URLError as error:
        if isinstance(error.reason, ConnectionResetError | http.client.HTTPException):
            raise ForeignAnswer(f"{url} answered with {_describe(error.reason)}") from None
        return False  # refused, unreachable or timed out: nothing listens yet
    except (ConnectionResetError, http.client.HTTPException) as error:
        raise ForeignAnswer(f"{url} answered with {_describe(error)}") from None
    except (OSError, ValueError):
        return False


def _describe(error: BaseException) -> str:
    detail = str(error).strip()
    return f"{type(error).__name__}: {detail[:80]!r}" if detail else type(error).__name__


def port_answers_as(service: Service, port: int, url: str) -> bool:
    """Readiness of a service we told to listen on ``port``: ``url`` answers 2xx and the listener is ours.

    Raises:
        ForeignAnswer: the port answers garbage, or a process outside the
        service's group is the one listening on it.
    """
    if not http_answers(url):
        return False
    if not procinfo.group_listens_on(service.pgid, port):
        raise ForeignAnswer(f"port {port} is answered by another program")
    return True


def launch_on_free_port(
    name: str,
    build_argv: Callable[[int], Sequence[str]],
    log_path: str | os.PathLike[str],
    ready_url: Callable[[int], str],
    env: Mapping[str, str] | None = None,
    deadline_s: float = START_TIMEOUT_S,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
    pick_port: PortPicker = free_loopback_port,
    attempts: int = PORT_ATTEMPTS,
) -> tuple[Service, subprocess.Popen[bytes]]:
    """Launch a service on a loopback port we pick, and wait until it answers there.

    We pick the port before the service binds it, so another program may take
    it in between: the service then exits ("address in use"), or the other
    program answers in its place. Either way (and whenever the process exits
    while starting) that attempt is stopped and another port is tried, up to
    ``attempts`` ports. A service that stays silent is not retried.

    Args:
        build_argv: port -> the command line.
        ready_url: port -> a URL that answers 2xx once the service is ready.
        pick_port: returns the next port to try.
    Returns:
        (Service, Popen); ``service.endpoint`` is ``"127.0.0.1:PORT"``.
    Raises:
        ServiceStartError: the last attempt's failure, naming the log and the ports tried.
        StackError: the program cannot be executed.
    """
    tried: list[int] = []
    while True:
        port = pick_port()
        tried.append(port)
        service, process = launch_background(name, build_argv(port), log_path, f"127.0.0.1:{port}", env)
        try:
            wait_until_ready(service, functools.partial(port_answers_as, service, port, ready_url(port)), deadline_s, clock, sleep)
            return service, process
        except (ServiceExited, PortAnsweredByAnother) as error:
            stop_and_reap(service, process, clock, sleep)
            if len(tried) >= attempts:
                raise type(error)(f"{error} (ports tried: {', '.join(map(str, tried))})") from None
            logger.debug("the %s did not start on port %d (%s); trying another port", name, port, error)
        except BaseException:
            stop_and_reap(service, process, clock, sleep)
            raise
