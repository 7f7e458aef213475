"""Issue 19: spend limits that hold under concurrency (money is reserved at admission, SPEC §8),
and no tenant can take the whole permit ledger (``max_in_flight``)."""

import pytest

import sluicegate
from sluicegate import Outcome

DOLLAR = 1_000_000  # micro-dollars
OFF = {m + "_per_minute": None for m in sluicegate.METRICS}
"""Every rate limit off: only money and max_in_flight decide."""


def priced_engine(**kw):
    e = sluicegate.Engine("fixed", capacity=64, **OFF, **kw)
    # $1 per million prompt tokens, $10 per million generated: 1 µ$ and 10 µ$ a token.
    e.set_price("m", uncached_prompt=DOLLAR, cached_prompt=DOLLAR, generated=10 * DOLLAR)
    return e


def test_a_burst_at_one_instant_never_bills_past_the_spend_limit():
    # The issue's scenario: 1,000 requests of 1,000 prompt + 1,000 max tokens (11,000 µ$ each at
    # worst) at one instant against a $1 limit, then settled at full use. Billed only at settle,
    # all 1,000 ran: $11.00. Reserved at admission, 90 run: $0.99.
    e = priced_engine(permits=2_048)
    e.set_spend_limit("a", DOLLAR)
    burst = [e.admit("a", "m", prompt_tokens=1_000, max_tokens=1_000, now_ns=0) for _ in range(1_000)]
    admitted = [d for d in burst if d.admitted]
    refused = [d for d in burst if not d.admitted]
    assert len(admitted) == 90
    assert {(d.outcome, d.reason, d.status_code) for d in refused} == {(Outcome.REJECT_SPEND, "spend_limit_exceeded", 402)}
    a = e.account("a")
    assert (a["reserved"], a["period_spend"], a["in_flight"]) == (990_000, 0, 90)
    for d in admitted:
        e.settle(d, prompt_tokens=1_000, generated_tokens=1_000, now_ns=0)
    a = e.account("a")
    assert (a["period_spend"], a["reserved"], a["in_flight"]) == (990_000, 0, 0)
    assert a["period_spend"] <= a["spend_limit"] == DOLLAR  # $0.99 of $1.00
    # The cent left fits a request of exactly 10,000 µ$ at worst, not one of 11,000.
    assert not e.admit("a", "m", prompt_tokens=1_000, max_tokens=1_000, now_ns=0).admitted
    last = e.admit("a", "m", prompt_tokens=1_000, max_tokens=900, now_ns=0)
    assert last.admitted and e.account("a")["refusal"] == "spend_limit_exceeded"
    e.settle(last, generated_tokens=100, now_ns=0)  # below its reservation: the rest comes back
    assert (e.account("a")["period_spend"], e.account("a")["refusal"]) == (992_000, None)


def test_each_way_a_permit_ends_replaces_its_reservation():
    e = priced_engine()
    state = lambda: (e.account("a")["period_spend"], e.account("a")["reserved"])  # noqa: E731
    admit = lambda: e.admit("a", "m", prompt_tokens=1_000, max_tokens=1_000, now_ns=0)  # noqa: E731
    d = admit()
    assert state() == (0, 11_000)
    e.settle(d, generated_tokens=200, now_ns=0)
    assert state() == (3_000, 0)
    e.cancel(admit(), generated_tokens=0, now_ns=0)
    assert state() == (4_000, 0)
    e.settle(admit(), completion="upstream_failure", now_ns=0)
    assert state() == (4_000, 0)
    abandoned = admit()
    with pytest.raises(sluicegate.PermitExpiredError):
        e.settle(abandoned, generated_tokens=0, now_ns=3_600 * 10**9)
    assert state() == (15_000, 0)  # an expired permit is billed its whole reservation


def test_without_a_payment_method_only_credits_can_be_reserved():
    e = priced_engine()
    e.add_credits("a", 20_000)
    e.set_payment_method("a", False)
    first = e.admit("a", "m", prompt_tokens=1_000, max_tokens=1_000, now_ns=0)
    second = e.admit("a", "m", prompt_tokens=1_000, max_tokens=1_000, now_ns=0)
    assert first.admitted and (second.outcome, second.reason) == (Outcome.REJECT_SPEND, "account_suspended")
    e.settle(first, generated_tokens=100, now_ns=0)  # 2,000 µ$ from the credits
    assert e.admit("a", "m", prompt_tokens=1_000, max_tokens=1_000, now_ns=0).admitted


def test_one_account_can_never_take_the_whole_ledger():
    # 100,000 permits opened and never settled: one account gets a quarter of the 4,096-entry
    # ledger, and a second account is admitted every 1,000 attempts.
    e = sluicegate.Engine("fixed", capacity=256, permits=4_096, **OFF)
    admit, held, limited = e.admit, 0, 0
    for i in range(100_000):
        d = admit("greedy", "m", prompt_tokens=1, now_ns=i)
        if d.admitted:
            held += 1
        else:
            assert d.outcome is Outcome.REJECT_CONCURRENCY, d.outcome
            limited += 1
        if i % 1_000 == 0:
            other = admit("other", "m", prompt_tokens=1, now_ns=i)
            assert other.admitted, (i, other.outcome)
            e.settle(other, now_ns=i)
    assert (held, limited) == (1_024, 100_000 - 1_024)
    refused = admit("greedy", "m", now_ns=100_000)
    assert (refused.status_code, refused.reason) == (429, "concurrency_limited")
    assert dict(refused.headers())["retry-after"] == "1"
    assert refused.error_body()["error"]["type"] == "concurrency_limited"
    assert e.account("greedy")["in_flight"] == 1_024 and e.account("other")["in_flight"] == 0
    assert "max_in_flight=1024>" in repr(e)


def test_a_concurrency_refusal_says_when_to_retry():
    e = sluicegate.Engine("fixed", capacity=64, max_in_flight=1)
    assert e.admit("a", "m", now_ns=0).admitted
    refused = e.admit("a", "m", now_ns=0)
    assert dict(refused.headers())["retry-after"] == "1"  # rendered from the outcome itself
    assert (refused.retry_after, refused.retry_after_ns) == (1.0, 10**9)


def test_max_in_flight_per_engine_and_per_account():
    e = sluicegate.Engine("fixed", capacity=64, max_in_flight=2, **OFF)
    assert repr(e).endswith(" max_in_flight=2>")
    admit = lambda: e.admit("a", "m", now_ns=0)  # noqa: E731
    two = [admit(), admit()]
    assert all(d.admitted for d in two) and admit().outcome is Outcome.REJECT_CONCURRENCY
    a = e.account("a")
    assert (a["in_flight"], a["max_in_flight"], a["reserved"]) == (2, None, 0)
    # A success, a cancel and an upstream failure each give the place back; so does expiry.
    e.settle(two[0], now_ns=0)
    third = admit()
    e.cancel(third, now_ns=0)
    fourth = admit()
    e.settle(fourth, completion="upstream_failure", now_ns=0)
    assert e.account("a")["in_flight"] == 1
    # The account's own cap, then None back to the engine's.
    admit_b = lambda: e.admit("b", "m", now_ns=0)  # noqa: E731
    e.set_max_in_flight("b", 3)
    assert e.account("b")["max_in_flight"] == 3
    three = [admit_b() for _ in range(3)]
    assert all(d.admitted for d in three) and admit_b().outcome is Outcome.REJECT_CONCURRENCY
    e.set_max_in_flight("b", None)
    assert e.account("b")["max_in_flight"] is None
    assert admit_b().outcome is Outcome.REJECT_CONCURRENCY
    for d in three:
        e.settle(d, now_ns=0)
    assert e.account("b")["in_flight"] == 0
    # Expiry gives the place back too (the preset's TTL: 15 minutes).
    with pytest.raises(sluicegate.PermitExpiredError):
        e.settle(two[1], now_ns=3_600 * 10**9)
    assert e.account("a")["in_flight"] == 0


def test_the_cap_is_checked_before_the_rate_limits_and_refusals_hold_no_place():
    e = sluicegate.Engine("fixed", capacity=64, requests_per_minute=5, max_in_flight=1)
    first = e.admit("a", "m", now_ns=0)
    assert first.admitted
    for _ in range(10):  # refused for concurrency: none of the 5 requests a minute is spent
        assert e.admit("a", "m", now_ns=0).outcome is Outcome.REJECT_CONCURRENCY
    e.settle(first, now_ns=0)
    for _ in range(4):
        d = e.admit("a", "m", now_ns=0)
        assert d.admitted
        e.settle(d, now_ns=0)
    for _ in range(3):  # a refusal by the rate limits holds no place
        assert e.admit("a", "m", now_ns=0).binding_metric == "requests"
    assert e.account("a")["in_flight"] == 0


def test_the_default_cap_is_a_quarter_of_the_ledger_and_none_is_no_cap():
    for kw, cap in (({}, 256), ({"max_in_flight": None}, None), ({"max_in_flight": float("inf")}, None), ({"max_in_flight": 300.0}, 300)):
        e = sluicegate.Engine("fixed", capacity=64, permits=1_024, **OFF, **kw)
        decisions = [e.admit("a", "m", now_ns=0) for _ in range(400)]
        assert sum(d.admitted for d in decisions) == (cap or 400), kw
        assert repr(e).endswith(f" max_in_flight={cap or 'off'}>")
        for d in decisions:
            if d.admitted:
                e.settle(d, now_ns=0)


@pytest.mark.parametrize("bad", [0, -1, 2.5, float("nan"), 2**32])
def test_a_bad_max_in_flight_keyword_is_a_policy_error_naming_it(bad):
    with pytest.raises(sluicegate.PolicyError, match="^max_in_flight must be a whole number"):
        sluicegate.Engine(max_in_flight=bad)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (0, sluicegate.ArgumentError, "max_in_flight must be at least 1 (None: the policy's), got 0"),
        (-3, sluicegate.ArgumentError, "max_in_flight must be at least 1 (None: the policy's), got -3"),
        (2**32, sluicegate.ArgumentOverflowError, "max_in_flight must be below 2**32, got 4294967296"),
        (True, sluicegate.ArgumentTypeError, "max_in_flight must be an int, not bool"),
        (1.5, sluicegate.ArgumentTypeError, "max_in_flight must be an int, not float"),
    ],
)
def test_a_bad_set_max_in_flight_names_the_argument_and_changes_nothing(bad, error, message):
    e = sluicegate.Engine("fixed", capacity=64)
    e.set_max_in_flight("a", 7)
    with pytest.raises(error) as err:
        e.set_max_in_flight("a", bad)
    assert str(err.value) == message
    assert e.account("a")["max_in_flight"] == 7
