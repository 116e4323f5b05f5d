"""``cflow combine RUN_ID``: combine the done items' outputs again (``cflow.lifecycle.combine_outputs``)."""

import argparse
import sys
from pathlib import Path
from typing import IO, Any

from cflow.errors import EXIT_OK
from cflow.gcp import layout
from cflow.lifecycle import CombinedFile, combine_outputs, done_in_item_order
from cflow.ops.session import open_session
from cflow.ops.view import OperatorError, RunView, storage_errors


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    combine = subparsers.add_parser(
        "combine", parents=[common],
        help="combine the done items' outputs again, into RESULT_DIR/RUN_ID and the bucket",
        description="Concatenate each output file across the run's done items, in item order, into "
        "RESULT_DIR/RUN_ID/ (RESULT_DIR from const.py), and upload the result to the run's combined/ folder.",
    )
    combine.add_argument("run_id", metavar="RUN_ID", help="the run's id")
    combine.set_defaults(func=combine_command)


def combine_run(view: RunView, result_dir: str | Path) -> tuple[dict[str, CombinedFile], int]:
    """Combine the done items' outputs (items.jsonl order) into ``result_dir/RUN_ID`` and upload them.

    Returns:
        (``{name: CombinedFile}``, number of done items).
    Raises:
        RunNotFound; OperatorError when no item is done or an output name is unsafe.
    """
    view.manifest()
    done_in_order = done_in_item_order(view.items(), view.marker_times(layout.DONE))
    if not done_in_order:
        raise OperatorError(f"run {view.run_id} has no done items yet; nothing to combine (`cflow status {view.run_id}`)")
    try:
        with storage_errors(view.bucket_name):
            combined = combine_outputs(view.storage, done_in_order, result_dir)
    except ValueError as error:
        raise OperatorError(f"run {view.run_id}: {error}; rename that output in the bucket or drop it") from None
    return combined, len(done_in_order)


def combine_command(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    with open_session(args) as session:
        view = session.run(args.run_id)
        combined, done_count = combine_run(view, session.config.result_dir)
    lines = [f"run {view.run_id}: combined {len(combined)} file(s) from {done_count} done item(s)"]
    if combined:
        width = max(len(str(file.path)) for file in combined.values())
        lines.extend(f"  {file.path!s:<{width}}  {file.url}" for file in combined.values())
    else:
        lines.append("  the done items have no output files")
    print("\n".join(lines), file=out, flush=True)
    return EXIT_OK
