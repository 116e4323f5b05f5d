"""Compute emulator: bad requests get GCE's own status, reason and error shape, never a 500."""

import json
import urllib.error
import urllib.request

import pytest
from googleapiclient.errors import HttpError

from tests.helpers import instance_body, wait_operation

PROJECT = "errors-project"
ZONE = "asia-east1-a"


@pytest.fixture(scope="module")
def existing(compute):
    wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=instance_body("exists", zone=ZONE)).execute())
    return "exists"


def assert_google_error(content, status, reason):
    body = json.loads(content)
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"code", "message", "errors"}
    assert error["code"] == status and error["message"]
    assert error["errors"] == [{"message": error["message"], "domain": "global", "reason": reason}]
    return error["message"]


def refused(call):
    with pytest.raises(HttpError) as caught:
        call.execute()
    return caught.value


def raw(emulator, method, path, body=None, content_type="application/json"):
    url = emulator.base_url.split("/compute/v1/")[0] + path
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_unknown_instance_is_404_not_found(compute):
    error = refused(compute.instances().get(project=PROJECT, zone=ZONE, instance="nope"))
    message = assert_google_error(error.content, 404, "notFound")
    assert message == f"The resource 'projects/{PROJECT}/zones/{ZONE}/instances/nope' was not found"
    for call in (
        compute.instances().delete(project=PROJECT, zone=ZONE, instance="nope"),
        compute.instances().stop(project=PROJECT, zone=ZONE, instance="nope"),
        compute.zoneOperations().get(project=PROJECT, zone=ZONE, operation="operation-0-nope"),
    ):
        assert_google_error(refused(call).content, 404, "notFound")


def test_duplicate_name_is_409_already_exists(compute, existing):
    error = refused(compute.instances().insert(project=PROJECT, zone=ZONE, body=instance_body(existing, zone=ZONE)))
    message = assert_google_error(error.content, 409, "alreadyExists")
    assert message == f"The resource 'projects/{PROJECT}/zones/{ZONE}/instances/{existing}' already exists"


@pytest.mark.parametrize("name", ["Upper", "1starts-with-digit", "ends-with-dash-", "under_score", "x" * 64])
def test_names_breaking_the_rule_are_400_invalid(compute, name):
    error = refused(compute.instances().insert(project=PROJECT, zone=ZONE, body=instance_body(name, zone=ZONE)))
    message = assert_google_error(error.content, 400, "invalid")
    assert "resource.name" in message and "[a-z]" in message


def test_missing_fields_are_400_required(compute):
    body = instance_body("no-type", zone=ZONE)
    del body["machineType"]
    assert_google_error(refused(compute.instances().insert(project=PROJECT, zone=ZONE, body=body)).content, 400, "required")
    body = instance_body("", zone=ZONE)
    assert_google_error(refused(compute.instances().insert(project=PROJECT, zone=ZONE, body=body)).content, 400, "required")


def test_unknown_zone_machine_type_and_image(compute):
    error = refused(compute.instances().insert(project=PROJECT, zone="mars-north1-a", body=instance_body("vm", zone="mars-north1-a")))
    assert "Unknown zone" in assert_google_error(error.content, 400, "invalid")
    assert_google_error(refused(compute.instances().list(project=PROJECT, zone="mars-north1-a")).content, 400, "invalid")
    assert_google_error(refused(compute.zones().get(project=PROJECT, zone="mars-north1-a")).content, 404, "notFound")

    error = refused(compute.instances().insert(project=PROJECT, zone=ZONE, body=instance_body("vm", zone=ZONE, machine_type="e2-huge")))
    assert "e2-huge" in assert_google_error(error.content, 400, "invalid")

    body = instance_body("vm", zone=ZONE)
    body["disks"][0]["initializeParams"]["sourceImage"] = "projects/debian-cloud/global/images/family/debian-99"
    message = assert_google_error(refused(compute.instances().insert(project=PROJECT, zone=ZONE, body=body)).content, 404, "notFound")
    assert message == "The resource 'projects/debian-cloud/global/images/family/debian-99' was not found"
    assert_google_error(refused(compute.images().get(project="debian-cloud", image="nope")).content, 404, "notFound")
    assert_google_error(refused(compute.machineTypes().get(project=PROJECT, zone=ZONE, machineType="nope")).content, 404, "notFound")


def test_bad_labels_metadata_and_scheduling_are_400(compute):
    changes: dict
    for changes in (
        {"labels": {"Bad Key": "x"}},
        {"labels": {"ok": "UPPER"}},
        {"metadata": {"items": [{"key": "a", "value": "1"}, {"key": "a", "value": "2"}]}},
        {"metadata": {"items": [{"key": "bad key!", "value": "1"}]}},
        {"scheduling": {"provisioningModel": "SPOT", "automaticRestart": True}},
        {"scheduling": {"instanceTerminationAction": "DELETE"}},
        {"disks": []},
    ):
        body = dict(instance_body("vm", zone=ZONE), **changes)
        assert_google_error(refused(compute.instances().insert(project=PROJECT, zone=ZONE, body=body)).content, 400, "invalid")


def test_stale_metadata_fingerprint_is_412(compute, existing):
    current = compute.instances().get(project=PROJECT, zone=ZONE, instance=existing).execute()["metadata"]
    body = {"fingerprint": current["fingerprint"], "items": [{"key": "k", "value": "v"}]}
    wait_operation(compute, PROJECT, ZONE, compute.instances().setMetadata(project=PROJECT, zone=ZONE, instance=existing, body=body).execute())
    error = refused(compute.instances().setMetadata(project=PROJECT, zone=ZONE, instance=existing, body=body))
    assert assert_google_error(error.content, 412, "conditionNotMet") == "Supplied fingerprint does not match current metadata fingerprint."


def test_unparsable_filter_and_page_size_are_400(compute):
    for call in (
        compute.instances().list(project=PROJECT, zone=ZONE, filter="name = (unbalanced"),
        compute.instances().list(project=PROJECT, zone=ZONE, filter="labels.x"),
        compute.instances().list(project=PROJECT, zone=ZONE, maxResults=501),
    ):
        assert_google_error(refused(call).content, 400, "invalid")


def test_malformed_bodies_and_unknown_paths_never_500(compute_emulator):
    instances = f"/compute/v1/projects/{PROJECT}/zones/{ZONE}/instances"
    status, content = raw(compute_emulator, "POST", instances, b"{not json")
    assert status == 400 and assert_google_error(content, 400, "parseError")
    status, content = raw(compute_emulator, "POST", instances, b"[1, 2]")
    assert status == 400 and assert_google_error(content, 400, "parseError")
    status, content = raw(compute_emulator, "POST", instances, json.dumps({"name": 5, "machineType": ["x"], "disks": "no"}).encode())
    assert status == 400
    status, content = raw(compute_emulator, "POST", instances + "/bulkInsert", json.dumps({"count": "many", "namePattern": "a-#"}).encode())
    assert status == 400 and assert_google_error(content, 400, "invalid")
    for method, path in (("GET", "/compute/v1/projects/p/nonsense"), ("PUT", instances), ("GET", "/elsewhere"), ("POST", instances + "/x/explode")):
        status, content = raw(compute_emulator, method, path, b"{}" if method != "GET" else None)
        assert status == 404 and assert_google_error(content, 404, "notFound")


def test_starting_a_stopping_vm_is_400_not_ready(compute):
    body = instance_body("slow-stop", zone=ZONE, startup_script="trap '' TERM; sleep 1000 & wait", shutdown_script="sleep 1")
    wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=body).execute())
    stop = compute.instances().stop(project=PROJECT, zone=ZONE, instance="slow-stop").execute()
    assert compute.instances().get(project=PROJECT, zone=ZONE, instance="slow-stop").execute()["status"] == "STOPPING"
    assert_google_error(refused(compute.instances().start(project=PROJECT, zone=ZONE, instance="slow-stop")).content, 400, "resourceNotReady")
    wait_operation(compute, PROJECT, ZONE, stop)
