"""Benchmark: the same run three times, without faults, with Spot preemptions and slow VMs, and with CFlow's answers to them.

    python3 bench/bench_faults.py [--items 240] [--seconds 1] [--workers 12]
                                  [--preempt-mean-s 10] [--slow-vms 0.1] [--slow-factor 5] [--seed 13]

Each run is `python3 scheduler.py` on a fresh local stack, as a user runs it.
The task works SECONDS in 50 ms steps (a bash builtin wait, no process per
step), writes a small CSV and stamps its start and end as
``common.SLEEP_TASK`` does: a slow VM, paused most of every second, slows
it as it slows real work (one `sleep 1` would sleep through the pauses).

1. no faults (the settings' defaults);
2. faults: each Spot VM preempted after a random life of mean
   ``--preempt-mean-s`` and ``--slow-vms`` of the VMs ``--slow-factor`` times
   slower (the Compute emulator's faults, seeded), with backup tasks and the
   move to standard VMs turned off (BACKUP_TASKS = False,
   SPOT_PREEMPTIONS_BEFORE_STANDARD = None);
3. the same faults (the same seed) with both on (the defaults).

Prints each whole run's wall time (scheduler.py's, the stack already up),
the ratios to the fault-free run, the preemptions, backups and items moved
to standard VMs each saw, and where the faulty runs' time went.
Target: run 3 at most 1.2x run 1, and clearly below run 2.
"""

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import BenchProject, Spans, banner, bench_stack, describe, write_json_result

TARGET_RATIO = 1.2
SUMMARY_PATTERNS = {
    "preemptions": re.compile(r"preemptions: (\d+)"),
    "backups_launched": re.compile(r"backups: (\d+) launched"),
    "backups_won": re.compile(r"backups: \d+ launched, (\d+) won"),
    "moved_to_standard": re.compile(r"standard lane: (\d+) item"),
}


# Argv: ITEM SECONDS STAMP_FILE, as SLEEP_TASK's; a step waits on a pipe no one writes (read -t is a builtin).
STEP_TASK = r"""#!/bin/bash
# Benchmark task: work SECONDS in 50 ms steps, write a small CSV, record start and end.
set -eu
item="$1" seconds="$2" stamps="$3"
start=$(date +%s.%N)
exec 3<> <(:)
steps=$(awk -v s="$seconds" 'BEGIN { printf "%d", s * 20 + 0.5 }')
for ((step = 0; step < steps; step++)); do read -r -t 0.05 -u 3 || true; done
out="${CFLOW_OUTPUT_DIR:-$PWD/out/$item}"
mkdir -p "$out"
printf 'item,seconds\n%s,%s\n' "$item" "$seconds" > "$out/result.csv"
end=$(date +%s.%N)
echo "$item $start $end $HOME" >> "$stamps"
"""


def task_lines(items, seconds, stamp_file):
    return [f"item-{number:05d} {seconds:g} {stamp_file}" for number in range(1, items + 1)]


def from_summary(stderr):
    """The counts the run's summary printed (0 for a line it did not print), and its VM-seconds (all kinds)."""
    found = {}
    for name, pattern in SUMMARY_PATTERNS.items():
        match = pattern.search(stderr)
        found[name] = int(match.group(1)) if match else 0
    vm_line = next((line for line in stderr.splitlines() if line.startswith("VM-seconds: ")), "")
    found["vm_seconds"] = sum(int(number) for number in re.findall(r"(\d+) \(", vm_line))
    return found


def one_run(name, temporary, args, compute_options, settings):
    """One whole run on a fresh stack; returns its figures."""
    folder = temporary / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")  # the stamp path is a task field: no spaces
    stamps = folder / "stamps.txt"
    with bench_stack(folder / "stack", **compute_options) as (_info, stack_seconds):
        project = BenchProject(folder / "project", STEP_TASK, WORKER_NODE_CNT=args.workers, VM_TYPE="e2-small",
                               TASK_TIMEOUT=max(60, int(args.seconds * args.slow_factor * 10)), **settings)
        project.write(task_lines(args.items, args.seconds, stamps))
        run = project.run(folder / "stack")
    (folder / "scheduler.out").write_text(run.stdout)
    (folder / "scheduler.err").write_text(run.stderr)  # kept with --keep, for a look at what the scheduler did
    run.check()
    spans = Spans.read(stamps)
    counts = from_summary(run.stderr)
    figures = {"wall": run.wall_seconds, "stack_seconds": stack_seconds, "task_runs": len(spans.lines),
               "distinct_items": spans.distinct_items(), **counts}
    tail = run.started_at + run.wall_seconds - spans.last_end
    print(f"{name}: wall {run.wall_seconds:.2f} s (stack up in {stack_seconds:.2f} s); {len(spans.lines)} task runs for "
          f"{spans.distinct_items()} items; preemptions {counts['preemptions']}, backups {counts['backups_launched']} launched / "
          f"{counts['backups_won']} won, {counts['moved_to_standard']} item(s) moved to standard VMs", flush=True)
    print(f"  task runs (start to end stamps, a stopped copy has none): {describe(spans.durations(), 1, 's')}; "
          f"first task {spans.first_start - run.started_at:.2f} s after start, {tail:.2f} s after the last task end", flush=True)
    busy = sum(spans.durations())
    if counts["vm_seconds"]:
        # Where the faults cost: a VM bills (and counts) from its creation; boots, preempted and paused work use none of it.
        figures.update(busy_fraction=busy / counts["vm_seconds"], live_vms=counts["vm_seconds"] / run.wall_seconds)
        print(f"  VM time {counts['vm_seconds']} VM-s ({figures['live_vms']:.1f} VMs live on average of {args.workers}), "
              f"{busy:.0f} s of it in finished task runs ({figures['busy_fraction']:.0%})", flush=True)
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=240, help="work items (default 240)")
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds each task sleeps (default 1)")
    parser.add_argument("--workers", type=int, default=12, help="WORKER_NODE_CNT (default 12)")
    parser.add_argument("--preempt-mean-s", type=float, default=10.0, help="mean life of a Spot VM in the faulty runs (default 10; 0: no preemptions)")
    parser.add_argument("--slow-vms", type=float, default=0.1, help="fraction of slow VMs in the faulty runs (default 0.1)")
    parser.add_argument("--slow-factor", type=float, default=5.0, help="how much slower a slow VM is (default 5)")
    parser.add_argument("--seed", type=int, default=13, help="the emulator's seed, the same for both faulty runs (default 13)")
    parser.add_argument("--shutdown-grace", type=float, default=None, help="the Compute emulator's shutdown grace (default: its own, 30 s Spot)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, stamps) and print its path")
    parser.add_argument("--json", metavar="FILE", help="append the figures as a JSON line to FILE")
    args = parser.parse_args(argv)

    banner(f"bench_faults: N={args.items} items of {args.seconds:g} s, W={args.workers} workers; faults: Spot mean life "
           f"{args.preempt_mean_s:g} s, {args.slow_vms:.0%} of VMs {args.slow_factor:g}x slower (seed {args.seed})")
    temporary = Path(tempfile.mkdtemp(prefix="cflow-bench-faults-"))
    base = {} if args.shutdown_grace is None else {"shutdown_grace": args.shutdown_grace}
    faults = {**base, "preempt_mean_s": args.preempt_mean_s, "slow_vms": args.slow_vms, "slow_factor": args.slow_factor, "seed": args.seed}
    figures = {"bench": "faults", "items": args.items, "seconds": args.seconds, "workers": args.workers,
               "preempt_mean_s": args.preempt_mean_s, "slow_vms": args.slow_vms, "slow_factor": args.slow_factor, "seed": args.seed}
    try:
        print(f"ideal (N*T/W): {args.items * args.seconds / args.workers:.2f} s", flush=True)
        clean = one_run("1. no faults", temporary, args, base, {})
        bare = one_run("2. faults, without backups or the move to standard", temporary, args, faults,
                       {"BACKUP_TASKS": False, "SPOT_PREEMPTIONS_BEFORE_STANDARD": None})
        answered = one_run("3. faults, with backups and the move to standard", temporary, args, faults, {})
        figures.update(no_faults=clean, faults_without=bare, faults_with=answered)
        without_ratio, with_ratio = bare["wall"] / clean["wall"], answered["wall"] / clean["wall"]
        figures.update(ratio_without=without_ratio, ratio_with=with_ratio)
        print(f"whole run: {clean['wall']:.2f} s without faults; with faults {bare['wall']:.2f} s without backups and the move "
              f"({without_ratio:.2f}x), {answered['wall']:.2f} s with them ({with_ratio:.2f}x)")
        met = with_ratio <= TARGET_RATIO and answered["wall"] < bare["wall"]
        print(f"target: with them <= {TARGET_RATIO}x the fault-free run and below the run without them: "
              f"{'met' if met else 'NOT met'} ({with_ratio:.2f}x; {without_ratio:.2f}x without)")
        print(f"load avg after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        write_json_result(args.json, figures)
        return 0
    finally:
        if args.keep:
            print(f"kept: {temporary}")
        else:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
