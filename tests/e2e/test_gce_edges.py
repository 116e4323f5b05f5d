"""A run that survives GCE: whole runs of scheduler.py against the Compute emulator's policies, quotas and limits.

Each scenario asserts the end state: the exit status, the one line the user
reads, and that no VM of the run is left (listed through the Compute API).
Three stacks of their own, each with the emulator's switches as GCE's edges
(one per module fixture, so each starts once):

- ``network_stack``: ``--no-default-network --deny-external-ip``;
- ``quota_stack``: ``--quota IN_USE_ADDRESSES=2``, and Spot quota granted
  but too small in us-central1 (``us-central1:PREEMPTIBLE_CPUS=1``) and
  capped at 0 in us-east1 (``us-east1:PREEMPTIBLE_CPUS=0``);
- ``limits_stack``: ``--rate-limit-per-minute 120 --boot-delay 6`` (and
  resourceNotReady, on by default).
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cflow.gcp import layout
from tests.chaos.conftest import StackClients, start_stack, stopped_on_exit
from tests.e2e.conftest import REPO, Project, run_id_of
from tests.helpers import wait_until

pytestmark = pytest.mark.stack

NETWORK = "batch"


def stack_with(tmp_path_factory, name, **options):
    """A stack of the module's own with these emulator switches (``ComputeOptions`` fields). Returns (LocalStack, StackInfo)."""
    return start_stack(tmp_path_factory, name, **options)


@pytest.fixture(scope="module")
def network_stack(tmp_path_factory):
    stack, info = stack_with(tmp_path_factory, "gce-network", no_default_network=True, deny_external_ip=True, shutdown_grace=2)
    try:
        yield info
    finally:
        stack.down()


@pytest.fixture(scope="module")
def quota_stack(tmp_path_factory):
    stack, info = stack_with(tmp_path_factory, "gce-quota", shutdown_grace=2,
                             quota=("IN_USE_ADDRESSES=2", "us-central1:PREEMPTIBLE_CPUS=1", "us-east1:PREEMPTIBLE_CPUS=0"))
    try:
        yield info
    finally:
        stack.down()


@pytest.fixture(scope="module")
def limits_stack(tmp_path_factory):
    stack, info = stack_with(tmp_path_factory, "gce-limits", rate_limit_per_minute=120, boot_delay=6.0, shutdown_grace=2)
    try:
        yield info
    finally:
        stack.down()


def error_line(err):
    """The one error line scheduler.py printed (and no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("scheduler.py: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0][len("scheduler.py: error: "):]


def run_objects(clients, run_id):
    bucket = f"{clients.info.project}-cflow"
    return [blob.name for blob in clients.storage.list_blobs(bucket, prefix=layout.run_prefix(run_id))]


def create_network(clients, name):
    """An auto-mode network of the stack's project (as `gcloud compute networks create NAME --subnet-mode=auto`)."""
    networks = clients.compute.networks()
    operation = networks.insert(project=clients.info.project, body={"name": name, "autoCreateSubnetworks": True}).execute()
    wait_until(lambda: clients.compute.globalOperations().get(project=clients.info.project, operation=operation["name"]).execute()
               .get("status") == "DONE", 30, f"network {name}")


# ---------------------------------------------------------------- networks and policies


def test_a_project_without_the_default_network_is_refused_before_anything_is_created(network_stack, tmp_path, monkeypatch):
    clients = StackClients(network_stack, monkeypatch)
    project = Project(tmp_path, network_stack)
    project.write("echo a\n")

    status, out, err = project.run(timeout=120)

    assert status == 2, err
    run_id = run_id_of(out)
    assert error_line(err) == (
        f"VM_NETWORK: network 'default' does not exist in project {network_stack.project}; create it "
        "(gcloud compute networks create default --subnet-mode=auto) or set VM_NETWORK in const.py")
    assert clients.vms(run_id) == []
    assert run_objects(clients, run_id) == []  # nothing uploaded either


def test_a_policy_against_external_ips_ends_the_run_in_one_line_naming_vm_external_ip(network_stack, tmp_path, monkeypatch):
    clients = StackClients(network_stack, monkeypatch)
    create_network(clients, NETWORK)
    project = Project(tmp_path, network_stack)
    project.write("echo a\necho b\n", VM_NETWORK=NETWORK, WORKER_NODE_CNT=2)

    status, out, err = project.run(timeout=180)

    assert status == 2, err
    run_id = run_id_of(out)
    line = error_line(err)
    assert line.startswith("VM_EXTERNAL_IP: Compute Engine refused to create the run's workers (GCE: CONDITION_NOT_MET: "), line
    assert "constraints/compute.vmExternalIpAccess" in line and "set VM_EXTERNAL_IP = False" in line
    assert clients.vms(run_id) == []
    assert clients.run_storage(run_id).read_cancelled() is not None  # cancelled cleanly: topics gone, outputs kept


def test_with_vm_network_set_and_no_external_ip_the_run_completes(network_stack, tmp_path, monkeypatch):
    clients = StackClients(network_stack, monkeypatch)
    if NETWORK not in [network["name"] for network in
                       clients.compute.networks().list(project=network_stack.project).execute().get("items", [])]:
        create_network(clients, NETWORK)
    project = Project(tmp_path, network_stack)
    project.write("echo a\necho b\necho c\n", VM_NETWORK=NETWORK, VM_EXTERNAL_IP=False, WORKER_NODE_CNT=2)

    status, out, err = project.run(timeout=240)

    assert status == 0, err
    run_id = run_id_of(out)
    assert [r["args"] for r in project.results(run_id)] == [["a"], ["b"], ["c"]]
    assert clients.vms(run_id) == []


# ---------------------------------------------------------------- quotas


def vm_names_made(info, run_id):
    """The names of every VM the run ever had: the emulator keeps each VM's disk folder (NAME-ID) after it is gone."""
    return sorted({path.name.rsplit("-", 1)[0] for path in (Path(info.dir) / "compute" / "vms").glob(f"*-{run_id}-*") if path.is_dir()})


def test_an_address_quota_for_two_runs_six_workers_on_two_with_a_warning(quota_stack, tmp_path, monkeypatch):
    clients = StackClients(quota_stack, monkeypatch)
    project = Project(tmp_path, quota_stack)
    project.write("".join(f"echo item-{n}\n" for n in range(8)), WORKER_NODE_CNT=6, VM_SPOT=False)

    status, out, err = project.run(timeout=240)

    assert status == 0, err
    run_id = run_id_of(out)
    warnings = [line for line in err.splitlines() if line.startswith("warning: quota:")]
    assert warnings == [f"warning: quota: 2 of 6 workers fit (IN_USE_ADDRESSES in us-central1: limit 2, 0 in use, 1 per worker); "
                        f"the run goes on with 2; ask for more at https://console.cloud.google.com/iam-admin/quotas?project="
                        f"{quota_stack.project}, or set VM_EXTERNAL_IP = False"], err
    assert len(project.results(run_id)) == 8
    assert len(vm_names_made(quota_stack, run_id)) == 2
    assert clients.vms(run_id) == []


def test_spot_workers_with_no_preemptible_quota_for_one_are_refused_before_anything_is_created(quota_stack, tmp_path, monkeypatch):
    """PREEMPTIBLE_CPUS=1 is preemptible quota granted (above 0), so Spot VMs count there, as on GCE: an e2-small needs 2."""
    clients = StackClients(quota_stack, monkeypatch)
    project = Project(tmp_path, quota_stack)
    project.write("echo a\n", VM_SPOT=True, VM_TYPE="e2-small")

    status, out, err = project.run(timeout=120)

    assert status == 2, err
    run_id = run_id_of(out)
    assert error_line(err) == (
        "quota: no worker fits (PREEMPTIBLE_CPUS in us-central1: limit 1, 0 in use, 2 per worker); ask for more at "
        f"https://console.cloud.google.com/iam-admin/quotas?project={quota_stack.project}, or lower WORKER_NODE_CNT or pick a smaller VM_TYPE")
    assert clients.vms(run_id) == [] and run_objects(clients, run_id) == []


def test_spot_workers_against_a_preemptible_quota_of_0_end_the_run_in_one_line_with_no_vm_made(quota_stack, tmp_path, monkeypatch):
    """regions.get shows PREEMPTIBLE_CPUS 0 alike for a project never granted Spot quota (Spot VMs then count in CPUS, as GCE
    documents) and for a grant capped at 0 (the emulator's --quota PREEMPTIBLE_CPUS=0): the preflight cannot tell them
    apart, so GCE's refusal of the first bulkInsert decides. A limit of 0 holds no worker ever: the run is cancelled
    before any VM exists."""
    clients = StackClients(quota_stack, monkeypatch)
    project = Project(tmp_path, quota_stack)
    project.write("echo a\n", VM_SPOT=True, VM_TYPE="e2-small", VM_ZONE="us-east1-b", VM_FALLBACK_ZONES=[])

    status, out, err = project.run(timeout=180)

    assert status == 2, err
    run_id = run_id_of(out)
    line = error_line(err)
    assert line.startswith("no worker fits the PREEMPTIBLE_CPUS quota in us-east1 (limit 0) (GCE: quotaExceeded: "
                           "Quota 'PREEMPTIBLE_CPUS' exceeded. Limit: 0.0 in region us-east1.); ask for more quota"), line
    assert vm_names_made(quota_stack, run_id) == [] and clients.vms(run_id) == []
    assert clients.run_storage(run_id).read_cancelled() is not None


# ---------------------------------------------------------------- rate limit, resourceNotReady, a controller gone for good


def start(project):
    """Start scheduler.py with its output in files (read while it runs; a pipe nobody reads could stall it)."""
    command = [sys.executable, str(REPO / "scheduler.py"), "--config", str(project.root / "const.py"), "--stack-dir", project.stack.dir]
    with open(project.root / "scheduler.out", "w") as out, open(project.root / "scheduler.err", "w") as err:
        return subprocess.Popen(command, cwd=project.root, stdout=out, stderr=err, text=True, env=project.environment())


def started_run_id(project):
    text = (project.root / "scheduler.out").read_text()
    return run_id_of(text) if "run id: " in text else None


def cflow(project, *args):
    """`python -m cflow ARGS` on the project's const.py and stack; returns the CompletedProcess."""
    command = [sys.executable, "-m", "cflow", *args, "--config", str(project.root / "const.py"), "--stack-dir", project.stack.dir]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=project.environment(), cwd=project.root)


def vms_column(listing, run_id):
    row = next(line for line in listing.splitlines() if line.startswith(run_id))
    return row.rsplit("  ", 1)[-1].strip()


def test_a_run_completes_under_the_projects_rate_limit(limits_stack, tmp_path, monkeypatch):
    clients = StackClients(limits_stack, monkeypatch)
    project = Project(tmp_path, limits_stack)
    project.write("".join(f"echo item-{n}\n" for n in range(6)), WORKER_NODE_CNT=3)

    status, out, err = project.run(timeout=300)

    assert status == 0, err
    run_id = run_id_of(out)
    assert len(project.results(run_id)) == 6
    assert clients.vms(run_id) == []


def test_a_cancel_while_the_workers_still_boot_leaves_nothing(limits_stack, tmp_path, monkeypatch):
    """Deleting a VM that is still PROVISIONING or STAGING is answered resourceNotReady: it is asked again until gone."""
    clients = StackClients(limits_stack, monkeypatch)
    project = Project(tmp_path, limits_stack)
    project.write("echo a\necho b\necho c\n", WORKER_NODE_CNT=3)
    with stopped_on_exit(start(project)) as scheduler:
        run_id = wait_until(lambda: started_run_id(project), 60, "the run id")
        booting = wait_until(lambda: [vm["status"] for vm in clients.vms(run_id)], 60, "the run's VMs", interval=0.1)
        cancel = cflow(project, "cancel", run_id, "--yes")
        scheduler.wait(timeout=120)

    assert cancel.returncode == 0, cancel.stderr
    assert set(booting) <= {"PROVISIONING", "STAGING"}, booting  # the cancel met VMs still booting
    assert clients.vms(run_id) == []


def test_a_controller_killed_for_good_leaves_workers_that_gce_deletes_at_max_run_hours(limits_stack, tmp_path, monkeypatch):
    clients = StackClients(limits_stack, monkeypatch)
    rendezvous = tmp_path / "rendezvous"
    rendezvous.mkdir()
    project = Project(tmp_path, limits_stack)
    max_run_seconds = 40
    project.write(f"slow {rendezvous}\nslow {rendezvous}\n", WORKER_NODE_CNT=2, MAX_RUN_HOURS=max_run_seconds / 3600)

    with stopped_on_exit(start(project)) as scheduler:
        wait_until(lambda: list(rendezvous.glob("started-*")), 120, "a worker to start its item")
        run_id = started_run_id(project)
        os.kill(scheduler.pid, signal.SIGKILL)  # the controller is gone for good: no resume, no cancel
        scheduler.wait()
    assert clients.vms(run_id), "the workers outlive their controller"
    assert vms_column(cflow(project, "list").stdout, run_id) in ("1 alive", "2 alive")

    wait_until(lambda: clients.vms(run_id) == [], max_run_seconds + 60, "GCE to delete the workers at MAX_RUN_HOURS", interval=1.0)
    assert vms_column(cflow(project, "list").stdout, run_id) == "-"
