"""Compute emulator: networks and subnetworks as GCE serves them, and the networks a VM's interfaces name.

Each rule has its accepted form and its refused form with GCE's status,
reason and message. Every test uses a project of its own on the module's
emulator.
"""

import json

import pytest
from googleapiclient.errors import HttpError

from tests.helpers import compute_client, instance_body, wait_operation
from tests.local.test_compute_schema import DISCOVERY, check

ZONE = "us-central1-a"
REGION = "us-central1"
AUTO_RANGES = {
    "us-central1": "10.128.0.0/20",
    "us-east1": "10.142.0.0/20",
    "us-west1": "10.138.0.0/20",
    "europe-west1": "10.132.0.0/20",
    "europe-west4": "10.164.0.0/20",
    "asia-east1": "10.140.0.0/20",
}


def refusal(call):
    """Runs ``call``; returns (status, reason, message) of the ApiError it must raise."""
    with pytest.raises(HttpError) as raised:
        call()
    error = json.loads(raised.value.content)["error"]
    assert error["code"] == raised.value.resp.status
    return raised.value.resp.status, error["errors"][0]["reason"], error["message"]


def insert_vm(compute, project, name, interfaces, zone=ZONE, wait=True, startup_script="sleep 1000"):
    body = instance_body(name, zone=zone, startup_script=startup_script)
    body["networkInterfaces"] = interfaces
    operation = compute.instances().insert(project=project, zone=zone, body=body).execute()
    return wait_operation(compute, project, zone, operation) if wait else operation


def custom_network(compute, project, name, subnets=()):
    """A custom-mode network with ``subnets`` [(name, region, range)]."""
    operation = compute.networks().insert(project=project, body={"name": name, "autoCreateSubnetworks": False}).execute()
    assert operation["status"] == "DONE" and "error" not in operation
    for subnet, region, ip_range in subnets:
        body = {"name": subnet, "network": f"global/networks/{name}", "ipCidrRange": ip_range}
        operation = compute.subnetworks().insert(project=project, region=region, body=body).execute()
        assert operation["status"] == "DONE" and "error" not in operation, operation


def test_every_project_has_the_default_auto_network_with_gces_auto_ranges(compute):
    project = "net-default"
    network = compute.networks().get(project=project, network="default").execute()
    assert network["autoCreateSubnetworks"] is True and network["routingConfig"] == {"routingMode": "REGIONAL"}
    assert network["mtu"] == 1460
    assert [network["name"] for network in compute.networks().list(project=project).execute()["items"]] == ["default"]
    subnets = compute.subnetworks().aggregatedList(project=project).execute()["items"]
    ranges = {scope.split("/")[1]: entry["subnetworks"][0]["ipCidrRange"] for scope, entry in subnets.items()}
    assert ranges == AUTO_RANGES
    subnet = compute.subnetworks().get(project=project, region="us-east1", subnetwork="default").execute()
    assert (subnet["gatewayAddress"], subnet["privateIpGoogleAccess"]) == ("10.142.0.1", False)
    assert subnet["network"] == network["selfLink"]
    assert sorted(network["subnetworks"]) == sorted(entry["subnetworks"][0]["selfLink"] for entry in subnets.values())


def test_network_insert_accepts_auto_and_custom_mode_and_refuses_what_gce_refuses(compute):
    project = "net-insert"
    operation = compute.networks().insert(project=project, body={"name": "auto-net", "autoCreateSubnetworks": True}).execute()
    assert (operation["operationType"], operation["status"]) == ("insert", "DONE")
    assert operation["selfLink"].split("/compute/v1/")[1].startswith(f"projects/{project}/global/operations/")
    assert len(compute.networks().get(project=project, network="auto-net").execute()["subnetworks"]) == len(AUTO_RANGES)
    custom_network(compute, project, "custom-net")
    assert "subnetworks" not in compute.networks().get(project=project, network="custom-net").execute()

    assert refusal(lambda: compute.networks().insert(project=project, body={"name": "custom-net", "autoCreateSubnetworks": False}).execute()) == (
        409, "alreadyExists", f"The resource 'projects/{project}/global/networks/custom-net' already exists",
    )  # fmt: skip
    status, reason, message = refusal(lambda: compute.networks().insert(project=project, body={"name": "Bad_Name", "autoCreateSubnetworks": True}).execute())
    assert (status, reason) == (400, "invalid") and message.startswith("Invalid value for field 'resource.name': 'Bad_Name'.")
    status, reason, _ = refusal(lambda: compute.networks().insert(project=project, body={"name": "legacy", "IPv4Range": "10.0.0.0/16"}).execute())
    assert (status, reason) == (400, "badRequest")
    status, reason, message = refusal(
        lambda: compute.networks().insert(project=project, body={"name": "tiny-mtu", "autoCreateSubnetworks": True, "mtu": 100}).execute()
    )
    assert (status, reason) == (400, "invalid") and "'resource.mtu'" in message
    assert refusal(lambda: compute.networks().get(project=project, network="nowhere").execute()) == (
        404, "notFound", f"The resource 'projects/{project}/global/networks/nowhere' was not found",
    )  # fmt: skip


def test_subnetwork_insert_is_regional_and_refuses_bad_ranges_overlaps_and_missing_networks(compute):
    project = "net-subnets"
    custom_network(compute, project, "vpc", [("vpc-a", "us-central1", "10.10.0.0/24")])
    body = {"name": "vpc-b", "network": "global/networks/vpc", "ipCidrRange": "10.20.0.0/24", "privateIpGoogleAccess": True}
    operation = compute.subnetworks().insert(project=project, region="us-east1", body=body).execute()
    assert operation["region"].endswith(f"/projects/{project}/regions/us-east1")
    assert "/regions/us-east1/operations/" in operation["selfLink"]
    assert compute.regionOperations().get(project=project, region="us-east1", operation=operation["name"]).execute()["status"] == "DONE"
    assert compute.regionOperations().wait(project=project, region="us-east1", operation=operation["name"]).execute()["status"] == "DONE"
    listed = compute.regionOperations().list(project=project, region="us-east1").execute()["items"]
    assert [item["name"] for item in listed] == [operation["name"]]
    assert refusal(lambda: compute.globalOperations().get(project=project, operation=operation["name"]).execute())[0] == 404
    subnet = compute.subnetworks().get(project=project, region="us-east1", subnetwork="vpc-b").execute()
    assert (subnet["ipCidrRange"], subnet["privateIpGoogleAccess"], subnet["gatewayAddress"]) == ("10.20.0.0/24", True, "10.20.0.1")
    assert [item["name"] for item in compute.subnetworks().list(project=project, region="us-east1").execute()["items"]] == ["default", "vpc-b"]

    def insert(**fields):
        return lambda: compute.subnetworks().insert(project=project, region="us-west1", body={"name": "vpc-c", **fields}).execute()

    assert refusal(insert(ipCidrRange="10.30.0.0/24")) == (400, "required", "Required field 'resource.network' not specified")
    assert refusal(insert(network="global/networks/vpc")) == (400, "required", "Required field 'resource.ipCidrRange' not specified")
    assert refusal(insert(network="global/networks/vpc", ipCidrRange="10.30.0.1/24")) == (
        400, "invalid", "Invalid value for field 'resource.ipCidrRange': '10.30.0.1/24'. Invalid IPCidrRange: 10.30.0.1/24.",
    )  # fmt: skip
    assert refusal(insert(network="global/networks/vpc", ipCidrRange="10.10.0.128/25")) == (
        400, "invalid",
        "Invalid value for field 'resource.ipCidrRange': '10.10.0.128/25'. "
        "Invalid IPCidrRange: 10.10.0.128/25 conflicts with existing subnetwork 'vpc-a' in region 'us-central1'.",
    )  # fmt: skip
    assert refusal(insert(network="global/networks/gone", ipCidrRange="10.30.0.0/24")) == (
        400, "invalid", "Invalid value for field 'resource.network': 'global/networks/gone'. The referenced network resource cannot be found.",
    )  # fmt: skip
    body = {"name": "vpc-a", "network": "global/networks/vpc", "ipCidrRange": "10.40.0.0/24"}
    assert refusal(lambda: compute.subnetworks().insert(project=project, region="us-central1", body=body).execute())[:2] == (409, "alreadyExists")
    status, reason, message = refusal(lambda: compute.subnetworks().list(project=project, region="mars-north1").execute())
    assert (status, reason, message) == (400, "invalid", "Invalid value for field 'region': 'mars-north1'. Unknown region.")

    request = {"privateIpGoogleAccess": True}
    operation = compute.subnetworks().setPrivateIpGoogleAccess(project=project, region="us-central1", subnetwork="vpc-a", body=request).execute()
    assert (operation["operationType"], operation["status"]) == ("setPrivateIpGoogleAccess", "DONE")
    assert compute.subnetworks().get(project=project, region="us-central1", subnetwork="vpc-a").execute()["privateIpGoogleAccess"] is True


def test_a_vms_interfaces_carry_urls_an_address_of_the_subnet_and_an_external_ip_only_with_an_access_config(compute):
    project = "net-vm"
    custom_network(compute, project, "vpc", [("vpc-central", "us-central1", "192.168.4.0/24")])
    external = [{"network": "global/networks/default", "accessConfigs": [{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}]}]
    assert "error" not in insert_vm(compute, project, "on-default", external)
    assert "error" not in insert_vm(compute, project, "on-custom", [{"subnetwork": "regions/us-central1/subnetworks/vpc-central"}])
    assert "error" not in insert_vm(compute, project, "on-custom-2", [{"network": "global/networks/vpc", "subnetwork": "vpc-central"}])
    reserved = [{"accessConfigs": [{"natIP": "35.1.2.3", "networkTier": "STANDARD"}]}]
    assert "error" not in insert_vm(compute, project, "with-static", reserved)

    def interface(name):
        return compute.instances().get(project=project, zone=ZONE, instance=name).execute()["networkInterfaces"][0]

    base = compute._baseUrl
    on_default = interface("on-default")
    assert on_default["network"] == f"{base}projects/{project}/global/networks/default"
    assert on_default["subnetwork"] == f"{base}projects/{project}/regions/us-central1/subnetworks/default"
    assert on_default["networkIP"] == "10.128.0.2"
    assert on_default["accessConfigs"][0]["natIP"].startswith("34.")
    first, second = interface("on-custom"), interface("on-custom-2")
    assert first["subnetwork"] == f"{base}projects/{project}/regions/us-central1/subnetworks/vpc-central"
    assert first["network"] == f"{base}projects/{project}/global/networks/vpc"
    assert (first["networkIP"], second["networkIP"]) == ("192.168.4.2", "192.168.4.3")
    assert "accessConfigs" not in first
    static = interface("with-static")["accessConfigs"][0]
    assert (static["natIP"], static["networkTier"]) == ("35.1.2.3", "STANDARD")

    # Stopped: the ephemeral external IP is released, the internal address and a reserved one stay.
    for name in ("on-default", "with-static"):
        wait_operation(compute, project, ZONE, compute.instances().stop(project=project, zone=ZONE, instance=name).execute())
    stopped = interface("on-default")
    assert stopped["networkIP"] == "10.128.0.2" and "natIP" not in stopped["accessConfigs"][0]
    assert interface("with-static")["accessConfigs"][0]["natIP"] == "35.1.2.3"

    # A deleted VM's address is free again, and the lowest free one is given first.
    wait_operation(compute, project, ZONE, compute.instances().delete(project=project, zone=ZONE, instance="on-custom").execute())
    assert "error" not in insert_vm(compute, project, "on-custom-3", [{"subnetwork": "regions/us-central1/subnetworks/vpc-central"}])
    assert interface("on-custom-3")["networkIP"] == "192.168.4.2"


def test_a_vm_naming_missing_or_mismatched_networks_gets_gces_answers(compute):
    project = "net-refusals"
    custom_network(compute, project, "vpc", [("vpc-east", "us-east1", "192.168.8.0/24")])
    custom_network(compute, project, "other", [("other-central", "us-central1", "192.168.9.0/24")])

    def refused(interfaces, zone=ZONE):
        return refusal(lambda: insert_vm(compute, project, "refused", interfaces, zone=zone, wait=False))

    assert refused([{"network": "global/networks/missing"}]) == (
        400, "invalid",
        "Invalid value for field 'resource.networkInterfaces[0].network': 'global/networks/missing'. The referenced network resource cannot be found.",
    )  # fmt: skip
    assert refused([{"subnetwork": "regions/us-central1/subnetworks/missing"}]) == (
        400, "invalid",
        "Invalid value for field 'resource.networkInterfaces[0].subnetwork': 'regions/us-central1/subnetworks/missing'. "
        "The referenced subnetwork resource cannot be found.",
    )  # fmt: skip
    assert refused([{"network": "global/networks/vpc"}]) == (
        400, "invalid", "Invalid value for field 'resource.networkInterfaces[0]': ''. Subnetwork should be specified for custom subnetmode network",
    )  # fmt: skip
    # A subnetwork of another region is not found from the VM's region.
    assert refused([{"subnetwork": "regions/us-east1/subnetworks/vpc-east"}]) == (
        404, "notFound", f"The resource 'projects/{project}/regions/us-east1/subnetworks/vpc-east' was not found",
    )  # fmt: skip
    assert refused([{"network": "global/networks/vpc", "subnetwork": "regions/us-central1/subnetworks/other-central"}]) == (
        400, "badRequest", f'Subnetwork "projects/{project}/regions/us-central1/subnetworks/other-central" is not valid for Network "vpc".',
    )  # fmt: skip
    status, reason, message = refused([{"network": "not/a/network/url"}])
    assert (status, reason) == (400, "invalid") and "'resource.networkInterfaces[0].network'" in message

    # Access configs: at most one, ONE_TO_ONE_NAT, an external natIP.
    assert refused([{"accessConfigs": [{}, {}]}]) == (
        400, "invalid", "Invalid value for field 'resource.networkInterfaces[0].accessConfigs': ''. At most one access config currently supported.",
    )  # fmt: skip
    status, reason, message = refused([{"accessConfigs": [{"type": "DIRECT_IPV6"}]}])
    assert (status, reason) == (400, "invalid") and "'resource.networkInterfaces[0].accessConfigs[0].type': 'DIRECT_IPV6'" in message
    assert refused([{"accessConfigs": [{"natIP": "10.0.0.9"}]}]) == (
        400, "invalid",
        "Invalid value for field 'resource.networkInterfaces[0].accessConfigs[0].natIP': '10.0.0.9'. "
        "The specified external IP address '10.0.0.9' was not found in region 'us-central1'.",
    )  # fmt: skip
    assert refused([{"networkIP": "192.168.10.5", "subnetwork": "regions/us-central1/subnetworks/other-central"}])[:2] == (400, "invalid")
    assert refused([{"networkIP": "10.200.0.5"}])[:2] == (400, "invalid")

    # bulkInsert checks the same (field paths under instanceProperties), at once.
    properties = instance_body("unused")
    properties.pop("name")
    properties["machineType"] = "e2-small"  # bulkInsert takes a bare name
    properties["networkInterfaces"] = [{"network": "global/networks/missing"}]
    body = {"count": 2, "namePattern": "bulk-#", "instanceProperties": properties}
    status, reason, message = refusal(lambda: compute.instances().bulkInsert(project=project, zone=ZONE, body=body).execute())
    assert (status, reason) == (400, "invalid")
    assert message.startswith("Invalid value for field 'bulkInsertInstanceResource.instanceProperties.networkInterfaces[0].network'")
    assert compute.instances().list(project=project, zone=ZONE).execute().get("items", []) == []


def test_networks_and_subnets_in_use_cannot_be_deleted(compute):
    project = "net-delete"
    custom_network(compute, project, "vpc", [("vpc-a", REGION, "192.168.1.0/24")])
    insert_vm(compute, project, "user", [{"subnetwork": "regions/us-central1/subnetworks/vpc-a"}])
    user = f"projects/{project}/zones/{ZONE}/instances/user"

    assert refusal(lambda: compute.subnetworks().delete(project=project, region=REGION, subnetwork="vpc-a").execute()) == (
        400, "resourceInUseByAnotherResource",
        f"The subnetwork resource 'projects/{project}/regions/{REGION}/subnetworks/vpc-a' is already being used by '{user}'",
    )  # fmt: skip
    failed = compute.networks().delete(project=project, network="vpc").execute()
    assert failed["status"] == "DONE" and failed["httpErrorStatusCode"] == 400
    in_use = f"The network resource 'projects/{project}/global/networks/vpc' is already being used by '{user}'"
    assert failed["error"]["errors"] == [{"code": "RESOURCE_IN_USE_BY_ANOTHER_RESOURCE", "message": in_use}]
    assert refusal(lambda: compute.subnetworks().delete(project=project, region=REGION, subnetwork="default").execute()) == (
        400, "invalidResourceUsage", "Invalid resource usage: 'Cannot delete auto subnetwork from an auto subnet mode network.'.",
    )  # fmt: skip

    wait_operation(compute, project, ZONE, compute.instances().delete(project=project, zone=ZONE, instance="user").execute())
    # A custom network's own subnets must go first.
    failed = compute.networks().delete(project=project, network="vpc").execute()
    assert failed["error"]["errors"][0]["message"] == (
        f"The network resource 'projects/{project}/global/networks/vpc' is already being used by 'projects/{project}/regions/{REGION}/subnetworks/vpc-a'"
    )
    operation = compute.subnetworks().delete(project=project, region=REGION, subnetwork="vpc-a").execute()
    assert (operation["operationType"], operation["status"]) == ("delete", "DONE") and "error" not in operation
    assert "error" not in compute.networks().delete(project=project, network="vpc").execute()
    # An auto network's subnets go with it.
    assert "error" not in compute.networks().delete(project=project, network="default").execute()
    assert compute.networks().list(project=project).execute()["items"] == []
    assert refusal(lambda: compute.subnetworks().get(project=project, region=REGION, subnetwork="default").execute())[0] == 404
    # Without the default network, an interface that names none refers to it, and it is missing.
    status, reason, message = refusal(lambda: insert_vm(compute, project, "homeless", [{}], wait=False))
    assert (status, reason) == (400, "invalid") and message.endswith("The referenced network resource cannot be found.")


def test_a_subnet_out_of_addresses_fails_the_operation(compute):
    project = "net-small"
    # A /29 has 4 addresses for VMs: GCE keeps the first two and the last two.
    custom_network(compute, project, "tiny", [("tiny-a", REGION, "192.168.2.0/29")])
    properties = instance_body("unused", startup_script="sleep 1000")
    properties.pop("name")
    properties["machineType"] = "e2-small"  # bulkInsert takes a bare name
    properties["networkInterfaces"] = [{"subnetwork": f"regions/{REGION}/subnetworks/tiny-a"}]
    body = {"count": 5, "minCount": 5, "namePattern": "tiny-#", "instanceProperties": properties}
    failed = wait_operation(compute, project, ZONE, compute.instances().bulkInsert(project=project, zone=ZONE, body=body).execute())
    assert [error["code"] for error in failed["error"]["errors"]] == ["IP_SPACE_EXHAUSTED"]
    assert failed["error"]["errors"][0]["message"] == f"IP space of 'projects/{project}/regions/{REGION}/subnetworks/tiny-a' is exhausted."
    body["minCount"] = 1
    done = wait_operation(compute, project, ZONE, compute.instances().bulkInsert(project=project, zone=ZONE, body=body).execute())
    assert "error" not in done
    addresses = sorted(vm["networkInterfaces"][0]["networkIP"] for vm in compute.instances().list(project=project, zone=ZONE).execute()["items"])
    assert addresses == ["192.168.2.2", "192.168.2.3", "192.168.2.4", "192.168.2.5"]


def test_without_a_default_network_projects_start_with_none(start_compute_emulator):
    with start_compute_emulator("--no-default-network") as emulator:
        compute = compute_client(emulator.base_url)
        project = "net-bare"
        assert compute.networks().list(project=project).execute()["items"] == []
        status, reason, message = refusal(lambda: insert_vm(compute, project, "nowhere", [{"network": "global/networks/default"}], wait=False))
        assert (status, reason) == (400, "invalid")
        assert message == (
            "Invalid value for field 'resource.networkInterfaces[0].network': 'global/networks/default'. The referenced network resource cannot be found."
        )
        custom_network(compute, project, "own", [("own-a", REGION, "10.1.0.0/24")])
        assert "error" not in insert_vm(compute, project, "somewhere", [{"subnetwork": f"regions/{REGION}/subnetworks/own-a"}], wait=True)


def test_network_resources_fit_the_discovery_schemas(compute):
    with open(DISCOVERY) as handle:
        schemas = json.load(handle)["schemas"]
    project = "net-schema"

    def fits(value, schema):
        check(value, {"$ref": schema}, schemas, schema)

    def fits_scoped_operation(value):
        # REQUIRED["Operation"] is for zonal operations (it wants a zone); these are global or regional.
        assert "zone" not in value
        check(value, schemas["Operation"], schemas, "Operation")

    fits(compute.networks().get(project=project, network="default").execute(), "Network")
    fits(compute.networks().list(project=project).execute(), "NetworkList")
    fits(compute.subnetworks().get(project=project, region=REGION, subnetwork="default").execute(), "Subnetwork")
    fits(compute.subnetworks().list(project=project, region=REGION).execute(), "SubnetworkList")
    fits(compute.subnetworks().aggregatedList(project=project).execute(), "SubnetworkAggregatedList")
    operation = compute.networks().insert(project=project, body={"name": "custom", "autoCreateSubnetworks": False}).execute()
    fits_scoped_operation(operation)
    body = {"name": "custom-a", "network": "global/networks/custom", "ipCidrRange": "10.9.0.0/24"}
    fits_scoped_operation(compute.subnetworks().insert(project=project, region=REGION, body=body).execute())
    regional = compute.regionOperations().list(project=project, region=REGION).execute()
    assert set(regional) <= set(schemas["OperationList"]["properties"]) and regional["kind"] == "compute#operationList"
    for operation in regional["items"]:
        fits_scoped_operation(operation)
    fits_scoped_operation(compute.networks().delete(project=project, network="custom").execute())
    vm = instance_body("schema-vm", startup_script="sleep 1000")
    vm["networkInterfaces"] = [{"subnetwork": f"regions/{REGION}/subnetworks/custom-a", "accessConfigs": [{"natIP": "35.9.9.9"}]}]
    wait_operation(compute, project, ZONE, compute.instances().insert(project=project, zone=ZONE, body=vm).execute())
    fits(compute.instances().get(project=project, zone=ZONE, instance="schema-vm").execute(), "Instance")
