"""The preflight against a fake project: every refusal is one line naming the setting; quotas say how many workers fit."""

import pytest

from cflow import fleet
from cflow.config import load_config
from cflow.errors import ConfigError, PermissionDenied
from cflow.gcp.compute import Vm
from cflow.preflight import Preflight, PreflightFailed, cpu_metric, gpu_metric
from tests.fakes import FakeProjectCompute


class Accounts:
    def __init__(self, known=(), readable=True):
        self.known = set(known)
        self.readable = readable

    def exists(self, email):
        return (email in self.known) if self.readable else None


@pytest.fixture
def make(tmp_path):
    def make(**settings):
        settings = {"TARGET": "gcp", "PROJECT_NAME": "proj-123", "TASK_MODULE_CMD": "echo", "TASKS": ["a"],
                    "VM_TYPE": "e2-standard-2", **settings}
        (tmp_path / "const.py").write_text("".join(f"{name} = {value!r}\n" for name, value in settings.items()))
        (tmp_path / "init.sh").write_text("#!/bin/bash\n")
        config = load_config(tmp_path / "const.py")
        properties = fleet.worker_instance_properties(config, "run-1", "gs://b/p", "#!/bin/bash\n")
        return config, properties

    return make


def check(config, properties, compute, wanted=5, accounts=None, own_vms=()):
    return Preflight(config, compute, accounts).check(properties, wanted, list(own_vms))


def test_a_project_as_cflow_expects_passes_with_no_limit_seen(make):
    config, properties = make()
    result = check(config, properties, FakeProjectCompute("proj-123"))
    assert result.max_workers is None and result.warnings == [] and result.unchecked == []
    assert any(line.startswith("network: default") for line in result.checked)


def test_a_missing_network_is_one_line_naming_vm_network_with_the_gcloud_fix(make):
    config, properties = make(VM_NETWORK="foo")
    with pytest.raises(PreflightFailed) as caught:
        check(config, properties, FakeProjectCompute("proj-123"))
    assert str(caught.value) == ("VM_NETWORK: network 'foo' does not exist in project proj-123; create it "
                                 "(gcloud compute networks create foo --subnet-mode=auto) or set VM_NETWORK in const.py")
    assert caught.value.exit_status == 2


def test_a_shared_vpc_network_is_read_in_its_host_project(make):
    config, properties = make(VM_NETWORK="projects/host-proj/global/networks/shared")
    compute = FakeProjectCompute("proj-123")
    compute.networks[("host-proj", "shared")] = {"name": "shared", "autoCreateSubnetworks": True,
                                                 "subnetworks": ["projects/host-proj/regions/us-central1/subnetworks/shared"]}
    check(config, properties, compute)
    assert ("network", "host-proj", "shared") in compute.calls
    assert properties["networkInterfaces"][0]["network"] == "projects/host-proj/global/networks/shared"


def test_a_custom_mode_network_needs_vm_subnetwork(make):
    config, properties = make(VM_NETWORK="custom")
    compute = FakeProjectCompute("proj-123")
    compute.networks[("proj-123", "custom")] = {"name": "custom", "autoCreateSubnetworks": False, "subnetworks": []}
    with pytest.raises(PreflightFailed, match=r"^VM_SUBNETWORK: network 'custom' is a custom-mode network"):
        check(config, properties, compute)


def test_a_subnetwork_must_exist_in_the_zones_region_and_belong_to_the_network(make):
    config, properties = make(VM_NETWORK="custom", VM_SUBNETWORK="sub-a")
    compute = FakeProjectCompute("proj-123")
    compute.networks[("proj-123", "custom")] = {"name": "custom", "autoCreateSubnetworks": False}
    with pytest.raises(PreflightFailed, match=r"^VM_SUBNETWORK: subnetwork 'sub-a' does not exist in region us-central1 of project proj-123"):
        check(config, properties, compute)
    compute.subnetworks[("proj-123", "us-central1", "sub-a")] = {"name": "sub-a", "network": "projects/proj-123/global/networks/other"}
    with pytest.raises(PreflightFailed, match="belongs to network 'other', not to VM_NETWORK 'custom'"):
        check(config, properties, compute)
    compute.subnetworks[("proj-123", "us-central1", "sub-a")] = {"name": "sub-a", "network": "projects/proj-123/global/networks/custom",
                                                                "privateIpGoogleAccess": True}
    result = check(config, properties, compute)
    assert "network: custom, subnetwork sub-a in us-central1 (with Private Google Access)" in result.checked
    assert properties["networkInterfaces"][0]["subnetwork"] == "regions/us-central1/subnetworks/sub-a"


def test_no_external_ip_on_a_subnetwork_without_private_google_access_is_a_warning_with_the_command(make):
    config, properties = make(VM_SUBNETWORK="sub-a", VM_EXTERNAL_IP=False)
    compute = FakeProjectCompute("proj-123")
    compute.subnetworks[("proj-123", "us-central1", "sub-a")] = {"name": "sub-a", "network": "global/networks/default"}
    result = check(config, properties, compute)
    assert len(result.warnings) == 1
    assert "gcloud compute networks subnets update sub-a --region us-central1 --enable-private-ip-google-access" in result.warnings[0]
    assert "accessConfigs" not in properties["networkInterfaces"][0]


def test_a_missing_image_names_the_setting_that_chose_it(make):
    config, properties = make(VM_BOOT="image", VM_IMAGE_NAME="family/mine")
    with pytest.raises(PreflightFailed, match=r"^VM_IMAGE_NAME: image projects/proj-123/global/images/family/mine does not exist; build one"):
        check(config, properties, FakeProjectCompute("proj-123"))
    config, properties = make(VM_STOCK_IMAGE="projects/debian-cloud/global/images/family/debian-99")
    with pytest.raises(PreflightFailed, match=r"^VM_STOCK_IMAGE: image .*debian-99 does not exist"):
        check(config, properties, FakeProjectCompute("proj-123"))


def test_an_unknown_zone_is_refused_before_anything_else(make):
    config, properties = make(VM_ZONE="us-central1-z", VM_FALLBACK_ZONES=[])
    compute = FakeProjectCompute("proj-123")
    with pytest.raises(ConfigError, match="zone us-central1-z does not exist in project proj-123"):
        check(config, properties, compute)
    assert compute.calls == []


def test_the_service_account_is_checked_where_iam_can_be_read(make):
    config, properties = make(VM_COMPUTE_SERVICE_ACCOUNT="gone@proj-123.iam.gserviceaccount.com")
    compute = FakeProjectCompute("proj-123")
    with pytest.raises(PreflightFailed, match=r"^VM_COMPUTE_SERVICE_ACCOUNT: service account gone@proj-123\.iam\.gserviceaccount\.com does not exist"):
        check(config, properties, compute, accounts=Accounts())
    result = check(config, properties, compute, accounts=Accounts(readable=False))
    assert result.unchecked == ["service account gone@proj-123.iam.gserviceaccount.com: IAM cannot be read here"]
    config, properties = make()  # "default": the project's default account
    assert "service account: 123-compute@developer.gserviceaccount.com" in check(
        config, properties, compute, accounts=Accounts({"123-compute@developer.gserviceaccount.com"})).checked


def test_reads_the_controller_may_not_make_are_left_unchecked_not_failed(make):
    config, properties = make()
    compute = FakeProjectCompute("proj-123")

    def forbidden(name, project=None):
        raise PermissionDenied("permission denied", status=403, reason="forbidden", message="Required 'compute.networks.get' permission")

    compute.network = forbidden
    result = check(config, properties, compute)
    assert result.unchecked == ["network: not readable with these credentials (Required 'compute.networks.get' permission)"]


# -- quotas ---------------------------------------------------------------------


def test_no_worker_fitting_the_quota_is_one_line_with_metric_region_limit_and_fix(make):
    config, properties = make(VM_SPOT=False, VM_FALLBACK_ZONES=[])
    compute = FakeProjectCompute("proj-123")
    compute.set_quota("us-central1", "CPUS", 8, usage=7)
    with pytest.raises(PreflightFailed) as caught:
        check(config, properties, compute)
    assert str(caught.value) == (
        "quota: no worker fits (CPUS in us-central1: limit 8, 7 in use, 2 per worker); ask for more at "
        "https://console.cloud.google.com/iam-admin/quotas?project=proj-123, or lower WORKER_NODE_CNT or pick a smaller VM_TYPE")


def test_fewer_workers_fitting_is_a_warning_and_the_run_goes_on_with_that_many(make):
    config, properties = make(WORKER_NODE_CNT=6, VM_FALLBACK_ZONES=[])
    compute = FakeProjectCompute("proj-123")
    compute.set_quota("us-central1", "IN_USE_ADDRESSES", 2)
    compute.set_quota("us-central1", "CPUS", 100)
    result = check(config, properties, compute, wanted=6)
    assert result.max_workers == 2
    assert result.warnings == [
        "quota: 2 of 6 workers fit (IN_USE_ADDRESSES in us-central1: limit 2, 0 in use, 1 per worker); the run goes on with 2; "
        "ask for more at https://console.cloud.google.com/iam-admin/quotas?project=proj-123, or set VM_EXTERNAL_IP = False"]


def test_without_external_ips_the_address_quota_does_not_count(make):
    config, properties = make(VM_EXTERNAL_IP=False, VM_FALLBACK_ZONES=[])
    compute = FakeProjectCompute("proj-123")
    compute.set_quota("us-central1", "IN_USE_ADDRESSES", 0)
    assert check(config, properties, compute).max_workers is None


def test_spot_workers_count_in_preemptible_cpus_when_the_region_has_that_quota(make):
    config, properties = make(VM_SPOT=True, VM_FALLBACK_ZONES=[], VM_TYPE="e2-standard-4")
    compute = FakeProjectCompute("proj-123")
    compute.set_quota("us-central1", "CPUS", 4)
    compute.set_quota("us-central1", "PREEMPTIBLE_CPUS", 16)
    assert check(config, properties, compute).max_workers == 4
    config, properties = make(VM_SPOT=False, VM_FALLBACK_ZONES=[], VM_TYPE="e2-standard-4")
    assert check(config, properties, compute).max_workers == 1


def test_the_cpu_metric_follows_gce(make):
    quotas = {"CPUS": None, "N2_CPUS": None, "PREEMPTIBLE_CPUS": type("Q", (), {"limit": 0.0})()}
    assert cpu_metric("n2-standard-4", False, quotas) == "N2_CPUS"
    assert cpu_metric("e2-standard-4", False, quotas) == "CPUS"
    # No preemptible quota granted (limit 0): Spot VMs count in the standard metric, as GCE documents.
    assert cpu_metric("e2-standard-4", True, quotas) == "CPUS"
    quotas["PREEMPTIBLE_CPUS"].limit = 8.0
    assert cpu_metric("n2-standard-4", True, quotas) == "PREEMPTIBLE_CPUS"


def test_gpu_metrics_are_named_as_gce_names_them():
    assert gpu_metric("zones/us-central1-a/acceleratorTypes/nvidia-tesla-t4", False) == "NVIDIA_T4_GPUS"
    assert gpu_metric("nvidia-l4", True) == "PREEMPTIBLE_NVIDIA_L4_GPUS"
    assert gpu_metric("nvidia-a100-80gb", False) == "NVIDIA_A100_80GB_GPUS"


def test_gpus_asked_for_count_in_their_regional_and_project_quotas(make):
    config, properties = make(VM_SPOT=False, VM_FALLBACK_ZONES=[])
    properties["guestAccelerators"] = [{"acceleratorType": "nvidia-tesla-t4", "acceleratorCount": 2}]
    compute = FakeProjectCompute("proj-123")
    compute.set_quota("us-central1", "NVIDIA_T4_GPUS", 8)
    compute.global_quotas = {"GPUS_ALL_REGIONS": compute.Quota("GPUS_ALL_REGIONS", 4.0, 0.0)}
    result = check(config, properties, compute)
    assert result.max_workers == 2
    assert "GPUS_ALL_REGIONS in the project: limit 4" in result.warnings[0]


def test_workers_fit_in_every_region_of_the_zones_together(make):
    config, properties = make(VM_SPOT=False, VM_ZONE="us-central1-a", VM_FALLBACK_ZONES=["us-east1-b"])
    compute = FakeProjectCompute("proj-123")
    compute.set_quota("us-central1", "CPUS", 4)
    compute.set_quota("us-east1", "CPUS", 6)
    assert check(config, properties, compute).max_workers == 5


def test_a_resumed_runs_own_workers_already_count_in_the_usage(make):
    config, properties = make(VM_SPOT=False, VM_FALLBACK_ZONES=[])
    compute = FakeProjectCompute("proj-123")
    compute.set_quota("us-central1", "CPUS", 8, usage=8)
    own = [Vm(f"w-{n}", "us-central1-a", "RUNNING", "") for n in range(4)] + [Vm("w-9", "us-central1-a", "TERMINATED", "")]
    assert check(config, properties, compute, own_vms=own).max_workers == 4


def test_a_machine_type_the_zone_does_not_offer_names_vm_type(make):
    config, properties = make(VM_TYPE="z9-huge-512")
    with pytest.raises(PreflightFailed, match=r"^VM_TYPE: machine type z9-huge-512 is not offered in zone us-central1-a"):
        check(config, properties, FakeProjectCompute("proj-123"))


def test_a_read_the_service_does_not_serve_is_left_unchecked_not_taken_as_absence(make):
    from cflow.errors import NotFound

    config, properties = make()
    compute = FakeProjectCompute("proj-123")

    def unserved(name, project=None):
        raise NotFound("Compute Engine refused a request: The requested URL was not found on this server.", status=404,
                       message="The requested URL was not found on this server.")

    compute.network = unserved
    result = check(config, properties, compute)
    assert result.unchecked == ["network: Compute Engine does not answer this read here (The requested URL was not found on this server.)"]
