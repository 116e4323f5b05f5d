"""Compute emulator: delete, stop and start of a VM that is booting or stopping are 400 resourceNotReady, as on GCE.

And CFlow's own Compute seam, which deletes VMs that may still be booting,
asks again until GCE accepts.
"""

import json

import pytest
from google.auth.credentials import AnonymousCredentials
from googleapiclient.errors import HttpError

from cflow.errors import TransientError
from cflow.gcp.clients import build_compute
from cflow.gcp.compute import Compute, Vm
from cflow.gcp.errors import classify
from cflow.gcp.retry import Backoff
from cflow.local.launchers import ComputeOptions
from tests.helpers import compute_client, compute_emulator_process, instance_body, wait_operation, wait_until

PROJECT = "not-ready-project"
ZONE = "us-central1-a"
# Long enough for the calls that must meet a VM still booting, or still stopping, on a busy machine.
BOOT_DELAY_S = 6
SHUTDOWN_GRACE_S = 8
BOOTING = ("PROVISIONING", "STAGING")


@pytest.fixture(scope="module")
def slow(slow_emulator):
    """A googleapiclient aimed at an emulator whose VMs take BOOT_DELAY_S to boot and SHUTDOWN_GRACE_S to stop."""
    return compute_client(slow_emulator.base_url)


@pytest.fixture(scope="module")
def slow_emulator():
    """The module's emulator of slow VMs (not the shared ``compute_emulator``: its VMs boot at once and stop in 2 s)."""
    with compute_emulator_process("--boot-delay", BOOT_DELAY_S, shutdown_grace_s=SHUTDOWN_GRACE_S) as emulator:
        yield emulator


def refused(call):
    with pytest.raises(HttpError) as caught:
        call.execute()
    return caught.value


def assert_not_ready(error, name):
    body = json.loads(error.content)["error"]
    assert error.resp.status == 400
    assert body["errors"] == [{"message": body["message"], "domain": "global", "reason": "resourceNotReady"}]
    assert body["message"] == f"The resource 'projects/{PROJECT}/zones/{ZONE}/instances/{name}' is not ready"


def status(compute, name):
    return compute.instances().get(project=PROJECT, zone=ZONE, instance=name).execute()["status"]


def lifecycle_calls(compute, name):
    instances = compute.instances()
    return {
        "delete": instances.delete(project=PROJECT, zone=ZONE, instance=name),
        "stop": instances.stop(project=PROJECT, zone=ZONE, instance=name),
        "start": instances.start(project=PROJECT, zone=ZONE, instance=name),
    }


@pytest.mark.stack
def test_delete_stop_and_start_of_a_booting_vm_are_400_resource_not_ready(slow):
    compute = slow
    insert = compute.instances().insert(project=PROJECT, zone=ZONE, body=instance_body("booting", startup_script="sleep 1000")).execute()
    assert status(compute, "booting") in BOOTING
    for call in lifecycle_calls(compute, "booting").values():
        assert_not_ready(refused(call), "booting")
    # Refused means nothing was done: the VM boots as if nobody had asked.
    assert wait_operation(compute, PROJECT, ZONE, insert)["status"] == "DONE"
    assert status(compute, "booting") == "RUNNING"
    # Once RUNNING, the same calls are accepted.
    wait_operation(compute, PROJECT, ZONE, compute.instances().delete(project=PROJECT, zone=ZONE, instance="booting").execute())
    assert refused(compute.instances().get(project=PROJECT, zone=ZONE, instance="booting")).resp.status == 404


@pytest.mark.stack
def test_delete_stop_and_start_of_a_stopping_vm_are_400_resource_not_ready(slow):
    compute = slow
    # The shutdown script keeps the VM STOPPING until its grace runs out.
    body = instance_body("stopping", startup_script="sleep 1000", shutdown_script="sleep 1000")
    wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=body).execute())
    stop = compute.instances().stop(project=PROJECT, zone=ZONE, instance="stopping").execute()
    assert status(compute, "stopping") == "STOPPING"
    for call in lifecycle_calls(compute, "stopping").values():
        assert_not_ready(refused(call), "stopping")
    assert wait_operation(compute, PROJECT, ZONE, stop)["status"] == "DONE"
    assert status(compute, "stopping") == "TERMINATED"
    wait_operation(compute, PROJECT, ZONE, compute.instances().delete(project=PROJECT, zone=ZONE, instance="stopping").execute())


def test_no_resource_not_ready_accepts_delete_of_a_booting_vm(start_compute_emulator):
    with start_compute_emulator("--boot-delay", BOOT_DELAY_S, "--no-resource-not-ready") as emulator:
        compute = compute_client(emulator.base_url)
        compute.instances().insert(project=PROJECT, zone=ZONE, body=instance_body("lenient", startup_script="sleep 1000")).execute()
        assert status(compute, "lenient") in BOOTING
        deleted = compute.instances().delete(project=PROJECT, zone=ZONE, instance="lenient").execute()
        assert wait_operation(compute, PROJECT, ZONE, deleted).get("error") is None
        assert refused(compute.instances().get(project=PROJECT, zone=ZONE, instance="lenient")).resp.status == 404


def test_resource_not_ready_is_transient_for_cflow():
    error = HttpError(
        type("Response", (), {"status": 400, "reason": "Bad Request"})(),
        json.dumps({"error": {"code": 400, "message": "The resource 'x' is not ready", "errors": [{"reason": "resourceNotReady"}]}}).encode(),
    )
    assert isinstance(classify(error, "compute"), TransientError)


def worker_properties(run_id):
    properties = instance_body("unused", startup_script="sleep 1000", labels={"cflow-run": run_id})
    properties.pop("name")
    properties["machineType"] = "e2-small"
    return properties


def test_the_compute_seam_deletes_booting_vms_until_they_are_gone(start_compute_emulator):
    """The seam sends no retry of its own here (retries=0): only asking again on a later poll gets the VMs deleted."""
    boot_delay_s = 8  # the first deletes must come while they boot, even on a busy machine
    with start_compute_emulator("--boot-delay", boot_delay_s) as emulator:
        seam = Compute(build_compute(AnonymousCredentials(), emulator.base_url), PROJECT, backoff=Backoff(retries=0, sleep=lambda seconds: None))
        seam.bulk_insert(ZONE, ["early-1"], worker_properties("refused-run"))
        seam.bulk_insert(ZONE, ["race-1", "race-2"], worker_properties("race-run"))
        booting = seam.list_run_vms("refused-run")
        assert [vm.status in BOOTING for vm in booting] == [True]
        # A delete refused as not ready is reported to the caller, not taken as done.
        assert seam.delete_vms(booting) == {"early-1"}
        assert all(vm.status in BOOTING for vm in seam.list_run_vms("race-run"))
        assert seam.delete_run_vms("race-run", deadline_seconds=boot_delay_s * 4, poll_seconds=0.2) == []
        assert seam.list_run_vms("race-run") == []


def test_delete_vms_reports_nothing_for_accepted_and_gone_vms(compute, compute_emulator):
    service = build_compute(AnonymousCredentials(), compute_emulator.base_url)
    seam = Compute(service, PROJECT, backoff=Backoff(retries=0))
    wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=instance_body("settled")).execute())
    vms = [Vm("settled", ZONE, "RUNNING", ""), Vm("never-was", ZONE, "RUNNING", "")]
    assert seam.delete_vms(vms) == set()
    wait_until(lambda: refused_status(compute, "settled") == 404, 30, "the settled VM gone")


def refused_status(compute, name):
    try:
        compute.instances().get(project=PROJECT, zone=ZONE, instance=name).execute()
    except HttpError as error:
        return error.resp.status
    return 200


def test_options_reach_the_emulator_command_line():
    argv = ComputeOptions(rate_limit_per_minute=600, resource_not_ready=False).to_argv()
    assert argv == ["--rate-limit-per-minute", "600", "--no-resource-not-ready"]
    assert ComputeOptions(resource_not_ready=True).to_argv() == ["--resource-not-ready"]
    assert ComputeOptions.from_json(ComputeOptions(resource_not_ready=False).to_json()) == ComputeOptions(resource_not_ready=False)
