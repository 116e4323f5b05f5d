"""Compute emulator: bulkInsert naming and counts; list filters and pagination."""

import pytest
from googleapiclient.errors import HttpError

from tests.helpers import instance_body, wait_operation, wait_until

PROJECT = "bulk-project"
ZONE = "us-west1-a"
OTHER_ZONE = "us-west1-b"


def properties(labels=None, spot=False):
    body = instance_body("unused", startup_script="sleep 1000", labels=labels, spot=spot)
    body.pop("name")
    body["machineType"] = "e2-micro"  # instanceProperties names a machine type, not a URL
    return body


def bulk(compute, zone=ZONE, **fields):
    return compute.instances().bulkInsert(project=PROJECT, zone=zone, body=fields).execute()


def names(compute, zone=ZONE, **query):
    response = compute.instances().list(project=PROJECT, zone=zone, **query).execute()
    return [item["name"] for item in response.get("items", [])]


def test_name_pattern_numbers_after_the_highest_existing_name(compute):
    first = bulk(compute, count="3", namePattern="pool-###", instanceProperties=properties({"pool": "a"}))
    assert first["operationType"] == "bulkInsert"
    done = wait_operation(compute, PROJECT, ZONE, first)
    assert done.get("error") is None
    assert done["instancesBulkInsertOperationMetadata"]["perLocationStatus"][f"zones/{ZONE}"]["createdVmCount"] == 3
    assert names(compute, filter="name = pool-*") == ["pool-001", "pool-002", "pool-003"]
    wait_operation(compute, PROJECT, ZONE, compute.instances().delete(project=PROJECT, zone=ZONE, instance="pool-002").execute())

    second = bulk(compute, count=2, namePattern="pool-###", instanceProperties=properties({"pool": "a"}))
    wait_operation(compute, PROJECT, ZONE, second)
    assert names(compute, filter="name = pool-*") == ["pool-001", "pool-003", "pool-004", "pool-005"]
    assert all(
        compute.instances().get(project=PROJECT, zone=ZONE, instance=name).execute()["status"] == "RUNNING"
        for name in ("pool-004", "pool-005")
    )


def test_per_instance_properties_name_the_vms(compute):
    operation = bulk(compute, count="2", perInstanceProperties={"named-a": {}, "named-b": {"hostname": "b.example.internal"}}, instanceProperties=properties())
    wait_operation(compute, PROJECT, ZONE, operation)
    assert names(compute, filter="name = named-*") == ["named-a", "named-b"]
    assert compute.instances().get(project=PROJECT, zone=ZONE, instance="named-b").execute()["hostname"] == "b.example.internal"


def test_per_instance_names_fill_first_then_the_pattern(compute):
    wait_operation(compute, PROJECT, ZONE, bulk(compute, count=3, namePattern="mix-##", perInstanceProperties={"mix-07": {}}, instanceProperties=properties()))
    assert names(compute, filter="name = mix-*") == ["mix-07", "mix-08", "mix-09"]


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"count": 2, "namePattern": "bad-###-##"}, "invalid"),
        ({"count": 2, "namePattern": "Bad-##"}, "invalid"),
        ({"count": 3, "minCount": 4, "namePattern": "m-##"}, "invalid"),
        ({"count": 2}, "invalid"),
        ({"count": 3, "perInstanceProperties": {"only-one": {}}}, "invalid"),
        ({"namePattern": "c-##"}, "required"),
    ],
)
def test_bulk_insert_rejects_bad_requests(compute, fields, reason):
    with pytest.raises(HttpError) as refused:
        bulk(compute, instanceProperties=properties(), **fields)
    assert refused.value.resp.status == 400
    assert refused.value.error_details[0]["reason"] == reason


def test_an_existing_per_instance_name_is_a_conflict(compute):
    wait_operation(compute, PROJECT, ZONE, bulk(compute, count=1, perInstanceProperties={"taken": {}}, instanceProperties=properties()))
    with pytest.raises(HttpError) as refused:
        bulk(compute, count=2, perInstanceProperties={"taken": {}, "free": {}}, instanceProperties=properties())
    assert refused.value.resp.status == 409


def test_list_filters_on_labels_and_status(compute):
    zone = OTHER_ZONE
    wait_operation(compute, PROJECT, zone, bulk(compute, zone=zone, count=3, namePattern="run-a-#", instanceProperties=properties({"cflow-run": "abc"})))
    wait_operation(compute, PROJECT, zone, bulk(compute, zone=zone, count=2, namePattern="run-b-#", instanceProperties=properties({"cflow-run": "xyz"})))
    wait_operation(compute, PROJECT, zone, compute.instances().stop(project=PROJECT, zone=zone, instance="run-a-2").execute())

    assert names(compute, zone, filter='labels.cflow-run = "abc" AND status = RUNNING') == ["run-a-1", "run-a-3"]
    assert names(compute, zone, filter="(labels.cflow-run = abc) (status != TERMINATED)") == ["run-a-1", "run-a-3"]
    assert names(compute, zone, filter="labels.cflow-run = xyz") == ["run-b-1", "run-b-2"]
    assert names(compute, zone, filter="status = TERMINATED") == ["run-a-2"]
    assert names(compute, zone, filter="name eq run-b-.*") == ["run-b-1", "run-b-2"]
    assert names(compute, zone, filter="name ne run-.*") == []
    assert names(compute, zone, filter="labels.cflow-run:*") == ["run-a-1", "run-a-2", "run-a-3", "run-b-1", "run-b-2"]
    assert names(compute, zone, filter="labels.cflow-run = abc OR labels.cflow-run = xyz") == ["run-a-1", "run-a-2", "run-a-3", "run-b-1", "run-b-2"]
    assert names(compute, zone, filter="labels.cflow-run = nothing") == []

    aggregated = compute.instances().aggregatedList(project=PROJECT, filter='labels.cflow-run = "abc"').execute()
    found = sorted(vm["name"] for scope in aggregated["items"].values() for vm in scope.get("instances", []))
    assert found == ["run-a-1", "run-a-2", "run-a-3"]
    assert aggregated["items"]["zones/us-central1-a"]["warning"]["code"] == "NO_RESULTS_ON_PAGE"


def test_list_and_aggregated_list_page_through_every_vm(compute):
    zone = "us-west1-c"
    wait_operation(compute, PROJECT, zone, bulk(compute, zone=zone, count=5, namePattern="page-#", instanceProperties=properties({"paged": "yes"})))
    seen = []
    request = compute.instances().list(project=PROJECT, zone=zone, maxResults=2)
    pages = 0
    while request is not None:
        response = request.execute()
        pages += 1
        seen += [item["name"] for item in response.get("items", [])]
        request = compute.instances().list_next(request, response)
    assert seen == [f"page-{n}" for n in range(1, 6)] and pages == 3

    seen = []
    request = compute.instances().aggregatedList(project=PROJECT, filter="labels.paged = yes", maxResults=2)
    while request is not None:
        response = request.execute()
        seen += [vm["name"] for scope in response["items"].values() for vm in scope.get("instances", [])]
        request = compute.instances().aggregatedList_next(request, response)
    assert seen == [f"page-{n}" for n in range(1, 6)]


def test_set_labels_checks_the_fingerprint(compute):
    body = instance_body("labelled", zone=ZONE, labels={"a": "1"})
    wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=body).execute())
    current = compute.instances().get(project=PROJECT, zone=ZONE, instance="labelled").execute()
    body = {"labels": {"a": "2", "b": "x"}, "labelFingerprint": current["labelFingerprint"]}
    wait_operation(compute, PROJECT, ZONE, compute.instances().setLabels(project=PROJECT, zone=ZONE, instance="labelled", body=body).execute())
    updated = compute.instances().get(project=PROJECT, zone=ZONE, instance="labelled").execute()
    assert updated["labels"] == {"a": "2", "b": "x"} and updated["labelFingerprint"] != current["labelFingerprint"]
    with pytest.raises(HttpError) as stale:
        compute.instances().setLabels(project=PROJECT, zone=ZONE, instance="labelled", body=body).execute()
    assert stale.value.resp.status == 412 and stale.value.error_details[0]["reason"] == "conditionNotMet"
    wait_until(lambda: names(compute, filter="labels.b = x") == ["labelled"])
