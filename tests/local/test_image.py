"""``cflow image build``: on the local stack end to end, then its failure paths with a scripted Compute."""

import glob
import io
import os
import subprocess
import sys

import pytest

from cflow.image import BuildRequest, ImageBuilder, ImageBuildError, build_script
from tests.e2e.conftest import REPO, Project, run_id_of
from tests.fakes import ScriptedCompute

IMAGE_BUILD_ROLE = "labels.cflow-role = image-build"


def cflow(project, *args, timeout=180):
    command = [sys.executable, "-m", "cflow", *args]
    return subprocess.run(command, cwd=project.root, capture_output=True, text=True, timeout=timeout, env=project.environment())


@pytest.mark.stack
def test_build_on_the_local_stack_then_a_run_boots_from_the_image(project, compute, local_stack):
    project.write("echo first\necho second\necho third\n", WORKER_NODE_CNT=2)

    result = cflow(project, "image", "build", "--family", "test-fam", "--config", str(project.root / "const.py"), "--stack-dir", local_stack.dir)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-2:] == ['VM_BOOT = "image"', 'VM_IMAGE_NAME = "family/test-fam"']
    name = lines[0].split()[1]
    assert name.startswith("test-fam-") and lines[0] == f"image: {name} (family test-fam, project {local_stack.project})"
    assert "the packages import in" in result.stderr and "deleted build VM cflow-image-build-" in result.stderr
    image = compute.images().get(project=local_stack.project, image=name).execute()
    assert (image["status"], image["family"]) == ("READY", "test-fam")
    build_vms = compute.instances().aggregatedList(project=local_stack.project, filter=IMAGE_BUILD_ROLE).execute()
    assert not [vm for scoped in build_vms["items"].values() for vm in scoped.get("instances", [])]
    tree = glob.glob(os.path.join(local_stack.dir, "compute", "images", local_stack.project, f"{name}-*"))[0]
    assert os.access(os.path.join(tree, "opt", "cflow", "venv", "bin", "python3"), os.X_OK)
    assert open(os.path.join(tree, "opt", "cflow", "init.sh")).read() == (REPO / "init.sh").read_text()

    project.write("echo first\necho second\necho third\n", VM_BOOT="image", VM_IMAGE_NAME="family/test-fam")
    status, out, err = project.run()

    assert status == 0, err
    run_id = run_id_of(out)
    assert [r["args"] for r in project.results(run_id)] == [["first"], ["second"], ["third"]]
    logs = glob.glob(os.path.join(local_stack.dir, "compute", "vms", f"cflow-worker-{run_id}-*", "home", "cflow", "init.log"))
    assert logs and all("using the preinstalled packages in" in open(path).read() for path in logs)


def test_without_a_running_stack_it_says_how_to_start_one(tmp_path):
    project = Project(tmp_path, stack=None)
    project.write("echo x\n")
    missing = tmp_path / "no-stack"

    result = cflow(project, "image", "build", "--config", str(project.root / "const.py"), "--stack-dir", str(missing), timeout=60)

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"cflow: error: no local stack is running in {missing}; start it with `cflow local up --dir {missing}` "
        "(the image lives in that stack, so it must outlive this command)"
    ]


@pytest.fixture
def project(tmp_path, local_stack):
    return Project(tmp_path, local_stack)


@pytest.fixture
def compute(local_stack):
    from cflow.gcp.clients import build_local_compute

    return build_local_compute(local_stack.compute_endpoint, local_stack.compute_token_file)


# ---------------------------------------------------------------- failure paths, scripted


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def build_with(chunks, timeout_s=60):
    compute, clock, out = ScriptedCompute(chunks), FakeClock(), io.StringIO()
    request = BuildRequest("img-1", "fam", "us-central1-a", "projects/debian-cloud/global/images/family/debian-12", 10, {},
                           "#!/bin/bash\necho init\n", timeout_s)
    builder = ImageBuilder(compute, out, clock=clock, sleep=clock.sleep, poll_interval_s=2)
    try:
        return builder.build(request, vm_name="cflow-image-build-test"), compute, out.getvalue()
    except ImageBuildError as error:
        return error, compute, out.getvalue()


def test_ready_split_across_reads_stops_then_images_then_deletes_the_vm():
    result, compute, progress = build_with(
        ["Jan 1 vm startup-script: cflow-image-build: inst", "alling x\n", "x startup-script: cflow-image-build: re", "ady\n"]
    )

    assert result == {"name": "img-1", "status": "READY"}
    names = [call[0] for call in compute.calls]
    assert names == ["insert_vm", "wait", "stop_vm", "wait", "insert_image", "wait", "delete_vm", "wait"]
    assert ("insert_image", "img-1", "fam", "cflow-image-build-test") in compute.calls
    assert "  installing x" in progress.splitlines()
    assert compute.body["labels"] == {"cflow-role": "image-build"} and compute.body["scheduling"]["provisioningModel"] == "STANDARD"


@pytest.mark.parametrize(
    "chunks, message",
    [
        (["cflow-image-build: started\n", "cflow-image-build: failed: line 9 exited with status 100\n"], "failed: line 9 exited with status 100"),
        (["cflow-image-build: started\n", "cflow-emulator: startup-script exit status 0\n"], "exit status 0 before it was ready"),
        (["cflow-image-build: started\n"], "did not finish within the deadline"),
    ],
    ids=["script-failed", "ended-without-ready", "timeout"],
)
def test_a_build_that_does_not_get_ready_fails_in_one_line_and_deletes_the_vm(chunks, message):
    error, compute, _ = build_with(chunks, timeout_s=60)

    assert isinstance(error, ImageBuildError) and message in str(error) and "\n" not in str(error)
    assert [call[0] for call in compute.calls][-2:] == ["delete_vm", "wait"]
    assert not [call for call in compute.calls if call[0] in ("stop_vm", "insert_image")]


def test_the_build_script_reports_a_failing_step_on_its_console():
    # Nobody, root included, can make directories in /proc: the script's first mkdir fails.
    environment = {"PATH": os.environ["PATH"], "CFLOW_EMULATED_VM": "1", "CFLOW_VM_ROOT": "/proc/cflow-no-such-root"}

    result = subprocess.run(["bash", "-c", build_script("echo init")], capture_output=True, text=True, env=environment, timeout=30)

    assert result.returncode != 0
    assert "cflow-image-build: failed: line" in result.stdout and "cflow-image-build: ready" not in result.stdout
