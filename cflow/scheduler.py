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
the end (``write_vm_history``), for the run's report.
"""

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cflow import fleet, tasks
from cflow.creation import STOCKOUT_COOLDOWN_SECONDS, Ask, CreationPolicy, refused_line
from cflow.errors import EXIT_ITEMS_FAILED, CflowError, CloudError, NotFound, WorkersRefused
from cflow.gcp.retry import Backoff
from cflow.history import VmHistory, is_spot, vm_records_from_document
from cflow.protocol import ITEM_END_EVENTS, EventKind

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

    @property
    def finished(self) -> bool:
        return self.done + self.failed >= self.total

    @property
    def left(self) -> int:
        return self.total - self.done - self.failed


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
        max_workers: the most workers at once (the preflight's count of what the quota holds); None: WORKER_NODE_CNT.
        policy: where to create and how to react to refusals (default: a ``CreationPolicy`` over the config's zones).
        wall_clock: epoch seconds, for the VM history (tests pass their own).
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
        max_workers: int | None = None,
        policy: CreationPolicy | None = None,
        wall_clock: Callable[[], float] = time.time,
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
        self.zones_out_reported = False
        self.last_creation_news: str | None = None
        self.next_vm_number = 1
        # As the workers' events name them (None where an event lacks the field).
        self.item_by_vm: dict[str | None, str | None] = {}  # VM name -> item it last started
        self.idle_vms: set[str | None] = set()
        self.vm_seconds = 0.0
        self._last_step_at: float | None = None
        self._markers_listed_at: float | None = None
        self._marker_interval = float(MARKER_LIST_INTERVAL_SECONDS)
        self.item_ids = tasks.ids_of(items)  # compact for a run's ItemList: no string per item
        self.vm_history = VmHistory()
        self._vm_history_written_at: float | None = None

    # -- publishing --------------------------------------------------------

    def publish_items(self, items: Iterable[tasks.WorkItem], on_progress: Callable[[int], None] | None = None) -> int:
        """Publish a work message per item (attempt 1). Returns the count."""
        messages = (tasks.encode_message(item, 1) for item in items)
        return self.pubsub.publish_many(self.topics.work_topic, messages, on_progress=on_progress)

    def refresh_markers(self) -> None:
        """Read every done and failed marker: the source of truth, O(items) to list."""
        started = self.clock()
        self.done_ids = self.storage.list_done_ids()
        self.failed_ids = self.storage.list_failed_ids() - self.done_ids
        self._markers_listed_at = self.clock()
        self._marker_interval = max(float(MARKER_LIST_INTERVAL_SECONDS), MARKER_LIST_COST_FACTOR * (self._markers_listed_at - started))
        self._count_finished()

    def _count_finished(self) -> None:
        self.progress.done = len(self.done_ids)
        self.progress.failed = len(self.failed_ids)

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

        left = self.progress.left
        wanted = min(self.config.worker_node_cnt, left, self.max_workers if self.max_workers is not None else left)
        listed = {vm.name for vm in vms}
        in_flight = sum(1 for p in self.pending_creations for name in p.names if name not in listed)
        if left and self.policy.stopped is not None and not live and not in_flight:
            # GCE refuses every worker for good and none is alive: nothing would ever run.
            error = self.policy.stopped.error
            blamed = fleet.setting_to_change(error, self.config)
            raise WorkersRefused(refused_line(error, blamed), error, blamed.setting if blamed else None)
        if left == 0:
            if live:
                self.compute.delete_vms(live)
        elif len(live) + in_flight < wanted:
            self._create(wanted - len(live) - in_flight, now)
        elif len(live) > wanted:
            self._delete_idle(live, len(live) - wanted)

        self.progress.vms = {}
        for vm in vms:
            self.progress.vms[vm.status] = self.progress.vms.get(vm.status, 0) + 1
        self.progress.running = sum(1 for vm in live if vm.name in self.item_by_vm)
        if self._vm_history_written_at is None or now - self._vm_history_written_at >= VM_HISTORY_WRITE_SECONDS:
            self.write_vm_history()
        return self.progress

    # -- the VM history ------------------------------------------------------

    def restore_vm_history(self) -> None:
        """Carry on the VM history a scheduler of this run wrote before (a resumed run)."""
        records = vm_records_from_document(self.storage.read_vm_history())
        self.vm_history = VmHistory(records)

    def write_vm_history(self, fleet_gone: bool = False) -> None:
        """Write vms.json if there is news since the last write.

        A failure is logged and tried again later: the history is for the
        report, and a run must not stop for it.

        Args:
            fleet_gone: the run's fleet was deleted: every VM not gone yet is gone now.
        """
        if fleet_gone:
            self.vm_history.all_gone(self.wall_clock())
        self._vm_history_written_at = self.clock()
        if not self.vm_history.dirty:
            return
        try:
            self.storage.write_vm_history(self.vm_history.to_document())
        except CloudError as error:
            self.vm_history.dirty = True
            log.warning("could not write the run's VM history (%s); trying again later", error)

    def _recover_queue(self) -> None:
        """The run's topics or subscriptions are gone without a cancel: make them again, republish what is unfinished."""
        log.warning("the run's Pub/Sub topics or subscriptions are gone (was the Pub/Sub service restarted?); "
                    "recreating them and publishing the %d unfinished item(s) again", self.progress.left)
        self.pubsub.create_run_topics(self.topics, ack_deadline_seconds=self.config.lease_seconds)
        # One at a time: a million WorkItem objects at once would take ~450 MB.
        finished_done, finished_failed = self.done_ids, self.failed_ids
        self.publish_items(item for item in self.items if item.id not in finished_done and item.id not in finished_failed)

    def wait(self, seconds: float, sleep: Callable[[float], None] = time.sleep) -> None:
        """Wait up to ``seconds`` until the next step, reading events as they come.

        Returns as soon as the events show every item ended, so the run's end
        is seen when it happens instead of up to a step interval later. A
        failure to read events (a lost queue, a cancel) is the next step's to
        handle: the rest of the time is slept.
        """
        deadline = self.clock() + seconds
        # Already all ended yet the last step did not finish: nothing to wake for.
        wake_on_end = not self._all_ended()
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
            if self._all_ended():
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
            # A VM preempted between two listings is known only by its events.
            self.vm_history.heard_from(vm, float(sent) if isinstance(sent, int | float) else self.wall_clock())
            if kind == EventKind.STARTED:
                self.item_by_vm[vm] = event.get("item")
                self.idle_vms.discard(vm)
            # A worker records one result while its next task runs, so "started"
            # for the next item can come first: only that item's end frees the VM.
            elif kind in ITEM_END_EVENTS and self.item_by_vm.get(vm) == event.get("item"):
                del self.item_by_vm[vm]
            named = event.get("item")
            item_id = named if isinstance(named, str) and named in self.item_ids else None  # None: none of this run's items
            if kind == EventKind.DONE and item_id is not None:
                self.done_ids.add(item_id)
                self.failed_ids.discard(item_id)
            elif kind == EventKind.FAILED and item_id is not None and item_id not in self.done_ids:
                self.failed_ids.add(item_id)
            elif kind == EventKind.IDLE:
                self.idle_vms.add(vm)
            if kind == EventKind.RETRY:
                self.progress.retries += 1
                log.info("item %s failed attempt %s (%s); retrying", event.get("item"), event.get("attempt"), event.get("reason"))
            elif kind == EventKind.FAILED:
                log.warning("item %s failed for good after %s attempts; log: %s", event.get("item"), event.get("attempt"), event.get("log"))
            elif kind == EventKind.PREEMPTED:
                self.progress.preemptions += 1
                self.vm_history.mark_preempted(vm, float(sent) if isinstance(sent, int | float) else self.wall_clock())
                log.info("VM %s preempted; item %s handed back", vm, event.get("item"))
            elif kind == EventKind.MALFORMED:
                log.warning("VM %s dropped a work message that is not CFlow's: %s", vm, event.get("detail"))

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
        if self._last_step_at is not None:
            self.vm_seconds += (now - self._last_step_at) * sum(1 for vm in vms if vm.status in LIVE_STATES)
        self._last_step_at = now

    def _settle_creations(self, now: float) -> None:
        """Read the bulkInsert operations that finished; a refusal inside one is reacted to as one answered at once."""
        still_pending = []
        for pending in self.pending_creations:
            errors = self.compute.creation_result(pending)
            if errors is None:
                still_pending.append(pending)
                continue
            if errors:
                self.vm_history.never_created(pending.names)
            # GCE reports one error per VM (a policy refuses each by name): one reaction per kind is enough.
            for error in {type(error): error for error in reversed(errors)}.values():
                self._react(error, pending.zone, len(pending.names), now)
        self.pending_creations = still_pending

    def _react(self, error: CloudError, zone: str, count: int, now: float) -> None:
        """Let the policy react to a refusal; tell the user what changed (the same news once)."""
        news = self.policy.refused(error, zone, count, now).describe(zone, now)
        if news != self.last_creation_news:
            log.warning("%s", news)
            self.last_creation_news = news

    def _create(self, count: int, now: float) -> None:
        ask = self.policy.next_ask(count, now)
        if ask is None:
            if self.policy.every_zone_out_of_capacity(now) and not self.zones_out_reported:
                log.warning("every configured zone is out of capacity; trying again every %d s "
                            "(add zones to VM_FALLBACK_ZONES to widen the search)", STOCKOUT_COOLDOWN_SECONDS)
                self.zones_out_reported = True
            return
        self.zones_out_reported = False
        names = [fleet.vm_name(self.config, self.run_id, self.next_vm_number + i) for i in range(ask.count)]
        request_id = fleet.creation_request_id(self.run_id, ask.zone, names)
        try:
            pending = self.compute.bulk_insert(ask.zone, names, self.instance_properties, request_id=request_id)
        except CloudError as error:
            # Transient ones were retried by the Compute seam already; the policy says when to ask again.
            self._react(error, ask.zone, ask.count, now)
            return
        self._created(ask, pending)

    def _created(self, ask: Ask, pending: "PendingCreation") -> None:
        self.policy.created(ask)
        self.next_vm_number += ask.count
        self.pending_creations.append(pending)
        self.vm_history.asked_for(pending.names, ask.zone, self.instance_properties, self.wall_clock())
        log.info("creating %d VM(s) in %s", ask.count, ask.zone)

    def _delete_idle(self, live: list["Vm"], surplus: int) -> None:
        idle = [vm for vm in live if vm.name in self.idle_vms and vm.name not in self.item_by_vm][:surplus]
        if idle:
            log.info("queue drained; deleting %d idle VM(s)", len(idle))
            self.compute.delete_vms(idle)
            for vm in idle:
                self.idle_vms.discard(vm.name)



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
        WorkersRefused: GCE refuses every worker for good and none is alive.
        SchedulerGaveUp: the budget of failed steps in a row ran out.
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
