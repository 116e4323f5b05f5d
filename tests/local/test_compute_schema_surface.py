"""The resources the everyday gcloud surface reads fit the compute v1 discovery document's schemas:
projects, image family views, disk types, aggregated lists, grouped operations."""

import json

import pytest

from tests.helpers import compute_client, instance_body, wait_operation, wait_until
from tests.local.test_compute_schema import DISCOVERY, check

PROJECT = "surface-schema"
ZONE = "europe-west1-b"


@pytest.fixture(scope="module")
def schemas():
    with open(DISCOVERY) as handle:
        return json.load(handle)["schemas"]


def test_every_new_resource_fits_its_schema(schemas, start_compute_emulator):
    with start_compute_emulator() as emulator:
        compute = compute_client(emulator.base_url)
        seen = []

        def record(value, schema):
            check(value, {"$ref": schema}, schemas, schema)
            seen.append(schema)
            return value

        def record_global(operation):
            # A global operation has no zone, which the zonal REQUIRED set of test_compute_schema asks for.
            assert "zone" not in operation and operation["selfLink"].endswith(f"/global/operations/{operation['name']}")
            check(operation, schemas["Operation"], schemas, "global Operation")
            seen.append("Operation")
            return operation

        project = record(compute.projects().get(project=PROJECT).execute(), "Project")
        body = {"items": [{"key": "team", "value": "cflow"}], "fingerprint": project["commonInstanceMetadata"]["fingerprint"]}
        record_global(compute.projects().setCommonInstanceMetadata(project=PROJECT, body=body).execute())
        assert record(compute.projects().get(project=PROJECT).execute(), "Project")["commonInstanceMetadata"]["items"] == body["items"]

        record(compute.imageFamilyViews().get(project="debian-cloud", zone=ZONE, family="debian-12").execute(), "ImageFamilyView")
        record(compute.diskTypes().get(project=PROJECT, zone=ZONE, diskType="pd-ssd").execute(), "DiskType")
        record(compute.diskTypes().list(project=PROJECT, zone=ZONE).execute(), "DiskTypeList")
        record(compute.diskTypes().aggregatedList(project=PROJECT).execute(), "DiskTypeAggregatedList")
        record(compute.machineTypes().aggregatedList(project=PROJECT, filter="name = e2-micro").execute(), "MachineTypeAggregatedList")
        record(compute.machineTypes().get(project=PROJECT, zone=ZONE, machineType="e2-custom-4-8192").execute(), "MachineType")

        kept = instance_body("surface-1", zone=ZONE, startup_script="sleep 1000")
        kept["disks"][0]["initializeParams"]["sourceImage"] = "projects/debian-cloud/zones/-/imageFamilyViews/debian-12"
        kept.update(
            canIpForward=True, deletionProtection=True, minCpuPlatform="Intel Ice Lake",
            shieldedInstanceConfig={"enableSecureBoot": True, "enableVtpm": True, "enableIntegrityMonitoring": True},
            reservationAffinity={"consumeReservationType": "NO_RESERVATION"},
        )  # fmt: skip
        record(wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=kept).execute()), "Operation")
        record(compute.instances().get(project=PROJECT, zone=ZONE, instance="surface-1").execute(), "Instance")
        record(compute.instances().setDeletionProtection(project=PROJECT, zone=ZONE, resource="surface-1", deletionProtection=False).execute(), "Operation")
        record(wait_operation(compute, PROJECT, ZONE, compute.instances().reset(project=PROJECT, zone=ZONE, instance="surface-1").execute()), "Operation")
        scheduling = {"onHostMaintenance": "TERMINATE", "automaticRestart": False}
        record(compute.instances().setScheduling(project=PROJECT, zone=ZONE, instance="surface-1", body=scheduling).execute(), "Operation")
        record(compute.instances().getSerialPortOutput(project=PROJECT, zone=ZONE, instance="surface-1", port=2).execute(), "SerialPortOutput")

        properties = instance_body("unused", zone=ZONE, startup_script="sleep 1000")
        properties.pop("name")
        properties["machineType"] = "e2-micro"
        bulk = compute.instances().bulkInsert(project=PROJECT, zone=ZONE, body={"count": 2, "namePattern": "surface-bulk-#", "instanceProperties": properties})
        grouped = record(wait_operation(compute, PROJECT, ZONE, bulk.execute()), "Operation")
        listed = compute.zoneOperations().list(project=PROJECT, zone=ZONE, filter=f"operationGroupId = {grouped['operationGroupId']}").execute()
        assert sorted(operation["operationType"] for operation in record(listed, "OperationList")["items"]) == ["bulkInsert", "insert", "insert"]
        wait_until(lambda: compute.instances().get(project=PROJECT, zone=ZONE, instance="surface-bulk-2").execute()["status"] == "RUNNING")

        aggregated = compute.globalOperations().aggregatedList(project=PROJECT).execute()
        for operation in aggregated["items"].pop("global")["operations"]:
            record_global(operation)
        assert len(record(aggregated, "OperationAggregatedList")["items"][f"zones/{ZONE}"]["operations"]) >= 7
        global_operations = compute.globalOperations().list(project=PROJECT).execute()
        assert [record_global(operation)["operationType"] for operation in global_operations["items"]] == ["compute.projects.setCommonInstanceMetadata"]
        record(compute.disks().aggregatedList(project=PROJECT).execute(), "DiskAggregatedList")
        record(compute.disks().list(project=PROJECT, zone=ZONE).execute(), "DiskList")
        record(compute.disks().get(project=PROJECT, zone=ZONE, disk="surface-1").execute(), "Disk")
    assert set(seen) == {
        "Project", "Operation", "OperationList", "OperationAggregatedList", "ImageFamilyView", "DiskType", "DiskTypeList",
        "DiskTypeAggregatedList", "MachineType", "MachineTypeAggregatedList", "Instance", "SerialPortOutput", "Disk", "DiskList",
        "DiskAggregatedList",
    }  # fmt: skip
