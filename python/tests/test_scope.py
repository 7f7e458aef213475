"""Resolved scopes (``Engine.scope``, ``Scope.admit``): the decisions, errors and argument checks
of ``Engine.admit``, without its key lookups, however the scope moved meanwhile."""

import gc
import sys
import threading

import pytest

import sluicegate
from sluicegate import Outcome

SECOND = 1_000_000_000
MINUTE = 60 * SECOND


def shape(d):
    """Everything a decision says but its permit (which names its own scope)."""
    return (
        d.outcome,
        d.admitted,
        d.service_tier,
        d.over_limit,
        d.status_code,
        d.retry_after_ns,
        d.wait,
        d.binding_metric,
        d.too_large,
        d.reason,
        d.limits,
        d.remaining,
        d.cost,
        d.headers(unix_ns=0, jitter_seed=1),
        d.error_body(jitter_seed=1),
    )


@pytest.mark.parametrize("policy", ["fixed", "fireworks_2024", "together"])
def test_a_scope_decides_as_admit_on_a_twin_account_up_to_the_limit_and_past_it(policy):
    e = sluicegate.Engine(policy, capacity=100, dialect="openai")
    for twin in ("twin-a", "twin-b"):
        e.set_service_tier_grant(twin, "priority")
    scope = e.scope("twin-a", "llama", now_ns=0)
    assert e.remaining("twin-a", "llama", now_ns=0)["requests"] in (60, None)  # created, charged nothing
    seen = set()
    now = 0
    for i in range(400):
        now += (i * 7919 % 13) * 10_000_000  # 0 to 120 ms apart: a burst far past every limit
        args = {
            "prompt_tokens": i * 37 % 3_000,
            "cached_tokens": (i * 37 % 3_000) // 3,
            "max_tokens": i * 53 % 700,
            "n": 1 + i % 3 // 2,
            "service_tier": ("flex", "default", "priority", None)[i % 4],
            "expected_tokens": None if i % 4 else i * 11 % 200,
            "now_ns": now,
        }
        by_key = e.admit("twin-b", "llama", **args)
        through = scope.admit(**args)
        assert shape(through) == shape(by_key), f"call {i}"
        seen.add(through.outcome)
        if through.admitted:
            usage = {"prompt_tokens": args["prompt_tokens"], "generated_tokens": i * 17 % 300, "now_ns": now}
            e.settle(by_key, **usage)
            e.settle(through, **usage)
    assert Outcome.ADMIT in seen and Outcome.REJECT_RATE_LIMITED in seen, seen
    if policy == "fireworks_2024":
        assert Outcome.ADMIT_OVER_LIMIT in seen
    # The scope charged its own account, exactly as the twin was charged.
    assert e.remaining("twin-a", "llama", now_ns=now) == e.remaining("twin-b", "llama", now_ns=now)
    assert e.account("twin-a")["in_flight"] == 0


def test_the_limit_then_429s_and_its_decisions_settle_once():
    e = sluicegate.Engine("fixed", capacity=100)
    scope = e.scope("acct", "m", now_ns=0)
    decisions = [scope.admit(prompt_tokens=10, max_tokens=10, now_ns=0) for _ in range(62)]
    assert [d.outcome for d in decisions] == [Outcome.ADMIT] * 60 + [Outcome.REJECT_RATE_LIMITED] * 2
    assert [d.remaining["requests"] for d in decisions] == list(range(59, -1, -1)) + [0, 0]
    assert decisions[-1].retry_after == 1.0 and decisions[-1].binding_metric == "requests"
    e.settle(decisions[0], generated_tokens=4, now_ns=0)
    with pytest.raises(sluicegate.AlreadySettledError):
        e.settle(decisions[0], now_ns=0)
    with pytest.raises(sluicegate.AlreadySettledError):
        e.cancel(decisions[0], now_ns=0)
    with pytest.raises(ValueError, match="not admitted"):
        e.settle(decisions[-1], now_ns=0)
    for d in decisions[1:60]:
        e.settle(d, now_ns=0)
    # Settled for 4 of 10 generated tokens: 6 of them back.
    assert e.remaining("acct", "m", now_ns=0)["generated_tokens"] == 6_000 - 600 + 6
    assert e.account("acct")["in_flight"] == 0
    # A second later one request came back.
    assert scope.admit(now_ns=SECOND).admitted and not scope.admit(now_ns=SECOND).admitted


def test_a_fast_scope_charges_the_fast_variant_only():
    e = sluicegate.Engine("fixed", capacity=100)
    scope = e.scope("acct", "m", fast=True, now_ns=0)
    assert scope.fast
    e.settle(scope.admit(now_ns=0), now_ns=0)
    assert e.remaining("acct", "m", fast=True, now_ns=0)["requests"] == 59
    assert e.remaining("acct", "m", now_ns=0)["requests"] == 60
    assert not e.scope("acct", "m", fast=0, now_ns=0).fast  # fast takes what admit's takes


def raised(call):
    """The exception `call` raised, as (type, message)."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - compared, not swallowed
        return type(exc), str(exc)
    return None


BAD_KEYS = [
    ("", "m"),
    ("a", ""),
    (b"", "m"),
    ("x" * 65, "m"),
    ("a", b"m" * 129),
    ("\ud800", "m"),  # a str that is not UTF-8
    (None, "m"),
    (1, "m"),
    (bytearray(b"a"), "m"),
    ("a", ["m"]),
]


@pytest.mark.parametrize("account,model", BAD_KEYS)
def test_bad_keys_raise_what_admit_raises(account, model):
    e = sluicegate.Engine("fixed", capacity=10)
    by_admit, by_scope = raised(lambda: e.admit(account, model)), raised(lambda: e.scope(account, model))
    assert by_admit is not None and by_scope == by_admit


def test_bad_keys_are_the_typed_errors_admit_documents():
    e = sluicegate.Engine("fixed", capacity=10)
    for account, model in [("", "m"), ("a", ""), ("x" * 65, "m"), ("a", b"m" * 129)]:
        with pytest.raises(sluicegate.InvalidKeyError):
            e.scope(account, model)
    with pytest.raises(sluicegate.ArgumentTypeError, match="account must be str or bytes"):
        e.scope(None, "m")
    # The longest keys resolve.
    assert e.scope("x" * 64, b"m" * 128, now_ns=0).admit(now_ns=0).admitted


def test_a_full_table_is_the_same_error_and_a_known_key_still_resolves():
    e = sluicegate.Engine("fixed", capacity=4, accounts=64)
    for i in range(4):
        e.admit(f"acct-{i}", "m", now_ns=0)
    full = next(f"acct-{i}" for i in range(4, 64) if raised(lambda i=i: e.admit(f"acct-{i}", "m", now_ns=0)))
    assert raised(lambda: e.scope(full, "m", now_ns=0)) == raised(lambda: e.admit(full, "m", now_ns=0))
    with pytest.raises(sluicegate.TableFullError):
        e.scope(full, "m", now_ns=0)
    assert e.scope("acct-0", "m", now_ns=0).admit(now_ns=0).admitted


class Index:
    """Not an int, but usable as one (operator.index)."""

    def __init__(self, n):
        self.n = n

    def __index__(self):
        return self.n


BAD_ARGUMENTS = [
    {"prompt_tokens": -1},
    {"cached_tokens": -5},
    {"max_tokens": 2**64},
    {"n": -1},
    {"expected_tokens": 1.5},
    {"prompt_tokens": True},
    {"prompt_tokens": "10"},
    {"max_tokens": Index(-1)},
    {"priority": "yes"},
    {"priority": 1.0},
    {"service_tier": "auto"},
    {"service_tier": b"flex"},
    {"priority": True, "service_tier": "flex"},
    {"now_ns": -1},
    {"now_ns": 2**64},
    {"now_ns": 1.0},
]


@pytest.mark.parametrize("kwargs", BAD_ARGUMENTS, ids=lambda k: repr(k))
def test_bad_counts_raise_what_admit_raises(kwargs):
    e = sluicegate.Engine("fixed", capacity=10)
    scope = e.scope("a", "m", now_ns=0)
    by_admit, by_scope = raised(lambda: e.admit("twin", "m", **kwargs)), raised(lambda: scope.admit(**kwargs))
    assert by_admit is not None and by_scope == by_admit
    assert issubclass(by_scope[0], sluicegate.Error)
    # Nothing was charged by the refused calls.
    assert e.remaining("a", "m", now_ns=0)["requests"] == 60


def test_arguments_are_admits_positional_and_keyword_ones_and_accept_index():
    e = sluicegate.Engine("fixed", capacity=10)
    scope = e.scope(b"a", "m", now_ns=Index(0))
    d = scope.admit(Index(1_000), Index(800), Index(10), Index(2), 1, None, Index(0))
    assert d.cost == {"requests": 2, "prompt_tokens": 1_000, "uncached_prompt_tokens": 200, "generated_tokens": 20}
    with pytest.raises(TypeError):
        scope.admit(fast=True)  # the variant is the scope's
    with pytest.raises(TypeError):
        scope.admit("a", "m")  # so are the keys: these are counts
    with pytest.raises(TypeError):
        e.scope("a", "m", True)  # fast and now_ns are keyword-only, as for limits()
    # Invalid requests are decisions, as admit's.
    assert scope.admit(n=0, now_ns=0).outcome is Outcome.REJECT_INVALID
    assert scope.admit(prompt_tokens=5, cached_tokens=6, now_ns=0).outcome is Outcome.REJECT_INVALID
    assert scope.admit().admitted  # now_ns defaults to time.monotonic_ns()


def test_a_scope_whose_slot_was_reclaimed_admits_its_own_account():
    # One scope slot (core/tests/suite/handles.rs): "a" is resolved and used, then idle for minutes
    # while "b" takes the slot. The scope never charges "b": while "b" is busy "a" finds no
    # room, as admit would; once "b" is idle "a" takes the slot back.
    e = sluicegate.Engine("fixed", capacity=1, accounts=4, models=1, permits=8)
    scope = e.scope("a", "m", now_ns=0)
    e.settle(scope.admit(now_ns=0), now_ns=0)
    e.settle(e.admit("b", "m", now_ns=5 * MINUTE), now_ns=5 * MINUTE)
    with pytest.raises(sluicegate.TableFullError):
        scope.admit(now_ns=5 * MINUTE)
    assert raised(lambda: scope.admit(now_ns=5 * MINUTE)) == raised(lambda: e.admit("a", "m", now_ns=5 * MINUTE))
    assert e.remaining("b", "m", now_ns=5 * MINUTE)["requests"] == 59  # only b's own request
    d = scope.admit(now_ns=11 * MINUTE)
    assert d.admitted and d.remaining["requests"] == 59
    assert e.remaining("a", "m", now_ns=11 * MINUTE)["requests"] == 59
    e.settle(d, now_ns=11 * MINUTE)
    # The scope remembers where it is now: the next admission charges the same scope.
    e.settle(scope.admit(now_ns=11 * MINUTE), now_ns=11 * MINUTE)
    assert e.remaining("a", "m", now_ns=11 * MINUTE)["requests"] == 58


def test_a_scope_resolved_before_a_restore_admits_its_own_account():
    e = sluicegate.Engine("fixed", capacity=64, requests_per_minute=100)
    scopes = [e.scope(f"acct-{i}", "m", now_ns=0) for i in range(20)]
    for i, s in enumerate(scopes):
        for _ in range(i):
            e.settle(s.admit(now_ns=0), now_ns=0)
    snapshot = e.snapshot(now_ns=0)
    # A restore swaps in a new engine, with another seed: every scope sits elsewhere.
    e.restore(snapshot, now_ns=0)
    for s in reversed(scopes):
        e.settle(s.admit(now_ns=0), now_ns=0)
    assert [e.remaining(f"acct-{i}", "m", now_ns=0)["requests"] for i in range(20)] == [99 - i for i in range(20)]


@pytest.fixture
def fast_thread_switches():
    """Switch threads every microsecond, so the threads of a test interleave finely."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def run_threads(target, n):
    threads = [threading.Thread(target=target) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_threads_sharing_a_scope_admit_exactly_the_limit(fast_thread_switches):
    e = sluicegate.Engine("fixed", capacity=100, permits=10_000, requests_per_minute=5_000, max_in_flight=None)
    scope = e.scope("hot", "m", now_ns=0)
    admitted, lock = [], threading.Lock()

    def worker():
        mine = [d for d in (scope.admit(now_ns=0) for _ in range(2_000)) if d.admitted]
        with lock:
            admitted.extend(mine)

    run_threads(worker, 4)
    assert len(admitted) == 5_000
    for d in admitted:
        e.settle(d, now_ns=0)
    assert e.remaining("hot", "m", now_ns=0)["requests"] == 0
    assert e.account("hot")["in_flight"] == 0


def test_threads_sharing_a_scope_through_reclaims_admit_exactly_the_limit_each_time(fast_thread_switches):
    # As core/tests/suite/handles.rs: before each window, ten idle minutes apart, new keys reclaim
    # idle scopes (the shared scope's among them), so the threads find it moved at once.
    e = sluicegate.Engine("fixed", capacity=16, accounts=64, models=2, permits=256, requests_per_minute=50)
    scope = e.scope("hot", "m", now_ns=0)
    for window in range(20):
        now = window * 10 * MINUTE
        for k in range(12):
            e.settle(e.admit(f"churn-{window}-{k}", "m", now_ns=now), now_ns=now)
        count, lock = [0], threading.Lock()

        def worker(now=now, count=count, lock=lock):
            for _ in range(50):
                d = scope.admit(now_ns=now)
                if d.admitted:
                    e.settle(d, now_ns=now)
                    with lock:
                        count[0] += 1

        run_threads(worker, 2)
        assert count[0] == 50, f"window {window}"
        assert e.remaining("hot", "m", now_ns=now)["requests"] == 0


def test_a_scope_holds_its_engine():
    e = sluicegate.Engine("fixed", capacity=10)
    before = sys.getrefcount(e)
    scope = e.scope("a", "m", now_ns=0)
    assert scope.engine is e
    assert sys.getrefcount(e) == before + 1
    del e
    gc.collect()
    d = scope.admit(now_ns=0)
    assert d.admitted
    scope.engine.settle(d, now_ns=0)
    assert scope.engine.remaining("a", "m", now_ns=0)["requests"] == 59
    # An engine only a scope refers to lives as long as the scope, and goes with it.
    orphan = sluicegate.Engine("fixed", capacity=10).scope("b", "m", now_ns=0)
    gc.collect()
    assert orphan.admit(now_ns=0).admitted
    engine = orphan.engine
    held = sys.getrefcount(engine)
    del orphan
    gc.collect()
    assert sys.getrefcount(engine) == held - 1


class Name(str):
    pass


def test_keys_are_reported_as_given_and_the_scope_is_frozen():
    e = sluicegate.Engine("fixed", capacity=10)
    s = e.scope("acct-1", b"llama", now_ns=0)
    assert (s.account, s.model, s.fast) == ("acct-1", b"llama", False)
    assert type(s.account) is str and type(s.model) is bytes
    assert repr(s) == "<Scope account='acct-1' model=b'llama' fast=False>"
    f = e.scope(Name("é"), "m", fast=True, now_ns=0)
    assert type(f.account) is str and f.account == "é"
    assert repr(f) == "<Scope account='é' model='m' fast=True>"
    # The same key as bytes is the same scope.
    e.settle(f.admit(now_ns=0), now_ns=0)
    assert e.remaining("é".encode(), "m", fast=True, now_ns=0)["requests"] == 59
    with pytest.raises(AttributeError):
        s.account = "other"
    with pytest.raises(TypeError):
        sluicegate.Scope()
    assert isinstance(s, sluicegate.Scope) and "Scope" in sluicegate.__all__
