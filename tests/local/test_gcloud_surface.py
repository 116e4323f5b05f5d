"""The everyday gcloud surface, unchanged, against the Compute emulator.

Each test runs the real gcloud CLI (``tests.gcloud_support``) as a user
would, reads its ``--format json`` output, and checks the emulator's own
state through the Compute API. One emulator serves the whole module; gcloud
takes about a second per command, so related commands share a test.
"""

import base64
import json

import pytest
from googleapiclient.errors import HttpError

from tests.gcloud_support import GCLOUD, MISSING_REASON, Gcloud
from tests.helpers import instance_body, wait_operation, wait_until

pytestmark = [pytest.mark.skipif(not GCLOUD, reason=MISSING_REASON), pytest.mark.timeout(300)]

PROJECT = "cflow-local"  # the gcloud fixture's project
ZONE = "us-central1-a"  # and zone
IMAGE = ("--image-family", "debian-12", "--image-project", "debian-cloud")


def instance(compute, name, zone=ZONE):
    return compute.instances().get(project=PROJECT, zone=zone, instance=name).execute()


def instance_names(compute, zone=ZONE):
    return sorted(item["name"] for item in compute.instances().list(project=PROJECT, zone=zone).execute().get("items", []))


def test_catalog_commands_answer_as_gce(gcloud):
    zone = gcloud.json("compute", "zones", "describe", ZONE)
    assert zone["name"] == ZONE and zone["status"] == "UP" and zone["region"].endswith("/regions/us-central1")

    big = gcloud.json("compute", "machine-types", "list", "--zones", ZONE, "--filter", "guestCpus>=16 AND name~^e2-")
    assert sorted(item["name"] for item in big) == ["e2-highcpu-16", "e2-highcpu-32", "e2-standard-16", "e2-standard-32"]
    every_zone = gcloud.json("compute", "machine-types", "list", "--filter", "name=e2-small")  # aggregated/machineTypes
    assert len(every_zone) > 10 and {item["name"] for item in every_zone} == {"e2-small"}

    image = gcloud.json("compute", "images", "describe-from-family", "debian-12", "--project", "debian-cloud")
    assert image["family"] == "debian-12" and image["status"] == "READY"

    ssd = gcloud.json("compute", "disk-types", "describe", "pd-ssd", "--zone", ZONE)
    assert ssd["validDiskSize"] == "10GB-65536GB" and ssd["zone"].endswith(f"/zones/{ZONE}")

    project = gcloud.json("compute", "project-info", "describe")
    assert project["name"] == PROJECT and project["defaultNetworkTier"] == "PREMIUM"
    assert project["defaultServiceAccount"].endswith("-compute@developer.gserviceaccount.com")
    quotas = {quota["metric"]: quota for quota in project["quotas"]}
    assert {"CPUS_ALL_REGIONS", "IMAGES", "NETWORKS", "SNAPSHOTS", "GPUS_ALL_REGIONS"} <= quotas.keys()
    assert project["commonInstanceMetadata"]["fingerprint"]


def test_create_with_the_common_flags(gcloud, compute, tmp_path):
    startup = tmp_path / "startup.sh"
    startup.write_text("#!/bin/bash\necho gcloud-startup-ran\n")
    created = gcloud.json(
        "compute", "instances", "create", "flags-1", *IMAGE,
        "--machine-type", "e2-standard-2", "--labels", "env=test,team=cflow", "--metadata", "color=blue",
        "--metadata-from-file", f"startup-script={startup}", "--tags", "web,ssh",
        "--provisioning-model", "SPOT", "--instance-termination-action", "DELETE",
        "--boot-disk-size", "20GB", "--boot-disk-type", "pd-ssd", "--boot-disk-device-name", "root",
        "--description", "made by gcloud", "--hostname", "flags-1.example.internal", "--can-ip-forward",
        "--min-cpu-platform", "Intel Ice Lake", "--shielded-secure-boot", "--deletion-protection",
        "--service-account", "worker@cflow-local.iam.gserviceaccount.com", "--scopes", "cloud-platform",
    )  # fmt: skip
    assert [vm["name"] for vm in created] == ["flags-1"] and created[0]["status"] == "RUNNING"

    vm = instance(compute, "flags-1")
    assert vm["machineType"].endswith("/machineTypes/e2-standard-2")
    assert vm["labels"] == {"env": "test", "team": "cflow"} and vm["tags"]["items"] == ["web", "ssh"]
    metadata = {item["key"]: item["value"] for item in vm["metadata"]["items"]}
    assert metadata["color"] == "blue" and "gcloud-startup-ran" in metadata["startup-script"]
    assert vm["scheduling"]["provisioningModel"] == "SPOT" and vm["scheduling"]["instanceTerminationAction"] == "DELETE"
    assert vm["scheduling"]["preemptible"] is True
    boot = vm["disks"][0]
    assert boot["boot"] and boot["diskSizeGb"] == "20" and boot["deviceName"] == "root"
    disk = compute.disks().get(project=PROJECT, zone=ZONE, disk="flags-1").execute()
    assert disk["type"].endswith("/diskTypes/pd-ssd") and disk["sourceImage"].endswith("/global/images/debian-12-bookworm-v20240110")
    assert vm["description"] == "made by gcloud" and vm["hostname"] == "flags-1.example.internal"
    assert vm["canIpForward"] is True and vm["minCpuPlatform"] == "Intel Ice Lake" and vm["deletionProtection"] is True
    assert vm["shieldedInstanceConfig"]["enableSecureBoot"] is True
    assert vm["serviceAccounts"] == [{"email": "worker@cflow-local.iam.gserviceaccount.com", "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}]

    # Deletion protection is honoured, as GCE does, until it is lifted.
    refused = gcloud.run("compute", "instances", "delete", "flags-1", "--quiet", check=False)
    assert refused.returncode == 1 and "protected against deletion" in refused.stderr
    gcloud.run("compute", "instances", "update", "flags-1", "--no-deletion-protection")
    assert instance(compute, "flags-1")["deletionProtection"] is False

    # A custom machine type, as gcloud names it.
    custom = gcloud.json("compute", "instances", "create", "custom-1", *IMAGE, "--custom-cpu", "2", "--custom-memory", "4GB")
    assert custom[0]["machineType"].endswith("/machineTypes/custom-2-4096")


def test_list_filters_reach_the_emulator_as_gcloud_rewrites_them(gcloud, compute):
    gcloud.run("compute", "instances", "create", "pick-1", "pick-12", "other-1", *IMAGE, "--labels", "group=pick")
    wait_operation(compute, PROJECT, ZONE, compute.instances().stop(project=PROJECT, zone=ZONE, instance="other-1").execute())

    # gcloud sends `name eq ".*\bpick\-1\b.*"`: the server must keep the regex's escapes (else it answers nothing).
    assert [vm["name"] for vm in gcloud.json("compute", "instances", "list", "--filter", "name=pick-1")] == ["pick-1"]
    server_side = compute.instances().list(project=PROJECT, zone=ZONE, filter='name eq ".*\\bpick\\-1\\b.*"').execute()
    assert [vm["name"] for vm in server_side["items"]] == ["pick-1"]
    assert sorted(vm["name"] for vm in gcloud.json("compute", "instances", "list", "--filter", "name~^pick AND status=RUNNING")) == ["pick-1", "pick-12"]
    not_running = gcloud.json("compute", "instances", "list", "--zones", ZONE, "--filter", "status!=RUNNING")
    assert [vm["name"] for vm in not_running] == ["other-1"]


def fingerprint_with_plus_or_slash(compute, name, field, change):
    """Changes the VM (``change(current, attempt)``) until its ``field`` fingerprint has '+' or '/' in base64."""
    for attempt in range(100):
        current = instance(compute, name)
        value = current[field] if field == "labelFingerprint" else current["metadata"]["fingerprint"]
        if "+" in value or "/" in value:
            return value
        wait_operation(compute, PROJECT, ZONE, change(current, attempt))
    raise AssertionError(f"no {field} with '+' or '/' in 100 changes")


def test_labels_and_metadata_with_fingerprints_that_are_not_url_safe(gcloud, compute):
    gcloud.run("compute", "instances", "create", "finger-1", *IMAGE)
    instances = compute.instances()
    label_fingerprint = fingerprint_with_plus_or_slash(
        compute, "finger-1", "labelFingerprint",
        lambda current, attempt: instances.setLabels(
            project=PROJECT, zone=ZONE, instance="finger-1", body={"labels": {"n": str(attempt)}, "labelFingerprint": current["labelFingerprint"]}
        ).execute(),
    )  # fmt: skip
    # gcloud sends the fingerprint back URL-safe encoded: the same bytes, so it is accepted.
    labelled = gcloud.json("compute", "instances", "add-labels", "finger-1", "--labels", "env=prod")
    assert labelled["labels"]["env"] == "prod" and labelled["labelFingerprint"] != label_fingerprint
    assert "env" not in gcloud.json("compute", "instances", "remove-labels", "finger-1", "--labels", "env").get("labels", {})

    def new_metadata(current, attempt):
        body = {"items": [{"key": "n", "value": str(attempt)}], "fingerprint": current["metadata"]["fingerprint"]}
        return instances.setMetadata(project=PROJECT, zone=ZONE, instance="finger-1", body=body).execute()

    fingerprint_with_plus_or_slash(compute, "finger-1", "metadata", new_metadata)
    gcloud.run("compute", "instances", "add-metadata", "finger-1", "--metadata", "color=green,size=xl")
    gcloud.run("compute", "instances", "remove-metadata", "finger-1", "--keys", "size")
    metadata = {item["key"]: item["value"] for item in instance(compute, "finger-1")["metadata"]["items"]}
    assert metadata["color"] == "green" and "size" not in metadata

    # Other bytes are refused with GCE's 412, whatever their encoding.
    current = instance(compute, "finger-1")["labelFingerprint"]
    stale = base64.urlsafe_b64encode(bytes(a ^ 1 for a in base64.b64decode(current))).decode()
    with pytest.raises(HttpError) as refused:
        instances.setLabels(project=PROJECT, zone=ZONE, instance="finger-1", body={"labels": {}, "labelFingerprint": stale}).execute()
    assert refused.value.resp.status == 412 and refused.value.error_details[0]["reason"] == "conditionNotMet"


def test_bulk_create_reports_the_vms_of_its_operation_group(gcloud, compute):
    result = gcloud.json(
        "compute", "instances", "bulk", "create", "--name-pattern", "bulk-##", "--count", "3", "--zone", ZONE,
        "--machine-type", "e2-micro", *IMAGE,
    )  # fmt: skip
    assert result["createdInstanceCount"] == 3 and result["failedInstanceCount"] == 0
    assert sorted(vm["name"] for vm in result["instances"]) == ["bulk-01", "bulk-02", "bulk-03"]
    group = result["operationGroupId"]
    grouped = gcloud.json("compute", "operations", "list", "--zones", ZONE, "--filter", f"operationGroupId={group}")
    assert sorted(operation["operationType"] for operation in grouped) == ["bulkInsert", "insert", "insert", "insert"]
    inserts = {operation["targetLink"].rsplit("/", 1)[-1]: operation for operation in grouped if operation["operationType"] == "insert"}
    assert sorted(inserts) == ["bulk-01", "bulk-02", "bulk-03"] and all(operation["status"] == "DONE" for operation in inserts.values())
    assert {operation["targetId"] for operation in inserts.values()} == {instance(compute, name)["id"] for name in inserts}

    # Several at once (gcloud sends one batch), then none of them is left.
    gcloud.run("compute", "instances", "delete", "bulk-01", "bulk-02", "bulk-03", "--quiet")
    assert not {"bulk-01", "bulk-02", "bulk-03"} & set(instance_names(compute))


def test_power_scheduling_and_the_serial_port(gcloud, compute, tmp_path):
    startup = tmp_path / "startup.sh"
    startup.write_text("#!/bin/bash\necho boot-marker-$RANDOM\n")
    gcloud.run("compute", "instances", "create", "power-1", *IMAGE, "--metadata-from-file", f"startup-script={startup}")

    def serial(*args):
        return gcloud.json("compute", "instances", "get-serial-port-output", "power-1", *args)

    first = wait_until(lambda: (output := serial()) and "boot-marker-" in output["contents"] and output, 30, "the startup script's output")
    assert first["start"] == "0" and int(first["next"]) == len(first["contents"].encode())
    assert serial("--start", first["next"])["contents"] == ""  # nothing new yet
    assert serial("--port", "2")["contents"] == ""

    gcloud.run("compute", "instances", "reset", "power-1")  # the startup script runs again, without a shutdown
    again = wait_until(lambda: (output := serial("--start", first["next"])) and "boot-marker-" in output["contents"] and output, 30, "a second boot")
    assert again["start"] == first["next"]

    gcloud.run("compute", "instances", "simulate-maintenance-event", "power-1")
    assert instance(compute, "power-1")["status"] == "RUNNING"  # a standard VM is live-migrated

    gcloud.run("compute", "instances", "set-scheduling", "power-1", "--maintenance-policy", "TERMINATE")
    assert instance(compute, "power-1")["scheduling"]["onHostMaintenance"] == "TERMINATE"
    refused = gcloud.run("compute", "instances", "set-scheduling", "power-1", "--provisioning-model", "SPOT", check=False)
    assert refused.returncode == 1 and "provisioningModel" in refused.stderr

    gcloud.run("compute", "instances", "stop", "power-1")
    assert instance(compute, "power-1")["status"] == "TERMINATED"
    gcloud.run("compute", "instances", "set-scheduling", "power-1", "--provisioning-model", "SPOT", "--instance-termination-action", "STOP")
    scheduling = instance(compute, "power-1")["scheduling"]
    assert scheduling["provisioningModel"] == "SPOT" and scheduling["preemptible"] is True and scheduling["automaticRestart"] is False
    started = gcloud.json("compute", "instances", "start", "power-1")
    assert instance(compute, "power-1")["status"] == "RUNNING" and started is not None

    operations = gcloud.json("compute", "operations", "list", "--filter", "targetLink~power-1$")  # aggregated/operations
    kinds = [operation["operationType"] for operation in operations]
    assert {"insert", "reset", "setScheduling", "stop", "start", "simulateMaintenanceEvent"} <= set(kinds)
    described = gcloud.json("compute", "operations", "describe", operations[0]["name"], "--zone", ZONE)
    assert described["id"] == operations[0]["id"] and described["status"] == "DONE"


def test_disks_and_images_from_a_disk(gcloud, compute):
    gcloud.run("compute", "instances", "create", "imaged-1", *IMAGE, "--no-boot-disk-auto-delete")
    disks = gcloud.json("compute", "disks", "list", "--filter", "name=imaged-1")  # aggregated/disks
    assert [disk["name"] for disk in disks] == ["imaged-1"] and disks[0]["users"][0].endswith("/instances/imaged-1")
    assert gcloud.json("compute", "disks", "describe", "imaged-1", "--zone", ZONE)["sizeGb"] == "10"

    gcloud.run("compute", "instances", "stop", "imaged-1")
    image = gcloud.json("compute", "images", "create", "imaged-image", "--source-disk", "imaged-1", "--source-disk-zone", ZONE, "--family", "imaged")
    assert image[0]["status"] == "READY" and image[0]["sourceDisk"].endswith(f"/zones/{ZONE}/disks/imaged-1")
    assert gcloud.json("compute", "images", "describe-from-family", "imaged")["name"] == "imaged-image"
    assert [item["name"] for item in gcloud.json("compute", "images", "list", "--no-standard-images")] == ["imaged-image"]
    # A VM booted from the image by family, as gcloud asks for it (imageFamilyViews in the request's project).
    gcloud.run("compute", "instances", "create", "from-image-1", "--image-family", "imaged", "--image-project", PROJECT)
    assert compute.disks().get(project=PROJECT, zone=ZONE, disk="from-image-1").execute()["sourceImage"].endswith("/global/images/imaged-image")
    gcloud.run("compute", "instances", "delete", "from-image-1", "--quiet")
    gcloud.run("compute", "images", "delete", "imaged-image", "--quiet")

    gcloud.run("compute", "instances", "delete", "imaged-1", "--quiet")
    assert "users" not in compute.disks().get(project=PROJECT, zone=ZONE, disk="imaged-1").execute()  # kept, detached
    gcloud.run("compute", "disks", "delete", "imaged-1", "--zone", ZONE, "--quiet")
    with pytest.raises(HttpError) as gone:
        compute.disks().get(project=PROJECT, zone=ZONE, disk="imaged-1").execute()
    assert gone.value.resp.status == 404


GUEST_READS_PROJECT_METADATA = """#!/bin/bash
python3 - <<'PY'
import os, urllib.request
url = "http://%s/computeMetadata/v1/project/attributes/team" % os.environ["GCE_METADATA_HOST"]
answer = urllib.request.urlopen(urllib.request.Request(url, headers={"Metadata-Flavor": "Google"}), timeout=5)
print("project-team=" + answer.read().decode(), flush=True)
PY
"""


def test_project_metadata_reaches_the_guests(gcloud, compute):
    gcloud.run("compute", "project-info", "add-metadata", "--metadata", "team=cflow")
    common = gcloud.json("compute", "project-info", "describe")["commonInstanceMetadata"]
    assert {"key": "team", "value": "cflow"} in common["items"]
    body = instance_body("guest-1", startup_script=GUEST_READS_PROJECT_METADATA)
    wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=body).execute())

    def serial():
        return compute.instances().getSerialPortOutput(project=PROJECT, zone=ZONE, instance="guest-1").execute()["contents"]

    assert "project-team=cflow" in wait_until(lambda: "project-team=" in serial() and serial(), 30, "the guest to read project metadata")


def test_gcloud_with_the_emulators_token(start_compute_emulator, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("gcloud-test-token\n")
    token_file.chmod(0o600)
    with start_compute_emulator("--auth-token-file", token_file) as emulator:
        with_token = Gcloud(emulator.base_url, tmp_path / "config-with-token", token_file=token_file)
        assert [zone["name"] for zone in with_token.json("compute", "zones", "list", "--filter", "name=us-central1-a")] == ["us-central1-a"]

        without = Gcloud(emulator.base_url, tmp_path / "config-without")
        refused = without.run("compute", "instances", "create", "nobody-1", *IMAGE, check=False)
        assert refused.returncode == 1 and "Request is missing required authentication credential" in refused.stderr
        assert with_token.json("compute", "instances", "list") == []  # nothing was created
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-token\n")
        guessed = Gcloud(emulator.base_url, tmp_path / "config-wrong", token_file=wrong).run("compute", "zones", "list", check=False)
        assert guessed.returncode == 1 and "invalid authentication credentials" in guessed.stderr
        assert json.loads(with_token.run("compute", "project-info", "describe", "--format", "json").stdout)["name"] == PROJECT
