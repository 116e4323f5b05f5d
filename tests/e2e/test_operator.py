"""What a user sees from scheduler.py beyond a plain run: dry run, setup errors."""

import json
import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO, run_vms

pytestmark = pytest.mark.stack


def test_dry_run_prints_the_plan_and_creates_nothing(project, compute, local_stack):
    project.write("echo a\necho b\necho c\n", WORKER_NODE_CNT=2, VM_SPOT=False, VM_TYPE="e2-standard-2")

    status, out, err = project.run("--dry-run")

    assert status == 0, err
    assert "items:        3" in out
    assert "workers:      2 x e2-standard-2, standard" in out
    assert "$0.134/hour for the fleet" in out  # 2 x the e2-standard-2 standard price in const.py's PRICES
    body = json.loads(out[out.index("{"): out.rindex("}") + 1])
    assert body["scheduling"]["provisioningModel"] == "STANDARD"
    assert body["labels"]["cflow-run"] == "RUN_ID"
    assert "dry run: nothing was created" in out
    assert "run id:" not in out
    assert run_vms(compute, local_stack.project) == []


def test_gcp_without_credentials_is_one_line_and_exit_2(project, tmp_path):
    project.write("echo a\n", TARGET="gcp", PROJECT_NAME="my-project-123", BUCKET="my-bucket-123")
    environment = {k: v for k, v in project.environment().items() if not k.startswith(("GOOGLE_", "CLOUDSDK_"))}
    environment.update(
        NO_GCE_CHECK="True",  # no probing for a metadata server: test traffic stays on loopback
        GCE_METADATA_HOST="127.0.0.1:9",
        GCE_METADATA_IP="127.0.0.1:9",
        HOME=str(tmp_path),  # no gcloud application-default credentials here
        CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
    )
    result = subprocess.run(
        [sys.executable, str(REPO / "scheduler.py"), "--config", str(project.root / "const.py")],
        capture_output=True, text=True, timeout=60, env=environment, cwd=project.root,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no Google credentials found" in lines[0] and "gcloud auth application-default login" in lines[0]


def test_resume_refuses_settings_that_differ_from_the_runs_own(project, compute, local_stack):
    project.write("echo a\n", WORKER_NODE_CNT=1, MAX_ATTEMPTS=3)
    status, out, err = project.run()
    assert status == 0, err
    run_id = next(line.split()[-1] for line in out.splitlines() if line.startswith("run id: "))

    project.write("echo a\n", MAX_ATTEMPTS=5, VM_TYPE="e2-medium")
    status, out, err = project.run("--resume", run_id, timeout=120)

    assert status == 2, err
    error_lines = [line for line in err.splitlines() if "error" in line]
    assert len(error_lines) == 1, err
    assert f"run {run_id} started with other settings than const.py has now" in error_lines[0]
    assert "MAX_ATTEMPTS 3 at the start, 5 in const.py" in error_lines[0]
    assert "VM_TYPE 'e2-small' at the start, 'e2-medium' in const.py" in error_lines[0]
    assert run_vms(compute, local_stack.project, run_id) == []
