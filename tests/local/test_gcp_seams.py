"""The Pub/Sub and Storage seams against the official Pub/Sub emulator and fake-gcs-server."""

import json
import uuid

import pytest
from google.api_core import exceptions as google_exceptions
from google.auth.credentials import AnonymousCredentials

from cflow import tasks
from cflow.errors import BucketNotFound, CloudError, ConfigError, NotFound
from cflow.gcp.pubsub import PubSub, RunTopics
from cflow.gcp.storage import Bucket, RunStorage


@pytest.fixture
def pubsub(pubsub_emulator, monkeypatch):
    from google.cloud import pubsub_v1

    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator)
    return PubSub(pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient())


@pytest.fixture
def storage_client(gcs_server, monkeypatch):
    from google.cloud import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server)
    return storage.Client(project="cflow-local", credentials=AnonymousCredentials())


@pytest.fixture
def topics(pubsub):
    run_topics = RunTopics.for_run("cflow-local", uuid.uuid4().hex[:8], "t", "s")
    pubsub.create_run_topics(run_topics, ack_deadline_seconds=10)
    yield run_topics
    pubsub.delete_run_topics(run_topics)


def subscription_exists(pubsub, subscription):
    try:
        pubsub.subscriber.get_subscription(subscription=subscription)
        return True
    except google_exceptions.NotFound:
        return False


def test_run_topics_are_created_once_and_deleted(pubsub):
    run_topics = RunTopics.for_run("cflow-local", "seam-" + uuid.uuid4().hex[:6], "t", "s")
    assert pubsub.create_run_topics(run_topics, ack_deadline_seconds=10) is True
    assert pubsub.create_run_topics(run_topics, ack_deadline_seconds=10) is False
    pubsub.delete_run_topics(run_topics)
    assert not subscription_exists(pubsub, run_topics.work_subscription)
    pubsub.delete_run_topics(run_topics)  # already gone: no error


def test_publish_pull_ack_round_trip_keeps_args_exact(pubsub, topics):
    items = tasks.make_items([["a b", "$(echo hi)", "ünï", "'\"\\"], ["x"]])
    assert pubsub.publish_many(topics.work_topic, (tasks.encode_message(i, 1) for i in items)) == 2
    got: list[tuple[tasks.WorkItem, int]] = []
    while len(got) < 2:
        for message in pubsub.pull(topics.work_subscription, max_messages=2, timeout=5):
            got.append(tasks.decode_message(message.data, message.attributes))
            pubsub.ack(topics.work_subscription, [message.ack_id])
    assert sorted(got, key=lambda pair: pair[0].index) == [(items[0], 1), (items[1], 1)]


def test_nack_redelivers_at_once_with_the_same_attempt(pubsub, topics):
    item = tasks.make_items([["only"]])[0]
    pubsub.publish(topics.work_topic, *tasks.encode_message(item, 2))
    first = pubsub.pull(topics.work_subscription, timeout=5)[0]
    pubsub.nack(topics.work_subscription, first.ack_id)
    again = pubsub.pull(topics.work_subscription, timeout=5)[0]
    assert tasks.decode_message(again.data, again.attributes) == (item, 2)
    pubsub.ack(topics.work_subscription, [again.ack_id])
    assert pubsub.pull(topics.work_subscription, timeout=1) == []


def test_events_are_drained_and_acked(pubsub, topics):
    pubsub.publish_event(topics.events_topic, {"type": "done", "item": "000001"})
    events = []
    for _ in range(10):
        events += pubsub.drain_events(topics.events_subscription)
        if events:
            break
    assert events == [{"type": "done", "item": "000001"}]
    assert pubsub.drain_events(topics.events_subscription) == []


def test_done_marker_is_created_only_once(storage_client):
    bucket = "seams-" + uuid.uuid4().hex[:8]
    Bucket(storage_client, bucket).ensure_exists(create_if_missing=True)
    storage = RunStorage(storage_client, bucket, "run-1")
    assert storage.write_done_marker("000001", {"attempt": 1}) is True
    assert storage.write_done_marker("000001", {"attempt": 2}) is False
    assert storage.read_marker("done", "000001") == {"attempt": 1}
    assert storage.list_done_ids() == {"000001"}
    assert storage.is_done("000001") and not storage.is_done("000002")


def test_missing_bucket_is_a_clear_error_when_it_may_not_be_created(storage_client):
    bucket = Bucket(storage_client, "absent-" + uuid.uuid4().hex[:8])
    with pytest.raises(ConfigError, match="does not exist; create it"):
        bucket.ensure_exists(create_if_missing=False)


def test_outputs_logs_items_and_run_listing(storage_client, tmp_path):
    bucket = "seams-" + uuid.uuid4().hex[:8]
    Bucket(storage_client, bucket).ensure_exists(create_if_missing=True)
    storage = RunStorage(storage_client, bucket, "run-2")
    output = tmp_path / "out.csv"
    output.write_text("a,b\n1,2\n")
    storage.upload_output("000003", "out.csv", output)
    assert storage.list_output_names("000003") == ["out.csv"]
    assert storage.read_output("000003", "out.csv") == b"a,b\n1,2\n"
    url = storage.upload_log("000003", 2, output)
    assert url == f"gs://{bucket}/cflow/runs/run-2/logs/000003/attempt-2.log"
    items = tasks.make_items([["x y"], ["z"]])
    storage.write_items(items)
    assert storage.read_items() == items
    storage.write_manifest({"run_id": "run-2"})
    RunStorage(storage_client, bucket, "run-1").write_manifest({"run_id": "run-1"})
    assert Bucket(storage_client, bucket).list_run_ids() == ["run-1", "run-2"]
    assert json.loads(json.dumps(storage.read_manifest())) == {"run_id": "run-2"}


def test_combined_outputs_are_those_the_done_marker_records(storage_client, tmp_path):
    bucket = "seams-" + uuid.uuid4().hex[:8]
    Bucket(storage_client, bucket).ensure_exists(create_if_missing=True)
    storage = RunStorage(storage_client, bucket, "run-3")
    output = tmp_path / "x"
    output.write_text("x\n")
    storage.upload_output("000001", "kept.csv", output)
    storage.upload_output("000001", "from-another-attempt.csv", output)
    storage.write_done_marker("000001", {"attempt": 2, "outputs": ["kept.csv"]})
    assert storage.recorded_output_names("000001") == ["kept.csv"]
    assert storage.list_output_names("000001") == ["from-another-attempt.csv", "kept.csv"]


def test_cancelled_and_published_records(storage_client):
    bucket = "seams-" + uuid.uuid4().hex[:8]
    Bucket(storage_client, bucket).ensure_exists(create_if_missing=True)
    storage = RunStorage(storage_client, bucket, "run-4")
    assert storage.read_cancelled() is None and not storage.is_published()
    assert storage.mark_cancelled(10.0) == {"time": 10.0}
    assert storage.mark_cancelled(20.0) == {"time": 10.0}  # a second cancel keeps the first time
    storage.mark_published(3, 11.0)
    assert storage.read_cancelled() == {"time": 10.0} and storage.is_published()


def test_the_seams_raise_cflow_classes(storage_client, pubsub):
    storage = RunStorage(storage_client, "absent-" + uuid.uuid4().hex[:8], "run-1")
    with pytest.raises(BucketNotFound):
        storage.list_done_ids()
    assert storage.read_manifest() is None  # an object that is not there is an answer, not an error
    gone = RunTopics.for_run("cflow-local", "gone-" + uuid.uuid4().hex[:6], "t", "s")
    with pytest.raises(NotFound) as caught:
        pubsub.drain_events(gone.events_subscription, timeout=1)
    assert caught.value.service == "pubsub" and isinstance(caught.value.__cause__, google_exceptions.NotFound)


def read_object(storage, relative):
    return storage.bucket.blob(storage.prefix + relative).download_as_bytes()


def listed(storage, relative_prefix):
    return [blob.name for blob in storage.client.list_blobs(storage.bucket_name, prefix=storage.prefix + relative_prefix)]


def stage_as_a_worker(storage, tmp_path, item_id, files, keep_headers_apart=True):
    """Leave an item's outputs and done marker in the bucket as cflow.worker.record does."""
    from cflow.combine import body_offset, is_csv_name, shape_output, shapes_to_json

    shapes = {}
    for name, data in sorted(files.items()):
        path = tmp_path / f"{item_id}-{name}"
        path.write_bytes(data)
        shape = shape_output(path, keep_headers_apart and is_csv_name(name))
        storage.upload_output(item_id, name, path, offset=body_offset(shape))
        shapes[name] = shape
    storage.write_done_marker(item_id, {"item": item_id, "attempt": 1, "outputs": sorted(files), "output_shapes": shapes_to_json(shapes)})


def test_fake_gcs_server_composes_up_to_32_sources_in_order(storage_client):
    bucket = "seams-" + uuid.uuid4().hex[:8]
    Bucket(storage_client, bucket).ensure_exists(create_if_missing=True)
    storage = RunStorage(storage_client, bucket, "run-5")
    for number in range(33):
        storage.upload_bytes(f"parts/{number:02d}", b"%d," % number)
    storage.compose([f"parts/{number:02d}" for number in range(32)], "joined.csv")
    assert read_object(storage, "joined.csv") == b"".join(b"%d," % number for number in range(32))
    assert storage_client.bucket(bucket).get_blob(storage.prefix + "joined.csv").content_type == "text/csv"
    with pytest.raises(CloudError):
        storage.compose([f"parts/{number:02d}" for number in range(33)], "too-many")
    storage.delete_object("joined.csv")
    storage.delete_object("joined.csv")  # already gone: fine


def test_combining_in_the_bucket_gives_the_bytes_combining_through_the_controller_gives(storage_client, tmp_path):
    from cflow.lifecycle import combine_outputs

    bucket = "seams-" + uuid.uuid4().hex[:8]
    Bucket(storage_client, bucket).ensure_exists(create_if_missing=True)
    outputs = {
        "000000": {"out.csv": b"id,value\n0,a\n", "log.txt": b"zero"},
        "000001": {"out.csv": b"id,value\r\n1,b\r\n2,c"},
        "000002": {"out.csv": b"", "log.txt": b"two\n"},
        "000003": {"out.csv": b"id,value\n", "log.txt": b"three\n"},
        "000004": {"out.csv": b"id,value\n4,\xc3\xa9\n", "other.csv": b"x\n1\n"},
        "000005": {"other.csv": b"y\n2\n"},  # another header: through the controller
    }
    in_bucket, as_before = RunStorage(storage_client, bucket, "new-way"), RunStorage(storage_client, bucket, "old-way")
    for item_id, files in outputs.items():
        stage_as_a_worker(in_bucket, tmp_path, item_id, files)
        stage_as_a_worker(as_before, tmp_path, item_id, files, keep_headers_apart=False)
    # The old way: every copy read through the controller, as before shapes were recorded.
    written = tmp_path / "old" / "x"
    written.mkdir(parents=True)
    from cflow.combine import combine_concat

    expected = combine_concat(sorted(outputs), as_before.recorded_output_names, as_before.read_output, written)

    combined = combine_outputs(in_bucket, sorted(outputs), tmp_path / "result")

    assert sorted(combined) == ["log.txt", "other.csv", "out.csv"]
    for name, file in combined.items():
        assert file.path is not None and file.path.read_bytes() == expected[name].read_bytes(), name
        assert read_object(in_bucket, f"combined/{name}") == expected[name].read_bytes()
    assert read_object(in_bucket, "combined/out.csv") == "id,value\n0,a\n1,b\r\n2,c\n4,é\n".encode()
    assert [combined[name].in_bucket for name in sorted(combined)] == [True, False, True]
    assert listed(in_bucket, "combining/") == []

    left = combine_outputs(in_bucket, sorted(outputs), tmp_path / "not-downloaded", download=False)
    assert all(file.path is None for file in left.values()) and not (tmp_path / "not-downloaded").exists()
