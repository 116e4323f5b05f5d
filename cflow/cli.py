"""The ``cflow`` command: one subcommand module per area, dispatched here.

Each module in ``SUBCOMMAND_MODULES`` has ``add_parser(subparsers)`` which
registers its subcommand and sets ``func(args) -> int`` as the handler.
Those modules import the Google clients inside their handlers, not at the top,
so ``cflow --help`` stays fast.
"""

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from cflow.errors import EXIT_INTERRUPTED, CflowError

SUBCOMMAND_MODULES = [
    "cflow.run",
    "cflow.demo",
    "cflow.ops",
    "cflow.local.compute.cli",
    "cflow.local.stack_cli",
    "cflow.image",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cflow",
        description="Run one script over many work items on a fleet of Compute Engine VMs (Spot included), "
        "on GCP or on the local cloud in a box.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def configure_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if debug else "%(message)s",
        stream=sys.stderr,
    )
    if not debug:
        # The Google clients are chatty at INFO; their news is ours to tell.
        for noisy in ("googleapiclient", "google", "urllib3", "grpc"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # google-auth warns at every failed metadata-server probe while looking
        # for credentials; when none are found our own one line says so.
        logging.getLogger("google.auth").setLevel(logging.ERROR)
        # "Sleeping 1.3 seconds before retry" on every 429/503: retries are ours to hide.
        logging.getLogger("googleapiclient.http").setLevel(logging.ERROR)


def run_entry(
    parser: argparse.ArgumentParser, default_func: Callable[[argparse.Namespace], int | None] | None = None, argv: list[str] | None = None
) -> int:
    """Parse, configure logging and run the handler; errors become one line and an exit status."""
    args = parser.parse_args(argv)
    func = getattr(args, "func", None) or default_func
    if func is None:
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False)
    configure_logging(debug)
    try:
        return func(args) or 0
    except CflowError as error:
        if debug:
            raise
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return error.exit_status
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    return run_entry(build_parser(), argv=argv)
