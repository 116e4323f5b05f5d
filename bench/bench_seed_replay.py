"""Benchmark 5: the seed's own job, time scaled down, against the seed's 45% efficiency.

    python3 bench/bench_seed_replay.py [--items 125] [--workers 125] [--seconds 6.7]

The seed ran 125 items of ~6.7 minutes each (14 hours in all) on 125 VMs in
15 minutes: 6.7 min ideal over 15 min actual, 45% efficient. This replays it
60 times faster: 125 items of 6.7 s on the local stack through
`python3 scheduler.py`, each worker a real VM of the Compute emulator running
init.sh and the Python worker (a process of 60-100 MB on this host).

Prints whole-run efficiency, (N*T/W) / scheduler.py wall (what the seed's
45% is), and steady-state efficiency, (N*T/W) / (last task end - first task
start), plus the workers' peak memory, so a machine too small for --workers
VMs shows it; scale --workers down then and say so.
"""

import argparse
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import SLEEP_TASK, BenchProject, Spans, banner, bench_stack, describe, write_json_result

SEED_EFFICIENCY = 0.45


class WorkerMemory:
    """Samples, in a thread, the summed RSS of every running worker process (startup-signal.py)."""

    def __init__(self, interval_s=1.0):
        self.interval_s = interval_s
        self.peak_total_mib = 0.0
        self.peak_count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="worker-memory", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            total, count = 0.0, 0
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry.name}/cmdline", "rb") as stream:
                        if b"startup-signal.py" not in stream.read():
                            continue
                    with open(f"/proc/{entry.name}/status") as stream:
                        rss = next(int(line.split()[1]) for line in stream if line.startswith("VmRSS:"))
                except (OSError, StopIteration):
                    continue
                total, count = total + rss / 1024, count + 1
            if total > self.peak_total_mib:
                self.peak_total_mib, self.peak_count = total, count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=125, help="work items (default 125, the seed's)")
    parser.add_argument("--workers", type=int, default=125, help="worker VMs (default 125, the seed's)")
    parser.add_argument("--seconds", type=float, default=6.7, help="seconds per item (default 6.7: the seed's 6.7 min, 60x faster)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    parser.add_argument("--json", metavar="FILE", help="append the figures as a JSON line to FILE")
    args = parser.parse_args(argv)

    banner(f"bench_seed_replay: {args.items} items of {args.seconds:g} s on {args.workers} workers")
    temporary = Path(tempfile.mkdtemp(prefix="cflow-bench-seed-"))
    try:
        ideal = args.items * args.seconds / args.workers
        stamps = temporary / "stamps.txt"
        with bench_stack(temporary / "stack") as (_info, stack_seconds):
            print(f"local stack up in {stack_seconds:.2f} s", flush=True)
            project = BenchProject(temporary / "project", SLEEP_TASK, WORKER_NODE_CNT=args.workers, VM_TYPE="e2-small",
                                   TASK_TIMEOUT=max(120, int(args.seconds * 10)))
            project.write([f"item-{number:05d} {args.seconds:g} {stamps}" for number in range(1, args.items + 1)])
            with WorkerMemory() as memory:
                run = project.run(temporary / "stack").check()
        spans = Spans.read(stamps)
        whole = ideal / run.wall_seconds
        steady = spans.efficiency(args.items, args.seconds, args.workers)
        firsts = spans.first_starts()
        print(f"ideal (N*T/W) {ideal:.2f} s; scheduler.py wall {run.wall_seconds:.2f} s; tasks from first start to last end {spans.span:.2f} s")
        print(f"  first task start {spans.first_start - run.started_at:.2f} s after scheduler.py started; "
              f"{len(firsts)} workers ran tasks, the last one's first task {firsts[-1] - firsts[0]:.2f} s after the first's")
        print(f"  task runs {len(spans.lines)} for {spans.distinct_items()} items; per-worker gap between tasks: {describe(spans.gaps())}")
        print(f"  workers' peak memory: {memory.peak_total_mib:.0f} MiB over {memory.peak_count} worker processes "
              f"({memory.peak_total_mib / max(1, memory.peak_count):.0f} MiB each)")
        print(f"whole-run efficiency: {whole:.1%} (the seed: {SEED_EFFICIENCY:.0%}); steady-state efficiency: {steady:.1%}")
        write_json_result(args.json, {
            "bench": "seed_replay", "items": args.items, "workers": args.workers, "seconds": args.seconds,
            "wall": run.wall_seconds, "span": spans.span, "whole_efficiency": whole, "steady_efficiency": steady,
            "fleet_stagger": firsts[-1] - firsts[0], "worker_peak_mib": memory.peak_total_mib, "worker_peak_count": memory.peak_count,
        })
        return 0
    finally:
        if args.keep:
            print(f"kept: {temporary}")
        else:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
