"""The preflight through the real Compute seam, against the Compute emulator's networks, subnetworks and regional quotas."""

import pytest
from google.auth.credentials import AnonymousCredentials

from cflow import fleet
from cflow.config import load_config
from cflow.gcp.clients import build_compute
from cflow.gcp.compute import Compute
from cflow.local import LOCAL_PROJECT
from cflow.preflight import Preflight, PreflightFailed
from tests.helpers import wait_until

pytestmark = pytest.mark.stack


@pytest.fixture
def make(tmp_path):
    def make(**settings):
        settings = {"TASK_MODULE_CMD": "echo", "TASKS": ["a"], "VM_FALLBACK_ZONES": [], **settings}
        (tmp_path / "const.py").write_text("".join(f"{name} = {value!r}\n" for name, value in settings.items()))
        config = load_config(tmp_path / "const.py")
        return config, fleet.worker_instance_properties(config, "run-1", "gs://b/p", "#!/bin/bash\n")

    return make


def seam(emulator):
    return Compute(build_compute(AnonymousCredentials(), emulator.base_url), LOCAL_PROJECT)


def wait_global(compute, operation):
    wait_until(lambda: compute.service.globalOperations().get(project=LOCAL_PROJECT, operation=operation["name"]).execute()
               .get("status") == "DONE", 30, "the operation")


def wait_regional(compute, region, operation):
    wait_until(lambda: compute.service.regionOperations().get(project=LOCAL_PROJECT, region=region, operation=operation["name"]).execute()
               .get("status") == "DONE", 30, "the operation")


def test_the_default_project_passes_with_the_quotas_regions_get_reports(make, start_compute_emulator):
    with start_compute_emulator() as emulator:
        config, properties = make(WORKER_NODE_CNT=3)
        result = Preflight(config, seam(emulator)).check(properties, 3)
    assert result.unchecked == [] and result.warnings == []
    assert result.max_workers is not None and result.max_workers >= 3
    assert any(line.startswith("network: default, its own subnetwork in us-central1") for line in result.checked)


def test_networks_and_subnetworks_as_the_emulator_has_them(make, start_compute_emulator):
    with start_compute_emulator("--no-default-network") as emulator:
        compute = seam(emulator)
        config, properties = make()
        with pytest.raises(PreflightFailed, match=r"^VM_NETWORK: network 'default' does not exist in project cflow-local"):
            Preflight(config, compute).check(properties, 1)

        wait_global(compute, compute.service.networks().insert(
            project=LOCAL_PROJECT, body={"name": "custom", "autoCreateSubnetworks": False}).execute())
        config, properties = make(VM_NETWORK="custom")
        with pytest.raises(PreflightFailed, match=r"^VM_SUBNETWORK: network 'custom' is a custom-mode network"):
            Preflight(config, compute).check(properties, 1)

        config, properties = make(VM_NETWORK="custom", VM_SUBNETWORK="sub-a", VM_EXTERNAL_IP=False)
        with pytest.raises(PreflightFailed, match=r"^VM_SUBNETWORK: subnetwork 'sub-a' does not exist in region us-central1"):
            Preflight(config, compute).check(properties, 1)

        wait_regional(compute, "us-central1", compute.service.subnetworks().insert(project=LOCAL_PROJECT, region="us-central1", body={
            "name": "sub-a", "network": f"projects/{LOCAL_PROJECT}/global/networks/custom", "ipCidrRange": "10.10.0.0/20",
            "privateIpGoogleAccess": True}).execute())
        result = Preflight(config, compute).check(properties, 1)
    assert "network: custom, subnetwork sub-a in us-central1 (with Private Google Access)" in result.checked
    assert result.warnings == []


def test_regional_quotas_say_how_many_workers_fit(make, start_compute_emulator):
    with start_compute_emulator("--quota", "us-central1:CPUS=5", "--quota", "IN_USE_ADDRESSES=0") as emulator:
        compute = seam(emulator)
        config, properties = make(VM_SPOT=False, VM_TYPE="e2-standard-2", VM_EXTERNAL_IP=False, WORKER_NODE_CNT=4)
        result = Preflight(config, compute).check(properties, 4)
        assert result.max_workers == 2
        assert result.warnings[0].startswith("quota: 2 of 4 workers fit (CPUS in us-central1: limit 5, 0 in use, 2 per worker)")

        config, properties = make(VM_SPOT=False, VM_TYPE="e2-standard-2", WORKER_NODE_CNT=4)
        with pytest.raises(PreflightFailed, match=r"^quota: no worker fits \(IN_USE_ADDRESSES in us-central1: limit 0, 0 in use, 1 per worker\)"):
            Preflight(config, compute).check(properties, 4)
