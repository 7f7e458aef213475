"""The surfaces users touch (issue 22): overrides, settle defaults, restore, errors, conventions."""

import pytest

import sluicegate

SECOND = 1_000_000_000
MINUTE = 60 * SECOND
METRICS = ("requests", "prompt_tokens", "uncached_prompt_tokens", "generated_tokens")


# Overrides: None is off, fixed enforces what it names, order never matters.


@pytest.mark.parametrize("policy", sluicegate.PRESETS)
def test_none_turns_a_metric_off_under_every_preset(policy):
    e = sluicegate.Engine(policy, capacity=100, generated_tokens_per_minute=None)
    assert e.limits("a", "m", now_ns=0)["generated_tokens"] is None
    assert "generated_tokens=off" in repr(e)
    d = e.admit("a", "m", max_tokens=10**9, now_ns=0)
    assert d.admitted and d.limits["generated_tokens"] is None
    if policy != "fixed":
        preset = sluicegate.Engine(policy, capacity=100).limits("a", "m", now_ns=0)
        others = {k: v for k, v in e.limits("a", "m", now_ns=0).items() if k != "generated_tokens"}
        assert others == {k: v for k, v in preset.items() if k != "generated_tokens"}


def test_fixed_enforces_only_the_metrics_named():
    e = sluicegate.Engine(policy="fixed", capacity=100, requests_per_minute=5)
    assert e.limits("a", "m", now_ns=0) == {
        "requests": 5,
        "prompt_tokens": None,
        "uncached_prompt_tokens": None,
        "generated_tokens": None,
    }
    assert repr(e) == (
        "<Engine policy='fixed' capacity=100 requests=5/min prompt_tokens=off "
        "uncached_prompt_tokens=off generated_tokens=off>"
    )
    big = e.admit("a", "m", prompt_tokens=100_000, max_tokens=100_000, now_ns=0)
    assert big.outcome is sluicegate.Outcome.ADMIT
    for _ in range(4):
        assert e.admit("a", "m", now_ns=0).outcome is sluicegate.Outcome.ADMIT
    assert e.admit("a", "m", now_ns=0).binding_metric == "requests"


def test_fixed_with_nothing_named_keeps_its_floors_and_adaptive_presets_show_their_range():
    assert repr(sluicegate.Engine("fixed", capacity=100)) == (
        "<Engine policy='fixed' capacity=100 requests=60/min prompt_tokens=60000/min "
        "uncached_prompt_tokens=60000/min generated_tokens=6000/min>"
    )
    r = repr(sluicegate.Engine("fireworks_2024", capacity=100, requests_per_minute=100, requests_ceiling=600))
    assert " requests=100..600/min " in r


@pytest.mark.parametrize("policy", sluicegate.PRESETS)
def test_override_order_never_matters(policy):
    for kwargs in ({"requests_ceiling": 60, "requests_per_minute": 100}, {"requests_per_minute": 100, "requests_ceiling": 60}):
        with pytest.raises(sluicegate.PolicyError, match="requests"):
            sluicegate.Engine(policy, capacity=100, **kwargs)
    a = sluicegate.Engine(policy, capacity=100, requests_ceiling=600, requests_per_minute=100)
    b = sluicegate.Engine(policy, capacity=100, requests_per_minute=100, requests_ceiling=600)
    assert repr(a) == repr(b)
    assert a.limits("a", "m", now_ns=0) == b.limits("a", "m", now_ns=0)


# settle(): every field left out defaults to what was reserved.


def settled_with_defaults(**settle_kwargs):
    e = sluicegate.Engine("fixed", capacity=100)
    # $1 per million uncached prompt tokens; cached prompt tokens free.
    e.set_price("m", uncached_prompt=1_000_000, cached_prompt=0, generated=0)
    d = e.admit("a", "m", prompt_tokens=1_000, cached_tokens=800, now_ns=0)
    assert d.cost["uncached_prompt_tokens"] == 200
    e.settle(d, now_ns=0, **settle_kwargs)
    return e.account("a")["period_spend"], e.remaining("a", "m", now_ns=0)["uncached_prompt_tokens"]


def test_settle_defaults_every_omitted_field_to_the_reservation():
    explicit = settled_with_defaults(prompt_tokens=1_000, cached_tokens=800, generated_tokens=0)
    assert explicit == (200, 60_000 - 200)
    assert settled_with_defaults() == explicit
    assert settled_with_defaults(prompt_tokens=1_000) == explicit
    assert settled_with_defaults(generated_tokens=0) == explicit


def test_settle_default_cached_tokens_never_exceed_the_prompt_given():
    # Fewer prompt tokens than were reserved as cached: all of them count as cached.
    assert settled_with_defaults(prompt_tokens=500) == (0, 60_000)
