"""The worker VM's side of a run: the worker loop (startup-signal.py) and the shutdown hook (shutdown-signal.py).

Where each behaviour lives:

- ``entry``: the two entry points, ``main`` and ``shutdown_main``; finding
  the run from the VM's metadata and building the clients.
- ``context``: ``WorkerSettings`` (the run's run.json), the seams a worker
  calls, and ``WorkerContext`` (settings, clients, work dir, VM name, clock).
- ``loop``: ``Worker``: pull, run, record in the background, go idle.
- ``task``: the task's process: argv and environment, exit watch, timeout,
  killing its group, and killing an orphan left by a dead worker.
- ``staging``: STAGE_INPUTS: the item's gs:// objects downloaded before the
  task, which gets local paths; a failed download fails the attempt.
- ``lease``: ``LeaseKeeper``: lease extensions and log uploads while a task runs.
- ``record``: recording an ended task's result: outputs, log, markers (with
  the attempt's span for the run's report), event, ack.
- ``handback``: handing an item back (nack, or on a preemption a republish
  with its preemption count raised, to the standard lane once it is high
  enough: ``cflow.lanes``; event, partial log, the attempt's span as a
  timeline record): the hook, a stopping or failing worker, a restarted worker.
- ``control``: ``ControlWatch``: the scheduler's word through the VM's own
  metadata (stop a copy whose item is done elsewhere, ``cflow.backups``;
  take no new item at the cost cap), heard by a long poll in a thread.
- ``workdir``: ``WorkDir``: the files shared with the hook, and the lock.

The event kinds, outcomes and file names they share with the scheduler and
the shutdown script are in ``cflow.protocol``.
"""

from cflow.worker.context import WorkerContext, WorkerSettings
from cflow.worker.entry import main, shutdown_main
from cflow.worker.handback import hand_back, hand_back_inflight
from cflow.worker.loop import Worker
from cflow.worker.workdir import WorkDir

__all__ = ["WorkDir", "Worker", "WorkerContext", "WorkerSettings", "hand_back", "hand_back_inflight", "main", "shutdown_main"]
