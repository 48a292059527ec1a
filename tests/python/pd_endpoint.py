"""A small real HTTP server standing in for a vLLM instance behind
pegaflow-router, for the router-only tests (test_router.py): it answers
/health, /v1/models, /v1/completions and /v1/chat/completions the way vLLM's
OpenAI server does for a prefill (``kv_transfer_params`` in the answer) or a
decode instance (JSON or an SSE stream), and appends every request it gets
(path, X-Request-Id, body) as one JSON line to ``--log``.

    python pd_endpoint.py --port P --role prefill|decode --log FILE
        [--chunks N] [--gate FILE] [--die-after K] [--status S]

``--gate FILE``: a stream waits after its first chunk until FILE exists (the
test proves the router passes chunks through as they come). ``--die-after K``:
the process SIGKILLs itself after sending K chunks of a stream. ``--status S``:
every completion request is answered with status S. ``return_token_ids`` in
a request is honoured as vLLM does (the prompt's ids, a string prompt's
being its characters' codes, and each chunk's token ids; the prefill's token
is 900, the decode's i-th 100 + i) unless ``--no-token-ids`` (an older
vLLM); ``--first-finish R``: the prefill's finish_reason (default length).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal

from aiohttp import web


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--role", choices=["prefill", "decode"], required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--gate", default="")
    p.add_argument("--die-after", type=int, default=-1)
    p.add_argument("--status", type=int, default=200)
    p.add_argument("--no-token-ids", action="store_true")
    p.add_argument("--no-params", action="store_true", help="a prefill without the connector")
    p.add_argument("--first-finish", default="length")
    a = p.parse_args()

    def record(request: web.Request, body: dict) -> None:
        with open(a.log, "a") as f:
            f.write(json.dumps({
                "path": request.path,
                "request_id": request.headers.get("X-Request-Id"),
                "body": body,
            }) + "\n")

    async def health(_r: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(_r: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "stand-in", "role": a.role}]})

    async def complete(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        record(request, body)
        rid = request.headers.get("X-Request-Id", "none")
        if a.status != 200:
            return web.json_response(
                {"error": {"message": f"stand-in {a.role} says {a.status}", "code": a.status}},
                status=a.status,
            )
        chat = request.path.endswith("chat/completions")
        ids = body.get("return_token_ids") and not a.no_token_ids and not chat
        prompt = body.get("prompt")
        prompt_ids = [ord(ch) for ch in prompt] if isinstance(prompt, str) else prompt
        if a.role == "prefill":
            choice = {"index": 0, "text": "P", "finish_reason": a.first_finish}
            if ids:
                choice.update(prompt_token_ids=prompt_ids, token_ids=[900])
            ans = {"id": f"cmpl-{rid}", "created": 7, "model": "stand-in", "choices": [choice]}
            if body.get("kv_transfer_params") and not a.no_params:
                ans["kv_transfer_params"] = {"do_remote_prefill": True, "pegaflow": {"from": rid, "blocks": 3}}
            return web.json_response(ans, headers={"X-Request-Id": rid})
        n = min(a.chunks, body["max_tokens"]) if isinstance(body.get("max_tokens"), int) else a.chunks
        pieces = [f"tok{i}" for i in range(n)]
        usage = {"prompt_tokens": len(prompt_ids or []), "completion_tokens": n,
                 "total_tokens": len(prompt_ids or []) + n}
        if not body.get("stream"):
            text = "".join(pieces)
            choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
            if ids:
                choice.update(prompt_token_ids=prompt_ids, token_ids=[100 + i for i in range(n)])
            return web.json_response({"id": f"cmpl-{rid}", "choices": [choice], "usage": usage},
                                     headers={"X-Request-Id": rid})
        out = web.StreamResponse(headers={"X-Request-Id": rid})
        out.content_type = "text/event-stream"
        await out.prepare(request)
        for i, t in enumerate(pieces):
            if i == a.die_after:
                os.kill(os.getpid(), signal.SIGKILL)
            delta = {"delta": {"content": t}} if chat else {"text": t}
            if ids:
                delta["token_ids"] = [100 + i]
                if i == 0:
                    delta["prompt_token_ids"] = prompt_ids
            await out.write(f"data: {json.dumps({'id': f'cmpl-{rid}', 'choices': [dict(index=0, **delta)]})}\n\n".encode())
            if i == 0 and a.gate:
                while not os.path.exists(a.gate):
                    await asyncio.sleep(0.01)
        if (body.get("stream_options") or {}).get("include_usage"):
            await out.write(f"data: {json.dumps({'id': f'cmpl-{rid}', 'choices': [], 'usage': usage})}\n\n".encode())
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", complete)
    app.router.add_post("/v1/chat/completions", complete)
    web.run_app(app, host="127.0.0.1", port=a.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
