"""Compute emulator: ``--rate-limit-per-minute N`` refuses a project's requests beyond N a minute per group, as GCE does.

The emulator runs in-process with its wall clock held still, so the minute
the requests fall in is the test's choice, not the machine's.
"""

import json
import subprocess
import sys
import time

import pytest
from google.auth.credentials import AnonymousCredentials
from googleapiclient.errors import HttpError
from googleapiclient.http import BatchHttpRequest

from cflow.errors import RateLimited
from cflow.gcp.clients import build_compute
from cflow.gcp.errors import classify
from cflow.local.compute.emulator import ComputeEmulator, EmulatorOptionError, EmulatorOptions
from cflow.local.compute.resources import project_number
from tests.helpers import compute_client, instance_body, wait_operation

PROJECT = "rate-project"
ZONE = "us-central1-a"
LIMIT = 3


class HeldClock:
    """A wall clock that stays 20 s into a minute until the test moves it."""

    def __init__(self) -> None:
        self.now = (time.time() // 60) * 60 + 20

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def limited(tmp_path):
    """(compute client, clock, batch URI) of an in-process emulator allowing LIMIT requests a minute."""
    clock = HeldClock()
    emulator = ComputeEmulator(EmulatorOptions(state_dir=str(tmp_path), shutdown_grace_s=1, rate_limit_per_minute=LIMIT), wall_clock=clock)
    base_url = emulator.start()
    try:
        yield compute_client(base_url), clock, base_url.split("/compute/v1/")[0] + "/batch/compute/v1"
    finally:
        emulator.stop()


def status_of(call):
    try:
        call.execute()
    except HttpError as error:
        return error.resp.status
    return 200


def rate_limit_error(call):
    with pytest.raises(HttpError) as caught:
        call.execute()
    assert caught.value.resp.status == 403
    return caught.value


def assert_gce_rate_limit(error, project, metric_label, metric):
    body = json.loads(error.content)["error"]
    message = (
        f"Quota exceeded for quota metric '{metric_label}' and limit '{metric_label} per minute' "
        f"of service 'compute.googleapis.com' for consumer 'project_number:{project_number(project)}'."
    )
    assert body["code"] == 403 and body["status"] == "PERMISSION_DENIED" and body["message"] == message
    assert body["errors"] == [{"message": message, "domain": "usageLimits", "reason": "rateLimitExceeded"}]
    info = body["details"][0]
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo" and info["reason"] == "RATE_LIMIT_EXCEEDED"
    assert info["metadata"]["quota_metric"] == f"compute.googleapis.com/{metric}"
    assert info["metadata"]["quota_limit_value"] == str(LIMIT)
    assert info["metadata"]["consumer"] == f"projects/{project_number(project)}"


@pytest.mark.stack
def test_each_group_allows_n_requests_a_minute_then_403_rate_limit_exceeded(limited):
    compute, clock, _ = limited
    instances = compute.instances()
    gets = [instances.get(project=PROJECT, zone=ZONE, instance="nope") for _ in range(LIMIT)]
    assert [status_of(call) for call in gets] == [404] * LIMIT  # refused or not, a request counts
    error = rate_limit_error(instances.get(project=PROJECT, zone=ZONE, instance="nope"))
    assert_gce_rate_limit(error, PROJECT, "Read requests", "read_requests")

    # Each group is counted on its own: lists, changes and operation reads still have their quota.
    assert [status_of(instances.list(project=PROJECT, zone=ZONE)) for _ in range(LIMIT)] == [200] * LIMIT
    assert_gce_rate_limit(rate_limit_error(instances.list(project=PROJECT, zone=ZONE)), PROJECT, "List requests", "list_requests")
    deletes = [instances.delete(project=PROJECT, zone=ZONE, instance="nope") for _ in range(LIMIT)]
    assert [status_of(call) for call in deletes] == [404] * LIMIT
    assert_gce_rate_limit(rate_limit_error(instances.delete(project=PROJECT, zone=ZONE, instance="nope")), PROJECT, "Queries", "default")
    operations = compute.zoneOperations()
    assert [status_of(operations.get(project=PROJECT, zone=ZONE, operation="operation-1")) for _ in range(LIMIT)] == [404] * LIMIT
    error = rate_limit_error(operations.get(project=PROJECT, zone=ZONE, operation="operation-1"))
    assert_gce_rate_limit(error, PROJECT, "Operation read requests", "operation_read_requests")

    # Another project has its own quota.
    assert status_of(instances.get(project="other-project", zone=ZONE, instance="nope")) == 404
    # A refused request does not count, and the quota refills when the next minute starts, not 60 s after the first request.
    clock.now += 39.9
    assert status_of(instances.get(project=PROJECT, zone=ZONE, instance="nope")) == 403
    clock.now += 0.2
    assert [status_of(instances.get(project=PROJECT, zone=ZONE, instance="nope")) for _ in range(LIMIT)] == [404] * LIMIT
    assert status_of(instances.get(project=PROJECT, zone=ZONE, instance="nope")) == 403


@pytest.mark.stack
def test_a_batchs_calls_count_one_by_one(limited):
    compute, _, batch_uri = limited
    answers = {}

    def record(request_id, response, exception):
        answers[request_id] = exception.resp.status if exception is not None else 200

    batch = BatchHttpRequest(callback=record, batch_uri=batch_uri)
    for number in range(LIMIT + 2):
        batch.add(compute.instances().get(project="batch-project", zone=ZONE, instance=f"vm-{number}"), request_id=str(number))
    batch.execute()
    assert [answers[str(number)] for number in range(LIMIT + 2)] == [404] * LIMIT + [403, 403]


@pytest.mark.stack
def test_a_bulk_insert_is_one_request_however_many_vms_it_makes(limited):
    compute, _, _ = limited
    properties = instance_body("unused")
    properties.pop("name")
    properties["machineType"] = "e2-micro"
    body = {"count": 4, "namePattern": "bulk-##", "instanceProperties": properties}
    wait_operation(compute, "bulk-project", ZONE, compute.instances().bulkInsert(project="bulk-project", zone=ZONE, body=body).execute())
    # bulkInsert was the project's first change: two more fit this minute.
    deletes = [compute.instances().delete(project="bulk-project", zone=ZONE, instance=f"bulk-0{number}") for number in (1, 2, 3)]
    assert [status_of(call) for call in deletes] == [200, 200, 403]


@pytest.mark.stack
def test_cflow_takes_it_for_a_rate_limit_and_waits(limited):
    compute, _, _ = limited
    for _ in range(LIMIT):
        status_of(compute.zones().get(project=PROJECT, zone=ZONE))
    error = rate_limit_error(compute.zones().get(project=PROJECT, zone=ZONE))
    assert isinstance(classify(error, "compute", PROJECT), RateLimited)


def test_the_command_line_option(start_compute_emulator):
    with start_compute_emulator("--rate-limit-per-minute", "1") as emulator:
        compute = build_compute(AnonymousCredentials(), emulator.base_url)
        statuses = [status_of(compute.zones().get(project=PROJECT, zone=ZONE)) for _ in range(3)]
        # The machine's minute may turn between two calls, but not twice.
        assert statuses.count(403) >= 1 and statuses[0] == 200
    with pytest.raises(EmulatorOptionError, match="--rate-limit-per-minute 0 must be at least 1"):
        EmulatorOptions(rate_limit_per_minute=0).validate({ZONE})


@pytest.mark.parametrize("command", [["emulator", "compute"], ["local", "up"]])
def test_help_names_the_lifecycle_options(command):
    shown = subprocess.run([sys.executable, "-m", "cflow", *command, "--help"], capture_output=True, text=True, check=True).stdout
    assert "--rate-limit-per-minute N" in shown and "rateLimitExceeded" in shown
    assert "--no-resource-not-ready" in shown and "resourceNotReady" in shown
