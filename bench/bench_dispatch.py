"""Benchmark 2: dispatch overhead with zero-work items.

    python3 bench/bench_dispatch.py [--idle-items 50] [--queued-items 200]

How it measures (and why in-process): the task cannot see the Pub/Sub
publish time, and the run's published.json holds one time for all items. So
this benchmark drives CFlow's own seams in one process against a local
stack's emulators: ``cflow.gcp.pubsub.PubSub`` publishes, and a real
``cflow.worker.Worker`` (real clients from ``build_worker_clients``) runs in a
thread, exactly the loop startup-signal.py runs on a VM. Its task is bash
writing a one-line CSV and stamping ``$EPOCHREALTIME`` (no fork) at start and
end. Every seam call of the worker (pull, ack, publish_event, uploads,
markers) is timed through a thin recording proxy, so the gap between two
tasks is broken down by call.

Two phases:

- idle worker: one item published at a time while the worker waits in its
  pull; publish -> task start, task end -> done marker written, task end -> ack.
  The publish lands at a random moment 0-100 ms into the pull's wait (or, with
  --idle-phase pull-start, as it begins): the Pub/Sub emulator looks for new
  messages about every 50 ms of a waiting pull, so the phase alone moves the
  figure by up to 50 ms.
- queue full: all items published first (each sleeping --queued-seconds); the
  worker's gap between one task's end and the next one's start (what a busy worker loses per item), with its
  breakdown, and task end -> done marker written.

Target: median publish -> task start and task end -> done recorded < 50 ms.
"""

import argparse
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import banner, describe, percentile, run_on_bench_stack

ZERO_WORK_TASK = r"""#!/bin/bash
# Zero-work benchmark task: argv ITEM STAMP_FILE [SECONDS to sleep].
start=$EPOCHREALTIME
if [ -n "${3:-}" ]; then sleep "$3"; fi
printf 'item\n%s\n' "$1" > "$CFLOW_OUTPUT_DIR/result.csv"
echo "$1 $start $EPOCHREALTIME" >> "$2"
"""


class CallRecorder:
    """Records (seam, method, start, end) of every call made through its proxies (thread-safe)."""

    def __init__(self):
        self.calls = []
        self._running = {}  # "seam.method" -> calls now in progress
        self._lock = threading.Lock()

    def begin(self, seam, method):
        with self._lock:
            key = f"{seam}.{method}"
            self._running[key] = self._running.get(key, 0) + 1

    def is_running(self, seam, method):
        with self._lock:
            return self._running.get(f"{seam}.{method}", 0) > 0

    def proxy(self, seam_name, target):
        return _RecordingProxy(self, seam_name, target)

    def add(self, seam, method, start, end):
        with self._lock:
            self._running[f"{seam}.{method}"] -= 1
            self.calls.append((seam, method, start, end))

    def between(self, start, end):
        """Seconds per 'seam.method' of calls that began in [start, end), clipped to the window."""
        totals = {}
        with self._lock:
            calls = list(self.calls)
        for seam, method, call_start, call_end in calls:
            if start <= call_start < end:
                key = f"{seam}.{method}"
                totals[key] = totals.get(key, 0.0) + min(call_end, end) - call_start
        return totals

    def latest_end_before(self, seam, method, moment):
        """End time of the last ``seam.method`` call that ended before ``moment``."""
        with self._lock:
            return max(e for s, m, _, e in self.calls if s == seam and m == method and e <= moment)

    def last_end(self, seam, method, after):
        """End time of the first ``seam.method`` call that began after ``after``, or None."""
        with self._lock:
            ends = [e for s, m, b, e in self.calls if s == seam and m == method and b >= after]
        return min(ends) if ends else None


class _RecordingProxy:
    def __init__(self, recorder, seam_name, target):
        self._recorder = recorder
        self._seam_name = seam_name
        self._target = target

    def __getattr__(self, name):
        value = getattr(self._target, name)
        if not callable(value):
            return value

        def timed(*args, **kwargs):
            self._recorder.begin(self._seam_name, name)
            start = time.time()
            try:
                return value(*args, **kwargs)
            finally:
                self._recorder.add(self._seam_name, name, start, time.time())

        return timed


def read_stamps(path):
    stamps = {}
    if path.exists():
        for line in path.read_text().splitlines():
            item, start, end = line.split()
            stamps[item] = (float(start), float(end))
    return stamps


def wait_for(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.01)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle-items", type=int, default=50, help="items published one at a time to an idle worker (default 50)")
    parser.add_argument("--queued-items", type=int, default=200, help="items published at once, then worked through (default 200)")
    parser.add_argument("--queued-seconds", type=float, default=0.0,
                        help="how long each queued task sleeps (default 0: zero work; with 1, a result is recorded "
                             "while the next task runs, as on a real run)")
    parser.add_argument("--idle-phase", choices=("random", "pull-start"), default="random",
                        help="when to publish to the idle worker: at a random moment 0-100 ms into its waiting pull "
                             "(default), or as soon as the pull starts (the emulator's worst case: it looks for new "
                             "messages every ~50 ms of a pull's wait)")
    parser.add_argument("--json", metavar="FILE", help="append the figures as a JSON line to FILE")
    args = parser.parse_args(argv)

    banner(f"bench_dispatch: {args.idle_items} items to an idle worker (publish phase: {args.idle_phase}), "
           f"{args.queued_items} queued ({args.queued_seconds:g} s each)")
    return run_on_bench_stack("dispatch", args.json, lambda info, temporary: measure(info, temporary, args))


def measure(info, temporary, args):
    from cflow.gcp.clients import build_worker_clients
    from cflow.gcp.metadata import Metadata
    from cflow.gcp.pubsub import PubSub, RunTopics
    from cflow.gcp.storage import RunStorage
    from cflow.tasks import WorkItem, encode_message
    from cflow.worker import WorkDir, Worker, WorkerSettings

    run_id = "bench-dispatch"
    bucket = f"{info.project}-bench"
    clients = build_worker_clients("local", info.project)
    clients.storage.create_bucket(bucket)
    pubsub = PubSub(clients.publisher, clients.subscriber)
    topics = RunTopics.for_run(info.project, run_id, "bench-topic", "bench-sub")
    pubsub.create_run_topics(topics, ack_deadline_seconds=60)

    work_dir = WorkDir(temporary / "vm")
    (work_dir.package / "task").mkdir(parents=True)
    (work_dir.package / "task" / "task.sh").write_text(ZERO_WORK_TASK)
    stamps_file = temporary / "stamps.txt"
    settings = WorkerSettings(
        run_id=run_id, bucket=bucket, work_subscription=topics.work_subscription, work_topic=topics.work_topic,
        events_topic=topics.events_topic, task_command=("bash", "task/task.sh"), task_timeout=60, max_attempts=3,
        lease_seconds=60, idle_poweroff_seconds=3600,
    )
    recorder = CallRecorder()
    # The worker's own clients, timed call by call; the publisher below is the controller's side.
    worker_pubsub = PubSub(clients.publisher, clients.subscriber)
    worker = Worker(
        settings, recorder.proxy("pubsub", worker_pubsub), recorder.proxy("storage", RunStorage(clients.storage, bucket, run_id)),
        # Asked only after a failed task (never here); an unreachable host answers "not preempted".
        Metadata(host="127.0.0.1:9"), work_dir, "bench-worker",
    )
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("reason", worker.run()), name="worker", daemon=True)
    thread.start()

    def publish(number):
        item = WorkItem(id=f"{number:06d}", index=number, args=(f"{number:06d}", str(stamps_file)))
        data, attributes = encode_message(item, 1)
        pubsub.publish(topics.work_topic, data, attributes)
        return item.id

    figures = {}
    try:
        # Phase 1: one item at a time to a worker waiting in its pull.
        to_start, to_done, to_ack = [], [], []
        publish_calls, deliveries, pulled_to_start = [], [], []
        for number in range(args.idle_items):
            # This phase measures a worker that waits in its pull, so publish only once it does.
            wait_for(lambda: recorder.is_running("pubsub", "pull"), 30, "the worker to wait in its pull")
            if args.idle_phase == "random":
                # A real publish lands at any moment of a worker's wait, not just as it begins.
                time.sleep(random.uniform(0.0, 0.1))
            published_at = time.time()
            item_id = publish(number)
            publish_calls.append(time.time() - published_at)
            start, end = wait_for(lambda: read_stamps(stamps_file).get(item_id), 30, f"task {item_id} to run")  # noqa: B023 (called at once)
            pulled_at = recorder.latest_end_before("pubsub", "pull", start)
            deliveries.append(pulled_at - published_at)
            pulled_to_start.append(start - pulled_at)
            done_at = wait_for(lambda: recorder.last_end("storage", "write_done_marker", end), 30, f"done marker of {item_id}")  # noqa: B023
            acked_at = wait_for(lambda: recorder.last_end("pubsub", "ack", end), 30, f"ack of {item_id}")  # noqa: B023
            to_start.append(start - published_at)
            to_done.append(done_at - end)
            to_ack.append(acked_at - end)
        print(f"idle worker, publish -> task start:      {describe(to_start)}")
        print(f"    publish call returned:               {describe(publish_calls)}")
        print(f"    waiting pull returned (from publish): {describe(deliveries)}")
        print(f"    pull returned -> task start:          {describe(pulled_to_start)}")
        print(f"idle worker, task end -> done recorded:  {describe(to_done)}")
        print(f"idle worker, task end -> ack:            {describe(to_ack)}")
        figures.update(idle_publish_to_start_median=percentile(to_start, 0.5), idle_publish_to_start_p99=percentile(to_start, 0.99),
                       idle_end_to_done_median=percentile(to_done, 0.5), idle_end_to_done_p99=percentile(to_done, 0.99))

        # Phase 2: a full queue; what a busy worker loses between two tasks.
        first = args.idle_items
        ids = [f"{number:06d}" for number in range(first, first + args.queued_items)]

        def queued_args(item_id):
            return (item_id, str(stamps_file)) + ((f"{args.queued_seconds:g}",) if args.queued_seconds else ())

        publish_started = time.monotonic()
        count = pubsub.publish_many(
            topics.work_topic,
            (encode_message(WorkItem(id=i, index=n, args=queued_args(i)), 1) for n, i in zip(range(first, first + args.queued_items), ids)),
        )
        publish_seconds = time.monotonic() - publish_started
        wait_for(lambda: all(i in stamps for i in ids) if (stamps := read_stamps(stamps_file)) else False,
                 60 + args.queued_items, "the queued items to run")
        last_end = max(read_stamps(stamps_file)[i][1] for i in ids)
        wait_for(lambda: recorder.last_end("pubsub", "ack", last_end), 30, "the last ack")
        stamps = read_stamps(stamps_file)
        runs = sorted(stamps[i] for i in ids)
        gaps, to_done, breakdown = [], [], {}
        for (_start, end), (next_start, _) in zip(runs, runs[1:]):
            gaps.append(next_start - end)
            for key, seconds in recorder.between(end, next_start).items():
                breakdown.setdefault(key, []).append(seconds)
        for _start, end in runs:
            done_at = recorder.last_end("storage", "write_done_marker", end)
            if done_at is not None:
                to_done.append(done_at - end)
        print(f"queue full: published {count} in {publish_seconds * 1000:.0f} ms; worker ran them in {runs[-1][1] - runs[0][0]:.2f} s")
        print(f"queue full, task end -> next task start: {describe(gaps)}")
        print(f"queue full, task end -> done recorded:   {describe(to_done)}")
        print("  where the gap goes (median ms per item, worker's seam calls in the gap):")
        accounted = 0.0
        for key, values in sorted(breakdown.items(), key=lambda kv: -percentile(kv[1], 0.5)):
            median = percentile(values, 0.5)
            accounted += median
            print(f"    {key:32s} {median * 1000:7.1f}  (in {len(values)} of {len(gaps)} gaps)")
        print(f"    {'rest (Popen, bash start, local files)':32s} {max(0.0, percentile(gaps, 0.5) - accounted) * 1000:7.1f}")
        figures.update(queued_gap_median=percentile(gaps, 0.5), queued_gap_p99=percentile(gaps, 0.99),
                       queued_end_to_done_median=percentile(to_done, 0.5), queued_end_to_done_p99=percentile(to_done, 0.99),
                       breakdown_median_ms={k: round(percentile(v, 0.5) * 1000, 2) for k, v in breakdown.items()})
        for label, key in (("publish -> task start", "idle_publish_to_start_median"), ("task end -> done recorded", "idle_end_to_done_median")):
            print(f"target median < 50 ms, {label} (idle worker): {'met' if figures[key] < 0.05 else 'NOT met'}")
    finally:
        work_dir.stopping.touch()
        # Wake the worker's blocking pull so it sees the stop file now: an item
        # already done is acked as a duplicate without running.
        publish(0)
        thread.join(timeout=30)
        pubsub.delete_run_topics(topics)
    return figures


if __name__ == "__main__":
    sys.exit(main())
