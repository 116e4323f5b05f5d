"""A throwaway CFlow project folder per test, run against the session's local stack."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# One task for every scenario, chosen by the item's first field. It writes one
# JSON line to result.jsonl, so the combined result shows each item's argv.
TEST_TASK = r'''
import json, os, sys, time, urllib.request
mode, args = sys.argv[1], sys.argv[2:]
attempt = int(os.environ["CFLOW_ATTEMPT"])
if mode == "flaky" and attempt == 1:
    print("flaky: failing my first attempt")
    sys.exit(1)
if mode == "poison":
    print("poison: always failing")
    sys.exit(7)
if mode == "slow":
    rendezvous = args[0]
    request = urllib.request.Request(
        "http://%s/computeMetadata/v1/instance/name" % os.environ["GCE_METADATA_HOST"],
        headers={"Metadata-Flavor": "Google"})
    vm = urllib.request.urlopen(request, timeout=5).read().decode()
    runs = len([n for n in os.listdir(rendezvous) if n.startswith("started-")])
    with open(os.path.join(rendezvous, "started-%d" % runs), "w") as stream:
        stream.write(json.dumps({"vm": vm, "attempt": attempt}))
    while not os.path.exists(os.path.join(rendezvous, "release")):
        time.sleep(0.1)
with open(os.path.join(os.environ["CFLOW_OUTPUT_DIR"], "result.jsonl"), "w") as stream:
    stream.write(json.dumps({"id": os.environ["CFLOW_TASK_ID"], "mode": mode, "args": args, "attempt": attempt}) + "\n")
'''


class Project:
    """A CFlow project folder: const.py, tasks, task/, and the worker scripts."""

    def __init__(self, root, stack):
        self.root = root
        self.stack = stack
        for name in ("init.sh", "startup-signal.py", "shutdown-signal.py"):
            shutil.copy2(REPO / name, root / name)
        (root / "task").mkdir()
        (root / "task" / "t.py").write_text(TEST_TASK)
        self.settings = {
            "TASK_MODULE_CMD": "python3 task/t.py",
            "TASKS": "tasks.txt",
            "WORKER_NODE_CNT": 3,
            "MAX_ATTEMPTS": 3,
            "TASK_TIMEOUT": 120,
            "LEASE_SECONDS": 10,
            "VM_TYPE": "e2-small",
        }

    def write(self, tasks_text, **settings):
        self.settings.update(settings)
        lines = [f"{name} = {value!r}" for name, value in self.settings.items()]
        (self.root / "const.py").write_text("\n".join(lines) + "\n")
        (self.root / "tasks.txt").write_text(textwrap.dedent(tasks_text))

    def run(self, *extra, timeout=240):
        """Run scheduler.py as a user does; returns (exit status, stdout, stderr)."""
        command = [sys.executable, str(REPO / "scheduler.py"), "--config", str(self.root / "const.py"),
                   "--stack-dir", self.stack.dir, *extra]
        result = subprocess.run(command, cwd=self.root, capture_output=True, text=True, timeout=timeout,
                                env=self.environment())
        return result.returncode, result.stdout, result.stderr

    def start(self, *extra):
        command = [sys.executable, str(REPO / "scheduler.py"), "--config", str(self.root / "const.py"),
                   "--stack-dir", self.stack.dir, *extra]
        return subprocess.Popen(command, cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.environment())

    def environment(self):
        environment = dict(os.environ)
        environment["PYTHONPATH"] = str(REPO)
        return environment

    def results(self, run_id):
        path = self.root / "output" / run_id / "result.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]


def run_id_of(stdout):
    for line in stdout.splitlines():
        if line.startswith("run id: "):
            return line[len("run id: "):].strip()
    raise AssertionError(f"no run id printed in {stdout!r}")


@pytest.fixture
def project(tmp_path, local_stack):
    return Project(tmp_path, local_stack)


@pytest.fixture
def compute(local_stack):
    from cflow.gcp.clients import build_local_compute

    return build_local_compute(local_stack.compute_endpoint, local_stack.compute_token_file)


def run_vms(compute, project_id, run_id=None):
    selector = f"labels.cflow-run = {run_id}" if run_id else "labels.cflow-role = worker"
    response = compute.instances().aggregatedList(project=project_id, filter=selector).execute()
    return [vm for scoped in response.get("items", {}).values() for vm in scoped.get("instances", [])]
