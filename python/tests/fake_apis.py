"""A lenient fake of five LLM APIs, for the SDK and path tests (issue 21).

OpenAI's Chat Completions, Completions, Responses and Embeddings and Anthropic's Messages, each
with its own usage shape, streamed word by word on request. The routing is deliberately lenient,
like many proxies: the path is percent-decoded and its duplicate slashes, ``.``/``..`` segments
and trailing slash are resolved before matching, so every alias of an endpoint reaches it.

``Counted`` wraps any ASGI app and counts the HTTP requests that reach it.
"""

import asyncio
import base64
import json
import posixpath
import socket
import struct
import threading
import time
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
import uvicorn

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
GENERATED = 40
"""Tokens every completion reports as generated."""
PROMPT = 30
"""Prompt tokens every request reports (Anthropic: input + cache read + cache creation)."""
CACHED = 10
"""Of which cached (Anthropic: ``cache_read_input_tokens``)."""
EMBEDDING_PROMPT = 12
"""Prompt tokens an embeddings request reports."""


class Counted:
    """Counts the HTTP requests that reach ``app``: (method, raw path), and each answer's status
    and ``retry-after-ms``."""

    def __init__(self, app):
        self.app = app
        self.seen = []
        self.statuses = []
        self.waits = []

    @property
    def count(self):
        return len(self.seen)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.seen.append((scope["method"], scope.get("raw_path", b"").decode("latin-1")))

        async def noted(message):
            if message["type"] == "http.response.start":
                self.statuses.append(message["status"])
                headers = {bytes(k).lower(): bytes(v) for k, v in message.get("headers", [])}
                self.waits.append(int(headers[b"retry-after-ms"]) if b"retry-after-ms" in headers else None)
            await send(message)

        await self.app(scope, receive, noted)


class Server:
    """uvicorn serving ``app`` on a free loopback port, in a thread, for one test."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def origin(self):
        return f"http://127.0.0.1:{self.port}"

    def raw(self, method, target, body=b"", headers=()):
        """Sends one request exactly as written (no client normalises its path); the status."""
        head = [f"{method} {target} HTTP/1.1", f"host: 127.0.0.1:{self.port}", f"content-length: {len(body)}", "connection: close", *headers]
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        return int(data.split(b" ", 2)[1])


def _sse(events, named=False):
    async def stream():
        for event in events:
            if named:
                yield f"event: {event['type']}\n"
            yield f"data: {json.dumps(event)}\n\n"
            await asyncio.sleep(0)
        if not named:
            yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


def _words(body, key):
    return [WORDS[i % len(WORDS)] + " " for i in range(min(int(body.get(key) or len(WORDS)), 12))]


OPENAI_USAGE = {"prompt_tokens": PROMPT, "completion_tokens": GENERATED, "total_tokens": PROMPT + GENERATED, "prompt_tokens_details": {"cached_tokens": CACHED}}


async def chat(request: Request):
    body = await request.json()
    words = _words(body, "max_tokens")
    base = {"id": "chatcmpl-1", "created": 0, "model": body["model"]}
    if not body.get("stream"):
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(words)}, "finish_reason": "stop"}
        return JSONResponse({**base, "object": "chat.completion", "choices": [choice], "usage": OPENAI_USAGE})
    events = [
        {**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]} for w in words
    ]
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append({**base, "object": "chat.completion.chunk", "choices": [], "usage": OPENAI_USAGE})
    return _sse(events)


async def completions(request: Request):
    body = await request.json()
    words = _words(body, "max_tokens")
    base = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"]}
    if not body.get("stream"):
        choice = {"index": 0, "text": "".join(words), "finish_reason": "stop", "logprobs": None}
        return JSONResponse({**base, "choices": [choice], "usage": OPENAI_USAGE})
    events = [{**base, "choices": [{"index": 0, "text": w, "finish_reason": None, "logprobs": None}]} for w in words]
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append({**base, "choices": [], "usage": OPENAI_USAGE})
    return _sse(events)


def _response(body, status, text, usage):
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 0,
        "model": body["model"],
        "status": status,
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ]
        if text
        else [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    }


RESPONSES_USAGE = {
    "input_tokens": PROMPT,
    "input_tokens_details": {"cached_tokens": CACHED},
    "output_tokens": GENERATED,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": PROMPT + GENERATED,
}


async def responses(request: Request):
    body = await request.json()
    words = _words(body, "max_output_tokens")
    if not body.get("stream"):
        return JSONResponse(_response(body, "completed", "".join(words), RESPONSES_USAGE))
    events = [{"type": "response.created", "sequence_number": 0, "response": _response(body, "in_progress", "", None)}]
    for i, w in enumerate(words):
        events.append(
            {
                "type": "response.output_text.delta",
                "sequence_number": i + 1,
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": w,
                "logprobs": [],
            }
        )
    done = _response(body, "completed", "".join(words), RESPONSES_USAGE)
    events.append({"type": "response.completed", "sequence_number": len(words) + 1, "response": done})
    return _sse(events, named=True)


async def embeddings(request: Request):
    body = await request.json()
    inputs = body["input"] if isinstance(body["input"], list) and not isinstance(body["input"][0], int) else [body["input"]]
    vector = [0.25, -0.5, 0.125]
    if body.get("encoding_format") == "base64":
        encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data = [{"object": "embedding", "index": i, "embedding": encoded} for i in range(len(inputs))]
    else:
        data = [{"object": "embedding", "index": i, "embedding": vector} for i in range(len(inputs))]
    usage = {"prompt_tokens": EMBEDDING_PROMPT, "total_tokens": EMBEDDING_PROMPT}
    return JSONResponse({"object": "list", "data": data, "model": body["model"], "usage": usage})


ANTHROPIC_PROMPT = {"input_tokens": PROMPT - CACHED, "cache_read_input_tokens": CACHED, "cache_creation_input_tokens": 0}


async def messages(request: Request):
    body = await request.json()
    words = _words(body, "max_tokens")
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"], "stop_sequence": None}
    if not body.get("stream"):
        usage = {**ANTHROPIC_PROMPT, "output_tokens": GENERATED}
        content = [{"type": "text", "text": "".join(words)}]
        return JSONResponse({**message, "content": content, "stop_reason": "end_turn", "usage": usage})
    events = [
        {"type": "message_start", "message": {**message, "content": [], "stop_reason": None, "usage": {**ANTHROPIC_PROMPT, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        *({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}} for w in words),
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": GENERATED}},
        {"type": "message_stop"},
    ]
    return _sse(events, named=True)


async def anything(request: Request):
    """Any other path: a small JSON answer (a model list, a token count)."""
    return JSONResponse({"object": "list", "data": [], "path": request.url.path})


routes = Starlette(
    routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/{rest:path}", anything, methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"]),
    ]
)


def lenient(path):
    """How a lenient server routes a path (written independently of sluicegate's normalize_path)."""
    for _ in range(3):
        path = unquote(path)
    path = posixpath.normpath("/" + path.replace("\\", "/"))
    return "/" + path.lstrip("/")


async def app(scope, receive, send):
    if scope["type"] == "http":
        scope = {**scope, "path": lenient(scope["path"])}
    await routes(scope, receive, send)
