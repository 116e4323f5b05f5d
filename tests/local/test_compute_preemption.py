"""Compute emulator: Spot preemption and live migration (simulateMaintenanceEvent)."""

import glob
import os
import threading
import urllib.request

import pytest
from googleapiclient.errors import HttpError

from tests.helpers import instance_body, wait_operation, wait_until

PROJECT = "preemption-project"
ZONE = "us-east1-b"
# The shutdown script asks the metadata server, as a real shutdown hook does.
SHUTDOWN = (
    "curl -s -H 'Metadata-Flavor: Google' http://$GCE_METADATA_HOST/computeMetadata/v1/instance/preempted > preempted.txt\n"
    "kill -0 $(cat startup.pid) && echo alive > worker-alive.txt\n"
)
STARTUP = "echo $$ > startup.pid; echo $GCE_METADATA_HOST > mds.txt; sleep 1000"


def vm_file(state_dir, name, file_name):
    path = wait_until(lambda: glob.glob(os.path.join(state_dir, "vms", f"{name}-*", file_name)), what=f"{name}/{file_name}")[0]
    wait_until(lambda: os.path.getsize(path) > 0, what=f"{path} written")
    with open(path) as handle:
        return handle.read().strip()


def create(compute, name, **options):
    body = instance_body(name, zone=ZONE, startup_script=STARTUP, shutdown_script=SHUTDOWN, **options)
    wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=body).execute())


def get(compute, name):
    return compute.instances().get(project=PROJECT, zone=ZONE, instance=name).execute()


def test_a_spot_vm_is_preempted_runs_its_shutdown_script_and_terminates(compute, state_dir):
    create(compute, "spot-1", spot=True)
    assert get(compute, "spot-1")["scheduling"]["provisioningModel"] == "SPOT"
    host = vm_file(state_dir, "spot-1", "mds.txt")
    seen = {}
    url = f"http://{host}/computeMetadata/v1/instance/preempted"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Metadata-Flavor": "Google"}), timeout=10) as current:
        assert current.read() == b"FALSE"
        etag = current.headers["ETag"]

    def watch_preempted():
        # With last_etag the watch cannot miss a change that lands before it is sent.
        request = urllib.request.Request(f"{url}?wait_for_change=true&last_etag={etag}&timeout_sec=30", headers={"Metadata-Flavor": "Google"})
        seen["preempted"] = urllib.request.urlopen(request, timeout=40).read().decode()

    watcher = threading.Thread(target=watch_preempted)
    watcher.start()
    compute.instances().simulateMaintenanceEvent(project=PROJECT, zone=ZONE, instance="spot-1").execute()

    terminated = wait_until(lambda: (vm := get(compute, "spot-1"))["status"] == "TERMINATED" and vm, timeout=15, what="TERMINATED")
    assert terminated["statusMessage"] == "Instance was preempted."
    watcher.join(10)
    assert seen["preempted"] == "TRUE"
    assert vm_file(state_dir, "spot-1", "preempted.txt") == "TRUE"
    # The shutdown script ran while the worker was still alive, as GCE's hook does.
    assert vm_file(state_dir, "spot-1", "worker-alive.txt") == "alive"
    operations = compute.zoneOperations().list(project=PROJECT, zone=ZONE, filter="operationType = compute.instances.preempted").execute()["items"]
    assert [op["targetLink"].rsplit("/", 1)[1] for op in operations] == ["spot-1"]
    assert operations[0]["status"] == "DONE"


def test_a_spot_vm_with_delete_action_is_deleted_on_preemption(compute, state_dir):
    create(compute, "spot-2", spot=True, termination_action="DELETE")
    compute.instances().simulateMaintenanceEvent(project=PROJECT, zone=ZONE, instance="spot-2").execute()

    def gone():
        try:
            get(compute, "spot-2")
            return False
        except HttpError as error:
            return error.resp.status == 404

    wait_until(gone, timeout=15, what="spot-2 deleted")
    assert vm_file(state_dir, "spot-2", "preempted.txt") == "TRUE"


def test_a_standard_vm_is_live_migrated_and_keeps_running(compute, state_dir):
    create(compute, "standard-1")
    pid = int(vm_file(state_dir, "standard-1", "startup.pid"))
    operation = compute.instances().simulateMaintenanceEvent(project=PROJECT, zone=ZONE, instance="standard-1").execute()
    assert wait_operation(compute, PROJECT, ZONE, operation).get("error") is None
    migration_filter = "operationType = compute.instances.migrateOnHostMaintenance"
    migrations = compute.zoneOperations().list(project=PROJECT, zone=ZONE, filter=migration_filter).execute()["items"]
    assert [op["targetLink"].rsplit("/", 1)[1] for op in migrations] == ["standard-1"]
    assert get(compute, "standard-1")["status"] == "RUNNING"
    assert os.path.exists(f"/proc/{pid}")
    assert not glob.glob(os.path.join(state_dir, "vms", "standard-1-*", "preempted.txt"))


def test_maintenance_on_a_terminated_vm_is_refused(compute):
    create(compute, "standard-2")
    wait_operation(compute, PROJECT, ZONE, compute.instances().stop(project=PROJECT, zone=ZONE, instance="standard-2").execute())
    with pytest.raises(HttpError) as refused:
        compute.instances().simulateMaintenanceEvent(project=PROJECT, zone=ZONE, instance="standard-2").execute()
    assert refused.value.resp.status == 400
