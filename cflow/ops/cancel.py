"""``cflow cancel RUN_ID``: stop a run (``cflow.lifecycle.cancel_run``), asking first on a terminal."""

import argparse
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from cflow.errors import EXIT_OK, CflowError
from cflow.lifecycle import CANCEL_DEADLINE_SECONDS, cancel_run
from cflow.ops.session import Session, open_session
from cflow.ops.view import OperatorError, list_vms, storage_errors


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    cancel = subparsers.add_parser(
        "cancel", parents=[common],
        help="stop a run: delete its VMs, topics and subscriptions (outputs and logs are kept)",
        description="Cancel a run: delete its VMs (and wait until they are gone), its Pub/Sub topics and "
        "subscriptions, and mark it cancelled. Outputs and logs stay in Cloud Storage. Cancelling twice is fine.",
    )
    cancel.add_argument("run_id", metavar="RUN_ID", help="the run's id")
    cancel.add_argument("--yes", "-y", action="store_true", help="do not ask; needed when not on a terminal")
    cancel.set_defaults(func=cancel_command)


def confirm(question: str, stdin: IO[str], out: IO[str]) -> bool:
    """Ask ``question`` on a terminal. Returns True for y/yes.

    Raises:
        CflowError (usage): ``stdin`` is not a terminal, so nobody can answer.
    """
    if not (hasattr(stdin, "isatty") and stdin.isatty()):
        raise CflowError("not asking without a terminal; pass --yes to confirm")
    out.write(question + " [y/N] ")
    out.flush()
    answer = stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def cancel_command(
    args: argparse.Namespace,
    out: IO[str] | None = None,
    stdin: IO[str] | None = None,
    now: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    deadline_seconds: float = CANCEL_DEADLINE_SECONDS,
) -> int:
    out = out or sys.stdout
    stdin = stdin or sys.stdin
    with open_session(args, needs_fleet=True) as session:
        return cancel_with(session, args, out, stdin, now, sleep, deadline_seconds)


def cancel_with(session: Session, args: argparse.Namespace, out: IO[str], stdin: IO[str], now: Callable[[], float],
                sleep: Callable[[float], None], deadline_seconds: float) -> int:
    """Cancel ``args.run_id`` with the session's clients, asking first unless ``args.yes``. Returns the exit status."""
    view = session.run(args.run_id)
    manifest = view.manifest()
    compute = session.compute()
    if not args.yes:
        vm_count = len(list_vms(compute, view.run_id))
        question = (f"cancel run {view.run_id}: delete {vm_count} VMs, its topics and subscriptions "
                    "(outputs and logs are kept)?")
        try:
            agreed = confirm(question, stdin, out)
        except CflowError:
            raise CflowError(f"cancel asks for confirmation, and there is no terminal; "
                             f"pass --yes: `cflow cancel {view.run_id} --yes`") from None
        if not agreed:
            print(f"run {view.run_id} not cancelled", file=out, flush=True)
            return 1
    from cflow.gcp.pubsub import RunTopics

    topics = RunTopics.from_dict(manifest["topics"]) if manifest.get("topics") else None
    with storage_errors(view.bucket_name):
        outcome = cancel_run(view.storage, session.pubsub(), compute, topics, now(), deadline_seconds, sleep=sleep)
    if outcome.vms_left:
        raise OperatorError(
            f"run {view.run_id}: VMs still listed after {deadline_seconds:.0f} s: {', '.join(outcome.vms_left)}; "
            f"run `cflow cancel {view.run_id} --yes` again"
        )
    print(f"cancelled run {view.run_id}: deleted {outcome.vms_found} VM(s) and its topics and subscriptions; "
          f"outputs and logs are kept in {view.storage.url()}", file=out, flush=True)
    return EXIT_OK
