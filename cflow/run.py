"""``python3 scheduler.py`` / ``cflow run``: one whole run, from const.py to the combined result and its report.

Order matters: everything that can be checked is checked before anything is
created or uploaded (bad input never costs a VM): const.py, the bucket, then
the preflight (``cflow.preflight``: zones, image, network, service account,
quotas); the run id is printed before the first thing is created so an
interrupted run can be resumed or cancelled. ``--dry-run`` runs the same
reads and prints the plan, writing nothing. What needs no cloud (the package,
the items) is prepared while the local stack starts, so the preflight reads
no upload.

Then what a booting worker looks for (the wheelhouse if stock workers need
one, package, run.json, topics), then the fleet, and the items are published
while it boots (``cflow.launch``).

At the end: the fleet and the topics are deleted while the outputs are
combined, then the VM history and RESULT_DIR/RUN_ID/report.html
(``cflow.ops.report``) are written and the summary printed, which names
failed items by their fields and, locally, their logs as files, and says
what the lanes, backups and cost did.

How a run ends (exit statuses in ``cflow.errors``): the summary (0, or 1 with
failed items); GCE refusing every worker for good cancels the run and ends
it in one line (``WorkersRefused``, 2); any VM of the run still there at the
end is named with its gcloud delete command (3); a run that reached
MAX_COST_USD ends cancelled (``cflow.lifecycle.cancel_run``), its done items
combined (``EXIT_COST_CAP``, 4, unless a VM was left: 3).
"""

import argparse
import contextlib
import datetime
import functools
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from cflow.errors import (
    EXIT_COST_CAP,
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    EXIT_VMS_LEFT,
    CflowError,
    CloudError,
    ConfigError,
    VmsLeftBehind,
    WorkersRefused,
)

if TYPE_CHECKING:
    from cflow.config import Config
    from cflow.gcp.clients import Clients
    from cflow.gcp.compute import Compute, Vm
    from cflow.gcp.pubsub import PubSub, RunTopics
    from cflow.gcp.storage import RunStorage
    from cflow.launch import Preparation
    from cflow.lifecycle import CombinedFile
    from cflow.ops.view import RunView
    from cflow.preflight import PreflightResult
    from cflow.scheduler import Progress, Scheduler
    from cflow.tasks import WorkItem

log = logging.getLogger(__name__)

STEP_INTERVAL_SECONDS = 2.0
DEFAULT_CONFIG = "const.py"
# At the end, how often the fleet is listed until it is gone: a local VM goes
# in a fraction of a second, a GCE one in tens of seconds (a few lists a second
# are well within GCE's read quota).
FLEET_GONE_POLL_SECONDS = 0.25


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``cflow run`` (and ``scheduler.py``, ``cflow demo``)."""
    # SUPPRESS: `cflow --debug run` and `cflow run --debug` both work; a
    # subcommand default must not overwrite the top-level flag.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs")
    parser.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH", help="settings file (default: ./const.py)")
    parser.add_argument("--tasks", metavar="FILE", help="tasks file, one work item per line (overrides TASKS)")
    parser.add_argument("--workers", type=int, metavar="N", help="number of worker VMs (overrides WORKER_NODE_CNT)")
    parser.add_argument("--max-attempts", type=int, metavar="K", help="failed attempts per item before it is failed (overrides MAX_ATTEMPTS)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--local", dest="target", action="store_const", const="local", help="run on the local cloud in a box")
    where.add_argument("--gcp", dest="target", action="store_const", const="gcp", help="run on Google Cloud")
    parser.add_argument("--resume", metavar="RUN_ID", help="carry on a run that was interrupted, from what it keeps in Cloud Storage")
    parser.add_argument("--dry-run", action="store_true", help="check the settings against the cloud (read only) and print the plan; create nothing")
    parser.add_argument("--yes", action="store_true", help="on Ctrl-C, cancel the run (delete its VMs, topics and subscriptions) without asking")
    parser.add_argument("--stack-dir", default=None, metavar="DIR", help="local stack folder (default: .cflow/local beside const.py)")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run every work item on a fleet of VMs (what `python3 scheduler.py` does)",
        description="Run TASK_MODULE_CMD once per work item on worker VMs and combine the outputs.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run_command)


def new_run_id(now: datetime.datetime | None = None) -> str:
    """Short, sortable, and valid in VM names, labels and topic names: MMDD-HHMM-xxxx."""
    now = now or datetime.datetime.now(datetime.UTC)
    return f"{now:%m%d-%H%M}-{secrets.token_hex(2)}"


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The const.py settings the command line overrides."""
    overrides: dict[str, Any] = {}
    if args.tasks is not None:
        # A tasks file is relative to where the user typed it; a gs:// prefix is not a path.
        overrides["TASKS"] = args.tasks if args.tasks.startswith("gs://") else str(Path(args.tasks).absolute())
    if args.workers is not None:
        overrides["WORKER_NODE_CNT"] = args.workers
    if args.max_attempts is not None:
        overrides["MAX_ATTEMPTS"] = args.max_attempts
    if args.target is not None:
        overrides["TARGET"] = args.target
    return overrides


def run_command(args: argparse.Namespace, before_run: "Callable[[Config, Clients], None] | None" = None) -> int:
    """``cflow run``: load const.py, then run (or resume, or plan) the run. Returns the exit status."""
    from cflow.config import load_config
    from cflow.launch import Preparation

    config = load_config(args.config, overrides_from(args))
    if args.dry_run:
        return dry_run(config, clients=_reading_clients(config, args))
    run_id = args.resume or new_run_id()
    print(f"run id: {run_id}", flush=True)
    # While the local stack starts (or the clients are built): imports, the package, the items.
    preparation = Preparation(config, resume=bool(args.resume))
    try:
        with _cloud(config, args, preparation) as clients:
            if before_run:
                before_run(config, clients)
            status = execute_run(config, run_id, clients, resume=bool(args.resume), assume_yes=args.yes,
                                 stack_dir=_stack_dir(config, args), preparation=preparation)
    finally:
        preparation.settle()
    # Last, after a stack started for the run has stopped: what to open next.
    from cflow.ops.report import report_path

    report = report_path(config.result_dir, run_id)
    if report.is_file():
        print(f"report: {report} (open it in a browser)", flush=True)
    return status


def _stack_dir(config: "Config", args: argparse.Namespace) -> Path | None:
    """The local stack's folder (None on GCP)."""
    if not config.is_local:
        return None
    return Path(args.stack_dir or (config.base_dir / ".cflow" / "local")).absolute()


@contextlib.contextmanager
def _cloud(config: "Config", args: argparse.Namespace, preparation: "Preparation | None" = None) -> "Iterator[Clients]":
    """The clients for the run's target; locally, a running stack or one started for this run.

    ``preparation`` imports the client modules meanwhile; they are built once it has.
    """
    if not config.is_local:
        if preparation:
            preparation.wait_for_imports()
        from cflow.gcp.clients import build_clients

        yield build_clients("gcp", config.project, config.credential_file)
        return
    from cflow.local.stack import running_stack

    stack_dir = _stack_dir(config, args)
    assert stack_dir is not None  # local
    with running_stack(stack_dir) as info:
        os.environ.update(info.env())
        if preparation:
            preparation.wait_for_imports()
        from cflow.gcp.clients import build_clients

        yield build_clients("local", config.project)


def _reading_clients(config: "Config", args: argparse.Namespace) -> "Clients | str":
    """The clients a dry run reads through, or why there are none (one line): it starts nothing and writes nothing."""
    from cflow.gcp.clients import build_clients

    try:
        if not config.is_local:
            return build_clients("gcp", config.project, config.credential_file)
        from cflow.local.stack import LocalStack

        stack_dir = Path(args.stack_dir) if args.stack_dir else config.base_dir / ".cflow" / "local"
        info = LocalStack(stack_dir).info()
        if info is None:
            return f"no local stack is running in {stack_dir} (`cflow local up` starts one)"
        os.environ.update(info.env())
        return build_clients("local", config.project)
    except CflowError as error:
        return str(error)


def preflight_run(config: "Config", clients: "Clients", properties: dict[str, Any], wanted: int,
                  own_vms: "list[Vm] | None" = None, compute: "Compute | None" = None) -> "PreflightResult":
    """The preflight (``cflow.preflight``) through the run's clients.

    Raises:
        PreflightFailed, ConfigError: a setting the project cannot honour.
        CloudError: Compute Engine could not be read.
    """
    from cflow.gcp.compute import Compute
    from cflow.gcp.iam import ServiceAccounts
    from cflow.preflight import Preflight

    accounts = ServiceAccounts(clients.iam) if clients.iam is not None else None
    return Preflight(config, compute or Compute(clients.compute, clients.project), accounts).check(properties, wanted, own_vms or [])


def dry_run(config: "Config", out: IO[str] | None = None, clients: "Clients | str | None" = None) -> int:
    """Print the plan: items, VMs, zones, boot, the preflight, the instance body and a cost range. Writes nothing.

    Args:
        clients: the clients to read through, or why there are none (the preflight is then skipped, saying so).
    Raises:
        PreflightFailed, ConfigError: the preflight found a setting the project cannot honour (after the plan is printed).
    """
    from cflow import fleet, gpus
    from cflow.gcp import layout
    from cflow.tasks import load_items

    out = out or sys.stdout
    # A gs:// prefix would need a listing; the dry run lists nothing of the user's.
    items = load_items(config) if config.tasks_kind != "gcs" else None
    properties = fleet.worker_instance_properties(
        config, "RUN_ID", layout.run_url(config.bucket, "RUN_ID", layout.PACKAGE), fleet.read_init_script(config)
    )
    workers = config.worker_node_cnt if items is None else min(config.worker_node_cnt, len(items))
    accelerators = gpus.describe(gpus.accelerators_of(properties))
    preflight_lines, failure = _dry_preflight(config, clients, properties, workers)
    for entry in properties["metadata"]["items"]:
        if entry["key"] in ("startup-script", "shutdown-script"):
            entry["value"] = f"<{len(entry['value'])} bytes: {'init.sh' if entry['key'] == 'startup-script' else 'runs shutdown-signal.py'}>"
    external = "an external IP each" if config.vm_external_ip else "no external IP"
    lines = [
        f"target:       {config.target} (project {config.project})",
        f"items:        {len(items) if items is not None else 'one per object under ' + str(config.tasks)}",
        f"command:      {' '.join(config.task_module_cmd)} ITEM-FIELDS...",
        f"workers:      {workers} x {config.vm_type}, {'Spot' if config.vm_spot else 'standard'}"
        + (f", GPUs {accelerators} each (the NVIDIA driver installed at boot unless the image has it)" if accelerators else ""),
        f"zones:        {', '.join(config.zones)}",
        f"network:      {fleet.network_url(config)}{', ' + str(fleet.subnetwork_url(config)) if config.vm_subnetwork else ''}, {external}",
        f"run time:     {'at most ' + format(config.max_run_hours, 'g') + ' h per worker (GCE deletes it then)' if config.max_run_hours else 'no limit'}",
        f"boot:         {config.vm_boot} ({fleet.boot_image(config)})",
        f"bucket:       gs://{config.bucket}",
        f"attempts:     up to {config.max_attempts} per item, {config.task_timeout:g} s each",
        f"cost:         {cost_range(config, workers, len(items) if items is not None else None, properties)}",
        *([f"cost cap:     {cap_against_worst_case(config, workers, len(items) if items is not None else None, properties)}"]
          if config.max_cost_usd is not None else []),
        f"Spot:         {spot_plan(config)}",
        *preflight_lines,
        "instance body (bulkInsert instanceProperties, names RUN_ID and scripts elided):",
        json.dumps(properties, indent=2),
        "dry run: nothing was created",
    ]
    print("\n".join(lines), file=out, flush=True)
    if failure is not None:
        raise failure
    return EXIT_OK


def _dry_preflight(
    config: "Config", clients: "Clients | str | None", properties: dict[str, Any], workers: int
) -> tuple[list[str], CflowError | None]:
    """The dry run's preflight lines, and the error it found (raised after the plan is printed)."""
    if clients is None or isinstance(clients, str):
        why = clients or "no clients given"
        return [f"preflight:    not checked ({why}); network, image, account and quotas are unchecked"], None
    try:
        result = preflight_run(config, clients, properties, workers)
    except CloudError as error:
        if isinstance(error, ConfigError):
            return [f"preflight:    FAILED: {error}"], error
        return [f"preflight:    not checked (the cloud could not be read: {error}); network, image, account and quotas are unchecked"], None
    except ConfigError as error:
        return [f"preflight:    FAILED: {error}"], error
    lines = [f"preflight:    {line}" for line in result.checked]
    lines += [f"warning:      {line}" for line in result.warnings]
    lines += [f"not checked:  {line}" for line in result.unchecked]
    return lines, None


def cost_range(config: "Config", workers: int, item_count: int | None, properties: "dict[str, Any] | None" = None) -> str:
    """A rough range from PRICES: the fleet's hourly rate, and the most it can cost if every item hits TASK_TIMEOUT.

    ``properties``: the workers' body; its GPUs are priced too.
    """
    from cflow import gpus

    accelerators = gpus.accelerators_of(properties or {})
    price = gpus.worker_hourly_price(config, accelerators)
    if price is None:
        return gpus.price_note(config, accelerators)
    hourly = price * workers
    text = f"${hourly:.3f}/hour for the fleet" + (f" ({gpus.price_note(config, accelerators)})" if accelerators else "")
    if item_count:
        rounds = -(-item_count // max(workers, 1))  # items per worker, rounded up
        worst_hours = rounds * config.max_attempts * config.task_timeout / 3600
        text += f"; at most ${hourly * worst_hours:.2f} if every attempt ran to TASK_TIMEOUT"
    return text + " (estimate from PRICES in const.py)"


def cap_against_worst_case(config: "Config", workers: int, item_count: int | None, properties: "dict[str, Any] | None" = None) -> str:
    """The dry run's line about MAX_COST_USD: the cap against the worst case (every attempt to TASK_TIMEOUT).

    ``properties``: the workers' body; its GPUs are priced too.
    """
    from cflow import gpus
    from cflow.costs import cap_line, worst_case

    assert config.max_cost_usd is not None  # the caller shows this line only with a cap
    price = gpus.worker_hourly_price(config, gpus.accelerators_of(properties or {}))
    worst = None
    if price is not None and item_count:
        worst = worst_case(price * workers, workers, item_count, config.max_attempts, config.task_timeout)
    return cap_line(config.max_cost_usd, worst)


def spot_plan(config: "Config") -> str:
    """The dry run's line about Spot: when items move to standard VMs, the stockout fallback, backups."""
    if not config.vm_spot:
        moves = "standard VMs only (VM_SPOT = False)"
    elif config.spot_preemptions_before_standard is None:
        moves = "items stay on Spot however often they are preempted"
    else:
        moves = (f"an item preempted {config.spot_preemptions_before_standard} times moves to standard VMs "
                 f"(at most {config.standard_workers_max})")
    if config.vm_spot and config.spot_stockout_fallback_minutes is not None:
        moves += f"; standard workers after {config.spot_stockout_fallback_minutes:g} min with every zone out of Spot"
    return moves + ("; backup copies of the slowest items once the queue is drained" if config.backup_tasks else "; no backup copies")


def execute_run(
    config: "Config",
    run_id: str,
    clients: "Clients",
    resume: bool = False,
    assume_yes: bool = False,
    step_interval: float = STEP_INTERVAL_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
    out: IO[str] | None = None,
    stack_dir: Path | None = None,
    preparation: "Preparation | None" = None,
) -> int:
    """Run (or resume) one run with built clients. Returns the exit status.

    ``stack_dir`` is the local stack's folder, where the summary finds the
    logs as files (None on GCP, or when not known: it then names the
    `cflow logs` command instead). ``preparation`` has the package and items
    made meanwhile (None: they are made here).

    Raises:
        ConfigError: a check failed before anything was created, or a resumed
            run's settings differ in const.py now.
        PreflightFailed: the project cannot honour a setting (nothing created or uploaded).
        RunCancelled: the run was (or is, meanwhile) cancelled.
        SchedulerGaveUp: the reconcile step kept failing; the run is resumable.
        WorkersRefused: GCE refused every worker for good; the run was cancelled.
        VmsLeftBehind: ... and a VM of the run was still there after the cancel.
        CloudError: a service refused.
    """
    from cflow import fleet, lifecycle
    from cflow.creation import CreationPolicy
    from cflow.gcp.compute import Compute
    from cflow.gcp.pubsub import PubSub, RunTopics
    from cflow.gcp.storage import Bucket, RunStorage
    from cflow.launch import BackgroundPublisher, prepare_locally, write_run_records
    from cflow.scheduler import Policies, RunCancelled, Scheduler, SchedulerGaveUp, run_steps
    from cflow.tasks import load_items
    from cflow.wheelhouse import WheelhouseRef, prepare_for_run

    out = out or sys.stderr
    started = time.monotonic()
    bucket = Bucket(clients.storage, config.bucket)
    storage = RunStorage(clients.storage, config.bucket, run_id)
    compute = Compute(clients.compute, clients.project)
    pubsub = PubSub(clients.publisher, clients.subscriber, clients.project)
    say = functools.partial(print, file=out, flush=True)

    # Checks first: nothing is created or uploaded before every one passes.
    # Locally the default bucket is made on demand; a bucket named in const.py
    # must exist, as on GCP, so a typo never writes results somewhere new.
    bucket.ensure_exists(create_if_missing=config.is_local and config.bucket == f"{config.project}-cflow")
    own_vms: list[Vm] = []
    items: Sequence[WorkItem]
    package: bytes | None = None
    if resume:
        manifest = storage.read_manifest()
        stored_items = storage.read_items()
        if manifest is None or stored_items is None:
            raise ConfigError(f"run {run_id} not found in gs://{config.bucket}; `cflow list` shows the runs there")
        items = stored_items
        if storage.read_cancelled() is not None:
            raise RunCancelled(f"run {run_id} was cancelled and cannot be resumed; start a new run for the items left "
                               f"(`cflow status {run_id}` shows them)")
        lifecycle.check_resumable(manifest, config, run_id)
        own_vms = compute.list_run_vms(run_id)
        package_url = manifest["package"]
        topics = RunTopics.from_dict(manifest["topics"])
        kept_wheelhouse = WheelhouseRef.from_dict(manifest.get("wheelhouse"))
    else:
        # Made while the local stack started (``cflow.launch.Preparation``); nothing is uploaded yet.
        prepared = preparation.result() if preparation else prepare_locally(config, resume=False)
        package = prepared.package
        if prepared.items is not None:
            items = prepared.items
        else:  # a gs:// prefix: listed here, with the clients
            items = load_items(config, list_objects=lambda bucket_name, prefix: Bucket(clients.storage, bucket_name).list_object_names(prefix))
        package_url = storage.package_url()
        topics = RunTopics.for_run(clients.project, run_id, config.topic_name, config.subscription_name)
    init_script = fleet.read_init_script(config)
    preflight = preflight_run(config, clients, fleet.worker_instance_properties(config, run_id, package_url, init_script),
                              min(config.worker_node_cnt, len(items)), own_vms, compute)
    for line in preflight.warnings:
        print(f"warning: {line}", file=out, flush=True)
    for line in preflight.unchecked:
        log.info("preflight: not checked: %s", line)

    if resume:
        # The workers of a resumed run install what its first workers did.
        wheelhouse = kept_wheelhouse or prepare_for_run(config, bucket, stack_dir, say)
    else:
        # Stock workers install their Python packages from a wheelhouse in the bucket, made once per set of versions.
        wheelhouse = prepare_for_run(config, bucket, stack_dir, say)
        assert package is not None  # a new run's
        manifest = lifecycle.new_manifest(config, run_id, clients.project, topics, len(items), package_url, time.time())
        manifest["wheelhouse"] = wheelhouse.to_dict() if wheelhouse else None
        # The package and items.jsonl, then run.json: a run with run.json has everything its workers look for.
        write_run_records(storage, package, items, manifest)

    properties = fleet.worker_instance_properties(config, run_id, package_url, init_script, wheelhouse)
    # Zones the preflight skipped (they do not offer VM_GPU_TYPE) are never asked.
    scheduler = Scheduler(config, run_id, items, compute, pubsub, storage, topics, properties, max_workers=preflight.max_workers,
                          policy=CreationPolicy(preflight.zones or config.zones), policies=Policies.from_config(config))
    if resume:
        scheduler.restore_vm_history()
        scheduler.restore_account()
    created_queue = pubsub.create_run_topics(topics, ack_deadline_seconds=config.lease_seconds)
    scheduler.refresh_markers()
    # A new queue (a new run, or a resumed one whose Pub/Sub forgot its
    # messages), or a run killed while publishing: every unfinished item goes
    # out again (workers ack an item already done without rerunning it). It
    # goes out while the fleet boots: the first step asks for the fleet, then
    # publishing starts beside the loop.
    publisher = BackgroundPublisher(scheduler, storage) if created_queue or not storage.is_published() else None

    reporter = ProgressReporter(out)

    def on_progress(progress: "Progress") -> None:
        if publisher is not None:
            publisher.start()
            news = publisher.news()
            if news:
                reporter.note(news)
        reporter.show(progress, time.monotonic() - started)

    try:
        run_steps(scheduler, on_progress, step_interval, sleep=sleep)
        if publisher is not None:
            publisher.wait()  # ended already: every item was done, so every one was out
            news = publisher.news()
            if news:
                reporter.note(news)
    except (RunCancelled, SchedulerGaveUp):
        reporter.close()  # the error line goes below the progress line, not over it
        raise
    except WorkersRefused as refused:
        reporter.close()
        _end_refused(run_id, refused, storage, pubsub, compute, topics, out)
        raise
    except KeyboardInterrupt:
        reporter.close()
        _on_interrupt(run_id, storage, pubsub, compute, topics, assume_yes, out)
        raise
    reporter.close()
    return finish_run(config, run_id, scheduler, storage, pubsub, topics, started, out, _run_view(storage, config, stack_dir))


def _run_view(storage: "RunStorage", config: "Config", stack_dir: Path | None) -> "RunView":
    """The run view of this run; locally it finds the logs as files in the stack's folder."""
    import functools

    from cflow.ops.view import RunView

    if not config.is_local:
        return RunView(storage)
    if stack_dir is None:
        # Not knowing the folder (a caller that did not say), the summary names the `cflow logs` command instead.
        return RunView(storage, lambda name: None)
    from cflow.local.stored_runs import object_path

    return RunView(storage, functools.partial(object_path, stack_dir, config.bucket))


def _on_interrupt(run_id: str, storage: "RunStorage", pubsub: "PubSub", compute: "Compute", topics: "RunTopics", assume_yes: bool, out: IO[str]) -> None:
    """Ctrl-C: cancel the run (asking on a terminal unless --yes), or leave it resumable."""
    from cflow.lifecycle import cancel_run, left_behind_lines

    cancel = assume_yes
    if not assume_yes and sys.stdin.isatty():
        try:
            answer = input(f"cancel run {run_id}: delete its VMs, topics and subscriptions (outputs and logs are kept)? [y/N] ")
        except (EOFError, KeyboardInterrupt):
            answer = ""
        cancel = answer.strip().lower() in ("y", "yes")
    if cancel:
        outcome = cancel_run(storage, pubsub, compute, topics, time.time())
        print(f"run {run_id} cancelled: VMs, topics and subscriptions deleted; outputs and logs kept", file=out, flush=True)
        if outcome.left_behind:
            print("\n".join(left_behind_lines(run_id, compute.project, outcome.left_behind)), file=out, flush=True)
    else:
        print(f"run {run_id} was left as it is; carry on with `python3 scheduler.py --resume {run_id}` "
              f"or stop it with `cflow cancel {run_id}`", file=out, flush=True)


def _end_refused(run_id: str, refused: WorkersRefused, storage: "RunStorage", pubsub: "PubSub", compute: "Compute",
                 topics: "RunTopics", out: IO[str]) -> None:
    """GCE refuses every worker for good and none is alive: cancel the run cleanly (topics, any VM), keep what it wrote.

    Raises:
        VmsLeftBehind: a VM of the run is still there after the cancel (each named with its delete command).
    """
    from cflow.lifecycle import cancel_run, delete_command, left_behind_lines

    outcome = cancel_run(storage, pubsub, compute, topics, time.time())
    if outcome.left_behind:
        print("\n".join(left_behind_lines(run_id, compute.project, outcome.left_behind)), file=out, flush=True)
        raise VmsLeftBehind(f"{refused}; and the run did not clean up (see the commands above)",
                            [delete_command(compute.project, vm) for vm in outcome.left_behind]) from refused


def finish_run(
    config: "Config", run_id: str, scheduler: "Scheduler", storage: "RunStorage", pubsub: "PubSub", topics: "RunTopics", started: float,
    out: IO[str], view: "RunView | None" = None,
) -> int:
    """Combine outputs, delete the fleet and the run's topics, write the report, print the summary. Returns the exit status.

    A run that reached its cost cap is cancelled instead (marked, topics and
    VMs deleted until gone: its items left are not run) and ends with
    ``EXIT_COST_CAP`` (4). A VM of the run still there after the fleet's
    deletion is named with the command that deletes it, and the status is
    ``EXIT_VMS_LEFT`` (3), cost cap or not: a VM that may bill comes first.
    """
    from cflow.gcp import layout
    from cflow.lifecycle import cancel_run, combine_outputs, done_in_item_order, left_behind_lines
    from cflow.ops.view import RunView

    progress = scheduler.progress
    combined: dict[str, CombinedFile] = {}
    # The VMs have no work left and bill until they are gone, and no worker
    # needs the topics any more: delete both while combining. At the cost cap
    # the run is cancelled instead (its VMs and its topics).
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="finish") as deleter:
        if progress.cost_capped:
            fleet_deleted = deleter.submit(lambda: list(cancel_run(storage, pubsub, scheduler.compute, topics, time.time()).left_behind))
            topics_deleted = None
        else:
            fleet_deleted = deleter.submit(scheduler.compute.delete_run_vms, run_id, poll_seconds=FLEET_GONE_POLL_SECONDS)
            topics_deleted = deleter.submit(pubsub.delete_run_topics, topics)
        if config.combine == "concat":
            done_in_order = done_in_item_order((item.id for item in scheduler.items), scheduler.done_ids)
            where = Path(config.result_dir) / run_id if config.combine_download else storage.url(layout.COMBINED)
            print(f"combining the outputs of {len(done_in_order)} item(s) into {where}", file=out, flush=True)
            combined = combine_outputs(storage, done_in_order, config.result_dir, download=config.combine_download)
        left = fleet_deleted.result()
        if topics_deleted is not None:
            topics_deleted.result()
    scheduler.write_vm_history(fleet_gone=True)
    view = view or RunView(storage)
    _write_report(view, config, run_id)
    print_summary(config, run_id, scheduler, view, combined, time.monotonic() - started, out, vms_left=bool(left))
    if left:
        print("\n".join(left_behind_lines(run_id, scheduler.compute.project, left)), file=out, flush=True)
        return EXIT_VMS_LEFT
    if progress.cost_capped:
        return EXIT_COST_CAP
    return EXIT_ITEMS_FAILED if progress.failed else EXIT_OK


def _write_report(view: "RunView", config: "Config", run_id: str) -> Path | None:
    """Write RESULT_DIR/RUN_ID/report.html. Returns its path, or None (logged) if it could not be made: the run is done either way."""
    from cflow.ops.report import report_path, write_report

    path = report_path(config.result_dir, run_id)
    try:
        return write_report(view, path, time.time())
    except Exception as error:
        log.warning("could not write the run's report (%s); make it with `cflow report %s`", error, run_id)
        return None


def print_summary(
    config: "Config",
    run_id: str,
    scheduler: "Scheduler",
    view: "RunView",
    combined: "dict[str, CombinedFile]",
    wall_seconds: float,
    out: IO[str],
    vms_left: bool = False,
) -> None:
    """The run's last lines: counts, attempts, VM time and cost, the lanes, backups and cost cap, failed items by their fields
    with their logs, where the result is.

    ``vms_left``: a VM of the run is still there (the caller names it); the cost cap's line then claims nothing about it.
    """
    from cflow.gcp import layout

    progress = scheduler.progress
    attempts = progress.done + progress.failed + progress.retries + progress.preemptions
    not_run = f", {progress.not_run} not run" if progress.not_run else ""
    by_kind = sorted(scheduler.cost_meter.seconds.items())
    vm_time = ", ".join(f"{seconds:.0f} ({kind.label})" for kind, seconds in by_kind if seconds >= 0.5)
    lines = [
        f"run {run_id}: {progress.done} done, {progress.failed} failed{not_run} of {progress.total} item(s) in {wall_seconds:.1f} s",
        f"attempts: {attempts}, retries: {progress.retries}, preemptions: {progress.preemptions}",
        f"VM-seconds: {vm_time or '0'}",
    ]
    if progress.cost_usd is not None:
        priced = "; ".join(f"${kind.hourly_price(config.prices):g}/hour per {kind.label} VM" for kind, _ in by_kind) or "nothing ran"
        lines.append(f"estimated cost: ${progress.cost_usd:.4f} (from PRICES in const.py: {priced}; yours to update)")
    if progress.standard_items:
        lines.append(f"standard lane: {progress.standard_items} item(s) moved to standard VMs after "
                     f"{config.spot_preemptions_before_standard} preemptions")
    fallback = scheduler.policies.stockout_fallback.summary_line
    if fallback:
        lines.append(fallback)
    if progress.backups_launched:
        lines.append(f"backups: {progress.backups_launched} launched, {progress.backups_won} won")
    if progress.cost_capped:
        lines.append(f"cost cap: MAX_COST_USD ${config.max_cost_usd:.2f} reached (${progress.cost_usd or 0:.4f} by PRICES); "
                     f"{progress.not_run} item(s) not run (cancelled, not failed)" + ("" if vms_left else "; nothing of the run is left running"))
    fields = {item.id: item.args for item in scheduler.items}
    for item_id in sorted(scheduler.failed_ids):
        failed = view.failed_item(item_id, fields.get(item_id, ()))
        lines.append(f"failed: item {failed.label}: {failed.reason}; log: {failed.log or 'none was uploaded'}")
    for file in combined.values():
        lines.append(f"combined: {file.path} ({file.url})" if file.path is not None
                     else f"combined: {file.url} (COMBINE_DOWNLOAD = False: left in the bucket)")
    if config.combine == "none":
        lines.append(f"outputs: {view.storage.url(layout.outputs_of('ITEM'))} (COMBINE = \"none\")")
    print("\n".join(lines), file=out, flush=True)


class ProgressReporter:
    """A live line on a terminal; plain periodic lines otherwise."""

    PLAIN_EVERY_SECONDS = 10.0

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.live = hasattr(out, "isatty") and out.isatty()
        self._last_plain: float | None = None

    BAR_WIDTH = 24

    def _line(self, progress: "Progress", elapsed: float) -> str:
        vms = " ".join(f"{status.lower()}={count}" for status, count in sorted(progress.vms.items())) or "none"
        eta = ""
        if progress.done and not progress.finished:
            eta = f", ~{elapsed / progress.done * progress.left:.0f} s left"
        counts = (
            f"done {progress.done}/{progress.total}, failed {progress.failed}, "
            f"running {progress.running}, VMs: {vms}{eta}"
        )
        if not self.live:
            return f"[{elapsed:6.0f} s] {counts}"
        filled = int(self.BAR_WIDTH * (progress.done + progress.failed) / max(progress.total, 1))
        return f"[{'#' * filled}{'.' * (self.BAR_WIDTH - filled)}] {elapsed:.0f} s {counts}"

    def show(self, progress: "Progress", elapsed: float) -> None:
        line = self._line(progress, elapsed)
        if self.live:
            self.out.write("\r\x1b[K" + line)
            self.out.flush()
        elif self._last_plain is None or elapsed - self._last_plain >= self.PLAIN_EVERY_SECONDS or progress.finished:
            self._last_plain = elapsed
            print(line, file=self.out, flush=True)

    def note(self, text: str) -> None:
        """A line of news, above the live line (which the next ``show`` draws again)."""
        if self.live:
            self.out.write("\r\x1b[K")
        print(text, file=self.out, flush=True)

    def close(self) -> None:
        if self.live:
            self.out.write("\n")
            self.out.flush()


def main(argv: list[str] | None = None) -> int:
    """scheduler.py: the same as `cflow run`."""
    from cflow.cli import run_entry

    parser = argparse.ArgumentParser(prog="scheduler.py", description="Run every work item of const.py on a fleet of VMs.")
    add_arguments(parser)
    return run_entry(parser, run_command, argv)
