"""Compute emulator: the organization policy constraints/compute.vmExternalIpAccess (``--deny-external-ip``)."""

import json

import pytest
from googleapiclient.errors import HttpError

from cflow.local.compute.resources import project_number
from tests.helpers import compute_client, compute_emulator_process, instance_body, wait_operation

PROJECT = "policy-project"
ZONE = "us-central1-a"
EXTERNAL = [{"network": "global/networks/default", "accessConfigs": [{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}]}]
INTERNAL = [{"network": "global/networks/default"}]


def body(name, interfaces):
    vm = instance_body(name, startup_script="sleep 1000")
    vm["networkInterfaces"] = interfaces
    return vm


def bulk_body(interfaces, count=2):
    properties = body("unused", interfaces)
    properties.pop("name")
    properties["machineType"] = "e2-small"  # bulkInsert takes a bare name
    return {"count": count, "namePattern": "fleet-#", "instanceProperties": properties}


def violation(name):
    return (
        f"Constraint constraints/compute.vmExternalIpAccess violated for project {project_number(PROJECT)}. "
        f"Add instance projects/{PROJECT}/zones/{ZONE}/instances/{name} to the constraint to use external IP with it."
    )


@pytest.fixture(scope="module")
def denying_stack():
    """A compute client of an emulator started with --deny-external-ip."""
    with compute_emulator_process("--deny-external-ip") as emulator:
        yield compute_client(emulator.base_url)


def test_insert_with_an_external_ip_is_refused_412_naming_the_constraint(denying_stack):
    denying = denying_stack
    with pytest.raises(HttpError) as refused:
        denying.instances().insert(project=PROJECT, zone=ZONE, body=body("public", EXTERNAL)).execute()
    error = json.loads(refused.value.content)["error"]
    assert refused.value.resp.status == 412
    assert error["errors"][0]["reason"] == "conditionNotMet"
    assert error["message"] == violation("public")
    assert denying.instances().list(project=PROJECT, zone=ZONE).execute().get("items", []) == []
    # Without an access config the VM is created.
    operation = wait_operation(denying, PROJECT, ZONE, denying.instances().insert(project=PROJECT, zone=ZONE, body=body("private", INTERNAL)).execute())
    assert "error" not in operation
    assert denying.instances().get(project=PROJECT, zone=ZONE, instance="private").execute()["status"] == "RUNNING"


def test_bulk_insert_with_an_external_ip_fails_in_its_operation_per_vm(denying_stack):
    denying = denying_stack
    zone = ZONE
    accepted = denying.instances().bulkInsert(project=PROJECT, zone=zone, body=bulk_body(EXTERNAL)).execute()
    failed = wait_operation(denying, PROJECT, zone, accepted)
    assert (failed["httpErrorStatusCode"], failed["httpErrorMessage"]) == (412, "PRECONDITION FAILED")
    assert failed["error"]["errors"] == [
        {"code": "CONDITION_NOT_MET", "message": f"Instance '{name}' creation failed: {violation(name)}"} for name in ("fleet-1", "fleet-2")
    ]
    assert not [vm for vm in denying.instances().list(project=PROJECT, zone=zone).execute().get("items", []) if vm["name"].startswith("fleet-")]
    done = wait_operation(denying, PROJECT, zone, denying.instances().bulkInsert(project=PROJECT, zone=zone, body=bulk_body(INTERNAL)).execute())
    assert "error" not in done
    assert {vm["name"] for vm in denying.instances().list(project=PROJECT, zone=zone).execute()["items"]} >= {"fleet-1", "fleet-2"}


def test_without_the_policy_external_ips_are_allowed(compute):
    operation = compute.instances().insert(project=PROJECT, zone=ZONE, body=body("public", EXTERNAL)).execute()
    assert "error" not in wait_operation(compute, PROJECT, ZONE, operation)
    interface = compute.instances().get(project=PROJECT, zone=ZONE, instance="public").execute()["networkInterfaces"][0]
    assert interface["accessConfigs"][0]["natIP"]
