"""Shared helpers of the benchmarks under bench/ (not a test module).

Each benchmark starts what it needs on 127.0.0.1 (a local stack in a
temporary folder), stops it in a ``finally``, and prints its figures. What is
shared lives here:

- ``bench_stack(dir, **compute_options)``: ``LocalStack(dir).up(...)`` and
  ``.down()`` as a context manager, with the start time measured.
- ``compute_emulator(state_dir, **compute_options)``: the Compute emulator
  alone, started as the stack starts it; ``compute_client(endpoint)`` and
  ``wait_zone_operation`` to drive it.
- ``BenchProject``: a throwaway CFlow project folder (const.py, tasks.txt,
  task/task.sh and the worker scripts copied from this checkout), run with
  ``python3 scheduler.py`` as a user runs it: against a running stack
  (``run``), or the whole command with no stack running (``run_whole``: it
  starts and stops its own), each printed line stamped as it arrives.
- statistics (``percentile``, ``describe``), task time-stamp files, the
  machine line (nproc, memory, load, date) printed with every result.
"""

import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cflow.local.launchers import launch_compute_emulator  # noqa: E402
from cflow.local.services import stop_and_reap  # noqa: E402
from cflow.local.stack import ComputeOptions, LocalStack  # noqa: E402

WORKER_SCRIPTS = ("init.sh", "startup-signal.py", "shutdown-signal.py")

# One task for the efficiency benchmarks: argv is ITEM SECONDS STAMP_FILE. It
# appends "ITEM START END WORKER" (epoch seconds; WORKER is $HOME, which is
# per VM on the Compute emulator) to STAMP_FILE, a host path: the emulated
# VMs are local processes, so every worker writes to the same file.
# One line is far below PIPE_BUF, so concurrent appends do not interleave.
SLEEP_TASK = r"""#!/bin/bash
# Benchmark task: sleep SECONDS, write a small CSV, record start and end.
set -eu
item="$1" seconds="$2" stamps="$3"
start=$(date +%s.%N)
sleep "$seconds"
out="${CFLOW_OUTPUT_DIR:-$PWD/out/$item}"
mkdir -p "$out"
printf 'item,seconds\n%s,%s\n' "$item" "$seconds" > "$out/result.csv"
end=$(date +%s.%N)
echo "$item $start $end $HOME" >> "$stamps"
"""


# ---------------------------------------------------------------- machine


def machine_summary():
    """One line: date, nproc, memory, load average, Python; printed with every result."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{now}; nproc {os.cpu_count()}; memory {memory_gib:.1f} GiB; load avg {load}; Python {platform.python_version()}"


def rss_mib(pid=None):
    """Resident memory of ``pid`` (default: this process) in MiB, from /proc."""
    with open(f"/proc/{pid or os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def banner(title):
    print(f"== {title}")
    print(f"machine: {machine_summary()}", flush=True)


# ---------------------------------------------------------------- statistics


def percentile(values, fraction):
    """Nearest-rank percentile (``fraction`` in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return ordered[rank - 1]


def describe(values, unit_scale=1000.0, unit="ms"):
    """'median X, p99 Y, max Z (n=N)' of seconds, shown in ``unit``."""
    if not values:
        return "no samples"
    return (
        f"median {percentile(values, 0.5) * unit_scale:.1f} {unit}, p99 {percentile(values, 0.99) * unit_scale:.1f} {unit}, "
        f"max {max(values) * unit_scale:.1f} {unit} (n={len(values)})"
    )


@dataclass(frozen=True)
class Spans:
    """Task start/end times read from a stamp file (one 'ITEM START END WORKER' line per run of the task)."""

    lines: tuple  # (item, start, end)
    workers: tuple  # the WORKER of each line

    @classmethod
    def read(cls, path):
        lines, workers = [], []
        for text in Path(path).read_text().splitlines():
            item, start, end, worker = text.split(maxsplit=3)
            lines.append((item, float(start), float(end)))
            workers.append(worker)
        return cls(tuple(lines), tuple(workers))

    def gaps(self):
        """Seconds each worker spent between one task's end and its next task's start (dispatch overhead)."""
        by_worker: dict[str, list[tuple[float, float]]] = {}
        for (_, start, end), worker in zip(self.lines, self.workers):
            by_worker.setdefault(worker, []).append((start, end))
        gaps: list[float] = []
        for runs in by_worker.values():
            runs.sort()
            gaps.extend(later[0] - earlier[1] for earlier, later in zip(runs, runs[1:]))
        return gaps

    def durations(self):
        """Seconds each task run took, from its own start and end stamps."""
        return [end - start for _, start, end in self.lines]

    def last_worker(self):
        """Where the span goes, for the worker whose last task ended last.

        Returns (its first start after the fleet's first start, its task count,
        seconds in its tasks, seconds in the gaps between them): these add up
        to the span.
        """
        by_worker: dict[str, list[tuple[float, float]]] = {}
        for (_, start, end), worker in zip(self.lines, self.workers):
            by_worker.setdefault(worker, []).append((start, end))
        runs = sorted(max(by_worker.values(), key=lambda runs: max(end for _, end in runs)))
        busy = sum(end - start for start, end in runs)
        gaps = sum(later[0] - earlier[1] for earlier, later in zip(runs, runs[1:]))
        return runs[0][0] - self.first_start, len(runs), busy, gaps

    def first_starts(self):
        """Each worker's first task start, sorted (how staggered the fleet came up)."""
        firsts: dict[str, float] = {}
        for (_, start, _), worker in zip(self.lines, self.workers):
            firsts[worker] = min(start, firsts.get(worker, start))
        return sorted(firsts.values())

    @property
    def first_start(self):
        return min(start for _, start, _ in self.lines)

    @property
    def last_end(self):
        return max(end for _, _, end in self.lines)

    @property
    def span(self):
        return self.last_end - self.first_start

    def distinct_items(self):
        return len({item for item, _, _ in self.lines})

    def efficiency(self, items, seconds, workers):
        """(N*T/W) / (last task end - first task start): 1.0 is every worker busy all the time."""
        return (items * seconds / workers) / self.span


# ---------------------------------------------------------------- stack


@contextlib.contextmanager
def bench_stack(stack_dir, **compute_options):
    """Start a local stack in ``stack_dir`` for the ``with`` block; stop it after, whatever happens.

    Yields:
        (StackInfo, seconds the start took).
    Raises:
        cflow.errors.StackError: a service is missing or did not start.
    """
    stack = LocalStack(stack_dir)
    started = time.monotonic()
    try:
        info = stack.up(ComputeOptions(**compute_options))
        yield info, time.monotonic() - started
    finally:
        stack.down()


@contextlib.contextmanager
def compute_emulator(state_dir, **compute_options):
    """Run the Compute emulator alone (state in ``state_dir``) for the ``with`` block, as the local stack starts it.

    Yields:
        (Service, Popen): ``service.endpoint`` is ``http://127.0.0.1:PORT/compute/v1/``;
        the block may end the process itself (SIGTERM to ``service.pid``).
    """
    service, process = launch_compute_emulator(state_dir, Path(state_dir) / "compute.log", options=ComputeOptions(**compute_options))
    try:
        yield service, process
    finally:
        if process.poll() is None:
            stop_and_reap(service, process)


def compute_client(endpoint):
    """A googleapiclient compute v1 client aimed at ``endpoint``, built as CFlow builds it."""
    from google.auth.credentials import AnonymousCredentials

    from cflow.gcp.clients import build_compute

    return build_compute(AnonymousCredentials(), endpoint)


def wait_zone_operation(compute, project, zone, operation, timeout_s=120):
    """Wait (zoneOperations.wait, repeated) until ``operation`` is DONE; return it."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = compute.zoneOperations().wait(project=project, zone=zone, operation=operation["name"]).execute()
        if result["status"] == "DONE":
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"operation {operation['name']} not DONE after {timeout_s} s")


def run_on_bench_stack(name, json_path, measure):
    """Run ``measure(info, temporary) -> figures`` on a fresh local stack in a temporary folder.

    The figures are appended to ``json_path`` (if given) as ``{"bench": name, ...}``;
    the stack is stopped and the folder removed whatever happens. Returns 0.
    """
    temporary = Path(tempfile.mkdtemp(prefix=f"cflow-bench-{name}-"))
    try:
        with bench_stack(temporary / "stack") as (info, stack_seconds):
            print(f"local stack up in {stack_seconds:.2f} s", flush=True)
            use_stack_environment(info)
            figures = measure(info, temporary)
        write_json_result(json_path, {"bench": name, **figures})
        return 0
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def use_stack_environment(info):
    """Point this process's Google clients at the stack (they read the variables themselves)."""
    os.environ.update(info.env())


def vm_disk_dirs(stack_dir):
    """The disk folders of every VM the stack's Compute emulator booted (``compute/vms/NAME-ID``)."""
    root = Path(stack_dir) / "compute" / "vms"
    return sorted(root.iterdir()) if root.is_dir() else []


# ---------------------------------------------------------------- project


@dataclass
class SchedulerRun:
    """What one ``python3 scheduler.py`` run left: exit status, wall seconds, output, run id."""

    exit_status: int
    started_at: float  # epoch seconds, comparable with task stamps
    wall_seconds: float
    stdout: str
    stderr: str

    @property
    def run_id(self):
        for line in self.stdout.splitlines():
            if line.startswith("run id: "):
                return line[len("run id: "):].strip()
        return None

    def check(self):
        """Raises RuntimeError (with the scheduler's stderr tail) unless the run ended with status 0."""
        if self.exit_status != 0:
            tail = "\n".join(self.stderr.splitlines()[-20:])
            raise RuntimeError(f"scheduler.py exited with status {self.exit_status}:\n{tail}")
        return self


class BenchProject:
    """A throwaway CFlow project folder, as a user has one.

    Args:
        root: the folder (created).
        task_script: text of task/task.sh.
        tree: the CFlow checkout the worker scripts come from and whose scheduler.py ``run_whole`` runs.
        settings: const.py values (UPPERCASE names), written as Python literals.
    """

    def __init__(self, root, task_script, tree=REPO, **settings):
        self.root = Path(root)
        self.tree = Path(tree)
        (self.root / "task").mkdir(parents=True, exist_ok=True)
        for name in WORKER_SCRIPTS:
            shutil.copy2(self.tree / name, self.root / name)
        task = self.root / "task" / "task.sh"
        task.write_text(task_script)
        task.chmod(0o755)
        self.settings = {"TASK_MODULE_CMD": "bash task/task.sh", "TASKS": "tasks.txt", "COMBINE": "concat"}
        self.settings.update(settings)

    def write(self, task_lines):
        """Write const.py and tasks.txt (one item per line)."""
        text = "".join(f"{name} = {value!r}\n" for name, value in self.settings.items())
        (self.root / "const.py").write_text(text)
        with open(self.root / "tasks.txt", "w") as stream:  # line by line: a million lines never sit in memory at once
            for line in task_lines:
                stream.write(line + "\n")

    def run_whole(self, *extra, timeout=1800):
        """Run ``python3 scheduler.py`` from the project folder as a new user does: no stack running, so it starts
        one in ``.cflow/local`` and stops it at the end.

        Returns a ``WholeRun`` (every line with its arrival time).
        """
        tree = self.tree
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), environment.get("PYTHONPATH")]))
        command = [sys.executable, str(tree / "scheduler.py"), *extra]
        return run_whole_command(command, self.root, environment, timeout)

    def run(self, stack_dir, *extra, timeout=1800):
        """Run scheduler.py against the stack in ``stack_dir``; returns a SchedulerRun."""
        command = [sys.executable, str(REPO / "scheduler.py"), "--config", str(self.root / "const.py"),
                   "--stack-dir", str(stack_dir), *extra]
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
        started_at, started = time.time(), time.monotonic()
        result = subprocess.run(command, cwd=self.root, capture_output=True, text=True, timeout=timeout, env=environment)
        return SchedulerRun(result.returncode, started_at, time.monotonic() - started, result.stdout, result.stderr)


@dataclass
class TimedLine:
    """One line the command printed (stdout or stderr), with when it arrived (epoch seconds)."""

    at: float
    text: str


@dataclass
class WholeRun:
    """What one whole ``python3 scheduler.py`` left: exit status, its time span, every line it printed with its arrival time."""

    exit_status: int
    started_at: float  # epoch seconds, comparable with task stamps
    ended_at: float
    lines: list

    @property
    def wall_seconds(self):
        return self.ended_at - self.started_at

    @property
    def output(self):
        return "\n".join(line.text for line in self.lines)

    def first(self, pattern):
        """The arrival time of the first line matching the regex ``pattern``, or None."""
        compiled = re.compile(pattern)
        return next((line.at for line in self.lines if compiled.search(line.text)), None)

    def last(self, pattern):
        compiled = re.compile(pattern)
        return next((line.at for line in reversed(self.lines) if compiled.search(line.text)), None)

    def check(self):
        """Raises RuntimeError (with the output's tail) unless the run ended with status 0."""
        if self.exit_status != 0:
            tail = "\n".join(line.text for line in self.lines[-20:])
            raise RuntimeError(f"scheduler.py exited with status {self.exit_status}:\n{tail}")
        return self


def run_whole_command(command, cwd, environment, timeout=1800):
    """Run ``command`` as a user does, stamping each line of its merged stdout and stderr as it arrives.

    Returns a ``WholeRun``. The clock is the epoch (``time.time``) measured
    through ``time.monotonic`` from one start reading, so the stamps compare
    with the tasks' own stamps and do not jump with the wall clock.
    """
    wall0, mono0 = time.time(), time.monotonic()

    def now():
        return wall0 + (time.monotonic() - mono0)

    lines = []
    started_at = now()
    process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1)
    assert process.stdout is not None  # a pipe
    try:
        deadline = time.monotonic() + timeout
        for text in process.stdout:
            lines.append(TimedLine(now(), text.rstrip("\n")))
            if time.monotonic() > deadline:
                raise TimeoutError(f"{command[1]} ran over {timeout} s")
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=60)
        raise
    finally:
        process.stdout.close()
    return WholeRun(process.returncode, started_at, now(), lines)


def write_json_result(path, document):
    """Append one benchmark result as a JSON line (for RESULTS.md bookkeeping)."""
    if path:
        with open(path, "a") as stream:
            stream.write(json.dumps({"machine": machine_summary(), **document}, sort_keys=True) + "\n")
