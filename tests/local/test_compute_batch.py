"""Compute emulator: batched calls (POST /batch/compute/v1) as BatchHttpRequest sends them."""

from googleapiclient.errors import HttpError
from googleapiclient.http import BatchHttpRequest

from tests.helpers import compute_client, instance_body, wait_operation, wait_until

PROJECT = "batch-project"
ZONE = "us-central1-b"


def test_batched_deletes_answer_each_call_and_delete_the_vms(start_compute_emulator):
    with start_compute_emulator() as emulator:
        compute = compute_client(emulator.base_url)
        for name in ("batch-1", "batch-2", "batch-3"):
            body = instance_body(name, zone=ZONE, startup_script="sleep 1000")
            wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=body).execute())
        answers = {}

        def on_answer(request_id, response, exception):
            answers[request_id] = exception if exception is not None else response

        batch = BatchHttpRequest(callback=on_answer, batch_uri=emulator.batch_uri)
        for name in ("batch-1", "batch-2", "batch-3", "never-existed"):
            batch.add(compute.instances().delete(project=PROJECT, zone=ZONE, instance=name), request_id=name)
        batch.add(compute.instances().get(project=PROJECT, zone=ZONE, instance="batch-1"), request_id="get")
        batch.execute()

        assert isinstance(answers["never-existed"], HttpError) and answers["never-existed"].resp.status == 404
        assert answers["get"]["status"] == "STOPPING"
        for name in ("batch-1", "batch-2", "batch-3"):
            assert answers[name]["operationType"] == "delete" and answers[name]["targetLink"].endswith(f"/instances/{name}")
            wait_operation(compute, PROJECT, ZONE, answers[name])
        wait_until(lambda: compute.instances().list(project=PROJECT, zone=ZONE).execute().get("items") == [])
