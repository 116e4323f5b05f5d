"""See a run: a small local run (one preemption, one failed item) on a stack of its own, then its report in a real browser.

The run starts its own stack in its project folder and stops it at its end,
as `cflow demo` does for a new user. After it: the summary names the failed
item by its fields with its log as a file; Debian's chromium (headless)
renders report.html with no script error, one timeline row per VM and one
bar per attempt, and takes a PNG of it; and `cflow status/logs/list/report`
work on the run with no stack running, starting nothing that stays.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cflow.local.stack import LocalStack
from tests.helpers import wait_until

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0", "--hide-scrollbars"]

TASK = r'''
import json, os, sys, time, urllib.request
mode, args = sys.argv[1], sys.argv[2:]
if mode == "poison":
    print("poison: always failing")
    sys.exit(7)
if mode == "slow":
    rendezvous = args[0]
    request = urllib.request.Request("http://%s/computeMetadata/v1/instance/name" % os.environ["GCE_METADATA_HOST"],
                                     headers={"Metadata-Flavor": "Google"})
    vm = urllib.request.urlopen(request, timeout=5).read().decode()
    runs = len([n for n in os.listdir(rendezvous) if n.startswith("started-")])
    with open(os.path.join(rendezvous, "started-%d" % runs), "w") as stream:
        stream.write(json.dumps({"vm": vm}))
    while not os.path.exists(os.path.join(rendezvous, "release")):
        time.sleep(0.1)
time.sleep(0.5)
with open(os.path.join(os.environ["CFLOW_OUTPUT_DIR"], "out.txt"), "w") as stream:
    stream.write(mode + "\n")
'''


class FinishedRun:
    """The run's folder, its stack folder, its id and what scheduler.py printed."""

    def __init__(self, root: Path, run_id: str, stdout: str, stderr: str, status: int, preempted_vm: str) -> None:
        self.root, self.run_id, self.stdout, self.stderr, self.status = root, run_id, stdout, stderr, status
        self.stack_dir = root / "stack"
        self.preempted_vm = preempted_vm
        self.report = root / "output" / run_id / "report.html"

    def cflow(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cflow", *args, "--config", str(self.root / "const.py"),
                               "--stack-dir", str(self.stack_dir)],
                              cwd=self.root, capture_output=True, text=True, timeout=timeout, env=environment())


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    for name in ("PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST", "CFLOW_COMPUTE_ENDPOINT"):
        env.pop(name, None)  # the run finds its own stack
    return env


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("see-a-run")
    for name in ("init.sh", "startup-signal.py", "shutdown-signal.py"):
        shutil.copy2(REPO / name, root / name)
    (root / "task").mkdir()
    (root / "task" / "t.py").write_text(TASK)
    rendezvous = root / "rendezvous"
    rendezvous.mkdir()
    settings = {"TASK_MODULE_CMD": "python3 task/t.py", "TASKS": "tasks.txt", "WORKER_NODE_CNT": 2, "MAX_ATTEMPTS": 2,
                "TASK_TIMEOUT": 120, "LEASE_SECONDS": 10, "VM_TYPE": "e2-small", "VM_SPOT": True}
    (root / "const.py").write_text("".join(f"{name} = {value!r}\n" for name, value in settings.items()))
    (root / "tasks.txt").write_text(f"echo fine\npoison bad\nslow {rendezvous}\n")
    scheduler = subprocess.Popen([sys.executable, str(REPO / "scheduler.py"), "--stack-dir", str(root / "stack")], cwd=root,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
    try:
        stack = wait_until(lambda: LocalStack(root / "stack").info(), 120, "the run's own stack to start")
        first = wait_until(lambda: (rendezvous / "started-0").exists() and json.loads((rendezvous / "started-0").read_text()),
                           120, "the slow item to start")
        from cflow.gcp.clients import build_local_compute

        compute = build_local_compute(stack.compute_endpoint, stack.compute_token_file)
        compute.instances().simulateMaintenanceEvent(project=stack.project, zone=stack.zone, instance=first["vm"]).execute()
        wait_until(lambda: (rendezvous / "started-1").exists(), 120, "the slow item to run again on another VM")
        (rendezvous / "release").touch()
        stdout, stderr = scheduler.communicate(timeout=240)
    finally:
        if scheduler.poll() is None:
            scheduler.kill()
            scheduler.wait()
    run_id = re.search(r"^run id: (\S+)$", stdout, re.MULTILINE)
    assert run_id, (stdout, stderr)
    return FinishedRun(root, run_id.group(1), stdout, stderr, scheduler.returncode, first["vm"])


def stored_history(run: FinishedRun):
    """The run's spans and VM records, read back from the stack's folder (its stack is not running)."""
    from cflow.gcp.clients import build_storage_client
    from cflow.gcp.storage import RunStorage
    from cflow.history import vm_records_from_document
    from cflow.local.stored_runs import stack_storage

    with stack_storage(run.stack_dir) as served:
        saved = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = served.url
        try:
            storage = RunStorage(build_storage_client("local", "cflow-local"), "cflow-local-cflow", run.run_id)
            return storage.list_spans(), vm_records_from_document(storage.read_vm_history())
        finally:
            if saved is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = saved


def test_the_summary_names_the_failed_item_by_its_fields_and_ends_with_the_report(finished_run):
    assert finished_run.status == 1, finished_run.stderr  # one item failed
    assert "2 done, 1 failed" in finished_run.stderr
    assert "preemptions: 1" in finished_run.stderr
    log_file = (finished_run.stack_dir / "gcs" / "cflow-local-cflow" / "cflow" / "runs" / finished_run.run_id / "logs"
                / "000001" / "attempt-2.log")
    assert f"failed: item 000001 (poison bad): exit status 7; log: {log_file}" in finished_run.stderr.splitlines()
    assert log_file.read_text().startswith("poison: always failing")
    assert finished_run.stdout.rstrip().splitlines()[-1] == f"report: {finished_run.report} (open it in a browser)"
    assert not (finished_run.stack_dir / "stack.json").exists()  # the stack the run started is stopped


def test_the_run_keeps_each_attempt_and_each_vm(finished_run):
    spans, vms = stored_history(finished_run)

    by_item = sorted((span.item, span.attempt, span.outcome.value) for span in spans)
    assert by_item == [("000000", 1, "done"), ("000001", 1, "retry"), ("000001", 2, "failed"),
                       ("000002", 1, "done"), ("000002", 1, "preempted")]
    preempted = next(span for span in spans if span.outcome == "preempted")
    assert preempted.vm == finished_run.preempted_vm
    rerun = next(span for span in spans if span.item == "000002" and span.outcome == "done")
    assert rerun.vm != preempted.vm and rerun.started >= preempted.ended - 1
    assert {span.vm for span in spans} <= {record.name for record in vms}
    records = {record.name: record for record in vms}
    assert records[finished_run.preempted_vm].preempted is not None
    assert all(record.spot and record.machine_type == "e2-small" and record.gone is not None for record in vms)
    # Also a VM preempted before any listing showed it is known from its worker's events.
    assert all(record.created <= record.first_seen <= record.running <= record.gone for record in vms)


def chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    profile = cwd / f"chromium-profile-{time.monotonic_ns()}"
    try:
        return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120, cwd=cwd)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`apt-get install chromium`; .ci/run installs it)")
def test_the_report_renders_in_a_real_browser_with_one_row_per_vm_and_one_bar_per_attempt(finished_run, tmp_path):
    spans, vms = stored_history(finished_run)
    url = finished_run.report.as_uri()

    dom = chromium("--dump-dom", url, cwd=tmp_path)

    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []  # no script error, no console message at all
    root = re.search(r"<html[^>]*>", dom.stdout)
    assert root is not None, dom.stdout[:500]
    attributes = dict(re.findall(r'([-\w]+)="([^"]*)"', root.group(0)))
    assert attributes.get("data-script") == "ok" and "data-script-error" not in attributes
    assert attributes["data-report"] == finished_run.run_id
    assert int(attributes["data-rows"]) == len(vms) >= 2
    assert int(attributes["data-bars"]) == len(spans) == 5
    for outcome in ("done", "retry", "failed", "preempted"):
        assert f'data-outcome="{outcome}"' in dom.stdout

    png = tmp_path / "report.png"
    shot = chromium("--window-size=1300,1800", f"--screenshot={png}", url, cwd=tmp_path)

    assert shot.returncode == 0, shot.stderr[-2000:]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1300, 1800)
    assert len(data) > 50_000  # a page with content, not a blank one


def test_after_the_run_status_logs_list_and_report_work_with_no_stack_running(finished_run):
    started = time.monotonic()
    status = finished_run.cflow("status", finished_run.run_id)
    status_seconds = time.monotonic() - started

    assert status.returncode == 0, status.stderr
    assert re.search(r"^state:\s+finished$", status.stdout, re.MULTILINE)
    assert "000001 (poison bad): exit status 7 after 2 attempt(s); log: " in status.stdout
    logs = finished_run.cflow("logs", finished_run.run_id, "000001")
    assert (logs.returncode, logs.stdout.splitlines()[0]) == (0, "poison: always failing")
    listing = finished_run.cflow("list")
    assert listing.returncode == 0 and finished_run.run_id in listing.stdout
    before = finished_run.report.stat().st_mtime_ns
    again = finished_run.cflow("report", finished_run.run_id)
    assert again.returncode == 0, again.stderr
    assert finished_run.report.stat().st_mtime_ns > before
    assert not (finished_run.stack_dir / "stack.json").exists()
    print(f"`cflow status` with no stack running: {status_seconds:.2f} s (a new Python process)")
