"""Chaos on the local stack: a throwaway project whose task keeps a ledger of every execution.

The task (``task/t.py``) takes ``MODE LEDGER_DIR ...`` as its item fields and
appends one line per start and per end to ``LEDGER_DIR/ledger.log`` (one
``write`` with O_APPEND each, so lines from parallel VMs never mix). Modes:

- ``work SECONDS``: sleep, then write its result line.
- ``flaky SECONDS``: fail attempt 1, then behave as ``work``.
- ``poison``: always exit 7.
- ``hang PID_DIR``: start a child (in the task's process group), record both
  pids in PID_DIR, and sleep forever (for TASK_TIMEOUT).
- ``slow RENDEZVOUS``: write RENDEZVOUS/started-ITEM-N (VM, pid, attempt) and
  wait until RENDEZVOUS/release-ITEM or RENDEZVOUS/release exists.

Every finishing execution writes ``result.jsonl`` (one JSON line: id, mode,
attempt) to its output folder, so the combined result shows each item once.
"""

import contextlib
import json
import os
import shlex
from pathlib import Path

import pytest

from cflow.local.stack import ComputeOptions, LocalStack
from tests.e2e.conftest import Project, run_id_of, run_vms  # noqa: F401  (re-exported for the tests)
from tests.helpers import wait_until  # noqa: F401  (re-exported for the tests)

CHAOS_TASK = r'''
import json, os, subprocess, sys, time, urllib.request
mode, ledger_dir, args = sys.argv[1], sys.argv[2], sys.argv[3:]
item = os.environ["CFLOW_TASK_ID"]
attempt = int(os.environ["CFLOW_ATTEMPT"])

def vm_name():
    request = urllib.request.Request(
        "http://%s/computeMetadata/v1/instance/name" % os.environ["GCE_METADATA_HOST"],
        headers={"Metadata-Flavor": "Google"})
    return urllib.request.urlopen(request, timeout=5).read().decode()

def note(event, **fields):
    line = json.dumps({"event": event, "item": item, "attempt": attempt, "pid": os.getpid(),
                       "time": time.time(), **fields}) + "\n"
    fd = os.open(os.path.join(ledger_dir, "ledger.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)

note("start", mode=mode)
if mode == "flaky" and attempt == 1:
    note("fail")
    print("flaky: failing my first attempt")
    sys.exit(1)
if mode == "poison":
    note("fail")
    print("poison: always failing")
    sys.exit(7)
if mode == "hang":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    with open(os.path.join(args[0], "%s-%d.pids" % (item, attempt)), "w") as stream:
        stream.write("%d %d" % (os.getpid(), child.pid))
    time.sleep(3600)
if mode == "slow":
    rendezvous = args[0]
    runs = len([n for n in os.listdir(rendezvous) if n.startswith("started-%s-" % item)])
    with open(os.path.join(rendezvous, "started-%s-%d" % (item, runs)), "w") as stream:
        stream.write(json.dumps({"vm": vm_name(), "attempt": attempt, "pid": os.getpid()}))
    while not (os.path.exists(os.path.join(rendezvous, "release-" + item))
               or os.path.exists(os.path.join(rendezvous, "release"))):
        time.sleep(0.05)
if mode in ("work", "flaky"):
    time.sleep(float(args[0]))
with open(os.path.join(os.environ["CFLOW_OUTPUT_DIR"], "result.jsonl"), "w") as stream:
    stream.write(json.dumps({"id": item, "mode": mode, "attempt": attempt}) + "\n")
note("end")
'''


class ChaosProject(Project):
    """A project folder whose task keeps the ledger described above."""

    def __init__(self, root, stack):
        super().__init__(root, stack)
        (root / "task" / "t.py").write_text(CHAOS_TASK)
        self.ledger_dir = root / "ledger"
        self.ledger_dir.mkdir()
        self.rendezvous = root / "rendezvous"
        self.rendezvous.mkdir()
        self.pid_dir = root / "pids"
        self.pid_dir.mkdir()
        self.stdout_path = root / "scheduler.out"
        self.stderr_path = root / "scheduler.err"

    def line(self, mode, *args):
        """A tasks.txt line for one item of ``mode``."""
        extra = {"hang": [str(self.pid_dir)], "slow": [str(self.rendezvous)]}.get(mode, [])
        return shlex.join([mode, str(self.ledger_dir), *extra, *map(str, args)])

    def write_items(self, lines, **settings):
        self.write("\n".join(lines) + "\n", **settings)

    def start(self, *extra):
        """Start scheduler.py with its output in files (so a test can read them while it runs)."""
        import subprocess
        import sys

        from tests.e2e.conftest import REPO

        command = [sys.executable, str(REPO / "scheduler.py"), "--config", str(self.root / "const.py"),
                   "--stack-dir", self.stack.dir, *extra]
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            return subprocess.Popen(command, cwd=self.root, stdout=out, stderr=err, text=True, env=self.environment())

    def output(self):
        return self.stdout_path.read_text(), self.stderr_path.read_text()

    def ledger(self):
        path = self.ledger_dir / "ledger.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def starts(self, item_id):
        return [entry for entry in self.ledger() if entry["item"] == item_id and entry["event"] == "start"]

    def release(self, item_id=None):
        (self.rendezvous / (f"release-{item_id}" if item_id else "release")).touch()

    def started(self, item_id):
        """{run number: record} of the slow item's executions so far."""
        found = {}
        for path in self.rendezvous.glob(f"started-{item_id}-*"):
            with contextlib.suppress(ValueError):
                found[int(path.name.rsplit("-", 1)[1])] = json.loads(path.read_text())
        return found


def assert_each_item_once(project, run_id, item_ids):
    """The combined result holds exactly one line per item, in item order."""
    results = project.results(run_id)
    assert [r["id"] for r in results] == list(item_ids), results


def is_done(storage, item_id):
    """``storage.is_done`` that answers False while the run has not made its bucket yet."""
    from cflow.errors import NotFound

    try:
        return storage.is_done(item_id)
    except NotFound:
        return False


def item_ids(count):
    return [f"{index:06d}" for index in range(count)]


@contextlib.contextmanager
def stopped_on_exit(process):
    """Kill a scheduler a test started if the test ends first (it is our own child, by pid)."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


class StackClients:
    """Storage and Pub/Sub clients pointed at one local stack (endpoints set while building them)."""

    def __init__(self, info, monkeypatch):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import pubsub_v1, storage

        from cflow.gcp.clients import build_local_compute

        for name, value in info.env().items():
            monkeypatch.setenv(name, value)
        self.info = info
        self.storage = storage.Client(project=info.project, credentials=AnonymousCredentials())
        self.publisher = pubsub_v1.PublisherClient()
        self.subscriber = pubsub_v1.SubscriberClient()
        self.compute = build_local_compute(info.compute_endpoint, info.compute_token_file)

    def run_storage(self, run_id, bucket=None):
        from cflow.gcp.storage import RunStorage

        return RunStorage(self.storage, bucket or f"{self.info.project}-cflow", run_id)

    def pubsub(self):
        from cflow.gcp.pubsub import PubSub

        return PubSub(self.publisher, self.subscriber)

    def subscription_exists(self, subscription):
        from google.api_core import exceptions

        try:
            self.subscriber.get_subscription(subscription=subscription)
            return True
        except exceptions.NotFound:
            return False

    def vms(self, run_id=None):
        selector = f"labels.cflow-run = {run_id}" if run_id else "labels.cflow-role = worker"
        request = self.compute.instances().aggregatedList(project=self.info.project, filter=selector)
        response = request.execute(num_retries=6)
        return [vm for scoped in response.get("items", {}).values() for vm in scoped.get("instances", [])]


def vm_dirs(stack_info, vm_name=None):
    """The disk folders of the stack's VMs (kept after deletion), optionally of one VM."""
    root = Path(stack_info.dir) / "compute" / "vms"
    pattern = f"{vm_name}-*" if vm_name else "*"
    return sorted(path for path in root.glob(pattern) if path.is_dir())


def worker_processes(stack_info, vm_name):
    """Pids of the live startup-signal.py processes running on ``vm_name``."""
    disks = [str(path) + "/" for path in vm_dirs(stack_info, vm_name)]
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        words = [word.decode(errors="replace") for word in cmdline if word]
        if any(word.endswith("startup-signal.py") and any(word.startswith(disk) for disk in disks) for word in words):
            found.append(int(entry.name))
    return found


def process_alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_exit(process, timeout):
    try:
        return process.wait(timeout=timeout)
    except Exception:
        process.kill()
        process.wait()
        raise


@pytest.fixture
def project(tmp_path, local_stack):
    return ChaosProject(tmp_path, local_stack)


@pytest.fixture
def clients(local_stack, monkeypatch):
    return StackClients(local_stack, monkeypatch)


def start_stack(tmp_path_factory, name, **options):
    """A stack of its own with Compute faults (shared by one module's tests). Returns (LocalStack, StackInfo)."""
    stack = LocalStack(tmp_path_factory.mktemp(name))
    return stack, stack.up(ComputeOptions(**options))

