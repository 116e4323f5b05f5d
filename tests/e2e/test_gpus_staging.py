"""GPUs and input staging, whole runs of scheduler.py (and `cflow image build --gpu`) on a stack of their own.

The stack's Compute emulator offers GCE's GPU catalog (nvidia-tesla-t4 in
us-central1, us-east1-c and -d, us-west1, europe-west1, not in us-east1-b)
and has two GPU quotas of 0: ``us-west1:NVIDIA_T4_GPUS=0`` (no T4 at all
there) and ``europe-west1:PREEMPTIBLE_NVIDIA_T4_GPUS=0`` (Spot T4 quota
granted, then capped at 0). The emulated VMs have no GPU: the driver script
records what it would install instead, which the tests read.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cflow.gcp import layout
from tests.chaos.conftest import StackClients, start_stack, stopped_on_exit, vm_dirs
from tests.e2e.conftest import REPO, Project, run_id_of
from tests.e2e.test_gce_edges import error_line, vm_names_made
from tests.helpers import wait_until

pytestmark = pytest.mark.stack

T4 = "nvidia-tesla-t4"
QUOTAS_FIX = "ask for more at https://console.cloud.google.com/iam-admin/quotas?project={project}"

# Each item's fields are files to read (staged inputs) or "wait RENDEZVOUS" (hold until RENDEZVOUS/release).
GPU_TASK = r'''
import json, os, sys, time
args = sys.argv[1:]
if args[:1] == ["wait"]:
    open(os.path.join(args[1], "started-" + os.environ["CFLOW_TASK_ID"]), "w").close()
    while not os.path.exists(os.path.join(args[1], "release")):
        time.sleep(0.05)
contents = {arg: open(arg).read() for arg in args if os.path.isfile(arg)}
with open(os.path.join(os.environ["CFLOW_OUTPUT_DIR"], "result.jsonl"), "w") as stream:
    stream.write(json.dumps({"id": os.environ["CFLOW_TASK_ID"], "args": args, "contents": contents,
                             "gpus": os.environ["CFLOW_GPU_COUNT"], "input_dir": os.environ.get("CFLOW_INPUT_DIR")}) + "\n")
'''


@pytest.fixture(scope="module")
def gpu_stack(tmp_path_factory):
    stack, info = start_stack(tmp_path_factory, "gpu-stack", shutdown_grace=2,
                              quota=("us-west1:NVIDIA_T4_GPUS=0", "europe-west1:PREEMPTIBLE_NVIDIA_T4_GPUS=0"))
    try:
        yield info
    finally:
        stack.down()


def gpu_project(tmp_path, stack):
    project = Project(tmp_path, stack)
    (project.root / "task" / "t.py").write_text(GPU_TASK)
    project.settings.update(VM_TYPE="n1-standard-1", VM_GPU_TYPE=T4)
    return project


def start(project):
    """scheduler.py in the background, its output in files."""
    command = [sys.executable, str(REPO / "scheduler.py"), "--config", str(project.root / "const.py"), "--stack-dir", project.stack.dir]
    with open(project.root / "scheduler.out", "w") as out, open(project.root / "scheduler.err", "w") as err:
        return subprocess.Popen(command, cwd=project.root, stdout=out, stderr=err, text=True, env=project.environment())


def run_objects(clients, run_id):
    return [blob.name for blob in clients.storage.list_blobs(f"{clients.info.project}-cflow", prefix=layout.run_prefix(run_id))]


# ---------------------------------------------------------------- GPUs


def test_the_compute_seam_reads_which_gpu_types_a_zone_offers(gpu_stack, monkeypatch):
    from cflow.gcp.compute import Compute

    compute = Compute(StackClients(gpu_stack, monkeypatch).compute, gpu_stack.project)

    assert T4 in [entry["name"] for entry in compute.accelerator_types("us-east1-c")]
    assert T4 not in [entry["name"] for entry in compute.accelerator_types("us-east1-b")]
    assert compute.accelerator_type("us-east1-c", T4)["maximumCardsPerInstance"] == 4
    assert compute.accelerator_type("us-east1-b", T4) is None  # GCE's 404 naming the type: not offered there


def test_a_gpu_run_skips_a_zone_without_the_type_and_its_workers_carry_the_gpus(gpu_stack, tmp_path, monkeypatch):
    clients = StackClients(gpu_stack, monkeypatch)
    rendezvous = tmp_path / "rendezvous"
    rendezvous.mkdir()
    project = gpu_project(tmp_path, gpu_stack)
    project.write(f"wait {rendezvous}\nwait {rendezvous}\n", WORKER_NODE_CNT=2, VM_ZONE="us-east1-b", VM_FALLBACK_ZONES=["us-east1-c"])

    with stopped_on_exit(start(project)) as scheduler:
        wait_until(lambda: len(list(rendezvous.glob("started-*"))) == 2, 120, "both items to start on their GPU workers")
        run_id = run_id_of((project.root / "scheduler.out").read_text())
        vms = clients.vms(run_id)
        (rendezvous / "release").touch()
        status = scheduler.wait(timeout=180)

    err = (project.root / "scheduler.err").read_text()
    assert status == 0, err
    assert (f"warning: VM_GPU_TYPE: zone us-east1-b does not offer {T4}; no workers are created there "
            f"(`gcloud compute accelerator-types list --filter=name={T4}` lists the zones that do)") in err.splitlines()
    assert len(vms) == 2
    for vm in vms:  # as the Compute API reads them back
        assert vm["zone"].endswith("/zones/us-east1-c")
        assert [(entry["acceleratorType"].rsplit("/", 1)[-1], entry["acceleratorCount"]) for entry in vm["guestAccelerators"]] == [(T4, 1)]
        assert vm["scheduling"]["onHostMaintenance"] == "TERMINATE" and vm["scheduling"]["automaticRestart"] is False
    assert [(result["args"][0], result["gpus"]) for result in project.results(run_id)] == [("wait", "1"), ("wait", "1")]
    for vm in vms:  # init.sh ran the driver script before the worker, which recorded what a real VM installs
        disk = vm_dirs(gpu_stack, vm["name"])[0]
        assert "this VM has 1 GPU(s): the NVIDIA driver first" in (disk / "home" / "cflow" / "init.log").read_text()
        assert "mode=boot emulated: no NVIDIA GPU here; would run: curl" in (disk / "opt" / "cflow" / "gpu-driver.log").read_text()
    assert clients.vms(run_id) == []


@pytest.mark.parametrize("spot", [False, True], ids=["standard", "spot-without-preemptible-quota"])
def test_a_gpu_quota_of_0_ends_the_run_before_anything_is_created_naming_the_metric(gpu_stack, tmp_path, monkeypatch, spot):
    """us-west1 has NVIDIA_T4_GPUS 0 and no preemptible T4 quota: Spot T4s count in NVIDIA_T4_GPUS there too, as on GCE."""
    clients = StackClients(gpu_stack, monkeypatch)
    project = gpu_project(tmp_path, gpu_stack)
    project.write("a\n", VM_SPOT=spot, VM_ZONE="us-west1-a", VM_FALLBACK_ZONES=["us-west1-b"])

    status, out, err = project.run(timeout=120)

    assert status == 2, err
    run_id = run_id_of(out)
    assert error_line(err) == (
        "quota: no worker fits (NVIDIA_T4_GPUS in us-west1: limit 0, 0 in use, 1 per worker); "
        f"{QUOTAS_FIX.format(project=gpu_stack.project)}, or lower WORKER_NODE_CNT or VM_GPU_COUNT, or pick another VM_GPU_TYPE")
    assert vm_names_made(gpu_stack, run_id) == [] and clients.vms(run_id) == []
    assert run_objects(clients, run_id) == []  # nothing uploaded either


def test_spot_gpus_against_a_preemptible_gpu_quota_capped_at_0_end_the_run_in_one_line_with_no_vm_made(gpu_stack, tmp_path, monkeypatch):
    """regions.get shows PREEMPTIBLE_NVIDIA_T4_GPUS 0 alike for a quota never granted and one capped at 0, so GCE's first
    refusal decides: a limit of 0 holds no worker, and the run is cancelled before any VM exists."""
    clients = StackClients(gpu_stack, monkeypatch)
    project = gpu_project(tmp_path, gpu_stack)
    project.write("a\n", VM_SPOT=True, VM_ZONE="europe-west1-b", VM_FALLBACK_ZONES=[])

    status, out, err = project.run(timeout=180)

    assert status == 2, err
    run_id = run_id_of(out)
    assert error_line(err).startswith(
        "no worker fits the PREEMPTIBLE_NVIDIA_T4_GPUS quota in europe-west1 (limit 0) (GCE: quotaExceeded: "
        "Quota 'PREEMPTIBLE_NVIDIA_T4_GPUS' exceeded. Limit: 0.0 in region europe-west1.)"), err
    assert vm_names_made(gpu_stack, run_id) == [] and clients.vms(run_id) == []
    assert clients.run_storage(run_id).read_cancelled() is not None


def test_image_build_gpu_runs_the_driver_script_and_makes_the_image(gpu_stack, tmp_path, monkeypatch):
    clients = StackClients(gpu_stack, monkeypatch)
    project = gpu_project(tmp_path, gpu_stack)
    project.write("a\n")
    command = [sys.executable, "-m", "cflow", "image", "build", "--gpu", "--family", "gpu-fam", "--config", str(project.root / "const.py"),
               "--stack-dir", gpu_stack.dir]

    result = subprocess.run(command, cwd=project.root, capture_output=True, text=True, timeout=240, env=project.environment())

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ['VM_BOOT = "image"', 'VM_IMAGE_NAME = "family/gpu-fam"']
    assert "  installing the NVIDIA driver (gpu_driver.sh, Google's installer); the VM may reboot on the way" in result.stderr
    assert "  cflow gpu: emulated VM with no GPU: recording what a real VM runs instead of installing" in result.stderr
    name = result.stdout.splitlines()[0].split()[1]
    image = clients.compute.images().get(project=gpu_stack.project, image=name).execute()
    assert image["status"] == "READY" and "the NVIDIA driver" in image["description"]
    tree = Path(next(iter((Path(gpu_stack.dir) / "compute" / "images" / gpu_stack.project).glob(f"{name}-*"))))
    record = (tree / "opt" / "cflow" / "gpu-driver.log").read_text()
    assert "mode=image emulated: no NVIDIA GPU here; would run:" in record and "install_driver" in record and "--ignore-no-gpu" in record
    assert (tree / "opt" / "cflow" / "gpu_driver.sh").read_text() == (REPO / "cflow" / "gpu_driver.sh").read_text()
    builds = clients.compute.instances().aggregatedList(project=gpu_stack.project, filter="labels.cflow-role = image-build").execute()
    assert not [vm for scoped in builds["items"].values() for vm in scoped.get("instances", [])]


# ---------------------------------------------------------------- input staging


def test_staged_inputs_reach_the_task_as_local_files_and_a_missing_object_fails_with_a_readable_log(gpu_stack, tmp_path, monkeypatch):
    clients = StackClients(gpu_stack, monkeypatch)
    bucket = clients.storage.create_bucket("cflow-staging-inputs")
    bucket.blob("in/a.csv").upload_from_string("x,y\n1,2\n")
    bucket.blob("in/deep/b.txt").upload_from_string("hello")
    project = Project(tmp_path, gpu_stack)
    (project.root / "task" / "t.py").write_text(GPU_TASK)
    a, b, missing = (f"gs://cflow-staging-inputs/{name}" for name in ("in/a.csv", "in/deep/b.txt", "in/missing.csv"))
    project.write(f"{a} {b} plain-field\n{missing}\n", STAGE_INPUTS=True, MAX_ATTEMPTS=2, WORKER_NODE_CNT=2)

    status, out, err = project.run(timeout=240)

    assert status == 1, err  # one item failed
    run_id = run_id_of(out)
    [done] = project.results(run_id)
    input_dir = done["input_dir"]
    assert input_dir and input_dir.endswith("/attempts/000000-1/input")
    assert done["args"] == [f"{input_dir}/cflow-staging-inputs/in/a.csv", f"{input_dir}/cflow-staging-inputs/in/deep/b.txt", "plain-field"]
    assert done["contents"] == {done["args"][0]: "x,y\n1,2\n", done["args"][1]: "hello"}
    [failed] = [line for line in err.splitlines() if line.startswith("failed: ")]
    prefix = f"failed: item 000001 ({missing}): input staging failed (its log names the object and why); log: "
    assert failed.startswith(prefix), failed
    log_path = failed[len(prefix):]
    assert os.path.isfile(log_path), log_path
    assert Path(log_path).read_text().splitlines() == [
        f"cflow: input {missing} could not be staged: no such object (check the item's field, or upload the object); "
        "this attempt failed before the task started"]
    assert clients.run_storage(run_id).read_marker(layout.FAILED, "000001")["attempts"] == 2  # a failed download is a failed attempt
