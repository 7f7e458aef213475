"""Gateways crash, time out and have bugs: a permit not settled within ``permit_ttl`` expires
(SPEC §7, issue 12 item 2). Every clock here is explicit (``now_ns``), so minutes pass at once."""

import pytest

import sluicegate

SECOND = 1_000_000_000
MINUTE = 60 * SECOND


def test_a_permit_settled_after_its_ttl_is_expired():
    e = sluicegate.Engine("fixed", capacity=100, permit_ttl=60.0)
    in_time = e.admit("a", "m", max_tokens=10, now_ns=0)
    late = e.admit("a", "m", max_tokens=10, now_ns=0)
    assert in_time.admitted and late.admitted
    e.settle(in_time, now_ns=59 * SECOND)
    with pytest.raises(sluicegate.PermitExpiredError, match="permit_ttl") as err:
        e.settle(late, now_ns=61 * SECOND)
    assert isinstance(err.value, sluicegate.Error)
    assert issubclass(sluicegate.PermitExpiredError, sluicegate.Error)
    # Refused every time, whatever the call: an expired permit is never settled.
    with pytest.raises(sluicegate.PermitExpiredError):
        e.settle(late, now_ns=61 * SECOND)
    with pytest.raises(sluicegate.PermitExpiredError):
        e.cancel(late, generated_tokens=0, now_ns=62 * SECOND)
    with pytest.raises(sluicegate.PermitExpiredError):
        e.charge(late, 5, now_ns=62 * SECOND)
    # A permit settled in time stays settled.
    with pytest.raises(sluicegate.Error):
        e.settle(in_time, now_ns=61 * SECOND)


def test_a_stream_is_charged_until_its_deadline():
    e = sluicegate.Engine("fixed", capacity=100, permit_ttl=60.0)
    d = e.admit("a", "m", max_tokens=10, now_ns=0)
    e.charge(d, 5, now_ns=30 * SECOND)
    with pytest.raises(sluicegate.PermitExpiredError):
        e.charge(d, 5, now_ns=61 * SECOND)
    with pytest.raises(sluicegate.PermitExpiredError):
        e.settle(d, generated_tokens=10, now_ns=61 * SECOND)


@pytest.mark.parametrize("policy", sluicegate.PRESETS)
def test_the_default_ttl_is_15_minutes(policy):
    e = sluicegate.Engine(policy, capacity=100)
    in_time = e.admit("a", "m", max_tokens=10, now_ns=0)
    late = e.admit("a", "m", max_tokens=10, now_ns=0)
    e.settle(in_time, now_ns=14 * MINUTE)
    with pytest.raises(sluicegate.PermitExpiredError):
        e.settle(late, now_ns=16 * MINUTE)


def test_permit_ttl_900_is_the_default_and_none_means_never():
    e = sluicegate.Engine("fixed", permit_ttl=900.0)
    in_time, late = e.admit("a", "m", now_ns=0), e.admit("a", "m", now_ns=0)
    e.settle(in_time, now_ns=899 * SECOND)
    with pytest.raises(sluicegate.PermitExpiredError):
        e.settle(late, now_ns=901 * SECOND)
    # None is inf, as for every override: the permit never expires.
    for e in (sluicegate.Engine("fixed", permit_ttl=None), sluicegate.Engine("fixed", permit_ttl=float("inf"))):
        d = e.admit("a", "m", now_ns=0)
        e.settle(d, now_ns=365 * 24 * 3600 * SECOND)


def test_an_expired_settle_changes_nothing_and_the_reservation_stays_charged():
    def engine_after(settle_late):
        e = sluicegate.Engine("fixed", capacity=100, seed=7, permit_ttl=1)
        d = e.admit("a", "m", max_tokens=3_000, now_ns=0)
        assert e.remaining("a", "m", now_ns=0)["generated_tokens"] == 3_000
        if settle_late:
            with pytest.raises(sluicegate.PermitExpiredError):
                e.settle(d, generated_tokens=0, completion="upstream_failure", now_ns=2 * SECOND)
        return e.remaining("a", "m", now_ns=2 * SECOND)

    # No refund of the 3,000 reserved: 2 s refill 200 of them, as if the settle never came.
    assert engine_after(settle_late=True) == engine_after(settle_late=False)
    assert engine_after(settle_late=True)["generated_tokens"] == 3_200


def test_an_abandoned_permit_releases_the_model_load_after_its_ttl():
    e = sluicegate.Engine("fixed", capacity=100, permit_ttl=60.0)
    e.set_model_capacity("m", 1)
    abandoned = e.admit("crashed-worker", "m", now_ns=0)
    assert abandoned.outcome is sluicegate.Outcome.ADMIT
    assert e.load("m") == 1.0
    assert e.admit("other", "m", now_ns=30 * SECOND).outcome is sluicegate.Outcome.SHED
    # Nobody settles it: the next admission past the deadline finds it expired and releases it.
    later = e.admit("other", "m", now_ns=61 * SECOND)
    assert later.outcome is sluicegate.Outcome.ADMIT
    e.settle(later, now_ns=61 * SECOND)
    assert e.load("m") == 0.0
    with pytest.raises(sluicegate.PermitExpiredError):
        e.settle(abandoned, now_ns=61 * SECOND)
    assert e.load("m") == 0.0


def test_permit_ttl_below_one_second_is_a_policy_error():
    with pytest.raises(sluicegate.PolicyError, match="permit_ttl must be a number of seconds of at least 1"):
        sluicegate.Engine("fixed", permit_ttl=0.5)
    with pytest.raises(sluicegate.PolicyError, match="permit_ttl"):
        sluicegate.Engine("fixed", permit_ttl=0)
    sluicegate.Engine("fixed", permit_ttl=1)


@pytest.mark.parametrize("key", ["permit_ttl", "max_wait"])
def test_durations_must_be_non_negative_numbers(key):
    for bad in ("60", [60], True, object()):
        with pytest.raises(TypeError, match=f"{key} must be a number or None"):
            sluicegate.Engine("fixed", **{key: bad})
    bad_values = [-1, -0.5, float("-inf"), float("nan")] + ([float("inf")] if key == "max_wait" else [])
    for bad in bad_values:
        with pytest.raises(sluicegate.PolicyError, match=f"^{key} must be"):
            sluicegate.Engine("fixed", **{key: bad})
