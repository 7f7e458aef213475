"""ASGI middleware: sluicegate in front of an OpenAI- or Anthropic-compatible API.

Wrap any ASGI app (FastAPI, Starlette, a proxy) that serves the LLM APIs::

    from sluicegate import Engine
    from sluicegate.asgi import SluicegateMiddleware

    app = SluicegateMiddleware(app, Engine(policy="fireworks_2024"), account_key=DEPLOYMENT_KEY)

Every request to one of these endpoints (a POST) is admitted before it reaches the app, and
settled from the response's usage:

============================  =============================================  ==========================================
endpoint                      reserved from the request                      settled from the response's ``usage``
============================  =============================================  ==========================================
``/v1/chat/completions``      ``max_completion_tokens`` or ``max_tokens``,   ``prompt_tokens``, ``completion_tokens``,
``/v1/completions``           ``n``, ``messages`` / ``prompt``               ``prompt_tokens_details.cached_tokens``;
                                                                             a stream's final usage chunk
``/v1/responses``             ``max_output_tokens``, ``input``,              ``input_tokens``, ``output_tokens``,
                              ``instructions``                               ``input_tokens_details.cached_tokens``;
                                                                             a stream's ``response.completed`` event
``/v1/embeddings``            ``input`` (prompt tokens only; nothing is      ``prompt_tokens``
                              generated)
``/v1/messages``              ``max_tokens``, ``system``, ``messages``       ``input_tokens``, ``output_tokens``,
                                                                             ``cache_read_input_tokens``,
                                                                             ``cache_creation_input_tokens``; a
                                                                             stream's ``message_start`` and
                                                                             ``message_delta`` events
============================  =============================================  ==========================================

Without a usable usage, a response is charged its text at four characters a token (a stream as
it goes). A refusal is answered at once with the dialect's status, headers and JSON error body;
the Messages API answers in ``messages_dialect`` (default ``anthropic``) and Anthropic's error
shape. An admitted request is passed on (after its smoothing wait) with the rate-limit headers
added to the response.

Paths are matched after :func:`normalize_path` (percent-decoding, duplicate and trailing slashes,
``.`` and ``..``), so an alias is limited exactly like its endpoint. Any other request under
``/v1`` follows ``unknown_paths``: ``"limit_requests"`` (default) counts it on the requests
metric, ``"deny"`` answers 404, ``"pass"`` passes it on.

What the middleware guarantees, whatever the client sends and whatever the app answers:

- **No secret is stored.** The default account is a keyed digest of the ``Authorization:
  Bearer`` (or Anthropic's ``x-api-key``) credential (:func:`account_digest`: HMAC-SHA-256 under
  the deployment key, 32 hex digits); the credential itself never reaches the engine, its tables
  or its snapshots. A request carrying two different credentials is a 401: the limiter never
  guesses which one the app honours.
- **Bounded memory per request.** The request body is capped (``max_body_bytes``, default 1 MiB:
  413 beyond it, without reading the rest; an unknown path's larger body, an upload, is passed
  on whole, read no further); JSON nested deeper than ``max_json_depth`` is a 400;
  at most ``max_buffer_bytes`` of the response are held (a non-streamed body beyond it is
  scanned in a bounded head and tail; an SSE line beyond it is counted, not kept), and every
  byte still reaches the client.
- **Never a 500 from the limiter.** Client mistakes are 400/401/413 with a JSON error; an engine
  error (``TableFullError`` and every other :class:`sluicegate.Error`) is a 503 with a JSON error
  and ``retry-after``; accounting trouble after the response has started is logged, never raised
  into the response. (Exceptions of the app and of the operator's own callbacks are theirs.)
- **Exactly one settle per admission**, from the moment of admission: a cancellation during the
  smoothing wait or anywhere in the app, an app exception, a disconnect, or usage of the wrong
  shape all settle once. The only exception is a request that outlives the engine's
  ``permit_ttl``: its permit has expired, its reservation stays charged, and the response goes on
  to the end uncharged (SPEC §7).

How requests settle: a 2xx response read to its end is a success, charged what it reports (or,
without a usable ``usage``, its text at four characters a token); a non-2xx response or an app
exception is an upstream failure (refunded, not billed, not counted toward growth, SPEC §7); a
client that leaves early is cancelled with what it used (a stream: what was streamed; a
non-streamed request the backend may well finish: its reservation). A response the middleware
cannot read (an encoding other than gzip/deflate, non-JSON, too large without a usage it can
find, or a background Responses request that has not run yet) settles conservatively, charging the reservation, and is logged (a warning the first time
for each reason, debug after). The app is asked for ``accept-encoding: identity``.

Service tiers (SPEC §6) are the operator's to grant: ``service_tier(account)`` names the tier an
account may use (default ``"default"`` for everyone). A client may ask for a lower one with the
body's ``"service_tier": "flex"`` (or ``"default"``), never a higher one; other values (``"auto"``)
ask for nothing, and ``x-priority`` headers are ignored. As a model's load rises the engine sheds
six classes, flex first: over-limit flex (at 0.6), in-limit flex (0.7), over-limit default (0.8),
over-limit priority (0.9), in-limit default (1.0), in-limit priority last (1.2). The engine also
caps every request by its account's own grant (``Engine.set_service_tier_grant``, ``"default"``
until set), so the middleware writes each request's account grant into the engine before
admitting it; the engine writes only a change, and a grant it lost (a restore, another process)
is back at the next request. A push the engine refuses (a full account table) is logged, and the
request is served at the engine's grant.

The fast variant (SPEC §1) of a model has its own limits. By default a model named ``<model>-fast``
or a request carrying ``x-sluicegate-variant: fast`` is admitted as ``<model>``'s fast variant;
:func:`fast_variant` builds other conventions. The header is meant to be set by the operator's own
gateway in front of this middleware, which must strip it from client requests.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import logging
import os
import random
import re
import secrets
import zlib
from urllib.parse import unquote
from typing import (
    TYPE_CHECKING,
    Any,
    Awaitable,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    MutableMapping,
    NamedTuple,
    Optional,
    Set,
    Tuple,
    Union,
    cast,
)

from sluicegate._errors import (
    AlreadySettledError,
    ArgumentError,
    Error,
    InvalidUsageError,
    PermitExpiredError,
    StalePermitError,
    TableFullError,
)
from sluicegate._sluicegate import Decision, Engine

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
AccountFn = Callable[[Scope, Mapping[str, str]], Optional[Union[str, bytes]]]
VariantFn = Callable[[str, Mapping[str, str]], Tuple[str, bool]]

if TYPE_CHECKING:
    from typing import Literal

    _Dialect = Literal["fireworks", "together", "openai", "anthropic", "ietf"]
    _Completion = Literal["success", "upstream_failure", "cancelled"]
    _UnknownPaths = Literal["limit_requests", "deny", "pass"]
    _ServiceTier = Literal["flex", "default", "priority"]

log = logging.getLogger("sluicegate.asgi")

DEFAULT_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/v1/messages")
"""The endpoints admitted by default; each is read as the API its path ends with (:data:`APIS`)."""
APIS = {
    "/chat/completions": "chat",
    "/completions": "completions",
    "/responses": "responses",
    "/embeddings": "embeddings",
    "/messages": "messages",
}
"""The APIs the middleware reads, by the ending of their path: OpenAI's Chat Completions,
Completions, Responses and Embeddings, and Anthropic's Messages."""
API_PREFIX = "/v1"
"""Requests under this prefix that are not one of ``paths`` follow the ``unknown_paths`` policy."""
UNKNOWN_PATH_POLICIES = ("limit_requests", "deny", "pass")
"""What to do with other paths under the API prefix: count them on the requests metric (the
default), answer 404, or pass them on untouched."""
OTHER_MODEL = "*"
"""The model a request to an unknown path is counted under when its body names none."""
DEFAULT_MAX_TOKENS = 256
"""Reserved when a request names no ``max_tokens``: most servers' default is far larger, so
gateways should set ``max_tokens``; the reservation is corrected at settle either way."""
MAX_BODY_BYTES = 1 << 20
"""The default cap on a request body (1 MiB); a larger one is answered 413."""
MAX_BUFFER_BYTES = 1 << 20
"""The default bound on the response bytes held per request (1 MiB)."""
MAX_JSON_DEPTH = 64
"""The default bound on a request body's JSON nesting; deeper is answered 400."""
ACCOUNT_ID_MAX_BYTES = 64
"""The longest account id the engine stores."""
MODEL_ID_MAX_BYTES = 128
"""The longest model id the engine stores."""
ACCOUNT_DIGEST_HEX = 32
"""Hex digits of the default account id: the first 128 bits of HMAC-SHA-256."""
ACCOUNT_KEY_ENV = "SLUICEGATE_ACCOUNT_KEY"
"""The environment variable read for the deployment key when ``account_key`` is not given."""
SERVICE_TIERS = ("flex", "default", "priority")
"""Service tiers, lowest first (SPEC §6)."""
VARIANT_HEADER = "x-sluicegate-variant"
"""The header the operator's gateway sets to ``fast`` to select a model's fast variant."""
FAST_SUFFIX = "-fast"
"""The model-name suffix that selects a model's fast variant by default."""

_TAIL_BYTES = 64 * 1024  # of an oversized response, what is kept of its head and of its tail
_DECODE_PIECE = 64 * 1024  # decompressed at a time
_MAX_DECODED = 256 << 20  # decompressed per response at most: beyond, it is unreadable
_MAX_COUNT = 1 << 32  # a usage count above this is not a count


# -- accounts -------------------------------------------------------------------------------------


def bearer_credential(headers: Mapping[str, str]) -> Optional[str]:
    """The ``Authorization: Bearer`` credential of a request, or None. Never store it."""
    scheme, _, key = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip() or None


def api_key_credentials(headers: Iterable[Tuple[bytes, bytes]]) -> Set[str]:
    """Every distinct credential a request carries: ``Authorization: Bearer`` and ``x-api-key``
    (Anthropic's), each header counted as often as it is sent. Never store them."""
    found: Set[str] = set()
    for k, v in headers:
        name = bytes(k).lower()
        if name == b"authorization":
            credential = bearer_credential({"authorization": bytes(v).decode("latin-1")})
        elif name == b"x-api-key":
            credential = bytes(v).decode("latin-1").strip() or None
        else:
            continue
        if credential is not None:
            found.add(credential)
    return found


def normalize_path(path: str) -> str:
    """A request path as the most lenient server would route it.

    Percent-encoding is decoded (repeatedly: ``%252F`` too), a backslash is a separator, duplicate
    slashes collapse, ``.`` and ``..`` segments are resolved (never above the root) and a trailing
    slash is dropped::

        >>> normalize_path("//v1/chat/completions/")
        '/v1/chat/completions'
        >>> normalize_path("/v1/chat%2Fcompletions")
        '/v1/chat/completions'
        >>> normalize_path("/v1/models/../chat/./completions")
        '/v1/chat/completions'
    """
    for _ in range(4):
        decoded = unquote(path, errors="surrogateescape")
        if decoded == path:
            break
        path = decoded
    segments: List[str] = []
    for segment in path.replace("\\", "/").split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return "/" + "/".join(segments)


def _api_of(path: str) -> str:
    for ending, api in APIS.items():
        if path.endswith(ending):
            return api
    raise ValueError(f"paths: {path!r} ends with none of {', '.join(APIS)}; name its API: paths={{{path!r}: 'chat'}}")


def account_digest(credential: Union[str, bytes], key: Union[str, bytes]) -> str:
    """The account id of a credential: HMAC-SHA-256 under the deployment ``key``, 32 hex digits.

    Operators compute the same id to address an account (``engine.set_tier(account_digest(api_key,
    KEY), ...)``); without the key, the id reveals nothing of the credential.
    """
    c = credential.encode("utf-8", "surrogateescape") if isinstance(credential, str) else bytes(credential)
    k = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    return hmac.new(k, c, hashlib.sha256).hexdigest()[:ACCOUNT_DIGEST_HEX]


_process_key: Optional[bytes] = None


def _deployment_key(given: Union[str, bytes, None]) -> bytes:
    global _process_key
    if given is None:
        given = os.environ.get(ACCOUNT_KEY_ENV) or None
    if given is not None:
        key = given.encode("utf-8") if isinstance(given, str) else bytes(given)
        if not key:
            raise ValueError("account_key must not be empty")
        return key
    if _process_key is None:
        _process_key = secrets.token_bytes(32)
        log.warning(
            "sluicegate: no account_key and no %s: account ids are digests under a random key of this "
            "process, so limits do not survive a restart nor span workers",
            ACCOUNT_KEY_ENV,
        )
    return _process_key


def default_service_tier(account: str) -> str:
    """The service tier every account is granted by default: ``"default"``."""
    return "default"


def fast_variant(suffix: Optional[str] = FAST_SUFFIX, header: Optional[str] = VARIANT_HEADER) -> VariantFn:
    """A variant convention: ``variant(model, headers) -> (model, fast)``.

    A model named ``<base><suffix>`` is ``<base>``'s fast variant; so is any model of a request whose
    ``header`` is ``fast``. Pass None to turn either off. The header must be set only by the
    operator's own gateway (strip it from client requests).
    """
    name = header.lower() if header else None

    def variant(model: str, headers: Mapping[str, str]) -> Tuple[str, bool]:
        fast = name is not None and headers.get(name, "").strip().lower() == "fast"
        if suffix and model.endswith(suffix) and len(model) > len(suffix):
            return model[: -len(suffix)], True
        return model, fast

    return variant


# -- request bodies -------------------------------------------------------------------------------


def _text_len(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, str):
                total += len(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                total += len(part["text"])
        return total
    return 0


_PROMPT_FIELDS = ("messages", "prompt", "input", "instructions", "system")
"""Where a prompt is: Chat Completions' and Anthropic's ``messages``, Completions' ``prompt``, the
Responses API's and Embeddings' ``input``, Responses' ``instructions``, Anthropic's ``system``."""
_TEXT_FIELDS = ("text", "content", "output", "arguments")
"""Where an item or content block holds text: a part's ``text``, a message's or a tool result's
``content``, a function call's ``output`` and ``arguments``."""


def _prompt_size(value: Any) -> Tuple[int, int]:
    """(characters, token ids) of a prompt: strings, token-id arrays, items and content blocks."""
    if isinstance(value, str):
        return len(value), 0
    if type(value) is int:
        return 0, 1  # a token id (a pre-tokenized prompt or embeddings input)
    chars = tokens = 0
    if isinstance(value, list):
        for item in value:
            c, t = _prompt_size(item)
            chars, tokens = chars + c, tokens + t
    elif isinstance(value, dict):
        for field in _TEXT_FIELDS:
            if field in value:
                c, t = _prompt_size(value[field])
                chars, tokens = chars + c, tokens + t
    return chars, tokens


def chars_over_four(body: Mapping[str, Any]) -> int:
    """Estimates prompt tokens as a quarter of the prompt's characters (at least 1).

    Reads every API's prompt: ``messages``, ``prompt``, ``input``, ``instructions`` and
    ``system``; a token id of a pre-tokenized prompt counts as one token::

        >>> chars_over_four({"system": "be brief", "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]})
        4
        >>> chars_over_four({"input": [[1, 2, 3], [4, 5]]})
        5
    """
    chars = tokens = 0
    for field in _PROMPT_FIELDS:
        c, t = _prompt_size(body.get(field))
        chars, tokens = chars + c, tokens + t
    return max(1, chars // 4 + tokens)


_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
for _b in b"[{":
    _STEP[_b] = 1
for _b in b"]}":
    _STEP[_b] = -1


def _json_depth(body: bytes) -> int:
    """The nesting depth of valid JSON, in time linear in its size."""
    skeleton = _STRINGS.sub(b"", body).translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(map(_STEP.__getitem__, skeleton)), default=0)


def _is_count(v: Any) -> bool:
    return type(v) is int and 0 <= v <= _MAX_COUNT


# -- responses ------------------------------------------------------------------------------------

_Reply = Tuple[int, List[Tuple[bytes, bytes]], bytes]


_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class _Voice(NamedTuple):
    """How a request is answered: the headers' dialect, and whether its API is Anthropic's."""

    dialect: _Dialect
    anthropic: bool = False


def _error_shape(status: int, body: Dict[str, Any], voice: Optional[_Voice]) -> Dict[str, Any]:
    """An OpenAI-shaped error body in the shape of the request's API.

    The shape follows the API, not the headers' dialect: Anthropic's Messages API wraps it as
    Anthropic does, ``{"type": "error", "error": {"type": "rate_limit_error", "message": ...}}``,
    keeping sluicegate's own type as ``code`` and its details (metric, limit, retry time)
    alongside; every other API keeps OpenAI's ``{"error": {...}}``.
    """
    if voice is None or not voice.anthropic or not isinstance(body.get("error"), dict):
        return body
    error = dict(body["error"])
    error.setdefault("code", error.get("type"))
    error["type"] = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": error}


def _json_error(
    status: int, kind: str, message: str, code: Optional[str] = None, extra: Iterable[Tuple[bytes, bytes]] = (), voice: Optional[_Voice] = None
) -> _Reply:
    error = {"error": {"message": message, "type": kind, "code": code or kind, "param": None}}
    body = json.dumps(_error_shape(status, error, voice)).encode()
    headers = [(b"content-type", b"application/json"), *extra]
    if not any(k == b"x-should-retry" for k, _ in headers):
        headers.append((b"x-should-retry", b"false"))
    return status, headers, body


def _invalid(message: str, code: str, voice: Optional[_Voice] = None) -> _Reply:
    return _json_error(400, "invalid_request", message, code, voice=voice)


async def _respond(send: Send, status: int, headers: List[Tuple[bytes, bytes]], body: bytes) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


_MALFORMED = object()


def _parse_usage(value: Any, prompt_key: str = "prompt_tokens", generated_key: Optional[str] = "completion_tokens") -> Any:
    """``usage`` as (prompt or None, cached, generated); None if absent; ``_MALFORMED`` if unusable.

    OpenAI's shape: ``prompt_tokens``, ``completion_tokens`` (none for embeddings: nothing is
    generated) and ``prompt_tokens_details.cached_tokens``; the Responses API names them
    ``input_tokens``, ``output_tokens`` and ``input_tokens_details``.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        return _MALFORMED
    generated = value.get(generated_key) if generated_key is not None else 0
    prompt = value.get(prompt_key)
    details = value.get(prompt_key + "_details")
    cached: Any = 0
    if details is not None:
        if not isinstance(details, dict):
            return _MALFORMED
        cached = details.get("cached_tokens")
        cached = 0 if cached is None else cached
    if not _is_count(generated) or not _is_count(cached) or (prompt is not None and not _is_count(prompt)):
        return _MALFORMED
    return (prompt, cached, generated)


def _parse_responses_usage(value: Any) -> Any:
    return _parse_usage(value, "input_tokens", "output_tokens")


def _parse_embeddings_usage(value: Any) -> Any:
    return _parse_usage(value, "prompt_tokens", None)


_ANTHROPIC_USAGE = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "output_tokens")


def _anthropic_counts(value: Any) -> Any:
    """The counts an Anthropic ``usage`` holds, by name; None if absent; ``_MALFORMED`` if unusable."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return _MALFORMED
    counts = {}
    for field in _ANTHROPIC_USAGE:
        v = value.get(field)
        if v is None:
            continue
        if not _is_count(v):
            return _MALFORMED
        counts[field] = v
    return counts


def _anthropic_usage(counts: Mapping[str, int]) -> Tuple[Optional[int], int]:
    """(prompt or None, cached) of Anthropic counts: its ``input_tokens`` exclude the cache's."""
    cached = counts.get("cache_read_input_tokens", 0)
    if "input_tokens" not in counts:
        return None, 0
    return counts["input_tokens"] + cached + counts.get("cache_creation_input_tokens", 0), cached


def _parse_messages_usage(value: Any) -> Any:
    counts = _anthropic_counts(value)
    if counts is None or counts is _MALFORMED:
        return counts
    prompt, cached = _anthropic_usage(counts)
    if "output_tokens" not in counts:
        return _MALFORMED
    return (prompt, cached, counts["output_tokens"])


_USAGE = {
    "chat": _parse_usage,
    "completions": _parse_usage,
    "responses": _parse_responses_usage,
    "embeddings": _parse_embeddings_usage,
    "messages": _parse_messages_usage,
    "other": _parse_usage,
}


def _output_chars(item: Any) -> int:
    """Characters generated in a Responses output item or an Anthropic content block."""
    if not isinstance(item, dict):
        return 0
    total = 0
    for field in ("text", "refusal", "arguments", "thinking", "partial_json"):
        total += _text_len(item.get(field))
    for field in ("content", "summary"):
        parts = item.get(field)
        if isinstance(parts, list):
            total += sum(_output_chars(p) for p in parts)
    if isinstance(item.get("input"), dict):  # an Anthropic tool_use block
        total += len(json.dumps(item["input"]))
    return total


def _choice_chars(choice: Any, key: str) -> int:
    """Characters a choice generated: text, reasoning, refusal and tool-call arguments."""
    if not isinstance(choice, dict):
        return 0
    total = _text_len(choice.get("text"))
    part = choice.get(key)
    if isinstance(part, dict):
        for field in ("content", "reasoning_content", "reasoning", "refusal"):
            total += _text_len(part.get(field))
        calls = part.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    total += _text_len(call["function"].get("arguments"))
    return total


class _Meter:
    """Reads a response's usage as its bytes pass, holding at most ``limit`` of them."""

    def __init__(self, limit: int, api: str = "chat") -> None:
        self.limit = limit
        self.api = api
        self._parse = _USAGE[api]
        self._anthropic: Dict[str, int] = {}  # an Anthropic stream's counts so far
        self.keep = min(_TAIL_BYTES, limit // 2)
        self.stream = False
        self.unreadable: Optional[str] = None
        self.malformed_usage = False
        self.usage: Optional[Tuple[Optional[int], int, int]] = None
        self.events = 0  # SSE events read (JSON objects)
        self.chars = 0  # generated characters seen in a stream
        self.overflow_bytes = 0  # bytes of SSE lines too long to read
        self.total = 0  # (decoded) body bytes seen
        self.text_chars: Optional[int] = None  # a non-streamed body's generated characters
        self.peak = 0
        self._decoder: Any = None
        self._decoded = 0
        self._line = bytearray()
        self._skipping = False
        self._body = bytearray()
        self._overflowed = False
        self._head = b""
        self._tail = bytearray()

    @property
    def buffered(self) -> int:
        """Response bytes held right now."""
        return len(self._line) + len(self._body) + len(self._head) + len(self._tail)

    def start(self, headers: Iterable[Tuple[bytes, bytes]]) -> None:
        ctype = encoding = b""
        for k, v in headers:
            k = bytes(k).lower()
            if k == b"content-type":
                ctype = bytes(v).lower()
            elif k == b"content-encoding":
                encoding = bytes(v).strip().lower()
        self.stream = b"text/event-stream" in ctype
        if encoding in (b"gzip", b"x-gzip", b"deflate"):
            self._decoder = zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib or gzip, detected
        elif encoding not in (b"", b"identity"):
            self.unreadable = f"content-encoding {encoding.decode('latin-1')!r} cannot be read"

    def feed(self, chunk: bytes) -> None:
        if self.unreadable is not None or not chunk or self.api == "other":
            return
        if self._decoder is None:
            self._take(chunk)
        else:
            self._inflate(chunk)
        self.peak = max(self.peak, self.buffered)

    def _inflate(self, data: bytes) -> None:
        try:
            while data and not self._decoder.eof:
                out = self._decoder.decompress(data, _DECODE_PIECE)
                data = self._decoder.unconsumed_tail
                self._decoded += len(out)
                if self._decoded > _MAX_DECODED:
                    self.unreadable = "compressed body too large once decoded"
                    return
                if not out:
                    break
                self._take(out)
                self.peak = max(self.peak, self.buffered)
        except zlib.error:
            self.unreadable = "compressed body cannot be decoded"

    def _take(self, data: bytes) -> None:
        self.total += len(data)
        if self.stream:
            self._take_lines(data)
        elif not self._overflowed:
            if len(self._body) + len(data) <= self.limit:
                self._body += data
                return
            self._overflowed = True
            view = memoryview(data)
            head = bytes(self._body[: self.keep])
            self._head = head + bytes(view[: self.keep - len(head)])
            self._tail = bytearray(self._body[-self.keep :])
            self._body = bytearray()
            self._keep_tail(view)
        else:
            self._keep_tail(memoryview(data))

    def _keep_tail(self, view: memoryview) -> None:
        self._tail += view[-self.keep :]
        if len(self._tail) > self.keep:
            del self._tail[: len(self._tail) - self.keep]

    def _take_lines(self, data: bytes) -> None:
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if self._skipping:
                self.overflow_bytes += end - start
                self._skipping = False
            elif self._line:
                if len(self._line) + end - start > self.limit:
                    self.overflow_bytes += len(self._line) + end - start
                else:
                    self._line += data[start:end]
                    self._event(bytes(self._line))
                self._line.clear()
            elif end - start > self.limit:
                self.overflow_bytes += end - start
            else:
                self._event(data[start:end])
            start = end + 1
        rest = len(data) - start
        if self._skipping:
            self.overflow_bytes += rest
        elif len(self._line) + rest > self.limit:
            self.overflow_bytes += len(self._line) + rest
            self._line.clear()
            self._skipping = True
        elif rest:
            self._line += memoryview(data)[start:]

    def _event(self, line: bytes) -> None:
        line = line.strip()
        if not line.startswith(b"data:"):
            return
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):
            return
        if not isinstance(event, dict):
            return
        self.events += 1
        if self.api == "responses":
            # Text as it is generated (output_text, reasoning, refusal, function-call arguments);
            # usage in the final response.completed (or .incomplete, .failed) event.
            kind, delta = event.get("type"), event.get("delta")
            if isinstance(kind, str) and kind.endswith(".delta") and isinstance(delta, str):
                self.chars += len(delta)
            if isinstance(event.get("response"), dict):
                self._report(event["response"].get("usage"))
            return
        if self.api == "messages":
            self._anthropic_event(event)
            return
        self._report(event.get("usage"))
        choices = event.get("choices")
        if isinstance(choices, list):
            self.chars += sum(_choice_chars(c, "delta") for c in choices)

    def _anthropic_event(self, event: Dict[str, Any]) -> None:
        """message_start holds the prompt's counts, message_delta the output so far (cumulative)."""
        kind = event.get("type")
        if kind == "content_block_delta":
            self.chars += _output_chars(event.get("delta"))
            return
        if kind == "message_start":
            message = event.get("message")
            value = message.get("usage") if isinstance(message, dict) else None
        elif kind == "message_delta":
            value = event.get("usage")
        else:
            return
        counts = _anthropic_counts(value)
        if counts is _MALFORMED:
            self.malformed_usage = True
            return
        if counts:
            self._anthropic.update(counts)
        if kind == "message_delta" and "output_tokens" in self._anthropic:
            prompt, cached = _anthropic_usage(self._anthropic)
            self.usage = (prompt, cached, self._anthropic["output_tokens"])

    def _report(self, value: Any) -> None:
        usage = self._parse(value)
        if usage is _MALFORMED:
            self.malformed_usage = True
        elif usage is not None:
            self.usage = usage

    @property
    def streamed_tokens(self) -> int:
        """Generated tokens a stream has shown so far, from its text."""
        return (self.chars + self.overflow_bytes) // 4

    def finish(self) -> None:
        """Reads what is left once the response has ended (or been abandoned)."""
        if self.api == "other":
            return
        if self._decoder is not None and self.unreadable is None:
            try:
                rest = self._decoder.flush()
            except zlib.error:
                self.unreadable = "compressed body cannot be decoded"
            else:
                if rest:
                    self._take(rest)
        if self.stream:
            if self._line and not self._skipping:
                self._event(bytes(self._line))
            self._line.clear()
            return
        if self.unreadable is not None:
            return
        if self._overflowed:
            for part in (bytes(self._tail), self._head):
                if self._find_usage(part):
                    break
            self._head, self._tail = b"", bytearray()
            return
        body, self._body = bytes(self._body), bytearray()
        if not body:
            return
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            return
        if not isinstance(parsed, dict):
            return
        if self.api == "responses" and parsed.get("status") in ("queued", "in_progress"):
            # A background response: generation goes on after this answer, uncounted here.
            self.unreadable = f"a background response (status {parsed['status']}) reports no usage yet"
            return
        self._report(parsed.get("usage"))
        if self.api == "embeddings":
            self.text_chars = 0  # nothing generated
        elif self.api == "responses":
            output = parsed.get("output")
            if isinstance(output, list):
                self.text_chars = sum(_output_chars(item) for item in output)
        elif self.api == "messages":
            content = parsed.get("content")
            if isinstance(content, list):
                self.text_chars = sum(_output_chars(block) for block in content)
        else:
            choices = parsed.get("choices")
            if isinstance(choices, list):
                self.text_chars = sum(_choice_chars(c, "message") for c in choices)

    def _find_usage(self, part: bytes) -> bool:
        """Finds a ``"usage": {...}`` object in a piece of an oversized JSON body."""
        text = part.decode("utf-8", "replace")
        decoder = json.JSONDecoder()
        at = len(text)
        for _ in range(8):
            at = text.rfind('"usage"', 0, at)
            if at < 0:
                return False
            colon = re.compile(r"\s*:\s*").match(text, at + 7)
            if colon is not None:
                try:
                    value, _ = decoder.raw_decode(text, colon.end())
                except (ValueError, RecursionError):
                    continue
                usage = self._parse(value)
                if isinstance(usage, tuple):
                    self.usage = usage
                    return True
        return False

    def tokens(self) -> Optional[Tuple[Optional[int], int, int]]:
        """(prompt or None, cached, generated) as read, or None if the response was unreadable."""
        if self.api == "other":
            return (0, 0, 0)
        if self.usage is not None:
            return self.usage
        if self.unreadable is not None:
            return None
        if self.stream:
            if not (self.events or self.overflow_bytes):
                return None
            prompt, cached = _anthropic_usage(self._anthropic)  # (None, 0) but for a message stream
            return (prompt, cached, self.streamed_tokens)
        if self.text_chars is not None:
            return (None, 0, self.text_chars // 4)
        return None

    def why_unreadable(self) -> str:
        if self.unreadable is not None:
            return self.unreadable
        if self._overflowed:
            return f"response larger than {self.limit} bytes with no usage in its head or tail"
        if self.stream:
            return "event stream without JSON events"
        return "response is not JSON with usage or choices"


# -- the middleware -------------------------------------------------------------------------------


class _Admission:
    """What the body asks for, checked, ready for ``admit``."""

    __slots__ = ("account", "model", "fast", "prompt", "max_tokens", "n", "service_tier", "stream", "api")

    def __init__(
        self, account: bytes, model: bytes, fast: bool, prompt: int, max_tokens: int, n: int, service_tier: _ServiceTier, stream: bool, api: str = "chat"
    ) -> None:
        self.account, self.model, self.fast = account, model, fast
        self.prompt, self.max_tokens, self.n, self.service_tier, self.stream = prompt, max_tokens, n, service_tier, stream
        self.api = api


class SluicegateMiddleware:
    """Admits, refuses or sheds LLM API requests before they reach ``app``.

    - ``paths`` are the endpoints admitted (a POST to each; default :data:`DEFAULT_PATHS`: OpenAI's
      Chat Completions, Completions, Responses and Embeddings, and Anthropic's Messages). Each is
      read as the API its path ends with (:data:`APIS`), or as a mapping names it:
      ``paths={"/openai/v1/chat": "chat"}``. Request paths are matched after
      :func:`normalize_path`, so ``//v1/chat/completions/`` is ``/v1/chat/completions``.
    - ``unknown_paths`` is what happens to any other request under ``api_prefix`` (default
      ``/v1``): ``"limit_requests"`` (the default) admits it on the requests metric only, under the
      body's ``model`` or else :data:`OTHER_MODEL`; ``"deny"`` answers 404; ``"pass"`` passes it
      on untouched. CORS preflights (``OPTIONS``) always pass.
    - ``account(scope, headers)`` names the account; by default it is :func:`account_digest` of
      the credential (``Authorization: Bearer`` or ``x-api-key``) under ``account_key`` (none
      answers 401, as do two different credentials in one request). A custom function's id must
      be 1 to 64 bytes (else 400) and must not be a secret.
    - ``account_key`` (bytes or str) is the deployment key of the default account digest; when
      omitted, ``$SLUICEGATE_ACCOUNT_KEY``, else a random key of this process (with a warning:
      limits then reset on restart and are not shared between workers).
    - ``service_tier(account)`` grants an account its service tier, ``"flex"``, ``"default"``
      (the default for all) or ``"priority"``; a request's ``service_tier`` may only lower it.
      The grant is written into the engine (``Engine.set_service_tier_grant``) at each request.
    - ``variant(model, headers) -> (model, fast)`` maps a requested model onto its scope (default
      :func:`fast_variant`: a ``-fast`` suffix or ``x-sluicegate-variant: fast``).
    - ``estimate_prompt_tokens(body)`` sizes the prompt (default :func:`chars_over_four`).
    - ``max_body_bytes`` (default 1 MiB) caps the request body (413 beyond), ``max_json_depth``
      (default 64) its nesting (400 beyond), and ``max_buffer_bytes`` (default 1 MiB) the response
      bytes held per request.
    - ``error_retry_after`` (seconds, default 1) is the least ``retry-after`` of a 503 answering an
      engine error; each is spread over up to twice that.

    Headers and error bodies are in ``dialect``, by default the engine's (``Engine(dialect=...)``);
    the Messages API's (and other paths under it) in ``messages_dialect``, by default
    ``"anthropic"``: Anthropic's headers and its error shape.
    """

    def __init__(
        self,
        app: ASGIApp,
        engine: Engine,
        *,
        dialect: Optional[_Dialect] = None,
        messages_dialect: Optional[_Dialect] = "anthropic",
        account: Optional[AccountFn] = None,
        account_key: Union[str, bytes, None] = None,
        service_tier: Callable[[str], str] = default_service_tier,
        variant: Optional[VariantFn] = None,
        estimate_prompt_tokens: Callable[[Mapping[str, Any]], int] = chars_over_four,
        paths: Union[Iterable[str], Mapping[str, str]] = DEFAULT_PATHS,
        unknown_paths: _UnknownPaths = "limit_requests",
        api_prefix: str = API_PREFIX,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_json_depth: int = MAX_JSON_DEPTH,
        max_buffer_bytes: int = MAX_BUFFER_BYTES,
        error_retry_after: int = 1,
    ) -> None:
        for name, value, least in (
            ("max_body_bytes", max_body_bytes, 1),
            ("max_json_depth", max_json_depth, 1),
            ("max_buffer_bytes", max_buffer_bytes, 1024),
            ("error_retry_after", error_retry_after, 1),
        ):
            if type(value) is not int or value < least:
                raise ValueError(f"{name} must be an int of at least {least}, not {value!r}")
        if unknown_paths not in UNKNOWN_PATH_POLICIES:
            raise ValueError(f"unknown_paths must be one of {', '.join(UNKNOWN_PATH_POLICIES)}; got {unknown_paths!r}")
        if isinstance(paths, str):
            raise ValueError("paths must be a collection of paths, not one string")
        named = paths.items() if isinstance(paths, Mapping) else ((p, _api_of(normalize_path(p))) for p in paths)
        self.paths: Dict[str, str] = {}
        for path, api in named:
            if api not in APIS.values():
                raise ValueError(f"paths: the API of {path!r} must be one of {', '.join(APIS.values())}; got {api!r}")
            self.paths[normalize_path(path)] = api
        self.app = app
        self.engine = engine
        self.dialect: _Dialect = dialect if dialect is not None else engine.dialect
        self.messages_dialect: _Dialect = messages_dialect if messages_dialect is not None else self.dialect
        self.unknown_paths = unknown_paths
        self.api_prefix = normalize_path(api_prefix)
        self.account = account
        # A custom account() needs no key; digest() then works only if one is given.
        needed = account is None or account_key is not None or bool(os.environ.get(ACCOUNT_KEY_ENV))
        self._key: Optional[bytes] = _deployment_key(account_key) if needed else None
        self.service_tier = service_tier
        self.variant = variant if variant is not None else fast_variant()
        self.estimate_prompt_tokens = estimate_prompt_tokens
        self.max_body_bytes = max_body_bytes
        self.max_json_depth = max_json_depth
        self.max_buffer_bytes = max_buffer_bytes
        self.error_retry_after = error_retry_after
        self._warned: Set[str] = set()

    def digest(self, credential: Union[str, bytes]) -> str:
        """The default account id of a credential under this middleware's deployment key."""
        if self._key is None:
            raise ValueError("no deployment key: pass account_key= or set $" + ACCOUNT_KEY_ENV)
        return account_digest(credential, self._key)

    def _note(self, reason: str, message: str, *args: Any) -> None:
        """Logs a warning the first time for each reason, then at debug level."""
        level = logging.DEBUG if reason in self._warned else logging.WARNING
        self._warned.add(reason)
        log.log(level, message, *args)

    def route(self, path: str) -> Optional[str]:
        """The API a request path is admitted as (``"other"``: an unknown path under the API
        prefix, when the policy counts it); None if it is passed on untouched."""
        path = normalize_path(path)
        api = self.paths.get(path)
        if api is not None:
            return api
        return "other" if self._counted_unknown(path) else None

    def _counted_unknown(self, path: str) -> bool:
        """Whether the unknown-path policy applies to a (normalised) path."""
        prefix = self.api_prefix.rstrip("/")
        return self.unknown_paths != "pass" and (path == prefix or path.startswith(prefix + "/"))

    def _voice_of(self, path: str, api: str) -> _Voice:
        """The Messages API (and any path under it) answers in ``messages_dialect`` and Anthropic's
        error shape; every other path in ``dialect`` and OpenAI's."""
        path = normalize_path(path)
        for known, known_api in self.paths.items():
            if known_api == "messages" and (path == known or path.startswith(known + "/")):
                return _Voice(self.messages_dialect, True)
        return _Voice(self.dialect, False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path") or "/")
        api = self.route(path)
        method = scope.get("method")
        if api is not None and api != "other" and method != "POST":
            # Another method on a known path (a GET listing stored completions): an unknown use.
            api = "other" if self._counted_unknown(normalize_path(path)) else None
        if api is None or method == "OPTIONS":
            await self.app(scope, receive, send)
            return
        voice = self._voice_of(path, api)
        if api == "other" and self.unknown_paths == "deny":
            await _respond(send, *_json_error(404, "not_found", "There is no such endpoint.", voice=voice))
            return
        headers = {bytes(k).decode("latin-1").lower(): bytes(v).decode("latin-1") for k, v in scope.get("headers", [])}
        declared = headers.get("content-length", "").strip()
        if api != "other" and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _respond(send, *self._too_large(voice))
            return
        read = await _read_body(receive, self.max_body_bytes)
        if read is None:
            return  # the client left
        oversized = isinstance(read, _Partial)
        if isinstance(read, _Partial):
            if api != "other":
                await _respond(send, *self._too_large(voice))
                return
            body, more = read.head, read.more  # an unknown path's large body (an upload): passed on, unread
        else:
            body, more = read, False
        del read
        if api == "other":
            asked = self._read_other(scope, headers, body, oversized, voice)
        else:
            asked = self._read_request(scope, headers, body, api, voice)
        if not isinstance(asked, _Admission):
            await _respond(send, *asked)
            return
        try:
            decision = self.engine.admit(
                asked.account,
                asked.model,
                prompt_tokens=asked.prompt,
                max_tokens=asked.max_tokens,
                n=asked.n,
                fast=asked.fast,
                service_tier=asked.service_tier,
            )
        except Exception as exc:  # never a 500 from the limiter
            await _respond(send, *self._admit_failed(exc, voice))
            return
        if not decision.admitted:
            await _respond(send, *self._refusal(decision, voice))
            return
        # Admitted: from here every path settles exactly once (no await before the try).
        flight = _Flight(self, decision, body, asked, receive, send, voice.dialect, more)
        del body  # the flight hands it to the app once, then lets it go
        try:
            if decision.wait > 0:
                await asyncio.sleep(decision.wait)
            flight.forwarded = True
            await self.app(_identity(scope), flight.receive, flight.send)
        except BaseException as exc:
            flight.raised = exc
            raise
        finally:
            flight.settle()

    def _too_large(self, voice: _Voice) -> _Reply:
        return _json_error(413, "invalid_request", f"The request body is larger than {self.max_body_bytes} bytes.", "request_too_large", voice=voice)

    def _account_of(self, scope: Scope, headers: Mapping[str, str], voice: _Voice) -> Union[bytes, _Reply]:
        if self.account is None:
            credentials = api_key_credentials(scope.get("headers", []))
            if len(credentials) > 1:
                # The limiter must count the credential the app honours: never guess which.
                return _json_error(401, "invalid_api_key", "Two different API keys: send one, as Authorization: Bearer <key> or x-api-key.", voice=voice)
            if not credentials:
                return _json_error(401, "invalid_api_key", "No API key: send Authorization: Bearer <key>.", voice=voice)
            return self.digest(credentials.pop()).encode()
        named = self.account(scope, headers)
        if named is None:
            return _json_error(401, "invalid_api_key", "No API key: send Authorization: Bearer <key>.", voice=voice)
        try:
            account = named.encode("utf-8") if isinstance(named, str) else bytes(named)
        except (UnicodeError, TypeError):
            account = b""
        if not 0 < len(account) <= ACCOUNT_ID_MAX_BYTES:
            return _invalid(f"The account id must be 1 to {ACCOUNT_ID_MAX_BYTES} bytes of UTF-8.", "invalid_account", voice)
        return account

    def _read_other(self, scope: Scope, headers: Mapping[str, str], body: bytes, oversized: bool, voice: _Voice) -> Union[_Admission, _Reply]:
        """An unknown path under the API prefix: one request, nothing generated, under the body's
        model when it is JSON naming one (so an alias a lenient app serves shares its limit)."""
        account = self._account_of(scope, headers, voice)
        if not isinstance(account, bytes):
            return account
        model: Any = None
        if not oversized and body and _json_depth(body) <= self.max_json_depth:
            try:
                payload = json.loads(body.decode("utf-8"))
            except (ValueError, RecursionError):
                payload = None
            if isinstance(payload, dict) and isinstance(payload.get("model"), str):
                model = payload["model"]
        fast = False
        if model:
            model, fast = self.variant(model, headers)
        try:
            model_key = model.encode("utf-8") if model else b""
        except UnicodeError:
            model_key = b""
        if not 0 < len(model_key) <= MODEL_ID_MAX_BYTES:
            model_key, fast = OTHER_MODEL.encode(), False
        return _Admission(account, model_key, fast, 0, 0, 1, self._service_tier(account, {}), False, "other")

    def _read_request(self, scope: Scope, headers: Mapping[str, str], body: bytes, api: str, voice: _Voice) -> Union[_Admission, _Reply]:
        """Checks a request and says what to admit, or the 4xx to answer."""
        account = self._account_of(scope, headers, voice)
        if not isinstance(account, bytes):
            return account
        too_deep = _invalid(f"The JSON body is nested deeper than {self.max_json_depth} levels.", "nesting_too_deep", voice)
        try:
            # UTF-8 only (as OpenAI's API): the nesting scan below relies on it.
            payload = json.loads(body.decode("utf-8") or "null")
        except RecursionError:
            return too_deep
        except ValueError:  # UnicodeDecodeError included
            return _invalid("The body must be JSON with a model.", "invalid_json", voice)
        if _json_depth(body) > self.max_json_depth:
            return too_deep
        if not isinstance(payload, dict) or not isinstance(payload.get("model"), str) or not payload["model"]:
            return _invalid("The body must be JSON with a model.", "invalid_json", voice)
        model, fast = self.variant(payload["model"], headers)
        try:
            model_key = model.encode("utf-8")
        except UnicodeError:
            model_key = b""
        if not 0 < len(model_key) <= MODEL_ID_MAX_BYTES:
            return _invalid(f"The model must be 1 to {MODEL_ID_MAX_BYTES} bytes of UTF-8.", "invalid_model", voice)
        n: Any = 1
        if api == "embeddings":
            max_tokens: Any = 0  # prompt tokens only: nothing is generated
        else:
            if api == "responses":
                max_tokens = payload.get("max_output_tokens")
            elif api == "messages":
                max_tokens = payload.get("max_tokens")
            else:
                max_tokens = payload.get("max_completion_tokens")
                if max_tokens is None:
                    max_tokens = payload.get("max_tokens")
                n = payload.get("n")
                n = 1 if n is None else n
            if max_tokens is None:
                max_tokens = DEFAULT_MAX_TOKENS
            if not _is_count(max_tokens) or max_tokens == 0:
                return _invalid("max_tokens must be a positive integer.", "invalid_max_tokens", voice)
        if not _is_count(n) or n == 0:
            return _invalid("n must be a positive integer.", "invalid_n", voice)
        try:
            prompt = int(self.estimate_prompt_tokens(payload))
        except RecursionError:
            return too_deep
        stream = payload.get("stream") is True
        return _Admission(account, model_key, fast, min(max(prompt, 0), _MAX_COUNT), max_tokens, n, self._service_tier(account, payload), stream, api)

    def _service_tier(self, account: bytes, payload: Mapping[str, Any]) -> _ServiceTier:
        """The service tier to ask the engine for: granted, lowered if the body asks. The grant is
        pushed into the engine first, since the engine serves no request above its account's."""
        named = self.service_tier(account.decode("utf-8"))
        if named not in SERVICE_TIERS:
            self._note("tier", "sluicegate: service_tier() returned %r, not one of %s; using 'default'", named, SERVICE_TIERS)
            named = "default"
        granted = cast("_ServiceTier", named)
        self._push_grant(account, granted)
        asked = payload.get("service_tier")
        if isinstance(asked, str) and asked in SERVICE_TIERS and SERVICE_TIERS.index(asked) < SERVICE_TIERS.index(granted):
            return cast("_ServiceTier", asked)
        return granted

    def _push_grant(self, account: bytes, granted: _ServiceTier) -> None:
        """Writes the operator's grant for ``account`` into the engine, which writes only a change."""
        try:
            self.engine.set_service_tier_grant(account, granted)
        except Exception as exc:  # a full account table: served at the engine's grant
            self._note("grant", "sluicegate: could not grant service tier %r in the engine (%s); served at the engine's grant", granted, exc)

    def _admit_failed(self, exc: Exception, voice: _Voice) -> _Reply:
        if isinstance(exc, ArgumentError):
            return _invalid(f"The request cannot be admitted: {exc}", "invalid_request", voice)
        return self._unavailable(exc, voice)

    def _unavailable(self, exc: Exception, voice: _Voice) -> _Reply:
        """A 503 with retry-after for an engine error: never a 500 from the limiter."""
        if isinstance(exc, TableFullError):
            self._note("table_full", "sluicegate: a table is full, answering 503: %s", exc)
            code, message = "table_full", "The gateway is tracking as many accounts and models as it can; retry shortly."
        else:
            self._note(type(exc).__name__, "sluicegate: admit failed, answering 503: %r", exc)
            code, message = "limiter_unavailable", "The gateway's rate limiter cannot decide this request now; retry shortly."
        retry = random.randint(self.error_retry_after, 2 * self.error_retry_after)
        extra = [(b"retry-after", str(retry).encode()), (b"x-should-retry", b"true")]
        return _json_error(503, "service_unavailable", message, code, extra, voice)

    def _refusal(self, decision: Decision, voice: _Voice) -> _Reply:
        try:
            error = decision.error_body(voice.dialect) or {}
            rendered = [(k.lower().encode(), v.encode()) for k, v in decision.headers(voice.dialect)]
        except Exception as exc:
            return self._unavailable(exc, voice)
        # The engine's headers carry x-should-retry (false when no retry can succeed): not added twice.
        rendered.append((b"content-type", b"application/json"))
        return decision.status_code, rendered, json.dumps(_error_shape(decision.status_code, error, voice)).encode()


def _identity(scope: Scope) -> Scope:
    """The scope the app sees: asking for an uncompressed response, which can be read."""
    headers = [(k, v) for k, v in scope.get("headers", []) if bytes(k).lower() != b"accept-encoding"]
    headers.append((b"accept-encoding", b"identity"))
    return {**scope, "headers": headers}


class _Partial:
    """The head of a request body larger than the cap: what was read of it."""

    __slots__ = ("head", "more")

    def __init__(self, head: bytes, more: bool) -> None:
        self.head, self.more = head, more  # more: whether the rest is still to be received


async def _read_body(receive: Receive, limit: int) -> Union[bytes, _Partial, None]:
    """The request body; None if the client left; a :class:`_Partial` as soon as it passes ``limit``."""
    chunks: List[bytes] = []
    size = 0
    while True:
        message = await receive()
        kind = message.get("type")
        if kind == "http.disconnect":
            return None
        if kind != "http.request":
            continue
        chunk = message.get("body") or b""
        size += len(chunk)
        chunks.append(chunk)
        more = bool(message.get("more_body", False))
        if size > limit:
            return _Partial(b"".join(chunks), more)
        if not more:
            return b"".join(chunks)


class _Flight:
    """One admitted request on its way through the app, settled once at the end."""

    def __init__(
        self,
        gate: SluicegateMiddleware,
        decision: Decision,
        body: bytes,
        asked: _Admission,
        receive: Receive,
        send: Send,
        dialect: Optional[_Dialect] = None,
        more: bool = False,
    ) -> None:
        self.gate = gate
        self.decision = decision
        self.asked = asked
        self.dialect: _Dialect = dialect if dialect is not None else gate.dialect
        self.meter = _Meter(gate.max_buffer_bytes, asked.api)
        self._more = more  # the body goes on past what was read (an upload to an unknown path)
        self.forwarded = False
        self.raised: Optional[BaseException] = None
        self.status: Optional[int] = None
        self.complete = False
        self.gone = False
        self.expired = False
        self.charged = 0
        self.charging = True
        self.settled = False
        self.broken: Optional[str] = None  # the accounting itself failed
        self._body: Optional[bytes] = body
        self._receive = receive
        self._send = send

    async def receive(self) -> Message:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": self._more}
        message = await self._receive()
        if message.get("type") == "http.disconnect":
            self.gone = True
        return message

    async def send(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "http.response.start":
            message = self._started(message)
        elif kind == "http.response.body" and self.broken is None:
            try:
                self._counted(message.get("body") or b"")
            except Exception as exc:  # the accounting never breaks the response
                self.broken = repr(exc)
        try:
            await self._send(message)
        except BaseException:
            self.gone = True
            raise
        if kind == "http.response.body" and not message.get("more_body", False):
            self.complete = True

    def _started(self, message: Message) -> Message:
        try:
            self.status = int(message.get("status", 200))
            given = list(message.get("headers", []))
            self.meter.start(given)
            names = {bytes(k).lower() for k, _ in given}
            extra = [(k.lower().encode(), v.encode()) for k, v in self.decision.headers(self.dialect) if k.lower().encode() not in names]
            return {**message, "headers": given + extra}
        except Exception as exc:
            self.broken = repr(exc)
            return message

    def _counted(self, chunk: bytes) -> None:
        self.meter.feed(chunk)
        if not self.meter.stream or self.meter.usage is not None or self.expired or not self.charging:
            return
        if self.status is None or not 200 <= self.status < 300:
            return
        tokens = self.meter.streamed_tokens - self.charged
        if tokens <= 0:
            return
        try:
            self.gate.engine.charge(self.decision, tokens)
        except PermitExpiredError:
            self.expired = True  # past permit_ttl: the reservation stays charged; the stream goes on
            return
        except Error as exc:
            self.gate._note("charge", "sluicegate: a stream's charge was refused: %r", exc)
            self.charging = False  # stale after a restore: charge no more; the settle says the rest
            return
        self.charged += tokens

    def settle(self) -> None:
        """Settles the permit, once; never raises."""
        if self.settled:
            return
        self.settled = True
        try:
            self._settle()
        except Exception:
            log.exception("sluicegate: settling an admitted request failed")

    def _outcome(self) -> Tuple[_Completion, Dict[str, int]]:
        """How the request ended and what to settle it with (an omitted field: what was reserved)."""
        meter, prompt = self.meter, self.asked.prompt
        read = meter.tokens() if self.broken is None else None
        if not self.forwarded:
            return "cancelled", {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0}
        failed = isinstance(self.raised, Exception) or (self.status is not None and not 200 <= self.status < 300)
        left = not self.complete and (self.gone or self.raised is not None)
        if failed or (self.status is None and not left):
            # The backend refused it, failed, or the app answered nothing: refunded, not billed.
            generated = read[2] if read is not None and meter.stream else 0
            return "upstream_failure", {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": generated}
        if read is not None:
            p = read[0] if read[0] is not None else prompt
            usage = {"prompt_tokens": p, "cached_tokens": min(read[1], p), "generated_tokens": read[2]}
        else:
            usage = {}
        if left or not self.complete:
            if read is not None:
                return "cancelled", usage
            if self.asked.stream and self.status is None:
                return "cancelled", {"prompt_tokens": prompt, "generated_tokens": self.charged}
            # A non-streamed request the backend may finish anyway: its reservation.
            return "cancelled", {}
        if read is None:
            reason = self.broken or meter.why_unreadable()
            self.gate._note("unreadable:" + reason.split(":")[0], "sluicegate: charging the reservation of a response it cannot read (%s)", reason)
        if meter.malformed_usage:
            self.gate._note("malformed_usage", "sluicegate: a response's usage has the wrong shape; reading its text instead")
        return "success", usage

    def _settle(self) -> None:
        try:
            self.meter.finish()
        except Exception as exc:
            self.broken = repr(exc)
        if self.expired:
            return  # outlived permit_ttl (or the permit went stale): nothing to settle
        completion, usage = self._outcome()
        engine = self.gate.engine
        try:
            try:
                engine.settle(self.decision, completion=completion, **usage)
            except (InvalidUsageError, OverflowError):
                engine.settle(self.decision, completion=completion)  # conservative: what was reserved
        except PermitExpiredError:
            pass  # outlived permit_ttl: nothing to settle, the reservation stays charged
        except StalePermitError as exc:
            self.gate._note("stale", "sluicegate: a permit went stale before its settle (engine restored?): %s", exc)
        except AlreadySettledError as exc:
            self.gate._note("already_settled", "sluicegate: a permit was settled elsewhere: %s", exc)
        except Error as exc:
            self.gate._note("settle", "sluicegate: settle failed: %r", exc)
