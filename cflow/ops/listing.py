"""``cflow list``: the runs kept in the bucket, newest first, with their counts, state, and VMs still there.

The VMs come from one Compute list of every VM with a run's label, so a
forgotten run (its controller gone) shows its VMs until GCE deletes them
(MAX_RUN_HOURS) or ``cflow cancel RUN_ID`` does; a run whose VMs are there
but whose record is not in this bucket is listed too.
"""

import argparse
import dataclasses
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

from cflow.errors import EXIT_OK, CloudError, NotFound
from cflow.lifecycle import run_state
from cflow.ops.session import open_session
from cflow.ops.text import format_time
from cflow.ops.view import RUN_ID_RE, RunView, storage_errors

if TYPE_CHECKING:
    from cflow.gcp.compute import Vm

log = logging.getLogger(__name__)

ALIVE_STATES = ("PROVISIONING", "STAGING", "RUNNING", "STOPPING", "SUSPENDING", "REPAIRING")
NOT_IN_BUCKET = "VMs only (no run.json here)"


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    listing = subparsers.add_parser(
        "list", parents=[common],
        help="list the runs in the bucket, newest first",
        description="List the runs kept in the bucket of const.py, newest first, with their item counts, state, and the VMs each still has.",
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
    vms: str = "-"  # e.g. "2 alive, 1 stopped"; "-" none; "?" not listed


def vms_text(vms: "Sequence[Vm] | None") -> str:
    """A run's VMs still there: "2 alive, 1 stopped", "-" for none, "?" when they could not be listed."""
    if vms is None:
        return "?"
    alive = sum(1 for vm in vms if vm.status in ALIVE_STATES)
    stopped = len(vms) - alive
    parts = [f"{alive} alive"] if alive else []
    parts += [f"{stopped} stopped"] if stopped else []
    return ", ".join(parts) or "-"


def list_runs(storage_client: Any, bucket_name: str, vms_by_run: "Mapping[str, Sequence[Vm]] | None" = None) -> list[RunSummary]:
    """Every run in the bucket, newest first (runs without run.json last), and any run with VMs but no record here.

    Args:
        vms_by_run: the VMs of each run (``Compute.list_vms_by_run``); None when they could not be listed.
    Returns:
        A list of ``RunSummary``; only the VM-only runs when the bucket does not exist.
    """
    def vms_of(run_id: str) -> str:
        return vms_text(None if vms_by_run is None else vms_by_run.get(run_id, []))

    from cflow.gcp.storage import Bucket, RunStorage

    with storage_errors(bucket_name):
        try:
            run_ids = Bucket(storage_client, bucket_name).list_run_ids()
        except NotFound:
            run_ids = []
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
            summaries.append(RunSummary(run_id, None, None, len(done), len(failed), "no run.json", vms_of(run_id)))
            continue
        items = int(manifest.get("item_count", 0))
        # A finished run is finished whether or not it was cancelled too: no need to read cancelled.json.
        cancelled = len(done) + len(failed) < items and view.cancelled() is not None
        state = run_state(items, len(done), len(failed), cancelled)
        summaries.append(RunSummary(run_id, manifest.get("created"), items, len(done), len(failed), state, vms_of(run_id)))
    listed = {summary.run_id for summary in summaries}
    for run_id, vms in sorted((vms_by_run or {}).items()):
        if run_id not in listed and RUN_ID_RE.fullmatch(run_id):
            summaries.append(RunSummary(run_id, None, None, 0, 0, NOT_IN_BUCKET, vms_text(vms)))
    summaries.sort(key=lambda summary: (summary.created is not None, summary.created or 0, summary.run_id), reverse=True)
    return summaries


def list_lines(summaries: list[RunSummary], bucket_name: str) -> list[str]:
    """The aligned table ``cflow list`` prints."""
    if not summaries:
        return [f"no runs in gs://{bucket_name}"]
    header = ("RUN ID", "CREATED", "ITEMS", "DONE", "FAILED", "STATE", "VMS")
    rows = [
        (s.run_id, format_time(s.created) if s.created is not None else "-", "-" if s.items is None else str(s.items),
         str(s.done), str(s.failed), s.state, s.vms)
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
    note: str | None = None
    with open_session(args) as session:
        vms_by_run: dict[str, list[Vm]] | None = None
        if session.has_fleet:
            try:
                vms_by_run = session.compute().list_vms_by_run()
            except CloudError as error:
                note = f"VMs not listed ({error.message}): VMS shows ?"
        summaries = list_runs(session.clients.storage, session.bucket, vms_by_run if session.has_fleet else {})
    lines = list_lines(summaries, session.bucket)
    if note is not None:
        lines.append(note)
    elif any(summary.vms not in ("-", "?") for summary in summaries):
        lines.append("VMS: a run's VMs still there (and billing); `cflow cancel RUN_ID` deletes them")
    print("\n".join(lines), file=out, flush=True)
    return EXIT_OK
