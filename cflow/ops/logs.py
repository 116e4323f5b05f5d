"""``cflow logs RUN_ID [ITEM]``: an item's log (or following it), or every failed item with the end of its log."""

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

from cflow.errors import EXIT_INTERRUPTED, EXIT_OK, CflowError
from cflow.ops.session import open_session
from cflow.ops.view import OperatorError, RunView, check_item_id
from cflow.tasks import item_label

FOLLOW_INTERVAL_SECONDS = 2.0
FAILED_LOG_TAIL_LINES = 5


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    logs = subparsers.add_parser(
        "logs", parents=[common],
        help="print an item's log, or every failed item with the end of its log",
        description="With ITEM: print that item's log (its latest attempt unless --attempt). "
        "Without ITEM: list the run's failed items with their reason, log URL and last lines.",
    )
    logs.add_argument("run_id", metavar="RUN_ID", help="the run's id")
    logs.add_argument("item", metavar="ITEM", nargs="?", help="the item's id, e.g. 000042")
    logs.add_argument("--attempt", type=int, metavar="N", help="print attempt N instead of the latest")
    logs.add_argument("--follow", "-f", action="store_true",
                      help=f"re-read the log every {FOLLOW_INTERVAL_SECONDS:g} s, printing what is new, "
                      "until the item is done or failed (Ctrl-C stops)")
    logs.set_defaults(func=logs_command)


def logs_command(args: argparse.Namespace, out: IO[str] | None = None, err: IO[str] | None = None, sleep: Callable[[float], None] = time.sleep) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    if args.item is None and (args.attempt is not None or args.follow):
        raise CflowError(f"--attempt and --follow need an ITEM: `cflow logs {args.run_id} ITEM ...`")
    if args.attempt is not None and args.attempt < 1:
        raise CflowError(f"--attempt {args.attempt}: attempts are numbered from 1")
    with open_session(args) as session:
        return show_logs(session.run(args.run_id), args, out, err, sleep)


def show_logs(view: RunView, args: argparse.Namespace, out: IO[str], err: IO[str], sleep: Callable[[float], None]) -> int:
    """What ``cflow logs`` prints for the checked arguments. Returns the exit status."""
    manifest = view.manifest()
    if args.item is None:
        print("\n".join(failed_items_lines(view, manifest)), file=out, flush=True)
        return EXIT_OK
    item_id = check_item_id(args.item, view.run_id, int(manifest.get("item_count", 0)))
    if args.follow:
        return LogFollower(view, item_id, out, err, sleep=sleep, attempt=args.attempt).run()
    attempts = view.log_attempts(item_id)
    attempt: int | None = args.attempt if args.attempt is not None else (attempts[-1] if attempts else None)
    if attempt is None:
        raise OperatorError(
            f"item {item_id} of run {view.run_id} has no log yet (no attempt has ended); "
            f"`cflow logs {view.run_id} {item_id} --follow` waits for it"
        )
    text = view.read_log(item_id, attempt)
    if text is None:
        have = ", ".join(map(str, attempts)) or "none"
        raise OperatorError(f"item {item_id} of run {view.run_id} has no log for attempt {attempt}; attempts with a log: {have}")
    logged = ", ".join(map(str, attempts))
    label = item_label(item_id, _fields_of(view, item_id))
    where = view.log_file(item_id, attempt) or view.log_url(item_id, attempt)
    print(f"item {label}, attempt {attempt} (attempts logged: {logged}): {where}", file=err, flush=True)
    out.write(text)
    if text and not text.endswith("\n") and hasattr(out, "isatty") and out.isatty():
        out.write("\n")  # so the shell prompt does not land on the log's last line
    out.flush()
    return EXIT_OK


def _fields_of(view: RunView, item_id: str) -> tuple[str, ...]:
    return next((item.args for item in view.work_items() if item.id == item_id), ())


def failed_items_lines(view: RunView, manifest: Mapping[str, Any]) -> list[str]:
    """For each failed item: its id and fields, reason, attempts, where its log is, and the last lines of that log."""
    done, failed_times = view.done_and_failed()
    failed = sorted(failed_times)
    total = int(manifest.get("item_count", 0))
    if not failed:
        return [f"run {view.run_id}: no failed items ({len(done)} done of {total})"]
    fields = {item.id: item.args for item in view.work_items()}
    lines = [f"run {view.run_id}: {len(failed)} failed item(s) of {total}"]
    for item_id in failed:
        item = view.failed_item(item_id, fields.get(item_id, ()))
        attempts_text = f" after {item.attempts} attempt(s)" if item.attempts else ""
        lines.append("")
        lines.append(f"item {item.label}: {item.reason}{attempts_text}")
        text = view.read_log(item_id, item.log_attempt) if item.log_attempt is not None else None
        if text is None or item.log is None:
            lines.append("  log: none was uploaded")
            continue
        lines.append(f"  log: {item.log}")
        tail = text.rstrip("\n").splitlines()[-FAILED_LOG_TAIL_LINES:]
        lines.extend(f"  | {line}" for line in tail)
    return lines


class LogFollower:
    """Prints an item's log as it grows, until the item is done or failed (or the run is cancelled).

    Each pass checks for the end first and then reads the log, so the pass
    that sees the marker still prints the final log (workers upload the log
    before writing the marker). Without a pinned attempt it follows the
    latest one, announcing each new attempt.

    Args:
        view: the run's ``RunView``.
        item_id: a checked item id.
        out: where the log text goes; err: where notes go.
        sleep: ``sleep(seconds)``, called between passes.
        interval: seconds between passes.
        attempt: follow only this attempt; None follows the latest.
    """

    def __init__(
        self,
        view: RunView,
        item_id: str,
        out: IO[str],
        err: IO[str],
        sleep: Callable[[float], None] = time.sleep,
        interval: float = FOLLOW_INTERVAL_SECONDS,
        attempt: int | None = None,
    ) -> None:
        self.view = view
        self.item_id = item_id
        self.out = out
        self.err = err
        self.sleep = sleep
        self.interval = interval
        self.pinned_attempt = attempt
        self.attempt: int | None = None
        self.shown = ""

    def run(self) -> int:
        """Follow until the end. Returns EXIT_OK, or EXIT_INTERRUPTED on Ctrl-C."""
        try:
            while True:
                ended = self.view.is_finished(self.item_id)
                cancelled = not ended and self.view.cancelled() is not None
                self.show_new()
                if ended or cancelled:
                    how = "finished" if ended else "its run was cancelled"
                    print(f"item {self.item_id}: {how}; stopped following", file=self.err, flush=True)
                    return EXIT_OK
                self.sleep(self.interval)
        except KeyboardInterrupt:
            self.out.flush()
            return EXIT_INTERRUPTED

    def show_new(self) -> None:
        """Print what the log gained since the last pass."""
        attempt = self.pinned_attempt
        if attempt is None:
            attempts = self.view.log_attempts(self.item_id)
            attempt = attempts[-1] if attempts else None
        if attempt is None:
            return
        if attempt != self.attempt:
            self.attempt, self.shown = attempt, ""
            print(f"--- item {self.item_id}, attempt {attempt} ---", file=self.err, flush=True)
        text = self.view.read_log(self.item_id, attempt)
        if text is None:
            return
        if not text.startswith(self.shown):
            # A preempted attempt's partial log is replaced when the same attempt runs again.
            print(f"--- item {self.item_id}, attempt {attempt}: log replaced, from the start ---", file=self.err, flush=True)
            self.shown = ""
        new = text[len(self.shown):]
        if new:
            self.out.write(new)
            self.out.flush()
        self.shown = text
