"""``cflow report RUN_ID [--open]``: make a run's report.html from what it keeps in Cloud Storage.

``gather`` reads what the report shows through the run view, in a few calls
whatever the run's size: run.json, items.jsonl, one listing each of the
done/, failed/, attempts/ and timeline/ folders (the attempt spans ride on
them as metadata), vms.json, and the failed markers the report lists.
``write_report`` renders it (``cflow.report``, pure) to
``RESULT_DIR/RUN_ID/report.html``; ``cflow run`` calls it at the end of every
run, and this command makes it again for any run, local or GCP, finished or
not.
"""

import argparse
import logging
import sys
import time
import webbrowser
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from cflow.errors import EXIT_OK
from cflow.gcp import layout
from cflow.history import AttemptSpan
from cflow.lifecycle import run_state
from cflow.ops.session import open_session
from cflow.ops.view import RunView
from cflow.report import MAX_TABLE_ROWS, FailedRow, ReportInput, render

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    report = subparsers.add_parser(
        "report", parents=[common],
        help="make a run's report.html (timeline, throughput, failures, cost) again",
        description="Make the run's one-file HTML report from what the run keeps in Cloud Storage, into "
        "RESULT_DIR/RUN_ID/report.html (RESULT_DIR from const.py): a timeline per VM with one bar per attempt, "
        "throughput, workers alive, failed and slowest items, VM time and estimated cost.",
    )
    report.add_argument("run_id", metavar="RUN_ID", help="the run's id")
    report.add_argument("--output", "-o", metavar="PATH", help="write the report here instead")
    report.add_argument("--open", action="store_true", help="open it in the default web browser")
    report.set_defaults(func=report_command)


def report_path(result_dir: str | Path, run_id: str) -> Path:
    """``RESULT_DIR/RUN_ID/report.html``, beside the run's combined result."""
    return Path(result_dir) / run_id / REPORT_NAME


def gather(view: RunView, now: float) -> ReportInput:
    """Everything the report shows, read through ``view``.

    Raises:
        RunNotFound, CloudError.
    """
    manifest = view.manifest()
    settings = manifest.get("settings") or {}
    items = view.work_items()
    labels = {item.id: item.label for item in items}
    fields = {item.id: item.args for item in items}
    spans: list[AttemptSpan] = []
    done_times: dict[str, float] = {}
    for folder in (layout.markers(layout.DONE), layout.ATTEMPTS, layout.TIMELINE):
        for record in view.records(folder):
            if folder == layout.markers(layout.DONE):
                done_times[record.name] = record.updated.timestamp()
            span = AttemptSpan.from_metadata(layout.item_of_record(record.name), record.metadata)
            if span is not None:
                spans.append(span)
    failed_ids = sorted(item for item in view.marker_times(layout.FAILED) if item not in done_times)
    failed = []
    for item_id in failed_ids[:MAX_TABLE_ROWS]:
        item = view.failed_item(item_id, fields.get(item_id, ()))
        failed.append(FailedRow(item.item_id, item.label, item.attempts, item.reason, item.log))
    total = int(manifest.get("item_count", len(items)))
    cancelled = len(done_times) + len(failed_ids) < total and view.cancelled() is not None
    created = manifest.get("created")
    prices = settings.get("prices")
    return ReportInput(
        run_id=view.run_id,
        state=run_state(total, len(done_times), len(failed_ids), cancelled),
        source=view.storage.url(),
        created=float(created) if isinstance(created, int | float) else None,
        generated=now,
        total_items=total,
        done_times=done_times,
        failed=failed,
        failed_count=len(failed_ids),
        labels=labels,
        spans=spans,
        vms=view.vm_records(),
        prices=prices if isinstance(prices, dict) else {},
        machine_type=str(settings.get("vm_type") or ""),
        spot=bool(settings.get("vm_spot")),
    )


def write_report(view: RunView, path: Path, now: float) -> Path:
    """Gather the run's report and write it to ``path`` (its folder made if missing). Returns ``path``.

    Raises:
        RunNotFound, CloudError; OSError if the file cannot be written.
    """
    page = render(gather(view, now))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(page, encoding="utf-8")
    partial.replace(path)  # a browser showing the old report never reads half a new one
    return path


def report_command(args: argparse.Namespace, out: IO[str] | None = None, now: Callable[[], float] = time.time,
                   open_browser: Callable[[str], bool] = webbrowser.open) -> int:
    out = out or sys.stdout
    with open_session(args) as session:
        view = session.run(args.run_id)
        path = Path(args.output) if args.output else report_path(session.config.result_dir, view.run_id)
        started = time.monotonic()
        write_report(view, path.absolute(), now())
    log.debug("report of %s made in %.2f s", view.run_id, time.monotonic() - started)
    print(f"report: {path}", file=out, flush=True)
    if args.open and not open_browser(path.absolute().as_uri()):
        print(f"could not start a web browser here; open {path} in one", file=out, flush=True)
    return EXIT_OK
