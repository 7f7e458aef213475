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


# ---------------------------------------------------------------------------------------------
# The ASGI middleware against hostile clients and broken apps (issue 13), driven directly: a
# hand-written receive and send, so every await can be cancelled and every byte counted.

import asyncio  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import tracemalloc  # noqa: E402

from sluicegate import asgi  # noqa: E402
from sluicegate.asgi import SluicegateMiddleware, account_digest  # noqa: E402

KEY = b"hostile tests' deployment key..."
CRED = "sk-test-1"
ACCT = account_digest(CRED, KEY)
BODY = {"model": "m", "messages": [{"role": "user", "content": "ping " * 40}], "max_tokens": 100}
USAGE = {"prompt_tokens": 25, "completion_tokens": 40, "total_tokens": 65}


class Counting:
    """The engine, counting admissions and the settles that went through (exactly-once checks)."""

    def __init__(self, engine):
        self.engine = engine
        self.admitted = []
        self.settles = []
        self.charges = 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def admit(self, *a, **kw):
        d = self.engine.admit(*a, **kw)
        if d.admitted:
            self.admitted.append(d)
        return d

    def settle(self, d, **kw):
        self.engine.settle(d, **kw)
        self.settles.append(kw)

    def charge(self, d, tokens):
        self.engine.charge(d, tokens)
        self.charges += tokens

    def assert_settled_once(self):
        assert len(self.settles) == len(self.admitted), (self.settles, self.admitted)
        for d in self.admitted:
            with pytest.raises(sluicegate.AlreadySettledError):
                self.engine.settle(d)


def engine(**kw):
    kw.setdefault("capacity", 1_000)
    return Counting(sluicegate.Engine("fixed", **kw))


def scope_of(headers=None, path="/v1/chat/completions"):
    h = [(b"authorization", f"Bearer {CRED}".encode()), (b"content-type", b"application/json")]
    h += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    return {"type": "http", "method": "POST", "path": path, "headers": h}


class Exchange:
    """One request through the middleware: what the client sent and what it got back."""

    def __init__(self, body=BODY, chunk=64 * 1024, headers=None):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.chunks = [raw[i : i + chunk] for i in range(0, len(raw), chunk)] or [b""]
        self.received = 0  # request messages handed to the middleware
        self.scope = scope_of(headers)
        self.status = None
        self.headers = {}
        self.body_bytes = 0
        self.body = bytearray()
        self.keep_body = True
        self.hold = asyncio.Event()  # set to let a blocked receive return a disconnect

    async def receive(self):
        if self.received < len(self.chunks):
            self.received += 1
            more = self.received < len(self.chunks)
            return {"type": "http.request", "body": self.chunks[self.received - 1], "more_body": more}
        await self.hold.wait()
        return {"type": "http.disconnect"}

    async def send(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {bytes(k).decode(): bytes(v).decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            self.body_bytes += len(chunk)
            if self.keep_body:
                self.body += chunk

    def json(self):
        return json.loads(bytes(self.body))

    def run(self, middleware):
        asyncio.run(asyncio.wait_for(middleware(self.scope, self.receive, self.send), 30))
        return self


def middleware(app, e, **kw):
    return SluicegateMiddleware(app, e, account_key=KEY, **kw)


def json_app(payload, status=200, headers=()):
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), *headers]})
        await send({"type": "http.response.body", "body": raw})

    return app


def completion(usage=USAGE, choices=None):
    out = {"id": "x", "object": "chat.completion", "choices": choices if choices is not None else [{"index": 0, "message": {"role": "assistant", "content": "word " * 40}}]}
    if usage is not ...:
        out["usage"] = usage
    return out


def sse_app(events, status=200):
    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/event-stream")]})
        for e in events:
            data = e if isinstance(e, bytes) else f"data: {json.dumps(e)}\n\n".encode()
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    return app


# 1. Secrets: the account is a keyed digest; a custom id is checked.


def test_the_default_account_is_a_keyed_digest_and_the_key_comes_from_the_environment(monkeypatch):
    e = engine()
    Exchange().run(middleware(json_app(completion()), e))
    assert e.engine.account(ACCT)
    with pytest.raises(sluicegate.UnknownAccountError):
        e.engine.account(CRED)
    monkeypatch.setenv("SLUICEGATE_ACCOUNT_KEY", "from the environment")
    m = SluicegateMiddleware(json_app(completion()), e)
    assert m.digest(CRED) == account_digest(CRED, b"from the environment") != ACCT
    # A custom account() needs no key, and no random one is drawn for it.
    monkeypatch.delenv("SLUICEGATE_ACCOUNT_KEY")
    custom = SluicegateMiddleware(json_app(completion()), e, account=lambda scope, headers: "acct")
    with pytest.raises(ValueError, match="account_key"):
        custom.digest(CRED)


def test_without_a_key_a_random_process_key_is_used_with_one_warning(monkeypatch, caplog):
    monkeypatch.delenv("SLUICEGATE_ACCOUNT_KEY", raising=False)
    monkeypatch.setattr(asgi, "_process_key", None)
    with caplog.at_level(logging.WARNING, logger="sluicegate.asgi"):
        a = SluicegateMiddleware(json_app(completion()), engine())
        b = SluicegateMiddleware(json_app(completion()), engine())
    assert a.digest(CRED) == b.digest(CRED) != ACCT
    assert len([r for r in caplog.records if "random key" in r.getMessage()]) == 1


@pytest.mark.parametrize("named, status", [("", 400), ("x" * 65, 400), ("é" * 33, 400), (None, 401), ("x" * 64, 200), (b"acct", 200)])
def test_a_custom_account_id_is_checked(named, status):
    e = engine()
    x = Exchange().run(SluicegateMiddleware(json_app(completion()), e, account=lambda scope, headers: named))
    assert x.status == status
    if status == 400:
        assert x.json()["error"]["code"] == "invalid_account"
    e.assert_settled_once()


# 2. Engine errors are 503s with retry-after; never a 500.


def test_every_engine_error_at_admission_is_a_503_or_400_json_never_a_500():
    class Raising(Counting):
        def admit(self, *a, **kw):
            raise self.error("injected")

    for cls in sluicegate._errors.ERRORS:
        e = Raising(sluicegate.Engine("fixed"))
        e.error = cls
        x = Exchange().run(middleware(json_app(completion()), e))
        assert x.headers["content-type"] == "application/json" and "error" in x.json(), cls
        if issubclass(cls, sluicegate.ArgumentError):
            assert x.status == 400, cls  # about the request's own values
        else:
            assert x.status == 503, cls
            assert x.json()["error"]["type"] == "service_unavailable"
            assert 1 <= int(x.headers["retry-after"]) <= 2 and x.headers["x-should-retry"] == "true"


@pytest.mark.parametrize("table", ["scopes", "accounts", "models", "permits"])
def test_each_full_table_is_a_503_and_existing_keys_are_still_served(table):
    sizes = {"scopes": {"capacity": 1}, "accounts": {"accounts": 1}, "models": {"models": 1}, "permits": {"permits": 1}}[table]
    e = engine(**sizes)
    held = None
    if table == "permits":
        held = e.engine.admit("holder", "m")  # the ledger's one permit, outstanding
    else:
        assert Exchange().run(middleware(json_app(completion()), e)).status == 200
    other = Exchange(body={**BODY, "model": "other-model"}, headers={"authorization": "Bearer sk-other"})
    other.scope["headers"] = [h for h in other.scope["headers"] if h[1] != f"Bearer {CRED}".encode()]
    x = other.run(middleware(json_app(completion()), e))
    assert x.status == 503 and x.json()["error"]["code"] == "table_full" and int(x.headers["retry-after"]) >= 1
    if held is None:
        assert Exchange().run(middleware(json_app(completion()), e)).status == 200
    e.assert_settled_once()


def test_errors_of_charge_and_settle_never_reach_the_response():
    class Failing(Counting):
        def charge(self, d, tokens):
            raise sluicegate.StalePermitError("injected")

        def settle(self, d, **kw):
            self.settles.append(kw)
            raise sluicegate.TableFullError("injected")

    e = Failing(sluicegate.Engine("fixed"))
    events = [{"choices": [{"delta": {"content": "word " * 10}}]}] * 5
    x = Exchange(body={**BODY, "stream": True}).run(middleware(sse_app(events), e))
    assert x.status == 200 and bytes(x.body).endswith(b"data: [DONE]\n\n")
    assert len(e.settles) == 1


# 3. Bounded memory: request body, response body, SSE lines, JSON nesting.


def test_a_10_mib_body_is_413_without_being_read():
    async def app(scope, receive, send):  # never reached
        raise AssertionError

    e = engine()
    x = Exchange(body=b"{" + b" " * (10 << 20) + b"}", chunk=64 * 1024).run(middleware(app, e))
    assert x.status == 413 and x.json()["error"]["code"] == "request_too_large"
    # Read up to the cap (1 MiB = 16 chunks of 64 KiB) and one chunk past it, no further.
    assert x.received == 17, x.received
    # A declared length over the cap is refused before anything is read.
    x = Exchange(body=b"{" + b" " * (10 << 20) + b"}", headers={"content-length": str((10 << 20) + 2)}).run(middleware(app, e))
    assert x.status == 413 and x.received == 0
    assert e.admitted == []


def test_the_body_cap_is_configurable():
    e = engine()
    x = Exchange(body={**BODY, "pad": "x" * 5_000}).run(middleware(json_app(completion()), e, max_body_bytes=4_096))
    assert x.status == 413
    assert Exchange().run(middleware(json_app(completion()), e, max_body_bytes=4_096)).status == 200


@pytest.mark.parametrize("depth, status", [(100_000, 400), (1_000, 400), (65, 400), (60, 200)])
def test_deep_json_nesting_is_400(depth, status):
    e = engine()
    body = b'{"model": "m", "max_tokens": 10, "x": ' + b"[" * depth + b"]" * depth + b"}"
    x = Exchange(body=body).run(middleware(json_app(completion()), e))
    assert x.status == status
    if status == 400:
        assert x.json()["error"]["code"] == "nesting_too_deep"


def test_the_meter_holds_a_bounded_amount_of_a_50_mib_response():
    limit = 1 << 20
    m = asgi._Meter(limit)
    m.start([(b"content-type", b"application/json")])
    chunk = b'{"pad": "' + b"a" * (64 * 1024) + b'", '
    for _ in range(800):  # 50 MiB
        m.feed(chunk)
    m.feed(b'"usage": {"prompt_tokens": 7, "completion_tokens": 99}}')
    m.finish()
    assert m.peak <= limit and m.total > 50 << 20
    assert m.tokens() == (7, 0, 99)  # found in the tail


def test_the_meter_holds_a_bounded_amount_of_an_sse_line_without_newline():
    limit = 1 << 20
    m = asgi._Meter(limit)
    m.start([(b"content-type", b"text/event-stream")])
    m.feed(b'data: {"choices": [{"delta": {"content": "hello"}}]}\n\n')
    for _ in range(800):  # a 50 MiB line with no newline
        m.feed(b"x" * (64 * 1024))
    m.finish()
    assert m.peak <= limit
    # The line was counted, not kept: its bytes count as generated text.
    assert m.tokens()[2] >= (50 << 20) // 4


@pytest.mark.parametrize("kind", ["json", "sse", "sse-one-line"])
def test_a_50_mib_response_passes_whole_in_bounded_memory(kind):
    size, piece = 50 << 20, 64 * 1024

    async def app(scope, receive, send):
        await receive()
        ctype = b"application/json" if kind == "json" else b"text/event-stream"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", ctype)]})
        line = b"data: " + json.dumps({"choices": [{"delta": {"content": "w" * (piece - 100)}}]}).encode() + b"\n\n"
        for _ in range(size // piece):
            await send({"type": "http.response.body", "body": line if kind == "sse" else b"a" * piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    e = engine(generated_tokens_per_minute=1e9, requests_per_minute=1_000)
    x = Exchange()
    x.keep_body = False
    tracemalloc.start()
    try:
        x.run(middleware(app, e))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert x.status == 200 and x.body_bytes >= size - piece
    assert peak < 6 << 20, peak  # the 1 MiB buffer, a chunk or two, the interpreter's own
    e.assert_settled_once()


# 4. Exactly one settle per admission: cancellation at every await, usage of every shape.


def cancel_at(point):
    """Runs one request and cancels it at ``point``; returns the counting engine."""
    # hard_factor=1 and 60 requests a minute: after 60, a request waits ~1 s (smoothing).
    e = engine(requests_per_minute=60, hard_factor=1, max_wait=5)
    if point == "smoothing":
        for _ in range(60):
            e.engine.settle(e.engine.admit(ACCT, "m"))
    reached = asyncio.Event()

    async def app(scope, receive, send):
        await receive()
        if point == "app-receive":
            reached.set()
            await receive()  # waits for a disconnect that never comes
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(100):
            if point == "app-own-await" and i == 3:
                reached.set()
                await asyncio.sleep(3600)
            await send({"type": "http.response.body", "body": b'data: {"choices": [{"delta": {"content": "word "}}]}\n\n', "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    x = Exchange(body={**BODY, "stream": True})
    sends = 0

    async def send(message):
        nonlocal sends
        sends += 1
        if (point == "send-start" and sends == 1) or (point == "send-body" and sends == 4):
            reached.set()
            await asyncio.sleep(3600)
        await Exchange.send(x, message)

    async def receive():
        if point == "body" and x.received == 1:
            reached.set()
            await asyncio.sleep(3600)  # the rest of the body never comes
        return await Exchange.receive(x)

    if point == "body":
        x.chunks = [b'{"model": ', b'"m"}']

    async def main():
        task = asyncio.ensure_future(middleware(app, e)(x.scope, receive, send))
        if point == "smoothing":
            while not e.admitted:
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.05)
            assert not task.done()  # waiting out its smoothing delay
        else:
            await asyncio.wait_for(reached.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(main(), 10))
    return e


@pytest.mark.parametrize("point", ["body", "smoothing", "app-receive", "send-start", "send-body", "app-own-await"])
def test_a_cancellation_at_each_await_settles_exactly_once(point):
    e = cancel_at(point)
    if point == "body":
        assert e.admitted == [] and e.settles == []  # nothing admitted yet, nothing to settle
        return
    assert len(e.admitted) == 1
    e.assert_settled_once()
    assert e.settles[0]["completion"] == "cancelled"
    if point == "smoothing":
        # Never forwarded: nothing used.
        assert e.settles[0]["generated_tokens"] == 0 and e.settles[0]["prompt_tokens"] == 0


MALFORMED_USAGE = [
    {"prompt_tokens": "x", "completion_tokens": 40},
    {"prompt_tokens": 25, "completion_tokens": 40, "prompt_tokens_details": 5},
    {"prompt_tokens": 25, "completion_tokens": 40, "prompt_tokens_details": {"cached_tokens": "lots"}},
    {"prompt_tokens": -1, "completion_tokens": 40},
    {"prompt_tokens": 25, "completion_tokens": -40},
    {"prompt_tokens": 25, "completion_tokens": 2**70},
    {"prompt_tokens": 25, "completion_tokens": True},
    {"prompt_tokens": 25, "completion_tokens": 40.5},
    {"prompt_tokens": 25},
    {"prompt_tokens": 5, "completion_tokens": 40, "prompt_tokens_details": {"cached_tokens": 500}},
    "usage",
    [1, 2],
    5,
]


@pytest.mark.parametrize("usage", MALFORMED_USAGE, ids=repr)
def test_usage_of_the_wrong_shape_settles_once_and_passes_the_response(usage):
    e = engine()
    x = Exchange().run(middleware(json_app(completion(usage=usage)), e))
    assert x.status == 200 and x.json()["usage"] == usage
    e.assert_settled_once()
    assert e.settles[0]["completion"] == "success"


@pytest.mark.parametrize("usage", MALFORMED_USAGE, ids=repr)
def test_a_stream_with_usage_of_the_wrong_shape_settles_once(usage):
    e = engine()
    events = [{"choices": [{"delta": {"content": "word " * 8}}]}, {"choices": [5, "x", {"delta": 5}, {"delta": {"content": 7}}]}, {"choices": [], "usage": usage}]
    x = Exchange(body={**BODY, "stream": True}).run(middleware(sse_app(events), e))
    assert x.status == 200 and bytes(x.body).endswith(b"data: [DONE]\n\n")
    e.assert_settled_once()
    assert e.settles[0]["completion"] == "success" and e.settles[0]["generated_tokens"] >= 10


@pytest.mark.parametrize("choices", [[5], "text", [{"message": 5}], [{"message": {"content": {"x": 1}}}], [{"text": ["a", 3, {"text": "b"}]}]], ids=repr)
def test_choices_of_the_wrong_shape_settle_once(choices):
    e = engine()
    x = Exchange().run(middleware(json_app(completion(usage=..., choices=choices)), e))
    assert x.status == 200
    e.assert_settled_once()


def test_cached_above_prompt_is_capped_not_refused():
    e = engine()
    usage = {"prompt_tokens": 5, "completion_tokens": 40, "prompt_tokens_details": {"cached_tokens": 4}}
    Exchange().run(middleware(json_app(completion(usage=usage)), e))
    assert e.settles[0] == {"completion": "success", "prompt_tokens": 5, "cached_tokens": 4, "generated_tokens": 40}


# 5. Unreadable responses: decoded when possible, else charged the reservation, logged once.


def test_a_gzip_response_is_decoded_and_charged_its_usage():
    e = engine()
    raw = gzip.compress(json.dumps(completion()).encode())
    x = Exchange().run(middleware(json_app(raw, headers=[(b"content-encoding", b"gzip")]), e))
    assert x.status == 200 and gzip.decompress(bytes(x.body)) == json.dumps(completion()).encode()
    assert e.settles[0]["generated_tokens"] == 40


def test_a_gzip_stream_is_decoded_and_charged_as_it_goes():
    import zlib

    e = engine()
    c = zlib.compressobj(wbits=31)
    events = [c.compress(f"data: {json.dumps({'choices': [{'delta': {'content': 'word ' * 8}}]})}\n\n".encode()) + c.flush(zlib.Z_SYNC_FLUSH) for _ in range(5)]

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream"), (b"content-encoding", b"gzip")]})
        for ev in events:
            await send({"type": "http.response.body", "body": ev, "more_body": True})
        await send({"type": "http.response.body", "body": c.flush()})

    Exchange(body={**BODY, "stream": True}).run(middleware(app, e))
    assert e.charges == 50 and e.settles[0]["generated_tokens"] == 50


@pytest.mark.parametrize(
    "app",
    [
        json_app(b"\x1b\x00brotli bytes", headers=[(b"content-encoding", b"br")]),
        json_app(b"not json at all"),
        json_app(b"\x1f\x8bnot really gzip", headers=[(b"content-encoding", b"gzip")]),
        json_app({"id": "x"}),  # JSON with neither usage nor choices
        json_app(b'{"choices": [], "pad": "' + b"a" * (2 << 20) + b'"}'),  # too large to hold, no usage
        json_app(b"[" * 100_000 + b"]" * 100_000),  # nested past any recursion limit
        sse_app([b"data: " + b"[" * 100_000 + b"]" * 100_000 + b"\n\n"]),  # the same, as an event
    ],
    ids=["br", "not-json", "bad-gzip", "no-usage-no-choices", "oversized", "deep-json", "deep-sse-event"],
)
def test_an_unreadable_response_is_charged_the_reservation_and_logged_once(app, caplog):
    e = engine()
    with caplog.at_level(logging.DEBUG, logger="sluicegate.asgi"):
        m = middleware(app, e)
        for _ in range(3):
            assert Exchange().run(m).status == 200
    # Omitted fields settle what was reserved: the 100 max_tokens, the estimated prompt.
    assert e.settles == [{"completion": "success"}] * 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "cannot read" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]


# 6. Failures are not successes.


@pytest.mark.parametrize("status", [400, 401, 404, 422, 429, 500, 502, 503])
def test_a_non_2xx_response_settles_as_an_upstream_failure(status):
    e = engine()
    x = Exchange().run(middleware(json_app({"error": {"message": "no"}}, status=status), e))
    assert x.status == status
    assert e.settles == [{"completion": "upstream_failure", "prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0}]


@pytest.mark.parametrize("when", ["before-start", "mid-stream"])
def test_an_app_exception_settles_as_an_upstream_failure(when):
    async def app(scope, receive, send):
        await receive()
        if when == "mid-stream":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": b'data: {"choices": [{"delta": {"content": "word word "}}]}\n\n', "more_body": True})
        raise RuntimeError("the app broke")

    e = engine()
    with pytest.raises(RuntimeError, match="the app broke"):
        Exchange(body={**BODY, "stream": True}).run(middleware(app, e))
    e.assert_settled_once()
    assert e.settles[0]["completion"] == "upstream_failure"


def test_an_app_that_answers_nothing_settles_as_an_upstream_failure():
    async def app(scope, receive, send):
        await receive()

    e = engine()
    Exchange().run(middleware(app, e))
    assert [s["completion"] for s in e.settles] == ["upstream_failure"]


def test_a_non_streamed_request_abandoned_before_its_answer_is_charged_its_reservation():
    async def app(scope, receive, send):
        await receive()
        assert (await receive())["type"] == "http.disconnect"  # the client left; the backend may finish anyway

    e = engine()
    x = Exchange()
    x.hold.set()
    x.run(middleware(app, e))
    assert e.settles == [{"completion": "cancelled"}]


# 7 and 8. Tiers and variants, at the admission.


def test_the_tier_callback_sees_the_account_and_the_body_may_only_lower_it():
    seen = []
    e = engine()
    e.engine.set_load("m", 1.1)  # in-limit default is shed, in-limit priority is not

    def tier(account):
        seen.append(account)
        return "priority"

    assert Exchange().run(middleware(json_app(completion()), e, service_tier=tier)).status == 200
    assert seen == [ACCT]
    for lower in ("default", "flex"):
        assert Exchange(body={**BODY, "service_tier": lower}).run(middleware(json_app(completion()), e, service_tier=tier)).status == 503
    assert Exchange(body={**BODY, "service_tier": "auto"}).run(middleware(json_app(completion()), e, service_tier=tier)).status == 200
    # A callback naming no tier falls back to default, with a warning.
    assert Exchange().run(middleware(json_app(completion()), e, service_tier=lambda a: "gold")).status == 503


class Granting(Counting):
    """The engine, recording the service tier grants pushed into it (``fail``: refusing them)."""

    def __init__(self, engine, fail=False):
        super().__init__(engine)
        self.grants = []
        self.fail = fail

    def set_service_tier_grant(self, account, tier):
        self.grants.append((account, tier))
        if self.fail:
            raise sluicegate.TableFullError("the accounts table is full")
        self.engine.set_service_tier_grant(account, tier)


def named(ids):
    """An ``account`` callback naming the accounts of ``ids`` in turn."""
    it = iter(ids)
    return lambda scope, headers: next(it)


def test_the_operators_grant_is_written_at_each_request_and_a_change_takes_at_once():
    e = Granting(sluicegate.Engine("fixed", capacity=1_000))
    e.engine.set_load("m", 1.1)  # in-limit default is shed, in-limit priority is not
    granted = {"gold": "priority", "batch": "flex"}
    m = middleware(json_app(completion()), e, account=named(["gold", "batch"] * 3 + ["gold"]), service_tier=lambda a: granted.get(a, "default"))
    assert [Exchange().run(m).status for _ in range(6)] == [200, 503] * 3
    assert e.grants == [(b"gold", "priority"), (b"batch", "flex")] * 3
    assert e.engine.account("gold")["service_tier_grant"] == "priority"
    assert e.engine.account("batch")["service_tier_grant"] == "flex"
    # Taken back: written at the account's next request, which is served as default.
    granted["gold"] = "default"
    assert Exchange().run(m).status == 503
    assert e.grants[-1] == (b"gold", "default") and e.engine.account("gold")["service_tier_grant"] == "default"


def test_made_up_accounts_are_granted_default_and_the_middleware_keeps_nothing_of_them():
    e = Granting(sluicegate.Engine("fixed", capacity=1_000))
    m = middleware(json_app(completion()), e, account=named(f"made-up-{i}" for i in range(200)))
    before = dict(vars(m))
    assert all(Exchange().run(m).status == 200 for _ in range(200))
    assert vars(m).keys() == before.keys() and all(vars(m)[k] is before[k] for k in before if k != "_warned")
    assert e.grants == [(f"made-up-{i}".encode(), "default") for i in range(200)]
    assert e.engine.account("made-up-7")["service_tier_grant"] == "default"


def test_a_grant_the_engine_refuses_is_logged_and_the_request_served_at_the_engines_grant(caplog):
    e = Granting(sluicegate.Engine("fixed", capacity=1_000), fail=True)
    with caplog.at_level(logging.DEBUG, logger="sluicegate.asgi"):
        m = middleware(json_app(completion()), e, service_tier=lambda a: "priority")
        assert Exchange().run(m).status == 200
        e.engine.set_load("m", 1.1)
        assert Exchange().run(m).status == 503  # served at default, the engine's grant
    assert len(e.grants) == 2  # tried again, since it did not take
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "could not grant" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    e.assert_settled_once()


def test_a_grant_the_engine_lost_is_written_again_at_the_next_request():
    e = Granting(sluicegate.Engine("fixed", capacity=1_000))
    m = middleware(json_app(completion()), e, service_tier=lambda a: "priority")
    assert Exchange().run(m).status == 200
    # Another process (or a restore) leaves the engine at default; at load 1.1 the next request
    # would be shed as default, but it writes the grant back first and runs as priority.
    e.engine.set_service_tier_grant(ACCT, "default")
    e.engine.set_load("m", 1.1)
    assert Exchange().run(m).status == 200
    assert e.engine.account(ACCT)["service_tier_grant"] == "priority"
    assert e.grants == [(ACCT.encode(), "priority")] * 2


@pytest.mark.parametrize(
    "body, code",
    [
        ({**BODY, "max_tokens": "100"}, "invalid_max_tokens"),
        ({**BODY, "max_tokens": -1}, "invalid_max_tokens"),
        ({**BODY, "max_tokens": 2**70}, "invalid_max_tokens"),
        ({**BODY, "n": 0}, "invalid_n"),
        ({**BODY, "n": [2]}, "invalid_n"),
        ({**BODY, "model": "m" * 129}, "invalid_model"),
        ({**BODY, "model": "\ud800"}, "invalid_model"),
        ({**BODY, "model": 5}, "invalid_json"),
        ([BODY], "invalid_json"),
    ],
    ids=repr,
)
def test_bad_request_fields_are_400_with_a_code(body, code):
    e = engine()
    raw = json.dumps(body).encode()
    x = Exchange(body=raw).run(middleware(json_app(completion()), e))
    assert x.status == 400 and x.json()["error"]["code"] == code
    assert e.admitted == []


def test_a_body_that_is_not_utf8_is_400():
    e = engine()
    x = Exchange(body=json.dumps(BODY).encode("utf-16")).run(middleware(json_app(completion()), e))
    assert x.status == 400 and x.json()["error"]["code"] == "invalid_json"


# 9. Too many requests in flight (issue 19): the engine's own 429, rendered by the engine.


@pytest.mark.parametrize("dialect", sluicegate.DIALECTS)
def test_a_concurrency_refusal_is_a_429_with_the_engines_headers_and_body(dialect):
    e = engine(max_in_flight=1)
    held = e.engine.admit(ACCT, "m", prompt_tokens=10, max_tokens=100)  # the account's one place
    assert held.admitted
    x = Exchange().run(middleware(json_app(completion()), e, dialect=dialect))
    # What the engine renders for the same refusal, in the same dialect, plus the content type.
    same = e.engine.admit(ACCT, "m", prompt_tokens=10, max_tokens=100)
    assert (same.outcome, same.reason) == (sluicegate.Outcome.REJECT_CONCURRENCY, "concurrency_limited")
    assert x.status == same.status_code == 429
    length = str(len(x.body))
    assert x.headers == {**dict(same.headers(dialect)), "content-type": "application/json", "content-length": length}
    assert x.headers["retry-after"] == "1" and x.headers["x-should-retry"] == "true"
    error, rendered = x.json()["error"], same.error_body(dialect)["error"]
    assert error["message"] == rendered["message"] and error["code"] == rendered["code"] == "concurrency_limited"
    assert e.admitted == [] and e.engine.account(ACCT)["in_flight"] == 1  # the refusal held no place
    # Once the held request settles, its place serves the next one.
    e.engine.settle(held)
    assert Exchange().run(middleware(json_app(completion()), e, dialect=dialect)).status == 200
    e.assert_settled_once()
    assert e.engine.account(ACCT)["in_flight"] == 0
