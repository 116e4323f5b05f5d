"""What every operator command starts from: const.py, the clients of its target, and the arguments they share.

``open_session`` is a context manager. Locally it uses the stack running in
the stack folder; when none runs, the commands that only read a run's
objects (``needs_fleet=False``) get its Cloud Storage alone, served from the
stack folder for as long as the command runs (``cflow.local.stored_runs``),
and the others say how to start the stack. Nothing here starts the Pub/Sub
or Compute emulator.
"""

import argparse
import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterator, Mapping
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
                        help="local stack's folder (default: .cflow/local beside const.py); its emulators are never started here")
    return common


@dataclasses.dataclass
class Session:
    """What every operator command needs: the settings and built clients.

    Attributes:
        config: const.py's settings.
        clients: the built clients; locally with no stack running, only
            ``clients.storage`` (the others are None: see ``has_fleet``).
        stack_dir: the local stack's folder (None on GCP).
    """

    config: "Config"
    clients: "Clients"
    stack_dir: Path | None = None

    @property
    def bucket(self) -> str:
        return self.config.bucket

    @property
    def has_fleet(self) -> bool:
        """False when only Cloud Storage is reachable (a local stack that is not running has no VMs or topics)."""
        return self.clients.compute is not None

    def run(self, run_id: str) -> "RunView":
        """The ``RunView`` of ``run_id`` in the config's bucket (not yet checked to exist).

        Raises:
            CflowError: ``run_id`` cannot be a run id.
        """
        from cflow.gcp.storage import RunStorage
        from cflow.ops.view import RunView, check_run_id

        local_files = None
        if self.stack_dir is not None:
            from cflow.local.stored_runs import object_path

            local_files = functools.partial(object_path, self.stack_dir, self.bucket)
        return RunView(RunStorage(self.clients.storage, self.bucket, check_run_id(run_id)), local_files)

    def compute(self) -> "Compute":
        """Raises StackError when there is no fleet to reach (see ``has_fleet``)."""
        from cflow.gcp.compute import Compute

        self._require_fleet()
        return Compute(self.clients.compute, self.clients.project)

    def pubsub(self) -> "PubSub":
        """Raises StackError when there is no fleet to reach (see ``has_fleet``)."""
        from cflow.gcp.pubsub import PubSub

        self._require_fleet()
        return PubSub(self.clients.publisher, self.clients.subscriber, self.clients.project)

    def _require_fleet(self) -> None:
        if not self.has_fleet:
            raise StackError(_no_stack_message(self.stack_dir))


def _no_stack_message(stack_dir: Path | None) -> str:
    return (f"no local stack is running in {stack_dir}; start it with `cflow local up --dir {stack_dir}` "
            "(or pass --stack-dir to the folder of a running one)")


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set (where the Google clients read the emulators' endpoints), put back after."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def open_session(args: argparse.Namespace, needs_fleet: bool = False) -> Iterator[Session]:
    """Load const.py and build the clients for its target, for the duration of the block.

    Args:
        args: the command's arguments (``--config``, ``--local``/``--gcp``, ``--stack-dir``).
        needs_fleet: the command needs Compute and Pub/Sub too (``cflow cancel``).
    Yields:
        A ``Session``. Locally with no stack running (and ``needs_fleet``
        False), Cloud Storage is served from the stack folder until the block ends.
    Raises:
        ConfigError: const.py is missing or invalid.
        StackError: locally, no stack runs and the command needs one, or no
            run ever kept anything in the stack folder.
    """
    from cflow.config import load_config
    from cflow.gcp.clients import build_clients

    config = load_config(args.config, {"TARGET": args.target} if args.target else None)
    if not config.is_local:
        yield Session(config, build_clients("gcp", config.project, config.credential_file))
        return
    from cflow.local import ENV_STORAGE
    from cflow.local.stack import LocalStack
    from cflow.local.stored_runs import stack_storage

    stack_dir = (Path(args.stack_dir) if args.stack_dir else config.base_dir / ".cflow" / "local").absolute()
    info = LocalStack(stack_dir).info()
    if info is not None:
        with _environment(info.env()):
            yield Session(config, build_clients("local", config.project), stack_dir)
        return
    if needs_fleet:
        raise StackError(_no_stack_message(stack_dir))
    from cflow.gcp.clients import Clients, build_storage_client

    with stack_storage(stack_dir) as storage, _environment({ENV_STORAGE: storage.url}):
        clients = Clients(compute=None, publisher=None, subscriber=None, storage=build_storage_client("local", config.project),
                          project=config.project)
        yield Session(config, clients, stack_dir)
