"""CreationPolicy: where to ask for workers, and the one reaction each class of GCE refusal gets."""

from collections.abc import Callable

import pytest

from cflow.creation import (
    QUOTA_COOLDOWN_SECONDS,
    STOCKOUT_COOLDOWN_SECONDS,
    Ask,
    CreationPolicy,
    NextZone,
    QuotaCooldown,
    Reaction,
    StopCreating,
    WaitAndRetry,
    refused_line,
)
from cflow.errors import (
    NotFound,
    PermanentRequestError,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    ResourceNotReady,
    TransientError,
    ZoneStockout,
)
from cflow.gcp.errors import classify_operation_error
from cflow.gcp.retry import Backoff

ZONES = ("us-central1-a", "us-central1-b", "us-east1-b")
NOW = 1000.0
EXACT = Backoff(first_delay=5.0, max_delay=120.0, jitter=0.0)


def quota(metric, limit, region="us-central1"):
    return QuotaExceeded(f"Quota '{metric}' exceeded. Limit: {limit} in region {region}.", metric=metric, region=region, limit=limit,
                         reason="QUOTA_EXCEEDED", message=f"Quota '{metric}' exceeded.  Limit: {limit} in region {region}.")


def test_first_ask_is_the_first_zone_for_all_wanted():
    assert CreationPolicy(ZONES).next_ask(4, NOW) == Ask("us-central1-a", 4)


@pytest.mark.parametrize("error", [
    TransientError("backend", status=503, reason="backendError"),
    RateLimited("slow down", status=403, reason="rateLimitExceeded"),
    ResourceNotReady("not ready", status=400, reason="resourceNotReady"),
], ids=["5xx", "rate-limit", "not-ready"])
def test_transient_refusals_wait_a_growing_delay_then_ask_the_same_zone(error):
    policy = CreationPolicy(ZONES, transient_backoff=EXACT)
    first = policy.refused(error, "us-central1-a", 4, NOW)
    assert first == WaitAndRetry(error, NOW + 5.0)
    assert policy.next_ask(4, NOW + 4.9) is None
    assert policy.next_ask(4, NOW + 5.0) == Ask("us-central1-a", 4)
    assert waited(policy.refused(error, "us-central1-a", 4, NOW + 5.0)).until == NOW + 5.0 + 10.0  # 5, 10, 20 ... in a row
    policy.created(Ask("us-central1-a", 4))
    assert waited(policy.refused(error, "us-central1-a", 4, NOW + 20)).until == NOW + 20 + 5.0  # a success starts over


def waited(reaction: Reaction) -> WaitAndRetry:
    assert isinstance(reaction, WaitAndRetry), reaction
    return reaction


def always(value: float) -> Callable[[], float]:
    return lambda: value


def test_transient_waits_are_jittered_so_many_controllers_do_not_knock_at_once():
    waits = {waited(CreationPolicy(ZONES, transient_backoff=Backoff(first_delay=5.0, jitter=0.5, random=always(r))).refused(
        TransientError("x"), "us-central1-a", 1, NOW)).until - NOW for r in (0.0, 0.5, 0.99)}
    assert len(waits) == 3 and all(2.5 <= wait <= 5.0 for wait in waits)


def test_a_stockout_cools_its_zone_and_the_next_zone_is_asked_at_once():
    policy = CreationPolicy(ZONES)
    reaction = policy.refused(ZoneStockout("no room", zone="us-central1-a"), "us-central1-a", 4, NOW)
    assert reaction == NextZone("us-central1-a", NOW + STOCKOUT_COOLDOWN_SECONDS)
    assert policy.next_ask(4, NOW) == Ask("us-central1-b", 4)
    assert policy.next_ask(4, NOW + STOCKOUT_COOLDOWN_SECONDS) == Ask("us-central1-a", 4)


def test_a_stockout_is_of_one_provisioning_model_a_zone_out_of_spot_may_have_standard_vms():
    policy = CreationPolicy(ZONES)
    for zone in ZONES:
        policy.refused(ZoneStockout("no room", zone=zone), zone, 4, NOW, spot=True)
    assert policy.every_zone_out_of_capacity(NOW, spot=True) and policy.next_ask(4, NOW, spot=True) is None
    assert not policy.every_zone_out_of_capacity(NOW, spot=False)
    assert policy.next_ask(4, NOW, spot=False) == Ask("us-central1-a", 4)


def test_a_stockout_inside_the_operation_is_the_same_as_one_answered_at_once():
    policy = CreationPolicy(ZONES)
    error = classify_operation_error({"code": "ZONE_RESOURCE_POOL_EXHAUSTED", "message": "no room"}, "us-central1-a")
    assert isinstance(policy.refused(error, "us-central1-a", 2, NOW), NextZone)


def test_a_quota_cools_that_metric_of_that_region_and_halves_the_next_ask_there():
    policy = CreationPolicy(ZONES)
    reaction = policy.refused(quota("IN_USE_ADDRESSES", 2.0), "us-central1-a", 6, NOW)
    assert isinstance(reaction, QuotaCooldown)
    assert reaction == QuotaCooldown(reaction.error, "us-central1", NOW + QUOTA_COOLDOWN_SECONDS)
    assert policy.quota_cooldown_until == {("us-central1", "IN_USE_ADDRESSES"): NOW + QUOTA_COOLDOWN_SECONDS}
    # Both us-central1 zones wait; another region is asked meanwhile.
    assert policy.next_ask(6, NOW + 1) == Ask("us-east1-b", 6)
    assert policy.next_ask(6, NOW + QUOTA_COOLDOWN_SECONDS) == Ask("us-central1-a", 3)


def test_a_quota_refused_inside_a_bulk_insert_operation_gets_the_same_cooldown():
    policy = CreationPolicy(ZONES)
    error = classify_operation_error(
        {"code": "QUOTA_EXCEEDED", "message": "Quota 'PREEMPTIBLE_CPUS' exceeded.  Limit: 8.0 in region us-central1."}, "us-central1-a")
    assert isinstance(policy.refused(error, "us-central1-a", 4, NOW), QuotaCooldown)
    assert ("us-central1", "PREEMPTIBLE_CPUS") in policy.quota_cooldown_until


def test_a_project_wide_quota_cools_every_region():
    policy = CreationPolicy(ZONES)
    policy.refused(quota("GPUS_ALL_REGIONS", 4.0, region=None), "us-central1-a", 2, NOW)
    assert policy.next_ask(2, NOW + 1) is None
    assert policy.next_ask(2, NOW + QUOTA_COOLDOWN_SECONDS) == Ask("us-central1-a", 2)


def test_a_quota_of_zero_closes_its_region_for_good_and_stops_creation_once_every_region_is_closed():
    policy = CreationPolicy(ZONES)
    first = policy.refused(quota("PREEMPTIBLE_CPUS", 0.0), "us-central1-a", 2, NOW)
    assert isinstance(first, QuotaCooldown) and first.until == float("inf")
    assert policy.next_ask(2, NOW + 10_000) == Ask("us-east1-b", 2)
    last = policy.refused(quota("PREEMPTIBLE_CPUS", 0.0, region="us-east1"), "us-east1-b", 2, NOW)
    assert isinstance(last, StopCreating) and policy.stopped is last
    assert policy.next_ask(2, NOW + 10_000) is None


@pytest.mark.parametrize("error", [
    PermanentRequestError("bad network", status=400, reason="invalid"),
    NotFound("no image", status=404, reason="notFound"),
    PermissionDenied("no actAs", status=403, reason="forbidden"),
    classify_operation_error({"code": "CONDITION_NOT_MET", "message": "Constraint constraints/compute.vmExternalIpAccess violated"}),
], ids=["invalid", "not-found", "permission", "policy-in-operation"])
def test_anything_else_stops_creation_for_good(error):
    policy = CreationPolicy(ZONES)
    assert policy.refused(error, "us-central1-a", 3, NOW) == StopCreating(error)
    assert policy.next_ask(3, NOW + 10_000) is None


def test_every_zone_out_of_capacity_is_told_apart_from_a_quota_wait():
    policy = CreationPolicy(ZONES[:2])
    policy.refused(quota("CPUS", 8.0), "us-central1-a", 4, NOW)
    assert policy.next_ask(4, NOW) is None and not policy.every_zone_out_of_capacity(NOW)
    for zone in ZONES[:2]:
        policy.refused(ZoneStockout("no room", zone=zone), zone, 4, NOW)
    assert policy.every_zone_out_of_capacity(NOW)


def test_the_refused_line_quotes_gce_and_names_the_setting():
    error = PermanentRequestError(
        "Compute Engine refused a request: Constraint constraints/compute.vmExternalIpAccess violated for project 1.",
        status=412, reason="conditionNotMet", message="Constraint constraints/compute.vmExternalIpAccess violated for project 1.")
    line = refused_line(error, ("VM_EXTERNAL_IP", "set VM_EXTERNAL_IP = False in const.py"))
    assert line == ("VM_EXTERNAL_IP: Compute Engine refused to create the run's workers (GCE: conditionNotMet: Constraint "
                    "constraints/compute.vmExternalIpAccess violated for project 1.); set VM_EXTERNAL_IP = False in const.py")
    assert "\n" not in refused_line(PermanentRequestError("x", message="two\nlines"), None)


def test_the_refused_line_of_a_quota_names_metric_region_and_limit():
    line = refused_line(quota("PREEMPTIBLE_CPUS", 0.0), None)
    assert "PREEMPTIBLE_CPUS quota in us-central1 (limit 0)" in line and "quotas" in line
