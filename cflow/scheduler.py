"""The scheduler: a reconcile ``step()`` that keeps a run's fleet at the size its work needs.

Each step reads what happened (worker events, done and failed markers in
Cloud Storage, the run's VMs by label in one list call) and acts on the
difference from what is wanted: delete VMs that stopped, create what is
missing up to ``min(WORKER_NODE_CNT, items left, what the quota holds)``, and
delete idle VMs once the queue is drained. Where to create and how to react
when GCE refuses is decided by ``cflow.creation.CreationPolicy``; a refusal
no retry mends, with no worker of the run alive, ends the run with
``WorkersRefused``. Tests call ``step()`` by hand; ``run_steps()`` loops it,
riding out failed steps within a ``StepFailureBudget``.

Completion lives in Cloud Storage (done/failed markers), so a scheduler that
is killed can be resumed with the run's id. A run cancelled from elsewhere
(``cflow cancel``, see ``cflow.lifecycle.cancel_run``: it marks the run, then
deletes topics and VMs) makes the next step raise ``RunCancelled``; a run
whose topics vanished without a cancel (a Pub/Sub emulator restarted) gets
them back, with its unfinished items published again.

The scheduler also keeps the run's VM history (``cflow.history.VmHistory``:
each VM's machine type, Spot or not, when it was asked for, first seen
running, preempted, gone) from what it creates, lists and hears, and writes
it to the run's vms.json at most every ``VM_HISTORY_WRITE_SECONDS`` and at
the end (``write_vm_history``), for the run's report; with it, its account
(scheduler.json: VM time and cost by kind, backups, the standard fallback,
the cost cap) for ``cflow status``.

Beyond keeping the fleet's size, the step consults one small policy object
per concern (``Policies``), each deciding from what the step read, and acts
on the answer itself (deciding apart from acting, as Ray's autoscaler):

- lanes (``cflow.lanes``): the Spot lane's fleet gets the items of the Spot
  lane; ``StandardLane`` says how many standard workers the items moved off
  Spot want (none once none is left: they are deleted); ``StockoutFallback``
  says when the Spot lane's new workers are standard VMs instead.
- backups (``cflow.backups``): once the queue is drained, ``BackupPolicy``
  picks the slow items whose second copy idle workers pull; when an item is
  recorded done, every other VM running a copy of it is told to stop it
  (its metadata, ``cflow.worker.control``). With backups on, the drained
  queue keeps one idle worker per unfinished item for its backup.
- cost (``cflow.costs``): a ``CostMeter`` counts VM time by machine type and
  Spot/standard; at the ``CostCap`` the step stops creating, tells every
  worker to take no new item (its metadata again), deletes each VM once it
  holds no item, and when none is left the remaining items are "not run"
  and the run ends (``Progress.cost_capped``; ``cflow.run`` cancels it and
  exits with ``EXIT_COST_CAP``).
"""

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cflow import fleet, gpus, tasks
from cflow.backups import BackupLedger, BackupPolicy, backup_attributes
from cflow.costs import CostCap, CostMeter, VmKind
from cflow.creation import STOCKOUT_COOLDOWN_SECONDS, Ask, CreationPolicy, refused_line
from cflow.errors import EXIT_ITEMS_FAILED, CflowError, CloudError, NotFound, WorkersRefused
from cflow.gcp.retry import Backoff
from cflow.history import VmHistory, is_spot, vm_records_from_document
from cflow.lanes import StandardLane, StockoutFallback, lane_of_labels, with_preemptions
from cflow.protocol import DRAIN_ATTRIBUTE, ITEM_END_EVENTS, STOP_ITEM_ATTRIBUTE, EventKind, Lane

if TYPE_CHECKING:
    from cflow.config import Config
    from cflow.gcp.compute import Compute, PendingCreation, Vm
    from cflow.gcp.pubsub import PubSub, RunTopics
    from cflow.gcp.storage import RunStorage

log = logging.getLogger(__name__)

LIVE_STATES = {"PROVISIONING", "STAGING", "RUNNING"}
STOPPED_STATES = {"TERMINATED", "STOPPED", "SUSPENDED"}
MARKER_LIST_INTERVAL_SECONDS = 30
# ... and at least this many times as long as the last listing took, so that
# listing a million markers (tens of seconds) stays a small share of the scheduler's time.
MARKER_LIST_COST_FACTOR = 20
# Between steps the scheduler pulls events at most this often (see Scheduler.wait).
EVENT_POLL_SECONDS = 0.25
# Ray autoscaler's max_failures: so many failed steps in a row end the run (it stays resumable).
MAX_CONSECUTIVE_STEP_FAILURES = 5
# Waits after a failed step: 2, 4, 8, 16 ... s, at most a minute.
STEP_FAILURE_BACKOFF = Backoff(first_delay=2.0, max_delay=60.0, jitter=0.0)
# vms.json is rewritten at most this often while the run goes on (at 1,000 VMs it is ~200 KB).
VM_HISTORY_WRITE_SECONDS = 60.0


class RunCancelled(CflowError):
    """The run was cancelled (``cflow cancel`` or Ctrl-C elsewhere) while this scheduler ran it."""

    exit_status = EXIT_ITEMS_FAILED


class SchedulerGaveUp(CflowError):
    """The reconcile step failed too many times in a row; the run is left resumable."""

    exit_status = EXIT_ITEMS_FAILED


# scheduler.json's format (``Scheduler.account_document``).
ACCOUNT_FORMAT = 1


@dataclass
class Progress:
    """What a run has reached; printed as progress and in the summary."""

    total: int
    done: int = 0
    failed: int = 0
    running: int = 0
    vms: dict[str, int] = field(default_factory=dict)  # status -> count
    retries: int = 0
    preemptions: int = 0
    standard_items: int = 0  # items moved to the standard lane (cflow.lanes)
    backups_launched: int = 0
    backups_won: int = 0
    cost_usd: float | None = None  # by PRICES, so far (None: PRICES cannot count it)
    cost_capped: bool = False  # MAX_COST_USD was reached: no item starts any more
    not_run: int = 0  # items left when a capped run ended

    @property
    def finished(self) -> bool:
        return self.done + self.failed + self.not_run >= self.total

    @property
    def left(self) -> int:
        return self.total - self.done - self.failed


@dataclass
class Policies:
    """The decisions a step consults, one small object per concern (see the module docstring).

    The defaults decide nothing new: no standard workers, no fallback, no
    backups, no cap. ``from_config`` builds a run's own.
    """

    standard_lane: StandardLane = field(default_factory=lambda: StandardLane(0))
    stockout_fallback: StockoutFallback = field(default_factory=lambda: StockoutFallback(None))
    backups: BackupPolicy = field(default_factory=lambda: BackupPolicy(enabled=False))
    cost_cap: CostCap = field(default_factory=lambda: CostCap(None, {}))

    @classmethod
    def from_config(cls, config: "Config") -> "Policies":
        """The policies const.py asks for (STANDARD_WORKERS_MAX, SPOT_STOCKOUT_FALLBACK_MINUTES, BACKUP_TASKS, MAX_COST_USD)."""
        return cls(
            standard_lane=StandardLane(config.standard_workers_max if config.spot_preemptions_before_standard is not None else 0),
            stockout_fallback=StockoutFallback(config.spot_stockout_fallback_minutes if config.vm_spot else None),
            backups=BackupPolicy(enabled=config.backup_tasks),
            cost_cap=CostCap(config.max_cost_usd, config.prices),
        )


@dataclass(frozen=True)
class RunningCopy:
    """A copy of an item a worker runs, as its "started" event told it."""

    item: str
    attempt: int
    started: float  # epoch seconds on the worker
    backup: bool


class Scheduler:
    """Reconciles one run's fleet with its remaining work.

    Args:
        config: the run's ``cflow.config.Config``.
        run_id: the run's id.
        items: the run's ``WorkItem`` list, in item order.
        compute: ``cflow.gcp.compute.Compute``.
        pubsub: ``cflow.gcp.pubsub.PubSub``.
        storage: ``cflow.gcp.storage.RunStorage`` of the run.
        topics: ``cflow.gcp.pubsub.RunTopics`` of the run.
        instance_properties: what ``fleet.worker_instance_properties`` returns.
        clock: monotonic seconds (tests pass their own).
        wall_clock: epoch seconds, for the VM history and item times (tests pass their own).
        max_workers: the most workers at once (the preflight's count of what the quota holds); None: WORKER_NODE_CNT.
        policy: where to create and how to react to refusals (default: a ``CreationPolicy`` over the config's zones).
        policies: the lanes, backups and cost decisions (default: none of them; ``Policies.from_config``).
    """

    def __init__(
        self,
        config: "Config",
        run_id: str,
        items: Sequence[tasks.WorkItem],
        compute: "Compute",
        pubsub: "PubSub",
        storage: "RunStorage",
        topics: "RunTopics",
        instance_properties: Mapping[str, Any],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        max_workers: int | None = None,
        policy: CreationPolicy | None = None,
        policies: Policies | None = None,
    ) -> None:
        self.config = config
        self.run_id = run_id
        self.items = items
        self.compute = compute
        self.pubsub = pubsub
        self.storage = storage
        self.topics = topics
        self.instance_properties = instance_properties
        self.clock = clock
        self.wall_clock = wall_clock
        self.progress = Progress(total=len(items))
        self.done_ids: set[str] = set()
        self.failed_ids: set[str] = set()
        self.pending_creations: list[PendingCreation] = []
        self.max_workers = max_workers
        self.policy = policy or CreationPolicy(config.zones)
        self.policies = policies or Policies()
        self.zones_out_reported = False
        self.last_creation_news: str | None = None
        self.next_vm_number = 1
        # As the workers' events name them (None where an event lacks the field).
        self.item_by_vm: dict[str | None, str | None] = {}  # VM name -> item it last started
        self.copy_by_vm: dict[str | None, RunningCopy] = {}  # VM name -> the copy it last started, while it runs
        self.idle_vms: set[str | None] = set()
        self.vm_seconds = 0.0
        self.cost_meter = CostMeter()
        self._markers_listed_at: float | None = None
        self._marker_interval = float(MARKER_LIST_INTERVAL_SECONDS)
        self.item_ids = tasks.ids_of(items)  # compact for a run's ItemList: no string per item
        self.vm_history = VmHistory()
        self._vm_history_written_at: float | None = None
        # Lanes: the items moved to the standard lane, and the lane and model of each VM asked for.
        self.standard_ids: set[str] = set()
        self.asked_kind: dict[str, tuple[Lane, bool]] = {}
        # Backups, and the copies to stop because their item was recorded done by another.
        self.backups = BackupLedger()
        self._backups_before = (0, 0)  # launched, won by a scheduler of this run before a resume
        self._copies_to_stop: list[tuple[str | None, str]] = []
        # The cost cap: VMs told to take no new item.
        self._drained: set[str] = set()
        self._preempted_since_step = False  # a VM to replace: wait() steps at once
        self._backup_due_at: float | None = None  # wall-clock time a backup is due: wait() steps then

    # -- publishing --------------------------------------------------------

    def publish_items(self, items: Iterable[tasks.WorkItem], on_progress: Callable[[int], None] | None = None) -> int:
        """Publish a work message per item (attempt 1), each to its lane. Returns the count."""
        standard: list[tasks.WorkItem] = []

        def spot_messages() -> Iterator[tuple[bytes, dict[str, str]]]:
            # One item at a time: a million WorkItem objects at once would take ~450 MB.
            for item in items:
                if item.id in self.standard_ids:
                    standard.append(item)  # few: only items moved off Spot
                else:
                    yield tasks.encode_message(item, 1)

        count = self.pubsub.publish_many(self.topics.work_topic, spot_messages(), on_progress=on_progress)
        if standard:
            # An item moved off Spot stays moved: its count says so (cflow.lanes).
            moved = self.config.spot_preemptions_before_standard or 1
            messages = ((data, with_preemptions(attributes, moved)) for data, attributes in (tasks.encode_message(item, 1) for item in standard))
            count += self.pubsub.publish_many(self.topics.lane_topic(Lane.STANDARD), messages)
        return count

    def refresh_markers(self) -> None:
        """Read every done, failed and lane marker: the source of truth, O(items) to list."""
        started = self.clock()
        self.done_ids = self.storage.list_done_ids()
        self.failed_ids = self.storage.list_failed_ids() - self.done_ids
        self.standard_ids |= {item for item in self.storage.list_lane_ids(Lane.STANDARD.value) if item in self.item_ids}
        self._markers_listed_at = self.clock()
        self._marker_interval = max(float(MARKER_LIST_INTERVAL_SECONDS), MARKER_LIST_COST_FACTOR * (self._markers_listed_at - started))
        self._count_finished()

    def _count_finished(self) -> None:
        self.progress.done = len(self.done_ids)
        self.progress.failed = len(self.failed_ids)
        self.progress.standard_items = len(self.standard_ids)

    def _markers_due(self, now: float) -> bool:
        """List the markers at start, now and then, and before believing the run finished.

        In between, done and failed events keep the counts current: at 100,000
        items a full listing every step would cost seconds of CPU per step. An
        event that never arrives is caught by the next periodic listing, which
        comes every ``MARKER_LIST_INTERVAL_SECONDS``, or ``MARKER_LIST_COST_FACTOR``
        times the last listing's time if that is longer.
        """
        if self._markers_listed_at is None or now - self._markers_listed_at >= self._marker_interval:
            return True
        return self._all_ended()  # the two sets never share an id

    def unfinished_items(self) -> list[tasks.WorkItem]:
        finished = self.done_ids | self.failed_ids
        return [item for item in self.items if item.id not in finished]

    # -- the reconcile step ------------------------------------------------

    def check_not_cancelled(self) -> None:
        """Raises RunCancelled if the run was marked cancelled."""
        if self.storage.read_cancelled() is not None:
            raise RunCancelled(
                f"run {self.run_id} was cancelled; its VMs, topics and subscriptions are deleted by the cancel, "
                "outputs and logs are kept; start a new run for the items left"
            )

    def step(self) -> Progress:
        """One reconcile pass. Returns the run's ``Progress``.

        Raises:
            RunCancelled: the run was cancelled meanwhile; nothing was created.
            WorkersRefused: GCE refuses every worker for good and none of the run's is alive.
            CloudError: a service refused; ``run_steps`` tries again within its budget.
        """
        now = self.clock()
        self.check_not_cancelled()
        try:
            self._read_events()
            self._read_dead_letters()
        except NotFound:
            self.check_not_cancelled()  # a cancel deletes the topics after marking the run
            self.refresh_markers()
            self._recover_queue()
        if self._markers_due(now):
            self.refresh_markers()
        else:
            self._count_finished()
        vms = self.compute.list_run_vms(self.run_id)
        self._account_vm_time(vms, now)
        self.vm_history.listed(((vm.name, vm.zone, vm.status, vm.preempted) for vm in vms), self.wall_clock(), LIVE_STATES,
                               str(self.instance_properties.get("machineType", "")), is_spot(self.instance_properties))
        self._settle_creations(now)

        stopped = [vm for vm in vms if vm.status in STOPPED_STATES]
        live = [vm for vm in vms if vm.status in LIVE_STATES]
        for vm in vms:
            number = fleet.vm_number(self.config, self.run_id, vm.name)
            if number is not None:
                self.next_vm_number = max(self.next_vm_number, number + 1)
        if stopped:
            log.info("deleting %d stopped VM(s): %s", len(stopped), ", ".join(vm.name for vm in stopped))
            self.compute.delete_vms(stopped)
        self._stop_copies_done_elsewhere(live)

        left = self.progress.left
        listed = {vm.name for vm in vms}
        in_flight = [name for p in self.pending_creations for name in p.names if name not in listed]
        if left and self.policy.stopped is not None and not live and not in_flight:
            # GCE refuses every worker for good and none is alive: nothing would ever run.
            error = self.policy.stopped.error
            blamed = fleet.setting_to_change(error, self.config)
            raise WorkersRefused(refused_line(error, blamed), error, blamed.setting if blamed else None)
        if not self.progress.cost_capped and self.policies.cost_cap.reached(self.cost_meter):
            self._cap_reached()
        if self.progress.cost_capped:
            self._wind_down(live, in_flight)
        elif left == 0:
            if live:
                self.compute.delete_vms(live)
        else:
            self._reconcile_lanes(live, in_flight, now)
            self._launch_backups(live)

        self.progress.vms = {}
        for vm in vms:
            self.progress.vms[vm.status] = self.progress.vms.get(vm.status, 0) + 1
        self.progress.running = sum(1 for vm in live if vm.name in self.item_by_vm)
        self.progress.backups_launched = self._backups_before[0] + len(self.backups.launched)
        self.progress.backups_won = self._backups_before[1] + self.backups.won
        if self._vm_history_written_at is None or now - self._vm_history_written_at >= VM_HISTORY_WRITE_SECONDS:
            self.write_vm_history()
        return self.progress

    # -- the lanes' fleets ------------------------------------------------------

    def lane_of(self, vm: "Vm") -> Lane:
        """The lane of a listed VM: its label, else what it was asked for as."""
        if vm.labels:
            return lane_of_labels(vm.labels)
        return self.asked_kind.get(vm.name, (Lane.SPOT, True))[0]

    def _reconcile_lanes(self, live: list["Vm"], in_flight: list[str], now: float) -> None:
        """Keep each lane's fleet at the size its items want: create what is missing, delete idle surplus."""
        standard_unfinished = len(self.standard_ids - self.done_ids - self.failed_ids)
        spot_left = self.progress.left - standard_unfinished
        most = self.config.worker_node_cnt if self.max_workers is None else min(self.config.worker_node_cnt, self.max_workers)
        wanted = {
            Lane.SPOT: min(most, spot_left + self._backup_spares(spot_left)),
            Lane.STANDARD: self.policies.standard_lane.wanted(standard_unfinished),
        }
        for lane, lane_wanted in wanted.items():
            lane_live = [vm for vm in live if self.lane_of(vm) == lane]
            lane_in_flight = sum(1 for name in in_flight if self.asked_kind.get(name, (Lane.SPOT, True))[0] == lane)
            if lane == Lane.STANDARD and lane_wanted == 0:
                if lane_live:
                    # Every item moved off Spot has finished: the standard fleet goes.
                    log.info("no item left for standard VMs; deleting %d", len(lane_live))
                    self.compute.delete_vms(lane_live)
            elif len(lane_live) + lane_in_flight < lane_wanted:
                self._create(lane_wanted - len(lane_live) - lane_in_flight, now, lane)
            elif len(lane_live) > lane_wanted:
                self._delete_idle(lane_live, len(lane_live) - lane_wanted)

    # -- backups -----------------------------------------------------------------

    def _backup_spares(self, spot_left: int) -> int:
        """Idle workers the drained Spot queue keeps for backups: one per unfinished item that has none yet."""
        if not self.policies.backups.enabled:
            return 0
        finished = self.done_ids | self.failed_ids
        with_backup = sum(1 for item in self.backups.launched if item not in finished)
        return max(spot_left - with_backup, 0)

    def _launch_backups(self, live: list["Vm"]) -> None:
        """Publish a backup copy of each slow item the policy picks, for the idle Spot workers to pull.

        Only once the Spot queue is drained: every unfinished item of the lane
        has a running copy (as the "started" events tell). A worker says it is
        idle only after a whole empty pull, so the idle ones are the running
        Spot VMs that hold no item then.
        """
        if not self.policies.backups.enabled:
            return
        spot_live = {vm.name for vm in live if self.lane_of(vm) == Lane.SPOT and vm.status == "RUNNING"}
        if self.progress.left > len(spot_live) + len(self.standard_ids):
            return  # more items left than workers: some wait in the queue
        running_items = {copy.item for copy in self.copy_by_vm.values()}
        # Some unfinished item is neither running nor in the standard lane: it waits in the queue. Counted over
        # the running and standard items only, so a step of a million-item run never walks every item.
        covered = {item for item in running_items | self.standard_ids
                   if item in self.item_ids and item not in self.done_ids and item not in self.failed_ids}
        if len(covered) < len(self.items) - len(self.done_ids) - len(self.failed_ids):
            return
        idle = [name for name in spot_live if name not in self.item_by_vm]
        running_since: dict[str, float] = {}
        for vm, copy in self.copy_by_vm.items():
            if vm in spot_live and not copy.backup and copy.item not in self.done_ids and copy.item not in self.failed_ids:
                running_since[copy.item] = copy.started
        free = len(idle) - len(self.backups.waiting)
        chosen = self.policies.backups.choose(running_since, free, self.backups.launched, self.wall_clock())
        attempts = {copy.item: copy.attempt for copy in self.copy_by_vm.values()}
        if free > len(chosen):
            # Wake when the next item becomes slow enough, not up to a step interval later (wait() reads this).
            self._backup_due_at = self.policies.backups.next_due(running_since, self.backups.launched | set(chosen))
        for item_id in chosen:
            data, attributes = tasks.encode_message(tasks.item_of(self.items, item_id), attempts[item_id])
            self.pubsub.publish(self.topics.work_topic, data, backup_attributes(attributes))
            self.backups.published(item_id)
            log.info("item %s has run %.0f s, over %g times the median item (%.1f s): a backup copy goes to an idle worker",
                     item_id, self.wall_clock() - running_since[item_id], self.policies.backups.multiple, self.policies.backups.median() or 0)

    def _stop_copies_done_elsewhere(self, live: list["Vm"]) -> None:
        """Tell each VM that runs a copy of an item recorded done elsewhere to stop it (its metadata)."""
        to_stop, self._copies_to_stop = self._copies_to_stop, []
        zones = {vm.name: vm.zone for vm in live}
        for vm, item_id in to_stop:
            copy = self.copy_by_vm.get(vm)
            if vm not in zones or copy is None or copy.item != item_id:
                continue  # gone, or already on another item
            try:
                self.compute.set_metadata_attributes(zones[vm], str(vm), {STOP_ITEM_ATTRIBUTE: item_id})
                log.info("item %s is done; stopping its other copy on %s", item_id, vm)
            except CloudError as error:
                # The copy then runs to its end and is acked as a duplicate: nothing is lost.
                log.warning("could not tell %s to stop its copy of item %s (%s); it runs to its end", vm, item_id, error)

    # -- the cost cap ----------------------------------------------------------

    def _cap_reached(self) -> None:
        self.progress.cost_capped = True
        running = sum(1 for vm in self.copy_by_vm)
        log.warning("cost cap reached: $%.4f of MAX_COST_USD $%.2f by PRICES; creating no more VMs, letting %d running item(s) "
                    "finish, then cancelling the %d item(s) left", self.progress.cost_usd or 0.0, self.policies.cost_cap.max_usd or 0.0,
                    running, max(self.progress.left - running, 0))

    def _wind_down(self, live: list["Vm"], in_flight: list[str]) -> None:
        """At the cost cap: no worker takes a new item, each VM goes once it holds none, and with none left the run ends."""
        for vm in live:
            if vm.name in self._drained:
                continue
            try:
                self.compute.set_metadata_attributes(vm.zone, vm.name, {DRAIN_ATTRIBUTE: "true"})
                self._drained.add(vm.name)
            except CloudError as error:
                log.warning("could not tell %s to take no new item (%s); trying again on the next step", vm.name, error)
        holding_none = [vm for vm in live if vm.name in self.idle_vms or vm.name not in self.item_by_vm]
        if holding_none:
            self.compute.delete_vms(holding_none)
            for vm in holding_none:
                self.idle_vms.discard(vm.name)
        if len(holding_none) == len(live) and not in_flight:
            self.refresh_markers()  # the last results, before the rest is counted as not run
            self.progress.not_run = self.progress.left
            log.info("cost cap: every running item has ended; %d item(s) not run", self.progress.not_run)

    # -- the VM history ------------------------------------------------------

    def restore_vm_history(self) -> None:
        """Carry on the VM history a scheduler of this run wrote before (a resumed run)."""
        records = vm_records_from_document(self.storage.read_vm_history())
        self.vm_history = VmHistory(records)

    def write_vm_history(self, fleet_gone: bool = False) -> None:
        """Write vms.json if there is news since the last write, and the scheduler's account (scheduler.json).

        A failure is logged and tried again later: both are for the report
        and ``cflow status``, and a run must not stop for them.

        Args:
            fleet_gone: the run's fleet was deleted: every VM not gone yet is gone now.
        """
        if fleet_gone:
            self.vm_history.all_gone(self.wall_clock())
        self._vm_history_written_at = self.clock()
        try:
            self.storage.write_scheduler_account(self.account_document())
        except CloudError as error:
            log.warning("could not write the scheduler's account (%s); trying again later", error)
        if not self.vm_history.dirty:
            return
        try:
            self.storage.write_vm_history(self.vm_history.to_document())
        except CloudError as error:
            self.vm_history.dirty = True
            log.warning("could not write the run's VM history (%s); trying again later", error)

    def account_document(self) -> dict[str, Any]:
        """scheduler.json: what ``cflow status`` shows beside the markers, and what a resumed scheduler carries on from."""
        fallback = self.policies.stockout_fallback
        return {
            "format": ACCOUNT_FORMAT,
            "vm_seconds": self.cost_meter.to_document(),
            "cost_usd": None if self.progress.cost_usd is None else round(self.progress.cost_usd, 6),
            "max_cost_usd": self.policies.cost_cap.max_usd,
            "cost_capped": self.progress.cost_capped,
            "not_run": self.progress.not_run,
            "backups_launched": self.progress.backups_launched,
            "backups_won": self.progress.backups_won,
            "standard_fallback_minutes": fallback.ever_used_minutes,
        }

    def restore_account(self) -> None:
        """Carry on the VM time and backup counts a scheduler of this run wrote before (a resumed run)."""
        document = self.storage.read_scheduler_account()
        if not isinstance(document, dict):
            return
        self.cost_meter.restore(document.get("vm_seconds"))
        self.vm_seconds = self.cost_meter.total_seconds
        launched, won = document.get("backups_launched"), document.get("backups_won")
        self._backups_before = (launched if isinstance(launched, int) else 0, won if isinstance(won, int) else 0)
        minutes = document.get("standard_fallback_minutes")
        if isinstance(minutes, int | float):
            self.policies.stockout_fallback.ever_used_minutes = float(minutes)

    def _recover_queue(self) -> None:
        """The run's topics or subscriptions are gone without a cancel: make them again, republish what is unfinished (each to its lane)."""
        log.warning("the run's Pub/Sub topics or subscriptions are gone (was the Pub/Sub service restarted?); "
                    "recreating them and publishing the %d unfinished item(s) again", self.progress.left)
        self.pubsub.create_run_topics(self.topics, ack_deadline_seconds=self.config.lease_seconds)
        # One at a time: a million WorkItem objects at once would take ~450 MB.
        finished_done, finished_failed = self.done_ids, self.failed_ids
        self.publish_items(item for item in self.items if item.id not in finished_done and item.id not in finished_failed)

    def wait(self, seconds: float, sleep: Callable[[float], None] = time.sleep) -> None:
        """Wait up to ``seconds`` until the next step, reading events as they come.

        Returns as soon as the events show every item ended, so the run's end
        is seen when it happens instead of up to a step interval later; when a
        VM was preempted, so its replacement is asked for at once; and when a
        backup copy falls due (``cflow.backups``), so it starts on time. A
        failure to read events (a lost queue, a cancel) is the next step's to
        handle: the rest of the time is slept.
        """
        deadline = self.clock() + seconds
        if self._backup_due_at is not None:
            deadline = min(deadline, self.clock() + max(self._backup_due_at - self.wall_clock(), EVENT_POLL_SECONDS))
            self._backup_due_at = None
        # Already all ended yet the last step did not finish: nothing to wake for.
        wake_on_end = not self._all_ended()
        self._preempted_since_step = False
        while True:
            pulled_at = self.clock()
            left = deadline - pulled_at
            if left <= 0:
                return
            if not wake_on_end:
                sleep(left)
                return
            try:
                self._read_events(timeout=left)
            except CloudError as error:
                log.debug("reading events while waiting failed (%s); the next step handles it", error)
                sleep(max(0.0, deadline - self.clock()))
                return
            if self._all_ended() or (self._preempted_since_step and not self.progress.cost_capped):
                return
            # A pull can come back at once, empty or with one event: a few pulls a
            # second see the end soon enough without spinning on the service.
            sleep(max(0.0, min(deadline, pulled_at + EVENT_POLL_SECONDS) - self.clock()))

    def _all_ended(self) -> bool:
        return len(self.done_ids) + len(self.failed_ids) >= len(self.items)

    def _read_events(self, timeout: float = 0.5) -> None:
        for event in self.pubsub.drain_events(self.topics.events_subscription, timeout=timeout):
            kind, vm = event.get("type"), event.get("vm")
            sent = event.get("time")
            when = float(sent) if isinstance(sent, int | float) else self.wall_clock()
            backup = event.get("backup") is True
            # A VM preempted between two listings is known only by its events.
            self.vm_history.heard_from(vm, when)
            if kind == EventKind.STARTED:
                self.item_by_vm[vm] = event.get("item")
                self.copy_by_vm[vm] = RunningCopy(str(event.get("item")), _int(event.get("attempt"), 1), when, backup)
                self.idle_vms.discard(vm)
                if backup:
                    self.backups.started(str(event.get("item")))
            # A worker records one result while its next task runs, so "started"
            # for the next item can come first: only that item's end frees the VM.
            elif kind in ITEM_END_EVENTS and self.item_by_vm.get(vm) == event.get("item"):
                del self.item_by_vm[vm]
                self.copy_by_vm.pop(vm, None)
            named = event.get("item")
            item_id = named if isinstance(named, str) and named in self.item_ids else None  # None: none of this run's items
            if kind == EventKind.DONE and item_id is not None:
                self.done_ids.add(item_id)
                self.failed_ids.discard(item_id)
                self._item_done(item_id, vm, event.get("seconds"), backup)
            elif kind == EventKind.FAILED and item_id is not None and item_id not in self.done_ids:
                self.failed_ids.add(item_id)
                self.backups.finished(item_id, by_backup=False)
            elif kind == EventKind.IDLE:
                self.idle_vms.add(vm)
            if kind == EventKind.RETRY:
                self.progress.retries += 1
                log.info("item %s failed attempt %s (%s); retrying", event.get("item"), event.get("attempt"), event.get("reason"))
            elif kind == EventKind.FAILED:
                log.warning("item %s failed for good after %s attempts; log: %s", event.get("item"), event.get("attempt"), event.get("log"))
            elif kind == EventKind.PREEMPTED:
                self.progress.preemptions += 1
                self._preempted_since_step = True
                self.vm_history.mark_preempted(vm, when)
                if event.get("lane") == Lane.STANDARD and item_id is not None:
                    self.standard_ids.add(item_id)
                    log.info("VM %s preempted; item %s was preempted %s times and moves to a standard VM", vm, item_id, event.get("preemptions"))
                else:
                    log.info("VM %s preempted; item %s handed back", vm, item_id)
            elif kind == EventKind.MALFORMED:
                log.warning("VM %s dropped a work message that is not CFlow's: %s", vm, event.get("detail"))

    def _item_done(self, item_id: str, vm: str | None, seconds: object, backup: bool) -> None:
        """An item was recorded done: its time counts for the median, and any other copy of it must stop."""
        if isinstance(seconds, int | float):
            self.policies.backups.item_done(float(seconds))
        self.backups.finished(item_id, by_backup=backup)
        if backup:
            log.info("item %s: its backup copy on %s finished first", item_id, vm)
        for other, copy in self.copy_by_vm.items():
            if other != vm and copy.item == item_id:
                self._copies_to_stop.append((other, item_id))

    def _read_dead_letters(self) -> None:
        received = self.pubsub.pull(self.topics.dead_subscription, max_messages=100, timeout=0.2)
        for message in received:
            try:
                item, attempt = tasks.decode_message(message.data, message.attributes)
            except ValueError:
                self.pubsub.ack(self.topics.dead_subscription, [message.ack_id])
                continue
            # Delivered again and again without a result: its worker dies on it.
            self.storage.write_failed_marker(
                item.id,
                {"item": item.id, "attempts": attempt, "reason": "delivered too many times without a result", "log": None},
            )
            log.warning("item %s was dead-lettered: its worker never finished it", item.id)
            if item.id not in self.done_ids:
                self.failed_ids.add(item.id)
            self.pubsub.ack(self.topics.dead_subscription, [message.ack_id])

    def _account_vm_time(self, vms: list["Vm"], now: float) -> None:
        """Count the time since the last step for every live VM, by machine type and Spot/standard."""
        default_type = str(self.instance_properties.get("machineType", "")).rsplit("/", 1)[-1]
        default_spot = is_spot(self.instance_properties)
        # Every lane's body keeps the run's GPUs (fleet.lane_variant).
        accelerators = tuple(gpus.accelerators_of(self.instance_properties))
        kinds = []
        for vm in vms:
            if vm.status in LIVE_STATES:
                asked = self.asked_kind.get(vm.name)
                spot = vm.spot if vm.spot is not None else (asked[1] if asked else default_spot)
                kinds.append(VmKind(vm.machine_type or default_type, spot, accelerators))
        self.cost_meter.account(kinds, now)
        self.vm_seconds = self.cost_meter.total_seconds
        self.progress.cost_usd = self.cost_meter.cost(self.policies.cost_cap.prices) if self.policies.cost_cap.prices else None

    def _settle_creations(self, now: float) -> None:
        """Read the bulkInsert operations that finished; a refusal inside one is reacted to as one answered at once."""
        still_pending = []
        for pending in self.pending_creations:
            errors = self.compute.creation_result(pending)
            spot = self.asked_kind.get(pending.names[0], (Lane.SPOT, True))[1] if pending.names else True
            if errors is None:
                still_pending.append(pending)
                continue
            if errors:
                self.vm_history.never_created(pending.names)
            elif spot:
                self.policies.stockout_fallback.spot_created()
            # GCE reports one error per VM (a policy refuses each by name): one reaction per kind is enough.
            for error in {type(error): error for error in reversed(errors)}.values():
                self._react(error, pending.zone, len(pending.names), now, spot)
        self.pending_creations = still_pending

    def _react(self, error: CloudError, zone: str, count: int, now: float, spot: bool) -> None:
        """Let the policy react to a refusal; tell the user what changed (the same news once)."""
        news = self.policy.refused(error, zone, count, now, spot=spot).describe(zone, now)
        if self._model_note(spot):
            news += f" (asking{self._model_note(spot)})"
        if news != self.last_creation_news:
            log.warning("%s", news)
            self.last_creation_news = news

    def _create(self, count: int, now: float, lane: Lane = Lane.SPOT) -> None:
        spot = is_spot(self.instance_properties) and lane == Lane.SPOT
        if spot and self.policy.every_zone_out_of_capacity(now, spot=True):
            fallback = self.policies.stockout_fallback
            fallback.all_zones_out(now)
            if fallback.use_standard(now):
                spot = False
        ask = self.policy.next_ask(count, now, spot=spot)
        if ask is None:
            if self.policy.every_zone_out_of_capacity(now, spot=spot) and not self.zones_out_reported:
                log.warning("every configured zone is out of capacity%s; trying again every %d s "
                            "(add zones to VM_FALLBACK_ZONES to widen the search)", self._model_note(spot), STOCKOUT_COOLDOWN_SECONDS)
                self.zones_out_reported = True
            return
        self.zones_out_reported = False
        names = [fleet.vm_name(self.config, self.run_id, self.next_vm_number + i) for i in range(ask.count)]
        request_id = fleet.creation_request_id(self.run_id, ask.zone, names)
        properties = self._properties(lane, spot)
        try:
            pending = self.compute.bulk_insert(ask.zone, names, properties, request_id=request_id)
        except CloudError as error:
            # Transient ones were retried by the Compute seam already; the policy says when to ask again.
            self._react(error, ask.zone, ask.count, now, spot)
            return
        self._created(ask, pending, lane, spot, properties)

    def _created(self, ask: Ask, pending: "PendingCreation", lane: Lane, spot: bool, properties: Mapping[str, Any]) -> None:
        self.policy.created(ask)
        self.next_vm_number += ask.count
        self.pending_creations.append(pending)
        self.asked_kind.update((name, (lane, spot)) for name in pending.names)
        self.vm_history.asked_for(pending.names, ask.zone, properties, self.wall_clock())
        log.info("creating %d VM(s) in %s%s%s", ask.count, ask.zone, self._model_note(spot),
                 " for the items moved off Spot" if lane == Lane.STANDARD else "")

    def _model_note(self, spot: bool) -> str:
        """The words " for standard VMs" (or Spot) when that is not what the run's workers are, else nothing."""
        return "" if spot == is_spot(self.instance_properties) else f" for {'Spot' if spot else 'standard'} VMs"

    def _properties(self, lane: Lane, spot: bool) -> Mapping[str, Any]:
        """The instance body of a worker of ``lane``, Spot or standard (the run's own body when it is that)."""
        if lane == Lane.SPOT and spot == is_spot(self.instance_properties):
            return self.instance_properties
        return fleet.lane_variant(self.instance_properties, lane, spot)

    def _delete_idle(self, live: list["Vm"], surplus: int) -> None:
        idle = [vm for vm in live if vm.name in self.idle_vms and vm.name not in self.item_by_vm][:surplus]
        if idle:
            log.info("queue drained; deleting %d idle VM(s)", len(idle))
            self.compute.delete_vms(idle)
            for vm in idle:
                self.idle_vms.discard(vm.name)



def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


class StepFailureBudget:
    """How many failed reconcile steps in a row a run rides out, and how long it waits after each.

    As Ray autoscaler's ``max_failures``: a step that fails (a service down
    for a moment, a bug met once) is tried again after a growing wait; a
    step that succeeds resets the count; ``max_consecutive`` failures in a
    row end the run with one line, leaving it resumable.

    Args:
        run_id: named in the final line.
        max_consecutive: failures in a row that end the run.
        backoff: the waits (``Backoff.delay(n)`` after the n-th failure in a row).
    """

    def __init__(self, run_id: str, max_consecutive: int = MAX_CONSECUTIVE_STEP_FAILURES, backoff: Backoff = STEP_FAILURE_BACKOFF) -> None:
        self.run_id = run_id
        self.max_consecutive = max_consecutive
        self.backoff = backoff
        self.failures = 0

    def succeeded(self) -> None:
        self.failures = 0

    def failed(self, error: BaseException) -> float:
        """Count a failed step. Returns the seconds to wait before the next one.

        Raises:
            SchedulerGaveUp: that was the ``max_consecutive``-th failure in a row.
        """
        self.failures += 1
        what = " ".join(str(error).split()) if isinstance(error, CflowError) else f"{type(error).__name__}: {' '.join(str(error).split())}"
        if self.failures >= self.max_consecutive:
            raise SchedulerGaveUp(
                f"run {self.run_id}: the scheduler's step failed {self.failures} times in a row (last: {what[:300]}); "
                f"the run is left as it is: carry on with `python3 scheduler.py --resume {self.run_id}` "
                f"or stop it with `cflow cancel {self.run_id}`"
            ) from error
        delay = self.backoff.delay(self.failures)
        log.warning("the scheduler's step failed (%s); trying again in %.0f s (%d in a row, %d allowed)",
                    what, delay, self.failures, self.max_consecutive - 1)
        return delay


def run_steps(
    scheduler: Scheduler,
    on_progress: Callable[[Progress], None],
    step_interval: float,
    sleep: Callable[[float], None] = time.sleep,
    budget: StepFailureBudget | None = None,
) -> Progress:
    """Step the scheduler until every item is done or failed; returns the final ``Progress``.

    Between steps it waits ``step_interval`` seconds (reading events, see
    ``Scheduler.wait``); after a failed step, the budget's wait instead.

    Raises:
        RunCancelled: the run was cancelled.
        SchedulerGaveUp: the budget of failed steps in a row ran out.
        WorkersRefused: GCE refuses every worker for good and none is alive.
    """
    budget = budget or StepFailureBudget(scheduler.run_id)
    while True:
        try:
            progress = scheduler.step()
        except (RunCancelled, WorkersRefused):
            raise  # an end, not a failed step: no retry mends it
        except Exception as error:
            sleep(budget.failed(error))
            continue
        budget.succeeded()
        on_progress(progress)
        if progress.finished:
            return progress
        scheduler.wait(step_interval, sleep=sleep)
