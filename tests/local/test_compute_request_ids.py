"""Compute emulator: how insert and bulkInsert are called as on GCE.

- ``requestId`` (a UUID) makes a repeated call return the first call's
  operation, and nothing is done twice;
- ``instances.insert`` names the machine type by a zonal URL, bulkInsert's
  ``instanceProperties`` by a bare name;
- bulkInsert makes up to 5,000 VMs per call.
"""

import json
import threading
import uuid

import pytest
from google.auth.credentials import AnonymousCredentials
from googleapiclient.errors import HttpError

from tests.helpers import compute_client, instance_body, wait_operation, wait_until

PROJECT = "request-ids-project"
ZONE = "us-east1-b"


def refused(call):
    with pytest.raises(HttpError) as caught:
        call.execute()
    return caught.value


def google_error(error):
    body = json.loads(error.content)["error"]
    assert body["errors"][0]["message"] == body["message"]
    return error.resp.status, body["errors"][0]["reason"], body["message"]


def names_in_zone(compute, zone=ZONE, project=PROJECT):
    return sorted(instance["name"] for instance in compute.instances().list(project=project, zone=zone).execute().get("items", []))


def properties(machine_type="e2-micro"):
    body = instance_body("unused", zone=ZONE)
    body.pop("name")
    body["machineType"] = machine_type
    return body


def bulk_body(pattern, count, **more):
    return {"count": count, "namePattern": pattern, "instanceProperties": properties(), **more}


# requestId.


def test_a_repeated_insert_returns_the_first_operation_and_makes_one_vm(compute):
    request_id = str(uuid.uuid4())
    body = instance_body("once", zone=ZONE)
    first = compute.instances().insert(project=PROJECT, zone=ZONE, body=body, requestId=request_id).execute()
    again = compute.instances().insert(project=PROJECT, zone=ZONE, body=body, requestId=request_id).execute()
    assert again["name"] == first["name"] and again["targetId"] == first["targetId"]
    wait_operation(compute, PROJECT, ZONE, first)
    # Later, the same id still answers with the same operation, as it is now.
    done = compute.instances().insert(project=PROJECT, zone=ZONE, body=body, requestId=request_id).execute()
    assert done["name"] == first["name"] and done["status"] == "DONE"
    assert names_in_zone(compute).count("once") == 1
    # Without the id, the same body is a second request: GCE refuses the taken name.
    assert google_error(refused(compute.instances().insert(project=PROJECT, zone=ZONE, body=body)))[:2] == (409, "alreadyExists")


def test_a_repeated_bulk_insert_makes_its_vms_once(compute):
    request_id = str(uuid.uuid4())
    body = bulk_body("again-#", 3)
    first = compute.instances().bulkInsert(project=PROJECT, zone=ZONE, body=body, requestId=request_id).execute()
    again = compute.instances().bulkInsert(project=PROJECT, zone=ZONE, body=body, requestId=request_id).execute()
    assert again["name"] == first["name"]
    wait_operation(compute, PROJECT, ZONE, first)
    assert [name for name in names_in_zone(compute) if name.startswith("again-")] == ["again-1", "again-2", "again-3"]


def test_simultaneous_calls_with_one_id_make_one_set_of_vms(compute, compute_emulator):
    request_id = str(uuid.uuid4())
    body = bulk_body("race-#", 2)
    answers: list[str] = []

    def send():
        client = compute_client(compute_emulator.base_url)
        answers.append(client.instances().bulkInsert(project=PROJECT, zone=ZONE, body=body, requestId=request_id).execute()["name"])

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(answers) == 4 and len(set(answers)) == 1
    wait_operation(compute, PROJECT, ZONE, answers[0])
    assert [name for name in names_in_zone(compute) if name.startswith("race-")] == ["race-1", "race-2"]


def test_a_refused_call_is_not_remembered(compute):
    request_id = str(uuid.uuid4())
    wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=instance_body("taken", zone=ZONE)).execute())
    body = instance_body("taken", zone=ZONE)
    assert google_error(refused(compute.instances().insert(project=PROJECT, zone=ZONE, body=body, requestId=request_id)))[0] == 409
    wait_operation(compute, PROJECT, ZONE, compute.instances().delete(project=PROJECT, zone=ZONE, instance="taken").execute())
    # The name is free now: the same request, sent again with its id, runs.
    operation = compute.instances().insert(project=PROJECT, zone=ZONE, body=body, requestId=request_id).execute()
    assert "error" not in wait_operation(compute, PROJECT, ZONE, operation)
    assert "taken" in names_in_zone(compute)


def test_a_repeated_delete_returns_its_operation_not_404(compute):
    wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=instance_body("going", zone=ZONE)).execute())
    request_id = str(uuid.uuid4())
    first = compute.instances().delete(project=PROJECT, zone=ZONE, instance="going", requestId=request_id).execute()
    wait_operation(compute, PROJECT, ZONE, first)
    again = compute.instances().delete(project=PROJECT, zone=ZONE, instance="going", requestId=request_id).execute()
    assert again["name"] == first["name"] and again["status"] == "DONE"
    assert google_error(refused(compute.instances().delete(project=PROJECT, zone=ZONE, instance="going")))[0] == 404


@pytest.mark.parametrize("request_id", ["not-a-uuid", "00000000-0000-0000-0000-000000000000", "1234567812345678123456781234567z"])
def test_a_request_id_must_be_a_uuid_other_than_zero(compute, request_id):
    error = refused(compute.instances().insert(project=PROJECT, zone=ZONE, body=instance_body("badid", zone=ZONE), requestId=request_id))
    detail = "The request ID must be a valid UUID with the exception that zero UUID is not supported (00000000-0000-0000-0000-000000000000)."
    assert google_error(error) == (400, "invalid", f"Invalid value for field 'requestId': '{request_id}'. {detail}")
    assert "badid" not in names_in_zone(compute)


def test_the_gapic_client_repeats_an_insert_with_its_request_id(compute_emulator, compute):
    compute_v1 = pytest.importorskip("google.cloud.compute_v1")
    from google.api_core.client_options import ClientOptions

    client = compute_v1.InstancesClient(
        credentials=AnonymousCredentials(), transport="rest", client_options=ClientOptions(api_endpoint=compute_emulator.base_url.split("/compute/v1/")[0])
    )
    resource = compute_v1.Instance.from_json(json.dumps(instance_body("gapic-once", zone=ZONE)), ignore_unknown_fields=True)
    request = compute_v1.InsertInstanceRequest(project=PROJECT, zone=ZONE, instance_resource=resource, request_id=str(uuid.uuid4()))
    first = client.insert(request=request)
    again = client.insert(request=request)
    assert again.name == first.name
    # (first.result() would poll through a ZoneOperationsClient of its own, aimed at compute.googleapis.com.)
    wait_operation(compute, PROJECT, ZONE, first.name)
    assert names_in_zone(compute).count("gapic-once") == 1


# The machine type's form.


@pytest.mark.parametrize(
    "reference",
    [
        "BASE/projects/request-ids-project/zones/us-east1-b/machineTypes/e2-small",
        "https://www.googleapis.com/compute/v1/projects/request-ids-project/zones/us-east1-b/machineTypes/e2-small",
        "projects/request-ids-project/zones/us-east1-b/machineTypes/e2-small",
        "zones/us-east1-b/machineTypes/e2-small",
    ],
)
def test_insert_takes_the_machine_type_as_a_zonal_url(compute, compute_emulator, reference):
    body = instance_body("by-url", zone=ZONE)
    body["machineType"] = reference.replace("BASE/", compute_emulator.base_url)
    operation = wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=body).execute())
    assert "error" not in operation
    instance = compute.instances().get(project=PROJECT, zone=ZONE, instance="by-url").execute()
    assert instance["machineType"] == f"{compute_emulator.base_url}projects/{PROJECT}/zones/{ZONE}/machineTypes/e2-small"
    wait_operation(compute, PROJECT, ZONE, compute.instances().delete(project=PROJECT, zone=ZONE, instance="by-url").execute())


def test_insert_refuses_a_bare_name_or_another_zone(compute):
    body = instance_body("by-name", zone=ZONE)
    body["machineType"] = "e2-small"
    message = "Invalid value for field 'resource.machineType': 'e2-small'. The URL is malformed."
    assert google_error(refused(compute.instances().insert(project=PROJECT, zone=ZONE, body=body))) == (400, "invalid", message)
    body["machineType"] = "zones/us-central1-a/machineTypes/e2-small"
    status, reason, message = google_error(refused(compute.instances().insert(project=PROJECT, zone=ZONE, body=body)))
    assert (status, reason) == (400, "invalid") and message.startswith("Invalid value for field 'resource.machineType': 'zones/us-central1-a/")
    assert "by-name" not in names_in_zone(compute)


def test_bulk_insert_takes_a_bare_name_and_fails_on_a_url(compute):
    body = {"count": 1, "namePattern": "bare-#", "instanceProperties": properties("e2-small")}
    assert "error" not in wait_operation(compute, PROJECT, ZONE, compute.instances().bulkInsert(project=PROJECT, zone=ZONE, body=body).execute())
    assert "bare-1" in names_in_zone(compute)

    body = {"count": 1, "namePattern": "url-#", "instanceProperties": properties(f"zones/{ZONE}/machineTypes/e2-small")}
    operation = wait_operation(compute, PROJECT, ZONE, compute.instances().bulkInsert(project=PROJECT, zone=ZONE, body=body).execute())
    assert [error["code"] for error in operation["error"]["errors"]] == ["INTERNAL_ERROR"]
    assert operation["httpErrorStatusCode"] == 500
    assert not [name for name in names_in_zone(compute) if name.startswith("url-")]


# bulkInsert's size.


def test_bulk_insert_takes_up_to_5000_vms_a_call(start_compute_emulator):
    # Two vCPUs of quota: of the 5,000 asked, GCE makes what fits (minCount 1), which shows the count itself passed.
    with start_compute_emulator("--cpu-quota", "2") as emulator:
        compute = compute_client(emulator.base_url)
        body = bulk_body("many-####", 5000, minCount="1")
        operation = wait_operation(compute, PROJECT, ZONE, compute.instances().bulkInsert(project=PROJECT, zone=ZONE, body=body).execute())
        status = operation["instancesBulkInsertOperationMetadata"]["perLocationStatus"][f"zones/{ZONE}"]
        assert (status["targetVmCount"], status["createdVmCount"]) == (5000, 1)
        wait_until(lambda: names_in_zone(compute) == ["many-0001"], 30, "the one VM that fits")

        error = refused(compute.instances().bulkInsert(project=PROJECT, zone=ZONE, body=bulk_body("many-####", 5001)))
        message = "Invalid value for field 'bulkInsertInstanceResource.count': '5001'. Must be between 1 and 5000."
        assert google_error(error) == (400, "invalid", message)
        error = refused(compute.instances().bulkInsert(project=PROJECT, zone=ZONE, body=bulk_body("many-####", 2, minCount="3")))
        assert google_error(error)[:2] == (400, "invalid")
