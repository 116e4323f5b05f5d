"""Compute emulator: quotas per region as regions.get reports them, and GCE's refusals beyond them.

Each rule has its accepted form and its refused form (status, reason,
message; the operation's error for bulkInsert).
"""

import json
import subprocess
import sys

import pytest
from googleapiclient.errors import HttpError

from tests.helpers import compute_client, instance_body, wait_operation
from tests.local.test_compute_schema import DISCOVERY, check

PROJECT = "quota-project"


def quotas(compute, region, project=PROJECT):
    """{metric: (limit, usage)} of ``regions.get``."""
    return {entry["metric"]: (entry["limit"], entry["usage"]) for entry in compute.regions().get(project=project, region=region).execute()["quotas"]}


def insert(compute, zone, name, machine_type="e2-small", spot=False, external_ip=False, accelerators=None, project=PROJECT):
    body = instance_body(name, zone=zone, machine_type=machine_type, startup_script="sleep 1000", spot=spot)
    if external_ip:
        body["networkInterfaces"][0]["accessConfigs"] = [{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}]
    if accelerators:
        body["guestAccelerators"] = [
            {"acceleratorType": f"zones/{zone}/acceleratorTypes/{type_name}", "acceleratorCount": count} for type_name, count in accelerators
        ]
        body.setdefault("scheduling", {})["onHostMaintenance"] = "TERMINATE"
    return compute.instances().insert(project=project, zone=zone, body=body).execute()


def created(compute, zone, *args, **kwargs):
    operation = wait_operation(compute, kwargs.get("project", PROJECT), zone, insert(compute, zone, *args, **kwargs))
    assert "error" not in operation, operation
    return operation


def refusal(call):
    """Runs ``call``; returns (status, reason, domain, message) of the ApiError it must raise."""
    with pytest.raises(HttpError) as raised:
        call()
    error = json.loads(raised.value.content)["error"]
    return raised.value.resp.status, error["errors"][0]["reason"], error["errors"][0]["domain"], error["message"]


def bulk_properties(machine_type="e2-small"):
    properties = instance_body("unused", startup_script="sleep 1000")
    properties.pop("name")
    properties["machineType"] = machine_type
    return properties


def test_regions_get_and_list_report_limits_and_usage_as_gce_does(start_compute_emulator):
    with start_compute_emulator("--quota", "CPUS=24", "--quota", "us-east1:CPUS=8", "--quota", "us-east1:IN_USE_ADDRESSES=3") as emulator:
        compute = compute_client(emulator.base_url)
        east = quotas(compute, "us-east1")
        assert east["CPUS"] == (8.0, 0.0) and east["IN_USE_ADDRESSES"] == (3.0, 0.0)
        assert quotas(compute, "us-central1")["CPUS"] == (24.0, 0.0)
        # A metric not set is generous; preemptible quota is not granted, as in a new GCE project.
        assert east["INSTANCES"][0] >= 10000 and east["NVIDIA_T4_GPUS"][0] >= 10000
        assert east["PREEMPTIBLE_CPUS"] == (0.0, 0.0)

        created(compute, "us-east1-b", "std-4", machine_type="e2-standard-4", external_ip=True)
        created(compute, "us-east1-c", "std-2", machine_type="e2-standard-2")
        east = quotas(compute, "us-east1")
        assert (east["CPUS"], east["INSTANCES"][1], east["IN_USE_ADDRESSES"][1], east["DISKS_TOTAL_GB"][1]) == ((8.0, 6.0), 2.0, 1.0, 20.0)
        assert quotas(compute, "us-central1")["CPUS"] == (24.0, 0.0)

        # A stopped VM frees its vCPUs and its external IP, not its INSTANCES slot.
        wait_operation(compute, PROJECT, "us-east1-b", compute.instances().stop(project=PROJECT, zone="us-east1-b", instance="std-4").execute())
        east = quotas(compute, "us-east1")
        assert (east["CPUS"][1], east["INSTANCES"][1], east["IN_USE_ADDRESSES"][1]) == (2.0, 2.0, 0.0)

        region = compute.regions().get(project=PROJECT, region="us-east1").execute()
        assert [zone.rsplit("/", 1)[1] for zone in region["zones"]] == ["us-east1-b", "us-east1-c", "us-east1-d"]
        listed = compute.regions().list(project=PROJECT).execute()["items"]
        assert [item["name"] for item in listed] == ["us-central1", "us-east1", "us-west1", "europe-west1", "europe-west4", "asia-east1"]
        assert {entry["metric"]: entry["usage"] for entry in listed[1]["quotas"]}["INSTANCES"] == 2.0
        with open(DISCOVERY) as handle:
            schemas = json.load(handle)["schemas"]
        check(region, {"$ref": "Region"}, schemas, "Region")
        check(compute.regions().list(project=PROJECT).execute(), {"$ref": "RegionList"}, schemas, "RegionList")
        assert refusal(lambda: compute.regions().get(project=PROJECT, region="mars-north1").execute())[:2] == (404, "notFound")


def test_insert_beyond_a_regional_quota_is_403_quota_exceeded_at_once(start_compute_emulator):
    with start_compute_emulator("--quota", "CPUS=6", "--quota", "us-west1:CPUS=2", "--quota", "IN_USE_ADDRESSES=1", "--quota", "INSTANCES=2") as emulator:
        compute = compute_client(emulator.base_url)
        created(compute, "us-central1-a", "four", machine_type="e2-standard-4")
        assert refusal(lambda: insert(compute, "us-central1-b", "four-more", machine_type="e2-standard-4")) == (
            403, "quotaExceeded", "usageLimits", "Quota 'CPUS' exceeded.  Limit: 6.0 in region us-central1.",
        )  # fmt: skip
        created(compute, "us-central1-b", "two", machine_type="e2-standard-2")
        # A regional setting wins over the one for every region.
        assert refusal(lambda: insert(compute, "us-west1-a", "west", machine_type="e2-standard-4"))[3] == (
            "Quota 'CPUS' exceeded.  Limit: 2.0 in region us-west1."
        )

        # One external IP per access config.
        created(compute, "us-east1-b", "public", external_ip=True)
        assert refusal(lambda: insert(compute, "us-east1-b", "public-2", external_ip=True))[3] == (
            "Quota 'IN_USE_ADDRESSES' exceeded.  Limit: 1.0 in region us-east1."
        )
        created(compute, "us-east1-b", "private")
        # A stopped VM still is an instance of its region.
        wait_operation(compute, PROJECT, "us-east1-b", compute.instances().stop(project=PROJECT, zone="us-east1-b", instance="private").execute())
        assert refusal(lambda: insert(compute, "us-east1-c", "fourth"))[3] == "Quota 'INSTANCES' exceeded.  Limit: 2.0 in region us-east1."
        # Starting it again takes vCPUs, not another instance.
        operation = compute.instances().start(project=PROJECT, zone="us-east1-b", instance="private").execute()
        assert "error" not in wait_operation(compute, PROJECT, "us-east1-b", operation)
        # Nothing was created by the refusals.
        names = {vm["name"] for zone in ("us-central1-b", "us-west1-a", "us-east1-b", "us-east1-c")
                 for vm in compute.instances().list(project=PROJECT, zone=zone).execute().get("items", [])}  # fmt: skip
        assert names == {"two", "public", "private"}


def test_start_beyond_the_quota_is_refused(start_compute_emulator):
    with start_compute_emulator("--quota", "CPUS=2") as emulator:
        compute = compute_client(emulator.base_url)
        zone = "europe-west1-b"
        created(compute, zone, "first")
        wait_operation(compute, PROJECT, zone, compute.instances().stop(project=PROJECT, zone=zone, instance="first").execute())
        created(compute, zone, "second")
        assert refusal(lambda: compute.instances().start(project=PROJECT, zone=zone, instance="first").execute())[:2] == (403, "quotaExceeded")


def test_spot_vms_count_in_cpus_until_preemptible_quota_is_granted(start_compute_emulator):
    with start_compute_emulator("--quota", "CPUS=4", "--quota", "us-east1:PREEMPTIBLE_CPUS=4") as emulator:
        compute = compute_client(emulator.base_url)
        # us-central1 has no preemptible quota: Spot VMs take CPUS, as on GCE (the --cpu-quota shorthand relies on it).
        created(compute, "us-central1-a", "spot-1", spot=True)
        assert quotas(compute, "us-central1")["CPUS"] == (4.0, 2.0)
        created(compute, "us-central1-a", "spot-2", spot=True)
        assert refusal(lambda: insert(compute, "us-central1-a", "spot-3", spot=True))[3] == "Quota 'CPUS' exceeded.  Limit: 4.0 in region us-central1."
        # us-east1 has preemptible quota: Spot VMs count there, standard ones in CPUS.
        created(compute, "us-east1-b", "spot-east-1", spot=True)
        created(compute, "us-east1-b", "spot-east-2", spot=True)
        created(compute, "us-east1-b", "standard-east", machine_type="e2-standard-4")
        east = quotas(compute, "us-east1")
        assert (east["PREEMPTIBLE_CPUS"], east["CPUS"]) == ((4.0, 4.0), (4.0, 4.0))
        assert refusal(lambda: insert(compute, "us-east1-c", "spot-east-3", spot=True))[3] == (
            "Quota 'PREEMPTIBLE_CPUS' exceeded.  Limit: 4.0 in region us-east1."
        )


def test_a_preemptible_quota_set_to_zero_is_a_grant_capped_at_zero(start_compute_emulator):
    # Set on purpose (an override capping preemptible quota), even 0 keeps Spot VMs out of CPUS.
    with start_compute_emulator("--quota", "PREEMPTIBLE_CPUS=0") as emulator:
        compute = compute_client(emulator.base_url)
        assert refusal(lambda: insert(compute, "us-central1-a", "spot", spot=True)) == (
            403, "quotaExceeded", "usageLimits", "Quota 'PREEMPTIBLE_CPUS' exceeded.  Limit: 0.0 in region us-central1."
        )
        created(compute, "us-central1-a", "standard")  # standard VMs still count in CPUS, which is generous
        assert quotas(compute, "us-central1")["PREEMPTIBLE_CPUS"] == (0.0, 0.0)


def test_cpu_quota_is_short_for_quota_cpus(start_compute_emulator):
    with start_compute_emulator("--cpu-quota", "4", "--quota", "asia-east1:CPUS=2") as emulator:
        compute = compute_client(emulator.base_url)
        assert quotas(compute, "us-west1")["CPUS"] == (4.0, 0.0)
        assert quotas(compute, "asia-east1")["CPUS"] == (2.0, 0.0)
        created(compute, "us-west1-a", "spot", spot=True, machine_type="e2-standard-4")
        assert refusal(lambda: insert(compute, "us-west1-b", "more", spot=True))[:2] == (403, "quotaExceeded")


def test_bulk_insert_is_refused_at_once_without_room_and_fails_in_its_operation_below_min_count(start_compute_emulator):
    with start_compute_emulator("--quota", "CPUS=6") as emulator:
        compute = compute_client(emulator.base_url)
        zone = "us-central1-c"
        body = {"count": 4, "minCount": 4, "namePattern": "bulk-#", "instanceProperties": bulk_properties()}
        # Room for 3 of the 4: accepted, then failed in the operation with GCE's code, message and quotaInfo; nothing is created.
        failed = wait_operation(compute, PROJECT, zone, compute.instances().bulkInsert(project=PROJECT, zone=zone, body=body).execute())
        assert (failed["httpErrorStatusCode"], failed["httpErrorMessage"]) == (403, "FORBIDDEN")
        quota_info = {
            "metricName": "compute.googleapis.com/cpus",
            "limitName": "CPUS-per-project-region",
            "limit": 6.0,
            "dimensions": {"region": "us-central1"},
        }
        assert failed["error"]["errors"] == [
            {"code": "QUOTA_EXCEEDED", "message": "Quota 'CPUS' exceeded.  Limit: 6.0 in region us-central1.", "errorDetails": [{"quotaInfo": quota_info}]}
        ]
        assert compute.instances().list(project=PROJECT, zone=zone).execute().get("items", []) == []
        with open(DISCOVERY) as handle:
            check(failed, {"$ref": "Operation"}, json.load(handle)["schemas"], "Operation")

        # minCount within the room: as many as fit.
        body["minCount"] = 1
        done = wait_operation(compute, PROJECT, zone, compute.instances().bulkInsert(project=PROJECT, zone=zone, body=body).execute())
        assert "error" not in done
        status = done["instancesBulkInsertOperationMetadata"]["perLocationStatus"][f"zones/{zone}"]
        assert (status["createdVmCount"], status["failedToCreateVmCount"]) == (3, 1)
        # No room at all: GCE's upfront validation refuses at once.
        assert refusal(lambda: compute.instances().bulkInsert(project=PROJECT, zone=zone, body=body).execute()) == (
            403, "quotaExceeded", "usageLimits", "Quota 'CPUS' exceeded.  Limit: 6.0 in region us-central1.",
        )  # fmt: skip


def test_gpus_count_per_type_per_region_and_in_gpus_all_regions(start_compute_emulator):
    quota_options = ("--quota", "NVIDIA_T4_GPUS=2", "--quota", "GPUS_ALL_REGIONS=3", "--quota", "us-central1:PREEMPTIBLE_NVIDIA_T4_GPUS=1")
    with start_compute_emulator(*quota_options) as emulator:
        compute = compute_client(emulator.base_url)
        created(compute, "us-west1-a", "t4-west", machine_type="n1-standard-4", accelerators=[("nvidia-tesla-t4", 2)])
        assert quotas(compute, "us-west1")["NVIDIA_T4_GPUS"] == (2.0, 2.0)
        assert refusal(lambda: insert(compute, "us-west1-b", "t4-west-2", machine_type="n1-standard-4", accelerators=[("nvidia-tesla-t4", 1)]))[3] == (
            "Quota 'NVIDIA_T4_GPUS' exceeded.  Limit: 2.0 in region us-west1."
        )
        # A Spot VM's cards go to the preemptible metric where it is granted.
        created(compute, "us-central1-a", "t4-spot", machine_type="n1-standard-4", spot=True, accelerators=[("nvidia-tesla-t4", 1)])
        central = quotas(compute, "us-central1")
        assert (central["PREEMPTIBLE_NVIDIA_T4_GPUS"], central["NVIDIA_T4_GPUS"]) == ((1.0, 1.0), (2.0, 0.0))
        # Every card of every region counts in GPUS_ALL_REGIONS, refused "globally".
        assert refusal(lambda: insert(compute, "europe-west4-a", "v100", machine_type="n1-standard-4", accelerators=[("nvidia-tesla-v100", 1)])) == (
            403, "quotaExceeded", "usageLimits", "Quota 'GPUS_ALL_REGIONS' exceeded.  Limit: 3.0 globally.",
        )  # fmt: skip


@pytest.mark.stack
@pytest.mark.parametrize(
    "option, complaint",
    [
        ("BOGUS=1", "unknown quota metric BOGUS"),
        ("CPUS=many", "is not METRIC=N or REGION:METRIC=N"),
        ("mars-north1:CPUS=4", "unknown region 'mars-north1'"),
        ("us-east1:GPUS_ALL_REGIONS=1", "GPUS_ALL_REGIONS is project-wide"),
    ],
)
def test_a_bad_quota_option_stops_the_emulator_with_one_line(option, complaint):
    completed = subprocess.run(
        [sys.executable, "-m", "cflow", "emulator", "compute", "--port", "0", "--quota", option], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 2 and complaint in completed.stderr, completed.stderr
