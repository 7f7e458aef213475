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
        "uncached_prompt_tokens=off generated_tokens=off max_in_flight=256>"
    )
    big = e.admit("a", "m", prompt_tokens=100_000, max_tokens=100_000, now_ns=0)
    assert big.outcome is sluicegate.Outcome.ADMIT
    for _ in range(4):
        assert e.admit("a", "m", now_ns=0).outcome is sluicegate.Outcome.ADMIT
    assert e.admit("a", "m", now_ns=0).binding_metric == "requests"


def test_fixed_with_nothing_named_keeps_its_floors_and_adaptive_presets_show_their_range():
    assert repr(sluicegate.Engine("fixed", capacity=100)) == (
        "<Engine policy='fixed' capacity=100 requests=60/min prompt_tokens=60000/min "
        "uncached_prompt_tokens=60000/min generated_tokens=6000/min max_in_flight=256>"
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


# One error hierarchy: bad arguments are sluicegate errors and the built-in they resemble.


@pytest.mark.parametrize("hard_factor", [0.5, 5, float("nan"), float("inf"), None])
def test_a_bad_hard_factor_is_a_policy_error_and_a_value_error(hard_factor):
    try:
        sluicegate.Engine(hard_factor=hard_factor)
    except sluicegate.PolicyError as e:
        assert isinstance(e, ValueError) and isinstance(e, sluicegate.Error)
        assert "hard" in str(e)
    else:
        assert hard_factor == 5  # in range for the default preset
    with pytest.raises(ValueError, match="hard_factor"):
        sluicegate.Engine(hard_factor=0.5)
    with pytest.raises(sluicegate.Error, match="hard_factor"):
        sluicegate.Engine(hard_factor=0.5)


def _engine():
    e = sluicegate.Engine("fixed", capacity=10)
    return e, e.admit("a", "m", now_ns=0)


BAD_CALLS = [
    # (call, the built-in it resembles, a word the message must contain)
    (lambda e, d: sluicegate.Engine(policy="nope"), ValueError, "policy"),
    (lambda e, d: sluicegate.Engine(policy=3), TypeError, "policy"),
    (lambda e, d: sluicegate.Engine(dialect="klingon"), ValueError, "dialect"),
    (lambda e, d: sluicegate.Engine(capacity=0), ValueError, "capacit"),
    (lambda e, d: sluicegate.Engine(capacity=-1), ValueError, "capacity"),
    (lambda e, d: sluicegate.Engine(capacity=2**64), OverflowError, "capacity"),
    (lambda e, d: sluicegate.Engine(requests_per_minute="60"), TypeError, "requests_per_minute"),
    (lambda e, d: sluicegate.Engine(requests_per_minute=0), ValueError, "requests_per_minute"),
    (lambda e, d: sluicegate.Engine(sharded=None), TypeError, "sharded"),
    (lambda e, d: sluicegate.Engine(max_in_flight=0), ValueError, "max_in_flight"),
    (lambda e, d: sluicegate.Engine(max_in_flight=2.5), ValueError, "max_in_flight"),
    (lambda e, d: sluicegate.Engine(max_in_flight="8"), TypeError, "max_in_flight"),
    (lambda e, d: sluicegate.Engine(shared=1), TypeError, "shared"),
    (lambda e, d: sluicegate.Engine(shared=b"/dev/shm/x", seed=1), ValueError, "seed"),
    (lambda e, d: e.admit("a", "m", prompt_tokens=-1), ValueError, "prompt_tokens"),
    (lambda e, d: e.admit("a", "m", prompt_tokens=1.5), TypeError, "prompt_tokens"),
    (lambda e, d: e.admit("a", "m", prompt_tokens=2**64), OverflowError, "prompt_tokens"),
    (lambda e, d: e.admit("a", "m", priority="yes"), TypeError, "priority"),
    (lambda e, d: e.admit("a", "m", service_tier="auto"), ValueError, "service_tier must be one of flex, default, priority"),
    (lambda e, d: e.admit("a", "m", service_tier=2), TypeError, "service_tier must be one of flex, default, priority"),
    (lambda e, d: e.admit("a", "m", priority=True, service_tier="default"), ValueError, "service_tier"),
    (lambda e, d: e.set_service_tier_grant("a", "gold"), ValueError, "service_tier"),
    (lambda e, d: e.set_service_tier_grant("a", None), TypeError, "service_tier"),
    (lambda e, d: e.set_service_tier_grant("", "flex"), ValueError, "key"),
    (lambda e, d: e.admit("a", "m", fast=[]), TypeError, "fast"),
    (lambda e, d: e.admit(1, "m"), TypeError, "account"),
    (lambda e, d: e.admit("", "m"), ValueError, "key"),
    (lambda e, d: e.settle("not a decision"), TypeError, "decision"),
    (lambda e, d: e.settle(d, completion="maybe"), ValueError, "completion"),
    (lambda e, d: e.settle(d, prompt_tokens=1, cached_tokens=2), ValueError, "usage"),
    (lambda e, d: e.settle(e.admit("a", "m", n=0)), ValueError, "not admitted"),
    (lambda e, d: d.headers("klingon"), ValueError, "dialect"),
    (lambda e, d: d.headers(unix_ns=-1), ValueError, "unix_ns"),
    (lambda e, d: e.set_load("m", -1.0), ValueError, "load"),
    (lambda e, d: e.set_load("m", "high"), TypeError, "load"),
    (lambda e, d: e.acquire_quota("a", "tpus"), ValueError, "quota"),
    (lambda e, d: e.set_tier("a", "tier_9"), ValueError, "tier"),
    (lambda e, d: e.set_suspended("a", reason="bored"), ValueError, "reason"),
    (lambda e, d: e.set_limits_override("a", "bananas", 10), ValueError, "metric"),
    (lambda e, d: e.set_limits_override("a", "requests", 0.5), ValueError, "floor"),
    (lambda e, d: e.set_max_in_flight("a", 0), ValueError, "max_in_flight"),
    (lambda e, d: e.set_max_in_flight("a", -1), ValueError, "max_in_flight"),
    (lambda e, d: e.set_max_in_flight("a", 2**32), OverflowError, "max_in_flight"),
    (lambda e, d: e.set_max_in_flight("a", "8"), TypeError, "max_in_flight"),
    (lambda e, d: e.restore(b"junk"), ValueError, "snapshot"),
    (lambda e, d: e.restore("text"), TypeError, "data"),
    (lambda e, d: e.restore(5), TypeError, "data"),
]


@pytest.mark.parametrize("i", range(len(BAD_CALLS)))
def test_every_bad_argument_is_a_sluicegate_error_and_the_builtin_it_resembles(i):
    call, builtin, word = BAD_CALLS[i]
    e, d = _engine()
    with pytest.raises(sluicegate.Error) as err:
        call(e, d)
    assert isinstance(err.value, builtin), type(err.value).__mro__
    assert word in str(err.value), str(err.value)


def test_unknown_keywords_are_type_errors_naming_them_whatever_the_value():
    for value in (None, 1, "x"):
        with pytest.raises(TypeError, match="'sharded'"):
            sluicegate.Engine(sharded=value)
    with pytest.raises(TypeError, match="prio"):
        sluicegate.Engine().admit("a", "m", prio=1)


def test_an_unknown_dialect_names_the_argument_and_the_valid_ones():
    with pytest.raises(sluicegate.ArgumentError) as err:
        sluicegate.Engine(dialect="openAI")
    assert str(err.value) == "dialect must be one of fireworks, together, openai, anthropic, ietf; got 'openAI'"


def test_priority_and_fast_take_ints_as_flags():
    e = sluicegate.Engine("fixed", capacity=10)
    e.set_service_tier_grant("a", "priority")
    assert e.admit("a", "m", priority=1, fast=0, now_ns=0).admitted
    e.set_load("m", 1.1)
    # Under load the priority class still runs where the standard one is shed.
    assert e.admit("a", "m", priority=1, now_ns=0).admitted
    assert e.admit("a", "m", priority=0, now_ns=0).outcome is sluicegate.Outcome.SHED


def test_priority_is_an_alias_of_the_priority_service_tier_and_a_conflict_raises():
    e = sluicegate.Engine("fixed", capacity=10)
    e.set_service_tier_grant("a", "priority")
    assert e.admit("a", "m", priority=True, now_ns=0).service_tier == "priority"
    assert e.admit("a", "m", priority=True, service_tier="priority", now_ns=0).service_tier == "priority"
    # False and None ask for nothing: the service tier given, else default.
    for no_opinion in (False, 0, None):
        assert e.admit("a", "m", priority=no_opinion, now_ns=0).service_tier == "default"
        assert e.admit("a", "m", priority=no_opinion, service_tier="flex", now_ns=0).service_tier == "flex"
    scope = e.scope("a", "m", now_ns=0)
    for call in (lambda **kw: e.admit("a", "m", **kw), scope.admit):
        for other in ("flex", "default"):
            with pytest.raises(sluicegate.ArgumentError, match="priority=True") as err:
                call(priority=True, service_tier=other, now_ns=0)
            assert f"service_tier='{other}'" in str(err.value)
    assert e.remaining("a", "m", now_ns=0)["requests"] == 60 - 8  # the refused calls charged nothing


def _asgi_call(middleware):
    import asyncio

    sent = []

    async def receive():
        return {"type": "http.request", "body": b'{"model": "m", "max_tokens": 10}', "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [(b"authorization", b"Bearer acct")]}
    asyncio.run(middleware(scope, receive, send))
    return sent[0]["status"], {k.decode(): v.decode() for k, v in sent[0]["headers"]}


def test_the_middleware_speaks_the_engines_dialect_unless_told_otherwise():
    from sluicegate.asgi import SluicegateMiddleware

    async def app(scope, receive, send):  # never reached: the engine refuses first
        raise AssertionError

    def refused(**kwargs):
        engine = sluicegate.Engine("fixed", capacity=10, dialect="openai", requests_per_minute=1, hard_factor=1)
        engine.admit("acct", "m")
        return _asgi_call(SluicegateMiddleware(app, engine, account=lambda scope, headers: "acct", **kwargs))

    status, headers = refused()
    assert status == 429 and "x-ratelimit-reset-requests" in headers  # OpenAI's
    status, headers = refused(dialect="fireworks")
    assert status == 429 and "x-ratelimit-reset-requests" not in headers and "x-ratelimit-over-limit" in headers


# Exceptions pickle and cross process boundaries as themselves.

ERROR_NAMES = [
    name for name in sluicegate.__all__ if isinstance(getattr(sluicegate, name), type) and issubclass(getattr(sluicegate, name), BaseException)
]


def test_every_exception_lives_in_sluicegate_under_its_own_name():
    assert len(ERROR_NAMES) == 18
    for name in ERROR_NAMES:
        cls = getattr(sluicegate, name)
        assert (cls.__module__, cls.__qualname__) == ("sluicegate", name)
        assert cls is getattr(sluicegate._sluicegate, name)
    assert "KeyError_" not in repr(sluicegate.InvalidKeyError)


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_every_exception_pickles(name):
    import pickle

    e = getattr(sluicegate, name)("the message")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is type(e) and back.args == ("the message",)


def test_a_raised_error_pickles_with_its_attributes():
    import pickle

    e = sluicegate.Engine("fixed", capacity=10)
    e.admit("a", "m", now_ns=0)
    e.set_quota_limit("a", "a100_gpus", 1)
    e.acquire_quota("a", "a100_gpus")
    with pytest.raises(sluicegate.QuotaExceededError) as err:
        e.acquire_quota("a", "a100_gpus")
    back = pickle.loads(pickle.dumps(err.value))
    assert (type(back), back.args, back.used, back.limit) == (type(err.value), err.value.args, 1, 1)


def _raise(name):
    raise getattr(sluicegate, name)(f"raised in a worker: {name}")


def test_errors_raised_in_a_worker_process_reach_the_parent_as_themselves():
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1) as pool:
        for name in ERROR_NAMES:
            with pytest.raises(getattr(sluicegate, name), match=f"raised in a worker: {name}$") as err:
                pool.submit(_raise, name).result()
            assert type(err.value) is getattr(sluicegate, name)
        # And one the engine raises itself, in the worker.
        with pytest.raises(sluicegate.PolicyError, match="policy must be one of"):
            pool.submit(sluicegate.Engine, "nope").result()


# restore() on a serving engine: a new engine swapped in whole.


def test_restore_accepts_any_bytes_like_object():
    a = sluicegate.Engine("fixed", capacity=64)
    for _ in range(10):
        a.admit("acct", "m", now_ns=0)
    snap = a.snapshot(now_ns=0)
    padded = b"xx" + snap + b"yy"
    for data in (snap, bytearray(snap), memoryview(snap), memoryview(padded)[2:-2], memoryview(bytearray(snap))):
        b = sluicegate.Engine("fixed", capacity=64)
        b.restore(data, now_ns=0)
        assert b.remaining("acct", "m", now_ns=0)["requests"] == 50, type(data)


def test_permits_from_before_a_restore_settle_as_stale():
    e = sluicegate.Engine("fixed", capacity=64)
    snap = e.snapshot(now_ns=0)
    d = e.admit("acct", "m", max_tokens=10, now_ns=0)
    e.restore(snap, now_ns=0)
    with pytest.raises(sluicegate.StalePermitError):
        e.settle(d, now_ns=0)
    with pytest.raises(sluicegate.StalePermitError):
        e.charge(d, 5, now_ns=0)
    # The restored engine works as usual.
    d = e.admit("acct", "m", max_tokens=10, now_ns=0)
    e.settle(d, now_ns=0)


@pytest.fixture
def fast_thread_switches():
    """Switch threads every microsecond, so the threads of a test interleave finely."""
    import sys

    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def test_restore_works_while_another_thread_admits_and_settles(fast_thread_switches):
    import threading
    import time

    e = sluicegate.Engine("fixed", capacity=256, requests_per_minute=10**9)
    e.set_price("m", uncached_prompt=1, cached_prompt=1, generated=1)
    snaps = [e.snapshot()]
    for i in range(5):
        e.admit(f"acct-{i}", "m")
    snaps.append(e.snapshot())
    stop, started = threading.Event(), threading.Event()
    unexpected = []
    counts = {"settled": 0, "stale": 0}

    def serve():
        started.set()
        i = 0
        try:
            while not stop.is_set():
                i += 1
                d = e.admit(f"acct-{i % 7}", "m", prompt_tokens=10, max_tokens=10)
                assert d.admitted
                try:
                    e.settle(d, generated_tokens=5)
                    counts["settled"] += 1
                except sluicegate.StalePermitError:
                    counts["stale"] += 1
        except BaseException as exc:  # anything else fails the test
            unexpected.append(exc)

    worker = threading.Thread(target=serve)
    worker.start()
    started.wait()
    try:
        for i in range(300):
            snap = snaps[i % 2]
            e.restore((snap, bytearray(snap), memoryview(snap))[i % 3])
            time.sleep(0)
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not worker.is_alive()
    assert unexpected == []
    assert counts["settled"] > 0


# Python conventions.


def test_outcome_is_an_enum_hashable_named_and_iterable():
    Outcome = sluicegate.Outcome
    names = ["ADMIT", "ADMIT_OVER_LIMIT", "REJECT_RATE_LIMITED", "SHED", "REJECT_SPEND", "REJECT_INVALID", "REJECT_CONCURRENCY"]
    assert [o.name for o in Outcome] == names and len(Outcome) == 7
    assert list(Outcome) == [Outcome[n] for n in names]
    d = sluicegate.Engine("fixed", capacity=10).admit("a", "m", now_ns=0)
    assert d.outcome is Outcome.ADMIT and d.outcome.name == "ADMIT"
    assert {d.outcome: "run"}[Outcome.ADMIT] == "run"
    assert len({o for o in Outcome} | {d.outcome}) == 7
    assert (repr(Outcome.SHED), str(Outcome.SHED)) == ("Outcome.SHED", "Outcome.SHED")
    assert Outcome.ADMIT == 0 and int(Outcome.REJECT_INVALID) == 5  # as before: an int enum
    assert int(Outcome.REJECT_CONCURRENCY) == 6  # SG_REJECT_CONCURRENCY
    import pickle

    assert pickle.loads(pickle.dumps(d.outcome)) is Outcome.ADMIT


class Index:
    """Not an int, but usable as one (operator.index)."""

    def __init__(self, n):
        self.n = n

    def __index__(self):
        return self.n


def test_counts_and_now_ns_accept_anything_with_index():
    e = sluicegate.Engine("fixed", capacity=10)
    d = e.admit("a", "m", prompt_tokens=Index(1_000), cached_tokens=Index(800), max_tokens=Index(10), n=Index(1), now_ns=Index(0))
    assert d.cost == {"requests": 1, "prompt_tokens": 1_000, "uncached_prompt_tokens": 200, "generated_tokens": 10}
    e.settle(d, prompt_tokens=Index(1_000), generated_tokens=Index(5), now_ns=Index(SECOND))
    assert e.remaining("a", "m", now_ns=Index(SECOND))["requests"] == 60
    with pytest.raises(sluicegate.ArgumentError, match="prompt_tokens must not be negative"):
        e.admit("a", "m", prompt_tokens=Index(-1))
    with pytest.raises(sluicegate.ArgumentOverflowError, match="now_ns must be below 2"):
        e.admit("a", "m", now_ns=Index(2**64))
    # Still not bools, floats or strings.
    for bad in (True, 1.0, "1"):
        with pytest.raises(sluicegate.ArgumentTypeError, match="prompt_tokens must be an int"):
            e.admit("a", "m", prompt_tokens=bad)


def test_counts_accept_numpy_integers():
    np = pytest.importorskip("numpy")
    e = sluicegate.Engine("fixed", capacity=10)
    d = e.admit("a", "m", prompt_tokens=np.int64(1_000), max_tokens=np.uint32(10), n=np.int8(2), now_ns=np.uint64(0))
    assert d.cost["prompt_tokens"] == 1_000 and d.cost["generated_tokens"] == 20  # n=2 completions
    e.settle(d, generated_tokens=np.int32(3), now_ns=np.int64(0))
    with pytest.raises(sluicegate.ArgumentTypeError):
        e.admit("a", "m", prompt_tokens=np.float64(1.0))


def test_the_version_is_the_package_metadata_one():
    import importlib.metadata
    import re

    assert re.fullmatch(r"\d+\.\d+\.\d+.*", sluicegate.__version__)
    assert sluicegate.__version__ == importlib.metadata.version("sluicegate")


def _stub_docs():
    """(class, member or None, docstring) for Engine, Decision, Scope and their public members in the stubs."""
    import ast
    import pathlib

    path = pathlib.Path(sluicegate._sluicegate.__file__).with_name("_sluicegate.pyi")
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name in ("Engine", "Decision", "Scope"):
            yield node.name, None, ast.get_docstring(node)
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                    yield node.name, item.name, ast.get_docstring(item)


def test_runtime_docstrings_are_the_stubs():
    import inspect

    docs = list(_stub_docs())
    assert len(docs) > 40
    for cls, member, doc in docs:
        assert doc, f"{cls}.{member} has no docstring in the stubs"
        obj = getattr(sluicegate, cls) if member is None else getattr(getattr(sluicegate, cls), member)
        assert inspect.getdoc(obj) == doc, f"{cls}.{member}"


def test_help_shows_signatures_with_their_real_defaults():
    import inspect

    admit = str(inspect.signature(sluicegate.Engine.admit))
    assert "prompt_tokens=None" in admit and "priority=False" in admit and "now_ns=None" in admit
    assert admit.endswith("now_ns=None, *, service_tier=None)")
    assert str(inspect.signature(sluicegate.Scope.admit)).endswith("now_ns=None, *, service_tier=None)")
    assert str(inspect.signature(sluicegate.Engine.set_service_tier_grant)) == "(self, /, account, service_tier)"
    assert "completion='success'" in str(inspect.signature(sluicegate.Engine.settle))
    assert "policy='fireworks_2024'" in str(inspect.signature(sluicegate.Engine))
    assert "fast=False" in str(inspect.signature(sluicegate.Engine.limits))
    import pydoc

    text = pydoc.render_doc(sluicegate.Engine.admit, renderer=pydoc.plaintext)
    assert "Decides whether a request may run" in text and "priority=False" in text


# Snapshots of a live engine (SPEC §10): taken while other threads add keys, each one restores.


def test_snapshots_taken_while_threads_add_accounts_all_restore(fast_thread_switches):
    import threading

    capacity = {"capacity": 8192, "accounts": 8192, "models": 16, "permits": 1024}
    live = sluicegate.Engine("fixed", requests_per_minute=10**9, **capacity)
    copy = sluicegate.Engine("fixed", **capacity)
    budget = [0]  # new accounts each thread may have added so far: a few more per snapshot
    made = [0, 0]
    stop, unexpected = threading.Event(), []

    def serve(t):
        i = 0
        try:
            while not stop.is_set():
                if made[t] < budget[0]:
                    account = f"t{t}-{made[t]}"
                    made[t] += 1
                else:
                    account = f"t{t}-{i % max(made[t], 1)}"
                d = live.admit(account, "m", prompt_tokens=10, max_tokens=10)
                live.settle(d, generated_tokens=5)
                i += 1
        except BaseException as exc:
            unexpected.append(exc)

    workers = [threading.Thread(target=serve, args=(t,)) for t in (0, 1)]
    for w in workers:
        w.start()
    refused = []
    try:
        for k in range(1_000):
            budget[0] = 2 * (k + 1)
            snap = live.snapshot()
            try:
                copy.restore(snap)
            except sluicegate.CorruptSnapshotError as e:
                refused.append(f"snapshot {k}: {e}")
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)
    assert unexpected == []
    assert sum(made) > 100, made  # the threads did add accounts while snapshots were taken
    assert refused == [], f"{len(refused)} of 1000 snapshots did not restore, e.g. {refused[:3]}"
    # The last one holds what had been added before it.
    assert copy.account("t0-0")["period_spend"] >= 0
