"""The official SDKs against the middleware under uvicorn, each in its provider's dialect (issue 21).

For every SDK and every endpoint it speaks (``openai``: Chat Completions, Completions, Responses,
Embeddings; ``anthropic``: Messages; ``together``: Chat Completions, Completions, Embeddings;
``fireworks-ai``: Chat Completions, Completions, Messages):

- a 429 is the SDK's own ``RateLimitError`` carrying the provider's error type and headers, and
  exactly one ``x-should-retry``;
- the SDK's default retries succeed after the real refill (60 requests a minute: about a second);
- a request that can never fit raises at once: one request reaches the server, not three;
- streamed and non-streamed usage are charged: what the upstream reports, through the engine's
  ``remaining``.

An SDK that cannot be imported skips its tests, saying so.
"""

import importlib
import json
import time

import pytest

import sluicegate
from sluicegate.asgi import SluicegateMiddleware, account_digest

from fake_apis import CACHED, EMBEDDING_PROMPT, GENERATED, PROMPT, Counted, Server, app as upstream

MODEL = "llama-v3p1-8b"
KEY = b"deployment key of the SDK tests!"
API_KEY = "sk-sdk-test-1"
ACCT = account_digest(API_KEY, KEY)
TEXT = "ping " * 8  # about 10 tokens by the middleware's estimate; the upstream reports 30
MAX = 50  # reserved; the upstream reports 40 generated


class Sdk:
    """How one SDK is built and how it calls each endpoint."""

    def __init__(self, name, module, dialect, client, calls, v1=False):
        self.name, self.module, self.dialect, self.make, self.calls, self.v1 = name, module, dialect, client, calls, v1

    def client(self, server, **kw):
        mod = pytest.importorskip(self.module, reason=f"the {self.name} SDK cannot be imported here")
        url = server.origin + ("/v1" if self.v1 else "")
        return self.make(mod, url, kw)


def _chat(c, stream=False, max_tokens=MAX, **kw):
    if stream:
        return "".join(x.choices[0].delta.content or "" for x in c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": TEXT}], max_tokens=max_tokens, stream=True,
            extra_body={"stream_options": {"include_usage": True}}, **kw) if x.choices)
    return c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": TEXT}], max_tokens=max_tokens, **kw).choices[0].message.content


def _completions(c, stream=False, max_tokens=MAX, **kw):
    if stream:
        return "".join(x.choices[0].text or "" for x in c.completions.create(
            model=MODEL, prompt=TEXT, max_tokens=max_tokens, stream=True,
            extra_body={"stream_options": {"include_usage": True}}, **kw) if x.choices)
    return c.completions.create(model=MODEL, prompt=TEXT, max_tokens=max_tokens, **kw).choices[0].text


def _responses(c, stream=False, max_tokens=MAX, **kw):
    if stream:
        return "".join(e.delta for e in c.responses.create(model=MODEL, input=TEXT, max_output_tokens=max_tokens, stream=True, **kw)
                       if e.type == "response.output_text.delta")
    return c.responses.create(model=MODEL, input=TEXT, max_output_tokens=max_tokens, **kw).output_text


def _embeddings(c, stream=False, max_tokens=None, **kw):
    # Nothing is generated: a request that can never fit is one whose prompt can never fit.
    text = TEXT if max_tokens is None else "word " * (max_tokens * 4)
    return c.embeddings.create(model=MODEL, input=[text], **kw).data[0].embedding


def _messages(c, stream=False, max_tokens=MAX, **kw):
    args = dict(model=MODEL, max_tokens=max_tokens, system="Be brief.", messages=[{"role": "user", "content": TEXT}], **kw)
    if stream and type(c).__module__.startswith("fireworks"):
        # fireworks-ai declares no event stream for Messages: read its lines as they come.
        with c.messages.with_streaming_response.create(stream=True, **args) as r:
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
        return "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    if stream:
        return "".join(e.delta.text for e in c.messages.create(stream=True, **args) if e.type == "content_block_delta")
    return "".join(block.text for block in c.messages.create(**args).content)


CALLS = {"chat": _chat, "completions": _completions, "responses": _responses, "embeddings": _embeddings, "messages": _messages}

SDKS = [
    Sdk("openai", "openai", "openai", lambda m, url, kw: m.OpenAI(base_url=url, api_key=API_KEY, timeout=10, **kw),
        ["chat", "completions", "responses", "embeddings"], v1=True),
    Sdk("anthropic", "anthropic", "anthropic", lambda m, url, kw: m.Anthropic(base_url=url, api_key=API_KEY, timeout=10, **kw), ["messages"]),
    Sdk("together", "together", "together", lambda m, url, kw: m.Together(base_url=url, api_key=API_KEY, timeout=10, **kw),
        ["chat", "completions", "embeddings"]),
    Sdk("fireworks-ai", "fireworks", "fireworks", lambda m, url, kw: m.Fireworks(base_url=url, api_key=API_KEY, timeout=10, **kw),
        ["chat", "completions", "messages"]),
]
CASES = [pytest.param(sdk, endpoint, id=f"{sdk.name}-{endpoint}") for sdk in SDKS for endpoint in sdk.calls]
STREAMED = [pytest.param(sdk, endpoint, stream, id=f"{sdk.name}-{endpoint}-{'stream' if stream else 'whole'}")
            for sdk in SDKS for endpoint in sdk.calls for stream in ((False, True) if endpoint != "embeddings" else (False,))]

HEADER = {"openai": "x-ratelimit-limit-requests", "anthropic": "anthropic-ratelimit-requests-limit",
          "together": "x-ratelimit-limit", "fireworks": "x-ratelimit-over-limit"}
"""A header only each dialect sends."""


def serve(engine, sdk):
    counted = Counted(SluicegateMiddleware(upstream, engine, dialect=sdk.dialect, account_key=KEY))
    return Server(counted), counted


def rate_limit_error(sdk):
    return importlib.import_module(sdk.module).RateLimitError


def dialect_of(sdk, endpoint):
    return "anthropic" if endpoint == "messages" else sdk.dialect


def error_of(exc):
    """The ``error`` object of a refusal, whichever shape the SDK kept of the body."""
    body = exc.response.json()
    return body["error"], body


def exhaust(engine, model=MODEL):
    """Takes every request the account has left, so the next one is refused for a refill."""
    while True:
        d = engine.admit(ACCT, model, prompt_tokens=1, max_tokens=1)
        if not d.admitted:
            return d.retry_after
        engine.settle(d, prompt_tokens=1, generated_tokens=1)


@pytest.mark.parametrize("sdk, endpoint", CASES)
def test_a_429_is_the_sdks_rate_limit_error_with_the_providers_type(sdk, endpoint):
    engine = sluicegate.Engine("fixed", capacity=100, requests_per_minute=6)
    server, counted = serve(engine, sdk)
    with server as s:
        client = sdk.client(s, max_retries=0)
        exhaust(engine)
        with pytest.raises(rate_limit_error(sdk)) as refused:
            CALLS[endpoint](client)
    exc = refused.value
    assert exc.status_code == 429 and counted.statuses == [429]
    error, body = error_of(exc)
    if dialect_of(sdk, endpoint) == "anthropic":
        # Anthropic's shape: {"type": "error", "error": {"type": "rate_limit_error", ...}}.
        assert body["type"] == "error" and error["type"] == "rate_limit_error"
        assert error["code"] == "dynamic_request_limited" and error["metric"] == "requests"
        if sdk.name == "anthropic":
            assert exc.type == "rate_limit_error"  # the SDK reads the provider's type
    else:
        assert error["type"] == error["code"] == "dynamic_request_limited" and error["metric"] == "requests"
        if sdk.name == "openai":
            assert exc.type == exc.code == "dynamic_request_limited"
    headers = exc.response.headers
    assert HEADER[dialect_of(sdk, endpoint)] in headers
    assert headers.get_list("x-should-retry") == ["true"]  # the engine's, not duplicated
    assert 9_000 <= int(headers["retry-after-ms"]) <= 10_000  # 6 a minute: one refills in 10 s


@pytest.mark.parametrize("sdk, endpoint", CASES)
def test_the_sdks_default_retries_succeed_after_the_real_refill(sdk, endpoint):
    engine = sluicegate.Engine("fixed", capacity=100, requests_per_minute=60)
    server, counted = serve(engine, sdk)
    with server as s:
        client = sdk.client(s)  # the SDK's default retries (2)
        exhaust(engine)
        start = time.monotonic()
        assert CALLS[endpoint](client)
        elapsed = time.monotonic() - start
    # Refused once, then admitted after waiting what retry-after-ms said: the real refill.
    assert counted.statuses[0] == 429 and counted.statuses[-1] == 200, counted.statuses
    assert len(counted.statuses) <= 3
    assert 0 < counted.waits[0] <= 1_000 and elapsed >= counted.waits[0] / 1_000 - 0.01, (counted.waits, elapsed)


@pytest.mark.parametrize("sdk, endpoint", CASES)
def test_a_request_that_can_never_fit_raises_at_once(sdk, endpoint, record_property):
    engine = sluicegate.Engine("fixed", capacity=100, generated_tokens_per_minute=60, prompt_tokens_per_minute=60)
    server, counted = serve(engine, sdk)
    with server as s:
        client = sdk.client(s)  # the SDK's default retries (2): none is spent
        start = time.monotonic()
        with pytest.raises(rate_limit_error(sdk)) as refused:
            CALLS[endpoint](client, max_tokens=100)
        elapsed = time.monotonic() - start
    error, _ = error_of(refused.value)
    assert error["too_large"] is True
    assert refused.value.response.headers.get_list("x-should-retry") == ["false"]
    record_property("requests_at_server", counted.count)
    print(f"{sdk.name} {endpoint}: a request that can never fit reached the server {counted.count} time(s)")
    assert counted.count == 1 and counted.statuses == [429]
    assert elapsed < 2, elapsed  # no backoff was slept


def test_without_x_should_retry_the_sdk_would_have_sent_it_three_times():
    """The control of the test above: strip the header and the openai SDK retries a hopeless 429."""
    openai = pytest.importorskip("openai")
    engine = sluicegate.Engine("fixed", capacity=100, generated_tokens_per_minute=60)
    middleware = SluicegateMiddleware(upstream, engine, dialect="openai", account_key=KEY)

    async def strip(scope, receive, send):
        async def stripped(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [(k, v) for k, v in message["headers"] if bytes(k).lower() != b"x-should-retry"]}
            await send(message)

        await middleware(scope, receive, stripped)

    counted = Counted(strip)
    with Server(counted) as s:
        client = openai.OpenAI(base_url=s.origin + "/v1", api_key=API_KEY, timeout=10)
        with pytest.raises(openai.RateLimitError):
            _chat(client, max_tokens=100)
    assert counted.count == 3


@pytest.mark.parametrize("sdk, endpoint, stream", STREAMED)
def test_usage_is_charged_as_the_upstream_reports_it(sdk, endpoint, stream):
    # 60 tokens a minute: one refills a second, so what was charged stays visible to the token.
    engine = sluicegate.Engine(
        "fixed", capacity=100, requests_per_minute=1_000, prompt_tokens_per_minute=60, uncached_prompt_tokens_per_minute=60, generated_tokens_per_minute=60
    )
    server, counted = serve(engine, sdk)
    with server as s:
        client = sdk.client(s, max_retries=0)
        start = time.monotonic()
        assert CALLS[endpoint](client, stream=stream)
        generated, prompt = (0, EMBEDDING_PROMPT) if endpoint == "embeddings" else (GENERATED, PROMPT)
        uncached = prompt if endpoint == "embeddings" else PROMPT - CACHED
        # The server settles just after the last byte reaches the client.
        deadline = time.monotonic() + 5
        while 60 - engine.remaining(ACCT, MODEL)["prompt_tokens"] < prompt - 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        left = engine.remaining(ACCT, MODEL)
        slack = int(time.monotonic() - start) + 2  # refilled meanwhile, one a second
    assert counted.statuses == [200]
    # What the upstream reported is charged: not the estimate (10 prompt tokens), not the 50 reserved.
    assert prompt - slack <= 60 - left["prompt_tokens"] <= prompt, left
    assert uncached - slack <= 60 - left["uncached_prompt_tokens"] <= uncached, left
    assert max(0, generated - slack) <= 60 - left["generated_tokens"] <= generated, left
