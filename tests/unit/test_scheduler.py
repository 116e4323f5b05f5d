"""Scheduler.step() against fake seams, stepped by hand with a fake clock."""

import types

import pytest

from cflow import tasks
from cflow.gcp.pubsub import RunTopics
from cflow.scheduler import EVENT_POLL_SECONDS, Scheduler
from tests.fakes import FakeCompute, FakeRunStorage, FakeSchedulerPubSub, received

RUN = "0101-0000-abcd"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make_scheduler(item_count=10, workers=3, zones=("us-central1-a", "us-central1-b")):
    config = types.SimpleNamespace(worker_node_cnt=workers, zones=zones, vm_name_prefix="w", lease_seconds=30)
    items = tasks.make_items([[f"in-{i}"] for i in range(item_count)])
    compute, pubsub, storage, clock = FakeCompute(), FakeSchedulerPubSub(), FakeRunStorage(), Clock()
    topics = RunTopics.for_run("p", RUN, "t", "s")
    scheduler = Scheduler(config, RUN, items, compute, pubsub, storage, topics, {"machineType": "e2-small"}, clock=clock)
    return scheduler, compute, pubsub, storage, clock


def test_first_step_creates_workers_with_one_list_and_one_bulk_insert():
    scheduler, compute, *_ = make_scheduler(item_count=10, workers=3)
    scheduler.step()
    assert compute.count("list") == 1
    assert compute.calls[1] == ("bulkInsert", "us-central1-a", (f"w-{RUN}-0001", f"w-{RUN}-0002", f"w-{RUN}-0003"))


def test_fleet_is_never_larger_than_items_left():
    scheduler, compute, *_ = make_scheduler(item_count=2, workers=5)
    scheduler.step()
    assert len(compute.vms) == 2


def test_steady_fleet_makes_no_create_or_delete_calls():
    scheduler, compute, *_ = make_scheduler()
    scheduler.step()
    compute.calls.clear()
    scheduler.step()
    assert [c[0] for c in compute.calls] == ["list"]


def test_preempted_vm_is_deleted_and_replaced_under_a_new_name():
    scheduler, compute, pubsub, _storage, _clock = make_scheduler(workers=2)
    scheduler.step()
    compute.set_status(f"w-{RUN}-0001", "TERMINATED", "Instance was preempted.")
    pubsub.pending_events.append({"type": "preempted", "vm": f"w-{RUN}-0001", "item": "000003"})
    scheduler.step()
    assert ("delete", (f"w-{RUN}-0001",)) in compute.calls
    # replaced in the same step, under a name never used before in the run
    assert f"w-{RUN}-0003" in compute.vms and len(compute.vms) == 2
    assert scheduler.progress.preemptions == 1


def test_stockout_moves_creation_to_the_next_zone():
    scheduler, compute, _pubsub, _storage, _clock = make_scheduler(workers=2)
    compute.stockout_zones.add("us-central1-a")
    scheduler.step()  # asks us-central1-a
    scheduler.step()  # sees the stockout; asks us-central1-b
    zones = [c[1] for c in compute.calls if c[0] == "bulkInsert"]
    assert zones == ["us-central1-a", "us-central1-b"]
    assert {vm.zone for vm in compute.vms.values()} == {"us-central1-b"}


def test_quota_refusal_is_retried_later_at_a_smaller_size(caplog):
    scheduler, compute, _pubsub, _storage, clock = make_scheduler(workers=4)
    compute.quota_left = 2
    scheduler.step()
    scheduler.step()  # within the cooldown: no new attempt
    assert compute.count("bulkInsert") == 1
    clock.now += 61
    scheduler.step()
    assert len(compute.vms) == 2
    assert sum("Quota 'CPUS' exceeded" in r.getMessage() for r in caplog.records) == 1


def test_done_markers_finish_the_run_and_delete_the_fleet():
    scheduler, compute, _pubsub, storage, clock = make_scheduler(item_count=3, workers=3)
    scheduler.step()
    storage.done.update(item.id for item in scheduler.items)  # markers whose events were lost
    clock.now += 31  # the periodic listing finds them
    progress = scheduler.step()
    assert progress.finished and progress.done == 3
    assert compute.vms == {}


def test_done_events_keep_counts_without_listing_markers_every_step():
    scheduler, _compute, pubsub, storage, clock = make_scheduler(item_count=5, workers=2)
    scheduler.step()
    listings = storage.listings
    for item in scheduler.items[:2]:
        storage.done.add(item.id)
        pubsub.pending_events.append({"type": "done", "vm": "v", "item": item.id})
    clock.now += 2
    progress = scheduler.step()
    assert progress.done == 2
    assert storage.listings == listings  # counted from events, no listing


def test_finish_is_confirmed_from_the_markers_not_only_events():
    scheduler, compute, pubsub, storage, clock = make_scheduler(item_count=2, workers=2)
    scheduler.step()
    storage.done.add(scheduler.items[0].id)
    # events claim both done, but only one marker exists (e.g. a forged or early event)
    pubsub.pending_events += [{"type": "done", "vm": "v", "item": item.id} for item in scheduler.items]
    clock.now += 2
    progress = scheduler.step()
    assert not progress.finished and progress.done == 1
    assert len(compute.vms) == 2  # not torn down: an item is still unfinished


def test_idle_vms_are_deleted_once_queue_is_drained():
    scheduler, compute, pubsub, storage, _clock = make_scheduler(item_count=4, workers=4)
    scheduler.step()
    names = sorted(compute.vms)
    storage.done.update(item.id for item in scheduler.items[:3])
    pubsub.pending_events += [{"type": "done", "vm": names[1], "item": item.id} for item in scheduler.items[:3]]
    pubsub.pending_events += [
        {"type": "started", "vm": names[0], "item": "000003"},
        {"type": "idle", "vm": names[1]},
        {"type": "idle", "vm": names[2]},
        {"type": "idle", "vm": names[3]},
    ]
    scheduler.step()
    assert names[0] in compute.vms  # still working on the last item
    assert len(compute.vms) == 1


def test_a_vm_whose_next_item_started_before_its_last_result_is_still_busy():
    scheduler, compute, pubsub, storage, _clock = make_scheduler(item_count=2, workers=2)
    scheduler.step()
    names = sorted(compute.vms)
    storage.done.add("000000")
    # The worker records 000000's result while 000001 already runs: the events come in that order.
    pubsub.pending_events += [
        {"type": "started", "vm": names[0], "item": "000000"},
        {"type": "started", "vm": names[0], "item": "000001"},
        {"type": "done", "vm": names[0], "item": "000000"},
        {"type": "idle", "vm": names[1]},
    ]
    progress = scheduler.step()
    assert progress.running == 1
    assert names[0] in compute.vms and names[1] not in compute.vms


def test_dead_lettered_item_is_recorded_failed():
    scheduler, _compute, pubsub, storage, _clock = make_scheduler(item_count=2)
    pubsub.dead.append(received(scheduler.items[1], 1, ack_id="dead-1"))
    progress = scheduler.step()
    assert storage.failed == {scheduler.items[1].id}
    assert progress.failed == 1
    assert ("ack", ("dead-1",)) in pubsub.calls


def test_unfinished_items_skip_done_and_failed():
    scheduler, _compute, _pubsub, storage, _clock = make_scheduler(item_count=4)
    storage.done.add(scheduler.items[0].id)
    storage.failed.add(scheduler.items[2].id)
    scheduler.refresh_markers()
    assert [i.id for i in scheduler.unfinished_items()] == [scheduler.items[1].id, scheduler.items[3].id]


# -- cancel, lost queues, and Compute faults ----------------------------------

from cflow.errors import NotFound, TransientError, ZoneStockout  # noqa: E402
from cflow.scheduler import RunCancelled  # noqa: E402


def test_cancelled_run_stops_the_step_before_anything_is_created():
    scheduler, compute, _pubsub, storage, _clock = make_scheduler()
    storage.cancelled = {"time": 1.0}
    with pytest.raises(RunCancelled, match=f"run {RUN} was cancelled"):
        scheduler.step()
    assert compute.count("bulkInsert") == 0


def test_cancel_landing_mid_step_is_reported_as_cancelled_not_as_a_lost_queue():
    scheduler, _compute, pubsub, storage, _clock = make_scheduler()

    def cancelled_meanwhile(subscription, max_messages=1000, timeout=0.5):
        storage.cancelled = {"time": 1.0}
        raise NotFound("Pub/Sub refused a request: Subscription does not exist")

    pubsub.drain_events = cancelled_meanwhile
    with pytest.raises(RunCancelled):
        scheduler.step()
    assert ("create-topics", 30) not in pubsub.calls and pubsub.published == []


def test_lost_queue_is_recreated_and_unfinished_items_published_again():
    scheduler, compute, pubsub, storage, _clock = make_scheduler(item_count=4)
    storage.done.add(scheduler.items[0].id)
    storage.failed.add(scheduler.items[1].id)
    pubsub.subscriptions_exist = False

    scheduler.step()

    assert ("create-topics", 30) in pubsub.calls
    republished = [tasks.decode_message(data, attributes) for _, data, attributes in pubsub.published]
    assert republished == [(scheduler.items[2], 1), (scheduler.items[3], 1)]
    assert compute.count("bulkInsert") == 1  # the step carried on


def test_every_zone_out_of_capacity_is_reported_once(caplog):
    scheduler, compute, _pubsub, _storage, clock = make_scheduler(workers=2)
    compute.stockout_zones.update({"us-central1-a", "us-central1-b"})
    for _ in range(6):
        scheduler.step()
        clock.now += 2
    assert sum("every configured zone is out of capacity" in r.getMessage() for r in caplog.records) == 1
    assert [c[1] for c in compute.calls if c[0] == "bulkInsert"] == ["us-central1-a", "us-central1-b"]
    clock.now += 121
    compute.stockout_zones.clear()
    scheduler.step()
    assert len(compute.vms) == 2


def test_stockout_refused_at_once_moves_to_the_next_zone():
    scheduler, compute, _pubsub, _storage, _clock = make_scheduler(workers=2)
    insert = compute.bulk_insert

    def refuse_in_a(zone, names, properties, request_id=None):
        if zone == "us-central1-a":
            compute.calls.append(("bulkInsert", zone, tuple(names)))
            raise ZoneStockout("zone us-central1-a: does not have enough resources")
        return insert(zone, names, properties, request_id)

    compute.bulk_insert = refuse_in_a
    scheduler.step()
    scheduler.step()
    assert {vm.zone for vm in compute.vms.values()} == {"us-central1-b"}


def test_compute_error_on_create_is_logged_once_and_retried_after_a_backoff(caplog):
    scheduler, compute, _pubsub, _storage, clock = make_scheduler(workers=2)
    error = TransientError("Compute Engine refused a request: Backend error", status=503, reason="backendError", message="Backend error")
    asked = []
    compute.bulk_insert = lambda zone, names, properties, request_id=None: (asked.append(zone), (_ for _ in ()).throw(error))
    scheduler.step()
    scheduler.step()
    assert sum("Backend error" in r.getMessage() for r in caplog.records) == 1
    assert len(asked) == 1  # the seam retried already: the next step waits out the backoff
    clock.now += 5.01
    scheduler.step()
    assert len(asked) == 2


class EventFeed:
    """drain_events for Scheduler.wait: hands out batches in turn; with none left, the pull times out (the clock moves)."""

    def __init__(self, clock, batches):
        self.clock = clock
        self.batches = list(batches)
        self.timeouts = []

    def __call__(self, subscription, max_messages=1000, timeout=0.5):
        self.timeouts.append(timeout)
        if self.batches:
            self.clock.now += 0.05
            return self.batches.pop(0)
        self.clock.now += timeout
        return []


def test_wait_returns_as_soon_as_the_events_show_every_item_ended():
    scheduler, _compute, pubsub, storage, clock = make_scheduler(item_count=2, workers=2)
    scheduler.step()
    started = clock.now
    feed = EventFeed(clock, [[{"type": "done", "vm": "w-1", "item": "000000"}],
                             [{"type": "failed", "vm": "w-2", "item": "000001", "attempt": 3}]])
    pubsub.drain_events = feed

    def sleep(seconds):
        clock.now += seconds

    scheduler.wait(2.0, sleep=sleep)

    # Two pulls a poll interval apart, then it stopped waiting: not the whole 2 s.
    assert clock.now - started == pytest.approx(EVENT_POLL_SECONDS + 0.05)
    assert len(feed.timeouts) == 2
    storage.done.add("000000")
    storage.failed.add("000001")
    assert scheduler.step().finished


def test_wait_reads_events_until_the_interval_ends_while_items_are_left():
    scheduler, _compute, pubsub, _storage, clock = make_scheduler(item_count=3, workers=2)
    scheduler.step()
    started = clock.now

    feed = EventFeed(clock, [[{"type": "done", "vm": "w-1", "item": "000000"}]] + [[]] * 40)
    pubsub.drain_events = feed

    def sleep(seconds):
        clock.now += seconds

    scheduler.wait(2.0, sleep=sleep)

    assert clock.now - started == pytest.approx(2.0)
    assert scheduler.done_ids == {"000000"}
    # Pulls that come back at once do not spin: at most one per EVENT_POLL_SECONDS.
    assert len(feed.timeouts) <= 2.0 / EVENT_POLL_SECONDS + 1


def test_wait_sleeps_out_the_interval_when_events_cannot_be_read():
    scheduler, _compute, pubsub, _storage, clock = make_scheduler(item_count=3, workers=2)
    scheduler.step()

    def gone(subscription, max_messages=1000, timeout=0.5):
        clock.now += 0.01
        raise NotFound("Pub/Sub refused a request: Subscription does not exist")

    pubsub.drain_events = gone
    slept = []
    scheduler.wait(2.0, sleep=slept.append)
    assert slept == [pytest.approx(1.99)]


# -- the run loop's failure budget ---------------------------------------------

from cflow.scheduler import SchedulerGaveUp, StepFailureBudget, run_steps  # noqa: E402


class FlakySteps:
    """Stands in for Scheduler.step: plays the outcomes it is given in turn (an error to raise,
    "ok", or "done" for the step that finds every item ended), then "ok" for ever."""

    def __init__(self, scheduler, outcomes):
        self.scheduler = scheduler
        self.outcomes = list(outcomes)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome == "done":
            self.scheduler.progress.done = self.scheduler.progress.total
        return self.scheduler.progress


def test_failed_steps_back_off_and_a_good_step_resets_the_count(caplog):
    scheduler, _compute, _pubsub, _storage, clock = make_scheduler(item_count=1, workers=1)
    outage = TransientError("Compute Engine refused a request: unavailable", status=503)
    scheduler.step = FlakySteps(scheduler, [outage, outage, "ok", outage, outage, outage, "done"])
    slept, shown = [], []

    def sleep(seconds):
        slept.append(seconds)
        clock.now += seconds

    scheduler.wait = lambda seconds, sleep: sleep(seconds)
    progress = run_steps(scheduler, shown.append, step_interval=2.0, sleep=sleep)

    assert progress.finished
    # 2 and 4 s after the first two failures; the step interval; then 2, 4, 8 s: the good step started the count anew.
    assert slept == [2.0, 4.0, 2.0, 2.0, 4.0, 8.0]
    assert len(shown) == 2
    warnings = [r.getMessage() for r in caplog.records if "the scheduler's step failed" in r.getMessage()]
    assert len(warnings) == 5 and "Compute Engine refused a request: unavailable" in warnings[0]


def test_five_failed_steps_in_a_row_end_the_run_in_one_line_saying_how_to_resume():
    scheduler, *_ = make_scheduler()
    scheduler.step = FlakySteps(scheduler, [KeyError("vm"), *[TransientError("Pub/Sub refused a request:\nunavailable")] * 10])
    slept = []

    with pytest.raises(SchedulerGaveUp) as caught:
        run_steps(scheduler, lambda progress: None, step_interval=2.0, sleep=slept.append)

    text = str(caught.value)
    assert scheduler.step.calls == 5 and slept == [2.0, 4.0, 8.0, 16.0]
    assert "\n" not in text
    assert text == (f"run {RUN}: the scheduler's step failed 5 times in a row (last: Pub/Sub refused a request: unavailable); "
                    f"the run is left as it is: carry on with `python3 scheduler.py --resume {RUN}` or stop it with `cflow cancel {RUN}`")


def test_a_cancel_ends_the_loop_at_once_without_using_the_budget():
    scheduler, _compute, _pubsub, storage, _clock = make_scheduler()
    storage.cancelled = {"time": 1.0}
    slept = []
    with pytest.raises(RunCancelled):
        run_steps(scheduler, lambda progress: None, step_interval=2.0, sleep=slept.append)
    assert slept == []


def test_the_budget_waits_are_capped():
    budget = StepFailureBudget(RUN, max_consecutive=10)
    waits = [budget.failed(RuntimeError("x")) for _ in range(9)]
    assert waits == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0, 60.0]


# -- GCE's refusals when creating workers -------------------------------------------

from cflow.errors import EXIT_USAGE, PermanentRequestError, QuotaExceeded, WorkersRefused  # noqa: E402
from cflow.gcp.errors import classify_operation_error  # noqa: E402


def refusing_operations(compute, entry):
    """bulkInsert is accepted, and its operation ends with ``entry`` as its error (nothing created)."""

    def bulk_insert(zone, names, properties, request_id=None):
        compute.calls.append(("bulkInsert", zone, tuple(names)))
        operation = f"op-{len(compute.calls)}"
        compute.pending_results[operation] = [classify_operation_error(entry, zone)]
        from cflow.gcp.compute import PendingCreation

        return PendingCreation(zone=zone, operation=operation, names=tuple(names))

    compute.bulk_insert = bulk_insert


def test_a_quota_refused_inside_the_operation_cools_down_creation_instead_of_asking_every_step(caplog):
    scheduler, compute, _pubsub, _storage, clock = make_scheduler(workers=3)
    refusing_operations(compute, {"code": "QUOTA_EXCEEDED", "message": "Quota 'IN_USE_ADDRESSES' exceeded.  Limit: 2.0 in region us-central1."})
    for _ in range(5):
        scheduler.step()
        clock.now += 2
    assert compute.count("bulkInsert") == 1
    assert sum("IN_USE_ADDRESSES" in r.getMessage() for r in caplog.records) == 1
    clock.now += 60
    scheduler.step()
    assert compute.calls[-1][0] == "bulkInsert" and len(compute.calls[-1][2]) == 1  # asked again, for half as many


def test_a_refusal_no_retry_mends_with_no_worker_alive_ends_the_run_in_one_line_naming_the_setting():
    scheduler, compute, _pubsub, _storage, _clock = make_scheduler(workers=2)
    scheduler.config = types.SimpleNamespace(**vars(scheduler.config), vm_network="default", vm_zone="us-central1-a", vm_boot="stock")
    refusing_operations(compute, {"code": "CONDITION_NOT_MET", "message": "Constraint constraints/compute.vmExternalIpAccess "
                                  "violated for project 1. Add instance projects/p/zones/us-central1-a/instances/w to the constraint."})
    scheduler.step()  # asks; the operation is refused
    with pytest.raises(WorkersRefused) as caught:
        scheduler.step()
    refused = caught.value
    assert refused.exit_status == EXIT_USAGE and refused.setting == "VM_EXTERNAL_IP"
    assert str(refused).startswith("VM_EXTERNAL_IP: Compute Engine refused to create the run's workers (GCE: CONDITION_NOT_MET: "
                                   "Constraint constraints/compute.vmExternalIpAccess violated")
    assert "\n" not in str(refused)
    assert compute.count("bulkInsert") == 1


def test_a_refusal_no_retry_mends_with_workers_alive_stops_creating_and_carries_on_with_them():
    scheduler, compute, _pubsub, _storage, clock = make_scheduler(item_count=10, workers=3)
    compute.quota_left = 2
    scheduler.step()  # 3 asked: the quota refuses at once
    clock.now += 61
    scheduler.step()  # 1 asked (halved), created
    assert len(compute.vms) == 1
    error = PermanentRequestError("Compute Engine refused a request: Invalid value for field 'resource.machineType'",
                                  status=400, reason="invalid", message="Invalid value for field 'resource.machineType'")
    compute.bulk_insert = lambda zone, names, properties, request_id=None: (_ for _ in ()).throw(error)
    clock.now += 61
    scheduler.step()
    for _ in range(3):
        clock.now += 200
        scheduler.step()  # no raise: a worker is alive and keeps working
    assert scheduler.policy.stopped is not None and len(compute.vms) == 1


def test_the_fleet_never_exceeds_what_the_preflight_said_fits():
    scheduler, compute, *_ = make_scheduler(item_count=10, workers=6)
    scheduler.max_workers = 2
    scheduler.step()
    assert len(compute.vms) == 2


def test_every_bulk_insert_carries_the_request_id_of_its_run_zone_and_names():
    from cflow import fleet

    scheduler, compute, *_ = make_scheduler(workers=2)
    scheduler.step()
    assert compute.request_ids == [fleet.creation_request_id(RUN, "us-central1-a", [f"w-{RUN}-0001", f"w-{RUN}-0002"])]


def test_a_quota_at_zero_everywhere_ends_the_run_even_before_any_worker():
    scheduler, compute, *_ = make_scheduler(workers=2, zones=("us-central1-a",))
    scheduler.config = types.SimpleNamespace(**vars(scheduler.config), vm_network="default", vm_zone="us-central1-a", vm_boot="stock")

    def refuse(zone, names, properties, request_id=None):
        compute.calls.append(("bulkInsert", zone, tuple(names)))
        raise QuotaExceeded("quota", metric="PREEMPTIBLE_CPUS", region="us-central1", limit=0.0, reason="quotaExceeded",
                            message="Quota 'PREEMPTIBLE_CPUS' exceeded.  Limit: 0.0 in region us-central1.")

    compute.bulk_insert = refuse
    with pytest.raises(WorkersRefused, match=r"^no worker fits the PREEMPTIBLE_CPUS quota in us-central1 \(limit 0\)"):
        scheduler.step()
        scheduler.step()


def test_workers_refused_for_good_end_the_loop_at_once_without_using_the_budget():
    scheduler, *_ = make_scheduler()
    refused = WorkersRefused("VM_NETWORK: refused", PermanentRequestError("x"), "VM_NETWORK")
    scheduler.step = FlakySteps(scheduler, [refused])
    slept = []
    with pytest.raises(WorkersRefused):
        run_steps(scheduler, lambda progress: None, step_interval=2.0, sleep=slept.append)
    assert slept == [] and scheduler.step.calls == 1
