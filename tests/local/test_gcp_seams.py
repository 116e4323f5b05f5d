"""The Pub/Sub and Storage seams against the official Pub/Sub emulator and fake-gcs-server."""

import json
import uuid

import pytest
from google.api_core import exceptions as google_exceptions
from google.auth.credentials import AnonymousCredentials

from cflow import tasks
from cflow.errors import BucketNotFound, ConfigError, NotFound
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
    got = []
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
