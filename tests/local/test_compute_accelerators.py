"""Compute emulator: acceleratorTypes per zone, and the GPUs a VM asks for, checked as GCE checks them."""

import json

import pytest
from googleapiclient.errors import HttpError

from tests.helpers import instance_body, wait_operation
from tests.local.test_compute_schema import DISCOVERY, check

PROJECT = "gpu-project"
ZONE = "us-central1-a"


def refusal(call):
    """Runs ``call``; returns (status, reason, message) of the ApiError it must raise."""
    with pytest.raises(HttpError) as raised:
        call()
    error = json.loads(raised.value.content)["error"]
    return raised.value.resp.status, error["errors"][0]["reason"], error["message"]


def gpu_body(name, type_name="nvidia-tesla-t4", count=1, zone=ZONE, machine_type="n1-standard-4", maintenance="TERMINATE", spot=False):
    body = instance_body(name, zone=zone, machine_type=machine_type, startup_script="sleep 1000", spot=spot)
    body["guestAccelerators"] = [{"acceleratorType": f"projects/{PROJECT}/zones/{zone}/acceleratorTypes/{type_name}", "acceleratorCount": count}]
    if maintenance:
        body.setdefault("scheduling", {})["onHostMaintenance"] = maintenance
    return body


def insert(compute, body, zone=ZONE):
    return compute.instances().insert(project=PROJECT, zone=zone, body=body).execute()


def test_accelerator_types_are_offered_in_some_zones_and_not_others(compute):
    central = {item["name"]: item for item in compute.acceleratorTypes().list(project=PROJECT, zone="us-central1-a").execute()["items"]}
    assert {"nvidia-tesla-t4", "nvidia-tesla-v100", "nvidia-l4"} <= set(central)
    t4 = central["nvidia-tesla-t4"]
    assert (t4["description"], t4["maximumCardsPerInstance"], t4["zone"]) == ("NVIDIA T4", 4, "us-central1-a")
    assert t4["selfLink"].endswith(f"/projects/{PROJECT}/zones/us-central1-a/acceleratorTypes/nvidia-tesla-t4")
    assert compute.acceleratorTypes().get(project=PROJECT, zone="us-central1-a", acceleratorType="nvidia-tesla-v100").execute()["maximumCardsPerInstance"] == 8
    east = {item["name"] for item in compute.acceleratorTypes().list(project=PROJECT, zone="us-east1-b").execute()["items"]}
    assert "nvidia-tesla-t4" not in east and "nvidia-l4" in east
    assert refusal(lambda: compute.acceleratorTypes().get(project=PROJECT, zone="us-east1-b", acceleratorType="nvidia-tesla-t4").execute()) == (
        404, "notFound", f"The resource 'projects/{PROJECT}/zones/us-east1-b/acceleratorTypes/nvidia-tesla-t4' was not found",
    )  # fmt: skip
    filtered = compute.acceleratorTypes().list(project=PROJECT, zone="us-central1-a", filter="name = nvidia-tesla-t4").execute()["items"]
    assert [item["name"] for item in filtered] == ["nvidia-tesla-t4"]

    aggregated = compute.acceleratorTypes().aggregatedList(project=PROJECT).execute()
    t4_zones = {
        scope.split("/")[1]
        for scope, entry in aggregated["items"].items()
        if any(item["name"] == "nvidia-tesla-t4" for item in entry.get("acceleratorTypes", []))
    }
    assert "us-central1-a" in t4_zones and "us-east1-b" not in t4_zones
    with open(DISCOVERY) as handle:
        schemas = json.load(handle)["schemas"]
    check(t4, {"$ref": "AcceleratorType"}, schemas, "AcceleratorType")
    check(compute.acceleratorTypes().list(project=PROJECT, zone="us-central1-a").execute(), {"$ref": "AcceleratorTypeList"}, schemas, "AcceleratorTypeList")
    check(aggregated, {"$ref": "AcceleratorTypeAggregatedList"}, schemas, "AcceleratorTypeAggregatedList")


def test_a_vm_with_gpus_is_created_with_terminate_on_maintenance(compute):
    operation = wait_operation(compute, PROJECT, ZONE, insert(compute, gpu_body("with-t4", count=2)))
    assert "error" not in operation
    vm = compute.instances().get(project=PROJECT, zone=ZONE, instance="with-t4").execute()
    assert vm["guestAccelerators"] == [
        {"acceleratorType": f"{compute._baseUrl}projects/{PROJECT}/zones/{ZONE}/acceleratorTypes/nvidia-tesla-t4", "acceleratorCount": 2}
    ]
    assert vm["scheduling"]["onHostMaintenance"] == "TERMINATE"
    with open(DISCOVERY) as handle:
        check(vm, {"$ref": "Instance"}, json.load(handle)["schemas"], "Instance")
    # Spot VMs terminate on maintenance by default.
    assert "error" not in wait_operation(compute, PROJECT, ZONE, insert(compute, gpu_body("spot-t4", maintenance=None, spot=True)))
    # A partial URL of the zone's type, and a bare name in bulkInsert's instanceProperties.
    body = gpu_body("partial")
    body["guestAccelerators"][0]["acceleratorType"] = f"zones/{ZONE}/acceleratorTypes/nvidia-tesla-t4"
    assert "error" not in wait_operation(compute, PROJECT, ZONE, insert(compute, body))
    properties = gpu_body("unused")
    properties.pop("name")
    properties["machineType"] = "n1-standard-4"
    properties["guestAccelerators"][0]["acceleratorType"] = "nvidia-tesla-t4"
    bulk = {"count": 2, "namePattern": "gpu-fleet-#", "instanceProperties": properties}
    assert "error" not in wait_operation(compute, PROJECT, ZONE, compute.instances().bulkInsert(project=PROJECT, zone=ZONE, body=bulk).execute())
    fleet = compute.instances().get(project=PROJECT, zone=ZONE, instance="gpu-fleet-1").execute()
    assert fleet["guestAccelerators"][0]["acceleratorCount"] == 1


def test_gpus_that_break_gces_rules_are_refused_with_its_answers(compute):
    field = "resource.guestAccelerators[0]"
    assert refusal(lambda: insert(compute, gpu_body("migrating", maintenance=None))) == (
        400, "badRequest", "Instances with guest accelerators do not support live migration.",
    )  # fmt: skip
    assert refusal(lambda: insert(compute, gpu_body("migrating", maintenance="MIGRATE")))[:2] == (400, "badRequest")
    assert refusal(lambda: insert(compute, gpu_body("wrong-zone", zone="us-east1-b"), zone="us-east1-b")) == (
        404, "notFound", f"The resource 'projects/{PROJECT}/zones/us-east1-b/acceleratorTypes/nvidia-tesla-t4' was not found",
    )  # fmt: skip
    status, reason, message = refusal(lambda: insert(compute, gpu_body("three", count=3)))
    assert (status, reason) == (400, "invalid") and message.startswith(f"Invalid value for field '{field}.acceleratorCount': '3'.")
    status, reason, message = refusal(lambda: insert(compute, gpu_body("many", count=8)))
    assert (status, reason) == (400, "invalid") and message.startswith(f"Invalid value for field '{field}.acceleratorCount': '8'.")
    assert refusal(lambda: insert(compute, gpu_body("too-big", type_name="nvidia-tesla-v100", machine_type="n1-standard-16"))) == (
        400, "invalid",
        f"Invalid value for field '{field}.acceleratorCount': '1'. At most 12 vCPUs can be used along with 1 accelerator cards in an instance.",
    )  # fmt: skip
    assert refusal(lambda: insert(compute, gpu_body("e2", machine_type="e2-standard-4"))) == (
        400, "badRequest", "[nvidia-tesla-t4, e2-standard-4] features are not compatible for creating instance.",
    )  # fmt: skip
    # L4 and A100 come with G2 and A2 machine types only.
    assert refusal(lambda: insert(compute, gpu_body("l4", type_name="nvidia-l4"))) == (
        400, "badRequest", "[nvidia-l4, n1-standard-4] features are not compatible for creating instance.",
    )  # fmt: skip
    bare = gpu_body("bare")
    bare["guestAccelerators"][0]["acceleratorType"] = "nvidia-tesla-t4"
    status, reason, message = refusal(lambda: insert(compute, bare))
    assert (status, reason) == (400, "invalid") and message.startswith(f"Invalid value for field '{field}.acceleratorType': 'nvidia-tesla-t4'.")
    zero = gpu_body("zero", count=0)
    assert refusal(lambda: insert(compute, zero))[:2] == (400, "invalid")
    names = {vm["name"] for vm in compute.instances().list(project=PROJECT, zone=ZONE).execute().get("items", [])}
    assert not names & {"migrating", "three", "many", "too-big", "e2", "l4", "bare", "zero"}
