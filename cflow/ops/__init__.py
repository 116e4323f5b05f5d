"""Operator commands on a run, from what it keeps in Cloud Storage: one module per command.

    session.py   const.py and the clients of its target; the arguments every command shares
    view.py      the run view (RunView): one run's record read back; run and item ids checked
    status.py    cflow status RUN_ID
    logs.py      cflow logs RUN_ID [ITEM] [--attempt N] [--follow]
    cancel.py    cflow cancel RUN_ID [--yes]
    combine.py   cflow combine RUN_ID
    listing.py   cflow list
    report.py    cflow report RUN_ID [--open]: the run's report.html (gathered here, drawn by cflow.report)
    text.py      how times and durations are shown

They work from another terminal while a run goes on and after it ended. In
local mode nothing here starts the stack: with no stack running, the
commands that read a run (status, logs, list, combine, report) get the
stack's Cloud Storage alone for as long as they run
(``cflow.local.stored_runs``); cancel needs the running stack. What a cancel
or a combine does to a run lives in ``cflow.lifecycle``, shared with
``cflow run``.
"""

from typing import Any

from cflow.ops import cancel, combine, listing, logs, report, status
from cflow.ops.session import common_arguments


def add_parser(subparsers: Any) -> None:
    """Register ``status``, ``logs``, ``cancel``, ``combine``, ``list`` and ``report`` on ``subparsers``."""
    common = common_arguments()
    for command in (status, logs, cancel, combine, listing, report):
        command.add_parser(subparsers, common)
