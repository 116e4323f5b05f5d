"""What a worker and the scheduler say to each other, and the files a worker VM keeps.

Everything here crosses a process boundary, so each name is a string on the
wire or on disk and must not change:

- ``EventKind``: the ``type`` of each event a worker publishes on the run's
  events topic; ``Event`` lists the fields an event may carry.
  ``ITEM_END_EVENTS`` are the kinds that end an item's run on its VM.
- ``Outcome``: what a worker made of one pulled work message
  (``cflow.worker.Worker.process``); ``LoopEnd``: why its loop returned.
- ``Lane``: which queue a worker pulls (the run's Spot lane, or the standard
  lane of items moved off Spot), and the work-message attributes beyond item
  and attempt (``ATTR_PREEMPTIONS``, ``ATTR_BACKUP``; read and written by
  ``cflow.lanes`` and ``cflow.backups``).
- The VM metadata attributes the scheduler sets on a worker to tell it
  something (``LANE_ATTRIBUTE`` at creation; ``STOP_ITEM_ATTRIBUTE`` and
  ``DRAIN_ATTRIBUTE`` while it runs, watched by ``cflow.worker.control``).
- The work directory's file names (``$HOME/cflow`` on a VM), shared by the
  worker, its Python shutdown hook, and the shell shutdown script that
  ``cflow.fleet`` generates from these constants.

The work messages themselves (item and attempt) are made and read by
``cflow.tasks.encode_message``/``decode_message``.
"""

from enum import StrEnum
from typing import NotRequired, TypedDict


class EventKind(StrEnum):
    """The ``type`` of a worker's event (a ``str``: it is the JSON value as is)."""

    STARTED = "started"  # a task started on an item (item, attempt); not waited for
    DONE = "done"  # the item's result is recorded (item, attempt, seconds)
    RETRY = "retry"  # an attempt failed and its successor is queued (item, attempt, reason, log, seconds)
    FAILED = "failed"  # the last attempt failed: the item failed for good (item, attempt, reason, log)
    DUPLICATE = "duplicate"  # already done, or this attempt already recorded: acked without a result (item, attempt[, seconds])
    PREEMPTED = "preempted"  # handed back on a preemption: no attempt used (item, attempt)
    INTERRUPTED = "interrupted"  # handed back on a stop, delete or worker error: no attempt used (item, attempt)
    IDLE = "idle"  # the worker found no work (no item)
    MALFORMED = "malformed"  # a work message that is not CFlow's was acked and dropped (detail)


# The kinds after which the item named in the event no longer runs on that VM.
ITEM_END_EVENTS = (EventKind.DONE, EventKind.RETRY, EventKind.FAILED, EventKind.DUPLICATE, EventKind.PREEMPTED, EventKind.INTERRUPTED)


class Event(TypedDict):
    """One event as published (JSON, keys sorted). Which optional fields each kind carries: see ``EventKind``."""

    type: str
    vm: str  # the worker VM's name
    time: float  # epoch seconds on the worker
    item: NotRequired[str]
    attempt: NotRequired[int]
    seconds: NotRequired[float]  # the task's wall time
    reason: NotRequired[str]  # why an attempt failed ("exit status 3", "timed out")
    log: NotRequired[str]  # gs:// URL of the attempt's log
    detail: NotRequired[str]  # what was wrong with a malformed message
    preemptions: NotRequired[int]  # preempted: the item's preemptions so far, this one included
    lane: NotRequired[str]  # preempted: the lane the item was handed back to (a ``Lane``)
    backup: NotRequired[bool]  # done, duplicate: the attempt ran as a backup copy


class Outcome(StrEnum):
    """What a worker made of one pulled work message."""

    DONE = "done"
    DUPLICATE = "duplicate"  # already done, or this attempt already recorded: acked without running
    RETRY = "retry"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # handed back (shutdown, preemption): no attempt used
    STOPPING = "stopping"  # not started: the VM is going down; nacked
    MALFORMED = "malformed"  # not a CFlow work message: acked and dropped
    HANDED_BACK = "handed back"  # the result could not be recorded: nacked


class Lane(StrEnum):
    """The queue a worker pulls from, and so which items it runs.

    ``SPOT``: the run's queue; its workers are Spot VMs (standard ones when
    VM_SPOT = False, or while every zone is out of Spot capacity).
    ``STANDARD``: the items preempted SPOT_PREEMPTIONS_BEFORE_STANDARD times;
    only standard VMs pull it.
    """

    SPOT = "spot"
    STANDARD = "standard"


# Work-message attributes beside cflow.tasks' item and attempt (absent: 0 and not a backup).
ATTR_PREEMPTIONS = "cflow_preemptions"  # how many times the item was preempted so far
ATTR_BACKUP = "cflow_backup"  # "1": a backup copy of an item that still runs elsewhere

# The worker VM's metadata attributes the scheduler speaks through.
LANE_ATTRIBUTE = "cflow-lane"  # the worker's Lane, set at creation
STOP_ITEM_ATTRIBUTE = "cflow-stop-item"  # stop the copy of this item you run: it is done elsewhere
DRAIN_ATTRIBUTE = "cflow-drain"  # "true": finish the running item, take no new one


class LoopEnd(StrEnum):
    """Why a worker's loop returned."""

    IDLE = "idle"  # no work for the run's idle time: the VM powers off
    STOPPING = "stopping"  # the shutdown hook asked it to stop


# -- the work directory ($HOME/cflow on a VM) ---------------------------------

PACKAGE_DIR = "package"  # the run's package, unpacked by init.sh
ATTEMPTS_DIR = "attempts"  # one folder per attempt: the task's output/ and task.log
INFLIGHT_FILE = "inflight.json"  # the item whose task runs (JSON record)
SETTLING_FILE = "settling.json"  # the item whose result the worker is recording (JSON record)
STOPPING_FLAG = "stopping"  # set by the shutdown hook: take no new item
HANDBACK_LOCK = "handback.lock"  # flock held while either side reads or changes the two records
SHUTDOWN_ENTRY = "shutdown-signal.py"  # the Python shutdown hook, in PACKAGE_DIR
SHUTDOWN_LOG = "shutdown.log"  # what the shutdown script and hook print
HOOK_SETTINGS_FILE = "hook.json"  # what the shutdown hook needs, written at worker start: it reads no network before the nack
