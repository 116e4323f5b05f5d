"""Compute API faults: 429/503 on a fifth of the calls, a zone that stocks out, a CPU quota."""

import logging
import time

import pytest
from googleapiclient.errors import HttpError

from tests.chaos.conftest import ChaosProject, StackClients, assert_each_item_once, item_ids, run_id_of, start_stack

pytestmark = pytest.mark.stack

# us-central1-a holds one VM; the region's quota holds three e2-small (2 vCPUs each).
FAULTS = dict(error_rate=0.2, seed=11, zone_capacity=("us-central1-a=1",), cpu_quota=6, shutdown_grace=2)


@pytest.fixture(scope="module")
def faulty_stack(tmp_path_factory):
    stack, info = start_stack(tmp_path_factory, "faulty-stack", **FAULTS)
    try:
        yield info
    finally:
        stack.down()


@pytest.fixture
def project(tmp_path, faulty_stack):
    return ChaosProject(tmp_path, faulty_stack)


def test_run_finishes_through_api_errors_stockout_and_quota(project):
    # Enough work that the fleet grows into the stockout, then the quota, before the queue drains.
    count = 20
    project.write_items([project.line("work", 1.0) for _ in range(count)], WORKER_NODE_CNT=4,
                        VM_ZONE="us-central1-a", VM_FALLBACK_ZONES=["us-central1-b"])

    status, out, err = project.run()

    assert status == 0, err
    assert "Traceback" not in err
    assert_each_item_once(project, run_id_of(out), item_ids(count))
    assert "zone us-central1-a has no capacity (stockout); trying the next zone" in err, err
    assert "VM(s) in us-central1-b" in err, err
    # The quota is told once: the preflight reads it (regions.get) and the fleet stays within it.
    quota_lines = [line for line in err.splitlines() if line.startswith(("quota: ", "warning: quota: "))]
    assert len(quota_lines) == 1 and "CPUS in us-central1: limit 6" in quota_lines[0], err
    assert "the run goes on with 3" in quota_lines[0], err


def test_every_compute_call_of_the_seam_rides_out_injected_errors(faulty_stack, monkeypatch, caplog):
    from cflow.gcp.compute import Compute, Vm

    clients = StackClients(faulty_stack, monkeypatch)
    project_id = faulty_stack.project
    # The faults are really there: bare calls without retries fail now and then.
    refused = 0
    for _ in range(40):
        try:
            clients.compute.zones().get(project=project_id, zone="us-central1-b").execute(num_retries=0)
        except HttpError as error:
            assert error.resp.status in (429, 503)
            refused += 1
    assert refused > 0

    compute = Compute(clients.compute, project_id)
    run_id = "0101-0000-f417"
    properties = plain_worker_properties(run_id)
    names = [f"chaos-{run_id}-{n}" for n in range(2)]
    pending = compute.bulk_insert("us-central1-b", names, properties)
    deadline = time.monotonic() + 60
    while (errors := compute.creation_result(pending)) is None:
        assert time.monotonic() < deadline, "the bulkInsert operation never finished"
        time.sleep(0.2)
    assert errors == []
    vms = compute.list_run_vms(run_id)
    assert sorted(vm.name for vm in vms) == names

    compute.delete_vms(vms)
    deadline = time.monotonic() + 60
    while compute.list_run_vms(run_id):
        assert time.monotonic() < deadline, "the VMs were never deleted"
        time.sleep(0.2)

    # Batched deletes are not retried by the client: each refused call is sent again until it gets its answer
    # (here 404, as the VMs are gone, which is a warning and not an error).
    gone = [Vm(name=f"chaos-{run_id}-gone-{n}", zone="us-central1-b", status="RUNNING", status_message="", labels={})
            for n in range(20)]
    with caplog.at_level(logging.WARNING, logger="cflow.gcp.compute"):
        compute.delete_vms(vms + gone)
    messages = [record.getMessage() for record in caplog.records if record.name == "cflow.gcp.compute"]
    assert sum("was already gone" in message for message in messages) == len(vms) + len(gone), messages
    assert not [message for message in messages if "failed" in message]


def plain_worker_properties(run_id):
    """A worker's instance properties with no scripts: the VMs boot and sit."""
    return {
        "machineType": "e2-small",
        "labels": {"cflow-run": run_id, "cflow-role": "worker"},
        "disks": [{"boot": True, "autoDelete": True,
                   "initializeParams": {"sourceImage": "projects/debian-cloud/global/images/family/debian-12"}}],
        "networkInterfaces": [{"network": "global/networks/default"}],
    }
