"""Compute emulator: a VM's life through googleapiclient, as GCP code drives it."""

import glob
import os
import time

import pytest
from googleapiclient.errors import HttpError

from tests.helpers import compute_emulator_process, instance_body, wait_operation, wait_until

PROJECT = "lifecycle-project"
ZONE = "us-central1-a"


@pytest.fixture(scope="module")
def compute_emulator(state_dir):
    with compute_emulator_process(
        "--state-dir", state_dir, "--pubsub-emulator-host", "127.0.0.1:8681", "--storage-emulator-host", "http://127.0.0.1:8682"
    ) as process:
        yield process


def disk_dir(state_dir, name):
    return wait_until(lambda: glob.glob(os.path.join(state_dir, "vms", f"{name}-*")), what=f"disk of {name}")[0]


def read_when_present(path, timeout_s=10):
    wait_until(lambda: os.path.exists(path) and os.path.getsize(path) > 0, timeout_s, what=path)
    with open(path) as handle:
        return handle.read()


def environment_of(state_dir, name):
    text = read_when_present(os.path.join(disk_dir(state_dir, name), "env.txt"))
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def status(compute, name):
    return compute.instances().get(project=PROJECT, zone=ZONE, instance=name).execute()["status"]


def serial_output(compute, name):
    return compute.instances().getSerialPortOutput(project=PROJECT, zone=ZONE, instance=name).execute()["contents"]


def process_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_insert_boots_the_vm_and_runs_its_startup_script_in_its_disk(compute, compute_emulator, state_dir):
    script = "echo $$ > startup.pid; pwd > cwd.txt; env > env.txt; echo booted >> boots.txt; sleep 1000"
    operation = compute.instances().insert(project=PROJECT, zone=ZONE, body=instance_body("life-1", startup_script=script)).execute()
    assert operation["kind"] == "compute#operation" and operation["operationType"] == "insert"
    assert operation["status"] in ("PENDING", "RUNNING")
    assert wait_operation(compute, PROJECT, ZONE, operation)["status"] == "DONE"

    instance = compute.instances().get(project=PROJECT, zone=ZONE, instance="life-1").execute()
    assert instance["status"] == "RUNNING"
    assert instance["selfLink"] == f"{compute_emulator.base_url}projects/{PROJECT}/zones/{ZONE}/instances/life-1"
    assert instance["zone"].endswith(f"/zones/{ZONE}") and instance["machineType"].endswith("/machineTypes/e2-small")
    assert instance["networkInterfaces"][0]["networkIP"].startswith("10.")

    root = disk_dir(state_dir, "life-1")
    assert read_when_present(os.path.join(root, "cwd.txt")).strip() == root
    environment = environment_of(state_dir, "life-1")
    assert environment["HOME"].startswith(root) and environment["TMPDIR"].startswith(root)
    assert environment["PATH"].split(":")[0] == os.path.join(root, "bin")
    assert os.access(os.path.join(root, "bin", "poweroff"), os.X_OK)
    assert environment["CFLOW_EMULATED_VM"] == "1"
    assert environment["PUBSUB_EMULATOR_HOST"] == "127.0.0.1:8681"
    assert environment["STORAGE_EMULATOR_HOST"] == "http://127.0.0.1:8682"
    assert environment["CFLOW_COMPUTE_ENDPOINT"] == compute_emulator.base_url
    assert environment["GCE_METADATA_HOST"] == environment["GCE_METADATA_IP"]
    assert environment["GCE_METADATA_HOST"].startswith("127.0.0.1:")
    assert "CFLOW_VM_MARKER" in environment


def test_stop_then_start_reruns_the_startup_script_and_keeps_the_disk(compute, state_dir):
    body = instance_body("life-2", startup_script="echo $$ > startup.pid; echo boot >> boots.txt; sleep 1000")
    compute.instances().insert(project=PROJECT, zone=ZONE, body=body).execute()
    wait_until(lambda: status(compute, "life-2") == "RUNNING")
    root = disk_dir(state_dir, "life-2")
    first_pid = int(read_when_present(os.path.join(root, "startup.pid")))
    assert process_alive(first_pid)

    stop = compute.instances().stop(project=PROJECT, zone=ZONE, instance="life-2").execute()
    assert wait_operation(compute, PROJECT, ZONE, stop).get("error") is None
    stopped = compute.instances().get(project=PROJECT, zone=ZONE, instance="life-2").execute()
    assert stopped["status"] == "TERMINATED" and stopped["lastStopTimestamp"]
    assert not process_alive(first_pid)

    start = compute.instances().start(project=PROJECT, zone=ZONE, instance="life-2").execute()
    wait_operation(compute, PROJECT, ZONE, start)
    assert status(compute, "life-2") == "RUNNING"
    wait_until(lambda: open(os.path.join(root, "boots.txt")).read().count("boot") == 2, what="second boot")
    assert disk_dir(state_dir, "life-2") == root


def test_delete_stops_the_vm_and_then_it_is_gone(compute, state_dir):
    compute.instances().insert(project=PROJECT, zone=ZONE, body=instance_body("life-3", startup_script="echo $$ > startup.pid; sleep 1000")).execute()
    wait_until(lambda: status(compute, "life-3") == "RUNNING")
    pid = int(read_when_present(os.path.join(disk_dir(state_dir, "life-3"), "startup.pid")))

    operation = compute.instances().delete(project=PROJECT, zone=ZONE, instance="life-3").execute()
    assert operation["operationType"] == "delete"
    assert wait_operation(compute, PROJECT, ZONE, operation).get("error") is None
    with pytest.raises(HttpError) as missing:
        compute.instances().get(project=PROJECT, zone=ZONE, instance="life-3").execute()
    assert missing.value.resp.status == 404
    assert not process_alive(pid)


def test_a_startup_script_that_exits_leaves_the_vm_running(compute, state_dir):
    compute.instances().insert(project=PROJECT, zone=ZONE, body=instance_body("life-4", startup_script="echo done > done.txt")).execute()
    wait_until(lambda: status(compute, "life-4") == "RUNNING")
    read_when_present(os.path.join(disk_dir(state_dir, "life-4"), "done.txt"))
    serial = wait_until(
        lambda: "exit status 0" in (text := serial_output(compute, "life-4")) and text,
        what="exit status in the serial console",
    )
    assert "startup-script" in serial
    assert status(compute, "life-4") == "RUNNING"


def test_stop_runs_the_shutdown_script_then_terms_then_kills(compute, state_dir):
    startup = (
        "echo $$ > startup.pid\n"
        "bash -c 'trap \"echo term > term.txt; exit 0\" TERM; while true; do sleep 0.05; done' &\n"
        "bash -c 'trap \"\" TERM; echo $$ > stubborn.pid; while true; do sleep 0.05; done' &\n"
        "wait\n"
    )
    shutdown = "echo \"$CFLOW_EMULATED_VM $(cat startup.pid)\" > shutdown.txt"
    compute.instances().insert(project=PROJECT, zone=ZONE, body=instance_body("life-5", startup_script=startup, shutdown_script=shutdown)).execute()
    wait_until(lambda: status(compute, "life-5") == "RUNNING")
    root = disk_dir(state_dir, "life-5")
    stubborn = int(read_when_present(os.path.join(root, "stubborn.pid")))

    started = time.monotonic()
    wait_operation(compute, PROJECT, ZONE, compute.instances().stop(project=PROJECT, zone=ZONE, instance="life-5").execute())
    elapsed = time.monotonic() - started
    assert status(compute, "life-5") == "TERMINATED"
    assert read_when_present(os.path.join(root, "shutdown.txt")).split()[0] == "1"
    assert read_when_present(os.path.join(root, "term.txt")).strip() == "term"
    assert not process_alive(stubborn)
    # The SIGTERM-proof process held the stop until the 2 s grace ran out.
    assert 1.5 <= elapsed < 8


def test_the_guest_powers_itself_off_through_the_metadata_server(compute, state_dir):
    startup = "sleep 0.2; poweroff; sleep 1000"
    shutdown = "echo ran > shutdown.txt"
    compute.instances().insert(project=PROJECT, zone=ZONE, body=instance_body("life-6", startup_script=startup, shutdown_script=shutdown)).execute()
    wait_until(lambda: status(compute, "life-6") == "TERMINATED", timeout=15, what="guest power-off")
    assert read_when_present(os.path.join(disk_dir(state_dir, "life-6"), "shutdown.txt")).strip() == "ran"
    operations = compute.zoneOperations().list(project=PROJECT, zone=ZONE).execute()["items"]
    assert any(op["operationType"] == "compute.instances.guestTerminate" and op["targetLink"].endswith("/life-6") for op in operations)


def test_a_shebang_script_runs_with_its_own_interpreter(compute, state_dir):
    script = "#!/usr/bin/env python3\nimport os\nopen('py.txt', 'w').write(os.environ['CFLOW_EMULATED_VM'])\n"
    compute.instances().insert(project=PROJECT, zone=ZONE, body=instance_body("life-7", startup_script=script)).execute()
    assert read_when_present(os.path.join(disk_dir(state_dir, "life-7"), "py.txt")) == "1"
