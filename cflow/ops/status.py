"""``cflow status RUN_ID``: a run's items, attempts, VMs and time left, and its first failed items by name.

Also what the scheduler's account says (scheduler.json, ``cflow.scheduler``):
items moved to standard VMs and why, backups launched and won, the cost so
far by PRICES and the cost cap.

Locally it works whether or not the stack runs: with no stack, the run's
objects are read from the stack folder and it has no VMs.
"""

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from cflow.errors import EXIT_OK
from cflow.gcp import layout
from cflow.lifecycle import STATE_CANCELLED, STATE_FINISHED, STATE_IN_PROGRESS, run_state
from cflow.ops.session import open_session
from cflow.ops.text import aligned, format_duration, format_time
from cflow.ops.view import FailedItem, RunView, list_vms
from cflow.protocol import Lane

if TYPE_CHECKING:
    from cflow.gcp.compute import Compute


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    status = subparsers.add_parser(
        "status", parents=[common],
        help="show a run's items, attempts, VMs and time left",
        description="Show a run's progress from Cloud Storage and Compute: items queued, running (estimated "
        "from live VMs), done and failed; attempts and retries; VMs by state; elapsed and estimated time left.",
    )
    status.add_argument("run_id", metavar="RUN_ID", help="the run's id, as `cflow run` printed it (see `cflow list`)")
    status.set_defaults(func=status_command)


# How many failed items status names (`cflow logs RUN_ID` lists them all).
FAILED_ITEMS_SHOWN = 5


@dataclasses.dataclass(frozen=True)
class RunStatus:
    """A run's progress as ``cflow status`` shows it.

    ``running`` is an estimate: the live VMs, at most the items left, since
    which item a VM holds is only known to the scheduler.
    """

    run_id: str
    bucket: str
    state: str
    total: int
    done: int
    failed: int
    running: int
    attempts: int
    vms: dict[str, int]  # status -> count
    created: float | None
    elapsed: float | None  # seconds since created, or until the run ended
    cancelled_at: float | None = None
    failed_items: tuple[FailedItem, ...] = ()  # the first FAILED_ITEMS_SHOWN, in item order
    fleet_reachable: bool = True  # False: a local stack that is not running (so no VMs)
    # Lanes, backups and cost (cflow.lanes, cflow.backups, cflow.costs).
    standard_items: int = 0
    preemptions_before_standard: int | None = None
    standard_fallback_minutes: float | None = None
    backups_launched: int = 0
    backups_won: int = 0
    cost_usd: float | None = None
    max_cost_usd: float | None = None
    cost_capped: bool = False
    not_run: int = 0

    @property
    def left(self) -> int:
        return max(self.total - self.done - self.failed, 0)

    @property
    def queued(self) -> int:
        return max(self.left - self.running, 0)

    @property
    def retries(self) -> int:
        return max(self.attempts - self.done - self.failed, 0)

    @property
    def seconds_left(self) -> float | None:
        """elapsed / done * left while the run goes on and something is done; else None."""
        if self.state != STATE_IN_PROGRESS or not self.done or self.elapsed is None:
            return None
        return self.elapsed / self.done * self.left


def read_status(view: RunView, compute: "Compute | None", now: float) -> RunStatus:
    """Build a run's ``RunStatus``.

    Args:
        view: the run's ``RunView``.
        compute: ``cflow.gcp.compute.Compute`` of the run's project; None when
            there is no fleet to ask (a local stack that is not running).
        now: wall-clock seconds (``time.time()``).
    Raises:
        RunNotFound, CloudError.
    """
    from cflow.scheduler import LIVE_STATES

    manifest = view.manifest()
    done_times, failed_times = view.done_and_failed()
    total = int(manifest.get("item_count", 0))
    vms: dict[str, int] = {}
    for vm in list_vms(compute, view.run_id) if compute is not None else []:
        vms[vm.status] = vms.get(vm.status, 0) + 1
    live = sum(count for status, count in vms.items() if status in LIVE_STATES)
    cancelled = view.cancelled()
    state = run_state(total, len(done_times), len(failed_times), cancelled is not None)
    created = manifest.get("created")
    ended = None
    if state == STATE_FINISHED and (done_times or failed_times):
        ended = max([*done_times.values(), *failed_times.values()]).timestamp()
    elif state == STATE_CANCELLED and cancelled is not None:
        ended = cancelled.get("time")
    elapsed = None
    if created is not None:
        elapsed = max((ended if ended is not None else now) - created, 0.0)
    left = max(total - len(done_times) - len(failed_times), 0)
    failed_items: tuple[FailedItem, ...] = ()
    if failed_times:
        fields = {item.id: item.args for item in view.work_items()}
        shown = sorted(failed_times)[:FAILED_ITEMS_SHOWN]
        failed_items = tuple(view.failed_item(item_id, fields.get(item_id, ())) for item_id in shown)
    account = view.scheduler_account()
    return RunStatus(
        standard_items=len(view.lane_items(Lane.STANDARD.value)),
        preemptions_before_standard=manifest.get("preemptions_before_standard"),
        standard_fallback_minutes=_number(account.get("standard_fallback_minutes")),
        backups_launched=int(_number(account.get("backups_launched")) or 0),
        backups_won=int(_number(account.get("backups_won")) or 0),
        cost_usd=_number(account.get("cost_usd")),
        max_cost_usd=_number(account.get("max_cost_usd")),
        cost_capped=account.get("cost_capped") is True,
        not_run=int(_number(account.get("not_run")) or 0),
        run_id=view.run_id,
        bucket=view.bucket_name,
        state=state,
        total=total,
        done=len(done_times),
        failed=len(failed_times),
        running=min(live, left) if state == STATE_IN_PROGRESS else 0,
        attempts=view.count_logs(),
        vms=vms,
        created=created,
        elapsed=elapsed,
        cancelled_at=cancelled.get("time") if cancelled else None,
        failed_items=failed_items,
        fleet_reachable=compute is not None,
    )


def status_lines(status: RunStatus) -> list[str]:
    """The lines ``cflow status`` prints for ``status``."""
    state = status.state
    if state == STATE_CANCELLED and status.cancelled_at:
        state = f"cancelled at {format_time(status.cancelled_at)}"
    rows = [
        ("run", f"{status.run_id} ({layout.run_url(status.bucket, status.run_id)})"),
        ("state", state),
        ("items", str(status.total)),
        ("  queued", str(status.queued)),
        ("  running", f"{status.running} (estimate: live VMs, at most the items left)"),
        ("  done", str(status.done)),
        ("  failed", str(status.failed) + (f" (`cflow logs {status.run_id}` shows them)" if status.failed else "")),
        ("attempts", f"{status.attempts} ({status.retries} retries)"),
        ("VMs", ", ".join(f"{count} {name}" for name, count in sorted(status.vms.items()))
         or ("none" if status.fleet_reachable else "none (the local stack is not running)")),
    ]
    if status.created is not None:
        rows.append(("created", format_time(status.created)))
    if status.elapsed is not None:
        rows.append(("elapsed" if status.state == STATE_IN_PROGRESS else "took", format_duration(status.elapsed)))
    if status.seconds_left is not None:
        rows.append(("time left", f"~{format_duration(status.seconds_left)} (estimate)"))
    rows.extend(_lanes_backups_cost_rows(status))
    lines = aligned(rows)
    if status.failed_items:
        lines.append("failed items:")
        lines.extend(f"  {failed_item_line(item)}" for item in status.failed_items)
        if status.failed > len(status.failed_items):
            lines.append(f"  ... and {status.failed - len(status.failed_items)} more (`cflow logs {status.run_id}`)")
    return lines


def _lanes_backups_cost_rows(status: RunStatus) -> list[tuple[str, str]]:
    """What the lanes, backups and the cost cap did, as far as there is anything to say."""
    rows = []
    if status.standard_items:
        after = f" after {status.preemptions_before_standard} preemptions" if status.preemptions_before_standard else ""
        rows.append(("standard VMs", f"{status.standard_items} item(s) moved to standard VMs{after}"))
    if status.standard_fallback_minutes is not None:
        rows.append(("standard workers", f"created: every zone out of Spot capacity for {status.standard_fallback_minutes:.0f} min"))
    if status.backups_launched:
        rows.append(("backups", f"{status.backups_launched} launched, {status.backups_won} won"))
    if status.cost_usd is not None:
        cap = f" of MAX_COST_USD ${status.max_cost_usd:.2f}" if status.max_cost_usd is not None else ""
        rows.append(("cost", f"${status.cost_usd:.4f}{cap} (estimate from PRICES)"))
    if status.cost_capped:
        rows.append(("cost cap", f"reached: {status.not_run} item(s) not run (cancelled, not failed)"))
    return rows


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def failed_item_line(item: FailedItem) -> str:
    """``000149 (poison-0): exit status 7 after 3 attempt(s); log: PATH``."""
    attempts = f" after {item.attempts} attempt(s)" if item.attempts else ""
    return f"{item.label}: {item.reason}{attempts}; log: {item.log or 'none was uploaded'}"


def status_command(args: argparse.Namespace, out: IO[str] | None = None, now: Callable[[], float] = time.time) -> int:
    out = out or sys.stdout
    with open_session(args) as session:
        compute = session.compute() if session.has_fleet else None
        status = read_status(session.run(args.run_id), compute, now())
    print("\n".join(status_lines(status)), file=out, flush=True)
    return EXIT_OK
