"""Scheduler.step() with its policies (lanes, backups, cost) against fake seams, stepped by hand with fake clocks."""

import logging
import types
from typing import Any

import pytest

from cflow import fleet, tasks
from cflow.backups import BackupPolicy, is_backup
from cflow.costs import CostCap
from cflow.gcp.pubsub import RunTopics
from cflow.lanes import StandardLane, StockoutFallback, preemptions_of
from cflow.protocol import DRAIN_ATTRIBUTE, LANE_ATTRIBUTE, STOP_ITEM_ATTRIBUTE
from cflow.scheduler import Policies, Scheduler
from tests.fakes import FakeCompute, FakeRunStorage, FakeSchedulerPubSub

RUN = "0101-0000-abcd"
PRICES = {"e2-small": {"standard": 36.0, "spot": 3.6}}  # $0.01 and $0.001 a second


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def spot_body():
    return {
        "machineType": "e2-small",
        "scheduling": dict(fleet.SPOT_SCHEDULING),
        "labels": {"cflow-run": RUN, "cflow-role": "worker", LANE_ATTRIBUTE: "spot"},
        "metadata": {"items": [{"key": LANE_ATTRIBUTE, "value": "spot"}]},
    }


def make_scheduler(item_count=10, workers=3, policies=None, threshold=3):
    config: Any = types.SimpleNamespace(worker_node_cnt=workers, zones=("us-central1-a", "us-central1-b"), vm_name_prefix="w", lease_seconds=30,
                                   spot_preemptions_before_standard=threshold)
    items = tasks.make_items([[f"in-{i}"] for i in range(item_count)])
    compute: Any = FakeCompute()
    pubsub: Any = FakeSchedulerPubSub()
    storage: Any = FakeRunStorage(RUN)
    clock, wall = Clock(1000.0), Clock(1_800_000_000.0)
    topics = RunTopics.for_run("p", RUN, "t", "s")
    scheduler = Scheduler(config, RUN, items, compute, pubsub, storage, topics, spot_body(), clock=clock, wall_clock=wall,
                          policies=policies or Policies())
    return scheduler, compute, pubsub, storage, clock, wall


def lanes_of(compute):
    return sorted((vm.labels.get(LANE_ATTRIBUTE), vm.spot) for vm in compute.vms.values())


# -- the standard lane -------------------------------------------------------------


def test_an_item_moved_off_spot_gets_a_standard_worker_which_goes_when_the_item_is_done():
    scheduler, compute, pubsub, storage, clock, _wall = make_scheduler(item_count=3, workers=3, policies=Policies(standard_lane=StandardLane(2)))
    scheduler.step()
    assert lanes_of(compute) == [("spot", True)] * 3
    vm = sorted(compute.vms)[0]
    # The hook moved item 000002 after its last preemption: its event says so.
    pubsub.pending_events.append({"type": "preempted", "vm": vm, "item": "000002", "attempt": 1, "preemptions": 3, "lane": "standard"})
    clock.advance(2)
    progress = scheduler.step()

    assert progress.standard_items == 1
    assert ("standard", False) in lanes_of(compute)
    standard = next(vm for vm in compute.vms.values() if vm.labels.get(LANE_ATTRIBUTE) == "standard")
    assert standard.spot is False

    storage.done.add("000002")
    pubsub.pending_events.append({"type": "done", "vm": standard.name, "item": "000002", "seconds": 5.0})
    clock.advance(2)
    scheduler.step()
    assert standard.name not in compute.vms  # no item left for it


def test_the_lane_markers_tell_a_resumed_scheduler_which_items_wait_for_standard_vms():
    scheduler, compute, _pubsub, storage, _clock, _wall = make_scheduler(item_count=5, workers=2, policies=Policies(standard_lane=StandardLane(1)))
    storage.lanes["standard"] = {"000001", "000003", "000004"}
    scheduler.refresh_markers()
    progress = scheduler.step()

    assert progress.standard_items == 3
    assert lanes_of(compute) == [("spot", True), ("spot", True), ("standard", False)]  # STANDARD_WORKERS_MAX = 1


def test_unfinished_items_are_published_again_each_to_its_lane_with_its_count():
    scheduler, _compute, pubsub, storage, _clock, _wall = make_scheduler(item_count=3, threshold=2)
    storage.lanes["standard"] = {"000001"}
    scheduler.refresh_markers()

    assert scheduler.publish_items(scheduler.unfinished_items()) == 3

    by_topic: dict[str, list[tuple[str, int, int]]] = {}
    for topic, data, attributes in pubsub.published:
        item, attempt = tasks.decode_message(data, attributes)
        by_topic.setdefault(topic.rsplit("/", 1)[-1], []).append((item.id, attempt, preemptions_of(attributes)))
    assert by_topic == {f"t-work-{RUN}": [("000000", 1, 0), ("000002", 1, 0)], f"t-standard-{RUN}": [("000001", 1, 2)]}


def test_every_zone_out_of_spot_for_the_minutes_creates_standard_workers_of_the_spot_lane(caplog):
    caplog.set_level(logging.INFO)
    scheduler, compute, _pubsub, _storage, clock, _wall = make_scheduler(workers=2, policies=Policies(stockout_fallback=StockoutFallback(5)))
    compute.stockout_zones.update({"us-central1-a", "us-central1-b"})

    def spot_only_stockout(zone, names, properties, request_id=None):
        if properties["scheduling"]["provisioningModel"] == "STANDARD":
            compute.stockout_zones.discard(zone)
        pending = original(zone, names, properties, request_id=request_id)
        compute.stockout_zones.add(zone)
        return pending

    original, compute.bulk_insert = compute.bulk_insert, spot_only_stockout
    for _ in range(4):
        scheduler.step()
        clock.advance(2)
    assert compute.vms == {}  # both zones out; not yet 5 minutes
    clock.advance(5 * 60)
    for _ in range(4):  # the zones' cooldowns are over: Spot is asked again in each, and refused again
        scheduler.step()
        clock.advance(2)
    spot_asked = [call for call in compute.calls if call[0] == "bulkInsert"]

    assert lanes_of(compute) == [("spot", False), ("spot", False)]
    assert len(spot_asked) == 5  # a, b; after the cooldowns a, b again; then the standard VMs
    assert sum("creating standard workers instead" in r.getMessage() for r in caplog.records) == 1
    assert scheduler.policies.stockout_fallback.summary_line == "standard workers created: every zone out of Spot capacity for 5 min"


# -- backups -------------------------------------------------------------------------


def drained_tail(scheduler, compute, pubsub, clock, wall):
    """Three workers: two items done in 10 s each, one more done, and item 000003 running on the first worker for 30 s."""
    scheduler.step()
    names = sorted(compute.vms)
    for item in ("000000", "000001", "000002"):
        pubsub.pending_events.append({"type": "done", "vm": names[1], "item": item, "seconds": 10.0})
    scheduler.done_ids.update({"000000", "000001", "000002"})
    pubsub.pending_events.append({"type": "started", "vm": names[0], "item": "000003", "attempt": 2, "time": wall.now})
    wall.advance(30)
    clock.advance(2)
    return names


def test_the_slowest_running_item_gets_one_backup_copy_once_the_queue_is_drained():
    policies = Policies(backups=BackupPolicy(enabled=True))
    scheduler, compute, pubsub, storage, clock, wall = make_scheduler(item_count=4, workers=3, policies=policies)
    names = drained_tail(scheduler, compute, pubsub, clock, wall)
    storage.done.update({"000000", "000001", "000002"})

    progress = scheduler.step()
    scheduler.step()  # at most one backup per item

    backups = [(topic, tasks.decode_message(data, attributes), attributes) for topic, data, attributes in pubsub.published]
    assert len(backups) == 1
    topic, (item, attempt), attributes = backups[0]
    assert topic == scheduler.topics.work_topic and item.id == "000003" and attempt == 2 and is_backup(attributes)
    assert progress.backups_launched == 1
    assert set(compute.vms) == set(names)  # the idle workers stay, for the backup

    # The backup copy wins on another worker: the original is told to stop.
    pubsub.pending_events += [{"type": "started", "vm": names[2], "item": "000003", "attempt": 2, "backup": True, "time": wall.now},
                              {"type": "done", "vm": names[2], "item": "000003", "seconds": 3.0, "backup": True}]
    storage.done.add("000003")
    clock.advance(2)
    scheduler.step()

    assert ("setMetadata", names[0], {STOP_ITEM_ATTRIBUTE: "000003"}) in compute.calls
    assert scheduler.progress.backups_won == 1 and scheduler.progress.finished


def test_no_backups_while_items_wait_in_the_queue_or_when_they_are_off():
    scheduler, compute, pubsub, _storage, clock, wall = make_scheduler(item_count=6, workers=3, policies=Policies(backups=BackupPolicy(enabled=True)))
    drained_tail(scheduler, compute, pubsub, clock, wall)  # items 000004 and 000005 wait in the queue
    scheduler.step()
    assert pubsub.published == []

    scheduler, compute, pubsub, _storage, clock, wall = make_scheduler(item_count=4, workers=3)  # BACKUP_TASKS = False
    drained_tail(scheduler, compute, pubsub, clock, wall)
    scheduler.step()
    assert pubsub.published == []


def test_when_the_original_wins_the_backup_copy_is_stopped():
    scheduler, compute, pubsub, storage, clock, wall = make_scheduler(item_count=4, workers=3, policies=Policies(backups=BackupPolicy(enabled=True)))
    names = drained_tail(scheduler, compute, pubsub, clock, wall)
    scheduler.step()
    pubsub.pending_events += [{"type": "started", "vm": names[1], "item": "000003", "attempt": 2, "backup": True, "time": wall.now},
                              {"type": "done", "vm": names[0], "item": "000003", "seconds": 31.0}]
    storage.done.update({"000000", "000001", "000002", "000003"})
    clock.advance(2)
    scheduler.step()

    assert ("setMetadata", names[1], {STOP_ITEM_ATTRIBUTE: "000003"}) in compute.calls
    assert scheduler.progress.backups_won == 0


# -- the cost cap --------------------------------------------------------------------


def test_at_the_cost_cap_no_vm_is_created_running_items_finish_and_the_rest_is_not_run(caplog):
    policies = Policies(cost_cap=CostCap(0.05, PRICES), standard_lane=StandardLane(2))
    scheduler, compute, pubsub, storage, clock, wall = make_scheduler(item_count=10, workers=2, policies=policies)
    scheduler.step()
    names = sorted(compute.vms)
    pubsub.pending_events += [{"type": "started", "vm": names[0], "item": "000000", "attempt": 1, "time": wall.now},
                              {"type": "started", "vm": names[1], "item": "000001", "attempt": 1, "time": wall.now}]
    clock.advance(30)  # 2 Spot VMs x 30 s x $0.001 = $0.06
    progress = scheduler.step()

    assert progress.cost_capped and not progress.finished
    assert sorted(call[1:] for call in compute.calls if call[0] == "setMetadata") == [(name, {DRAIN_ATTRIBUTE: "true"}) for name in names]
    assert set(compute.vms) == set(names)  # both still run an item
    assert sum("cost cap reached" in r.getMessage() for r in caplog.records) == 1

    # One finishes (its worker takes no new item): that VM goes; the other item still runs.
    storage.done.add("000000")
    pubsub.pending_events += [{"type": "done", "vm": names[0], "item": "000000", "seconds": 30.0}, {"type": "idle", "vm": names[0]}]
    clock.advance(2)
    progress = scheduler.step()
    assert set(compute.vms) == {names[1]} and not progress.finished
    assert compute.count("bulkInsert") == 1  # the first step's only: nothing replaced the deleted VM

    storage.done.add("000001")
    pubsub.pending_events += [{"type": "done", "vm": names[1], "item": "000001", "seconds": 32.0}]
    clock.advance(2)
    progress = scheduler.step()
    assert progress.finished and progress.done == 2 and progress.not_run == 8 and progress.failed == 0
    assert compute.vms == {}
    scheduler.write_vm_history()
    assert storage.account["cost_capped"] is True and storage.account["not_run"] == 8 and storage.account["cost_usd"] > 0.05


def test_vm_time_is_counted_by_machine_type_and_provisioning_model():
    scheduler, _compute, _pubsub, storage, clock, _wall = make_scheduler(item_count=3, workers=2, policies=Policies(
        standard_lane=StandardLane(1), cost_cap=CostCap(None, PRICES)))
    storage.lanes["standard"] = {"000002"}
    scheduler.refresh_markers()
    scheduler.step()
    clock.advance(10)
    progress = scheduler.step()

    seconds = {(kind.machine_type, kind.spot): value for kind, value in scheduler.cost_meter.seconds.items()}
    assert seconds == {("e2-small", True): 20.0, ("e2-small", False): 10.0}
    assert progress.cost_usd == pytest.approx(20 * 0.001 + 10 * 0.01)
    assert scheduler.vm_seconds == 30.0


def test_a_preempted_vm_is_replaced_at_once_not_at_the_next_interval():
    scheduler, _compute, pubsub, _storage, clock, _wall = make_scheduler(item_count=6, workers=2)
    scheduler.step()
    batches = [[], [{"type": "preempted", "vm": "w-1", "item": "000001", "attempt": 1}]]

    def drain(subscription, max_messages=1000, timeout=0.5):
        clock.advance(0.05)
        return batches.pop(0) if batches else []

    pubsub.drain_events = drain
    started = clock.now
    scheduler.wait(2.0, sleep=clock.advance)
    assert clock.now - started < 0.5  # two pulls, then back to step


def test_the_wait_between_steps_ends_when_a_backup_falls_due():
    scheduler, compute, pubsub, storage, clock, wall = make_scheduler(item_count=4, workers=3, policies=Policies(backups=BackupPolicy(enabled=True)))
    scheduler.step()
    names = sorted(compute.vms)
    for item in ("000000", "000001", "000002"):
        pubsub.pending_events.append({"type": "done", "vm": names[1], "item": item, "seconds": 10.0})
    storage.done.update({"000000", "000001", "000002"})
    pubsub.pending_events.append({"type": "started", "vm": names[0], "item": "000003", "attempt": 1, "time": wall.now})
    scheduler.refresh_markers()
    wall.advance(19.5)  # due at 20 s (twice the median)
    scheduler.step()
    assert pubsub.published == []

    def drain(subscription, max_messages=1000, timeout=0.5):
        clock.advance(timeout)
        wall.advance(timeout)
        return []

    def sleep(seconds):
        clock.advance(seconds)
        wall.advance(seconds)

    pubsub.drain_events = drain
    started = clock.now
    scheduler.wait(2.0, sleep=sleep)
    assert clock.now - started == pytest.approx(0.5)
    scheduler.step()
    assert len(pubsub.published) == 1
