"""The official GAPIC client, google-cloud-compute (REST transport), unchanged against the Compute emulator.

Built as its users build it: ``ClientOptions(api_endpoint="http://H:P")``
and anonymous credentials (or a bearer token for an emulator started with
``--auth-token-file``). One thing a user must know: an operation's
``.result()`` polls through an operations client the library builds
without the caller's ``client_options`` (so it asks compute.googleapis.com);
against the emulator, wait with a ``ZoneOperationsClient`` built with the
same options, as these tests do.
"""

import pytest

compute_v1 = pytest.importorskip("google.cloud.compute_v1", reason="google-cloud-compute is not installed; pip install -e '.[test]'")

from google.api_core import exceptions  # noqa: E402
from google.api_core.client_options import ClientOptions  # noqa: E402
from google.auth.credentials import AnonymousCredentials  # noqa: E402

PROJECT = "gapic-project"
ZONE = "us-east1-b"
DEBIAN = "projects/debian-cloud/global/images/family/debian-12"


class Gapic:
    """The google-cloud-compute clients of one emulator."""

    def __init__(self, base_url, credentials=None):
        options = ClientOptions(api_endpoint=base_url.split("/compute/v1/")[0])
        arguments = {"credentials": credentials or AnonymousCredentials(), "client_options": options, "transport": "rest"}
        self.instances = compute_v1.InstancesClient(**arguments)
        self.zone_operations = compute_v1.ZoneOperationsClient(**arguments)
        self.global_operations = compute_v1.GlobalOperationsClient(**arguments)
        self.images = compute_v1.ImagesClient(**arguments)
        self.image_family_views = compute_v1.ImageFamilyViewsClient(**arguments)
        self.disks = compute_v1.DisksClient(**arguments)
        self.disk_types = compute_v1.DiskTypesClient(**arguments)
        self.machine_types = compute_v1.MachineTypesClient(**arguments)
        self.zones = compute_v1.ZonesClient(**arguments)
        self.projects = compute_v1.ProjectsClient(**arguments)

    def wait(self, operation, zone=ZONE):
        """zoneOperations.wait until DONE; returns the operation (raises if it failed)."""
        for _ in range(10):
            done = self.zone_operations.wait(project=PROJECT, zone=zone, operation=operation.name)
            if done.status == compute_v1.Operation.Status.DONE:
                assert not done.error.errors, done.error
                return done
        raise AssertionError(f"operation {operation.name} not DONE")


@pytest.fixture(scope="module")
def gapic(compute_emulator):
    return Gapic(compute_emulator.base_url)


def boot_disk():
    params = compute_v1.AttachedDiskInitializeParams(source_image=DEBIAN)
    return compute_v1.AttachedDisk(boot=True, auto_delete=True, initialize_params=params)


def new_instance(name, **fields):
    return compute_v1.Instance(
        name=name, machine_type=f"zones/{ZONE}/machineTypes/e2-small", disks=[boot_disk()],
        network_interfaces=[compute_v1.NetworkInterface(network="global/networks/default")], **fields,
    )  # fmt: skip


def names(pager):
    return sorted(item.name for item in pager)


def test_catalog_and_project(gapic):
    assert gapic.zones.get(project=PROJECT, zone=ZONE).status == "UP"
    assert "e2-small" in names(gapic.machine_types.list(project=PROJECT, zone=ZONE))
    assert gapic.machine_types.get(project=PROJECT, zone=ZONE, machine_type="n2-custom-4-8192").guest_cpus == 4
    assert gapic.disk_types.get(project=PROJECT, zone=ZONE, disk_type="pd-balanced").default_disk_size_gb == 100
    family = gapic.images.get_from_family(project="debian-cloud", family="debian-12")
    assert gapic.image_family_views.get(project="debian-cloud", zone=ZONE, family="debian-12").image.name == family.name
    project = gapic.projects.get(project=PROJECT)
    assert project.name == PROJECT and project.default_network_tier == "PREMIUM"
    assert {"CPUS_ALL_REGIONS", "IMAGES"} <= {quota.metric for quota in project.quotas}


def test_instance_lifecycle_labels_metadata_and_filters(gapic):
    gapic.wait(gapic.instances.insert(project=PROJECT, zone=ZONE, instance_resource=new_instance("gapic-1", labels={"app": "x"})))
    vm = gapic.instances.get(project=PROJECT, zone=ZONE, instance="gapic-1")
    assert vm.status == "RUNNING" and vm.labels == {"app": "x"}

    labels = compute_v1.InstancesSetLabelsRequest(labels={"app": "y"}, label_fingerprint=vm.label_fingerprint)
    gapic.wait(gapic.instances.set_labels(project=PROJECT, zone=ZONE, instance="gapic-1", instances_set_labels_request_resource=labels))
    metadata = compute_v1.Metadata(items=[compute_v1.Items(key="k", value="v")], fingerprint=vm.metadata.fingerprint)
    gapic.wait(gapic.instances.set_metadata(project=PROJECT, zone=ZONE, instance="gapic-1", metadata_resource=metadata))
    vm = gapic.instances.get(project=PROJECT, zone=ZONE, instance="gapic-1")
    assert vm.labels == {"app": "y"} and [(item.key, item.value) for item in vm.metadata.items] == [("k", "v")]
    with pytest.raises(exceptions.PreconditionFailed):  # the fingerprint used above is stale now
        gapic.instances.set_labels(project=PROJECT, zone=ZONE, instance="gapic-1", instances_set_labels_request_resource=labels)

    listed = gapic.instances.list(request=compute_v1.ListInstancesRequest(project=PROJECT, zone=ZONE, filter='name eq ".*\\bgapic\\-1\\b.*"'))
    assert names(listed) == ["gapic-1"]
    aggregated = gapic.instances.aggregated_list(request=compute_v1.AggregatedListInstancesRequest(project=PROJECT, filter="labels.app = y"))
    assert [(scope, names(scoped.instances)) for scope, scoped in aggregated if scoped.instances] == [(f"zones/{ZONE}", ["gapic-1"])]

    gapic.wait(gapic.instances.stop(project=PROJECT, zone=ZONE, instance="gapic-1"))
    assert gapic.instances.get(project=PROJECT, zone=ZONE, instance="gapic-1").status == "TERMINATED"
    spot = compute_v1.Scheduling(provisioning_model="SPOT", instance_termination_action="DELETE")
    gapic.wait(gapic.instances.set_scheduling(project=PROJECT, zone=ZONE, instance="gapic-1", scheduling_resource=spot))
    gapic.wait(gapic.instances.start(project=PROJECT, zone=ZONE, instance="gapic-1"))
    gapic.wait(gapic.instances.reset(project=PROJECT, zone=ZONE, instance="gapic-1"))
    vm = gapic.instances.get(project=PROJECT, zone=ZONE, instance="gapic-1")
    assert vm.status == "RUNNING" and vm.scheduling.provisioning_model == "SPOT" and vm.scheduling.instance_termination_action == "DELETE"
    serial = gapic.instances.get_serial_port_output(
        request=compute_v1.GetSerialPortOutputInstanceRequest(project=PROJECT, zone=ZONE, instance="gapic-1", start=0, port=1)
    )
    assert serial.start == 0 and serial.next_ == len(serial.contents.encode())

    gapic.wait(gapic.instances.delete(project=PROJECT, zone=ZONE, instance="gapic-1"))
    with pytest.raises(exceptions.NotFound):
        gapic.instances.get(project=PROJECT, zone=ZONE, instance="gapic-1")


def test_bulk_insert_operation_group_and_aggregated_operations(gapic):
    properties = compute_v1.InstanceProperties(machine_type="e2-micro", disks=[boot_disk()])
    request = compute_v1.BulkInsertInstanceResource(count=2, name_pattern="gapic-bulk-#", instance_properties=properties)
    done = gapic.wait(gapic.instances.bulk_insert(project=PROJECT, zone=ZONE, bulk_insert_instance_resource_resource=request))
    assert done.operation_type == "bulkInsert" and done.operation_group_id

    grouped = gapic.zone_operations.list(
        request=compute_v1.ListZoneOperationsRequest(project=PROJECT, zone=ZONE, filter=f'operationGroupId eq "{done.operation_group_id}"')
    )
    by_type = sorted((operation.operation_type, operation.target_link.rsplit("/", 1)[-1]) for operation in grouped)
    assert by_type == [("bulkInsert", ZONE), ("insert", "gapic-bulk-1"), ("insert", "gapic-bulk-2")]

    scopes = {scope: len(scoped.operations) for scope, scoped in gapic.global_operations.aggregated_list(project=PROJECT) if scoped.operations}
    assert scopes[f"zones/{ZONE}"] >= 3
    disks = {disk.name: disk for disk in gapic.disks.list(project=PROJECT, zone=ZONE)}
    assert {"gapic-bulk-1", "gapic-bulk-2"} <= disks.keys() and disks["gapic-bulk-1"].users[0].endswith("/instances/gapic-bulk-1")
    for name in ("gapic-bulk-1", "gapic-bulk-2"):
        gapic.wait(gapic.instances.delete(project=PROJECT, zone=ZONE, instance=name))


def test_the_token_is_required_when_the_emulator_has_one(start_compute_emulator, tmp_path):
    from google.auth.exceptions import InvalidOperation

    from cflow.gcp.clients import EmulatorToken

    token_file = tmp_path / "token"
    token_file.write_text("gapic-token\n")
    with start_compute_emulator("--auth-token-file", token_file) as emulator:
        # The emulator answers 401; the library then tries to refresh anonymous credentials, which it cannot.
        with pytest.raises(InvalidOperation):
            Gapic(emulator.base_url).instances.insert(project=PROJECT, zone=ZONE, instance_resource=new_instance("nobody-1"))
        with pytest.raises(exceptions.Unauthorized) as wrong:
            Gapic(emulator.base_url, EmulatorToken("not-the-token")).zones.get(project=PROJECT, zone=ZONE)
        assert "invalid authentication credentials" in str(wrong.value)

        allowed = Gapic(emulator.base_url, EmulatorToken("gapic-token"))
        assert names(allowed.instances.list(project=PROJECT, zone=ZONE)) == []  # the refused insert created nothing
        allowed.wait(allowed.instances.insert(project=PROJECT, zone=ZONE, instance_resource=new_instance("allowed-1")))
        assert allowed.instances.get(project=PROJECT, zone=ZONE, instance="allowed-1").status == "RUNNING"
