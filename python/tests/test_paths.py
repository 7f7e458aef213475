"""Path aliases and unknown paths (issue 21, item 3), over HTTP: uvicorn on 127.0.0.1 in front of
a deliberately lenient upstream that serves every alias of an endpoint (``fake_apis``).

Each request is written on a raw socket, so no client normalises its path first."""

import json

import httpx
import pytest

import sluicegate
from sluicegate.asgi import SluicegateMiddleware, account_digest, normalize_path

from fake_apis import Counted, Server, app as upstream

MODEL = "llama-v3p1-8b"
KEY = b"deployment key of the path tests"
ACCT = account_digest("acct-1", KEY)
AUTH = "authorization: Bearer acct-1"
BODIES = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 5},
    "/v1/responses": {"model": MODEL, "input": "hi", "max_output_tokens": 5},
    "/v1/embeddings": {"model": MODEL, "input": "hi"},
    "/v1/messages": {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
}

CHAT_ALIASES = [
    "/v1/chat/completions/",
    "//v1/chat/completions",
    "/v1//chat/completions",
    "/v1/chat/completions//",
    "/v1/chat%2Fcompletions",
    "/v1/chat%2fcompletions",
    "%2Fv1%2Fchat%2Fcompletions",
    "/v1/chat%252Fcompletions",
    "/v1/chat/./completions",
    "/v1/chat/completions/.",
    "/v1/models/../chat/completions",
    "/v1/chat/completions/x/..",
    "/../v1/chat/completions",
    "/v1/%2e%2e/v1/chat/%2e/completions",
    "/v1/chat%5Ccompletions",
]
ALIASES = [(alias, "/v1/chat/completions") for alias in CHAT_ALIASES] + [
    (alias, path) for path in BODIES if path != "/v1/chat/completions" for alias in (path + "/", "/" + path, path.replace("/v1/", "/v1/./"))
]


def serve(engine, **kw):
    inner = Counted(upstream)
    return Server(SluicegateMiddleware(inner, engine, account_key=KEY, **kw)), inner


def post(server, target, body, *headers):
    return server.raw("POST", target, json.dumps(body).encode(), (AUTH, "content-type: application/json", *headers))


def statuses(targets, canonical):
    """What a fresh engine at 2 requests a minute answers to the targets, in order, and what it has left."""
    engine = sluicegate.Engine("fixed", capacity=100, requests_per_minute=2)
    with serve(engine)[0] as s:
        seen = [post(s, target, BODIES[canonical]) for target in targets]
    return seen, engine.remaining(ACCT, MODEL)["requests"]


@pytest.mark.parametrize("alias, canonical", ALIASES, ids=[a for a, _ in ALIASES])
def test_a_path_alias_is_limited_exactly_like_its_canonical_path(alias, canonical):
    assert normalize_path(alias) == canonical
    expected = ([200, 200, 429], 0)
    assert statuses([canonical] * 3, canonical) == expected
    assert statuses([alias] * 3, canonical) == expected  # the lenient upstream serves the alias: 200
    assert statuses([alias, canonical, alias], canonical) == expected
    assert statuses([canonical, alias, canonical], canonical) == expected


def test_normalize_path():
    assert normalize_path("") == "/"
    assert normalize_path("/v1/../../..") == "/"
    assert normalize_path("/v1/chat%25252Fcompletions") == "/v1/chat/completions"
    assert normalize_path("/v1/Chat/Completions") == "/v1/Chat/Completions"  # case is the app's to fold
    assert normalize_path("/v1/chat/completions%3Fx") == "/v1/chat/completions?x"  # not a separator


# The unknown-path policy.


def test_an_unknown_path_under_the_prefix_counts_on_the_requests_metric_only():
    engine = sluicegate.Engine("fixed", capacity=100, requests_per_minute=2, generated_tokens_per_minute=60, prompt_tokens_per_minute=60)
    with serve(engine)[0] as s:
        # A body naming a model: counted under that model, one request, no tokens.
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi " * 100}], "max_tokens": 1_000}
        assert post(s, "/v1/chat/completions/extra", body) == 200
        assert engine.remaining(ACCT, MODEL) == {"requests": 1, "prompt_tokens": 60, "uncached_prompt_tokens": None, "generated_tokens": 60}
        # No body, or no model: counted under "*".
        assert s.raw("GET", "/v1/models", headers=(AUTH,)) == 200
        assert s.raw("GET", "//v1/models/", headers=(AUTH,)) == 200
        assert s.raw("GET", "/v1/models", headers=(AUTH,)) == 429
        assert engine.remaining(ACCT, "*")["requests"] == 0
        # Another method on a known path is an unknown use of it.
        assert s.raw("GET", "/v1/chat/completions", headers=(AUTH,)) == 429
        # Outside the prefix, and CORS preflights, pass untouched.
        assert s.raw("GET", "/health") == 200
        assert s.raw("OPTIONS", "/v1/chat/completions") == 200
        # Without a credential an unknown path is 401, as a known one is.
        assert s.raw("GET", "/v1/files") == 401


def test_the_deny_policy_answers_404_without_reaching_the_app():
    engine = sluicegate.Engine("fixed", capacity=100, requests_per_minute=2)
    server, inner = serve(engine, unknown_paths="deny")
    with server as s, httpx.Client(timeout=10) as http:
        r = http.get(f"{s.origin}/v1/models", headers={"authorization": "Bearer acct-1"})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found" and r.headers["x-should-retry"] == "false"
        r = http.post(f"{s.origin}/v1/messages/count_tokens", json={"model": MODEL})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"  # Anthropic's shape under /v1/messages
        assert post(s, "/v1/chat/completions/", BODIES["/v1/chat/completions"]) == 200  # an alias is not unknown
        assert s.raw("GET", "/health") == 200
    assert [path for _, path in inner.seen] == ["/v1/chat/completions/", "/health"]


def test_the_pass_policy_passes_unknown_paths_untouched():
    engine = sluicegate.Engine("fixed", capacity=100, requests_per_minute=1)
    with serve(engine, unknown_paths="pass")[0] as s:
        for _ in range(3):
            assert s.raw("GET", "/v1/models") == 200
        assert post(s, "//v1/chat/completions", BODIES["/v1/chat/completions"]) == 200
        assert post(s, "/v1/chat/completions", BODIES["/v1/chat/completions"]) == 429  # aliases are still known


def test_an_upload_to_an_unknown_path_passes_whole_beyond_the_body_cap():
    engine = sluicegate.Engine("fixed", capacity=100, requests_per_minute=5)
    got = {}

    async def files(scope, receive, send):
        size, more = 0, True
        while more:
            message = await receive()
            size, more = size + len(message.get("body", b"")), message.get("more_body", False)
        got["size"] = size
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    middleware = SluicegateMiddleware(files, engine, account_key=KEY, max_body_bytes=4_096)
    with Server(middleware) as s, httpx.Client(timeout=10) as http:
        upload = b"x" * 100_000
        r = http.post(f"{s.origin}/v1/files", content=upload, headers={"authorization": "Bearer acct-1"})
        assert r.status_code == 200 and got["size"] == len(upload)
        # A known endpoint keeps its cap.
        r = http.post(f"{s.origin}/v1/chat/completions", content=upload, headers={"authorization": "Bearer acct-1"})
        assert r.status_code == 413
    assert engine.remaining(ACCT, "*")["requests"] == 4


@pytest.mark.parametrize("policy", ["sometimes", "", None])
def test_an_unknown_policy_is_refused(policy):
    with pytest.raises(ValueError, match="unknown_paths must be one of limit_requests, deny, pass"):
        SluicegateMiddleware(upstream, sluicegate.Engine(), account_key=KEY, unknown_paths=policy)


def test_paths_name_their_api():
    engine = sluicegate.Engine("fixed", capacity=100, requests_per_minute=1)
    m = SluicegateMiddleware(upstream, engine, account_key=KEY, paths={"/openai/v1/chat": "chat"}, api_prefix="/openai/v1")
    assert m.route("/openai//v1/chat/") == "chat" and m.route("/openai/v1/models") == "other" and m.route("/v1/chat/completions") is None
    m = SluicegateMiddleware(upstream, engine, account_key=KEY, paths=["/api/v1/messages"])
    assert m.paths == {"/api/v1/messages": "messages"}
    with pytest.raises(ValueError, match="ends with none of"):
        SluicegateMiddleware(upstream, engine, account_key=KEY, paths=["/v1/rerank"])
    with pytest.raises(ValueError, match="must be one of"):
        SluicegateMiddleware(upstream, engine, account_key=KEY, paths={"/v1/rerank": "rerank"})


# Credentials: Anthropic's x-api-key, and never two of them.


def test_x_api_key_is_the_same_account_as_its_bearer_and_two_keys_are_refused():
    engine = sluicegate.Engine("fixed", capacity=100, requests_per_minute=3)
    body = BODIES["/v1/messages"]
    with serve(engine)[0] as s:
        assert s.raw("POST", "/v1/messages", json.dumps(body).encode(), ("x-api-key: acct-1",)) == 200
        assert post(s, "/v1/messages", body) == 200
        assert engine.remaining(ACCT, MODEL)["requests"] == 1
        # The limiter cannot know which of two keys the app honours: refused, never guessed.
        assert post(s, "/v1/messages", body, "x-api-key: acct-2") == 401
        assert s.raw("POST", "/v1/messages", json.dumps(body).encode(), (AUTH, "authorization: Bearer acct-2")) == 401
        assert post(s, "/v1/messages", body, "x-api-key: acct-1") == 200  # the same key twice is one
    assert engine.remaining(ACCT, MODEL)["requests"] == 0
