"""``cflow list``: the runs kept in the bucket, newest first, with their counts and state."""

import argparse
import dataclasses
import logging
import sys
from typing import IO, Any

from cflow.errors import EXIT_OK, NotFound
from cflow.lifecycle import run_state
from cflow.ops.session import open_session
from cflow.ops.text import format_time
from cflow.ops.view import RUN_ID_RE, RunView, storage_errors

log = logging.getLogger(__name__)


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    listing = subparsers.add_parser(
        "list", parents=[common],
        help="list the runs in the bucket, newest first",
        description="List the runs kept in the bucket of const.py, newest first, with their item counts and state.",
    )
    listing.set_defaults(func=list_command)


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """One line of ``cflow list``."""

    run_id: str
    created: float | None
    items: int | None
    done: int
    failed: int
    state: str


def list_runs(storage_client: Any, bucket_name: str) -> list[RunSummary]:
    """Every run in the bucket, newest first (runs without run.json last).

    Returns:
        A list of ``RunSummary``; [] when the bucket does not exist.
    """
    from cflow.gcp.storage import Bucket, RunStorage

    with storage_errors(bucket_name):
        try:
            run_ids = Bucket(storage_client, bucket_name).list_run_ids()
        except NotFound:
            return []
    summaries = []
    for run_id in run_ids:
        if not RUN_ID_RE.fullmatch(run_id):
            log.debug("skipping %r: not a run id", run_id)
            continue
        view = RunView(RunStorage(storage_client, bucket_name, run_id))
        with storage_errors(bucket_name):
            manifest = view.storage.read_manifest()
        done, failed = view.done_and_failed()
        if manifest is None:
            summaries.append(RunSummary(run_id, None, None, len(done), len(failed), "no run.json"))
            continue
        items = int(manifest.get("item_count", 0))
        # A finished run is finished whether or not it was cancelled too: no need to read cancelled.json.
        cancelled = len(done) + len(failed) < items and view.cancelled() is not None
        state = run_state(items, len(done), len(failed), cancelled)
        summaries.append(RunSummary(run_id, manifest.get("created"), items, len(done), len(failed), state))
    summaries.sort(key=lambda summary: (summary.created is not None, summary.created or 0, summary.run_id), reverse=True)
    return summaries


def list_lines(summaries: list[RunSummary], bucket_name: str) -> list[str]:
    """The aligned table ``cflow list`` prints."""
    if not summaries:
        return [f"no runs in gs://{bucket_name}"]
    header = ("RUN ID", "CREATED", "ITEMS", "DONE", "FAILED", "STATE")
    rows = [
        (s.run_id, format_time(s.created) if s.created is not None else "-", "-" if s.items is None else str(s.items),
         str(s.done), str(s.failed), s.state)
        for s in summaries
    ]
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]
    numeric = {2, 3, 4}

    def line(row: tuple[str, ...]) -> str:
        cells = [cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        return "  ".join(cells).rstrip()

    return [line(header), *(line(row) for row in rows)]


def list_command(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    with open_session(args) as session:
        summaries = list_runs(session.clients.storage, session.bucket)
    print("\n".join(list_lines(summaries, session.bucket)), file=out, flush=True)
    return EXIT_OK
