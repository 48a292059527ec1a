"""The router's endpoints, health probes and request flow (see the package doc).

Invariants:

* A request reaches the decode side only after its prefill answered 200:
  the decode instance never waits for KV that no prefill is computing.
* A hop is retried on the next endpoint of its side only when no byte of an
  answer came back (the instance refused or dropped the connection, or
  answered 502/503 itself): a prefill is idempotent, and a decode that never
  answered generated nothing the client saw. Once a decode's answer has
  started, a failure ends the client's answer (a stream gets a final
  ``data: {"error": ...}`` event) and is never retried: the client would see
  tokens twice.
* Every hop has a connect timeout and a read timeout (no byte for that long
  fails the hop), so no request waits forever on a stopped instance.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from pegaflow.router import first_token

try:
    import aiohttp
    from aiohttp import web
except ImportError:  # pragma: no cover - checked by tests/python/test_router.py in a subprocess
    sys.exit(
        "pegaflow-router needs aiohttp, which comes with vLLM: run it in vLLM's environment, "
        "or install it (pip install 'pegaflow[router]' or pip install aiohttp)"
    )

logger = logging.getLogger("pegaflow.router")

#: statuses of a hop that mean "this endpoint could not take it", not "the
#: request is wrong": the next endpoint of the side is tried
_RETRY_STATUSES = (502, 503)


@dataclass
class Endpoint:
    """One vLLM instance's base URL and what the router knows of it."""

    url: str
    side: str
    healthy: bool = True
    in_flight: int = 0
    last_error: str = ""
    served: int = 0
    #: a prefill that answered without kv_transfer_params was warned about
    warned_no_params: bool = False

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "served": self.served,
            "last_error": self.last_error,
        }


@dataclass
class RouterConfig:
    prefill: list[str]
    decode: list[str]
    host: str = "0.0.0.0"
    port: int = 8000
    #: seconds between /health probes of every endpoint
    health_interval: float = 2.0
    #: seconds one /health probe may take
    health_timeout: float = 2.0
    #: seconds to open a connection to an instance
    connect_timeout: float = 5.0
    #: seconds an instance may send nothing before the hop fails
    read_timeout: float = 300.0
    #: completions: the prefill's token is the client's first, the decode
    #: continues from it (see first_token); False: the decode computes it
    first_token: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


class HopError(Exception):
    """A hop failed before any byte of an answer came back (retryable)."""


def _error(status: int, message: str, kind: str, request_id: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "code": status}},
        status=status,
        headers={"X-Request-Id": request_id},
    )


def _strip(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url


class Router:
    def __init__(self, cfg: RouterConfig):
        if not cfg.prefill or not cfg.decode:
            raise ValueError("pegaflow-router needs at least one --prefill and one --decode endpoint")
        self.cfg = cfg
        self.prefill = [Endpoint(_strip(u), "prefill") for u in cfg.prefill]
        self.decode = [Endpoint(_strip(u), "decode") for u in cfg.decode]
        self._session: Optional[aiohttp.ClientSession] = None
        self._health_task: Optional[asyncio.Task] = None

    # ------------------------------------------------------------ lifecycle

    async def start(self, _app: Any = None) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self.cfg.connect_timeout,
                sock_read=self.cfg.read_timeout,
            ),
            connector=aiohttp.TCPConnector(limit=0),
        )
        await self.probe_all()
        self._health_task = asyncio.create_task(self._health_loop())

    async def stop(self, _app: Any = None) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            try:
                await self._health_task
            except asyncio.CancelledError:
                pass
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Router.start() was not awaited")
        return self._session

    # --------------------------------------------------------------- health

    async def _probe(self, ep: Endpoint) -> None:
        try:
            async with self.session.get(
                ep.url + "/health",
                timeout=aiohttp.ClientTimeout(total=self.cfg.health_timeout),
            ) as r:
                await r.read()
                ok = r.status == 200
                err = "" if ok else f"/health answered {r.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            ok, err = False, f"/health failed: {type(e).__name__}: {e}"
        if ok != ep.healthy:
            if ok:
                logger.info("%s endpoint %s is healthy again", ep.side, ep.url)
            else:
                logger.warning("%s endpoint %s is down (%s)", ep.side, ep.url, err)
        ep.healthy = ok
        if err:
            ep.last_error = err

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(ep) for ep in self.prefill + self.decode))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_interval)
            await self.probe_all()

    def _mark_down(self, ep: Endpoint, why: str) -> None:
        if ep.healthy:
            logger.warning("%s endpoint %s is down (%s)", ep.side, ep.url, why)
        ep.healthy = False
        ep.last_error = why

    @staticmethod
    def _pick(eps: Sequence[Endpoint], tried: set[str]) -> Optional[Endpoint]:
        live = [e for e in eps if e.healthy and e.url not in tried]
        if not live:
            return None
        return min(live, key=lambda e: (e.in_flight, e.served))

    # -------------------------------------------------------------- routing

    def _headers(self, request: web.Request, request_id: str) -> dict[str, str]:
        h = {"X-Request-Id": request_id, "Content-Type": "application/json"}
        auth = request.headers.get("Authorization")
        if auth:
            h["Authorization"] = auth
        return h

    async def _prefill(
        self,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        token_ids: bool = False,
        remote_decode: bool = True,
    ) -> tuple[Optional[web.Response], Optional[dict[str, Any]], Optional[dict[str, Any]]]:
        """Runs the prefill hop; returns (an answer for the client, or None
        to go on), the kv_transfer_params to hand to the decode side and the
        prefill's whole answer. ``token_ids``: ask for the prompt's and the
        token's ids (first_token); ``remote_decode``: False when no decode
        hop follows (nothing to lend or pin)."""
        pbody = dict(body)
        pbody["max_tokens"] = 1
        if "max_completion_tokens" in pbody:
            pbody["max_completion_tokens"] = 1
        pbody["stream"] = False
        pbody["n"] = 1
        for k in ("stream_options", "min_tokens"):
            pbody.pop(k, None)
        if token_ids:
            pbody["return_token_ids"] = True
        if remote_decode:
            pbody["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False}
        else:
            pbody.pop("kv_transfer_params", None)
        tried: set[str] = set()
        rid = headers["X-Request-Id"]
        while True:
            ep = self._pick(self.prefill, tried)
            if ep is None:
                return self._side_down("prefill", tried, rid), None, None
            tried.add(ep.url)
            ep.in_flight += 1
            try:
                async with self.session.post(ep.url + path, json=pbody, headers=headers) as r:
                    raw = await r.read()
                    if r.status in _RETRY_STATUSES:
                        raise HopError(f"answered {r.status}: {raw[:200]!r}")
                    if r.status != 200:
                        # the instance judged the request: the client sees that
                        return (
                            web.Response(
                                body=raw,
                                status=r.status,
                                content_type=r.content_type,
                                headers={"X-Request-Id": rid},
                            ),
                            None,
                            None,
                        )
            except (HopError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                self._mark_down(ep, f"prefill hop failed: {type(e).__name__}: {e}")
                continue
            finally:
                ep.in_flight -= 1
            ep.served += 1
            try:
                answer = json.loads(raw)
                params = answer.get("kv_transfer_params")
            except (ValueError, AttributeError):
                answer, params = None, None
            if params is None and remote_decode and isinstance(answer, dict):
                if not ep.warned_no_params:
                    ep.warned_no_params = True
                    logger.warning(
                        "prefill %s answered request %s without kv_transfer_params: it does not run "
                        "PegaKVConnector with kv_role kv_producer (or kv_both), so the decode computes "
                        "every prompt it prefills again. Start it with --kv-transfer-config as in "
                        "docs/pd.md (this is said once per instance)", ep.url, rid,
                    )
                else:
                    logger.debug("request %s: prefill %s returned no kv_transfer_params", rid, ep.url)
            return None, params, answer if isinstance(answer, dict) else None

    def _side_down(self, side: str, tried: set[str], rid: str) -> web.Response:
        eps = self.prefill if side == "prefill" else self.decode
        why = "; ".join(f"{e.url}: {e.last_error or 'down'}" for e in eps)
        what = "failed" if tried else "is healthy"
        return _error(
            503,
            f"no {side} instance {what} ({why}). Start or restart a {side} instance "
            f"(vLLM with kv_role kv_{'producer' if side == 'prefill' else 'consumer'}); "
            "the router probes /health and uses it again as soon as it answers.",
            f"pd_{side}_unavailable",
            rid,
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the request body is not JSON", "invalid_request_error", rid)
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object", "invalid_request_error", rid)
        path = request.path
        headers = self._headers(request, rid)
        if not any(e.healthy for e in self.decode):
            # no prefill work (and no pinned blocks) for a request no decode can take
            return self._side_down("decode", set(), rid)
        t0 = time.monotonic()
        ft = self.cfg.first_token and first_token.eligible(path, body)
        answer, params, pre = await self._prefill(
            path, body, headers, token_ids=ft, remote_decode=not (ft and body.get("max_tokens") == 1)
        )
        if answer is not None:
            return answer
        t_prefill = time.monotonic() - t0
        # how long the prefill hop took (benchmarks, debugging)
        out_headers = {"X-Request-Id": rid, "X-PD-Prefill-Ms": f"{t_prefill * 1e3:.1f}"}
        stream = bool(body.get("stream"))
        choice = first_token.first_of(pre) if ft and pre is not None else None
        stitch: Optional[first_token.Stitcher] = None
        if choice is not None:
            stitch = first_token.Stitcher(body, pre, choice)  # type: ignore[arg-type]
            if first_token.ends_here(body, choice):
                return await self._alone(request, stitch, pre, stream, out_headers)  # type: ignore[arg-type]
            dbody = first_token.decode_body(body, choice, params)
        else:
            dbody = dict(body)
            if params is not None:
                dbody["kv_transfer_params"] = params
            else:
                dbody.pop("kv_transfer_params", None)
        tried: set[str] = set()
        while True:
            ep = self._pick(self.decode, tried)
            if ep is None:
                return self._side_down("decode", tried, rid)
            tried.add(ep.url)
            ep.in_flight += 1
            try:
                resp = await self._decode(request, ep, path, dbody, headers, stream, out_headers, stitch)
            except HopError as e:
                self._mark_down(ep, f"decode hop failed: {e}")
                continue
            finally:
                ep.in_flight -= 1
            ep.served += 1
            logger.debug(
                "request %s: prefill %.1f ms, total %.1f ms via %s",
                rid, t_prefill * 1e3, (time.monotonic() - t0) * 1e3, ep.url,
            )
            return resp

    async def _decode(
        self,
        request: web.Request,
        ep: Endpoint,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        stream: bool,
        out_headers: dict[str, str],
        stitch: "Optional[first_token.Stitcher]" = None,
    ) -> web.StreamResponse:
        try:
            async with self.session.post(ep.url + path, json=body, headers=headers) as r:
                if r.status in _RETRY_STATUSES:
                    raise HopError(f"answered {r.status}: {(await r.read())[:200]!r}")
                if not stream or r.status != 200:
                    raw = await r.read()
                    if stitch is not None and r.status == 200:
                        try:
                            merged = stitch.merge(json.loads(raw))
                        except (ValueError, AttributeError, TypeError):
                            merged = None
                        if merged is not None:
                            return web.json_response(merged, headers=out_headers)
                    return web.Response(
                        body=raw, status=r.status, content_type=r.content_type, headers=out_headers
                    )
                return await self._relay(request, ep, r, out_headers, stitch)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            # (_relay handles everything after the answer started)
            raise HopError(f"{type(e).__name__}: {e}") from None

    async def _relay(
        self,
        request: web.Request,
        ep: Endpoint,
        r: aiohttp.ClientResponse,
        out_headers: dict[str, str],
        stitch: "Optional[first_token.Stitcher]" = None,
    ) -> web.StreamResponse:
        """Streams a decode's answer to the client as it comes (after the
        prefill's first token, with ``stitch``, each event rewritten to
        continue it)."""
        rid = out_headers["X-Request-Id"]
        out = web.StreamResponse(status=r.status, headers=out_headers)
        out.content_type = r.content_type or "text/event-stream"
        out.headers["Cache-Control"] = "no-cache"
        await out.prepare(request)
        buf = b""
        if stitch is not None:
            try:
                await out.write(stitch.first_event())
            except (ConnectionError, RuntimeError):
                logger.info("request %s: the client disconnected before its first token", rid)
                return out
        while True:
            try:
                chunk = await r.content.readany()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                # The answer has started: the client saw tokens, so no retry.
                why = (
                    f"decode instance {ep.url} failed mid-answer ({type(e).__name__}: {e}); "
                    "the answer is incomplete, send the request again"
                )
                self._mark_down(ep, why)
                logger.warning("request %s: %s", rid, why)
                err = {"error": {"message": why, "type": "pd_decode_failed", "code": 502}}
                chunk = f"data: {json.dumps(err)}\n\n".encode()
                try:
                    await out.write(chunk)
                except (ConnectionError, RuntimeError):
                    pass
                break
            if not chunk:
                if buf:
                    chunk, buf = buf, b""
                    try:
                        await out.write(chunk)
                    except (ConnectionError, RuntimeError):
                        pass
                break
            if stitch is not None:
                buf += chunk
                *events, buf = buf.split(b"\n\n")
                chunk = b"".join(stitch.event(e) for e in events if e.strip())
                if not chunk:
                    continue
            try:
                await out.write(chunk)
            except (ConnectionError, RuntimeError):
                # The client went away: leaving the decode's connection makes
                # vLLM abort the request. Not the decode's fault.
                logger.info("request %s: the client disconnected mid-answer", rid)
                return out
        try:
            await out.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return out

    async def _alone(
        self,
        request: web.Request,
        stitch: "first_token.Stitcher",
        pre: dict[str, Any],
        stream: bool,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """The first token ended the request: the prefill's answer is the client's."""
        if not stream:
            return web.json_response(stitch.alone(pre), headers=headers)
        out = web.StreamResponse(status=200, headers=headers)
        out.content_type = "text/event-stream"
        out.headers["Cache-Control"] = "no-cache"
        await out.prepare(request)
        try:
            await out.write(stitch.alone_events())
            await out.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return out

    async def models(self, request: web.Request) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        tried: set[str] = set()
        while True:
            ep = self._pick(self.decode, tried)
            if ep is None:
                return self._side_down("decode", tried, rid)
            tried.add(ep.url)
            try:
                async with self.session.get(ep.url + "/v1/models") as r:
                    raw = await r.read()
                    return web.Response(body=raw, status=r.status, content_type=r.content_type)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                self._mark_down(ep, f"{type(e).__name__}: {e}")

    async def health(self, _request: web.Request) -> web.Response:
        ok = any(e.healthy for e in self.prefill) and any(e.healthy for e in self.decode)
        return web.json_response(
            {
                "healthy": ok,
                "prefill": [e.describe() for e in self.prefill],
                "decode": [e.describe() for e in self.decode],
            },
            status=200 if ok else 503,
        )


def build_app(cfg: RouterConfig) -> tuple[web.Application, Router]:
    router = Router(cfg)
    app = web.Application(client_max_size=64 << 20)
    app.on_startup.append(router.start)
    app.on_cleanup.append(router.stop)
    app.router.add_post("/v1/completions", router.handle)
    app.router.add_post("/v1/chat/completions", router.handle)
    app.router.add_get("/v1/models", router.models)
    app.router.add_get("/health", router.health)
    return app, router


def parse_args(argv: Optional[Sequence[str]] = None) -> RouterConfig:
    p = argparse.ArgumentParser(
        prog="pegaflow-router",
        description=(
            "OpenAI-compatible router for prefill/decode disaggregation with PegaFlow: "
            "each request is prefilled on a --prefill instance (vLLM, kv_role kv_producer), "
            "then generated on a --decode instance (kv_role kv_consumer), which loads the "
            "prompt's KV cache instead of computing it. See docs/pd.md."
        ),
    )
    p.add_argument("--prefill", action="append", required=True, metavar="URL",
                   help="base URL of a prefill instance (repeat or comma-separate for several)")
    p.add_argument("--decode", action="append", required=True, metavar="URL",
                   help="base URL of a decode instance (repeat or comma-separate for several)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--health-interval", type=float, default=2.0,
                   help="seconds between /health probes of each instance (default 2)")
    p.add_argument("--connect-timeout", type=float, default=5.0,
                   help="seconds to connect to an instance before trying the next (default 5)")
    p.add_argument("--read-timeout", type=float, default=300.0,
                   help="seconds an instance may send nothing before its hop fails (default 300)")
    p.add_argument("--first-token", choices=["prefill", "decode"], default="prefill",
                   help="completions: the prefill's token is the client's first and the decode "
                        "continues from it (prefill, default: the decode's first step leaves the "
                        "time to first token), or the decode computes it again (decode)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    a = p.parse_args(argv)

    def split(xs: list[str]) -> list[str]:
        return [u for x in xs for u in x.split(",") if u.strip()]

    logging.basicConfig(
        level=getattr(logging, a.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return RouterConfig(
        prefill=split(a.prefill),
        decode=split(a.decode),
        host=a.host,
        port=a.port,
        health_interval=a.health_interval,
        connect_timeout=a.connect_timeout,
        read_timeout=a.read_timeout,
        first_token=a.first_token == "prefill",
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_args(argv)
    try:
        app, _ = build_app(cfg)
    except ValueError as e:
        print(f"pegaflow-router: {e}", file=sys.stderr)
        sys.exit(2)
    logger.info("pegaflow-router on %s:%d: prefill %s, decode %s", cfg.host, cfg.port, cfg.prefill, cfg.decode)
    web.run_app(app, host=cfg.host, port=cfg.port, print=None, access_log=None)
