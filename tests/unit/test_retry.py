"""The one backoff policy: waits that grow, are capped and jittered, and a retry only of what is transient."""

import pytest

from cflow.gcp.retry import Backoff


class Transient(Exception):
    pass


def test_waits_double_up_to_the_cap_and_jitter_only_shortens_them():
    slept = []
    exact = Backoff(first_delay=0.5, max_delay=4.0, jitter=0.0, sleep=slept.append)
    assert [exact.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    jittered = Backoff(first_delay=2.0, max_delay=60.0, jitter=0.5, random=lambda: 0.0)
    assert jittered.delay(3) == 4.0  # half of 8 s at the lowest draw
    assert Backoff(first_delay=2.0, jitter=0.5, random=lambda: 0.999999).delay(1) == pytest.approx(2.0)


def test_a_transient_failure_is_sent_again_after_a_wait():
    slept, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise Transient()
        return "answer"

    backoff = Backoff(retries=6, first_delay=1.0, jitter=0.0, sleep=slept.append)
    assert backoff.call(flaky, lambda error: isinstance(error, Transient)) == "answer"
    assert slept == [1.0, 2.0]


def test_a_permanent_failure_is_raised_at_once_and_the_last_transient_one_after_the_retries():
    slept = []
    backoff = Backoff(retries=2, first_delay=1.0, jitter=0.0, sleep=slept.append)

    def permanent():
        raise ValueError("bad request")

    with pytest.raises(ValueError):
        backoff.call(permanent, lambda error: isinstance(error, Transient))
    assert slept == []

    def always_transient():
        raise Transient()

    with pytest.raises(Transient):
        backoff.call(always_transient, lambda error: True)
    assert slept == [1.0, 2.0]
