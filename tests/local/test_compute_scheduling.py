"""Compute emulator: ``scheduling`` as GCE takes and refuses it, time limits that end VMs, and instances.setScheduling.

Time limits are honoured by an in-process emulator whose clocks the test
moves forward, so a 60-second limit runs out at once.
"""

import datetime
import json
import threading
import time
from typing import Any

import pytest
from googleapiclient.errors import HttpError

from cflow.local.compute.emulator import ComputeEmulator, EmulatorOptions
from cflow.local.compute.resources import rfc3339
from tests.helpers import compute_client, instance_body, wait_operation, wait_until
from tests.local.test_compute_schema import DISCOVERY, check

PROJECT = "scheduling-project"
ZONE = "europe-west1-b"
FIELD = "resource.scheduling"
HOUR = {"seconds": "3600"}


def refused(call):
    with pytest.raises(HttpError) as caught:
        call.execute()
    return caught.value


def google_error(error):
    body = json.loads(error.content)["error"]
    assert body["errors"][0]["message"] == body["message"]
    return error.resp.status, body["errors"][0]["reason"], body["message"]


def insert(compute, name, scheduling, zone=ZONE, **options):
    body = instance_body(name, zone=zone, **options)
    body["scheduling"] = scheduling
    return compute.instances().insert(project=PROJECT, zone=zone, body=body)


def in_an_hour():
    """An hour from now, as GCE shows timestamps (milliseconds, an offset)."""
    return rfc3339(time.time() + 3600)


SPOT_MESSAGE = "Scheduling must have preemptible be false when AutomaticRestart is true."
MIGRATE_MESSAGE = "Scheduling must have preemptible be false when OnHostMaintenance isn't TERMINATE."
STANDARD_ACTION_MESSAGE = (
    "You cannot specify a termination action for a VM instance that has the standard provisioning model (default). "
    "To use instance termination action, the VM instance must use the Spot, Reservation-Bound or Flex Start provisioning model."
)
DURATION_MESSAGE = "The run duration must be between 30 seconds and 120 days (10368000 seconds)."
RFC3339_MESSAGE = "Must be a timestamp in RFC 3339 text format, e.g. 2030-01-02T03:04:05Z."
LEGACY_MESSAGE = "Preemptible VMs do not support a time limit; use a Spot VM (provisioningModel SPOT) instead."

# (refused scheduling, GCE's status, reason and message; the accepted one next to it, what GET shows of it)
Pair = tuple[dict[str, Any], tuple[int, str, str], dict[str, Any], dict[str, Any]]
PAIRS: dict[str, Pair] = {
    "spot-restart": (
        {"provisioningModel": "SPOT", "automaticRestart": True},
        (400, "invalid", f"Invalid value for field '{FIELD}.preemptible': 'true'. {SPOT_MESSAGE}"),
        {"provisioningModel": "SPOT", "automaticRestart": False},
        {"provisioningModel": "SPOT", "preemptible": True, "automaticRestart": False, "onHostMaintenance": "TERMINATE", "instanceTerminationAction": "STOP"},
    ),
    "preemptible-migrate": (
        {"preemptible": True, "onHostMaintenance": "MIGRATE", "automaticRestart": False},
        (400, "invalid", f"Invalid value for field '{FIELD}.preemptible': 'true'. {MIGRATE_MESSAGE}"),
        {"preemptible": True, "onHostMaintenance": "TERMINATE", "automaticRestart": False},
        {"preemptible": True, "onHostMaintenance": "TERMINATE", "automaticRestart": False},
    ),
    "preemptible-standard": (
        {"preemptible": True, "provisioningModel": "STANDARD"},
        (400, "invalid", f"Invalid value for field '{FIELD}.provisioningModel': 'STANDARD'. For preemptible, only allowed provisioning_model value is SPOT."),
        {"preemptible": True, "provisioningModel": "SPOT"},
        {"preemptible": True, "provisioningModel": "SPOT", "instanceTerminationAction": "STOP"},
    ),
    "action-without-limit": (
        {"instanceTerminationAction": "DELETE"},
        (400, "invalid", f"Invalid value for field '{FIELD}.instanceTerminationAction': 'DELETE'. {STANDARD_ACTION_MESSAGE}"),
        {"instanceTerminationAction": "DELETE", "maxRunDuration": HOUR},
        {"provisioningModel": "STANDARD", "automaticRestart": True, "instanceTerminationAction": "DELETE", "maxRunDuration": HOUR},
    ),
    "limit-without-action": (
        {"maxRunDuration": HOUR},
        (400, "required", f"Required field '{FIELD}.instanceTerminationAction' not specified"),
        {"provisioningModel": "SPOT", "maxRunDuration": HOUR},
        {"provisioningModel": "SPOT", "instanceTerminationAction": "STOP", "maxRunDuration": HOUR},
    ),
    "limit-too-short": (
        {"maxRunDuration": {"seconds": "29"}, "instanceTerminationAction": "STOP"},
        (400, "invalid", f"Invalid value for field '{FIELD}.maxRunDuration': '29s'. {DURATION_MESSAGE}"),
        {"maxRunDuration": {"seconds": "30", "nanos": 500}, "instanceTerminationAction": "STOP"},
        {"maxRunDuration": {"seconds": "30", "nanos": 500}},
    ),
    "limit-too-long": (
        {"maxRunDuration": {"seconds": str(120 * 86400 + 1)}, "instanceTerminationAction": "STOP"},
        (400, "invalid", f"Invalid value for field '{FIELD}.maxRunDuration': '10368001s'. {DURATION_MESSAGE}"),
        {"maxRunDuration": {"seconds": 120 * 86400}, "instanceTerminationAction": "STOP"},
        {"maxRunDuration": {"seconds": "10368000"}},
    ),
    "bad-nanos": (
        {"maxRunDuration": {"seconds": "60", "nanos": 1_000_000_000}, "instanceTerminationAction": "STOP"},
        (400, "invalid", f"Invalid value for field '{FIELD}.maxRunDuration.nanos': '1000000000'. Must be from 0 to 999999999 inclusive."),
        {"maxRunDuration": {"seconds": "60", "nanos": 999_999_999}, "instanceTerminationAction": "STOP"},
        {"maxRunDuration": {"seconds": "60", "nanos": 999_999_999}},
    ),
    "termination-time-in-the-past": (
        {"terminationTime": "2020-01-01T00:00:00Z", "instanceTerminationAction": "STOP"},
        (400, "invalid", f"Invalid value for field '{FIELD}.terminationTime': '2020-01-01T00:00:00Z'. The termination time must be in the future."),
        {"terminationTime": "FUTURE", "instanceTerminationAction": "STOP"},
        {"terminationTime": "FUTURE", "instanceTerminationAction": "STOP"},
    ),
    "termination-time-not-rfc3339": (
        {"terminationTime": "tomorrow", "instanceTerminationAction": "DELETE"},
        (400, "invalid", f"Invalid value for field '{FIELD}.terminationTime': 'tomorrow'. {RFC3339_MESSAGE}"),
        {"terminationTime": "FUTURE", "instanceTerminationAction": "DELETE"},
        {"terminationTime": "FUTURE", "instanceTerminationAction": "DELETE"},
    ),
    "limit-on-legacy-preemptible": (
        {"preemptible": True, "maxRunDuration": HOUR, "instanceTerminationAction": "DELETE"},
        (400, "invalid", f"Invalid value for field '{FIELD}.maxRunDuration': ''. {LEGACY_MESSAGE}"),
        {"provisioningModel": "SPOT", "maxRunDuration": HOUR, "instanceTerminationAction": "DELETE"},
        {"provisioningModel": "SPOT", "preemptible": True, "maxRunDuration": HOUR, "instanceTerminationAction": "DELETE"},
    ),
}


def with_future(scheduling, future):
    return {key: (future if value == "FUTURE" else value) for key, value in scheduling.items()}


@pytest.mark.parametrize("case", sorted(PAIRS))
def test_gce_refuses_the_combination_and_takes_its_neighbour(compute, case):
    refused_scheduling, expected, accepted_scheduling, shown = PAIRS[case]
    name = f"sched-{case}"
    assert google_error(refused(insert(compute, name, refused_scheduling))) == expected
    future = in_an_hour()
    wait_operation(compute, PROJECT, ZONE, insert(compute, name, with_future(accepted_scheduling, future)).execute())
    instance = compute.instances().get(project=PROJECT, zone=ZONE, instance=name).execute()
    for key, value in with_future(shown, future).items():
        assert instance["scheduling"][key] == value, key
    time_limited = "maxRunDuration" in shown or "terminationTime" in shown
    assert ("resourceStatus" in instance) == time_limited
    wait_operation(compute, PROJECT, ZONE, compute.instances().delete(project=PROJECT, zone=ZONE, instance=name).execute())


def test_bulk_insert_applies_the_same_rules(compute):
    properties = instance_body("unused", zone=ZONE)
    properties.pop("name")
    properties["machineType"] = "e2-small"
    properties["scheduling"] = {"instanceTerminationAction": "DELETE"}
    body = {"count": 1, "namePattern": "sched-bulk-#", "instanceProperties": properties}
    error = refused(compute.instances().bulkInsert(project=PROJECT, zone=ZONE, body=body))
    field = "bulkInsertInstanceResource.instanceProperties.scheduling.instanceTerminationAction"
    assert google_error(error) == (400, "invalid", f"Invalid value for field '{field}': 'DELETE'. {STANDARD_ACTION_MESSAGE}")


# Time limits, on an emulator whose clocks the test moves.


class SteppedClock:
    """Real time plus an offset the test adds to: the emulator's wall clock and monotonic clock move together."""

    def __init__(self) -> None:
        self.offset = 0.0

    def wall(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


class SteppedEmulator:
    """An in-process emulator and its clock; ``advance`` moves time on and returns once every timer then due has run."""

    def __init__(self, state_dir) -> None:
        self.clock = SteppedClock()
        options = EmulatorOptions(state_dir=str(state_dir), shutdown_grace_s=5)
        self.emulator = ComputeEmulator(options, wall_clock=self.clock.wall, monotonic=self.clock.monotonic)
        self.compute = compute_client(self.emulator.start())

    def advance(self, seconds: float) -> None:
        self.clock.offset += seconds
        # Timers run one after another in due order: once this one has run, all those due before it have.
        caught_up = threading.Event()
        assert self.emulator.engine is not None
        self.emulator.engine.core.timers.call_later(0, caught_up.set)
        assert caught_up.wait(10)

    def instance(self, name):
        try:
            return self.compute.instances().get(project=PROJECT, zone=ZONE, instance=name).execute()
        except HttpError as error:
            if error.resp.status == 404:
                return None
            raise


@pytest.fixture
def stepped(tmp_path):
    emulator = SteppedEmulator(tmp_path / "state")
    try:
        yield emulator
    finally:
        emulator.emulator.stop()


def timestamp(text):
    return datetime.datetime.fromisoformat(text).timestamp()


def shutdown_marker(tmp_path, name):
    marker = tmp_path / f"{name}.shutdown"
    return marker, f"echo ran > {marker}"


@pytest.mark.stack
def test_max_run_duration_deletes_the_vm_after_its_shutdown_script(stepped, tmp_path):
    marker, script = shutdown_marker(tmp_path, "limited")
    scheduling = {"maxRunDuration": {"seconds": "60"}, "instanceTerminationAction": "DELETE"}
    inserted = insert(stepped.compute, "limited", scheduling, startup_script="sleep 1000", shutdown_script=script).execute()
    wait_operation(stepped.compute, PROJECT, ZONE, inserted)
    instance = stepped.instance("limited")
    deadline = instance["resourceStatus"]["scheduling"]["terminationTimestamp"]
    assert timestamp(deadline) == pytest.approx(timestamp(instance["lastStartTimestamp"]) + 60, abs=0.01)

    stepped.advance(59)
    assert stepped.instance("limited")["status"] == "RUNNING"
    stepped.advance(2)
    wait_until(lambda: stepped.instance("limited") is None, 30, "the VM deleted at its time limit")
    assert marker.read_text() == "ran\n"
    operations = stepped.compute.zoneOperations().list(project=PROJECT, zone=ZONE).execute()["items"]
    system = [operation for operation in operations if operation["user"] == "system"]
    assert [(operation["operationType"], operation["status"]) for operation in system] == [("delete", "DONE")]
    assert system[0]["targetLink"].endswith("/instances/limited")


@pytest.mark.stack
def test_max_run_duration_stops_the_vm_and_counts_again_from_each_start(stepped, tmp_path):
    marker, script = shutdown_marker(tmp_path, "stopper")
    spot = {"provisioningModel": "SPOT", "maxRunDuration": {"seconds": "60"}}  # a Spot VM stops by default
    wait_operation(stepped.compute, PROJECT, ZONE, insert(stepped.compute, "stopper", spot, startup_script="sleep 1000", shutdown_script=script).execute())
    stepped.advance(61)
    wait_until(lambda: stepped.instance("stopper")["status"] == "TERMINATED", 30, "the VM stopped at its time limit")
    stopped = stepped.instance("stopper")
    assert marker.read_text() == "ran\n" and "resourceStatus" not in stopped and "statusMessage" not in stopped

    wait_operation(stepped.compute, PROJECT, ZONE, stepped.compute.instances().start(project=PROJECT, zone=ZONE, instance="stopper").execute())
    restarted = stepped.instance("stopper")
    deadline = timestamp(restarted["resourceStatus"]["scheduling"]["terminationTimestamp"])
    assert deadline == pytest.approx(timestamp(restarted["lastStartTimestamp"]) + 60, abs=0.01)
    stepped.advance(61)
    wait_until(lambda: stepped.instance("stopper")["status"] == "TERMINATED", 30, "the VM stopped again 60 s after its restart")


@pytest.mark.stack
def test_termination_time_stops_the_vm_and_a_later_start_is_refused(stepped):
    at = datetime.datetime.fromtimestamp(int(stepped.clock.wall()) + 120, datetime.UTC).isoformat().replace("+00:00", "Z")
    scheduling = {"terminationTime": at, "instanceTerminationAction": "STOP"}
    wait_operation(stepped.compute, PROJECT, ZONE, insert(stepped.compute, "until", scheduling, startup_script="sleep 1000").execute())
    instance = stepped.instance("until")
    # GCE writes it back as it writes every timestamp.
    assert instance["scheduling"]["terminationTime"] == at.replace("Z", ".000+00:00")
    assert timestamp(instance["resourceStatus"]["scheduling"]["terminationTimestamp"]) == timestamp(at)
    stepped.advance(121)
    wait_until(lambda: stepped.instance("until")["status"] == "TERMINATED", 30, "the VM stopped at its termination time")
    error = refused(stepped.compute.instances().start(project=PROJECT, zone=ZONE, instance="until"))
    shown = at.replace("Z", ".000+00:00")
    message = f"Invalid value for field 'scheduling.terminationTime': '{shown}'. The termination time must be in the future."
    assert google_error(error) == (400, "invalid", message)


# instances.setScheduling.


def set_scheduling(compute, name, body):
    return compute.instances().setScheduling(project=PROJECT, zone=ZONE, instance=name, body=body)


def test_set_scheduling_changes_the_time_limit_of_a_stopped_vm_only(compute):
    name = "sched-later"
    wait_operation(compute, PROJECT, ZONE, insert(compute, name, None, startup_script="sleep 1000").execute())
    # The host maintenance policy may change while the VM runs...
    wait_operation(compute, PROJECT, ZONE, set_scheduling(compute, name, {"onHostMaintenance": "TERMINATE"}).execute())
    scheduling = compute.instances().get(project=PROJECT, zone=ZONE, instance=name).execute()["scheduling"]
    assert scheduling["onHostMaintenance"] == "TERMINATE" and scheduling["provisioningModel"] == "STANDARD"
    # ...a time limit only once it is TERMINATED.
    limit = {"maxRunDuration": HOUR, "instanceTerminationAction": "DELETE"}
    status, reason, message = google_error(refused(set_scheduling(compute, name, limit)))
    assert (status, reason) == (400, "invalidResourceUsage") and "scheduling.instanceTerminationAction" in message and "TERMINATED" in message
    wait_operation(compute, PROJECT, ZONE, compute.instances().stop(project=PROJECT, zone=ZONE, instance=name).execute())
    operation = wait_operation(compute, PROJECT, ZONE, set_scheduling(compute, name, limit).execute())
    assert operation["operationType"] == "setScheduling" and "error" not in operation
    scheduling = compute.instances().get(project=PROJECT, zone=ZONE, instance=name).execute()["scheduling"]
    assert scheduling["maxRunDuration"] == HOUR and scheduling["instanceTerminationAction"] == "DELETE"
    assert scheduling["onHostMaintenance"] == "TERMINATE"  # what the change did not name stays

    # The result obeys the same rules as an insert...
    error = refused(set_scheduling(compute, name, {"provisioningModel": "SPOT", "automaticRestart": True}))
    assert google_error(error) == (400, "invalid", f"Invalid value for field 'scheduling.preemptible': 'true'. {SPOT_MESSAGE}")
    # ...and null clears a field, as gcloud's --clear-* flags send it.
    wait_operation(compute, PROJECT, ZONE, set_scheduling(compute, name, {"maxRunDuration": None, "instanceTerminationAction": None}).execute())
    scheduling = compute.instances().get(project=PROJECT, zone=ZONE, instance=name).execute()["scheduling"]
    assert "maxRunDuration" not in scheduling and "instanceTerminationAction" not in scheduling
    wait_operation(compute, PROJECT, ZONE, compute.instances().delete(project=PROJECT, zone=ZONE, instance=name).execute())


def test_time_limited_vms_and_set_scheduling_fit_the_discovery_schemas(compute):
    with open(DISCOVERY) as handle:
        schemas = json.load(handle)["schemas"]
    scheduling = {"provisioningModel": "SPOT", "maxRunDuration": {"seconds": "600", "nanos": 5}, "terminationTime": in_an_hour()}
    wait_operation(compute, PROJECT, ZONE, insert(compute, "sched-schema", scheduling).execute())
    check(compute.instances().get(project=PROJECT, zone=ZONE, instance="sched-schema").execute(), {"$ref": "Instance"}, schemas, "Instance")
    wait_operation(compute, PROJECT, ZONE, compute.instances().stop(project=PROJECT, zone=ZONE, instance="sched-schema").execute())
    operation = set_scheduling(compute, "sched-schema", {"instanceTerminationAction": "DELETE"}).execute()
    check(operation, {"$ref": "Operation"}, schemas, "Operation")
    check(compute.instances().get(project=PROJECT, zone=ZONE, instance="sched-schema").execute(), {"$ref": "Instance"}, schemas, "Instance")
    wait_operation(compute, PROJECT, ZONE, compute.instances().delete(project=PROJECT, zone=ZONE, instance="sched-schema").execute())
