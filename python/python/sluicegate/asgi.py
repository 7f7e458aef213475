"""ASGI middleware: sluicegate in front of an OpenAI-compatible API.

Wrap any ASGI app (FastAPI, Starlette, a proxy) that serves ``/v1/chat/completions`` or
``/v1/completions``::

    from sluicegate import Engine
    from sluicegate.asgi import SluicegateMiddleware

    app = SluicegateMiddleware(app, Engine(policy="fireworks_2024"))

For each completion request the middleware reads the account (the ``Authorization`` bearer key by
default), the model, ``max_tokens`` (or ``max_completion_tokens``), ``n`` and an estimate of the
prompt size from the JSON body, and admits it. A refusal is answered at once with the dialect's
status, headers and JSON error body. An admitted request is passed on (after its smoothing wait)
with the rate-limit headers added to the response, and settled when the response ends: from the
response's ``usage``, or for a stream from the final usage chunk, else from the streamed text.
Streams are charged as they go; a client that disconnects is settled with what it used; an
upstream 5xx is settled as an upstream failure. Every admitted request is settled exactly once,
unless it outlives the engine's ``permit_ttl``: its permit has then expired, its reservation stays
charged, and the response goes on to the end uncharged (SPEC §7).
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, List, Mapping, MutableMapping, Optional, Tuple

from sluicegate._sluicegate import Decision, Engine, PermitExpiredError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

if TYPE_CHECKING:
    from typing import Literal

    _Dialect = Literal["fireworks", "together", "openai", "anthropic", "ietf"]
    _Completion = Literal["success", "upstream_failure", "cancelled"]

DEFAULT_PATHS = ("/v1/chat/completions", "/v1/completions")
DEFAULT_MAX_TOKENS = 256
"""Reserved when a request names no ``max_tokens``: most servers' default is far larger, so
gateways should set ``max_tokens``; the reservation is corrected at settle either way."""


def bearer_account(scope: Scope, headers: Mapping[str, str]) -> Optional[str]:
    """The account of a request: its ``Authorization: Bearer`` key."""
    scheme, _, key = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip() or None


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return ""


def chars_over_four(body: Mapping[str, Any]) -> int:
    """Estimates prompt tokens as a quarter of the prompt's characters (at least 1)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        text = "".join(_text_of(m.get("content")) for m in messages if isinstance(m, dict))
    else:
        text = _text_of(body.get("prompt"))
    return max(1, len(text) // 4)


def _json_error(status: int, kind: str, message: str) -> Tuple[int, List[Tuple[bytes, bytes]], bytes]:
    body = json.dumps({"error": {"message": message, "type": kind, "code": kind, "param": None}}).encode()
    return status, [(b"content-type", b"application/json")], body


class _Usage:
    """What an admitted request has used, as far as the response has told."""

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0
        self.generated_tokens = 0
        self.reported = False
        self.charged = 0

    def take_report(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        self.prompt_tokens = int(usage.get("prompt_tokens", self.prompt_tokens) or 0)
        details = usage.get("prompt_tokens_details") or {}
        self.cached_tokens = min(int(details.get("cached_tokens", 0) or 0), self.prompt_tokens)
        self.generated_tokens = int(usage.get("completion_tokens", self.generated_tokens) or 0)
        self.reported = True


class SluicegateMiddleware:
    """Admits, refuses or sheds OpenAI-compatible completion requests before they reach ``app``.

    ``account(scope, headers)`` names the account (default: the bearer key; None answers 401);
    ``estimate_prompt_tokens(body)`` sizes the prompt (default: characters // 4). A request is on
    the priority tier when it sends ``x-priority: high`` or ``"service_tier": "priority"``.
    Headers and error bodies are in ``dialect``, by default the engine's (``Engine(dialect=...)``).
    """

    def __init__(
        self,
        app: ASGIApp,
        engine: Engine,
        *,
        dialect: Optional[_Dialect] = None,
        account: Callable[[Scope, Mapping[str, str]], Optional[str]] = bearer_account,
        estimate_prompt_tokens: Callable[[Mapping[str, Any]], int] = chars_over_four,
        paths: Tuple[str, ...] = DEFAULT_PATHS,
    ) -> None:
        self.app = app
        self.engine = engine
        self.dialect: _Dialect = dialect if dialect is not None else engine.dialect
        self.account = account
        self.estimate_prompt_tokens = estimate_prompt_tokens
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        body, disconnected = await _read_body(receive)
        if disconnected:
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        account = self.account(scope, headers)
        if not account:
            await _respond(send, *_json_error(401, "invalid_api_key", "No API key: send Authorization: Bearer <key>."))
            return
        try:
            payload = json.loads(body or b"null")
            model = payload["model"]
            if not isinstance(model, str) or not model:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            await _respond(send, *_json_error(400, "invalid_request", "The body must be JSON with a model."))
            return
        max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens") or DEFAULT_MAX_TOKENS
        priority = headers.get("x-priority", "").lower() == "high" or payload.get("service_tier") == "priority"
        try:
            decision = self.engine.admit(
                account,
                model,
                prompt_tokens=int(self.estimate_prompt_tokens(payload)),
                max_tokens=int(max_tokens),
                n=int(payload.get("n") or 1),
                priority=priority,
            )
        except (TypeError, ValueError, OverflowError) as exc:
            await _respond(send, *_json_error(400, "invalid_request", str(exc)))
            return
        if not decision.admitted:
            error = decision.error_body(self.dialect) or {}
            rendered = [(k.lower().encode(), v.encode()) for k, v in decision.headers(self.dialect)]
            rendered.append((b"content-type", b"application/json"))
            await _respond(send, decision.status_code, rendered, json.dumps(error).encode())
            return
        if decision.wait > 0:
            await asyncio.sleep(decision.wait)
        await self._forward(scope, body, receive, send, decision, self.estimate_prompt_tokens(payload))

    async def _forward(self, scope: Scope, body: bytes, receive: Receive, send: Send, decision: Decision, prompt: int) -> None:
        usage = _Usage(prompt)
        state: Dict[str, Any] = {"status": 200, "stream": False, "buffer": b"", "body": b"", "complete": False, "gone": False, "expired": False}
        replayed = False

        async def replay_receive() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            message = await receive()
            if message.get("type") == "http.disconnect":
                state["gone"] = True
            return message

        async def tracking_send(message: Message) -> None:
            kind = message.get("type")
            if kind == "http.response.start":
                state["status"] = message.get("status", 200)
                names = {k.lower() for k, _ in message.get("headers", [])}
                state["stream"] = any(k.lower() == b"content-type" and b"text/event-stream" in v for k, v in message.get("headers", []))
                extra = [(k.lower().encode(), v.encode()) for k, v in decision.headers(self.dialect) if k.lower().encode() not in names]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            elif kind == "http.response.body":
                chunk = message.get("body", b"")
                if state["stream"]:
                    self._count_stream(chunk, state, usage, decision)
                else:
                    state["body"] += chunk
                if not message.get("more_body", False):
                    state["complete"] = True
            try:
                await send(message)
            except Exception:
                state["gone"] = True
                raise

        try:
            await self.app(scope, replay_receive, tracking_send)
        finally:
            self._settle(decision, state, usage)

    def _count_stream(self, chunk: bytes, state: Dict[str, Any], usage: _Usage, decision: Decision) -> None:
        """Counts a stream's tokens as its SSE events pass, charging them as they arrive."""
        state["buffer"] += chunk
        *events, state["buffer"] = state["buffer"].split(b"\n")
        streamed = 0
        for line in events:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                continue
            try:
                event = json.loads(data)
            except ValueError:
                continue
            if isinstance(event, dict):
                usage.take_report(event.get("usage"))
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    streamed += len(_text_of(delta.get("content")) or _text_of(choice.get("text")))
        if streamed and not usage.reported:
            tokens = max(1, streamed // 4)
            usage.generated_tokens += tokens
            if state["expired"]:
                return
            try:
                self.engine.charge(decision, tokens)
            except PermitExpiredError:
                # Past permit_ttl: the reservation stays charged; the stream goes on.
                state["expired"] = True
                return
            usage.charged += tokens

    def _settle(self, decision: Decision, state: Dict[str, Any], usage: _Usage) -> None:
        if not state["stream"] and state["body"]:
            try:
                parsed = json.loads(state["body"])
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                usage.take_report(parsed.get("usage"))
                if not usage.reported:
                    text = "".join(_text_of((c.get("message") or {}).get("content")) or _text_of(c.get("text")) for c in parsed.get("choices") or [])
                    usage.generated_tokens = len(text) // 4
        if state["expired"]:
            return
        completion: _Completion
        if state["status"] >= 500:
            completion = "upstream_failure"
        elif state["gone"] or not state["complete"]:
            completion = "cancelled"
        else:
            completion = "success"
        try:
            self.engine.settle(
                decision,
                prompt_tokens=usage.prompt_tokens,
                cached_tokens=usage.cached_tokens,
                generated_tokens=usage.generated_tokens,
                completion=completion,
            )
        except PermitExpiredError:
            pass  # outlived permit_ttl: nothing to settle, the reservation stays charged


async def _read_body(receive: Receive) -> Tuple[bytes, bool]:
    chunks = []
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return b"", True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


async def _respond(send: Send, status: int, headers: List[Tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
