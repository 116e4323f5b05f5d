"""init.sh gives up after its retry limit and powers the VM off, with the reason on the serial console and in init.log."""

import io
import json
import tarfile
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.helpers import compute_client, instance_body, wait_operation, wait_until

REPO = Path(__file__).resolve().parents[2]
PROJECT = "init-project"
ZONE = "us-central1-a"
# Small limits, as a user sets them in instance metadata.
FAST_LIMITS = {"cflow-init-attempts": "2", "cflow-init-retry-s": "0"}


@pytest.fixture
def emulator(start_compute_emulator, gcs_server, tmp_path):
    with start_compute_emulator("--state-dir", tmp_path, "--storage-emulator-host", gcs_server) as emulator:
        yield emulator


def boot_worker(emulator, name, package_url):
    compute = compute_client(emulator.base_url)
    metadata = {**FAST_LIMITS, "cflow-package": package_url}
    body = instance_body(name, startup_script=(REPO / "init.sh").read_text(), metadata=metadata)
    wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=body).execute())
    return compute


def wait_powered_off(compute, name):
    """The VM's serial console once the VM is TERMINATED (it powered itself off)."""
    get = compute.instances().get(project=PROJECT, zone=ZONE, instance=name)
    wait_until(lambda: get.execute()["status"] == "TERMINATED", timeout=60, what=f"{name} to power itself off")
    return compute.instances().getSerialPortOutput(project=PROJECT, zone=ZONE, instance=name).execute()["contents"]


def init_log(state_dir, name):
    (disk,) = Path(state_dir, "vms").glob(f"{name}-*")
    return (disk / "home" / "cflow" / "init.log").read_text()


def console_lines(serial):
    """init.sh's own lines, as the script runner shows them on the console."""
    return [line.split(": startup-script: ", 1)[1] for line in serial.splitlines() if ": startup-script: " in line]


def test_a_package_that_can_never_be_fetched_powers_the_vm_off_with_the_reason(emulator, tmp_path):
    compute = boot_worker(emulator, "init-nopkg", f"gs://cflow-missing-{uuid.uuid4().hex[:8]}/package.tar.gz")
    lines = console_lines(wait_powered_off(compute, "init-nopkg"))
    assert lines[0].startswith("cflow init: ") and lines[0].endswith(" starting")
    assert "cflow init: cannot download the package: HTTP Error 404: Not Found" in lines
    assert "cflow init: downloading the package failed (attempt 1 of 2); retrying in 0 s" in lines
    assert "cflow init: giving up: downloading the package failed 2 times" in lines
    assert lines.index("cflow init: giving up: downloading the package failed 2 times") < lines.index(
        "cflow init: powering this VM off, so that a VM that cannot work stops billing"
    )
    assert not any("package ready" in line for line in lines)
    # The same lines are in init.log on the VM's disk.
    assert "cflow init: giving up: downloading the package failed 2 times" in init_log(tmp_path, "init-nopkg")


def upload(gcs_server, bucket, name, data):
    create = urllib.request.Request(f"{gcs_server}/storage/v1/b?project=cflow-local", data=json.dumps({"name": bucket}).encode(),
                                    headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(create, timeout=10).read()
    put = urllib.request.Request(f"{gcs_server}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}", data=data,
                                 headers={"Content-Type": "application/gzip"}, method="POST")
    urllib.request.urlopen(put, timeout=10).read()


def test_a_worker_that_keeps_failing_powers_the_vm_off_with_the_reason(emulator, gcs_server, tmp_path):
    buffer = io.BytesIO()
    worker = b"import sys\nprint('worker: boom')\nsys.exit(4)\n"
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("startup-signal.py")
        info.size = len(worker)
        archive.addfile(info, io.BytesIO(worker))
    bucket = f"cflow-init-{uuid.uuid4().hex[:8]}"
    upload(gcs_server, bucket, "package.tar.gz", buffer.getvalue())

    compute = boot_worker(emulator, "init-crash", f"gs://{bucket}/package.tar.gz")
    lines = console_lines(wait_powered_off(compute, "init-crash"))
    assert any(line.endswith(" package ready") for line in lines)
    assert "cflow init: worker.log: worker: boom" in lines
    assert "cflow init: worker exited with status 4; restarting (1 of 2)" in lines
    assert "cflow init: giving up: the worker exited with status 4, 2 times in a row (see " in "\n".join(lines)
    assert lines.count("cflow init: worker.log: worker: boom") >= 2
