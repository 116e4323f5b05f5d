"""The Pub/Sub and Storage seams against the official Pub/Sub emulator and fake-gcs-server."""

import json
import uuid

import pytest
from google.auth.credentials import AnonymousCredentials

from cflow import tasks
from cflow.errors import ConfigError
from cflow.gcp.pubsub import PubSub, RunTopics
from cflow.gcp.storage import RunStorage


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


def test_run_topics_are_created_once_and_deleted(pubsub):
    run_topics = RunTopics.for_run("cflow-local", "seam-" + uuid.uuid4().hex[:6], "t", "s")
    assert pubsub.create_run_topics(run_topics, ack_deadline_seconds=10) is True
    assert pubsub.create_run_topics(run_topics, ack_deadline_seconds=10) is False
    pubsub.delete_run_topics(run_topics)
    assert not pubsub.subscription_exists(run_topics.work_subscription)
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
    storage = RunStorage(storage_client, "seams-" + uuid.uuid4().hex[:8], "run-1")
    storage.ensure_bucket(create_if_missing=True)
    assert storage.write_done_marker("000001", {"attempt": 1}) is True
    assert storage.write_done_marker("000001", {"attempt": 2}) is False
    assert storage.read_marker("done", "000001") == {"attempt": 1}
    assert storage.list_done_ids() == {"000001"}
    assert storage.is_done("000001") and not storage.is_done("000002")


def test_missing_bucket_is_a_clear_error_when_it_may_not_be_created(storage_client):
    storage = RunStorage(storage_client, "absent-" + uuid.uuid4().hex[:8], "run-1")
    with pytest.raises(ConfigError, match="does not exist; create it"):
        storage.ensure_bucket(create_if_missing=False)


def test_outputs_logs_items_and_run_listing(storage_client, tmp_path):
    bucket = "seams-" + uuid.uuid4().hex[:8]
    storage = RunStorage(storage_client, bucket, "run-2")
    storage.ensure_bucket(create_if_missing=True)
    output = tmp_path / "out.csv"
    output.write_text("a,b\n1,2\n")
    storage.upload_output("000003", "out.csv", output)
    assert storage.list_output_names("000003") == ["out.csv"]
    assert storage.read_output("000003", "out.csv") == b"a,b\n1,2\n"
    url = storage.upload_log("000003", 2, output)
    assert url == f"gs://{bucket}/cflow/runs/run-2/logs/000003/attempt-2.log"
    items = tasks.make_items([["x y"], ["z"]])
    storage.write_items(items)
    assert [tuple(d["args"]) for d in storage.read_items()] == [("x y",), ("z",)]
    storage.write_manifest({"run_id": "run-2"})
    RunStorage(storage_client, bucket, "run-1").write_manifest({"run_id": "run-1"})
    assert storage.list_run_ids() == ["run-1", "run-2"]
    assert json.loads(json.dumps(storage.read_manifest())) == {"run_id": "run-2"}


def test_combined_outputs_are_those_the_done_marker_records(storage_client, tmp_path):
    storage = RunStorage(storage_client, "seams-" + uuid.uuid4().hex[:8], "run-3")
    storage.ensure_bucket(create_if_missing=True)
    output = tmp_path / "x"
    output.write_text("x\n")
    storage.upload_output("000001", "kept.csv", output)
    storage.upload_output("000001", "from-another-attempt.csv", output)
    storage.write_done_marker("000001", {"attempt": 2, "outputs": ["kept.csv"]})
    assert storage.recorded_output_names("000001") == ["kept.csv"]
    assert storage.list_output_names("000001") == ["from-another-attempt.csv", "kept.csv"]
