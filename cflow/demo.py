"""``cflow demo``: the sample end to end on the local stack.

Stages the demo's CSV shards in the bucket (skipping those already there),
then runs const.py's task over them exactly as ``cflow run`` does.
"""

import argparse
import logging
from typing import TYPE_CHECKING, Any

from cflow import demo_data
from cflow.run import add_arguments, run_command

if TYPE_CHECKING:
    from cflow.config import Config
    from cflow.gcp.clients import Clients

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="stage the demo's 125 CSV shards and run the sample task over them",
        description="Stage the demo data in the bucket, then do what `cflow run` does.",
    )
    add_arguments(parser)
    parser.set_defaults(func=demo_command)


def stage_demo_data(config: "Config", clients: "Clients") -> None:
    """Make sure the bucket exists (locally) and holds the demo's shards."""
    from cflow.gcp import layout
    from cflow.gcp.storage import Bucket

    bucket = Bucket(clients.storage, config.bucket)
    bucket.ensure_exists(create_if_missing=config.is_local)
    count = bucket.stage_demo_inputs(demo_data.make_shards())
    print(f"demo data: {count} shard(s) staged in gs://{config.bucket}/{layout.demo_object(demo_data.SHARD_DIR)}/", flush=True)


def demo_command(args: argparse.Namespace) -> int:
    return run_command(args, before_run=stage_demo_data)
