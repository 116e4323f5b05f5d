"""Compute emulator: each fault option (stockout, quota, API errors, boot delay, random preemption)."""

import json
import urllib.error
import urllib.request

import pytest
from googleapiclient.errors import HttpError

from tests.helpers import compute_client, instance_body, wait_operation, wait_until

PROJECT = "faults-project"


def insert(compute, zone, name, **options):
    return compute.instances().insert(project=PROJECT, zone=zone, body=instance_body(name, zone=zone, startup_script="sleep 1000", **options)).execute()


def bulk_properties(machine_type="e2-small"):
    body = instance_body("unused", startup_script="sleep 1000")
    body.pop("name")
    body["machineType"] = machine_type
    return body


def error_codes(operation):
    return [entry["code"] for entry in operation.get("error", {}).get("errors", [])]


def test_zone_capacity_stocks_out_inserts_and_trims_bulk_inserts(start_compute_emulator):
    with start_compute_emulator("--zone-capacity", "us-central1-a=2", "--zone-capacity", "us-central1-b=3") as emulator:
        compute = compute_client(emulator.base_url)
        zone = "us-central1-a"
        for name in ("cap-1", "cap-2"):
            assert error_codes(wait_operation(compute, PROJECT, zone, insert(compute, zone, name))) == []
        stocked_out = wait_operation(compute, PROJECT, zone, insert(compute, zone, "cap-3"))
        assert error_codes(stocked_out) == ["ZONE_RESOURCE_POOL_EXHAUSTED"]
        assert stocked_out["httpErrorStatusCode"] == 503
        with pytest.raises(HttpError) as missing:
            compute.instances().get(project=PROJECT, zone=zone, instance="cap-3").execute()
        assert missing.value.resp.status == 404

        # A terminated VM frees its slot.
        wait_operation(compute, PROJECT, zone, compute.instances().stop(project=PROJECT, zone=zone, instance="cap-1").execute())
        assert error_codes(wait_operation(compute, PROJECT, zone, insert(compute, zone, "cap-3"))) == []

        zone = "us-central1-b"
        body = {"count": 5, "minCount": 4, "namePattern": "b-#", "instanceProperties": bulk_properties()}
        failed = wait_operation(compute, PROJECT, zone, compute.instances().bulkInsert(project=PROJECT, zone=zone, body=body).execute())
        assert error_codes(failed) == ["ZONE_RESOURCE_POOL_EXHAUSTED"]
        assert compute.instances().list(project=PROJECT, zone=zone).execute().get("items", []) == []
        body["minCount"] = 2
        done = wait_operation(compute, PROJECT, zone, compute.instances().bulkInsert(project=PROJECT, zone=zone, body=body).execute())
        assert error_codes(done) == []
        assert [vm["name"] for vm in compute.instances().list(project=PROJECT, zone=zone).execute()["items"]] == ["b-1", "b-2", "b-3"]


def test_cpu_quota_refuses_inserts_beyond_the_region_limit(start_compute_emulator):
    with start_compute_emulator("--cpu-quota", "8") as emulator:
        compute = compute_client(emulator.base_url)
        wait_operation(compute, PROJECT, "us-east1-b", insert(compute, "us-east1-b", "q-1", machine_type="e2-standard-4"))
        wait_operation(compute, PROJECT, "us-east1-c", insert(compute, "us-east1-c", "q-2", machine_type="e2-standard-2"))
        with pytest.raises(HttpError) as refused:
            insert(compute, "us-east1-d", "q-3", machine_type="e2-standard-4")
        error = json.loads(refused.value.content)["error"]
        assert refused.value.resp.status == 403 and error["errors"][0]["reason"] == "quotaExceeded"
        assert error["errors"][0]["domain"] == "usageLimits"
        assert error["message"] == "Quota 'CPUS' exceeded.  Limit: 8.0 in region us-east1."
        # Another region has its own quota; a bulkInsert gets as many as the quota allows.
        wait_operation(compute, PROJECT, "us-east1-b", insert(compute, "us-east1-b", "q-4", machine_type="e2-standard-2"))
        body = {"count": 4, "minCount": 1, "namePattern": "qb-#", "instanceProperties": bulk_properties("e2-standard-2")}
        wait_operation(compute, PROJECT, "europe-west4-a", compute.instances().bulkInsert(project=PROJECT, zone="europe-west4-a", body=body).execute())
        assert len(compute.instances().list(project=PROJECT, zone="europe-west4-a").execute()["items"]) == 4
        with pytest.raises(HttpError) as refused:
            compute.instances().bulkInsert(project=PROJECT, zone="us-east1-b", body=body).execute()
        assert refused.value.resp.status == 403


def answers(emulator, count):
    url = f"{emulator.base_url}projects/{PROJECT}/zones/us-central1-a"
    statuses = []
    for _ in range(count):
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                statuses.append(response.status)
        except urllib.error.HTTPError as error:
            body = json.loads(error.read())
            assert body["error"]["errors"][0]["reason"] == {429: "rateLimitExceeded", 503: "backendError"}[error.code]
            statuses.append(error.code)
    return statuses


def test_error_rate_answers_a_seeded_share_of_requests_with_429_or_503(start_compute_emulator):
    with start_compute_emulator("--error-rate", "0.5", "--seed", "11") as emulator:
        first = answers(emulator, 60)
    with start_compute_emulator("--error-rate", "0.5", "--seed", "11") as emulator:
        second = answers(emulator, 60)
        # googleapiclient retries these as GCP code does.
        zone = compute_client(emulator.base_url).zones().get(project=PROJECT, zone="us-central1-a").execute(num_retries=10)
        assert zone["name"] == "us-central1-a"
    assert first == second
    assert {429, 503, 200} == set(first)
    assert 15 <= first.count(200) <= 45


def test_boot_delay_shows_provisioning_and_staging_before_running(start_compute_emulator):
    with start_compute_emulator("--boot-delay", "1.2") as emulator:
        compute = compute_client(emulator.base_url)
        zone = "us-central1-c"
        operation = insert(compute, zone, "slow-boot")
        seen: list[str] = []

        def running():
            status = compute.instances().get(project=PROJECT, zone=zone, instance="slow-boot").execute()["status"]
            if not seen or seen[-1] != status:
                seen.append(status)
            return status == "RUNNING"

        wait_until(running, timeout=10, what="the VM to boot", interval=0.05)
        assert seen == ["PROVISIONING", "STAGING", "RUNNING"]
        assert wait_operation(compute, PROJECT, zone, operation)["status"] == "DONE"


def test_preempt_mean_preempts_spot_vms_only(start_compute_emulator):
    with start_compute_emulator("--preempt-mean-s", "0.3", "--seed", "3") as emulator:
        compute = compute_client(emulator.base_url)
        zone = "europe-west1-c"
        wait_operation(compute, PROJECT, zone, insert(compute, zone, "spot", spot=True))
        wait_operation(compute, PROJECT, zone, insert(compute, zone, "standard"))

        def get(name):
            return compute.instances().get(project=PROJECT, zone=zone, instance=name).execute()

        wait_until(lambda: get("spot")["status"] == "TERMINATED", timeout=15, what="random preemption")
        assert get("spot")["statusMessage"] == "Instance was preempted."
        assert get("standard")["status"] == "RUNNING"
