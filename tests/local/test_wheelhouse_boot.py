"""The workers' wheelhouse in Cloud Storage (one object per content), and init.sh's checks before it installs from one.

init.sh's install itself runs on a real root (tests/e2e/test_debian_root.py);
here an emulated VM is told to take the stock path (``CFLOW_EMULATED_VM``
unset), to see what it does when the run names no wheelhouse or one whose
bytes are not the ones named.
"""

import hashlib
import io
import tarfile
import uuid

import google.auth.credentials
import pytest
from google.cloud import storage as gcs

from cflow.gcp import layout
from cflow.gcp.storage import Bucket
from tests.helpers import compute_client, instance_body, wait_operation
from tests.local.test_init_retries import FAST_LIMITS, REPO, console_lines, upload, wait_powered_off

PROJECT = "init-project"
ZONE = "us-central1-a"
STOCK_PATH = "unset CFLOW_EMULATED_VM  # the test: take the stock path\n"


@pytest.fixture
def emulator(start_compute_emulator, gcs_server, tmp_path):
    with start_compute_emulator("--state-dir", tmp_path, "--storage-emulator-host", gcs_server) as emulator:
        yield emulator


@pytest.fixture
def bucket(gcs_server, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server)
    client = gcs.Client(project="cflow-local", credentials=google.auth.credentials.AnonymousCredentials())
    name = f"cflow-wh-{uuid.uuid4().hex[:8]}"
    client.create_bucket(name)
    return Bucket(client, name)


def test_the_bucket_keeps_one_object_per_wheelhouse_and_replaces_a_broken_one(bucket, tmp_path):
    archive = tmp_path / "wheelhouse.tar"
    archive.write_bytes(b"wheels" * 1000)
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()

    assert bucket.upload_wheelhouse(sha256, archive) is True
    assert bucket.upload_wheelhouse(sha256, archive) is False  # the next run finds it

    blob = bucket.client.bucket(bucket.bucket_name).blob(layout.wheelhouse(sha256))
    blob.upload_from_string(b"x" * 6000)  # same size, other bytes: an upload gone wrong
    assert bucket.upload_wheelhouse(sha256, archive) is True
    assert blob.download_as_bytes() == archive.read_bytes()
    assert bucket.wheelhouse_url(sha256) == f"gs://{bucket.bucket_name}/cflow/wheelhouse/{sha256}.tar"


def boot_stock(emulator, gcs_server, name, metadata):
    """Boot init.sh on the stock path with a package that would start a worker, and ``metadata``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        worker = b"print('worker ran')\n"
        info = tarfile.TarInfo("startup-signal.py")
        info.size = len(worker)
        archive.addfile(info, io.BytesIO(worker))
    bucket = f"cflow-init-{uuid.uuid4().hex[:8]}"
    upload(gcs_server, bucket, "package.tar.gz", buffer.getvalue())
    script = (REPO / "init.sh").read_text().replace("set -u\n", "set -u\n" + STOCK_PATH, 1)
    compute = compute_client(emulator.base_url)
    body = instance_body(name, startup_script=script, metadata={**FAST_LIMITS, "cflow-package": f"gs://{bucket}/package.tar.gz", **metadata})
    wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=body).execute())
    return compute, bucket


def test_a_stock_vm_whose_run_names_no_wheelhouse_gives_up_at_once_saying_why(emulator, gcs_server):
    compute, _ = boot_stock(emulator, gcs_server, "wh-none", {})

    lines = console_lines(wait_powered_off(compute, "wh-none"))

    assert any("has no Python client packages (/opt/cflow/venv) and the run names no wheelhouse (cflow-wheelhouse)" in line for line in lines)
    assert "cflow init: giving up: downloading the package and the wheelhouse cannot succeed (the line above says why)" in lines
    assert not any("retrying" in line for line in lines)
    assert not any("worker" in line and "starting" in line for line in lines)


def test_a_wheelhouse_whose_bytes_are_not_the_ones_named_is_never_opened(emulator, gcs_server):
    bucket = f"cflow-wh-{uuid.uuid4().hex[:8]}"
    upload(gcs_server, bucket, "cflow/wheelhouse/w.tar", b"not the wheelhouse the run made")
    named = "0" * 64
    compute, _ = boot_stock(emulator, gcs_server, "wh-bad", {"cflow-wheelhouse": f"gs://{bucket}/cflow/wheelhouse/w.tar", "cflow-wheelhouse-sha256": named})

    lines = console_lines(wait_powered_off(compute, "wh-bad"))

    actual = hashlib.sha256(b"not the wheelhouse the run made").hexdigest()
    assert f"cflow init: the wheelhouse gs://{bucket}/cflow/wheelhouse/w.tar has sha256 {actual}, not {named} as the run says" in lines
    assert "cflow init: giving up: downloading the package and the wheelhouse failed 2 times" in lines
    assert not any("installing the Google client packages" in line for line in lines)
