"""The workers' instance body (network, external IP, run-time limit), their requestIds, and which setting a refusal blames."""

import json
import uuid

import httplib2
import pytest
from googleapiclient.errors import HttpError

from cflow import fleet
from cflow.config import load_config
from cflow.gcp.errors import classify, classify_operation_error


@pytest.fixture
def make(tmp_path):
    def make(**settings):
        settings = {"TASK_MODULE_CMD": "echo", "TASKS": ["a"], **settings}
        (tmp_path / "const.py").write_text("".join(f"{name} = {value!r}\n" for name, value in settings.items()))
        return load_config(tmp_path / "const.py")

    return make


def body(config):
    return fleet.worker_instance_properties(config, "0101-0000-abcd", "gs://b/package.tar.gz", "#!/bin/bash\n")


def test_by_default_workers_join_the_default_network_with_an_external_ip(make):
    assert body(make())["networkInterfaces"] == [
        {"network": "global/networks/default", "accessConfigs": [{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}]}
    ]


def test_network_subnetwork_and_no_external_ip_come_from_the_settings(make):
    interface = body(make(VM_NETWORK="batch", VM_SUBNETWORK="batch-central", VM_EXTERNAL_IP=False))["networkInterfaces"][0]
    assert interface == {"network": "global/networks/batch", "subnetwork": "regions/us-central1/subnetworks/batch-central"}
    shared = make(VM_NETWORK="projects/host-1/global/networks/vpc", VM_SUBNETWORK="projects/host-1/regions/us-central1/subnetworks/s")
    assert body(shared)["networkInterfaces"][0]["subnetwork"] == "projects/host-1/regions/us-central1/subnetworks/s"


@pytest.mark.parametrize("spot", [True, False])
def test_max_run_hours_becomes_max_run_duration_with_termination_action_delete(make, spot):
    scheduling = body(make(VM_SPOT=spot, MAX_RUN_HOURS=1.5))["scheduling"]
    assert scheduling["maxRunDuration"] == {"seconds": "5400"}
    assert scheduling["instanceTerminationAction"] == "DELETE"
    assert scheduling["provisioningModel"] == ("SPOT" if spot else "STANDARD")


def test_the_default_limit_is_a_day_and_none_sends_no_limit(make):
    assert body(make())["scheduling"]["maxRunDuration"] == {"seconds": "86400"}
    assert "maxRunDuration" not in body(make(MAX_RUN_HOURS=None, VM_SPOT=False))["scheduling"]


def test_a_creation_request_id_is_a_uuid_that_the_same_creation_gets_again():
    first = fleet.creation_request_id("0101-0000-abcd", "us-central1-a", ["w-1", "w-2"])
    assert uuid.UUID(first).version == 5
    assert fleet.creation_request_id("0101-0000-abcd", "us-central1-a", ["w-1", "w-2"]) == first
    assert fleet.creation_request_id("0101-0000-abcd", "us-central1-b", ["w-1", "w-2"]) != first
    assert fleet.creation_request_id("0101-0000-abcd", "us-central1-a", ["w-3"]) != first
    assert fleet.creation_request_id("0101-0000-ffff", "us-central1-a", ["w-1", "w-2"]) != first


def http_error(status, reason, message):
    content = {"error": {"code": status, "message": message, "errors": [{"reason": reason, "message": message, "domain": "global"}]}}
    return HttpError(httplib2.Response({"status": status}), json.dumps(content).encode())


@pytest.mark.parametrize("error, setting", [
    (http_error(400, "invalid", "Invalid value for field 'resource.networkInterfaces[0].network': 'global/networks/default'. "
                                "The referenced network resource cannot be found."), "VM_NETWORK"),
    (http_error(404, "notFound", "The resource 'projects/p/global/networks/default' was not found"), "VM_NETWORK"),
    (http_error(400, "invalid", "Invalid value for field 'resource.networkInterfaces[0].subnetwork': "
                                "'regions/us-central1/subnetworks/x'. The referenced subnetwork resource cannot be found."), "VM_SUBNETWORK"),
    (http_error(412, "conditionNotMet", "Constraint constraints/compute.vmExternalIpAccess violated for project 123. Add instance "
                                        "projects/p/zones/us-central1-a/instances/w-1 to the constraint to use external IP with it."),
     "VM_EXTERNAL_IP"),
    (http_error(404, "notFound", "The resource 'projects/debian-cloud/global/images/family/debian-99' was not found"), "VM_STOCK_IMAGE"),
    (http_error(400, "invalid", "Invalid value for field 'resource.machineType': 'zones/us-central1-a/machineTypes/e9'. "
                                "Machine type with name 'e9' does not exist in zone 'us-central1-a'."), "VM_TYPE"),
    (http_error(400, "badRequest", "The user does not have access to service account 'w@p.iam.gserviceaccount.com'. User: "
                                   "'me@example.com'. Ask a project owner to grant you the iam.serviceAccountUser role"),
     "VM_COMPUTE_SERVICE_ACCOUNT"),
    (http_error(400, "invalid", "Invalid value for field 'resource.scheduling.maxRunDuration.seconds': '5'."), "MAX_RUN_HOURS"),
], ids=["network-field", "network-resource", "subnetwork", "external-ip-policy", "image", "machine-type", "service-account",
        "max-run"])
def test_a_refusal_blames_the_setting_that_filled_what_gce_names(make, error, setting):
    blamed = fleet.setting_to_change(classify(error, "compute"), make())
    assert blamed is not None and blamed.setting == setting


def test_a_policy_refusal_inside_an_operation_blames_the_setting_too(make):
    error = classify_operation_error({"code": "CONDITION_NOT_MET", "message": "Instance 'w-1' creation failed: Constraint "
                                      "constraints/compute.vmExternalIpAccess violated for project 123."})
    assert fleet.setting_to_change(error, make()).setting == "VM_EXTERNAL_IP"


def test_a_refusal_that_names_nothing_of_ours_blames_no_setting(make):
    assert fleet.setting_to_change(classify(http_error(400, "invalid", "Something else entirely."), "compute"), make()) is None


def test_the_network_fix_is_the_command_that_creates_it(make):
    error = classify(http_error(404, "notFound", "The resource 'projects/p/global/networks/batch' was not found"), "compute")
    assert fleet.setting_to_change(error, make(VM_NETWORK="batch")).fix.startswith(
        "create it (gcloud compute networks create batch --subnet-mode=auto) or set VM_NETWORK in const.py")
