"""No key ever leaves the controller, nothing escapes the run's prefix, no token or key reaches a log."""

import io
import json
import tarfile
import types

import pytest

from cflow import tasks
from cflow.gcp import layout
from cflow.package import build_package, package_files
from tests.chaos.conftest import ChaosProject, run_id_of, vm_dirs
from tests.fakes import FakeMetadata, FakePubSub, FakeStorage

KEY_MARKER = "CFLOW-TEST-SECRET-KEY-MATERIAL"
SERVICE_ACCOUNT_KEY = {
    "type": "service_account",
    "project_id": "p",
    "private_key_id": "0123456789abcdef",
    "private_key": f"-----BEGIN PRIVATE KEY-----\n{KEY_MARKER}\n-----END PRIVATE KEY-----\n",
    "client_email": "controller@p.iam.gserviceaccount.com",
}


def add_controller_key(root):
    credential = root / "credential"
    credential.mkdir(exist_ok=True)
    (credential / "controller-key.json").write_text(json.dumps(SERVICE_ACCOUNT_KEY))
    (credential / "legacy.p12").write_bytes(b"\x30\x82" + KEY_MARKER.encode())


def assert_no_key_in_package(tar_gz_bytes):
    with tarfile.open(fileobj=io.BytesIO(tar_gz_bytes)) as archive:
        members = archive.getmembers()
        names = [member.name for member in members]
        assert names, "empty package"
        assert not [name for name in names if name.split("/")[0] == "credential" or "/credential/" in name], names
        for member in members:
            if member.isfile():
                content = archive.extractfile(member).read()
                assert KEY_MARKER.encode() not in content, member.name
                assert b"BEGIN PRIVATE KEY" not in content and b'"private_key"' not in content, member.name


def test_package_leaves_out_credential_even_when_it_holds_a_key(tmp_path):
    project = ChaosProject(tmp_path, types.SimpleNamespace(dir=str(tmp_path / "stack")))
    add_controller_key(tmp_path)

    names = [name for name, _ in package_files(tmp_path)]

    assert "task/t.py" in names and "init.sh" in names
    assert not [name for name in names if "credential" in name.split("/")]
    assert_no_key_in_package(build_package(tmp_path))
    assert project  # the project folder is a real one, as a user has it


@pytest.mark.stack
def test_a_run_uploads_no_key_and_prints_no_token_or_key(tmp_path, local_stack, clients):
    project = ChaosProject(tmp_path, local_stack)
    add_controller_key(tmp_path)
    project.write_items([project.line("work", 0.1) for _ in range(2)], WORKER_NODE_CNT=2)

    status, out, err = project.run()

    assert status == 0, err
    run_id = run_id_of(out)
    storage = clients.run_storage(run_id)
    assert_no_key_in_package(storage.bucket.blob(storage.prefix + layout.PACKAGE).download_as_bytes())
    # Every log of the run: the scheduler's, each VM's serial port, boot, worker and shutdown logs, the task logs.
    texts = {"scheduler stdout": out, "scheduler stderr": err}
    disks = [disk for disk in vm_dirs(local_stack) if run_id in disk.name]
    assert disks
    for disk in disks:
        for path in [disk / "serial-port-1.log", *sorted((disk / "home" / "cflow").glob("*.log"))]:
            texts[str(path)] = path.read_text(errors="replace")
        # and no key file reached the VM's disk
        assert not [p for p in disk.rglob("*") if p.is_file() and KEY_MARKER.encode() in p.read_bytes()]
    for item_id in ("000000", "000001"):
        texts[f"task log {item_id}"] = storage.read_log(item_id, 1)
    assert any("package gs://" in text for text in texts.values())  # init.sh fetched with a metadata token
    for where, text in texts.items():
        assert "ya29." not in text, where
        assert "access_token" not in text, where
        assert KEY_MARKER not in text and "BEGIN PRIVATE KEY" not in text, where


UNSAFE_IDS = ["../000001", "/000001", "000001\x00", "000001/../../x", "..", "000001/x", "0000１1", ""]
UNSAFE_NAMES = ["../x.csv", "/etc/passwd", "a\x00b", "sub/x", "..", ".", "a\\b", "", "x" * 256]


@pytest.mark.parametrize("item_id", UNSAFE_IDS)
def test_item_ids_that_could_escape_the_prefix_are_refused(item_id):
    with pytest.raises(ValueError):
        tasks.validate_item_id(item_id)
    data = json.dumps({"id": item_id, "index": 1, "args": []}).encode()
    with pytest.raises(ValueError):
        tasks.decode_message(data, {tasks.ATTR_ITEM: item_id, tasks.ATTR_ATTEMPT: "1"})


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_output_names_that_could_escape_the_prefix_are_refused(name):
    with pytest.raises(ValueError):
        tasks.validate_output_name(name)


class RecordingBucket:
    """Stands in for a storage bucket: records every object a call would touch."""

    def __init__(self):
        self.touched = []

    def blob(self, name):
        self.touched.append(name)
        raise AssertionError(f"an object was touched: {name!r}")


class RecordingClient:
    def __init__(self):
        self.bucket_object = RecordingBucket()

    def bucket(self, name):
        return self.bucket_object


@pytest.mark.parametrize("item_id, name", [*((bad, "ok.csv") for bad in UNSAFE_IDS), *(("000001", bad) for bad in UNSAFE_NAMES)])
def test_run_storage_refuses_to_write_outside_the_run_prefix(tmp_path, item_id, name):
    from cflow.gcp.storage import RunStorage

    client = RecordingClient()
    storage = RunStorage(client, "bucket", "0101-0000-abcd")
    local = tmp_path / "f"
    local.write_text("x")
    with pytest.raises(ValueError):
        storage.upload_output(item_id, name, local)
    if name == "ok.csv":
        with pytest.raises(ValueError):
            storage.upload_log(item_id, 1, local)
        with pytest.raises(ValueError):
            storage.write_done_marker(item_id, {})
    assert client.bucket_object.touched == []


def test_a_forged_work_message_is_dropped_without_running_anything(tmp_path):
    from cflow.gcp.pubsub import Received
    from cflow.worker import WorkDir, Worker
    from tests.unit.test_worker import make_settings

    work_dir = WorkDir(tmp_path / "vm")
    work_dir.package.mkdir(parents=True)
    sentinel = tmp_path / "ran"
    pubsub, storage = FakePubSub(), FakeStorage()
    worker = Worker(make_settings(["touch", str(sentinel)]), pubsub, storage, FakeMetadata(), work_dir, "vm-1")
    forged = json.dumps({"id": "../../etc", "index": 0, "args": []}).encode()

    outcome = worker.process(Received("ack-x", forged, {tasks.ATTR_ITEM: "../../etc", tasks.ATTR_ATTEMPT: "1"}, 1))

    assert outcome == "malformed"
    assert not sentinel.exists() and storage.objects == {}
    assert pubsub.kinds() == ["event", "ack"]
    assert not (tmp_path / "etc").exists()


def test_a_key_left_in_task_stops_the_run_before_anything_ships(tmp_path):
    from cflow.errors import ConfigError

    ChaosProject(tmp_path, types.SimpleNamespace(dir=str(tmp_path / "stack")))
    (tmp_path / "task" / "sa.json").write_text(json.dumps(SERVICE_ACCOUNT_KEY))

    with pytest.raises(ConfigError, match=r"task/sa.json looks like a private key.*credential/"):
        build_package(tmp_path)
