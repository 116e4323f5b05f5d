"""The policy objects of lanes, backups and cost (cflow.lanes, cflow.backups, cflow.costs), alone, with times passed in."""

import json
import logging

import pytest

from cflow import fleet
from cflow.backups import BackupLedger, BackupPolicy, backup_attributes, is_backup
from cflow.costs import CostCap, CostMeter, VmKind, cap_line, worst_case
from cflow.lanes import StandardLane, StockoutFallback, lane_after_preemption, lane_of_labels, preemptions_of, with_preemptions
from cflow.protocol import ATTR_PREEMPTIONS, LANE_ATTRIBUTE, Lane

# -- lanes ----------------------------------------------------------------------


def test_the_preemption_count_travels_in_the_message_attributes():
    attributes = {"cflow_item": "000001", "cflow_attempt": "2"}
    assert preemptions_of(attributes) == 0
    counted = with_preemptions(attributes, 2)
    assert counted == {**attributes, ATTR_PREEMPTIONS: "2"} and attributes == {"cflow_item": "000001", "cflow_attempt": "2"}
    assert preemptions_of(counted) == 2
    assert preemptions_of({ATTR_PREEMPTIONS: "-1"}) == 0 and preemptions_of({ATTR_PREEMPTIONS: "x"}) == 0 and preemptions_of(None) == 0


@pytest.mark.parametrize("preemptions, threshold, lane", [
    (1, 3, Lane.SPOT), (2, 3, Lane.SPOT), (3, 3, Lane.STANDARD), (4, 3, Lane.STANDARD), (1, 1, Lane.STANDARD), (50, None, Lane.SPOT),
])
def test_an_item_moves_to_the_standard_lane_at_the_threshold_and_never_without_one(preemptions, threshold, lane):
    assert lane_after_preemption(preemptions, threshold) == lane


def test_a_vm_without_the_lane_label_is_of_the_spot_lane():
    assert lane_of_labels({}) == Lane.SPOT
    assert lane_of_labels({LANE_ATTRIBUTE: "standard"}) == Lane.STANDARD
    assert lane_of_labels({LANE_ATTRIBUTE: "spot"}) == Lane.SPOT


def test_the_standard_fleet_lives_only_while_its_items_do():
    lane = StandardLane(max_workers=2)
    assert [lane.wanted(n) for n in (0, 1, 2, 5)] == [0, 1, 2, 2]
    assert StandardLane(0).wanted(3) == 0


def test_stockout_fallback_begins_after_the_minutes_says_so_once_and_ends_with_spot_capacity(caplog):
    caplog.set_level(logging.INFO)
    fallback = StockoutFallback(minutes=10)
    assert not fallback.use_standard(0.0)  # no stockout yet
    fallback.all_zones_out(100.0)
    fallback.all_zones_out(200.0)  # still out: the clock runs from the first time
    assert not fallback.use_standard(100.0 + 599)
    assert fallback.use_standard(100.0 + 600) and fallback.use_standard(100.0 + 700)
    lines = [r.getMessage() for r in caplog.records if "creating standard workers instead" in r.getMessage()]
    assert lines == ["every zone has been out of Spot capacity for 10 min (SPOT_STOCKOUT_FALLBACK_MINUTES = 10): creating standard workers instead"]
    assert fallback.summary_line == "standard workers created: every zone out of Spot capacity for 10 min"
    fallback.spot_created()
    assert not fallback.use_standard(1000.0)
    assert fallback.summary_line is not None  # it did happen in this run


def test_no_stockout_fallback_without_the_setting():
    fallback = StockoutFallback(minutes=None)
    fallback.all_zones_out(0.0)
    assert not fallback.use_standard(10**9) and fallback.summary_line is None


def spot_body():
    return {
        "machineType": "e2-small",
        "scheduling": {**fleet.SPOT_SCHEDULING, "maxRunDuration": {"seconds": 86400}},
        "labels": {"cflow-run": "r", "cflow-role": "worker", LANE_ATTRIBUTE: "spot"},
        "metadata": {"items": [{"key": "cflow-run", "value": "r"}, {"key": LANE_ATTRIBUTE, "value": "spot"}]},
    }


def test_a_standard_lane_body_is_a_standard_vm_labelled_and_told_its_lane():
    body = spot_body()
    variant = fleet.lane_variant(body, Lane.STANDARD, spot=False)

    assert variant["scheduling"] == {"provisioningModel": "STANDARD", "onHostMaintenance": "MIGRATE", "automaticRestart": True,
                                     "maxRunDuration": {"seconds": 86400}, "instanceTerminationAction": "DELETE"}
    assert variant["labels"][LANE_ATTRIBUTE] == "standard"
    assert {"key": LANE_ATTRIBUTE, "value": "standard"} in variant["metadata"]["items"]
    assert sum(1 for item in variant["metadata"]["items"] if item["key"] == LANE_ATTRIBUTE) == 1
    assert body == spot_body()  # the run's own body is left as it was


def test_a_standard_vm_of_the_spot_lane_pulls_the_spot_queue():
    variant = fleet.lane_variant(spot_body(), Lane.SPOT, spot=False)
    assert variant["scheduling"]["provisioningModel"] == "STANDARD" and variant["labels"][LANE_ATTRIBUTE] == "spot"
    again = fleet.lane_variant(variant, Lane.SPOT, spot=True)
    assert {k: v for k, v in again["scheduling"].items() if k != "maxRunDuration"} == fleet.SPOT_SCHEDULING



def test_a_standard_lane_body_with_gpus_keeps_terminate_on_host_maintenance():
    # GCE refuses MIGRATE for a VM with GPUs, standard VMs included.
    body = {**spot_body(), "guestAccelerators": [{"acceleratorType": "nvidia-tesla-t4", "acceleratorCount": 1}]}
    variant = fleet.lane_variant(body, Lane.STANDARD, spot=False)
    assert variant["scheduling"]["provisioningModel"] == "STANDARD"
    assert variant["scheduling"]["onHostMaintenance"] == "TERMINATE"
    assert variant["guestAccelerators"] == body["guestAccelerators"]
    assert fleet.lane_variant(spot_body(), Lane.STANDARD, spot=False)["scheduling"]["onHostMaintenance"] == "MIGRATE"

# -- backups ----------------------------------------------------------------------


def test_a_backup_copy_is_marked_in_its_attributes():
    attributes = {"cflow_item": "000001", "cflow_attempt": "1"}
    assert not is_backup(attributes) and not is_backup(None)
    assert is_backup(backup_attributes(attributes)) and not is_backup(attributes)


def policy_with_times(*seconds, enabled=True):
    policy = BackupPolicy(enabled=enabled)
    for value in seconds:
        policy.item_done(value)
    return policy


def test_backups_go_to_the_items_far_beyond_the_median_longest_first_and_no_more_than_idle_workers():
    policy = policy_with_times(10, 10, 12)  # median 10 s: a backup after 20 s
    running = {"a": 1000 - 25, "b": 1000 - 19, "c": 1000 - 40, "d": 1000 - 30}

    assert policy.choose(running, idle_workers=2, backed_up=set(), now=1000) == ["c", "d"]
    assert policy.choose(running, idle_workers=5, backed_up={"c"}, now=1000) == ["d", "a"]  # at most one backup each; b is not slow
    assert policy.choose(running, idle_workers=0, backed_up=set(), now=1000) == []


def test_no_backups_when_disabled_or_before_the_median_means_anything():
    running = {"a": 0.0}
    assert policy_with_times(1, 1, 1, enabled=False).choose(running, 3, set(), now=100) == []
    assert policy_with_times(1, 1).choose(running, 3, set(), now=100) == []  # two item times: no median yet
    assert policy_with_times(1, 1, 1).choose(running, 3, set(), now=100) == ["a"]


def test_the_ledger_counts_copies_waiting_for_a_worker_and_the_ones_that_won():
    ledger = BackupLedger()
    ledger.published("a")
    ledger.published("b")
    assert ledger.waiting == {"a", "b"}
    ledger.started("a")
    ledger.finished("b", by_backup=False)  # the original won before any worker took b's copy
    assert ledger.waiting == set()
    ledger.finished("a", by_backup=True)
    assert ledger.won == 1 and ledger.launched == {"a", "b"}


# -- cost -------------------------------------------------------------------------

PRICES = {"e2-small": {"standard": 36.0, "spot": 3.6}}  # $0.01 and $0.001 a second


def test_the_meter_counts_vm_time_by_kind_from_one_step_to_the_next_and_prices_it():
    spot, standard = VmKind("e2-small", True), VmKind("e2-small", False)
    meter = CostMeter()
    meter.account([spot, spot], now=100.0)  # the first step only starts the clock
    assert meter.total_seconds == 0
    meter.account([spot, spot, standard], now=110.0)
    meter.account([standard], now=115.0)
    assert meter.seconds == {spot: 20.0, standard: 15.0}
    assert meter.cost(PRICES) == pytest.approx(20 * 0.001 + 15 * 0.01)
    assert meter.cost({}) is None  # PRICES cannot count it

    again = CostMeter()
    again.restore(meter.to_document())
    again.restore([{"machine_type": "x"}])  # malformed: skipped
    assert again.seconds == meter.seconds


def test_the_meter_prices_a_vms_gpus_with_its_machine_type():
    prices = {**PRICES, "nvidia-tesla-t4": {"standard": 72.0, "spot": 7.2}}  # $0.02 and $0.002 a second
    with_gpus = VmKind("e2-small", True, (("nvidia-tesla-t4", 2),))
    assert with_gpus.label == "e2-small + 2 x nvidia-tesla-t4, Spot"
    assert with_gpus.hourly_price(prices) == pytest.approx(3.6 + 2 * 7.2)
    assert with_gpus.hourly_price(PRICES) is None  # PRICES lacks the GPU: no estimate, not a cheaper one
    meter = CostMeter()
    meter.account([with_gpus], now=0.0)
    meter.account([with_gpus], now=10.0)
    assert meter.cost(prices) == pytest.approx(10 * (0.001 + 2 * 0.002))
    again = CostMeter()
    again.restore(meter.to_document())
    assert again.seconds == {with_gpus: 10.0}


def test_the_cap_is_reached_at_its_cost_and_never_without_one():
    meter = CostMeter()
    meter.account([VmKind("e2-small", False)], now=0.0)
    meter.account([VmKind("e2-small", False)], now=4.0)  # $0.04
    assert not CostCap(0.05, PRICES).reached(meter)
    meter.account([VmKind("e2-small", False)], now=5.0)  # $0.05
    assert CostCap(0.05, PRICES).reached(meter)
    assert not CostCap(None, PRICES).reached(meter)


def test_the_dry_run_shows_the_cap_against_the_worst_case():
    # 10 items on 4 workers: 3 rounds, 2 attempts of at most 1 hour, $1 an hour for the fleet.
    assert worst_case(1.0, 4, 10, 2, 3600) == pytest.approx(6.0)
    assert cap_line(10.0, 6.0) == "$10.00 (MAX_COST_USD); the worst case, $6.00, is within it"
    assert cap_line(5.0, 6.0).startswith("$5.00 (MAX_COST_USD); the worst case, $6.00, is above it: at the cap the run stops creating")
    assert cap_line(5.0, None) == "$5.00 (MAX_COST_USD); no worst case to compare it with"


# -- the settings, and the dry run -------------------------------------------------------

import io  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

from cflow.config import load_config  # noqa: E402
from cflow.errors import ConfigError  # noqa: E402
from cflow.run import dry_run  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def settings_file(tmp_path, body):
    (tmp_path / "task").mkdir(exist_ok=True)
    (tmp_path / "task" / "task.sh").write_text("#!/bin/bash\n")
    (tmp_path / "tasks.txt").write_text("".join(f"item-{n}\n" for n in range(10)))
    shutil.copy2(REPO / "init.sh", tmp_path / "init.sh")
    path = tmp_path / "const.py"
    path.write_text(body)
    return path


@pytest.mark.parametrize("body, message", [
    ("SPOT_PREEMPTIONS_BEFORE_STANDARD = 0", "SPOT_PREEMPTIONS_BEFORE_STANDARD must be None or a positive integer, got 0"),
    ("STANDARD_WORKERS_MAX = 0", "STANDARD_WORKERS_MAX must be a positive integer, got 0"),
    ("SPOT_STOCKOUT_FALLBACK_MINUTES = -1", "SPOT_STOCKOUT_FALLBACK_MINUTES must be None or a number of minutes of at least 0, got -1"),
    ("BACKUP_TASKS = 'yes'", "BACKUP_TASKS must be True or False, got 'yes'"),
    ("MAX_COST_USD = 0", "MAX_COST_USD must be None or a positive number of US dollars, got 0"),
    ("VM_TYPE = 'n2-highmem-8'\nMAX_COST_USD = 5", "MAX_COST_USD is set, but PRICES has no price for VM_TYPE 'n2-highmem-8'"),
    ("VM_TYPE = 'n1-standard-4'\nVM_GPU_TYPE = 'nvidia-l4'\nMAX_COST_USD = 5",
     "MAX_COST_USD is set, but PRICES has no price for VM_GPU_TYPE 'nvidia-l4'"),
])
def test_a_bad_lane_backup_or_cost_setting_is_one_line_naming_it(tmp_path, body, message):
    with pytest.raises(ConfigError) as caught:
        load_config(settings_file(tmp_path, body + "\n"))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_dry_run_shows_the_spot_plan_and_the_cap_against_the_worst_case(tmp_path):
    config = load_config(settings_file(tmp_path, "WORKER_NODE_CNT = 5\nMAX_COST_USD = 0.5\nTASK_TIMEOUT = 3600\nMAX_ATTEMPTS = 3\n"))
    out = io.StringIO()
    dry_run(config, out)
    text = out.getvalue()
    # 10 items on 5 Spot e2-standard-2 at $0.020/hour: 2 rounds x 3 attempts x 1 hour x $0.10/hour = $0.60.
    assert "cost cap:     $0.50 (MAX_COST_USD); the worst case, $0.60, is above it" in text
    assert ("Spot:         an item preempted 3 times moves to standard VMs (at most 2); backup copies of the slowest items "
            "once the queue is drained") in text
    body = json.loads(text[text.index("{"): text.rindex("}") + 1])
    assert body["labels"][LANE_ATTRIBUTE] == "spot"


def test_the_policy_says_when_the_next_backup_falls_due():
    policy = policy_with_times(10, 10, 10)
    assert policy.next_due({"a": 100.0, "b": 95.0}, backed_up=set()) == 115.0
    assert policy.next_due({"a": 100.0, "b": 95.0}, backed_up={"b"}) == 120.0
    assert policy.next_due({}, backed_up=set()) is None and policy_with_times(1).next_due({"a": 0.0}, set()) is None
