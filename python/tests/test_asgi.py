"""The ASGI middleware with real parts: uvicorn on 127.0.0.1, the official openai client."""

import threading
import time

import http_sf
import httpx
import openai
import pytest

import sluicegate
from sluicegate.asgi import SluicegateMiddleware, account_digest

import fake_apis
from fake_upstream import COMPLETION_TOKENS, SEEN, app as upstream

MODEL = "llama-v3p1-70b"
MESSAGES = [{"role": "user", "content": "ping " * 40}]
KEY = b"deployment key of the tests, 32b"
ACCT = account_digest("acct-1", KEY)
"""The engine's account of the bearer key ``acct-1``: its digest, never the key."""


class Server(fake_apis.Server):
    """uvicorn serving `app` on a free loopback port, with an OpenAI client for it."""

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, key="acct-1", retries=0):
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=retries, timeout=10)


def serve(engine, dialect="fireworks", **kw):
    return Server(SluicegateMiddleware(upstream, engine, dialect=dialect, account_key=KEY, **kw))


def create(client, **kw):
    return client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=100, **kw)


def test_the_client_receives_the_rate_limit_headers():
    engine = sluicegate.Engine(capacity=1_000)
    with serve(engine) as s:
        raw = create(s.client())
        assert raw.http_response.status_code == 200
        h = raw.headers
        assert h["x-ratelimit-limit-requests"] == "60"
        assert h["x-ratelimit-remaining-requests"] == "59"
        assert h["x-ratelimit-limit-tokens-generated"] == "6000"
        assert h["x-ratelimit-over-limit"] == "no"
        assert raw.parse().choices[0].message.content.startswith("alpha")
    # Settled with the upstream's usage: 40 generated tokens, not the 100 reserved.
    assert engine.remaining(ACCT, MODEL)["generated_tokens"] >= 6_000 - COMPLETION_TOKENS - 1


def test_a_429_carries_retry_after_which_the_client_obeys():
    engine = sluicegate.Engine(policy="fixed", capacity=1_000, requests_per_minute=60)
    with serve(engine) as s:
        # Real time passes while we send, so the bucket refills a little: send until refused.
        refused = None
        for _ in range(200):
            try:
                create(s.client())
            except openai.RateLimitError as exc:
                refused = exc
                break
        assert refused is not None, "60 RPM must refuse within 200 quick requests"
        refused_at = time.monotonic()
        response = refused.response
        assert response.headers["retry-after"] == "1"
        wait_ms = int(response.headers["retry-after-ms"])
        assert 0 < wait_ms <= 1_000
        assert response.json()["error"]["type"] == "dynamic_request_limited"
        # The client retries after retry-after-ms and succeeds once a request has refilled,
        # which cannot happen sooner than retry-after-ms after the refusal.
        raw = create(s.client(retries=3))
        assert raw.http_response.status_code == 200
        assert time.monotonic() - refused_at >= wait_ms / 1_000 - 0.01


def test_a_stream_is_charged_its_real_generated_tokens():
    # 60 generated tokens a minute refill one a second: the counts below are exact to a token.
    engine = sluicegate.Engine(policy="fixed", capacity=1_000, generated_tokens_per_minute=60, requests_per_minute=1_000)
    with serve(engine) as s:
        stream = s.client().chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=55, stream=True, stream_options={"include_usage": True}
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text.startswith("alpha bravo")
        # The server settles just after the last byte reaches the client.
        deadline = time.monotonic() + 2
        while engine.remaining(ACCT, MODEL)["generated_tokens"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        left = engine.remaining(ACCT, MODEL)["generated_tokens"]
    # Reserved 55; the final usage chunk reports 40: that is what stays charged.
    assert 60 - COMPLETION_TOKENS <= left <= 60 - COMPLETION_TOKENS + 2, left


def test_a_stream_without_usage_is_charged_from_its_text():
    # 60 generated tokens a minute refill one a second, so the charge is still visible after.
    engine = sluicegate.Engine(policy="fixed", capacity=1_000, generated_tokens_per_minute=60, requests_per_minute=1_000)
    with serve(engine) as s:
        stream = s.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    used = 60 - engine.remaining(ACCT, MODEL)["generated_tokens"]
    # 16 words of ~6 characters: about 24 tokens counted from the text, more than the 16 reserved.
    assert 16 < used <= len(text) // 4 + 1, (used, len(text))


def test_an_over_limit_request_passes_at_lower_priority():
    engine = sluicegate.Engine(capacity=1_000)
    with serve(engine) as s:
        client = s.client()
        for _ in range(60):
            create(client)
        raw = create(client)
        assert raw.http_response.status_code == 200
        assert raw.headers["x-ratelimit-over-limit"] == "yes"


def test_ietf_fields_parse_as_structured_fields():
    engine = sluicegate.Engine(capacity=1_000)
    with serve(engine, dialect="ietf") as s:
        raw = create(s.client())
        policy = http_sf.parse(raw.headers["ratelimit-policy"].encode(), tltype="list")
        state = http_sf.parse(raw.headers["ratelimit"].encode(), tltype="list")
    by_name = {name: params for name, params in policy}
    assert by_name["requests"] == {"q": 60, "w": 60, "qu": "requests"}
    assert by_name["generated-tokens"]["q"] == 6_000
    remaining = {name: params for name, params in state}
    assert remaining["requests"]["r"] == 59


def test_a_client_that_disconnects_mid_stream_is_settled_with_what_it_used():
    engine = sluicegate.Engine(capacity=1_000)
    with serve(engine) as s:
        with httpx.Client(timeout=10) as http:
            body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2_000, "stream": True, "seconds_per_word": 0.01}
            with http.stream("POST", f"{s.url}/chat/completions", json=body, headers={"authorization": "Bearer acct-1"}) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if i > 10:
                        break
        deadline = time.monotonic() + 5
        # Cancelled, once, with what was streamed: the 2,000-token reservation comes back.
        while engine.remaining(ACCT, MODEL)["generated_tokens"] < 5_000 and time.monotonic() < deadline:
            time.sleep(0.05)
    # The few streamed tokens refill within milliseconds at 100 a second; the point is that the
    # 2,000 reserved came back and the settle raised nothing.
    assert engine.remaining(ACCT, MODEL)["generated_tokens"] >= 5_000


def test_malformed_json_and_missing_keys_get_json_errors():
    engine = sluicegate.Engine(capacity=1_000)
    with serve(engine) as s, httpx.Client(timeout=10) as http:
        bad = http.post(f"{s.url}/chat/completions", content=b"{not json", headers={"authorization": "Bearer a"})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request"
        anonymous = http.post(f"{s.url}/chat/completions", json={"model": MODEL, "messages": MESSAGES})
        assert anonymous.status_code == 401


def test_an_overloaded_model_sheds_with_503_and_retry_after():
    engine = sluicegate.Engine(capacity=1_000)
    engine.set_load(MODEL, 2.0)
    with serve(engine) as s:
        with pytest.raises(openai.InternalServerError) as shed:
            create(s.client())
        assert shed.value.response.status_code == 503
        assert int(shed.value.response.headers["retry-after"]) >= 1
        assert shed.value.response.json()["error"]["type"] == "service_overloaded"


def test_too_many_requests_in_flight_is_a_429_the_client_retries():
    # Issue 19: the account's one place is held; the openai client gets 429 concurrency_limited
    # with retry-after 1 and x-should-retry, and its retry succeeds once the place is free.
    engine = sluicegate.Engine(capacity=1_000, max_in_flight=1)
    held = engine.admit(ACCT, MODEL, prompt_tokens=10, max_tokens=100)
    with serve(engine) as s:
        with pytest.raises(openai.RateLimitError) as refused:
            create(s.client())
        response = refused.value.response
        assert response.headers["retry-after"] == "1" and response.headers["x-should-retry"] == "true"
        assert response.json()["error"]["type"] == "concurrency_limited"
        threading.Timer(0.2, engine.settle, args=(held,)).start()
        started = time.monotonic()
        assert create(s.client(retries=2)).http_response.status_code == 200
        assert time.monotonic() - started >= 0.9  # it waited the retry-after
    assert engine.account(ACCT)["in_flight"] == 0


def test_upstream_failures_are_settled_but_not_counted():
    engine = sluicegate.Engine(capacity=1_000)
    with serve(engine) as s:
        with pytest.raises(openai.APIStatusError):
            s.client().chat.completions.create(model="broken", messages=MESSAGES, max_tokens=100)
    # Settled (the reservation is back), so a second settle would be refused; nothing leaked.
    assert engine.remaining(ACCT, "broken")["generated_tokens"] == 6_000


def test_a_stream_that_outlives_its_permit_still_reaches_the_client():
    # permit_ttl=1: the permit expires mid-stream (SPEC 7). Its reservation stays charged; the
    # stream goes on to the end, and neither the charges nor the settle break the response.
    engine = sluicegate.Engine(policy="fixed", capacity=1_000, permit_ttl=1.0)
    with serve(engine) as s, httpx.Client(timeout=10) as http:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 12, "stream": True, "seconds_per_word": 0.25}
        with http.stream("POST", f"{s.url}/chat/completions", json=body, headers={"authorization": "Bearer acct-1"}) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data:")]
        assert len(lines) == 12 + 1 and lines[-1] == "data: [DONE]"
        # The server is still healthy: the next request is admitted and answered.
        assert create(s.client()).http_response.status_code == 200


# Issue 13: real traffic. Hostile or merely ordinary clients, over HTTP.

SK_PROJ = "sk-proj-" + "Abc123XyZ_-" * 14 + "T3BlbkFJ"  # an OpenAI-style project key, ~170 bytes


def test_a_real_openai_key_is_served_and_never_stored():
    assert len(SK_PROJ) > 150
    engine = sluicegate.Engine(capacity=1_000)
    with serve(engine) as s:
        raw = create(s.client(key=SK_PROJ))
        assert raw.http_response.status_code == 200
    account = account_digest(SK_PROJ, KEY)
    assert len(account) == 32 and engine.account(account)  # the digest is the account
    snapshot = engine.snapshot()
    for secret in (SK_PROJ.encode(), KEY):
        assert not any(secret[i : i + 16] in snapshot for i in range(len(secret) - 15)), secret
    assert account.encode() in snapshot


def test_a_flood_of_made_up_keys_and_models_never_denies_existing_accounts():
    import random

    rng = random.Random(13)
    # A small engine: 64 scopes and accounts. Only requests are limited, generously, so any
    # refusal of an existing account would be the flood's doing.
    engine = sluicegate.Engine("fixed", capacity=64, requests_per_minute=1_000_000)
    existing = [f"sk-existing-{i}" for i in range(4)]
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 10}
    statuses = {}
    existing_failures = 0
    with serve(engine) as s, httpx.Client(timeout=10) as http:
        url = f"{s.url}/chat/completions"
        for key in existing:
            assert http.post(url, json=body, headers={"authorization": f"Bearer {key}"}).status_code == 200
        for i in range(600):
            key = "sk-" + "".join(rng.choice("abcdef0123456789") for _ in range(rng.choice([8, 40, 200])))
            model = "m-" + "".join(rng.choice("xyz") for _ in range(12))
            r = http.post(url, json={**body, "model": model}, headers={"authorization": f"Bearer {key}"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "table_full" and int(r.headers["retry-after"]) >= 1
            if i % 5 == 0:
                for key in existing:
                    if http.post(url, json=body, headers={"authorization": f"Bearer {key}"}).status_code != 200:
                        existing_failures += 1
    print(f"flood: {statuses}; existing-account requests: {120 * len(existing)}, failed: {existing_failures}")
    assert set(statuses) <= {200, 503} and statuses.get(503, 0) > 0, statuses
    assert existing_failures == 0


def test_a_4xx_from_the_backend_is_refunded_as_an_upstream_failure():
    engine = sluicegate.Engine(capacity=1_000)
    with serve(engine) as s:
        with pytest.raises(openai.BadRequestError):
            s.client().chat.completions.create(model="reject", messages=MESSAGES, max_tokens=1_000)
    assert engine.remaining(ACCT, "reject")["generated_tokens"] == 6_000


def test_the_app_is_asked_for_an_uncompressed_response():
    engine = sluicegate.Engine(capacity=1_000)
    with serve(engine) as s:
        # The openai client asks for gzip; the app is asked for identity, which it can read.
        create(s.client())
    assert SEEN["accept-encoding"] == "identity"


def test_a_request_body_over_the_cap_is_413_and_deep_nesting_is_400():
    engine = sluicegate.Engine(capacity=1_000)
    with serve(engine) as s, httpx.Client(timeout=10) as http:
        url, auth = f"{s.url}/chat/completions", {"authorization": "Bearer acct-1"}
        big = http.post(url, content=b'{"model": "m", "x": "' + b"a" * (10 << 20) + b'"}', headers=auth)
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        deep = b'{"model": "m", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        r = http.post(url, content=deep, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["code"] == "nesting_too_deep"
        r = http.post(url, content=b'{"model": "m", "x": ' + b"[" * 65 + b"]" * 65 + b"}", headers=auth)
        assert r.status_code == 400 and r.json()["error"]["code"] == "nesting_too_deep"
        assert create(s.client()).http_response.status_code == 200
    # Nothing was admitted for the refused ones.
    assert engine.remaining(ACCT, "m")["requests"] == 60


def test_a_self_declared_priority_does_not_escape_shedding():
    engine = sluicegate.Engine(capacity=1_000)
    engine.set_load(MODEL, 1.1)  # sheds in-limit default (1.0), not in-limit priority (1.2)
    with serve(engine) as s:
        for kw in ({"extra_headers": {"x-priority": "high"}}, {"extra_body": {"service_tier": "priority"}}):
            with pytest.raises(openai.InternalServerError) as shed:
                create(s.client(), **kw)
            assert shed.value.response.status_code == 503


def test_a_granted_tier_is_honoured_and_a_client_may_only_lower_it():
    engine = sluicegate.Engine(capacity=1_000)
    engine.set_load(MODEL, 1.1)
    granted = {ACCT: "priority"}
    with serve(engine, service_tier=lambda account: granted.get(account, "default")) as s:
        assert create(s.client()).http_response.status_code == 200
        assert create(s.client(), extra_body={"service_tier": "priority"}).http_response.status_code == 200
        for lower in ("default", "flex"):
            with pytest.raises(openai.InternalServerError):
                create(s.client(), extra_body={"service_tier": lower})
        # Another account, granted nothing, is shed even when it asks for priority.
        with pytest.raises(openai.InternalServerError):
            create(s.client(key="acct-2"), extra_body={"service_tier": "priority"})


def test_the_operators_grant_is_pushed_into_the_engine_and_a_body_may_lower_it_to_flex():
    engine = sluicegate.Engine(capacity=1_000)
    engine.set_load(MODEL, 0.75)  # sheds in-limit flex (0.7), not in-limit default (1.0)
    granted = {ACCT: "priority"}
    other = account_digest("acct-2", KEY)
    with serve(engine, service_tier=lambda account: granted.get(account, "default")) as s:
        assert create(s.client()).http_response.status_code == 200
        assert engine.account(ACCT)["service_tier_grant"] == "priority"
        with pytest.raises(openai.InternalServerError):
            create(s.client(), extra_body={"service_tier": "flex"})
        # Never granted: asking for priority is served at default, which runs at 0.75...
        assert create(s.client(key="acct-2"), extra_body={"service_tier": "priority"}).http_response.status_code == 200
        assert engine.account(other)["service_tier_grant"] == "default"
        # ...and is shed at 1.1, where the granted account's priority runs.
        engine.set_load(MODEL, 1.1)
        with pytest.raises(openai.InternalServerError):
            create(s.client(key="acct-2"), extra_body={"service_tier": "priority"})
        assert create(s.client(), extra_body={"service_tier": "priority"}).http_response.status_code == 200
        # Taken back: pushed at the account's next request, which is shed as default.
        granted[ACCT] = "default"
        with pytest.raises(openai.InternalServerError):
            create(s.client())
    assert engine.account(ACCT)["service_tier_grant"] == "default"


def test_the_fast_variant_has_its_own_limits():
    engine = sluicegate.Engine(capacity=1_000)
    with serve(engine) as s:
        c = s.client()
        c.chat.completions.create(model=MODEL + "-fast", messages=MESSAGES, max_tokens=10)
        c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, extra_headers={"x-sluicegate-variant": "fast"})
        c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10)
    assert engine.remaining(ACCT, MODEL, fast=True)["requests"] == 58
    assert engine.remaining(ACCT, MODEL)["requests"] == 59


def test_the_fast_variant_convention_is_configurable():
    from sluicegate.asgi import fast_variant

    engine = sluicegate.Engine(capacity=1_000)
    with serve(engine, variant=fast_variant(suffix=":turbo", header=None)) as s:
        c = s.client()
        c.chat.completions.create(model=MODEL + ":turbo", messages=MESSAGES, max_tokens=10)
        # Without a header in the convention, a client's header selects nothing.
        c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, extra_headers={"x-sluicegate-variant": "fast"})
        c.chat.completions.create(model=MODEL + "-fast", messages=MESSAGES, max_tokens=10)
    assert engine.remaining(ACCT, MODEL, fast=True)["requests"] == 59
    assert engine.remaining(ACCT, MODEL)["requests"] == 59
    assert engine.remaining(ACCT, MODEL + "-fast")["requests"] == 59
