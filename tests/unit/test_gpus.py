"""GPUs (VM_GPU_TYPE, VM_GPU_COUNT): settings, the body, the preflight's zones and quotas, prices, the driver script, the image build."""

import io
import os
import subprocess

import pytest

from cflow import fleet, gpus
from cflow.config import load_config
from cflow.errors import CloudError, ConfigError
from cflow.gcp.compute import Quota
from cflow.image import REBOOT_NOTICE, BuildRequest, ImageBuilder, ImageBuildError, build_script
from cflow.preflight import Preflight, PreflightFailed
from cflow.run import cost_range, dry_run
from cflow.worker.context import WorkerSettings
from tests.fakes import FakeProjectCompute, ScriptedCompute

T4 = "nvidia-tesla-t4"


@pytest.fixture
def make(tmp_path):
    """``make(**settings)`` -> (Config, the workers' bulkInsert instanceProperties)."""

    def make(**settings):
        settings = {"TARGET": "gcp", "PROJECT_NAME": "proj-123", "TASK_MODULE_CMD": "echo", "TASKS": ["a", "b", "c"],
                    "VM_TYPE": "n1-standard-4", **settings}
        (tmp_path / "const.py").write_text("".join(f"{name} = {value!r}\n" for name, value in settings.items()))
        (tmp_path / "init.sh").write_text("#!/bin/bash\n")
        config = load_config(tmp_path / "const.py")
        return config, fleet.worker_instance_properties(config, "run-1", "gs://b/p", "#!/bin/bash\n")

    return make


def config_error(make, **settings):
    with pytest.raises(ConfigError) as caught:
        make(**settings)
    assert "\n" not in str(caught.value)
    return str(caught.value)


# ---------------------------------------------------------------- settings


def test_no_gpu_by_default(make):
    config, properties = make()
    assert (config.vm_gpu_type, config.vm_gpu_count) == (None, 1)
    assert "guestAccelerators" not in properties
    assert gpus.GPU_COUNT_ATTRIBUTE not in {item["key"] for item in properties["metadata"]["items"]}


@pytest.mark.parametrize("value", ["NVIDIA T4", 4, "t4/", ""])
def test_a_gpu_type_that_is_no_accelerator_name_is_one_line_naming_vm_gpu_type(make, value):
    message = config_error(make, VM_GPU_TYPE=value)
    assert "VM_GPU_TYPE must be None or an accelerator type like 'nvidia-tesla-t4'" in message
    assert "gcloud compute accelerator-types list" in message


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True])
def test_a_gpu_count_must_be_a_positive_integer(make, value):
    assert "VM_GPU_COUNT must be a positive integer" in config_error(make, VM_GPU_TYPE=T4, VM_GPU_COUNT=value)


def test_a_gpu_count_without_a_gpu_type_is_refused(make):
    message = config_error(make, VM_GPU_COUNT=2)
    assert "VM_GPU_COUNT is 2, but VM_GPU_TYPE is None, so the workers get no GPU" in message


# ---------------------------------------------------------------- the body


@pytest.mark.parametrize("spot", [True, False])
def test_a_gpu_worker_asks_for_its_cards_by_bare_name_and_stops_for_host_maintenance(make, spot):
    _, properties = make(VM_GPU_TYPE=T4, VM_GPU_COUNT=2, VM_SPOT=spot)

    assert properties["guestAccelerators"] == [{"acceleratorType": T4, "acceleratorCount": 2}]
    scheduling = properties["scheduling"]
    assert scheduling["onHostMaintenance"] == "TERMINATE"  # GCE refuses MIGRATE with GPUs
    assert scheduling["automaticRestart"] is (not spot)  # GCE requires False for Spot
    assert scheduling["provisioningModel"] == ("SPOT" if spot else "STANDARD")
    assert {"key": "cflow-gpu-count", "value": "2"} in properties["metadata"]["items"]


def test_an_insert_body_names_the_type_by_its_zonal_url(make):
    config, _ = make(VM_GPU_TYPE=T4)
    assert gpus.guest_accelerators(config, zone="us-central1-a") == [
        {"acceleratorType": f"zones/us-central1-a/acceleratorTypes/{T4}", "acceleratorCount": 1}]
    assert gpus.accelerators_of({"guestAccelerators": gpus.guest_accelerators(config, zone="us-central1-a")}) == [(T4, 1)]


def test_a_refusal_naming_the_accelerators_blames_the_gpu_settings(make):
    config, _ = make(VM_GPU_TYPE=T4)
    count = CloudError("x")
    count.field = "instanceProperties.guestAccelerators[0].acceleratorCount"
    kind = CloudError("x")
    kind.resource = f"projects/proj-123/zones/us-central1-a/acceleratorTypes/{T4}"
    assert fleet.setting_to_change(count, config).setting == "VM_GPU_COUNT"
    assert fleet.setting_to_change(kind, config).setting == "VM_GPU_TYPE"


# ---------------------------------------------------------------- the preflight


def check(config, properties, compute, wanted=3):
    return Preflight(config, compute).check(properties, wanted)


def test_a_zone_without_the_gpu_type_is_skipped_with_one_line(make):
    config, properties = make(VM_GPU_TYPE=T4, VM_ZONE="us-east1-b", VM_FALLBACK_ZONES=["us-east1-c", "us-east1-d"])
    compute = FakeProjectCompute("proj-123")
    compute.accelerator_zones[T4] = {"us-east1-c", "us-east1-d"}

    result = check(config, properties, compute)

    assert result.zones == ("us-east1-c", "us-east1-d")
    assert result.warnings == [
        f"VM_GPU_TYPE: zone us-east1-b does not offer {T4}; no workers are created there "
        f"(`gcloud compute accelerator-types list --filter=name={T4}` lists the zones that do)"]
    assert ("accelerator_type", "us-east1-b", T4) in compute.calls


def test_no_zone_with_the_gpu_type_is_one_line_naming_vm_gpu_type(make):
    config, properties = make(VM_GPU_TYPE=T4, VM_ZONE="us-east1-b", VM_FALLBACK_ZONES=[])
    compute = FakeProjectCompute("proj-123")
    compute.accelerator_zones[T4] = {"us-central1-a"}

    with pytest.raises(PreflightFailed) as caught:
        check(config, properties, compute)

    assert str(caught.value).startswith(f"VM_GPU_TYPE: no zone of the run (us-east1-b) offers {T4}; set VM_ZONE and VM_FALLBACK_ZONES")
    assert caught.value.exit_status == 2


def test_a_t4_on_a_machine_type_that_is_not_n1_is_refused_naming_vm_type(make):
    config, properties = make(VM_GPU_TYPE=T4, VM_TYPE="e2-standard-4")
    with pytest.raises(PreflightFailed, match=rf"^VM_TYPE: {T4} GPUs attach only to N1 machine types, and VM_TYPE is e2-standard-4"):
        check(config, properties, FakeProjectCompute("proj-123"))


@pytest.mark.parametrize("spot", [False, True])
def test_a_gpu_quota_of_0_is_one_line_naming_the_metric_region_limit_and_fix(make, spot):
    """Spot GPUs count in the standard metric while the region has no preemptible GPU quota (limit 0), as GCE documents."""
    config, properties = make(VM_GPU_TYPE=T4, VM_SPOT=spot, VM_FALLBACK_ZONES=[])
    compute = FakeProjectCompute("proj-123")
    compute.set_quota("us-central1", "NVIDIA_T4_GPUS", 0)
    compute.set_quota("us-central1", "PREEMPTIBLE_NVIDIA_T4_GPUS", 0)

    with pytest.raises(PreflightFailed) as caught:
        check(config, properties, compute)

    assert str(caught.value) == (
        "quota: no worker fits (NVIDIA_T4_GPUS in us-central1: limit 0, 0 in use, 1 per worker); ask for more at "
        "https://console.cloud.google.com/iam-admin/quotas?project=proj-123, or lower WORKER_NODE_CNT or VM_GPU_COUNT, "
        "or pick another VM_GPU_TYPE")


def test_spot_gpus_count_in_the_preemptible_metric_once_the_region_has_it(make):
    config, properties = make(VM_GPU_TYPE=T4, VM_GPU_COUNT=2, VM_SPOT=True, VM_FALLBACK_ZONES=[])
    compute = FakeProjectCompute("proj-123")
    compute.set_quota("us-central1", "NVIDIA_T4_GPUS", 0)
    compute.set_quota("us-central1", "PREEMPTIBLE_NVIDIA_T4_GPUS", 4)

    result = check(config, properties, compute)

    assert result.max_workers == 2
    assert result.warnings == [
        "quota: 2 of 3 workers fit (PREEMPTIBLE_NVIDIA_T4_GPUS in us-central1: limit 4, 0 in use, 2 per worker); the run goes on "
        "with 2; ask for more at https://console.cloud.google.com/iam-admin/quotas?project=proj-123, or lower WORKER_NODE_CNT "
        "or VM_GPU_COUNT, or pick another VM_GPU_TYPE"]


def test_the_projects_gpus_all_regions_of_0_stops_the_run(make):
    config, properties = make(VM_GPU_TYPE=T4, VM_SPOT=False)
    compute = FakeProjectCompute("proj-123")
    compute.global_quotas = {"GPUS_ALL_REGIONS": Quota("GPUS_ALL_REGIONS", 0.0, 0.0)}
    with pytest.raises(PreflightFailed, match=r"^quota: no worker fits \(GPUS_ALL_REGIONS in the project: limit 0, 0 in use, 1 per worker\)"):
        check(config, properties, compute)


def test_the_gpu_quota_metric_follows_the_regions_grant():
    granted = {"PREEMPTIBLE_NVIDIA_T4_GPUS": Quota("PREEMPTIBLE_NVIDIA_T4_GPUS", 8.0, 0.0)}
    never_granted = {"PREEMPTIBLE_NVIDIA_T4_GPUS": Quota("PREEMPTIBLE_NVIDIA_T4_GPUS", 0.0, 0.0)}
    assert gpus.gpu_quota_metric(T4, True, granted) == "PREEMPTIBLE_NVIDIA_T4_GPUS"
    assert gpus.gpu_quota_metric(T4, True, never_granted) == "NVIDIA_T4_GPUS"
    assert gpus.gpu_quota_metric(T4, False, granted) == "NVIDIA_T4_GPUS"
    assert gpus.gpu_quota_metric("nvidia-tesla-v100", True, {}) == "NVIDIA_V100_GPUS"


# ---------------------------------------------------------------- prices, the dry run, the worker


def test_a_gpu_workers_price_is_its_machine_plus_its_cards(make):
    config, properties = make(VM_GPU_TYPE=T4, VM_GPU_COUNT=2, VM_SPOT=False)
    accelerators = gpus.accelerators_of(properties)
    assert gpus.worker_hourly_price(config, accelerators) == pytest.approx(0.190 + 2 * 0.35)
    assert gpus.worker_hourly_price(config, accelerators, spot=True) == pytest.approx(0.040 + 2 * 0.11)
    assert gpus.price_note(config, accelerators) == "$0.19/hour per standard n1-standard-4 + 2 x $0.35/hour per nvidia-tesla-t4"
    assert cost_range(config, 3, None, properties).startswith(f"${3 * (0.190 + 0.70):.3f}/hour for the fleet (")


def test_a_gpu_type_prices_lacks_shows_no_estimate_naming_it(make):
    config, properties = make(VM_GPU_TYPE="nvidia-l4", VM_TYPE="n1-standard-4", PRICES={"n1-standard-4": {"standard": 1, "spot": 1}})
    assert gpus.worker_hourly_price(config, gpus.accelerators_of(properties)) is None
    assert cost_range(config, 3, 3, properties) == "no estimate: add nvidia-l4 to PRICES in const.py"


def test_the_dry_run_shows_the_gpus_and_their_cost(make):
    config, _ = make(VM_GPU_TYPE=T4, VM_SPOT=True)
    out = io.StringIO()

    dry_run(config, out, clients="no clients here")

    text = out.getvalue()
    assert f"workers:      3 x n1-standard-4, Spot, GPUs 1 x {T4} each" in text
    assert f"($0.04/hour per Spot n1-standard-4 + 1 x $0.11/hour per {T4})" in text
    assert '"guestAccelerators": [' in text and '"onHostMaintenance": "TERMINATE"' in text


def test_the_worker_reads_its_gpu_count_and_staging_from_the_runs_record(make):
    config, _ = make(VM_GPU_TYPE=T4, VM_GPU_COUNT=4, STAGE_INPUTS=True)
    manifest = {"run_id": "r", "bucket": "b", "topics": {"work_subscription": "s", "work_topic": "t", "events_topic": "e"},
                "task_command": ["echo"], "task_timeout": 1, "max_attempts": 1, "lease_seconds": 10, "idle_poweroff_seconds": 1}
    assert (WorkerSettings.from_manifest(manifest).gpu_count, WorkerSettings.from_manifest(manifest).stage_inputs) == (0, False)
    settings = WorkerSettings.from_manifest({**manifest, "settings": config.to_dict()})
    assert (settings.gpu_count, settings.stage_inputs) == (4, True)


# ---------------------------------------------------------------- the driver script and the image build


def run_driver(mode, tmp_path, **environment):
    env = {"PATH": os.environ["PATH"], "CFLOW_VM_ROOT": str(tmp_path), **environment}
    return subprocess.run(["bash", str(gpus.DRIVER_SCRIPT), mode], capture_output=True, text=True, env=env, timeout=30)


@pytest.mark.parametrize("mode", ["boot", "image"])
def test_on_an_emulated_vm_the_driver_script_records_what_it_would_install(tmp_path, mode):
    result = run_driver(mode, tmp_path, CFLOW_EMULATED_VM="1")

    assert result.returncode == 0, result.stderr
    assert "cflow gpu: emulated VM with no GPU" in result.stdout
    record = (tmp_path / "opt" / "cflow" / "gpu-driver.log").read_text()
    assert f"mode={mode} emulated: no NVIDIA GPU here; would run: curl -fsSL https://storage.googleapis.com/" in record
    assert "cuda_installer.pyz install_driver --installation-mode=repo --installation-branch=prod" in record
    assert ("--ignore-no-gpu" in record) is (mode == "image")


def test_the_driver_script_refuses_an_unknown_mode(tmp_path):
    result = run_driver("install", tmp_path, CFLOW_EMULATED_VM="1")
    assert result.returncode == 2 and "usage:" in result.stderr


def test_a_gpu_image_build_script_carries_the_driver_and_says_the_vm_may_reboot():
    script = build_script("echo init", gpu_driver_text=gpus.DRIVER_SCRIPT.read_text())
    assert gpus.DRIVER_SCRIPT.read_text().rstrip("\n") in script
    assert 'bash "$ROOT/opt/cflow/gpu_driver.sh" image' in script and REBOOT_NOTICE in script
    assert "gpu_driver.sh" not in build_script("echo init")


def test_the_gpu_image_build_script_runs_the_driver_script_on_an_emulated_vm(tmp_path):
    script = build_script("echo init", gpu_driver_text=gpus.DRIVER_SCRIPT.read_text())
    environment = {"PATH": os.environ["PATH"], "CFLOW_EMULATED_VM": "1", "CFLOW_VM_ROOT": str(tmp_path)}

    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=environment, timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "cflow-image-build:   cflow gpu: emulated VM with no GPU" in result.stdout
    assert result.stdout.rstrip().endswith("cflow-image-build: ready")
    assert "mode=image emulated" in (tmp_path / "opt" / "cflow" / "gpu-driver.log").read_text()
    assert (tmp_path / "opt" / "cflow" / "gpu_driver.sh").read_text() == gpus.DRIVER_SCRIPT.read_text()


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def build_with(chunks, gpu=True):
    compute, clock, out = ScriptedCompute(chunks), FakeClock(), io.StringIO()
    request = BuildRequest("img-1", "fam", "us-central1-a", "projects/debian-cloud/global/images/family/debian-12", 10, {},
                           "#!/bin/bash\necho init\n", 600, gpu_driver_text="#!/bin/bash\n" if gpu else None)
    builder = ImageBuilder(compute, out, clock=clock, sleep=clock.sleep, poll_interval_s=2)
    try:
        return builder.build(request, vm_name="cflow-image-build-test"), compute, out.getvalue()
    except ImageBuildError as error:
        return error, compute, out.getvalue()


def test_a_reboot_the_build_script_announced_is_waited_out_and_the_image_made():
    notice = f"x startup-script: cflow-image-build: installing the NVIDIA driver (gpu_driver.sh); {REBOOT_NOTICE} on the way\n"
    result, compute, progress = build_with([
        notice, "x google_metadata_script_runner: startup-script exit status 0\n",
        "x startup-script: cflow-image-build: started\n", "x startup-script: cflow-image-build: ready\n"])

    assert result == {"name": "img-1", "status": "READY"}, result
    assert "  the build VM rebooted; waiting for the build script to carry on" in progress.splitlines()
    assert ("insert_image", "img-1", "fam", "cflow-image-build-test") in compute.calls


def test_an_end_without_a_reboot_notice_still_fails_the_build():
    result, compute, _ = build_with(["x startup-script: cflow-image-build: started\n", "x: startup-script exit status 0\n"])
    assert isinstance(result, ImageBuildError) and "before it was ready" in str(result)
    assert not [call for call in compute.calls if call[0] == "insert_image"]
