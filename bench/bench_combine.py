"""Combining outputs at scale: one read at a time against CFlow's parallel reads.

    python3 bench/bench_combine.py [--items 2000] [--parallel 8]

At the end of a run, `cflow.combine.combine_concat` reads each done item's
marker (to learn its recorded outputs) and each output file: two Cloud
Storage GETs per item. This benchmark stages ITEMS done items on a local
stack's fake-gcs-server, as workers leave them (a done marker listing one
CSV output, and the CSV), then combines them through CFlow's own
`RunStorage` twice, back to back: with one call in flight (how combining
worked before) and with --parallel calls in flight. It prints both times,
their ratio, and the per-GET time, and checks that both results are the
same bytes.

Reading it for GCS: a GET from a VM to Cloud Storage takes tens of ms, not
the ~2 ms of CPU a local GET costs here, so one at a time scales with that
latency (100,000 items x 2 GETs x 30 ms = 100 minutes). --added-latency-ms
models it: each GET first waits that long (a sleep, as a network round trip
would, without using CPU). Locally with no added latency the GETs are
CPU-bound on 2 cores and parallel reads gain little.
"""

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import banner, run_on_bench_stack


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000, help="done items to combine (default 2000)")
    parser.add_argument("--parallel", type=int, default=None, help="calls in flight (default: CFlow's PARALLEL_READS)")
    parser.add_argument("--added-latency-ms", type=float, default=0.0,
                        help="wait this long before each GET, as a round trip to Cloud Storage would (default 0)")
    parser.add_argument("--json", metavar="FILE", help="append the figures as a JSON line to FILE")
    args = parser.parse_args(argv)

    from cflow.combine import PARALLEL_READS

    parallel = args.parallel or PARALLEL_READS
    banner(f"bench_combine: {args.items} done items, 1 vs {parallel} reads in flight, "
           f"{args.added_latency_ms:g} ms added per GET")
    return run_on_bench_stack(
        "combine", args.json,
        lambda info, temporary: measure(info, temporary, args.items, parallel, args.added_latency_ms / 1000))


def with_latency(function, seconds):
    if not seconds:
        return function

    def delayed(*args):
        time.sleep(seconds)  # the modelled network round trip, not a race fix
        return function(*args)

    return delayed


def measure(info, temporary, item_count, parallel, latency):
    from cflow.combine import combine_concat
    from cflow.gcp.clients import build_clients
    from cflow.gcp.storage import RunStorage

    clients = build_clients("local", info.project)
    bucket = f"{info.project}-bench-combine"
    clients.storage.create_bucket(bucket)
    storage = RunStorage(clients.storage, bucket, "bench-combine")
    item_ids = [f"{number:06d}" for number in range(item_count)]

    def stage(item_id):
        path = temporary / f"stage-{item_id}.csv"
        path.write_text(f"item,value\n{item_id},{int(item_id) * 7}\n")
        storage.upload_output(item_id, "result.csv", path)
        storage.write_done_marker(item_id, {"item": item_id, "attempt": 1, "outputs": ["result.csv"]})
        path.unlink()

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(stage, item_ids))
    print(f"staged {item_count} done items (marker + one CSV each) in {time.monotonic() - started:.1f} s", flush=True)

    figures = {"items": item_count, "parallel": parallel, "added_latency_ms": latency * 1000}
    list_names, read_output = with_latency(storage.recorded_output_names, latency), with_latency(storage.read_output, latency)
    results = {}
    for label, in_flight in (("one at a time", 1), (f"{parallel} in flight", parallel)):
        dest = temporary / f"combined-{in_flight}"
        started = time.monotonic()
        written = combine_concat(item_ids, list_names, read_output, dest, parallel=in_flight)
        seconds = time.monotonic() - started
        results[in_flight] = written["result.csv"].read_bytes()
        figures[f"seconds_parallel_{in_flight}"] = seconds
        print(f"combine, {label:>14}: {seconds:6.2f} s ({item_count / seconds:7.0f} items/s, "
              f"{seconds / (2 * item_count) * 1000:.2f} ms per GET)", flush=True)
    expected_rows = item_count + 1  # one header
    same = results[1] == results[parallel] and results[1].count(b"\n") == expected_rows
    ratio = figures["seconds_parallel_1"] / figures[f"seconds_parallel_{parallel}"]
    figures.update(speedup=ratio, same_result=same)
    print(f"speed-up: {ratio:.2f}x; results identical and complete ({expected_rows} lines): {same}")
    if not same:
        raise SystemExit("bench_combine: the two combined results differ")
    return figures


if __name__ == "__main__":
    sys.exit(main())
