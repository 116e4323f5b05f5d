"""Operator commands on a run, from what it keeps in Cloud Storage: one module per command.

    session.py   const.py and the clients of its target; the arguments every command shares
    view.py      the run view (RunView): one run's record read back; run and item ids checked
    status.py    cflow status RUN_ID
    logs.py      cflow logs RUN_ID [ITEM] [--attempt N] [--follow]
    cancel.py    cflow cancel RUN_ID [--yes]
    combine.py   cflow combine RUN_ID
    listing.py   cflow list
    text.py      how times and durations are shown

They work from another terminal while a run goes on and after it ended, and
in local mode nothing here starts a stack. What a cancel or a combine does to
a run lives in ``cflow.lifecycle``, shared with ``cflow run``.
"""

from typing import Any

from cflow.ops import cancel, combine, listing, logs, status
from cflow.ops.session import common_arguments


def add_parser(subparsers: Any) -> None:
    """Register ``status``, ``logs``, ``cancel``, ``combine`` and ``list`` on ``subparsers``."""
    common = common_arguments()
    for command in (status, logs, cancel, combine, listing):
        command.add_parser(subparsers, common)
