"""The local stack through the real ``cflow local`` command, and its process bookkeeping."""

import contextlib
import dataclasses
import http.server
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from cflow.errors import StackError
from cflow.local import LOCAL_PROJECT, LOCAL_ZONE
from cflow.local.services import (
    PortAnsweredByAnother,
    Service,
    ServiceExited,
    free_loopback_port,
    launch_background,
    launch_on_free_port,
    stop_service,
    wait_until_ready,
)
from cflow.local.stack import LocalStack, running_stack
from tests.helpers import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("pubsub", "storage", "compute")

pytestmark = pytest.mark.timeout(180)


def cflow(*args, env=None, cwd=None):
    """Run ``python -m cflow ARGS`` as a user would, returning the CompletedProcess."""
    run_env = dict(os.environ if env is None else env)
    run_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), run_env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "cflow", *args],
        env=run_env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=150,
    )


def parse_exports(stdout):
    exports = {}
    for line in stdout.splitlines():
        assert line.startswith("export "), f"not an export line: {line!r}"
        name, _, value = line[len("export "):].partition("=")
        exports[name] = value
    return exports


def http_get(url, headers=None):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=5) as response:
        return response.status, response.read()


def answers(url, headers=None):
    try:
        return http_get(url, headers)[0] == 200
    except OSError:
        return False


def bearer(token_file):
    """The Authorization header the stack's Compute emulator wants (its token, from the exported file)."""
    return {"Authorization": f"Bearer {Path(token_file).read_text().strip()}"}


def recorded_services(stack_dir):
    record = json.loads((Path(stack_dir) / "stack.json").read_text())
    return {name: Service.from_json(record["services"][name]) for name in SERVICES}


def processes_holding_files_under(directory):
    """Pids of processes with an open file under ``directory`` (our services keep their logs open)."""
    directory = str(Path(directory).resolve())
    holders = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            targets = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:
            continue
        if any(target.startswith(directory + "/") for target in targets):
            holders.add(int(proc.name))
    return holders


def start_vm(compute_endpoint, startup_script, headers):
    """Insert one VM through the Compute REST API, as CFlow's workers are created."""
    body = {
        "name": "stack-test-vm",
        "machineType": f"zones/{LOCAL_ZONE}/machineTypes/e2-small",
        "disks": [{"boot": True, "autoDelete": True,
                   "initializeParams": {"sourceImage": "projects/debian-cloud/global/images/family/debian-12"}}],
        "networkInterfaces": [{"network": "global/networks/default"}],
        "metadata": {"items": [{"key": "startup-script", "value": startup_script}]},
    }
    request = urllib.request.Request(
        f"{compute_endpoint}projects/{LOCAL_PROJECT}/zones/{LOCAL_ZONE}/instances",
        data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **headers}, method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
        assert response.status == 200


@pytest.mark.stack
def test_up_env_status_down_through_the_command(tmp_path):
    stack_dir = tmp_path / "stack"

    up = cflow("local", "up", "--dir", str(stack_dir), "--shutdown-grace", "1", "--seed", "7")
    assert up.returncode == 0, up.stderr
    try:
        exports = parse_exports(up.stdout)
        assert set(exports) == {"PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST", "CFLOW_COMPUTE_ENDPOINT",
                                "CFLOW_COMPUTE_TOKEN_FILE", "CFLOW_PROJECT", "CFLOW_ZONE"}
        assert exports["CFLOW_PROJECT"] == LOCAL_PROJECT and exports["CFLOW_ZONE"] == LOCAL_ZONE
        assert exports["PUBSUB_EMULATOR_HOST"].startswith("127.0.0.1:")
        assert http_get(f"http://{exports['PUBSUB_EMULATOR_HOST']}/")[1].strip() == b"Ok"
        assert exports["STORAGE_EMULATOR_HOST"].startswith("http://127.0.0.1:")
        assert json.loads(http_get(exports["STORAGE_EMULATOR_HOST"] + "/storage/v1/b")[1])["kind"] == "storage#buckets"
        compute = exports["CFLOW_COMPUTE_ENDPOINT"]
        assert compute.startswith("http://127.0.0.1:") and compute.endswith("/compute/v1/")
        token_file = Path(exports["CFLOW_COMPUTE_TOKEN_FILE"])
        assert token_file.parent == stack_dir.absolute() and stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert answers(f"{compute}projects/{LOCAL_PROJECT}/zones/{LOCAL_ZONE}", bearer(token_file))
        assert not answers(f"{compute}projects/{LOCAL_PROJECT}/zones/{LOCAL_ZONE}"), "the Compute emulator answered a request without its token"

        services = recorded_services(stack_dir)
        assert all(service.is_alive() for service in services.values())
        record = json.loads((stack_dir / "stack.json").read_text())
        assert record["compute_options"]["shutdown_grace"] == 1 and record["compute_options"]["seed"] == 7
        assert "--shutdown-grace" in services["compute"].argv

        again = cflow("local", "up", "--dir", str(stack_dir))
        assert again.returncode == 0, again.stderr
        assert again.stdout == up.stdout
        assert "reusing" in again.stderr
        assert recorded_services(stack_dir) == services

        env = cflow("local", "env", "--dir", str(stack_dir))
        assert env.returncode == 0 and env.stdout == up.stdout

        status = cflow("local", "status", "--dir", str(stack_dir))
        assert status.returncode == 0, status.stdout + status.stderr
        for service in services.values():
            line = next(line for line in status.stdout.splitlines() if service.name in line)
            assert f"pid {service.pid}" in line and service.endpoint in line and "alive" in line
        assert "VMs: none" in status.stdout

        vm_pid_file = tmp_path / "vm.pid"
        start_vm(compute, f"#!/bin/sh\necho $$ > {vm_pid_file}\nexec sleep 300\n", bearer(token_file))
        wait_until(lambda: vm_pid_file.exists() and vm_pid_file.read_text().strip(), 30, "the VM's startup script")
        vm_pid = int(vm_pid_file.read_text())
        wait_until(lambda: "VMs: 1 RUNNING" in cflow("local", "status", "--dir", str(stack_dir)).stdout, 30, "the VM in `cflow local status`")
    finally:
        down = cflow("local", "down", "--dir", str(stack_dir))
    assert down.returncode == 0, down.stderr
    assert not (stack_dir / "stack.json").exists() and not token_file.exists()
    assert not any(service.group_exists() for service in services.values())
    assert not answers(f"http://{exports['PUBSUB_EMULATOR_HOST']}/")
    assert processes_holding_files_under(stack_dir) == set()
    assert not Path(f"/proc/{vm_pid}").exists(), "the VM outlived `cflow local down`"

    down_again = cflow("local", "down", "--dir", str(stack_dir))
    assert down_again.returncode == 0
    assert "no local stack was running" in down_again.stderr

    env_after = cflow("local", "env", "--dir", str(stack_dir))
    assert env_after.returncode == 1 and env_after.stdout == ""
    assert len(env_after.stderr.strip().splitlines()) == 1 and "cflow local up" in env_after.stderr


@pytest.mark.stack
def test_up_restarts_a_partly_dead_stack(tmp_path):
    stack = LocalStack(tmp_path / "stack")
    first = stack.up()
    try:
        before = recorded_services(stack.dir)
        os.killpg(before["storage"].pgid, signal.SIGKILL)
        wait_until(lambda: not before["storage"].is_alive(), 30, "the killed storage server to die")
        assert stack.info() is None

        up = cflow("local", "up", "--dir", str(stack.dir))
        assert up.returncode == 0, up.stderr
        assert "partly dead" in up.stderr
        after = recorded_services(stack.dir)
        assert not any(service.group_exists() for service in before.values())
        assert all(service.is_alive() for service in after.values())
        assert {service.pid for service in after.values()}.isdisjoint(service.pid for service in before.values())
        assert parse_exports(up.stdout)["STORAGE_EMULATOR_HOST"] != first.storage_url
    finally:
        stack.down()
    assert processes_holding_files_under(stack.dir) == set()


@pytest.mark.stack
def test_running_stack_stops_only_what_it_started(tmp_path):
    with running_stack(tmp_path / "stack", shutdown_grace=1) as info:
        services = recorded_services(info.dir)
        with running_stack(info.dir) as reused:
            assert reused == info
        assert all(service.is_alive() for service in services.values()), "the inner context stopped a stack it reused"
        assert LocalStack(info.dir).info() == info
    assert not any(service.group_exists() for service in services.values())
    assert LocalStack(info.dir).info() is None


def test_up_refuses_other_compute_options_on_a_running_stack(local_stack):
    from cflow.local.launchers import ComputeOptions

    with pytest.raises(StackError, match="cflow local down"):
        LocalStack(local_stack.dir).up(ComputeOptions(preempt_mean_s=5))
    assert LocalStack(local_stack.dir).info() == local_stack


def assert_one_line_error_and_nothing_started(result, stack_dir, *expected):
    """The command failed with one error line (after progress lines, if any) and left nothing behind."""
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("cflow: error: ") and "Traceback" not in result.stderr, result.stderr
    assert not any(line.startswith("cflow: error: ") for line in lines[:-1]), result.stderr
    for text in expected:
        assert text in lines[-1]
    assert not (stack_dir / "stack.json").exists()
    assert processes_holding_files_under(stack_dir) == set()


def test_missing_pubsub_emulator_is_a_one_line_error_with_the_install_hint(tmp_path):
    env = dict(os.environ, CFLOW_PUBSUB_EMULATOR=str(tmp_path / "no-such-emulator"))
    result = cflow("local", "up", "--dir", str(tmp_path / "stack"), env=env)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert_one_line_error_and_nothing_started(
        result, tmp_path / "stack", "no-such-emulator", "google-cloud-cli-pubsub-emulator",
        "gcloud components install pubsub-emulator",
    )


def test_missing_java_is_a_one_line_error_with_the_install_hint(tmp_path):
    emulator = tmp_path / "cloud-pubsub-emulator"
    emulator.write_text("#!/bin/sh\nexit 1\n")
    emulator.chmod(0o755)
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "JAVA_HOME"}
    env.update(PATH=str(empty_path), CFLOW_PUBSUB_EMULATOR=str(emulator))
    result = cflow("local", "up", "--dir", str(tmp_path / "stack"), env=env)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert_one_line_error_and_nothing_started(result, tmp_path / "stack", "Java", "openjdk-17-jre-headless")


@pytest.mark.stack
def test_a_compute_emulator_that_fails_to_start_leaves_nothing_running(tmp_path):
    stack_dir = tmp_path / "stack"
    for _ in range(2):  # the second failure must quote its own log lines, not the first's
        result = cflow("local", "up", "--dir", str(stack_dir), "--error-rate", "5")
        assert_one_line_error_and_nothing_started(result, stack_dir, "Compute emulator", "compute.log", "--error-rate")
        assert result.stderr.count("--error-rate") == 1


def test_a_service_that_dies_while_starting_names_its_log(tmp_path):
    log = tmp_path / "dying.log"
    service, process = launch_background("dying service", ["sh", "-c", "echo cannot bind; exit 3"], log, "")
    with pytest.raises(StackError, match=r"dying\.log.*cannot bind"):
        wait_until_ready(service, lambda: False, deadline_s=30)
    assert process.wait(timeout=5) == 3


def test_a_service_that_never_answers_times_out_naming_its_log(tmp_path):
    service, process = launch_background("silent service", ["sleep", "30"], tmp_path / "silent.log", "")
    try:
        with pytest.raises(StackError, match=r"did not answer within .*silent\.log"):
            wait_until_ready(service, lambda: False, deadline_s=0.3)
    finally:
        stop_service(service)
        process.wait(timeout=5)
    assert not service.group_exists()


def test_a_recycled_pid_is_never_signalled(tmp_path):
    service, process = launch_background("sleeper", ["sleep", "30"], tmp_path / "sleeper.log", "")
    try:
        # Same pid, other start time: what stack.json would hold if the pid had been reused.
        impostor = dataclasses.replace(service, start_time=service.start_time + 1)
        assert service.is_alive() and not impostor.is_alive()
        stop_service(impostor, timeout_s=0.5)
        assert process.poll() is None, "a process that is not ours was signalled"
    finally:
        stop_service(service)
        process.wait(timeout=5)


def test_shared_fixtures_serve_the_official_clients(pubsub_emulator, gcs_server, monkeypatch):
    # Built exactly as the conftest docstring tells everyone to build them.
    from google.api_core.exceptions import PreconditionFailed
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import pubsub_v1, storage

    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server)
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    topic = publisher.create_topic(name=f"projects/{LOCAL_PROJECT}/topics/stack-fixture-topic").name
    subscription = subscriber.create_subscription(
        name=f"projects/{LOCAL_PROJECT}/subscriptions/stack-fixture-sub", topic=topic
    ).name
    publisher.publish(topic, b"item-1").result(timeout=10)
    pulled = subscriber.pull(subscription=subscription, max_messages=1, timeout=10)
    assert [message.message.data for message in pulled.received_messages] == [b"item-1"]
    subscriber.close()

    client = storage.Client(project=LOCAL_PROJECT, credentials=AnonymousCredentials())
    bucket = client.create_bucket("stack-fixture-bucket")
    bucket.blob("done/item-1").upload_from_string("ok", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        bucket.blob("done/item-1").upload_from_string("again", if_generation_match=0)
    assert bucket.blob("done/item-1").download_as_bytes() == b"ok"


# ---------------------------------------------------------------- a port taken by another program


@contextlib.contextmanager
def garbage_server():
    """A TCP server on a free loopback port that answers every connection with a line that is not HTTP."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.1)
    done = threading.Event()

    def serve():
        while not done.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.recv(65536)  # the request, read so that closing sends no reset
                connection.sendall(b"garbage from another program\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        done.set()
        thread.join(5)
        listener.close()


@contextlib.contextmanager
def foreign_http_server():
    """Another program's HTTP server on a free loopback port: it answers 200 to everything."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def ports(*sequence):
    """A port picker that hands out ``sequence``, then free ports."""
    remaining = list(sequence)
    return lambda: remaining.pop(0) if remaining else free_loopback_port()


def http_service_argv(taken_port):
    """The command of a toy service: on ``taken_port`` it never binds (as if it lost the race); elsewhere it serves HTTP."""

    def argv(port):
        return ["sleep", "60"] if port == taken_port else [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]

    return argv


@pytest.fixture
def launched_pids(monkeypatch):
    """The pid of every process ``launch_on_free_port`` starts, in order (recorded as it starts them, so none is missed)."""
    from cflow.local import services

    pids = []
    real_launch = services.launch_background

    def recording_launch(*args, **kwargs):
        service, process = real_launch(*args, **kwargs)
        pids.append(process.pid)
        return service, process

    monkeypatch.setattr(services, "launch_background", recording_launch)
    return pids


def free_port_then(port):
    """A port picker for a stack: a free port for the first service, then always ``port``."""
    picked = []

    def pick():
        picked.append(port)
        return free_loopback_port() if len(picked) == 1 else port

    return pick


def test_a_port_that_answers_garbage_is_given_up_for_another(tmp_path, launched_pids):
    with garbage_server() as taken:
        service, process = launch_on_free_port(
            "toy service", http_service_argv(taken), tmp_path / "toy.log",
            lambda port: f"http://127.0.0.1:{port}/", deadline_s=30, pick_port=ports(taken),
        )
    try:
        assert service.endpoint != f"127.0.0.1:{taken}" and service.is_alive()
        first, second = launched_pids
        assert second == service.pid and not Path(f"/proc/{first}").exists(), "the attempt on the taken port still runs"
    finally:
        stop_service(service)
        process.wait(timeout=5)


def test_a_port_answered_well_by_another_program_is_not_taken_for_ours(tmp_path, launched_pids):
    with foreign_http_server() as taken:
        service, process = launch_on_free_port(
            "toy service", http_service_argv(taken), tmp_path / "toy.log",
            lambda port: f"http://127.0.0.1:{port}/", deadline_s=30, pick_port=ports(taken),
        )
        try:
            assert service.endpoint != f"127.0.0.1:{taken}"
            first, second = launched_pids
            assert second == service.pid and not Path(f"/proc/{first}").exists()
        finally:
            stop_service(service)
            process.wait(timeout=5)


def test_after_the_last_port_the_error_is_one_line_naming_the_log_and_every_attempt_is_stopped(tmp_path, launched_pids):
    with garbage_server() as taken, pytest.raises(PortAnsweredByAnother) as raised:
        launch_on_free_port(
            "toy service", http_service_argv(taken), tmp_path / "toy.log",
            lambda port: f"http://127.0.0.1:{port}/", deadline_s=30, pick_port=lambda: taken, attempts=3,
        )
    message = str(raised.value)
    assert "\n" not in message and "toy service" in message and "toy.log" in message, message
    assert f"ports tried: {taken}, {taken}, {taken}" in message and "BadStatusLine" in message, message
    pids = launched_pids
    assert len(pids) == 3 and not any(Path(f"/proc/{pid}").exists() for pid in pids)


def test_a_service_that_exits_while_starting_is_retried_on_another_port(tmp_path):
    attempts = []

    def argv(port):
        attempts.append(port)
        if len(attempts) == 1:
            return ["sh", "-c", "echo address already in use; exit 1"]
        return [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]

    service, process = launch_on_free_port("toy service", argv, tmp_path / "toy.log", lambda port: f"http://127.0.0.1:{port}/", deadline_s=30)
    try:
        assert len(attempts) == 2 and service.endpoint == f"127.0.0.1:{attempts[1]}"
    finally:
        stop_service(service)
        process.wait(timeout=5)
    with pytest.raises(ServiceExited, match=r"exited while starting; see .*toy\.log .*address already in use.* \(ports tried: \d+, \d+\)"):
        launch_on_free_port("toy service", lambda port: ["sh", "-c", "echo address already in use; exit 1"], tmp_path / "toy.log",
                            lambda port: f"http://127.0.0.1:{port}/", deadline_s=30, attempts=2)


@pytest.mark.stack
def test_an_up_that_fails_stops_what_it_started_and_says_which_service_in_one_line(tmp_path):
    with garbage_server() as taken:
        # The Pub/Sub emulator gets a free port; fake-gcs-server only ever the one that answers garbage.
        stack = LocalStack(tmp_path / "stack", pick_port=free_port_then(taken))
        with pytest.raises(StackError) as raised:
            stack.up()
    message = str(raised.value)
    assert "\n" not in message and "Cloud Storage server" in message and "storage.log" in message, message
    assert not (stack.dir / "stack.json").exists()
    assert processes_holding_files_under(stack.dir) == set(), "a service of the failed start still runs"
    pubsub_log = (stack.dir / "pubsub.log").read_text()
    assert pubsub_log, "the Pub/Sub emulator was never started, so this test proves nothing"


# ---------------------------------------------------------------- the `stack` marker

# Every test of these modules starts an emulator (through a fixture or itself).
STACK_ONLY_MODULES = (
    "tests/e2e/test_run.py", "tests/e2e/test_operator.py", "tests/chaos/test_preemption.py", "tests/chaos/test_compute_faults.py",
    "tests/local/test_gcp_seams.py", "tests/local/test_compute_lifecycle.py",
    "tests/local/test_compute_metadata.py", "tests/local/test_compute_bulk_and_list.py", "tests/local/test_compute_errors.py",
    "tests/local/test_compute_preemption.py", "tests/local/test_compute_batch.py", "tests/local/test_compute_faults.py",
    "tests/local/test_compute_orphans.py",
)  # fmt: skip
# Modules with both kinds: (a test that starts an emulator, one that starts none).
MIXED_MODULES = (
    ("tests/local/test_compute_schema.py::test_every_resource_and_operation_fits_its_schema",
     "tests/local/test_compute_schema.py::test_the_checker_catches_wrong_shapes"),
    ("tests/local/test_compute_images.py::test_public_images_are_read_only",
     "tests/local/test_compute_images.py::test_an_image_deleted_while_a_vm_waits_to_copy_it_stays_until_copied"),
    ("tests/local/test_image.py::test_build_on_the_local_stack_then_a_run_boots_from_the_image",
     "tests/local/test_image.py::test_without_a_running_stack_it_says_how_to_start_one"),
    ("tests/local/test_ops.py::test_status_counts_items_attempts_and_estimates_time_left",
     "tests/local/test_ops.py::test_no_running_stack_is_one_line_and_starts_nothing"),
    ("tests/local/test_stack.py::test_shared_fixtures_serve_the_official_clients",
     "tests/local/test_stack.py::test_a_recycled_pid_is_never_signalled"),
    ("tests/local/test_stack.py::test_up_env_status_down_through_the_command",
     "tests/local/test_stack.py::test_a_port_that_answers_garbage_is_given_up_for_another"),
)  # fmt: skip


def collected(*args):
    """The ids pytest selects with ``args``, collected (not run) in a subprocess."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {line.partition("[")[0] for line in result.stdout.splitlines() if "::" in line}


def test_not_stack_selects_exactly_the_tests_that_start_no_emulator():
    fast = collected("-m", "not stack")
    slow = collected("-m", "stack")

    assert fast and slow and not fast & slow
    assert any(test.startswith("tests/unit/") for test in fast)
    assert not [test for test in fast if test.startswith(STACK_ONLY_MODULES)]
    assert all(any(test.startswith(module) for test in slow) for module in STACK_ONLY_MODULES)
    for stack_test, fast_test in MIXED_MODULES:
        assert stack_test in slow and stack_test not in fast
        assert fast_test in fast and fast_test not in slow
