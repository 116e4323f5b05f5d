"""VMs on a real Debian 12 root (``--vm-root debian-12``): the stock boot path for real.

Marked ``slow`` (run by default; ``-m "not slow"`` leaves them out): the
first use builds the root with debootstrap (about a minute, cached in
~/.cache/cflow/vm-roots/), and the controller makes the workers' wheelhouse
once with pip download (cached in ~/.cache/cflow/wheelhouse/); a stock worker
installs the Google clients from it, with no index. They skip, saying
why, where VMs cannot run on a real root: not root, no overlayfs, no
unshare/nsenter, or no debootstrap and no cached root.
"""

import glob
import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cflow.gcp.clients import build_local_compute
from cflow.local.compute import rootfs
from cflow.local.stack import ComputeOptions, LocalStack
from cflow.wheelhouse import WheelhouseCache, WheelhouseSpec
from tests.e2e.conftest import REPO, Project, run_id_of, run_vms
from tests.helpers import compute_client, compute_emulator_process, instance_body, wait_operation, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

DEBIAN = rootfs.RECIPES["debian-12"]
# The task reports what it sees of the VM it runs on.
FACTS_TASK = r'''
import glob, json, os, sys
release = dict(line.rstrip("\n").split("=", 1) for line in open("/etc/os-release") if "=" in line)
pubsub = sorted(os.path.basename(p) for p in glob.glob("/opt/cflow/venv/lib/python3*/site-packages/google_cloud_pubsub-*.dist-info"))
facts = {
    "id": os.environ["CFLOW_TASK_ID"],
    "args": sys.argv[1:],
    "os": release.get("VERSION_ID", "").strip('"'),
    "hostname": open("/etc/hostname").read().strip(),
    "emulated": os.environ.get("CFLOW_EMULATED_VM"),
    "pubsub": pubsub,
}
with open(os.path.join(os.environ["CFLOW_OUTPUT_DIR"], "result.jsonl"), "w") as stream:
    stream.write(json.dumps(facts) + "\n")
'''


def unavailable_reason():
    """Why VMs cannot run on a real root here, or None."""
    problem = rootfs.host_problem()
    if problem:
        return problem
    if not rootfs.RootCache().cached(DEBIAN) and shutil.which("debootstrap") is None:
        return "debootstrap is missing and the debian-12 root is not cached; apt-get install debootstrap (.ci/run does)"
    return None


@pytest.fixture(scope="module")
def debian_stack(tmp_path_factory):
    """A local stack whose VMs run on the Debian 12 root."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"VMs on a real root cannot run here: {reason}")
    stack = LocalStack(tmp_path_factory.mktemp("debian-stack"))
    info = stack.up(ComputeOptions(shutdown_grace=5, vm_root="debian-12"))
    try:
        yield info
    finally:
        stack.down()


def test_a_spot_worker_on_debian_12_boots_the_stock_way_and_runs_a_run_to_the_combined_output(debian_stack, tmp_path):
    project = Project(tmp_path, debian_stack)
    (tmp_path / "task" / "t.py").write_text(FACTS_TASK)
    project.write("one a\ntwo b\nthree c\n", WORKER_NODE_CNT=1, VM_SPOT=True, VM_BOOT="stock")

    status, out, err = project.run(timeout=900)

    assert status == 0, err
    run_id = run_id_of(out)
    results = project.results(run_id)
    assert [result["args"] for result in results] == [["one", "a"], ["two", "b"], ["three", "c"]]
    pubsub = f"google_cloud_pubsub-{importlib.metadata.version('google-cloud-pubsub')}.dist-info"
    for result in results:
        # Debian 12, the VM's own hostname, the GCE code path, and the pinned clients that init.sh installed.
        assert result["os"] == "12" and result["hostname"].startswith("cflow-")
        assert result["emulated"] is None
        assert result["pubsub"] == [pubsub]
    (disk,) = glob.glob(os.path.join(debian_stack.dir, "compute", "vms", f"*-{run_id}-0001-*"))
    init_log = (Path(disk) / "root" / "root" / "cflow" / "init.log").read_text()
    assert "cflow init: installing the Google client packages from the wheelhouse into /opt/cflow/venv (no index)" in init_log
    assert run_vms(build_local_compute(debian_stack.compute_endpoint, debian_stack.compute_token_file), debian_stack.project, run_id) == []


# The task reports the routes its VM has and whether it reaches a package registry (by name, as pip and apt-get do).
NO_ROUTE_TASK = r'''
import json, os, socket, sys
def reach(host, port):
    try:
        socket.create_connection((host, port), timeout=5).close()
        return "reached"
    except OSError as error:
        return type(error).__name__
with open("/proc/net/route") as table:
    routes = [line.split()[:2] for line in table.read().splitlines()[1:]]
facts = {"args": sys.argv[1:], "routes": routes, "pypi": reach("pypi.org", 443), "debian": reach("deb.debian.org", 80),
         "venv": os.access("/opt/cflow/venv/bin/python3", os.X_OK)}
with open(os.path.join(os.environ["CFLOW_OUTPUT_DIR"], "result.jsonl"), "w") as stream:
    stream.write(json.dumps(facts) + "\n")
'''
# In a network namespace of its own with only loopback up: a local stack on a
# real root, the run, and the stack stopped however the run ends.
NO_ROUTE_RUN = r'''set -eu
ip link set lo up
trap '"$PYTHON" -m cflow local down --dir "$STACK" >/dev/null 2>&1' EXIT
"$PYTHON" -m cflow local up --dir "$STACK" --vm-root debian-12 >/dev/null
"$PYTHON" "$SCHEDULER" --config "$CONFIG" --stack-dir "$STACK"
'''


def test_a_stock_worker_boots_and_works_with_no_route_to_any_package_registry(tmp_path):
    reason = unavailable_reason() or (None if shutil.which("ip") else "iproute2's ip is missing")
    if reason:
        pytest.skip(f"VMs on a real root cannot run here: {reason}")
    # The controller makes the wheelhouse while it has the network, once per set of versions...
    WheelhouseCache().ensure(WheelhouseSpec.for_this_controller())
    project = Project(tmp_path, stack=None)
    (tmp_path / "task" / "t.py").write_text(NO_ROUTE_TASK)
    project.write("one a\ntwo b\n", WORKER_NODE_CNT=1, VM_BOOT="stock")
    # ...then the whole run, its stack and its VM live in a network namespace whose only interface is loopback:
    # no route leads anywhere else, so nothing it runs can reach a package registry.
    environment = {**project.environment(), "PYTHON": sys.executable, "STACK": str(tmp_path / "stack"),
                   "SCHEDULER": str(REPO / "scheduler.py"), "CONFIG": str(tmp_path / "const.py")}
    result = subprocess.run(["unshare", "--net", "--", "bash", "-c", NO_ROUTE_RUN], cwd=tmp_path, capture_output=True, text=True,
                            timeout=900, env=environment)

    assert result.returncode == 0, result.stderr
    assert "downloading the workers' packages" not in result.stderr  # the controller used its cache
    run_id = run_id_of(result.stdout)
    results = project.results(run_id)
    assert [facts["args"] for facts in results] == [["one", "a"], ["two", "b"]]
    for facts in results:
        assert facts["routes"] == []  # not even a default route
        assert facts["pypi"] != "reached" and facts["debian"] != "reached"
        assert facts["venv"] is True
    (disk,) = glob.glob(os.path.join(tmp_path, "stack", "compute", "vms", f"*-{run_id}-0001-*"))
    init_log = (Path(disk) / "root" / "root" / "cflow" / "init.log").read_text()
    assert "cflow init: installing the Google client packages from the wheelhouse into /opt/cflow/venv (no index)" in init_log
    assert "sha256 checked" in init_log


def test_cflow_image_build_on_the_root_bakes_what_the_build_vm_installed(debian_stack, tmp_path):
    project = Project(tmp_path, debian_stack)
    (tmp_path / "task" / "t.py").write_text(FACTS_TASK)
    project.write("one a\n", WORKER_NODE_CNT=1)
    command = [sys.executable, "-m", "cflow", "image", "build", "--family", "root-fam", "--config", str(tmp_path / "const.py"),
               "--stack-dir", debian_stack.dir]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=project.environment())
    assert result.returncode == 0, result.stderr
    # The real path: the build VM installs the workers' wheelhouse through init.sh, not the emulated one's host packages.
    assert "from the workers' wheelhouse (init.sh, no package index)" in result.stderr and "emulated" not in result.stderr
    (tree,) = glob.glob(os.path.join(debian_stack.dir, "compute", "images", debian_stack.project, "root-fam-*"))
    assert os.access(os.path.join(tree, "root", "opt", "cflow", "venv", "bin", "python3"), os.X_OK)

    project.write("one a\ntwo b\n", VM_BOOT="image", VM_IMAGE_NAME="family/root-fam")
    status, out, err = project.run(timeout=600)

    assert status == 0, err
    run_id = run_id_of(out)
    assert [result["args"] for result in project.results(run_id)] == [["one", "a"], ["two", "b"]]
    (disk,) = glob.glob(os.path.join(debian_stack.dir, "compute", "vms", f"*-{run_id}-0001-*"))
    init_log = (Path(disk) / "root" / "root" / "cflow" / "init.log").read_text()
    assert "cflow init: using the preinstalled packages in /opt/cflow/venv" in init_log
    assert "installing the Google client packages" not in init_log


def serial(compute, project, zone, name):
    return compute.instances().getSerialPortOutput(project=project, zone=zone, instance=name).execute()["contents"]


def test_an_image_of_a_vm_on_the_root_carries_what_it_wrote_and_what_it_deleted(debian_stack):
    compute = build_local_compute(debian_stack.compute_endpoint, debian_stack.compute_token_file)
    project, zone = "root-images", "us-central1-a"
    bake = "set -e; mkdir -p /opt/baked; echo baked-content > /opt/baked/hello.txt; rm /etc/debian_version; echo baked-ok"
    wait_operation(compute, project, zone, compute.instances().insert(project=project, zone=zone, body=instance_body("bake-1", startup_script=bake)).execute())
    wait_until(lambda: "startup-script exit status 0" in serial(compute, project, zone, "bake-1"), timeout=60, what="the bake script")
    wait_operation(compute, project, zone, compute.instances().stop(project=project, zone=zone, instance="bake-1").execute())
    operation = compute.images().insert(project=project, body={"name": "baked", "sourceDisk": f"zones/{zone}/disks/bake-1"}).execute()
    wait_until(lambda: compute.globalOperations().get(project=project, operation=operation["name"]).execute()["status"] == "DONE", what="the image")

    check = "cat /opt/baked/hello.txt; if [ -e /etc/debian_version ]; then echo version-present; else echo version-deleted; fi; cat /etc/hostname"
    body = instance_body("from-image", startup_script=check)
    body["disks"][0]["initializeParams"]["sourceImage"] = f"projects/{project}/global/images/baked"
    wait_operation(compute, project, zone, compute.instances().insert(project=project, zone=zone, body=body).execute())
    text = wait_until(lambda: "startup-script exit status 0" in (found := serial(compute, project, zone, "from-image")) and found, timeout=60, what="the check")
    assert "startup-script: baked-content" in text
    assert "startup-script: version-deleted" in text
    assert "startup-script: from-image" in text
    for name in ("bake-1", "from-image"):
        wait_operation(compute, project, zone, compute.instances().delete(project=project, zone=zone, instance=name).execute())


def test_stop_and_start_keep_the_vms_disk_and_give_it_a_fresh_namespace(debian_stack):
    compute = build_local_compute(debian_stack.compute_endpoint, debian_stack.compute_token_file)
    project, zone = "root-restart", "us-central1-a"
    script = "echo boot >> /var/boots.txt; echo boots=$(wc -l < /var/boots.txt) mounts=$(grep -c ' /dev/pts ' /proc/self/mounts)"
    body = instance_body("again", startup_script=script)
    wait_operation(compute, project, zone, compute.instances().insert(project=project, zone=zone, body=body).execute())
    wait_until(lambda: "startup-script: boots=1 mounts=1" in serial(compute, project, zone, "again"), timeout=60, what="the first boot")
    wait_operation(compute, project, zone, compute.instances().stop(project=project, zone=zone, instance="again").execute())
    wait_operation(compute, project, zone, compute.instances().start(project=project, zone=zone, instance="again").execute())
    wait_until(lambda: "startup-script: boots=2 mounts=1" in serial(compute, project, zone, "again"), timeout=60, what="the second boot")
    wait_operation(compute, project, zone, compute.instances().delete(project=project, zone=zone, instance="again").execute())


def vm_processes(state_dir):
    """Pids whose root or working directory is inside ``state_dir`` (processes of a VM on a real root)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for link in ("root", "cwd"):
            try:
                if os.readlink(f"/proc/{pid}/{link}").startswith(str(state_dir)):
                    found.append(int(pid))
                    break
            except OSError:
                continue
    return found


def mounts_under(state_dir):
    """Mount points under ``state_dir`` that any process still sees."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/mountinfo") as mountinfo:
                found.update(line.split()[4] for line in mountinfo if line.split()[4].startswith(str(state_dir)))
        except OSError:
            continue
    return found


def test_a_killed_emulator_leaves_no_process_and_no_mount_of_its_vms(debian_stack, tmp_path):
    # debian_stack: the root is built and the host can run VMs on it.
    with compute_emulator_process("--state-dir", tmp_path, "--vm-root", "debian-12", start_timeout_s=120) as emulator:
        compute = compute_client(emulator.base_url)
        project, zone = "root-orphans", "us-central1-a"
        script = "setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo started; sleep 1000"
        body = instance_body("orphan", startup_script=script)
        wait_operation(compute, project, zone, compute.instances().insert(project=project, zone=zone, body=body).execute())
        wait_until(lambda: "startup-script: started" in serial(compute, project, zone, "orphan"), timeout=60, what="the VM's script")
        assert len(vm_processes(tmp_path)) >= 2 and mounts_under(tmp_path)
        emulator.process.send_signal(signal.SIGKILL)
        emulator.process.wait(10)
        wait_until(lambda: not vm_processes(tmp_path), timeout=20, what="the watchdog to kill every VM process")
        wait_until(lambda: not mounts_under(tmp_path), timeout=20, what="the VM's mounts to go with its namespace")
