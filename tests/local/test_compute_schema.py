"""Compute emulator: every resource it returns fits the compute v1 discovery document's schemas."""

import json
import os
import re

import googleapiclient
import pytest

from tests.helpers import compute_client, instance_body, wait_operation, wait_until

PROJECT = "schema-project"
ZONE = "europe-west4-b"
FULL_ZONE = "europe-west4-c"
DISCOVERY = os.path.join(os.path.dirname(googleapiclient.__file__), "discovery_cache", "documents", "compute.v1.json")
# Fields GCP code relies on; the checker below also refuses any field the schema does not know.
REQUIRED = {
    "Instance": {
        "kind", "id", "name", "selfLink", "zone", "machineType", "status", "creationTimestamp", "labelFingerprint", "metadata", "scheduling",
        "networkInterfaces", "disks",
    },
    "Operation": {"kind", "id", "name", "zone", "operationType", "targetLink", "status", "progress", "insertTime", "startTime", "user", "selfLink"},
    "InstanceList": {"kind", "id", "items", "selfLink"},
    "InstanceAggregatedList": {"kind", "id", "items", "selfLink"},
    "OperationList": {"kind", "id", "items", "selfLink"},
    "Zone": {"kind", "id", "name", "region", "status", "selfLink"},
    "MachineType": {"kind", "id", "name", "guestCpus", "memoryMb", "zone", "selfLink"},
    "Image": {"kind", "id", "name", "selfLink", "status"},
}
INTEGER_STRING = re.compile(r"-?[0-9]+")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d")


@pytest.fixture(scope="module")
def schemas():
    with open(DISCOVERY) as handle:
        return json.load(handle)["schemas"]


def check(value, schema, schemas, path):
    """Raises AssertionError naming the path of the first value that does not fit ``schema``."""
    if "$ref" in schema:
        name = schema["$ref"]
        resolved = schemas[name]
        for field in REQUIRED.get(name, ()):
            assert field in value, f"{path}: {name} lacks {field}"
        check(value, resolved, schemas, path)
        return
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), f"{path}: expected an object, got {value!r}"
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                check(item, properties[key], schemas, f"{path}.{key}")
            elif extra is not None:
                check(item, extra, schemas, f"{path}[{key}]")
            else:
                raise AssertionError(f"{path}: unknown field {key!r}")
    elif kind == "array":
        assert isinstance(value, list), f"{path}: expected an array"
        for index, item in enumerate(value):
            check(item, schema["items"], schemas, f"{path}[{index}]")
    elif kind == "string":
        assert isinstance(value, str), f"{path}: expected a string, got {value!r}"
        if schema.get("format") in ("int64", "uint64"):
            assert INTEGER_STRING.fullmatch(value), f"{path}: {value!r} is not an integer string"
        if "enum" in schema:
            assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
        if path.endswith(("Timestamp", "Time")):
            assert TIMESTAMP.fullmatch(value), f"{path}: {value!r} is not RFC 3339 with an offset"
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{path}: expected an integer"
    elif kind == "number":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{path}: expected a number"
    elif kind == "boolean":
        assert isinstance(value, bool), f"{path}: expected a boolean"
    else:
        assert kind == "any", f"{path}: unexpected schema {schema}"


def test_the_checker_catches_wrong_shapes(schemas):
    good = {"kind": "compute#zone", "id": "1", "name": "z", "region": "r", "status": "UP", "selfLink": "s"}
    check(good, {"$ref": "Zone"}, schemas, "zone")
    for bad in ({**good, "surprise": 1}, {**good, "id": 1}, {**good, "status": "MAYBE"}, {key: value for key, value in good.items() if key != "name"}):
        with pytest.raises(AssertionError):
            check(bad, {"$ref": "Zone"}, schemas, "zone")


def test_every_resource_and_operation_fits_its_schema(schemas, start_compute_emulator):
    with start_compute_emulator("--zone-capacity", f"{FULL_ZONE}=0") as emulator:
        compute = compute_client(emulator.base_url)
        seen = []

        def record(value, schema):
            check(value, {"$ref": schema}, schemas, schema)
            seen.append(schema)
            return value

        standard = instance_body("schema-std", zone=ZONE, startup_script="sleep 1000", shutdown_script="true", labels={"cflow-run": "s"})
        standard["networkInterfaces"][0]["accessConfigs"] = [{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}]
        record(compute.instances().insert(project=PROJECT, zone=ZONE, body=standard).execute(), "Operation")
        spot = instance_body("schema-spot", zone=ZONE, startup_script="sleep 1000", spot=True)
        record(wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=spot).execute()), "Operation")
        properties = instance_body("x", zone=ZONE, startup_script="sleep 1000")
        properties.pop("name")
        properties["machineType"] = "e2-micro"
        bulk_body = {"count": 2, "namePattern": "schema-bulk-#", "instanceProperties": properties}
        bulk = compute.instances().bulkInsert(project=PROJECT, zone=ZONE, body=bulk_body).execute()
        record(wait_operation(compute, PROJECT, ZONE, bulk), "Operation")
        failed = compute.instances().insert(project=PROJECT, zone=FULL_ZONE, body=instance_body("schema-none", zone=FULL_ZONE)).execute()
        failed = record(wait_operation(compute, PROJECT, FULL_ZONE, failed), "Operation")
        assert failed["error"]["errors"][0]["code"] == "ZONE_RESOURCE_POOL_EXHAUSTED"

        wait_until(lambda: compute.instances().get(project=PROJECT, zone=ZONE, instance="schema-std").execute()["status"] == "RUNNING")
        record(compute.instances().get(project=PROJECT, zone=ZONE, instance="schema-std").execute(), "Instance")
        compute.instances().simulateMaintenanceEvent(project=PROJECT, zone=ZONE, instance="schema-spot").execute()
        wait_until(lambda: compute.instances().get(project=PROJECT, zone=ZONE, instance="schema-spot").execute()["status"] == "TERMINATED")
        preempted = record(compute.instances().get(project=PROJECT, zone=ZONE, instance="schema-spot").execute(), "Instance")
        assert preempted["statusMessage"] and preempted["lastStopTimestamp"]
        current = compute.instances().get(project=PROJECT, zone=ZONE, instance="schema-std").execute()
        labels = {"labels": {"a": "b"}, "labelFingerprint": current["labelFingerprint"]}
        record(compute.instances().setLabels(project=PROJECT, zone=ZONE, instance="schema-std", body=labels).execute(), "Operation")
        metadata = {"fingerprint": current["metadata"]["fingerprint"], "items": []}
        record(compute.instances().setMetadata(project=PROJECT, zone=ZONE, instance="schema-std", body=metadata).execute(), "Operation")
        record(compute.instances().stop(project=PROJECT, zone=ZONE, instance="schema-std").execute(), "Operation")

        listing = record(compute.instances().list(project=PROJECT, zone=ZONE, maxResults=2).execute(), "InstanceList")
        assert listing["nextPageToken"] and len(listing["items"]) == 2
        record(compute.instances().list(project=PROJECT, zone=ZONE, filter="name = nothing").execute(), "InstanceList")
        record(compute.instances().aggregatedList(project=PROJECT).execute(), "InstanceAggregatedList")
        record(compute.instances().aggregatedList(project=PROJECT, maxResults=1).execute(), "InstanceAggregatedList")
        operations = record(compute.zoneOperations().list(project=PROJECT, zone=ZONE).execute(), "OperationList")
        expected = {"insert", "bulkInsert", "compute.instances.preempted", "setLabels", "setMetadata", "stop", "simulateMaintenanceEvent"}
        assert expected <= {op["operationType"] for op in operations["items"]}
        record(compute.instances().delete(project=PROJECT, zone=ZONE, instance="schema-bulk-1").execute(), "Operation")
        record(compute.instances().getSerialPortOutput(project=PROJECT, zone=ZONE, instance="schema-bulk-2").execute(), "SerialPortOutput")

        record(compute.zones().get(project=PROJECT, zone=ZONE).execute(), "Zone")
        zones = record(compute.zones().list(project=PROJECT).execute(), "ZoneList")
        assert {"us-central1-a", "us-central1-f", "us-east1-d", "europe-west1-b", "asia-east1-c"} <= {zone["name"] for zone in zones["items"]}
        record(compute.machineTypes().get(project=PROJECT, zone=ZONE, machineType="n2-standard-8").execute(), "MachineType")
        types = record(compute.machineTypes().list(project=PROJECT, zone=ZONE).execute(), "MachineTypeList")
        by_name = {item["name"]: item for item in types["items"]}
        assert {"e2-micro", "e2-small", "e2-medium", "e2-standard-32", "e2-highcpu-16", "n1-standard-16", "n2-standard-2", "c2-standard-16"} <= set(by_name)
        assert (by_name["e2-standard-4"]["guestCpus"], by_name["e2-standard-4"]["memoryMb"]) == (4, 16384)
        for project, family in (("debian-cloud", "debian-12"), ("debian-cloud", "debian-11"), ("ubuntu-os-cloud", "ubuntu-2204-lts")):
            image = record(compute.images().getFromFamily(project=project, family=family).execute(), "Image")
            record(compute.images().get(project=project, image=image["name"]).execute(), "Image")
        record(compute.images().list(project="debian-cloud").execute(), "ImageList")
    assert len(seen) >= 25
