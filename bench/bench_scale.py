"""Benchmark 4: the scheduler at fleet scale, on the Compute emulator.

    python3 bench/bench_scale.py [--vms 1000] [--items 1000000] [--done-markers 10000]

The real ``cflow.scheduler.Scheduler`` with its real seams (Compute,
Pub/Sub, Cloud Storage clients against a local stack) runs a run of --items
items over --vms workers whose startup script is `sleep 100000` (no Python
worker, so the machine holds a large fleet). What it measures:

- items: loading --items lines of a tasks file (``load_items``) and writing
  items.jsonl (``RunStorage.write_items``), as a run's set-up does;
- publish: all items through ``Scheduler.publish_items`` (CFlow's publish
  path, ``PubSub.publish_many``); targets 1,000,000 in < 2 min, 100,000 in < 30 s;
- Compute API calls per reconcile step, counted at the Compute client's HTTP
  object (a batch counts once, with its size): the creation step, steps while
  the fleet boots, steady steps, a step after --preempt VMs stopped (deleted
  in a batch, replaced by a bulkInsert), and the final fleet deletion.
  Target: one list, bulkInsert for creation, batched deletes;
- scheduler CPU per step: ``time.process_time()`` around ``step()`` (this
  process runs nothing else meanwhile), with --done-markers items already
  done (markers written first) and --events events waiting per step, at a
  --interval seconds step, over --steps steps: the median, and the mean,
  which carries the periodic marker listing; target < 5% of one core;
- the marker listing: its CPU and wall per 10,000 done markers, and what it
  would cost a run with every item done, spread over its interval;
- scheduler memory: this process's RSS (it holds the items and the
  scheduler) and its peak; targets < 500 MB at 1,000,000 items, < 200 MB at 100,000.

On a small machine scale down with the flags and say so in RESULTS.md.
"""

import argparse
import concurrent.futures
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import BenchProject, banner, bench_stack, rss_mib, use_stack_environment, write_json_result

LIGHT_STARTUP_SCRIPT = "#!/bin/bash\nexec sleep 100000\n"


class CountingHttp:
    """Wraps a googleapiclient HTTP object and counts its requests by API call (thread-safe).

    A batch request counts once under "batch", and its parts under "batch parts".
    """

    def __init__(self, http):
        self._http = http
        self._lock = threading.Lock()
        self.counts = {}

    def __getattr__(self, name):
        return getattr(self._http, name)

    def request(self, uri, method="GET", body=None, headers=None, *args, **kwargs):
        path = uri.split("?", 1)[0]
        if "/batch" in path:
            kind = "batch"
        elif path.endswith("/aggregated/instances"):
            kind = "instances.aggregatedList (page)"
        elif path.endswith("/instances/bulkInsert"):
            kind = "instances.bulkInsert"
        elif "/operations/" in path:
            kind = "zoneOperations.get"
        elif "/instances/" in path and method == "DELETE":
            kind = "instances.delete (single)"
        else:
            kind = f"{method} {path.rsplit('/compute/v1/', 1)[-1]}"
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if kind == "batch":
                text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
                self.counts["batch parts"] = self.counts.get("batch parts", 0) + text.count("Content-ID:")
        return self._http.request(uri, method, body, headers, *args, **kwargs)

    def take(self):
        """The counts since the last take."""
        with self._lock:
            counts, self.counts = self.counts, {}
        return counts


def format_counts(counts):
    return ", ".join(f"{kind} {count}" for kind, count in sorted(counts.items())) or "none"


# The parts of a reconcile step, as the profiler names them.
STEP_PARTS = {
    "_read_events": "worker events (pull + ack)",
    "_read_dead_letters": "dead letters (pull)",
    "refresh_markers": "done/failed markers (GCS list)",
    "list_run_vms": "VM list (aggregatedList pages)",
    "delete_vms": "deletes (batch)",
    "_create": "creation (bulkInsert)",
    "_settle_creations": "pending creations (operation get)",
}


def profile_step(scheduler):
    """Run one more step under cProfile; print and return the share of its CPU per part."""
    import cProfile
    import pstats

    profiler = cProfile.Profile(time.process_time)
    profiler.runcall(scheduler.step)
    stats = pstats.Stats(profiler).get_stats_profile().func_profiles
    total = sum(profile.tottime for profile in stats.values())
    shares: dict[str, float] = {}
    for function, profile in stats.items():
        if function in STEP_PARTS:
            shares[STEP_PARTS[function]] = shares.get(STEP_PARTS[function], 0.0) + profile.cumtime
    print(f"  where one steady step's CPU goes (under cProfile, {total * 1000:.0f} ms): "
          + ", ".join(f"{part} {seconds / total:.0%}" for part, seconds in sorted(shares.items(), key=lambda kv: -kv[1])), flush=True)
    return {part: seconds / total for part, seconds in shares.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=1000, help="fleet size WORKER_NODE_CNT (default 1000)")
    parser.add_argument("--items", type=int, default=1_000_000, help="work items (default 1,000,000)")
    parser.add_argument("--done-markers", type=int, default=10_000, help="items marked done before the steady steps (default 10,000)")
    parser.add_argument("--events", type=int, default=50, help="worker events waiting before each steady step (default 50)")
    parser.add_argument("--steps", type=int, default=8, help="steady steps measured (default 8: more than one marker listing interval)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between steps (default 5)")
    parser.add_argument("--preempt", type=int, default=100, help="VMs stopped before the replacement step (default 100)")
    parser.add_argument("--boot-timeout", type=float, default=600, help="seconds the fleet may take to be RUNNING")
    parser.add_argument("--json", metavar="FILE", help="append the figures as a JSON line to FILE")
    args = parser.parse_args(argv)

    banner(f"bench_scale: {args.vms} VMs, {args.items} items, {args.done_markers} done markers, {args.events} events/step")
    temporary = Path(tempfile.mkdtemp(prefix="cflow-bench-scale-"))
    try:
        # A Spot VM's default 30 s shutdown grace is not what is measured here.
        with bench_stack(temporary / "stack", shutdown_grace=5) as (info, stack_seconds):
            print(f"local stack up in {stack_seconds:.2f} s", flush=True)
            use_stack_environment(info)
            figures = measure(info, temporary, args)
        write_json_result(args.json, {"bench": "scale", "vms": args.vms, "items": args.items, **figures})
        return 0
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def measure(info, temporary, args):
    from cflow import fleet
    from cflow.config import load_config
    from cflow.gcp.clients import build_clients
    from cflow.gcp.compute import Compute
    from cflow.gcp.pubsub import PubSub, RunTopics
    from cflow.gcp.storage import Bucket, RunStorage
    from cflow.package import build_package
    from cflow.scheduler import LIVE_STATES, Scheduler
    from cflow.tasks import load_items

    figures = {}
    project = BenchProject(temporary / "project", "#!/bin/bash\ntrue\n", WORKER_NODE_CNT=args.vms, VM_TYPE="e2-micro")
    project.write(f"input-{number:07d}.csv {number}" for number in range(args.items))
    config = load_config(str(project.root / "const.py"), {})
    clients = build_clients("local", info.project)
    figures["rss_start_mib"] = rss_mib()  # the Google clients imported and built
    counter = CountingHttp(clients.compute._http)
    clients.compute._http = counter  # every Compute call of the scheduler goes through it
    run_id = "scale-bench"
    compute = Compute(clients.compute, clients.project)
    pubsub = PubSub(clients.publisher, clients.subscriber)
    storage = RunStorage(clients.storage, config.bucket, run_id)
    Bucket(clients.storage, config.bucket).ensure_exists(create_if_missing=True)
    topics = RunTopics.for_run(clients.project, run_id, config.topic_name, config.subscription_name)
    pubsub.create_run_topics(topics, ack_deadline_seconds=config.lease_seconds)

    started, cpu_before = time.monotonic(), time.process_time()
    items = load_items(config)
    figures.update(load_seconds=time.monotonic() - started, load_cpu=time.process_time() - cpu_before, rss_items_mib=rss_mib())
    print(f"items: {len(items)} loaded from tasks.txt in {figures['load_seconds']:.1f} s; RSS {figures['rss_items_mib']:.0f} MiB", flush=True)
    started = time.monotonic()
    storage.write_items(items)
    figures["write_items_seconds"] = time.monotonic() - started
    print(f"items.jsonl written in {figures['write_items_seconds']:.1f} s; RSS {rss_mib():.0f} MiB", flush=True)
    package_url = storage.upload_package(build_package(project.root))
    properties = fleet.worker_instance_properties(config, run_id, package_url, LIGHT_STARTUP_SCRIPT)
    # No Python at all on these VMs: no shutdown script either.
    properties["metadata"]["items"] = [entry for entry in properties["metadata"]["items"] if entry["key"] != "shutdown-script"]
    scheduler = Scheduler(config, run_id, items, compute, pubsub, storage, topics, properties)

    started = time.monotonic()
    published = scheduler.publish_items(items)
    publish_seconds = time.monotonic() - started
    figures.update(publish_seconds=publish_seconds, publish_rate=published / publish_seconds, rss_published_mib=rss_mib())
    target = "1,000,000 in < 120 s" if args.items > 100_000 else "100,000 in < 30 s"
    print(f"publish: {published} items in {publish_seconds:.2f} s ({published / publish_seconds:,.0f}/s; target {target}); "
          f"RSS {figures['rss_published_mib']:.0f} MiB", flush=True)

    steps = []

    def step(label, sleep_after=True):
        counter.take()
        cpu_before, wall_before = time.process_time(), time.monotonic()
        progress = scheduler.step()
        cpu, wall = time.process_time() - cpu_before, time.monotonic() - wall_before
        counts = counter.take()
        steps.append({"label": label, "cpu": cpu, "wall": wall, "calls": counts, "vms": dict(progress.vms)})
        print(f"  step [{label}]: CPU {cpu * 1000:.0f} ms ({cpu / args.interval:.1%} of a core at {args.interval:g} s), "
              f"wall {wall:.2f} s, VMs {dict(sorted(progress.vms.items()))}; Compute calls: {format_counts(counts)}", flush=True)
        if sleep_after:
            time.sleep(max(0.0, args.interval - wall))
        return progress

    print("creating the fleet:", flush=True)
    boot_started = time.monotonic()
    step("create")
    while True:
        progress = step("booting")
        if progress.vms.get("RUNNING", 0) >= args.vms and not scheduler.pending_creations:
            break
        if time.monotonic() - boot_started > args.boot_timeout:
            raise RuntimeError(f"the fleet was not RUNNING within {args.boot_timeout:.0f} s: {progress.vms}")
    figures["fleet_running_seconds"] = time.monotonic() - boot_started
    print(f"fleet of {args.vms} RUNNING {figures['fleet_running_seconds']:.1f} s after the first step", flush=True)

    if args.done_markers:
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda item: storage.write_done_marker(item.id, {"item": item.id, "attempt": 1}), items[: args.done_markers]))
        print(f"wrote {args.done_markers} done markers in {time.monotonic() - started:.1f} s (set-up, not measured)", flush=True)

    print(f"steady steps ({args.done_markers} items done, {args.events} events waiting each):", flush=True)
    vm_names = [vm.name for vm in compute.list_run_vms(run_id)][: args.events]
    for _ in range(args.steps):
        events = [(json.dumps({"type": "started", "vm": name, "item": items[i].id, "time": time.time()}).encode(), {"cflow_event": "started"})
                  for i, name in enumerate(vm_names)]
        pubsub.publish_many(topics.events_topic, events)
        step("steady")
    steady_steps = steps[-args.steps:]
    figures["steady_cpu_shares"] = profile_step(scheduler)
    figures.update(marker_listing(storage, args.done_markers, args.items))

    print(f"stopping {args.preempt} VMs (as preemptions do), then one step:", flush=True)
    stopped = [vm for vm in compute.list_run_vms(run_id) if vm.status in LIVE_STATES][: args.preempt]
    stopped_names = {vm.name for vm in stopped}
    for vm in stopped:
        clients.compute.instances().stop(project=clients.project, zone=vm.zone, instance=vm.name).execute()
    counter.take()
    deadline = time.monotonic() + 120
    while sum(1 for vm in compute.list_run_vms(run_id) if vm.name in stopped_names and vm.status == "TERMINATED") < len(stopped_names):
        if time.monotonic() > deadline:
            raise RuntimeError("stopped VMs did not reach TERMINATED within 120 s")
        time.sleep(0.2)
    counter.take()
    step("after stops")
    step("replacing", sleep_after=False)

    figures["rss_end_mib"] = rss_mib()
    started = time.monotonic()
    counter.take()
    left = compute.delete_run_vms(run_id)
    delete_calls = counter.take()
    figures.update(delete_fleet_seconds=time.monotonic() - started, delete_fleet_calls=delete_calls, vms_left=len(left))
    print(f"delete_fleet: {time.monotonic() - started:.1f} s, Compute calls: {format_counts(delete_calls)}; left {len(left)}")
    pubsub.delete_run_topics(topics)

    cpu = sorted(s["cpu"] for s in steady_steps)
    mean = sum(cpu) / len(cpu)
    figures.update(
        steps=steps, steady_cpu_median=cpu[len(cpu) // 2], steady_cpu_max=cpu[-1], steady_cpu_mean=mean,
        steady_core_fraction=cpu[len(cpu) // 2] / args.interval, steady_core_fraction_mean=mean / args.interval,
        rss_peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    print(f"scheduler CPU per steady step: median {cpu[len(cpu) // 2] * 1000:.0f} ms, mean {mean * 1000:.0f} ms (with the periodic "
          f"marker listing), max {cpu[-1] * 1000:.0f} ms = {cpu[len(cpu) // 2] / args.interval:.1%} (median), {mean / args.interval:.1%} "
          f"(mean) of a core at a {args.interval:g} s interval (target < 5%)")
    memory_target = "500 MB" if args.items > 100_000 else "200 MB"
    print(f"scheduler memory (RSS): start {figures['rss_start_mib']:.0f} MiB, items loaded {figures['rss_items_mib']:.0f} MiB, "
          f"published {figures['rss_published_mib']:.0f} MiB, end {figures['rss_end_mib']:.0f} MiB, peak {figures['rss_peak_mib']:.0f} MiB "
          f"(target < {memory_target})")
    return figures


def marker_listing(storage, done_markers, item_count):
    """Time one listing of the done markers; say what a run with every item done would spend on it, over its interval."""
    from cflow import scheduler

    # A tree before the listing's interval grew with its cost lists every 30 s whatever it costs.
    factor, floor = getattr(scheduler, "MARKER_LIST_COST_FACTOR", 0), scheduler.MARKER_LIST_INTERVAL_SECONDS
    if not done_markers:
        return {}
    cpu_before, started = time.process_time(), time.monotonic()
    listed = len(storage.list_done_ids())
    cpu, wall = time.process_time() - cpu_before, time.monotonic() - started
    per_10k_cpu, per_10k_wall = cpu / listed * 10_000, wall / listed * 10_000
    all_cpu, all_wall = per_10k_cpu * item_count / 10_000, per_10k_wall * item_count / 10_000
    interval = max(floor, factor * all_wall)
    print(f"  marker listing: {listed} done markers in {wall:.2f} s wall, {cpu:.2f} s CPU ({per_10k_cpu:.2f} s CPU per 10,000); "
          f"with all {item_count} done: ~{all_cpu:.0f} s CPU every {interval:.0f} s = {all_cpu / interval:.1%} of a core", flush=True)
    return {"listing_cpu_per_10k": per_10k_cpu, "listing_wall_per_10k": per_10k_wall, "listing_share_all_done": all_cpu / interval}


if __name__ == "__main__":
    sys.exit(main())
