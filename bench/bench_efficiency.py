"""Benchmark 1: a whole local CFlow run, as a user runs it, against GNU parallel on the same task.

    python3 bench/bench_efficiency.py [--items 240] [--seconds 1] [--workers 12] [--tree DIR]

task.sh sleeps SECONDS, writes a small CSV and appends its start and end
times to a stamp file. GNU parallel -jW runs it over the items first (nothing
else of ours running); then CFlow runs the same items with
WORKER_NODE_CNT=W as a new user does: the whole `python3 scheduler.py` from a
project folder with no stack running, so the command starts the local stack
(Pub/Sub emulator, fake-gcs-server, Compute emulator), runs, combines, and
stops the stack. Both are timed as whole commands.

Prints the two walls and their ratio, the steady-state efficiency of each,
(N*T/W) / (last task end - first task start), and where CFlow's wall goes,
from the time each line of its output arrived and the tasks' own stamps.
Targets at N=240, T=1, W=12: whole CFlow / GNU parallel <= 1.35; CFlow
efficiency >= 0.95.

--tree runs another CFlow checkout's scheduler.py (and worker scripts), for a
before/after comparison on one machine.
"""

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import REPO, SLEEP_TASK, BenchProject, Spans, banner, describe, percentile, write_json_result


def ensure_gnu_parallel():
    """Returns the path of GNU parallel, installing the Debian package if it is missing.

    Raises:
        SystemExit: it is missing and cannot be installed (the message says how).
    """
    found = shutil.which("parallel")
    if found:
        return found
    print("GNU parallel is missing; installing it with `apt-get install -y parallel`", flush=True)
    try:
        subprocess.run(["apt-get", "install", "-y", "-q", "parallel"], check=True, stdout=subprocess.DEVNULL, timeout=600)
    except (OSError, subprocess.SubprocessError) as error:
        raise SystemExit(
            f"bench_efficiency: cannot install GNU parallel ({error}); install it yourself "
            "(`sudo apt-get install parallel`) or pass --skip-parallel"
        ) from None
    found = shutil.which("parallel")
    if not found:
        raise SystemExit("bench_efficiency: `apt-get install parallel` ran but no `parallel` is on PATH; install it yourself")
    return found


def task_lines(items, seconds, stamp_file):
    return [f"item-{number:05d} {seconds:g} {stamp_file}" for number in range(1, items + 1)]


def run_gnu_parallel(parallel, work_dir, lines, workers):
    """Run task.sh over ``lines`` with ``parallel -jW``; returns wall seconds."""
    work_dir.mkdir(parents=True)
    task = work_dir / "task.sh"
    task.write_text(SLEEP_TASK)
    tasks_file = work_dir / "tasks.txt"
    tasks_file.write_text("".join(line + "\n" for line in lines))
    started = time.monotonic()
    subprocess.run(
        # HOME names the job slot, which the task stamps as its worker (so gaps are per slot, as CFlow's per VM).
        [parallel, "--will-cite", "-j", str(workers), "--colsep", " ", "env", "HOME=slot-{%}", "bash", str(task),
         "{1}", "{2}", "{3}", "::::", str(tasks_file)],
        cwd=work_dir, check=True, stdout=subprocess.DEVNULL,
    )
    return time.monotonic() - started


def children_cpu_seconds():
    """User+system CPU of every child process that has ended and been waited for (and of theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wall_phases(run, spans):
    """Where a whole run's wall went, in order: ``{phase: seconds}`` adding up to the wall.

    From the arrival times of the lines the command printed (the local
    stack's start, the first "creating N VM(s)", the summary) and the tasks'
    own first start and last end.
    """
    points = [
        ("Python start, const.py, run id", run.first(r"^starting the local stack")),
        ("local stack start", run.first(r"^local stack up")),
        ("set-up until the fleet is asked for (checks, package, topics)", run.first(r"^creating \d+ VM")),
        ("fleet boot until the first task starts (publish meanwhile)", spans.first_start),
        ("tasks: first start to last end", spans.last_end),
        ("after the last task: last done seen, combine, fleet and topics deleted, report", run.first(r"^run \S+: \d+ done")),
        ("summary to exit: stack stop", run.ended_at),
    ]
    phases, previous = {}, run.started_at
    for name, at in points:
        if at is None:
            continue  # a line this tree does not print
        phases[name] = at - previous
        previous = at
    return phases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=240, help="work items N (default 240)")
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds each task sleeps T (default 1)")
    parser.add_argument("--workers", type=int, default=12, help="workers W: VMs for CFlow, -j for parallel (default 12)")
    parser.add_argument("--skip-parallel", action="store_true", help="run CFlow only (no GNU parallel needed)")
    parser.add_argument("--tree", type=Path, default=REPO, help="the CFlow checkout to run (default: this one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, stamps) and print its path")
    parser.add_argument("--json", metavar="FILE", help="append the figures as a JSON line to FILE")
    args = parser.parse_args(argv)

    banner(f"bench_efficiency: N={args.items} items, T={args.seconds:g} s, W={args.workers} workers; CFlow tree {args.tree}")
    parallel = None if args.skip_parallel else ensure_gnu_parallel()
    temporary = Path(tempfile.mkdtemp(prefix="cflow-bench-efficiency-"))
    figures = {"bench": "efficiency", "items": args.items, "seconds": args.seconds, "workers": args.workers}
    try:
        ideal = args.items * args.seconds / args.workers
        print(f"ideal (N*T/W): {ideal:.2f} s", flush=True)
        if parallel:
            stamps = temporary / "parallel-stamps.txt"
            cpu_before = children_cpu_seconds()
            parallel_wall = run_gnu_parallel(parallel, temporary / "parallel", task_lines(args.items, args.seconds, stamps), args.workers)
            parallel_spans = Spans.read(stamps)
            parallel_cpu = children_cpu_seconds() - cpu_before
            figures.update(parallel_wall=parallel_wall, parallel_efficiency=parallel_spans.efficiency(args.items, args.seconds, args.workers),
                           parallel_cpu=parallel_cpu)
            print(f"GNU parallel -j{args.workers}: wall {parallel_wall:.2f} s, efficiency {figures['parallel_efficiency']:.3f}, "
                  f"CPU {parallel_cpu:.1f} s ({parallel_cpu / args.items * 1000:.0f} ms per item)", flush=True)
            print(f"  task runs: {describe(parallel_spans.durations())}; gap between tasks: {describe(parallel_spans.gaps())}",
                  flush=True)

        stamps = temporary / "cflow-stamps.txt"
        settings = dict(WORKER_NODE_CNT=args.workers, VM_TYPE="e2-small", TASK_TIMEOUT=max(60, int(args.seconds * 10)))
        project = BenchProject(temporary / "project", SLEEP_TASK, tree=args.tree, **settings)
        project.write(task_lines(args.items, args.seconds, stamps))
        cpu_before = children_cpu_seconds()
        run = project.run_whole().check()
        # The stack's processes (and the VMs under the Compute emulator) are all reaped by now.
        cflow_cpu = children_cpu_seconds() - cpu_before
        spans = Spans.read(stamps)
        cflow_efficiency = spans.efficiency(args.items, args.seconds, args.workers)
        figures.update(
            tree=str(args.tree), cflow_wall=run.wall_seconds, cflow_efficiency=cflow_efficiency,
            cflow_task_runs=len(spans.lines), cflow_distinct_items=spans.distinct_items(), cflow_cpu=cflow_cpu,
        )
        print(f"CFlow W={args.workers}: whole `python3 scheduler.py` {run.wall_seconds:.2f} s (stack start and stop included), "
              f"task runs {len(spans.lines)} for {spans.distinct_items()} items")
        print(f"  CPU of everything CFlow ran (stack, scheduler, VMs, tasks): {cflow_cpu:.1f} s ({cflow_cpu / args.items * 1000:.0f} ms per item; "
              f"this machine has {os.cpu_count()} cores)")
        phases = wall_phases(run, spans)
        figures["phases"] = phases
        print("  where CFlow's wall goes:")
        for name, seconds in phases.items():
            print(f"    {seconds:6.2f} s  {name}")
        gaps, firsts = spans.gaps(), spans.first_starts()
        figures.update(gap_median=percentile(gaps, 0.5) if gaps else None, gap_p99=percentile(gaps, 0.99) if gaps else None,
                       fleet_stagger=firsts[-1] - firsts[0])
        print(f"  per-worker gap between tasks: {describe(gaps)}; last worker's first task {firsts[-1] - firsts[0]:.2f} s after the first's")
        late_start, late_count, late_busy, late_gaps = spans.last_worker()
        figures.update(task_run_median=percentile(spans.durations(), 0.5))
        print(f"  task runs (their own start to end stamps): {describe(spans.durations())}")
        print(f"  the span is the last-ending worker's: first task {late_start:.2f} s after the fleet's first, "
              f"then {late_count} tasks ({late_busy:.2f} s) and their gaps ({late_gaps:.2f} s)")
        print(f"CFlow steady-state efficiency: {cflow_efficiency:.3f} (span {spans.span:.2f} s vs ideal {ideal:.2f} s; target >= 0.95)")
        if parallel:
            ratio = run.wall_seconds / figures["parallel_wall"]
            figures.update(ratio_whole=ratio)
            print(f"CFlow / GNU parallel wall, whole commands: {ratio:.2f}x (target <= 1.35)")
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
