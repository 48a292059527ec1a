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
every completion request is answered with status S.
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
        if a.role == "prefill":
            return web.json_response({
                "id": f"cmpl-{rid}",
                "choices": [{"index": 0, "text": "P", "finish_reason": "length"}],
                "kv_transfer_params": {"do_remote_prefill": True, "pegaflow": {"from": rid, "blocks": 3}},
            }, headers={"X-Request-Id": rid})
        pieces = [f"tok{i}" for i in range(a.chunks)]
        if not body.get("stream"):
            text = "".join(pieces)
            choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
            return web.json_response({"id": f"cmpl-{rid}", "choices": [choice]}, headers={"X-Request-Id": rid})
        out = web.StreamResponse(headers={"X-Request-Id": rid})
        out.content_type = "text/event-stream"
        await out.prepare(request)
        for i, t in enumerate(pieces):
            if i == a.die_after:
                os.kill(os.getpid(), signal.SIGKILL)
            delta = {"delta": {"content": t}} if chat else {"text": t}
            await out.write(f"data: {json.dumps({'id': f'cmpl-{rid}', 'choices': [dict(index=0, **delta)]})}\n\n".encode())
            if i == 0 and a.gate:
                while not os.path.exists(a.gate):
                    await asyncio.sleep(0.01)
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
