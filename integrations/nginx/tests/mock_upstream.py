"""The mock OpenAI upstream behind nginx: python/tests/fake_upstream.py, plus one model.

``python -m uvicorn mock_upstream:app`` with python/tests on PYTHONPATH. Chat completions,
streamed (SSE, with a final usage chunk when ``stream_options.include_usage``) and not, with
``usage`` of 25 prompt and 40 completion tokens (fake_upstream's PROMPT_TOKENS and
COMPLETION_TOKENS); the model ``broken`` answers 502. Added here: the model ``bytewise``, streamed,
sends the same events one byte per write (an SSE stream split at every byte).
"""

import asyncio
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

import fake_upstream


def events(model, words, include_usage):
    """The SSE text fake_upstream streams for ``words`` words."""
    out = []
    for i in range(words):
        chunk = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": {"content": fake_upstream.WORDS[i % len(fake_upstream.WORDS)] + " "}, "finish_reason": None}],
        }
        out.append(f"data: {json.dumps(chunk)}\n\n")
    if include_usage:
        usage = {
            "prompt_tokens": fake_upstream.PROMPT_TOKENS,
            "completion_tokens": fake_upstream.COMPLETION_TOKENS,
            "total_tokens": fake_upstream.PROMPT_TOKENS + fake_upstream.COMPLETION_TOKENS,
        }
        final = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [], "usage": usage}
        out.append(f"data: {json.dumps(final)}\n\n")
    out.append("data: [DONE]\n\n")
    return "".join(out).encode()


async def chat(request: Request):
    body = await request.json()
    if body.get("model") != "bytewise" or not body.get("stream"):
        return await fake_upstream.chat(request)
    words = int(body.get("max_tokens") or len(fake_upstream.WORDS))
    include_usage = (body.get("stream_options") or {}).get("include_usage")
    text = events(body["model"], words, include_usage)

    async def bytewise():
        for i in range(len(text)):
            yield text[i : i + 1]
            await asyncio.sleep(0.001)

    return StreamingResponse(bytewise(), media_type="text/event-stream")


app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
