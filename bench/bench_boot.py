"""Benchmark 3: worker boot, from the VM's insert to its first pull, on the local stack.

    python3 bench/bench_boot.py [--sequential 5] [--together 12] [--vm-root debian-12] [--init-script FILE]

A run is prepared as the scheduler prepares it (package uploaded, run.json,
topics), then worker VMs are created with CFlow's own bulkInsert and instance
properties (init.sh as the startup script):

- one at a time (--sequential VMs, each inserted once the previous one pulls):
  the boot of a VM on a quiet machine;
- together (--together VMs in one bulkInsert, as a run starts its fleet):
  boots competing for this machine's cores.

Insert time is taken just before the bulkInsert call; the rest comes from the
VM's own logs (home/cflow/init.log and worker.log under the VM's disk folder
in the stack's compute/vms/): init.sh's "starting", "package ready" and
"starting the worker" stamps, and the worker's "worker NAME on run RUN" line,
which it logs just before its first pull.

With --vm-root the VMs boot on a real root and take the stock path: the run's
wheelhouse is made (or found in ~/.cache/cflow/wheelhouse/) and uploaded
first, as `cflow run` does, and "package ready -> starting the worker" is the
install. --init-script boots another init.sh, e.g. an older one
(`git show REV:init.sh > old-init.sh`), to compare two boot paths side by
side on the same stack. A fresh interpreter's import time of the worker's modules is
measured apart, to split the worker's start into imports and the rest.

Target: median insert -> first pull < 1.5 s.
"""

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import REPO, BenchProject, banner, bench_stack, percentile, use_stack_environment, vm_disk_dirs, write_json_result

INIT_STAMP = re.compile(r"cflow init: (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z (starting the worker|starting|package ready)")
INIT_MARKS = {"starting": "init start", "package ready": "package ready", "starting the worker": "worker start"}
WORKER_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO cflow\.worker(?:\.entry)?: worker (\S+) on run ", re.M)
WORKER_MODULES = "import cflow.worker, cflow.gcp.clients, cflow.gcp.metadata, cflow.gcp.pubsub, cflow.gcp.storage, google.cloud.pubsub_v1, google.cloud.storage"


def vm_timeline(disk_dir):
    """Epoch seconds of a VM's boot marks: {"init start", "package ready", "worker start", "first pull"}; missing ones absent."""
    marks = {}
    home = Path(disk_dir) / "home" / "cflow"
    if not home.is_dir():  # a VM on a real root (--vm-root): HOME is /root in its disk
        home = Path(disk_dir) / "root" / "root" / "cflow"
    try:
        init_text = (home / "init.log").read_text()
    except FileNotFoundError:
        return marks
    for stamp, what in INIT_STAMP.findall(init_text):
        moment = datetime.datetime.fromisoformat(stamp).replace(tzinfo=datetime.UTC).timestamp()
        marks.setdefault(INIT_MARKS[what], moment)
    try:
        worker_text = (home / "worker.log").read_text()
    except FileNotFoundError:
        return marks
    match = WORKER_LINE.search(worker_text)
    if match:
        # The worker's logging stamps local time with milliseconds.
        marks["first pull"] = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1000
    return marks


def import_seconds(repeats=3):
    """Median seconds a fresh interpreter takes to start, and to import the worker's modules."""
    environment = dict(os.environ, PYTHONPATH=str(REPO))

    def timed(code):
        samples = []
        for _ in range(repeats):
            started = time.monotonic()
            subprocess.run([sys.executable, "-c", code], check=True, env=environment)
            samples.append(time.monotonic() - started)
        return percentile(samples, 0.5)

    bare = timed("pass")
    return bare, timed(WORKER_MODULES) - bare


class BootRig:
    """A prepared run (package, run.json, topics) whose worker VMs can be created on demand."""

    def __init__(self, info, temporary, stack_dir, init_script=None):
        from cflow import fleet
        from cflow.config import load_config
        from cflow.gcp.clients import build_clients
        from cflow.gcp.compute import Compute
        from cflow.gcp.pubsub import PubSub, RunTopics
        from cflow.gcp.storage import Bucket, RunStorage
        from cflow.package import build_package
        from cflow.wheelhouse import prepare_for_run

        project = BenchProject(temporary / "project", "#!/bin/bash\ntrue\n", VM_TYPE="e2-small", WORKER_NODE_CNT=1)
        project.write(["000001"])
        self.config = load_config(str(project.root / "const.py"), {})
        clients = build_clients("local", info.project)
        self.run_id = "boot-bench"
        self.compute = Compute(clients.compute, clients.project)
        self.zone = self.config.zones[0]
        storage = RunStorage(clients.storage, self.config.bucket, self.run_id)
        Bucket(clients.storage, self.config.bucket).ensure_exists(create_if_missing=True)
        package = build_package(project.root)
        self.package_bytes = len(package)
        package_url = storage.upload_package(package)
        # As `cflow run` does: only VMs on a real root install packages, from the run's wheelhouse.
        started = time.monotonic()
        wheelhouse = prepare_for_run(self.config, Bucket(clients.storage, self.config.bucket), stack_dir, print)
        self.wheelhouse = wheelhouse
        self.wheelhouse_seconds = time.monotonic() - started
        topics = RunTopics.for_run(clients.project, self.run_id, "boot-topic", "boot-sub")
        self.pubsub = PubSub(clients.publisher, clients.subscriber)
        self.topics = topics
        self.pubsub.create_run_topics(topics, ack_deadline_seconds=60)
        # The fields a worker reads (WorkerSettings.from_manifest), as execute_run writes them.
        storage.write_manifest({
            "run_id": self.run_id, "bucket": self.config.bucket, "topics": topics.to_dict(),
            "task_command": list(self.config.task_module_cmd), "task_timeout": 60, "max_attempts": 3,
            "lease_seconds": 60, "idle_poweroff_seconds": 3600, "item_count": 0, "package": package_url,
            "wheelhouse": wheelhouse.to_dict() if wheelhouse else None,
        })
        init_text = Path(init_script).read_text() if init_script else fleet.read_init_script(self.config)
        self.properties = fleet.worker_instance_properties(self.config, self.run_id, package_url, init_text, wheelhouse)
        self.next_number = 1
        self.inserted_at = {}

    def insert(self, count):
        """Create ``count`` workers in one bulkInsert; returns their names."""
        from cflow import fleet

        names = [fleet.vm_name(self.config, self.run_id, self.next_number + i) for i in range(count)]
        self.next_number += count
        inserted_at = time.time()
        self.compute.bulk_insert(self.zone, names, self.properties)
        for name in names:
            self.inserted_at[name] = inserted_at
        return names

    def delete_all(self, timeout_s=120):
        """Delete every VM of the run (their shutdown hooks run) and wait until none is listed.

        Returns the seconds that took.
        """
        started = time.monotonic()
        self.compute.delete_vms(self.compute.list_run_vms(self.run_id))
        while self.compute.list_run_vms(self.run_id) and time.monotonic() - started < timeout_s:
            time.sleep(0.05)
        self.pubsub.delete_run_topics(self.topics)
        return time.monotonic() - started


def timelines(stack_dir, names):
    """{name: marks} for the named VMs that have a disk folder yet."""
    found = {}
    for disk_dir in vm_disk_dirs(stack_dir):
        name = disk_dir.name.rsplit("-", 1)[0]
        if name in names:
            found[name] = vm_timeline(disk_dir)
    return found


def wait_first_pulls(stack_dir, names, timeout_s):
    deadline = time.monotonic() + timeout_s
    while True:
        marks = timelines(stack_dir, names)
        if len(marks) == len(names) and all("first pull" in m for m in marks.values()):
            return marks
        if time.monotonic() > deadline:
            missing = sorted(set(names) - {n for n, m in marks.items() if "first pull" in m})
            raise RuntimeError(f"no first pull within {timeout_s:.0f} s from {', '.join(missing)}; see their init.log/worker.log")
        time.sleep(0.05)


def report(title, rig, marks):
    """Print median/max insert -> first pull and the median of each boot stage; returns the figures."""
    total = []
    stages = {"insert -> init.sh running": [], "package (+ wheelhouse) fetch": [], "install (venv + pip)": [], "worker start to first pull": []}
    for name, mark in marks.items():
        inserted = rig.inserted_at[name]
        # An init.sh without the "starting the worker" stamp: its install counts in the worker's start.
        worker_start = mark.get("worker start", mark["package ready"])
        total.append(mark["first pull"] - inserted)
        stages["insert -> init.sh running"].append(mark["init start"] - inserted)
        stages["package (+ wheelhouse) fetch"].append(mark["package ready"] - mark["init start"])
        stages["install (venv + pip)"].append(worker_start - mark["package ready"])
        stages["worker start to first pull"].append(mark["first pull"] - worker_start)
    print(f"{title}: insert -> first pull median {percentile(total, 0.5):.2f} s, max {max(total):.2f} s (n={len(total)})")
    for stage, values in stages.items():
        print(f"    {stage:30s} median {percentile(values, 0.5):.3f} s")
    return {"median": percentile(total, 0.5), "max": max(total), **{stage: percentile(v, 0.5) for stage, v in stages.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", type=int, default=5, help="VMs booted one at a time (default 5)")
    parser.add_argument("--together", type=int, default=12, help="VMs booted together in one bulkInsert (default 12; 0 skips)")
    parser.add_argument("--json", metavar="FILE", help="append the figures as a JSON line to FILE")
    parser.add_argument("--vm-root", metavar="NAME", help="boot the VMs on a real root (e.g. debian-12: init.sh's stock path, from the run's wheelhouse)")
    parser.add_argument("--init-script", metavar="FILE", help="boot with this init.sh instead of the project's (e.g. an older one, to compare)")
    args = parser.parse_args(argv)

    banner(f"bench_boot: {args.sequential} VMs one at a time, {args.together} together")
    temporary = Path(tempfile.mkdtemp(prefix="cflow-bench-boot-"))
    figures = {"bench": "boot"}
    try:
        bare, imports = import_seconds()
        figures.update(interpreter_start=bare, worker_imports=imports)
        print(f"fresh interpreter: start {bare:.3f} s; importing the worker's modules {imports:.3f} s more", flush=True)
        stack_dir = temporary / "stack"
        with bench_stack(stack_dir, **({"vm_root": args.vm_root} if args.vm_root else {})) as (info, stack_seconds):
            print(f"local stack up in {stack_seconds:.2f} s", flush=True)
            use_stack_environment(info)
            rig = BootRig(info, temporary, stack_dir, args.init_script)
            print(f"package: {rig.package_bytes} bytes; wheelhouse: {rig.wheelhouse.url if rig.wheelhouse else 'none (VMs share this machine)'}"
                  f" (ready in {rig.wheelhouse_seconds:.2f} s)", flush=True)
            figures["wheelhouse_seconds"] = rig.wheelhouse_seconds
            figures["init_script"] = args.init_script or "init.sh"
            try:
                marks = {}
                for _ in range(args.sequential):
                    names = rig.insert(1)
                    marks.update(wait_first_pulls(stack_dir, names, 600 if args.vm_root else 120))
                if marks:
                    figures["sequential"] = report("one at a time", rig, marks)
                if args.together:
                    names = rig.insert(args.together)
                    figures["together"] = report(f"{args.together} together", rig, wait_first_pulls(stack_dir, names, 300))
            finally:
                vm_count = rig.next_number - 1
                deletion = rig.delete_all()
                figures["delete_seconds"] = deletion
                print(f"deleting the {vm_count} idle VMs (their shutdown hooks run): {deletion:.2f} s until none is listed")
        if "sequential" in figures:
            verdict = "met" if figures["sequential"]["median"] < 1.5 else "NOT met"
            print(f"target median < 1.5 s (one at a time): {verdict}")
        write_json_result(args.json, figures)
        return 0
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
