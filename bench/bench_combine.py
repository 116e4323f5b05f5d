"""Combining outputs at scale: in the bucket (compose) against through the controller (every copy read), same bytes.

    python3 bench/bench_combine.py [--items 100000] [--old-way-items 2000] [--added-latency-ms 30]

At the end of a run `cflow.lifecycle.combine_outputs` combines the done
items' outputs. This benchmark stages done items on a local stack's
fake-gcs-server exactly as workers leave them (`cflow.worker.record`'s
calls: each output's shape, the CSV body uploaded apart from its header, the
done marker with the shapes in its metadata) and times:

- side by side, --old-way-items items: the old way (before this change: a
  run whose workers kept every file whole, combined by reading each item's
  done marker and output through the controller, --parallel at a time, then
  uploading the result) and the new way (one listing of the done markers, a
  tree of compose calls in the bucket, one download), on the same outputs;
  the two results must be the same bytes;
- the new way alone at --items items (target: 100,000 in under 2 minutes
  with a 30 ms round trip).

Reading it for GCS: a call from a VM to Cloud Storage takes tens of ms, not
the ~2 ms of CPU a local call costs here. --added-latency-ms models it: every
HTTP request of the combining client first waits that long (a sleep, as a
network round trip would, without using CPU). Staging is not timed and has no
added latency.
"""

import argparse
import contextlib
import fcntl
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import banner, run_on_bench_stack


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000, help="done items combined the new way (default 100,000)")
    parser.add_argument("--old-way-items", type=int, default=2000, help="done items combined both ways, side by side (default 2,000; 0: none)")
    parser.add_argument("--parallel", type=int, default=None, help="calls in flight (default: CFlow's own)")
    parser.add_argument("--added-latency-ms", type=float, default=30.0, help="wait this long before each request to Cloud Storage (default 30)")
    parser.add_argument("--stage-threads", type=int, default=8, help="threads per staging process (default 8)")
    parser.add_argument("--stage-processes", type=int, default=os.cpu_count() or 2, help="processes staging the done items (default: one a core)")
    parser.add_argument("--lock", metavar="FILE", help="stage first, then take this flock for the timed parts only "
                        "(e.g. /tmp/cflow-suite.lock on a shared machine)")
    parser.add_argument("--json", metavar="FILE", help="append the figures as a JSON line to FILE")
    args = parser.parse_args(argv)

    banner(f"bench_combine: {args.items} items the new way, {args.old_way_items} both ways, {args.added_latency_ms:g} ms added per request")
    return run_on_bench_stack("combine", args.json, lambda info, temporary: measure(info, temporary, args))


def with_latency(client, seconds):
    """``client`` with every HTTP request delayed by ``seconds`` (its session's ``request``; a thread-safe sleep)."""
    if not seconds:
        return client
    session = client._http
    request = session.request

    def delayed(*args, **kwargs):
        time.sleep(seconds)  # the modelled network round trip, not a race fix
        return request(*args, **kwargs)

    session.request = delayed
    return client


def _stage_chunk(project, bucket, run_id, folder, item_ids, keep_headers_apart, threads):
    """Stage ``item_ids`` from a process of its own (its own client): see ``stage``."""
    from cflow.combine import body_offset, shape_output, shapes_to_json
    from cflow.gcp.clients import build_storage_client
    from cflow.gcp.storage import RunStorage

    storage = RunStorage(build_storage_client("local", project), bucket, run_id)

    def one(item_id):
        path = folder / f"{item_id}.csv"
        path.write_text(f"item,value\n{item_id},{int(item_id) * 7}\n")
        shape = shape_output(path, keep_headers_apart)
        storage.upload_output(item_id, "result.csv", path, offset=body_offset(shape))
        info = {"item": item_id, "attempt": 1, "outputs": ["result.csv"]}
        if keep_headers_apart:
            info["output_shapes"] = shapes_to_json({"result.csv": shape})
        storage.write_done_marker(item_id, info)
        path.unlink()

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(one, item_ids))
    return len(item_ids)


def stage(project, bucket, run_id, temporary, item_ids, keep_headers_apart, threads, processes):
    """Leave ``item_ids`` done, each with one CSV output, as a worker does (cflow.worker.record's calls), from a few processes."""
    folder = temporary / f"stage-{run_id}"
    folder.mkdir()
    started = time.monotonic()
    chunk = 2000
    chunks = [item_ids[start:start + chunk] for start in range(0, len(item_ids), chunk)]
    done = 0
    with ProcessPoolExecutor(max_workers=processes) as pool:
        for count in pool.map(_stage_chunk, *zip(*[(project, bucket, run_id, folder, part, keep_headers_apart, threads) for part in chunks])):
            done += count
            if done % 20_000 == 0:
                print(f"  staged {done} of {len(item_ids)} ({time.monotonic() - started:.0f} s)", flush=True)
    print(f"staged {len(item_ids)} done items in run {run_id} in {time.monotonic() - started:.1f} s "
          f"({'header apart' if keep_headers_apart else 'whole files, as before'}; not timed)", flush=True)


def old_way(storage, item_ids, dest, parallel):
    """Combining before this change: every marker and output read through the controller, the result uploaded."""
    from cflow.combine import combine_concat

    written = combine_concat(item_ids, storage.recorded_output_names, storage.read_output, dest, parallel=parallel)
    for name, path in written.items():
        storage.upload_combined(name, path)
    return written


def new_way(storage, item_ids, dest, parallel):
    from cflow import combine

    return {name: file.path for name, file in combine.combine_outputs(storage, item_ids, dest, parallel=parallel).items()}


@contextlib.contextmanager
def held(lock_path):
    """Hold an exclusive flock on ``lock_path`` (None: nothing) for the block, saying how long it waited."""
    if lock_path is None:
        yield
        return
    with open(lock_path, "a") as stream:
        started = time.monotonic()
        fcntl.flock(stream, fcntl.LOCK_EX)
        print(f"  (waited {time.monotonic() - started:.0f} s for {lock_path}; load avg {os.getloadavg()[0]:.2f})", flush=True)
        try:
            yield
        finally:
            fcntl.flock(stream, fcntl.LOCK_UN)


def timed(label, function, *args):
    started = time.monotonic()
    result = function(*args)
    seconds = time.monotonic() - started
    print(f"  {label}: {seconds:7.2f} s", flush=True)
    return result, seconds


def measure(info, temporary, args):
    from cflow import combine
    from cflow.gcp.clients import build_storage_client
    from cflow.gcp.storage import Bucket, RunStorage

    parallel = args.parallel or combine.PARALLEL_COMPOSES
    latency = args.added_latency_ms / 1000
    staging_client = build_storage_client("local", info.project)
    combining_client = with_latency(build_storage_client("local", info.project), latency)
    bucket = f"{info.project}-bench-combine"
    Bucket(staging_client, bucket).ensure_exists(create_if_missing=True)
    figures = {"items": args.items, "old_way_items": args.old_way_items, "parallel": parallel, "added_latency_ms": args.added_latency_ms}

    def ids(count):
        return [f"{number:06d}" for number in range(count)]

    if args.old_way_items:
        count = args.old_way_items
        print(f"side by side, {count} items, {parallel} calls in flight, {args.added_latency_ms:g} ms per request:", flush=True)
        stage(info.project, bucket, "old-way", temporary, ids(count), False, args.stage_threads, args.stage_processes)
        stage(info.project, bucket, "new-way-small", temporary, ids(count), True, args.stage_threads, args.stage_processes)
        with held(args.lock):
            before, before_seconds = timed("old way (through the controller)", old_way, RunStorage(combining_client, bucket, "old-way"),
                                           ids(count), temporary / "old", parallel)
            after, after_seconds = timed("new way (in the bucket)        ", new_way,
                                         RunStorage(combining_client, bucket, "new-way-small"), ids(count), temporary / "new-small", parallel)
        same = before["result.csv"].read_bytes() == after["result.csv"].read_bytes()
        lines = after["result.csv"].read_bytes().count(b"\n")
        figures.update(old_way_seconds=before_seconds, new_way_small_seconds=after_seconds, speedup=before_seconds / after_seconds,
                       same_bytes=same)
        print(f"  speed-up {before_seconds / after_seconds:.1f}x; the same bytes: {same} ({lines} lines, one header); "
              f"old way per item {before_seconds / count * 1000:.2f} ms, so {args.items} items would take "
              f"~{before_seconds / count * args.items / 60:.0f} min", flush=True)
        if not same or lines != count + 1:
            raise SystemExit("bench_combine: the two ways' results differ")

    if args.items:
        print(f"the new way alone, {args.items} items:", flush=True)
        stage(info.project, bucket, "new-way", temporary, ids(args.items), True, args.stage_threads, args.stage_processes)
        expected_tree = 0
        sources = args.items + 1
        while sources > combine.MAX_COMPOSE_SOURCES:
            sources = -(-sources // combine.MAX_COMPOSE_SOURCES)
            expected_tree += sources
        with held(args.lock):
            result, seconds = timed("new way (in the bucket)", new_way, RunStorage(combining_client, bucket, "new-way"), ids(args.items),
                                    temporary / "new", parallel)
        data = result["result.csv"].read_bytes()
        complete = data.count(b"\n") == args.items + 1 and data.startswith(b"item,value\n000000,0\n")
        figures.update(new_way_seconds=seconds, complete=complete, compose_calls=expected_tree + 1, result_bytes=len(data))
        print(f"  {args.items} items in {seconds:.1f} s (target < 120 s at 30 ms): {expected_tree + 1} compose calls, "
              f"{len(data):,} bytes, complete: {complete}", flush=True)
        if not complete:
            raise SystemExit("bench_combine: the combined result is not complete")
    return figures


if __name__ == "__main__":
    sys.exit(main())
