"""What every operator command starts from: const.py, the clients of its target, and the arguments they share.

Locally nothing here starts a stack: the commands use the one that is
running, or say how to start it.
"""

import argparse
import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

from cflow.errors import StackError

if TYPE_CHECKING:
    from cflow.config import Config
    from cflow.gcp.clients import Clients
    from cflow.gcp.compute import Compute
    from cflow.gcp.pubsub import PubSub
    from cflow.ops.view import RunView

DEFAULT_CONFIG = "const.py"


def common_arguments() -> argparse.ArgumentParser:
    """A parent parser with --config, --local/--gcp and --stack-dir, shared by every operator command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH",
                        help="settings file naming the bucket (default: ./const.py)")
    where = common.add_mutually_exclusive_group()
    where.add_argument("--local", dest="target", action="store_const", const="local",
                       help="look on the local cloud in a box (overrides TARGET)")
    where.add_argument("--gcp", dest="target", action="store_const", const="gcp",
                       help="look on Google Cloud (overrides TARGET)")
    common.add_argument("--stack-dir", default=None, metavar="DIR",
                        help="running local stack's folder (default: .cflow/local beside const.py); never started here")
    return common


@dataclasses.dataclass
class Session:
    """What every operator command needs: the settings and built clients."""

    config: "Config"
    clients: "Clients"

    @property
    def bucket(self) -> str:
        return self.config.bucket

    def run(self, run_id: str) -> "RunView":
        """The ``RunView`` of ``run_id`` in the config's bucket (not yet checked to exist).

        Raises:
            CflowError: ``run_id`` cannot be a run id.
        """
        from cflow.gcp.storage import RunStorage
        from cflow.ops.view import RunView, check_run_id

        return RunView(RunStorage(self.clients.storage, self.bucket, check_run_id(run_id)))

    def compute(self) -> "Compute":
        from cflow.gcp.compute import Compute

        return Compute(self.clients.compute, self.clients.project)

    def pubsub(self) -> "PubSub":
        from cflow.gcp.pubsub import PubSub

        return PubSub(self.clients.publisher, self.clients.subscriber, self.clients.project)


def open_session(args: argparse.Namespace) -> Session:
    """Load const.py and build the clients for its target.

    Locally, only a running stack is used: its endpoints are put into
    ``os.environ``, where the Pub/Sub and Storage clients read them.

    Raises:
        ConfigError: const.py is missing or invalid.
        StackError: local target and no stack is running in the stack folder.
    """
    from cflow.config import load_config
    from cflow.gcp.clients import build_clients

    config = load_config(args.config, {"TARGET": args.target} if args.target else None)
    if not config.is_local:
        return Session(config, build_clients("gcp", config.project, config.credential_file))
    from cflow.local.stack import LocalStack

    stack_dir = Path(args.stack_dir) if args.stack_dir else config.base_dir / ".cflow" / "local"
    info = LocalStack(stack_dir).info()
    if info is None:
        raise StackError(
            f"no local stack is running in {stack_dir}; start it with `cflow local up --dir {stack_dir}` "
            "(or pass --stack-dir to the folder of a running one)"
        )
    os.environ.update(info.env())
    return Session(config, build_clients("local", config.project))
