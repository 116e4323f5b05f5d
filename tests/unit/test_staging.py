"""Input staging (STAGE_INPUTS): which fields are staged, where, and a failed download as a failed attempt with its reason in the log."""

import dataclasses
import json
import sys

import pytest

from cflow import tasks
from cflow.errors import PermissionDenied
from cflow.worker import WorkDir, Worker, WorkerSettings
from cflow.worker.staging import StagingFailed, local_path, object_url, stage_inputs
from tests.fakes import FakeMetadata, FakePubSub, FakeStorage, received


@pytest.mark.parametrize("field, parts", [
    ("gs://bkt/data/a.csv", ("bkt", "data/a.csv")),
    ("gs://bkt.with.dots/x", ("bkt.with.dots", "x")),
    ("gs://bkt/dir/", None),  # a prefix, not an object
    ("gs://bkt", None),
    ("gs://bkt/", None),
    ("gs://Not A Bucket/x", None),
    ("--input=gs://bkt/x", None),  # a URL inside a longer field is the task's business
    ("/local/file", None),
    ("s3://bkt/x", None),
])
def test_only_a_field_that_is_the_url_of_an_object_is_staged(field, parts):
    assert object_url(field) == parts


def test_an_object_lands_under_its_bucket_and_name(tmp_path):
    assert local_path(tmp_path, "bkt", "a/b/c.csv") == tmp_path / "bkt" / "a" / "b" / "c.csv"


@pytest.mark.parametrize("name", ["a/../../etc/passwd", "a//b", "./x", "a/" + "n" * 256])
def test_a_name_that_cannot_be_a_local_path_under_the_input_folder_fails(tmp_path, name):
    with pytest.raises(StagingFailed) as caught:
        local_path(tmp_path, "bkt", name)
    assert caught.value.url == f"gs://bkt/{name}" and "cannot be a local path" in caught.value.why


def test_staged_fields_become_local_paths_and_the_rest_stay_as_written(tmp_path):
    storage = FakeStorage()
    storage.inputs = {"gs://bkt/in/a.csv": b"a,b\n", "gs://other/b.txt": b"hello"}

    staged = stage_inputs(storage, ["gs://bkt/in/a.csv", "--flag", "gs://other/b.txt", "gs://bkt/in/a.csv", "gs://bkt/in/"], tmp_path / "input")

    a, b = tmp_path / "input" / "bkt" / "in" / "a.csv", tmp_path / "input" / "other" / "b.txt"
    assert staged.args == (str(a), "--flag", str(b), str(a), "gs://bkt/in/")
    assert a.read_bytes() == b"a,b\n" and b.read_bytes() == b"hello"
    assert [call for call in storage.calls if call[0] == "download"] == [("download", "gs://bkt/in/a.csv"), ("download", "gs://other/b.txt")]


def test_a_missing_object_fails_staging_in_one_readable_line(tmp_path):
    with pytest.raises(StagingFailed) as caught:
        stage_inputs(FakeStorage(), ["gs://bkt/missing.csv"], tmp_path / "input")
    assert caught.value.log_line == ("cflow: input gs://bkt/missing.csv could not be staged: no such object (check the item's field, "
                                     "or upload the object); this attempt failed before the task started")


def test_an_object_the_account_may_not_read_says_so(tmp_path):
    storage = FakeStorage()
    storage.inputs = {"gs://private/x": PermissionDenied("this VM's service account may not read gs://private/x; grant it "
                                                         "roles/storage.objectViewer on gs://private")}
    with pytest.raises(StagingFailed, match=r"gs://private/x: this VM's service account may not read gs://private/x; grant it"):
        stage_inputs(storage, ["gs://private/x"], tmp_path / "input")


# ---------------------------------------------------------------- in the worker, with real task processes


SHOW_INPUTS = """
import json, os, sys
out = os.environ["CFLOW_OUTPUT_DIR"]
files = {arg: open(arg).read() for arg in sys.argv[1:] if os.path.isfile(arg)}
open(os.path.join(out, "seen.json"), "w").write(json.dumps({
    "argv": sys.argv[1:], "files": files, "input_dir": os.environ.get("CFLOW_INPUT_DIR"), "gpus": os.environ["CFLOW_GPU_COUNT"],
}))
"""


def make_worker(tmp_path, **changes):
    work_dir = WorkDir(tmp_path / "vm")
    work_dir.package.mkdir(parents=True)
    script = work_dir.package / "task.py"
    script.write_text(SHOW_INPUTS)
    settings = WorkerSettings(run_id="0101-0000-abcd", bucket="bucket", work_subscription="work-sub", work_topic="work-topic",
                              events_topic="events-topic", task_command=(sys.executable, str(script)), task_timeout=30.0,
                              max_attempts=3, lease_seconds=60, idle_poweroff_seconds=0.0)
    pubsub, storage = FakePubSub(), FakeStorage()
    worker = Worker(dataclasses.replace(settings, **changes), pubsub, storage, FakeMetadata(), work_dir, "vm-1")
    return worker, pubsub, storage


def test_with_stage_inputs_the_task_reads_local_files_in_cflow_input_dir(tmp_path):
    worker, _, storage = make_worker(tmp_path, stage_inputs=True, gpu_count=2)
    storage.inputs = {"gs://bkt/shard-1.csv": b"x,y\n1,2\n"}
    item = tasks.WorkItem(id="000003", index=3, args=("gs://bkt/shard-1.csv", "plain"))

    assert worker.process(received(item, 1)) == "done"

    seen = json.loads(storage.objects["outputs/000003/seen.json"])
    input_dir = str(tmp_path / "vm" / "attempts" / "000003-1" / "input")
    assert seen["input_dir"] == input_dir
    assert seen["argv"] == [f"{input_dir}/bkt/shard-1.csv", "plain"]
    assert seen["files"] == {f"{input_dir}/bkt/shard-1.csv": "x,y\n1,2\n"}
    assert seen["gpus"] == "2"
    assert not (tmp_path / "vm" / "attempts" / "000003-1").exists()  # the inputs go with the recorded attempt


def test_without_stage_inputs_nothing_is_downloaded_and_fields_pass_as_written(tmp_path):
    worker, _, storage = make_worker(tmp_path)
    item = tasks.WorkItem(id="000004", index=4, args=("gs://bkt/shard-1.csv",))

    assert worker.process(received(item, 1)) == "done"

    seen = json.loads(storage.objects["outputs/000004/seen.json"])
    assert seen["argv"] == ["gs://bkt/shard-1.csv"] and seen["input_dir"] is None and seen["gpus"] == "0"
    assert not [call for call in storage.calls if call[0] == "download"]


def test_a_missing_object_is_a_failed_attempt_whose_log_says_which_url_and_why(tmp_path):
    worker, pubsub, storage = make_worker(tmp_path, stage_inputs=True)
    item = tasks.WorkItem(id="000005", index=5, args=("gs://bkt/missing.csv",))

    assert worker.process(received(item, 1)) == "retry"

    log = storage.objects["logs/000005/attempt-1.log"].decode()
    assert log.splitlines() == ["cflow: input gs://bkt/missing.csv could not be staged: no such object (check the item's field, or "
                                "upload the object); this attempt failed before the task started"]
    assert pubsub.events[-1]["reason"] == "input staging failed (its log names the object and why)"
    assert "outputs/000005/seen.json" not in storage.objects  # the task never ran
    marker = json.loads(storage.objects["attempts/000005/1"])
    assert marker["reason"] == "input staging failed (its log names the object and why)"

