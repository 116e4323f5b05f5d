"""Building report.html from synthetic runs of 10,000 and 100,000 items: build time and size.

    python3 bench/bench_report.py [--sizes 10000:100 100000:1000] [--out DIR]

Each size is ITEMS:VMS. The run is made up the way real runs look: items of
1-3 minutes (log-normal) on Spot VMs that boot in ~40 s, 3% of attempts
failing once, 0.5% failing for good, a few VMs preempted mid-task (their item
runs again elsewhere), a duplicate now and then, and replacement VMs for the
preempted ones. It builds the report with ``cflow.report.render`` (pure: no
Cloud Storage involved), prints the build time (best of --repeat) and the
page's size, and checks the page stays under 2 MB. ``--out DIR`` keeps the
pages to look at.

``--gather-items N`` also measures gathering (``cflow.ops.report.gather``,
what ``cflow report`` and the end of a run read): it starts fake-gcs-server
alone on a temporary folder (as the commands do with no stack running),
writes a run of N items there as workers leave one (run.json, items.jsonl,
a done marker with its span per item, a few failures, vms.json), times
gathering it, and stops the server.
"""

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cflow.history import AttemptSpan, VmRecord
from cflow.protocol import EventKind
from cflow.report import FailedRow, ReportInput, render

SIZE_LIMIT_BYTES = 2_000_000
START = 1_764_000_000.0


def synthetic_input(items: int, vms: int, seed: int = 14) -> ReportInput:
    """A made-up finished run of ``items`` items on ``vms`` Spot VMs (plus replacements for the preempted)."""
    rng = random.Random(seed)
    run_id = "1130-0900-beef"
    labels = {f"{i:06d}": f"{i:06d} (gs://bench-bucket/inputs/shard-{i:06d}.csv)" for i in range(items)}
    queue = list(labels)
    records: list[VmRecord] = []
    spans: list[AttemptSpan] = []
    done_times: dict[str, float] = {}
    failed: list[FailedRow] = []
    free: list[tuple[float, str]] = []
    for n in range(vms):
        created = START + rng.uniform(0, 5)
        record = VmRecord(f"cflow-worker-{run_id}-{n + 1:04d}", "us-central1-a", "e2-standard-2", True, created=created,
                          first_seen=created + 2, running=created + 20)
        records.append(record)
        free.append((created + rng.uniform(30, 50), record.name))
    by_name = {record.name: record for record in records}
    attempts = {item: 1 for item in queue}
    while queue:
        free.sort()
        at, vm = free.pop(0)
        item = queue.pop(0)
        seconds = rng.lognormvariate(4.7, 0.35)
        ended = at + seconds
        roll = rng.random()
        if roll < 0.0008 and len(records) < vms * 1.2:
            # Preempted mid-task: the item goes back to the queue, a new VM replaces this one.
            ended = at + seconds * rng.random()
            spans.append(AttemptSpan(item, attempts[item], vm, at, ended, EventKind.PREEMPTED))
            by_name[vm].preempted = ended
            by_name[vm].gone = ended + 25
            queue.insert(rng.randrange(0, min(len(queue), 50) + 1), item)
            created = ended + 30
            replacement = VmRecord(f"cflow-worker-{run_id}-{len(records) + 1:04d}", "us-central1-a", "e2-standard-2", True,
                                   created=created, first_seen=created + 2, running=created + 20)
            records.append(replacement)
            by_name[replacement.name] = replacement
            free.append((created + rng.uniform(30, 50), replacement.name))
            continue
        if roll < 0.03:
            last = attempts[item] >= 3 or roll < 0.005
            kind = EventKind.FAILED if last else EventKind.RETRY
            spans.append(AttemptSpan(item, attempts[item], vm, at, ended, kind))
            if last:
                failed.append(FailedRow(item, labels[item], attempts[item], "exit status 1",
                                        f"gs://bench-bucket/cflow/runs/{run_id}/logs/{item}/attempt-{attempts[item]}.log"))
            else:
                attempts[item] += 1
                queue.insert(rng.randrange(0, min(len(queue), 200) + 1), item)
        elif roll < 0.032:
            spans.append(AttemptSpan(item, attempts[item], vm, at, ended, EventKind.DUPLICATE))
        else:
            spans.append(AttemptSpan(item, attempts[item], vm, at, ended, EventKind.DONE))
            done_times[item] = ended + 0.05
        free.append((ended + rng.uniform(0.02, 0.06), vm))
    for at, vm in free:
        if by_name[vm].gone is None:
            by_name[vm].gone = max(at, max(done_times.values(), default=at)) + 5
    end = max(record.gone or 0 for record in records)
    failed.sort(key=lambda row: row.item_id)
    prices = {"e2-standard-2": {"standard": 0.067, "spot": 0.020}}
    return ReportInput(run_id, "finished", f"gs://bench-bucket/cflow/runs/{run_id}/", START, end + 1, items, done_times,
                       failed, len(failed), labels, spans, records, prices, "e2-standard-2", True)


def measure_gather(items: int) -> dict[str, float]:
    """Write a run of ``items`` items to a fake-gcs-server of its own, then time gathering its report."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from cflow.gcp.storage import RunStorage
    from cflow.history import VmHistory
    from cflow.local.stored_runs import stack_storage
    from cflow.ops.report import gather
    from cflow.ops.view import RunView
    from cflow.tasks import make_items

    data = synthetic_input(items, max(items // 100, 1))
    with tempfile.TemporaryDirectory(prefix="bench-report-") as folder:
        (Path(folder) / "gcs").mkdir()
        with stack_storage(folder) as served:
            os.environ["STORAGE_EMULATOR_HOST"] = served.url
            client = storage.Client(project="cflow-local", credentials=AnonymousCredentials())
            client.create_bucket("bench-bucket")
            run = RunStorage(client, "bench-bucket", data.run_id)
            work = make_items([[f"gs://bench-bucket/inputs/shard-{i:06d}.csv"] for i in range(items)])
            run.write_items(work)
            run.write_manifest({"run_id": data.run_id, "created": data.created, "item_count": items, "bucket": "bench-bucket",
                                "settings": {"vm_type": "e2-standard-2", "vm_spot": True, "prices": dict(data.prices)}})
            history = VmHistory(data.vms)
            history.dirty = True
            run.write_vm_history(history.to_document())
            started = time.perf_counter()

            def record(span: AttemptSpan) -> None:
                info = {"item": span.item, **span.fields(), "log": run.log_url(span.item, span.attempt)}
                if span.outcome == EventKind.DONE:
                    run.write_done_marker(span.item, info)
                elif span.outcome in (EventKind.RETRY, EventKind.FAILED):
                    run.write_attempt_marker(span.item, span.attempt, {**info, "reason": "exit status 1"})
                    if span.outcome == EventKind.FAILED:
                        run.write_failed_marker(span.item, {**info, "reason": "exit status 1", "attempts": span.attempt})
                else:
                    run.write_timeline_record(span)

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(record, data.spans))
            seeded = time.perf_counter() - started
            started = time.perf_counter()
            gathered = gather(RunView(run), time.time())
            seconds = time.perf_counter() - started
            started = time.perf_counter()
            render(gathered)
            rendered = time.perf_counter() - started
    print(f"gather: {items:,} items ({len(gathered.spans):,} spans, {gathered.failed_count:,} failed) read in {seconds:.2f} s "
          f"from fake-gcs-server, rendered in {rendered:.2f} s (writing them took {seeded:.1f} s)")
    return {"gather_items": items, "gather_seconds": round(seconds, 3), "render_seconds": round(rendered, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["10000:100", "10000:1000", "100000:1000"], metavar="ITEMS:VMS")
    parser.add_argument("--repeat", type=int, default=3, help="builds per size; the best is reported (default 3)")
    parser.add_argument("--out", metavar="DIR", help="write each report here to look at it")
    parser.add_argument("--json", metavar="FILE", help="append the figures as a JSON line to FILE")
    parser.add_argument("--gather-items", type=int, default=0, metavar="N",
                        help="also time gathering a run of N items from a local fake-gcs-server (default: skip)")
    args = parser.parse_args(argv)
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; nproc {os.cpu_count()}; load avg {load}")
    failures = 0
    results: list[dict[str, float]] = []
    for size in args.sizes:
        items, vms = (int(part) for part in size.split(":"))
        data = synthetic_input(items, vms)
        timings = []
        page = ""
        for _ in range(args.repeat):
            started = time.perf_counter()
            page = render(data)
            timings.append(time.perf_counter() - started)
        size_bytes = len(page.encode("utf-8"))
        within = size_bytes <= SIZE_LIMIT_BYTES
        failures += not within
        print(f"{items:>7,} items, {len(data.vms):>5,} VMs, {len(data.spans):>7,} attempts: build {min(timings):6.2f} s "
              f"(best of {args.repeat}), {size_bytes / 1e6:5.2f} MB {'OK' if within else 'OVER 2 MB'}")
        results.append({"items": items, "vms": len(data.vms), "attempts": len(data.spans), "build_seconds": round(min(timings), 3),
                        "bytes": size_bytes})
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"report-{items}-{vms}.html").write_text(page)
    if args.gather_items:
        results.append(measure_gather(args.gather_items))
    if args.json:
        with open(args.json, "a") as stream:
            stream.write(json.dumps({"bench": "report", "results": results}) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
