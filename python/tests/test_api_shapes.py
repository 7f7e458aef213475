"""What the middleware reads of each API's requests and responses (issue 21, item 2), called
directly as an ASGI app, without a server."""

import asyncio
import json

import pytest

import sluicegate
from sluicegate import asgi
from sluicegate.asgi import SluicegateMiddleware, chars_over_four


def call(middleware, path, body, headers=((b"authorization", b"Bearer k"),)):
    raw = json.dumps(body).encode() if not isinstance(body, bytes) else body
    sent, messages = [], [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers)}
    asyncio.run(middleware(scope, receive, send))
    raw = b"".join(m.get("body", b"") for m in sent[1:])
    headers = [(bytes(k).decode(), bytes(v).decode()) for k, v in sent[0]["headers"]]
    return sent[0]["status"], headers, json.loads(raw) if not raw.startswith(b"data:") else raw


def json_app(payload, status=200, ctype=b"application/json", events=None):
    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype)]})
        if events is not None:
            for event in events:
                await send({"type": "http.response.body", "body": f"data: {json.dumps(event)}\n\n".encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            await send({"type": "http.response.body", "body": json.dumps(payload).encode()})

    return app


class Recorder:
    """An engine that records what is admitted and settled."""

    def __init__(self, **kw):
        self.engine = sluicegate.Engine("fixed", capacity=100, **kw)
        self.admitted, self.settled = [], []

    def admit(self, *a, **kw):
        self.admitted.append(kw)
        return self.engine.admit(*a, **kw)

    def settle(self, decision, **kw):
        self.settled.append(kw)
        return self.engine.settle(decision, **kw)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def gate(app, **kw):
    e = Recorder(**kw)
    return e, SluicegateMiddleware(app, e, account=lambda scope, headers: "acct")  # type: ignore[arg-type]


def test_each_api_reserves_from_its_own_fields():
    cases = [
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x" * 40}], "max_completion_tokens": 7, "n": 2}, (10, 7, 2)),
        ("/v1/completions", {"model": "m", "prompt": [1, 2, 3], "max_tokens": 9}, (3, 9, 1)),
        ("/v1/responses", {"model": "m", "instructions": "x" * 8, "input": [{"role": "user", "content": [{"type": "input_text", "text": "x" * 32}]}], "max_output_tokens": 11}, (10, 11, 1)),
        ("/v1/embeddings", {"model": "m", "input": ["x" * 40, "y" * 40], "max_tokens": 50}, (20, 0, 1)),
        ("/v1/messages", {"model": "m", "system": [{"type": "text", "text": "x" * 20}], "messages": [{"role": "user", "content": "x" * 20}], "max_tokens": 13, "n": 4}, (10, 13, 1)),
    ]
    for path, body, (prompt, max_tokens, n) in cases:
        e, m = gate(json_app({}))
        assert call(m, path, body)[0] == 200
        assert (e.admitted[0]["prompt_tokens"], e.admitted[0]["max_tokens"], e.admitted[0]["n"]) == (prompt, max_tokens, n), path


@pytest.mark.parametrize(
    "path, payload, usage",
    [
        ("/v1/responses", {"output": [], "usage": {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 10}, "output_tokens": 40}}, (30, 10, 40)),
        ("/v1/embeddings", {"data": [], "usage": {"prompt_tokens": 12, "total_tokens": 12}}, (12, 0, 0)),
        ("/v1/messages", {"content": [], "usage": {"input_tokens": 20, "cache_read_input_tokens": 10, "cache_creation_input_tokens": 5, "output_tokens": 40}}, (35, 10, 40)),
        # No usage: the text, at four characters a token.
        ("/v1/responses", {"output": [{"type": "message", "content": [{"type": "output_text", "text": "x" * 40}]}, {"type": "function_call", "arguments": "y" * 8}]}, (None, 0, 12)),
        ("/v1/messages", {"content": [{"type": "text", "text": "x" * 40}, {"type": "thinking", "thinking": "y" * 8}]}, (None, 0, 12)),
    ],
)
def test_each_api_settles_from_its_own_usage(path, payload, usage):
    e, m = gate(json_app(payload))
    body = {"model": "m", "max_tokens": 100, "max_output_tokens": 100, "input": "x" * 400}
    assert call(m, path, body)[0] == 200
    prompt = usage[0] if usage[0] is not None else e.admitted[0]["prompt_tokens"]
    assert e.settled == [{"completion": "success", "prompt_tokens": prompt, "cached_tokens": usage[1], "generated_tokens": usage[2]}]


def test_an_anthropic_stream_settles_from_message_start_and_message_delta():
    events = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 20, "cache_read_input_tokens": 10, "output_tokens": 1}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x" * 400}},
        {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 40}},
    ]
    e, m = gate(json_app(None, ctype=b"text/event-stream", events=events), generated_tokens_per_minute=1_000)
    assert call(m, "/v1/messages", {"model": "m", "max_tokens": 500, "stream": True})[0] == 200
    assert e.settled == [{"completion": "success", "prompt_tokens": 30, "cached_tokens": 10, "generated_tokens": 40}]


def test_an_anthropic_stream_cut_before_message_delta_is_charged_its_text_and_prompt():
    m = asgi._Meter(1 << 20, "messages")
    m.start([(b"content-type", b"text/event-stream")])
    m.feed(b'event: message_start\ndata: {"type": "message_start", "message": {"usage": {"input_tokens": 20, "cache_read_input_tokens": 10, "output_tokens": 1}}}\n\n')
    m.feed(b'data: {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "' + b"x" * 80 + b'"}}\n\n')
    m.finish()
    assert m.usage is None and m.tokens() == (30, 10, 20)


def test_a_responses_stream_settles_from_response_completed():
    events = [
        {"type": "response.created", "response": {"usage": None}},
        {"type": "response.output_text.delta", "delta": "x" * 400},
        {"type": "response.completed", "response": {"usage": {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 10}, "output_tokens": 40}}},
    ]
    e, m = gate(json_app(None, ctype=b"text/event-stream", events=events), generated_tokens_per_minute=1_000)
    assert call(m, "/v1/responses", {"model": "m", "max_output_tokens": 500, "stream": True})[0] == 200
    assert e.settled == [{"completion": "success", "prompt_tokens": 30, "cached_tokens": 10, "generated_tokens": 40}]


def test_a_background_response_is_charged_its_reservation():
    e, m = gate(json_app({"status": "queued", "output": [], "usage": None}))
    assert call(m, "/v1/responses", {"model": "m", "max_output_tokens": 500, "background": True})[0] == 200
    assert e.settled == [{"completion": "success"}]  # what was reserved: it generates after this answer


def test_the_messages_api_answers_in_anthropics_dialect_and_shape():
    e, m = gate(json_app({}), requests_per_minute=1)
    status, headers, body = call(m, "/v1/messages", b"{not json")
    assert status == 400 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "invalid_json" and dict(headers)["x-should-retry"] == "false"
    assert call(m, "/v1/messages", {"model": "m", "max_tokens": 5})[0] == 200
    status, headers, body = call(m, "/v1/messages", {"model": "m", "max_tokens": 5})
    names = [k for k, _ in headers]
    assert status == 429 and body["error"]["type"] == "rate_limit_error" and "anthropic-ratelimit-requests-limit" in names
    assert names.count("x-should-retry") == 1 and dict(headers)["x-should-retry"] == "true"
    # The chat API of the same middleware keeps OpenAI's shape and the engine's dialect.
    status, headers, body = call(m, "/v1/chat/completions", {"model": "m", "max_tokens": 5})
    assert status == 429 and body["error"]["type"] == "dynamic_request_limited" and "type" not in body
    assert "x-ratelimit-limit-requests" in dict(headers)


def test_messages_dialect_can_be_another():
    e = sluicegate.Engine("fixed", capacity=100, requests_per_minute=1)
    m = SluicegateMiddleware(json_app({}), e, account=lambda scope, headers: "acct", dialect="openai", messages_dialect=None)
    call(m, "/v1/messages", {"model": "m", "max_tokens": 5})
    status, headers, body = call(m, "/v1/messages", {"model": "m", "max_tokens": 5})
    assert "x-ratelimit-limit-requests" in dict(headers) and body["error"]["type"] == "rate_limit_error"  # the shape stays Anthropic's


def test_the_middlewares_own_errors_carry_one_x_should_retry():
    e, m = gate(json_app({}))
    for path in ("/v1/chat/completions", "/v1/messages", "/v1/embeddings", "/v1/responses"):
        status, headers, _ = call(m, path, {"model": ""})
        assert status == 400 and [v for k, v in headers if k == "x-should-retry"] == ["false"]


def test_chars_over_four_reads_every_prompt_shape():
    assert chars_over_four({"messages": [{"role": "user", "content": "x" * 40}]}) == 10
    assert chars_over_four({"prompt": ["x" * 20, "y" * 20]}) == 10
    assert chars_over_four({"prompt": [[1, 2], [3]]}) == 3
    assert chars_over_four({"input": "x" * 40, "instructions": "y" * 40}) == 20
    tool_result = {"role": "user", "content": [{"type": "tool_result", "content": [{"type": "text", "text": "x" * 40}]}]}
    assert chars_over_four({"system": "y" * 40, "messages": [tool_result]}) == 20
    assert chars_over_four({"input": [{"type": "function_call_output", "output": "x" * 40}]}) == 10
    assert chars_over_four({"messages": [{"content": [{"type": "image", "source": {"data": "A" * 10_000}}]}]}) == 1
    assert chars_over_four({}) == 1
