"""Soak: many zero-work items on a Spot fleet that the Compute emulator keeps preempting.

    python3 bench/bench_soak.py [--items 2000] [--workers 30] [--preempt-mean-s 60] [--seconds 0]

A local stack is started with ``--preempt-mean-s`` (each Spot VM lives an
exponentially distributed time with that mean, so a fleet of W VMs loses one
every mean/W seconds), and CFlow runs the items through ``python3
scheduler.py`` as a user does. The task appends a "start" and an "end" line
to an execution log in a folder shared by every emulated VM, then writes its
item id as its output.

Prints: items, exit status, preemptions (VMs the emulator preempted, and
in-flight items handed back), executions and duplicate executions (items
whose task ran more than once), items recorded twice in the combined result
(must be 0), lost items (must be 0), wall time and throughput. Exits 1 if any
item is lost or recorded twice.
"""

import argparse
import collections
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import BenchProject, banner, bench_stack, use_stack_environment, write_json_result

# argv: ITEM SECONDS LEDGER. Each line is one write() far below PIPE_BUF, with
# O_APPEND (>>), so lines from parallel VMs never interleave.
SOAK_TASK = r"""#!/bin/bash
# Soak task: note the start, sleep SECONDS, write the item id, note the end.
set -eu
item="$1" seconds="$2" ledger="$3"
echo "start $item $CFLOW_ATTEMPT $HOME" >> "$ledger"
if [ "$seconds" != "0" ]; then sleep "$seconds"; fi
echo "$item" > "$CFLOW_OUTPUT_DIR/result.txt"
echo "end $item $CFLOW_ATTEMPT $HOME" >> "$ledger"
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Soak CFlow on a constantly preempted local Spot fleet.")
    parser.add_argument("--items", type=int, default=2000, help="work items (default 2000)")
    parser.add_argument("--workers", type=int, default=30, help="WORKER_NODE_CNT (default 30)")
    parser.add_argument("--preempt-mean-s", type=float, default=60.0,
                        help="mean Spot VM lifetime; the fleet loses a VM every MEAN/WORKERS s (default 60)")
    parser.add_argument("--seconds", type=float, default=0.0, help="how long each task sleeps (default 0)")
    parser.add_argument("--lease-seconds", type=int, default=10, help="LEASE_SECONDS (default 10, the minimum)")
    parser.add_argument("--seed", type=int, default=1, help="the emulator's random seed (default 1)")
    parser.add_argument("--timeout", type=float, default=3600, help="give up on the run after this many seconds")
    parser.add_argument("--json", metavar="FILE", help="append the figures to FILE as one JSON line")
    return parser.parse_args(argv)


def read_ledger(path):
    """{item: [start count, end count]} from the execution log."""
    counts = collections.defaultdict(lambda: [0, 0])
    if path.exists():
        for line in path.read_text().splitlines():
            event, item = line.split()[:2]
            counts[item][0 if event == "start" else 1] += 1
    return counts


def count_preempted_vms(info):
    """VMs the emulator preempted: its compute.instances.preempted operations, in every zone of the stack."""
    from cflow.gcp.clients import build_local_compute

    compute = build_local_compute(info.compute_endpoint, info.compute_token_file)
    zones = [zone["name"] for zone in compute.zones().list(project=info.project).execute(num_retries=6).get("items", [])]
    preempted = 0
    for zone in zones:
        request = compute.zoneOperations().list(project=info.project, zone=zone, maxResults=500)
        while request is not None:
            response = request.execute(num_retries=6)
            preempted += sum(1 for op in response.get("items", []) if op.get("operationType") == "compute.instances.preempted")
            request = compute.zoneOperations().list_next(request, response)
    return preempted


def main(argv=None):
    args = parse_args(argv)
    banner(f"soak: {args.items} items x {args.seconds:g} s, {args.workers} Spot workers, "
           f"preempt mean {args.preempt_mean_s:g} s (one every ~{args.preempt_mean_s / args.workers:.1f} s fleet-wide)")
    with tempfile.TemporaryDirectory(prefix="cflow-soak-") as scratch:
        scratch = Path(scratch)
        ledger = scratch / "executions.log"
        ledger.touch()
        stack_dir = scratch / "stack"
        with bench_stack(stack_dir, preempt_mean_s=args.preempt_mean_s, shutdown_grace=2, seed=args.seed) as (info, start_s):
            print(f"stack up in {start_s:.1f} s", flush=True)
            project = BenchProject(
                scratch / "project", SOAK_TASK, WORKER_NODE_CNT=args.workers, VM_SPOT=True, VM_TYPE="e2-small",
                LEASE_SECONDS=args.lease_seconds, MAX_ATTEMPTS=3, TASK_TIMEOUT=600,
            )
            project.write(f"{index} {args.seconds:g} {ledger}" for index in range(args.items))
            run = project.run(stack_dir, timeout=args.timeout)
            use_stack_environment(info)
            preempted_vms = count_preempted_vms(info)

        ids = [line.strip() for line in (project.root / "output" / (run.run_id or "none") / "result.txt").read_text().splitlines()] \
            if run.run_id and (project.root / "output" / run.run_id / "result.txt").exists() else []
        recorded = collections.Counter(ids)
        expected = {str(index) for index in range(args.items)}
        lost = sorted(expected - set(recorded), key=int)
        recorded_twice = sorted((item for item, n in recorded.items() if n > 1), key=int)
        executions = read_ledger(ledger)
        ran_more_than_once = sum(1 for starts, _ in executions.values() if starts > 1)
        finished_more_than_once = sum(1 for _, ends in executions.values() if ends > 1)
        handed_back = re.search(r"preemptions: (\d+)", run.stderr)
        summary = next((line for line in run.stderr.splitlines() if re.match(r"run \S+: \d+ done", line)), "(no summary)")

    figures = {
        "items": args.items,
        "workers": args.workers,
        "preempt_mean_s": args.preempt_mean_s,
        "exit_status": run.exit_status,
        "preempted_vms": preempted_vms,
        "items_handed_back": int(handed_back.group(1)) if handed_back else None,
        "executions": sum(starts for starts, _ in executions.values()),
        "duplicate_executions": ran_more_than_once,
        "finished_more_than_once": finished_more_than_once,
        "recorded_twice": len(recorded_twice),
        "lost_items": len(lost),
        "wall_seconds": round(run.wall_seconds, 1),
        "items_per_second": round(args.items / run.wall_seconds, 2),
    }
    print(summary)
    print(f"items:                    {figures['items']} (exit status {figures['exit_status']})")
    print(f"preemptions:              {figures['preempted_vms']} VMs preempted; "
          f"{figures['items_handed_back']} in-flight items handed back")
    print(f"executions:               {figures['executions']} task runs for {args.items} items")
    print(f"duplicate executions:     {figures['duplicate_executions']} items ran more than once "
          f"({figures['finished_more_than_once']} of them finished more than once)")
    print(f"recorded twice:           {figures['recorded_twice']} (must be 0)")
    print(f"lost items:               {figures['lost_items']} (must be 0)" + (f": {', '.join(lost[:20])}" if lost else ""))
    print(f"wall time:                {figures['wall_seconds']} s ({figures['items_per_second']} items/s)")
    if run.exit_status != 0:
        print("\n".join(run.stderr.splitlines()[-15:]))
    write_json_result(args.json, {"benchmark": "soak", **figures})
    return 1 if lost or recorded_twice or run.exit_status != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
