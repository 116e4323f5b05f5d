"""The task process: start it with the item as argv, watch it end, kill its group, and kill an orphan.

A task runs in its own process group (so a timeout or a shutdown kills all
it started), with the item's fields as argv, never through a shell. Its
group is recorded in inflight.json, identified by boot id and start time,
so that a restarted worker or the shutdown hook can stop it later without
ever signalling a recycled pid. With STAGE_INPUTS the item's gs:// objects
are downloaded first (``cflow.worker.staging``), as part of the attempt.
"""

import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from types import TracebackType

from cflow import procinfo, tasks
from cflow.worker import staging
from cflow.worker.context import WorkerContext
from cflow.worker.workdir import TaskRecord

log = logging.getLogger(__name__)

TASK_KILL_GRACE_SECONDS = 5
# How often the worker looks for the hook's stop flag while a task runs.
STOP_POLL_SECONDS = 0.25


class TaskEnding(StrEnum):
    """How a task's process ended."""

    EXITED = "exited"  # by itself (or it could not start: status 127)
    TIMED_OUT = "timed out"  # past the run's task timeout: its group was killed
    STOPPED = "stopped"  # the VM is going down: its item was handed back, then its group killed
    DONE_ELSEWHERE = "done elsewhere"  # another copy recorded the item done (cflow.backups): its group was killed
    STAGING_FAILED = "input staging failed"  # an input could not be downloaded: the task never started


def failure_reason(ending: TaskEnding, exit_status: int) -> str:
    """Why a failed attempt failed, as its marker, its event and the summary say it."""
    if ending == TaskEnding.TIMED_OUT:
        return "timed out"
    if ending == TaskEnding.STAGING_FAILED:
        return "input staging failed (its log names the object and why)"
    return f"exit status {exit_status}"


def task_environment(context: WorkerContext, item: tasks.WorkItem, attempt: int, output_dir: Path,
                     input_dir: Path | None = None) -> dict[str, str]:
    """The task's environment: the worker's, with the CFLOW_* variables of this attempt.

    ``CFLOW_INPUT_DIR`` is set only when the attempt staged its inputs there (STAGE_INPUTS).
    """
    environment = dict(os.environ)
    # The task's python3 is the worker's own, which has the Google clients
    # (on a stock image they live in a venv, not the system Python).
    environment["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), environment.get("PATH", "")])
    environment.update(
        CFLOW_RUN_ID=context.settings.run_id,
        CFLOW_TASK_ID=item.id,
        CFLOW_ATTEMPT=str(attempt),
        CFLOW_OUTPUT_DIR=str(output_dir),
        CFLOW_BUCKET=context.settings.bucket,
        CFLOW_GPU_COUNT=str(context.settings.gpu_count),
    )
    if input_dir is not None:
        environment["CFLOW_INPUT_DIR"] = str(input_dir)
    return environment


def run_task(context: WorkerContext, item: tasks.WorkItem, attempt: int, output_dir: Path, log_file: Path, ack_id: str,
             hand_back_running: Callable[[], object], done_elsewhere: Callable[[], bool] | None = None) -> tuple[int, TaskEnding]:
    """Run the run's task command with the item's fields as argv (no shell), in the package folder.

    Args:
        output_dir: the attempt's empty output folder (``CFLOW_OUTPUT_DIR``).
        log_file: the attempt's log; the task's stdout and stderr are appended.
        ack_id: the message whose in-flight record gets the task's process group.
        hand_back_running: called once the stop flag is seen, before the task's
            group is killed: a Spot VM's grace is short, and the nack is what matters.
        done_elsewhere: True once the scheduler said another copy of the item
            won (``cflow.worker.control``); the task's group is then killed. Read
            in memory with the stop flag, so it costs the hot path nothing.
    Returns:
        ``(exit status, ending)``; the status is 127 if the command cannot start,
        ``staging.STAGING_FAILED_STATUS`` if an input could not be staged.
    """
    work_dir = context.work_dir
    with open(log_file, "ab") as log_stream:
        args, input_dir = item.args, None
        if context.settings.stage_inputs:
            input_dir = output_dir.parent / staging.INPUT_DIR_NAME
            try:
                args = staging.stage_inputs(context.storage, item.args, input_dir).args
            except staging.StagingFailed as failed:
                log_stream.write(f"{failed.log_line}\n".encode())
                return staging.STAGING_FAILED_STATUS, TaskEnding.STAGING_FAILED
            if work_dir.is_stopping():
                # The VM went down while the inputs came: hand the item back instead of starting a task that is killed at once.
                hand_back_running()
                return -signal.SIGTERM, TaskEnding.STOPPED
        command = list(context.settings.task_command) + list(args)
        try:
            process = subprocess.Popen(
                command,
                cwd=work_dir.package,
                env=task_environment(context, item, attempt, output_dir, input_dir),
                stdin=subprocess.DEVNULL,
                stdout=log_stream,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so a timeout kills all of it
            )
        except OSError as error:
            log_stream.write(f"cflow: cannot start {command[0]!r}: {error}\n".encode())
            return 127, TaskEnding.EXITED
        with work_dir.handback_lock():
            record = work_dir.running_record(ack_id)
            if record is not None:
                # So the hook, or a worker restarted after this one is killed, can stop an orphaned task.
                record.update({"task_pgid": process.pid, "task_start": procinfo.process_start(process.pid),
                               "boot_id": procinfo.boot_id()})
                work_dir.write_inflight(record)
        deadline = time.monotonic() + context.settings.task_timeout
        with ExitWatch(process) as exit_watch:
            while True:
                status = exit_watch.wait(min(STOP_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
                if status is not None:
                    return status, TaskEnding.EXITED
                if work_dir.is_stopping() and process.poll() is None:
                    # Hand back before the kill: a Spot VM's grace is short, and the nack is what matters.
                    # (A task that has just ended is recorded instead, if the grace allows.)
                    hand_back_running()
                    kill_group(process)
                    log_stream.flush()
                    return process.returncode, TaskEnding.STOPPED
                if process.poll() is not None:
                    return process.returncode, TaskEnding.EXITED
                if done_elsewhere is not None and done_elsewhere():
                    kill_group(process)
                    log_stream.write(b"\ncflow: another copy of this item was recorded done first; this copy was stopped\n")
                    return process.returncode, TaskEnding.DONE_ELSEWHERE
                if time.monotonic() >= deadline:
                    kill_group(process)
                    log_stream.write(f"\ncflow: task timed out after {context.settings.task_timeout:g} s; "
                                     "its process group was killed\n".encode())
                    return process.returncode, TaskEnding.TIMED_OUT


class ExitWatch:
    """Waits for a task to exit and wakes the moment it does.

    ``Popen.wait(timeout)`` polls with sleeps that grow to 50 ms, so a task's
    end was noticed 25 ms late on average: on a busy worker that was most of
    the gap between two tasks. A pidfd becomes readable when the process
    exits; where the kernel has none (Linux < 5.3) we fall back to polling.
    """

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.pidfd: int | None = None

    def __enter__(self) -> "ExitWatch":
        try:
            self.pidfd = os.pidfd_open(self.process.pid)
        except (AttributeError, OSError):
            self.pidfd = None
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)

    def wait(self, seconds: float) -> int | None:
        """The exit status, or None if the task still runs after ``seconds``."""
        if self.pidfd is None:
            try:
                return self.process.wait(timeout=seconds)
            except subprocess.TimeoutExpired:
                return None
        select.select([self.pidfd], [], [], seconds)
        return self.process.poll()


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the task's whole process group, then SIGKILL whatever is left after a grace. Returns once the leader is reaped."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        if sig == signal.SIGTERM:
            try:
                process.wait(timeout=TASK_KILL_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            # The leader may have exited while its children linger in the group.
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
    process.wait()


def kill_recorded_task(record: TaskRecord, sig: signal.Signals = signal.SIGTERM) -> bool:
    """Signal the task group named in an in-flight record, if it is still the one we started.

    A recycled pid is left alone: the record's boot id and start time must match
    a live leader (or the leader is gone, and then the kernel has not reused its
    pid as long as any member of its group lives).

    Returns:
        True if the group was signalled.
    """
    pgid = record.get("task_pgid")
    if not pgid:
        return False
    if record.get("boot_id") != procinfo.boot_id():
        return False
    start = procinfo.process_start(pgid)
    if start is not None and start != record.get("task_start"):
        return False
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
