"""The real gcloud CLI against the emulator: time limits, set-scheduling, and stopping a VM that still boots.

Each command is what a user types; the emulator answers as GCE would, and
gcloud shows it as it shows GCE's answers.
"""

import pytest

from tests.gcloud_support import GCLOUD, MISSING_REASON, Gcloud
from tests.helpers import compute_client, instance_body

PROJECT = "cflow-local"
ZONE = "us-central1-a"


@pytest.fixture(scope="module")
def debian_image(compute):
    """The stock Debian 12 image by name (``--image-family`` is another part's work)."""
    return compute.images().getFromFamily(project="debian-cloud", family="debian-12").execute()["name"]


def create(gcloud, name, image, *flags):
    gcloud.run("compute", "instances", "create", name, "--image-project", "debian-cloud", "--image", image, "--no-address", *flags)


def describe(gcloud, name):
    return gcloud.json("compute", "instances", "describe", name)


def test_create_with_a_max_run_duration_and_delete_action(gcloud, debian_image):
    create(gcloud, "gc-limited", debian_image, "--max-run-duration", "10m", "--instance-termination-action", "DELETE")
    instance = describe(gcloud, "gc-limited")
    assert instance["status"] == "RUNNING"
    assert instance["scheduling"]["maxRunDuration"] == {"seconds": "600"}
    assert instance["scheduling"]["instanceTerminationAction"] == "DELETE"
    assert instance["resourceStatus"]["scheduling"]["terminationTimestamp"]
    gcloud.run("compute", "instances", "delete", "gc-limited", "--quiet")


def test_create_shows_gces_refusals(gcloud, debian_image):
    image = ("--image-project", "debian-cloud", "--image", debian_image)
    result = gcloud.run("compute", "instances", "create", "gc-action", *image, "--provisioning-model", "STANDARD",
                        "--instance-termination-action", "DELETE", check=False)
    assert result.returncode != 0
    assert "Invalid value for field 'resource.scheduling.instanceTerminationAction': 'DELETE'. You cannot specify a termination action" in result.stderr
    result = gcloud.run("compute", "instances", "create", "gc-short", *image, "--provisioning-model", "SPOT", "--max-run-duration", "20s", check=False)
    assert result.returncode != 0
    assert "Invalid value for field 'resource.scheduling.maxRunDuration': '20s'. The run duration must be between 30 seconds" in result.stderr


def test_set_scheduling_on_a_running_and_a_stopped_vm(gcloud, debian_image):
    create(gcloud, "gc-sched", debian_image)
    result = gcloud.run("compute", "instances", "set-scheduling", "gc-sched", "--provisioning-model", "SPOT", check=False)
    assert result.returncode != 0
    assert "Instance must be stopped (TERMINATED) to change scheduling.provisioningModel" in result.stderr
    gcloud.run("compute", "instances", "set-scheduling", "gc-sched", "--maintenance-policy", "TERMINATE")
    assert describe(gcloud, "gc-sched")["scheduling"]["onHostMaintenance"] == "TERMINATE"

    gcloud.run("compute", "instances", "stop", "gc-sched")
    gcloud.run("compute", "instances", "set-scheduling", "gc-sched", "--max-run-duration", "1h", "--instance-termination-action", "STOP")
    scheduling = describe(gcloud, "gc-sched")["scheduling"]
    assert scheduling["maxRunDuration"] == {"seconds": "3600"} and scheduling["instanceTerminationAction"] == "STOP"
    gcloud.run("compute", "instances", "set-scheduling", "gc-sched", "--clear-max-run-duration", "--clear-instance-termination-action")
    scheduling = describe(gcloud, "gc-sched")["scheduling"]
    assert "maxRunDuration" not in scheduling and "instanceTerminationAction" not in scheduling
    gcloud.run("compute", "instances", "delete", "gc-sched", "--quiet")


def test_stop_and_delete_of_a_booting_vm_show_gces_error(start_compute_emulator, tmp_path):
    if not GCLOUD:
        pytest.skip(MISSING_REASON)
    with start_compute_emulator("--boot-delay", "10") as emulator:
        compute_client(emulator.base_url).instances().insert(project=PROJECT, zone=ZONE, body=instance_body("gc-booting", zone=ZONE)).execute()
        gcloud = Gcloud(emulator.base_url, tmp_path / "gcloud-config", project=PROJECT, zone=ZONE)
        not_ready = f"The resource 'projects/{PROJECT}/zones/{ZONE}/instances/gc-booting' is not ready"
        for verb in ("stop", "delete"):
            result = gcloud.run("compute", "instances", verb, "gc-booting", "--quiet", check=False)
            assert result.returncode != 0 and not_ready in result.stderr, (verb, result.stderr)
        assert describe(gcloud, "gc-booting")["status"] in ("PROVISIONING", "STAGING")
