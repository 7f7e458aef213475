"""The Python API behaves like the Rust engine (SPEC §1–§10 through the binding)."""

import pytest

import sluicegate
from sluicegate import Outcome

SECOND = 1_000_000_000
MINUTE = 60 * SECOND


def test_a_new_scope_admits_its_floor_then_rejects_with_retry_after():
    e = sluicegate.Engine(policy="fixed", capacity=1_000)
    outcomes = [e.admit("a", "m", now_ns=0).outcome for _ in range(61)]
    assert outcomes[:60] == [Outcome.ADMIT] * 60
    d = e.admit("a", "m", now_ns=0)
    assert d.outcome is Outcome.REJECT_RATE_LIMITED
    assert (d.status_code, d.binding_metric, d.retry_after, d.too_large) == (429, "requests", 1.0, False)
    assert e.admit("a", "m", now_ns=SECOND).admitted


def test_over_limit_band_and_headers():
    e = sluicegate.Engine(capacity=1_000)
    for _ in range(60):
        e.admit("a", "m", now_ns=0)
    d = e.admit("a", "m", now_ns=0)
    assert d.outcome is Outcome.ADMIT_OVER_LIMIT and d.over_limit and d.status_code == 200
    assert ("x-ratelimit-over-limit", "yes") in d.headers("fireworks")
    assert dict(d.headers("openai"))["x-ratelimit-remaining-requests"] == "0"


def test_overrides_set_floors_ceilings_and_the_hard_factor():
    e = sluicegate.Engine(policy="fixed", capacity=100, requests_per_minute=600, generated_tokens_per_minute=1_000)
    # Under fixed, only the metrics named are enforced.
    assert e.limits("a", "m", now_ns=0) == {
        "requests": 600,
        "prompt_tokens": None,
        "uncached_prompt_tokens": None,
        "generated_tokens": 1_000,
    }
    strict = sluicegate.Engine(capacity=100, hard_factor=1.0)
    for _ in range(60):
        strict.admit("a", "m", now_ns=0)
    assert strict.admit("a", "m", now_ns=0).outcome is Outcome.REJECT_RATE_LIMITED
    with pytest.raises(sluicegate.PolicyError):
        sluicegate.Engine(capacity=100, requests_per_minute=100, requests_ceiling=50)


def test_settle_refunds_and_rejects_a_second_settle():
    e = sluicegate.Engine(policy="fixed", capacity=100)
    d = e.admit("a", "m", prompt_tokens=1_000, max_tokens=3_000, now_ns=0)
    assert e.remaining("a", "m", now_ns=0)["generated_tokens"] == 3_000
    e.settle(d, prompt_tokens=1_000, generated_tokens=500, now_ns=0)
    assert e.remaining("a", "m", now_ns=0)["generated_tokens"] == 5_500
    with pytest.raises(sluicegate.AlreadySettledError):
        e.settle(d, generated_tokens=0, now_ns=0)
    rejected = e.admit("a", "m", max_tokens=100_000, now_ns=0)
    with pytest.raises(ValueError, match="not admitted"):
        e.settle(rejected)


def test_streams_charge_as_they_go():
    e = sluicegate.Engine(policy="fixed", capacity=100)
    d = e.admit("a", "m", max_tokens=1_000, now_ns=0)
    e.charge(d, 700, now_ns=0)
    e.charge(d, 700, now_ns=0)
    assert e.remaining("a", "m", now_ns=0)["generated_tokens"] == 4_600
    e.settle(d, generated_tokens=1_400, now_ns=0)
    assert e.remaining("a", "m", now_ns=0)["generated_tokens"] == 4_600


def test_ramp_grows_limits_with_sustained_use():
    e = sluicegate.Engine(policy="fireworks_2024", capacity=100)
    for minute in range(10):
        rpm = e.limits("a", "m", now_ns=minute * MINUTE)["requests"]
        for i in range(rpm):
            now = minute * MINUTE + i * MINUTE // rpm
            d = e.admit("a", "m", now_ns=now)
            if d.admitted:
                e.settle(d, now_ns=now)
    assert e.limits("a", "m", now_ns=10 * MINUTE)["requests"] == 120


def test_shed_and_priority():
    e = sluicegate.Engine(capacity=100)
    e.set_load("m", 1.0)
    assert e.load("m") == 1.0
    shed = e.admit("a", "m", now_ns=0)
    assert shed.outcome is Outcome.SHED and shed.status_code == 503
    assert "retry-after" in dict(shed.headers())
    assert shed.service_tier is None
    e.set_service_tier_grant("a", "priority")
    d = e.admit("a", "m", service_tier="priority", now_ns=0)
    assert d.admitted and d.service_tier == "priority"


def test_a_tier_above_the_accounts_grant_is_served_at_the_grant():
    e = sluicegate.Engine(capacity=100)
    # Never granted: its grant is default, and asking for priority is served (not refused) at it.
    d = e.admit("plain", "m", service_tier="priority", now_ns=0)
    assert d.outcome is Outcome.ADMIT and d.service_tier == "default"
    assert e.account("plain")["service_tier_grant"] == "default"
    assert e.admit("plain", "m", now_ns=0).service_tier == "default"
    assert e.admit("plain", "m", service_tier="flex", now_ns=0).service_tier == "flex"
    # Shed as default is, at 1.0, where a priority grant would run.
    e.set_load("m", 1.0)
    assert e.admit("plain", "m", service_tier="priority", now_ns=0).outcome is Outcome.SHED
    e.set_service_tier_grant("plain", "priority")
    assert e.account("plain")["service_tier_grant"] == "priority"
    assert e.admit("plain", "m", service_tier="priority", now_ns=0).service_tier == "priority"
    # A flex grant caps every ask at flex.
    e.set_load("m", 0.65)
    e.set_service_tier_grant("batch", "flex")
    assert e.admit("batch", "m", service_tier="priority", now_ns=0).service_tier == "flex"
    e.set_load("m", 0.7)
    assert e.admit("batch", "m", service_tier="priority", now_ns=0).outcome is Outcome.SHED
    assert e.admit("other", "m", service_tier="priority", now_ns=0).service_tier == "default"


def _classes(load):
    """Whether each of the six classes is shed at ``load``: [over-limit flex, in-limit flex,
    over-limit default, over-limit priority, in-limit default, in-limit priority], each account
    granted priority and asking for its class's tier."""
    e = sluicegate.Engine(capacity=100)
    for name in ("in-f", "in-d", "in-p", "over-f", "over-d", "over-p"):
        e.set_service_tier_grant(name, "priority")
    for name in ("over-f", "over-d", "over-p"):
        for _ in range(60):  # the whole floor: the next request is over the limit
            assert e.admit(name, "m", now_ns=0).outcome is Outcome.ADMIT
    e.set_load("m", load / 1000)
    asks = [("over-f", "flex"), ("in-f", "flex"), ("over-d", "default"), ("over-p", "priority"), ("in-d", "default"), ("in-p", "priority")]
    decisions = [e.admit(name, "m", service_tier=tier, now_ns=0) for name, tier in asks]
    for d, (name, tier) in zip(decisions, asks):
        assert d.outcome is Outcome.SHED or (d.service_tier == tier and d.over_limit == name.startswith("over")), (load, name)
    return [d.outcome is Outcome.SHED for d in decisions]


def test_overload_sheds_six_classes_flex_first_and_in_limit_priority_last():
    assert _classes(0) == [False] * 6
    assert _classes(599) == [False] * 6
    for shed, load in enumerate((600, 700, 800, 900, 1_000, 1_200)):
        assert _classes(load) == [c <= shed for c in range(6)], load
        assert _classes(load - 1) == [c < shed for c in range(6)], load - 1


def test_a_grant_survives_a_snapshot_and_a_restore():
    old = sluicegate.Engine(capacity=100)
    old.set_service_tier_grant("gold", "priority")
    old.set_service_tier_grant("batch", "flex")
    new = sluicegate.Engine(capacity=100)
    new.restore(old.snapshot(now_ns=0), now_ns=0)
    assert new.account("gold")["service_tier_grant"] == "priority"
    assert new.account("batch")["service_tier_grant"] == "flex"
    assert new.admit("gold", "m", service_tier="priority", now_ns=0).service_tier == "priority"
    assert new.admit("batch", "m", now_ns=0).service_tier == "flex"
    # A grant back to default is kept too.
    new.set_service_tier_grant("gold", "default")
    again = sluicegate.Engine(capacity=100)
    again.restore(new.snapshot(now_ns=0), now_ns=0)
    assert again.account("gold")["service_tier_grant"] == "default"
    assert again.admit("gold", "m", service_tier="priority", now_ns=0).service_tier == "default"


@pytest.mark.parametrize("bad, error", [("Priority", sluicegate.ArgumentError), ("auto", sluicegate.ArgumentError), ("", sluicegate.ArgumentError), (1, sluicegate.ArgumentTypeError), (b"flex", sluicegate.ArgumentTypeError), (True, sluicegate.ArgumentTypeError)])
def test_a_service_tier_must_be_one_of_the_three_names(bad, error):
    e = sluicegate.Engine(capacity=100)
    for call in (
        lambda: e.admit("a", "m", service_tier=bad, now_ns=0),
        lambda: e.scope("a", "m", now_ns=0).admit(service_tier=bad, now_ns=0),
        lambda: e.set_service_tier_grant("a", bad),
    ):
        with pytest.raises(error) as err:
            call()
        assert isinstance(err.value, sluicegate.Error)
        assert str(err.value) == f"service_tier must be one of flex, default, priority; got {bad!r}"
    # None is no opinion: the default tier.
    assert e.admit("a", "m", service_tier=None, now_ns=0).service_tier == "default"
    assert e.account("a")["service_tier_grant"] == "default"  # the refused grants changed nothing
    assert e.remaining("a", "m", now_ns=0)["requests"] == 59  # nor were the refused admissions charged


def test_accounts_spend_and_quotas():
    e = sluicegate.Engine(capacity=100)
    e.set_price("m", uncached_prompt=1_000_000, cached_prompt=1_000_000, generated=1_000_000)
    e.add_credits("a", 100_000_000)
    assert e.account("a")["tier"] == "tier_2"
    e.set_spend_limit("a", 1_000)
    d = e.admit("a", "m", prompt_tokens=1_000, now_ns=0)
    e.settle(d, prompt_tokens=1_000, generated_tokens=0, now_ns=0)
    refused = e.admit("a", "m", prompt_tokens=1, now_ns=0)
    assert (refused.outcome, refused.reason, refused.status_code) == (
        Outcome.REJECT_SPEND,
        "spend_limit_exceeded",
        402,
    )
    assert refused.error_body("openai")["error"]["type"] == "spend_limit_exceeded"
    with pytest.raises(sluicegate.SpendLimitAboveTierError):
        e.set_spend_limit("a", 10**12)
    assert e.acquire_quota("a", "h100_gpus", 8) == (8, 8)
    with pytest.raises(sluicegate.QuotaExceededError) as err:
        e.acquire_quota("a", "h100_gpus")
    assert (err.value.used, err.value.limit) == (8, 8)
    with pytest.raises(sluicegate.UnknownAccountError):
        e.account("nobody")


def test_snapshot_restores_earned_limits_on_another_clock():
    old = sluicegate.Engine(capacity=100)
    for minute in range(12):
        rpm = old.limits("a", "m", now_ns=minute * MINUTE)["requests"]
        for i in range(rpm):
            now = minute * MINUTE + i * MINUTE // rpm
            d = old.admit("a", "m", now_ns=now)
            if d.admitted:
                old.settle(d, now_ns=now)
    earned = old.limits("a", "m", now_ns=12 * MINUTE)["requests"]
    assert earned > 120
    data = old.snapshot(now_ns=12 * MINUTE)
    new = sluicegate.Engine(capacity=100)
    new.restore(data, now_ns=5 * SECOND)
    assert new.limits("a", "m", now_ns=5 * SECOND)["requests"] == earned
    with pytest.raises(sluicegate.CorruptSnapshotError):
        new.restore(data[:-1], now_ns=5 * SECOND)
    with pytest.raises(sluicegate.CorruptSnapshotError):
        sluicegate.Engine(capacity=50).restore(data)


def test_permits_issued_before_a_restore_are_stale():
    e = sluicegate.Engine(capacity=100)
    d = e.admit("a", "m", now_ns=0)
    e.restore(e.snapshot(now_ns=0), now_ns=0)
    with pytest.raises(sluicegate.StalePermitError):
        e.settle(d, now_ns=0)


def test_explicit_and_implicit_clocks_agree():
    import time

    e = sluicegate.Engine(policy="fixed", capacity=100)
    for _ in range(60):
        e.admit("a", "m")
    # The implicit clock is time.monotonic_ns(): an explicit reading is "now" for the engine too.
    assert not e.admit("a", "m", now_ns=time.monotonic_ns()).admitted
    assert e.admit("a", "m", now_ns=time.monotonic_ns() + 2 * SECOND).admitted
