"""The local stack through the real ``cflow local`` command, and its process bookkeeping."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cflow.errors import StackError
from cflow.local import LOCAL_PROJECT, LOCAL_ZONE
from cflow.local.stack import (
    LocalStack,
    Service,
    launch_background,
    running_stack,
    stop_service,
    wait_until_ready,
)

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


def http_get(url):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        return response.status, response.read()


def answers(url):
    try:
        return http_get(url)[0] == 200
    except OSError:
        return False


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


def wait_for(condition, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def start_vm(compute_endpoint, startup_script):
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
        data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
        assert response.status == 200


def test_up_env_status_down_through_the_command(tmp_path):
    stack_dir = tmp_path / "stack"

    up = cflow("local", "up", "--dir", str(stack_dir), "--shutdown-grace", "1", "--seed", "7")
    assert up.returncode == 0, up.stderr
    try:
        exports = parse_exports(up.stdout)
        assert set(exports) == {"PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST", "CFLOW_COMPUTE_ENDPOINT",
                                "CFLOW_PROJECT", "CFLOW_ZONE"}
        assert exports["CFLOW_PROJECT"] == LOCAL_PROJECT and exports["CFLOW_ZONE"] == LOCAL_ZONE
        assert exports["PUBSUB_EMULATOR_HOST"].startswith("127.0.0.1:")
        assert http_get(f"http://{exports['PUBSUB_EMULATOR_HOST']}/")[1].strip() == b"Ok"
        assert exports["STORAGE_EMULATOR_HOST"].startswith("http://127.0.0.1:")
        assert json.loads(http_get(exports["STORAGE_EMULATOR_HOST"] + "/storage/v1/b")[1])["kind"] == "storage#buckets"
        compute = exports["CFLOW_COMPUTE_ENDPOINT"]
        assert compute.startswith("http://127.0.0.1:") and compute.endswith("/compute/v1/")
        assert answers(f"{compute}projects/{LOCAL_PROJECT}/zones/{LOCAL_ZONE}")

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
        start_vm(compute, f"#!/bin/sh\necho $$ > {vm_pid_file}\nexec sleep 300\n")
        assert wait_for(lambda: vm_pid_file.exists() and vm_pid_file.read_text().strip())
        vm_pid = int(vm_pid_file.read_text())
        assert wait_for(lambda: "VMs: 1 RUNNING" in cflow("local", "status", "--dir", str(stack_dir)).stdout)
    finally:
        down = cflow("local", "down", "--dir", str(stack_dir))
    assert down.returncode == 0, down.stderr
    assert not (stack_dir / "stack.json").exists()
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


def test_up_restarts_a_partly_dead_stack(tmp_path):
    stack = LocalStack(tmp_path / "stack")
    first = stack.up()
    try:
        before = recorded_services(stack.dir)
        os.killpg(before["storage"].pgid, signal.SIGKILL)
        assert wait_for(lambda: not before["storage"].is_alive())
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
    from cflow.local.stack import ComputeOptions

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
