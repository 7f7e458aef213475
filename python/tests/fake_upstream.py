"""A tiny OpenAI-compatible upstream: fixed completions, streamed word by word on request."""

import asyncio
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

SEEN = {}
"""What the upstream last saw, for tests: the accept-encoding header."""

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
COMPLETION_TOKENS = 40
PROMPT_TOKENS = 25


async def chat(request: Request):
    body = await request.json()
    SEEN["accept-encoding"] = request.headers.get("accept-encoding")
    if body.get("model") == "broken":
        return JSONResponse({"error": {"message": "upstream exploded"}}, status_code=502)
    if body.get("model") == "reject":
        # Refused before generating, as a backend refuses a bad parameter.
        return JSONResponse({"error": {"message": "bad parameter", "type": "invalid_request_error"}}, status_code=400)
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS, "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}
    if not body.get("stream"):
        return JSONResponse(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(WORDS)}, "finish_reason": "stop"}],
                "usage": usage,
            }
        )
    words = int(body.get("max_tokens") or len(WORDS))
    include_usage = (body.get("stream_options") or {}).get("include_usage")
    # A slow stream (like a real model) lets a disconnect be noticed after a few words.
    delay = float(body.get("seconds_per_word", 0))

    async def events():
        for i in range(words):
            chunk = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "delta": {"content": WORDS[i % len(WORDS)] + " "}, "finish_reason": None}],
            }
            yield f"data: {json.dumps(chunk)}\n\n"
            if delay:
                await asyncio.sleep(delay)
        if include_usage:
            final = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": body["model"], "choices": [], "usage": usage}
            yield f"data: {json.dumps(final)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
