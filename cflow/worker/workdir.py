"""The worker's work directory: the files it shares with the shutdown hook, and the lock that guards them.

The worker, its Python shutdown hook (shutdown-signal.py) and the shell
shutdown script (``cflow.fleet.SHUTDOWN_SCRIPT``) share these files, named in
``cflow.protocol``:

- ``stopping``: set by the hook first thing; from then on the worker takes no
  new item and does not count a task that dies as a failed attempt.
- ``inflight.json``: the item, attempt and ack id whose task is running, and
  the task's process group.
- ``settling.json``: the item whose task has ended and whose result the worker
  is recording (outputs, log, marker, event, ack). The worker records it in a
  background thread while it pulls and starts the next item, so a busy worker
  loses only the pull and the task's start between two tasks. One result is
  recorded at a time.
- ``hook.json``: what the shutdown hook needs to hand an item back (the
  run's settings, project, this VM's name and lane), written once when the
  worker starts, so the hook touches no network before its hand-back.
- ``handback.lock``: an exclusive lock held while either side reads and
  changes those two files and acts on them (nack, lease extension, moving an
  item from running to settling). So each item is either settled by the
  worker or handed back (nacked) by exactly one of worker and hook, never
  both: the hook never nacks an item whose result the worker is recording,
  and no lease extension lands after a hand back.
"""

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import NotRequired, TypedDict

from cflow import protocol, tasks


class TaskRecord(TypedDict):
    """What inflight.json and settling.json hold: one pulled message and its task."""

    item: str
    attempt: int
    ack_id: str
    log: str  # the attempt's local task.log
    started: NotRequired[float]  # epoch seconds the attempt began (for its span in the run's report)
    # Once the task started: its process group, identified across pid reuse (see cflow.procinfo).
    task_pgid: NotRequired[int]
    task_start: NotRequired[int | None]
    boot_id: NotRequired[str]
    settling: NotRequired[bool]  # True in settling.json
    # What a hand-back on preemption needs to publish the item again with its count raised (cflow.lanes):
    data: NotRequired[str]  # the work message's data (the item as JSON)
    preemptions: NotRequired[int]  # the item's preemptions before this run
    backup: NotRequired[bool]  # a backup copy (cflow.backups): dropped, never handed back


class HookSettings(TypedDict):
    """What hook.json holds: the shutdown hook's context without asking the metadata server or Cloud Storage."""

    manifest: dict[str, object]  # the run's run.json, as the worker read it
    project: str
    vm_name: str
    target: str  # "gcp" or "local"
    lane: NotRequired[str]  # the queue this VM pulls (``protocol.Lane``); absent: the Spot lane


class WorkDir:
    """The worker's local files: package, per-attempt outputs and logs, and the files shared with the hook.

    Args:
        root: the work directory ($HOME/cflow on a VM); created when first needed.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.inflight = self.root / protocol.INFLIGHT_FILE
        self.settling = self.root / protocol.SETTLING_FILE
        self.stopping = self.root / protocol.STOPPING_FLAG
        self.lock_file = self.root / protocol.HANDBACK_LOCK
        self.package = self.root / protocol.PACKAGE_DIR
        self.hook_settings = self.root / protocol.HOOK_SETTINGS_FILE

    def attempt_dir(self, item_id: str, attempt: int) -> Path:
        return self.root / protocol.ATTEMPTS_DIR / f"{item_id}-{attempt}"

    def fresh_attempt_dir(self, item_id: str, attempt: int) -> Path:
        """An empty attempt folder (a killed predecessor's leftovers removed). Returns its path.

        Raises:
            ValueError: ``item_id`` is not one CFlow makes (it names a local folder).
        """
        tasks.validate_item_id(item_id)  # the id names a local folder: nothing may escape the work dir
        path = self.attempt_dir(item_id, attempt)
        shutil.rmtree(path, ignore_errors=True)
        (path / "output").mkdir(parents=True)
        return path

    # -- the records (call with the hand-back lock held) --------------------

    def write_inflight(self, record: TaskRecord) -> None:
        _write_record(self.inflight, record)

    def read_inflight(self) -> TaskRecord | None:
        return _read_record(self.inflight)

    def clear_inflight(self) -> None:
        self.inflight.unlink(missing_ok=True)

    def read_settling(self) -> TaskRecord | None:
        return _read_record(self.settling)

    def clear_settling(self) -> None:
        self.settling.unlink(missing_ok=True)

    def move_to_settling(self, record: TaskRecord) -> None:
        """The task has ended: its item is now being recorded, not run."""
        _write_record(self.settling, {**record, "settling": True})
        self.clear_inflight()

    def running_record(self, ack_id: str) -> TaskRecord | None:
        """The in-flight record of the message ``ack_id``, or None (its task ended, or it was handed back)."""
        return _if_message(self.read_inflight(), ack_id)

    def settling_record(self, ack_id: str) -> TaskRecord | None:
        """The settling record of the message ``ack_id``, or None."""
        return _if_message(self.read_settling(), ack_id)

    def record_of(self, ack_id: str) -> TaskRecord | None:
        """The running or settling record of the message ``ack_id``, or None (settled or handed back)."""
        return self.running_record(ack_id) or self.settling_record(ack_id)

    # -- what the shutdown hook needs --------------------------------------

    def write_hook_settings(self, settings: HookSettings) -> None:
        """Keep what the shutdown hook needs on the VM's disk (once, at worker start)."""
        self.root.mkdir(parents=True, exist_ok=True)
        partial = self.hook_settings.with_suffix(".tmp")
        partial.write_text(json.dumps(settings))
        os.replace(partial, self.hook_settings)

    def read_hook_settings(self) -> HookSettings | None:
        """What the worker kept for the hook, or None (no worker started on this boot yet)."""
        try:
            settings: HookSettings = json.loads(self.hook_settings.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return settings

    # -- the stop flag ------------------------------------------------------

    def is_stopping(self) -> bool:
        return self.stopping.exists()

    def request_stop(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.stopping.touch()

    def clear_stop(self) -> None:
        self.stopping.unlink(missing_ok=True)

    def stop_flag_is_stale(self, boot_started_at: float | None) -> bool:
        """True if the stop flag was left by an earlier boot of this VM (a stopped VM started again).

        Args:
            boot_started_at: epoch seconds when this boot's startup script began
                (None if unknown: the flag is then taken as stale).
        Returns:
            False also when there is no flag.
        """
        try:
            flagged_at = self.stopping.stat().st_mtime
        except FileNotFoundError:
            return False
        return boot_started_at is None or flagged_at < boot_started_at

    @contextlib.contextmanager
    def handback_lock(self) -> Iterator[None]:
        """Hold the exclusive hand-back lock (between processes, and between threads of one).

        Each use opens the file anew: flock conflicts between open file
        descriptions, so the keeper thread and the main thread exclude each
        other too. The kernel drops the lock when its holder dies.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.lock_file, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _write_record(path: Path, record: TaskRecord) -> None:
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(record))
    os.replace(partial, path)  # the hook never reads half a record


def _read_record(path: Path) -> TaskRecord | None:
    try:
        record: TaskRecord = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return record


def _if_message(record: TaskRecord | None, ack_id: str) -> TaskRecord | None:
    """``record`` if it is the one of message ``ack_id``, else None."""
    return record if record is not None and record.get("ack_id") == ack_id else None
