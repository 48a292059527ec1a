"""pegaflow-router as a real process in front of real HTTP servers standing
in for the prefill and decode instances (pd_endpoint.py): the flow of one
request, ids, streaming passthrough, health, and what a client sees when a
side is down or dies mid-answer. The connector's part of P/D is tested in
test_pd.py; this file is the router alone."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, path: str = "/health", timeout: float = 20.0, want: int | None = 200) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            st = c.getresponse().status
            c.close()
            if want is None or st == want:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"port {port} never answered {path} with {want}"
        time.sleep(0.05)


class Proc:
    def __init__(self, args: list[str], port: int, log: Path):
        self.port = port
        self.log = log
        self.args = args
        self.p = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=open(log, "ab"))

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)


@pytest.fixture
def pd(tmp_path):
    procs: list[Proc] = []

    def endpoint(role: str, *extra: str, port: int | None = None) -> Proc:
        port = port or free_port()
        log = tmp_path / f"{role}-{port}.jsonl"
        pr = Proc([str(HERE / "pd_endpoint.py"), "--port", str(port), "--role", role,
                   "--log", str(log), *extra], port, tmp_path / f"{role}-{port}.err")
        pr.requests = log  # type: ignore[attr-defined]
        procs.append(pr)
        wait_http(port)
        return pr

    def router(prefill: list[Proc], decode: list[Proc], *extra: str) -> Proc:
        port = free_port()
        args = ["-m", "pegaflow.router", "--port", str(port), "--host", "127.0.0.1",
                "--health-interval", "0.2", "--connect-timeout", "2", "--read-timeout", "20"]
        for e in prefill:
            args += ["--prefill", f"http://127.0.0.1:{e.port}"]
        for e in decode:
            args += ["--decode", f"127.0.0.1:{e.port}"]
        pr = Proc(args + list(extra), port, tmp_path / "router.err")
        procs.append(pr)
        wait_http(port, want=None)
        return pr

    yield endpoint, router
    for pr in procs:
        pr.kill()


def seen(ep) -> list[dict]:
    if not ep.requests.exists():
        return []
    return [json.loads(l) for l in ep.requests.read_text().splitlines()]


def post(port: int, path: str, body: dict, headers: dict | None = None, timeout: float = 15.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    return c, r


def test_completion_goes_prefill_then_decode_with_ids_and_params(pd):
    """--first-token decode: the decode computes the first token again."""
    endpoint, router = pd
    p, d = endpoint("prefill"), endpoint("decode")
    r = router([p], [d], "--first-token", "decode")
    c, resp = post(r.port, "/v1/completions",
                   {"model": "m", "prompt": [1, 2, 3], "max_tokens": 7, "min_tokens": 2,
                    "stream_options": {"include_usage": True}},
                   {"X-Request-Id": "client-42"})
    body = json.loads(resp.read())
    assert resp.status == 200, body
    assert resp.getheader("X-Request-Id") == "client-42"
    assert float(resp.getheader("X-PD-Prefill-Ms")) >= 0
    assert body["choices"][0]["text"] == "tok0tok1tok2tok3"
    assert body["id"] == "cmpl-client-42"
    (pr,) = seen(p)
    (dr,) = seen(d)
    # the prefill computes the prompt only, and is asked to keep its KV for a decode
    assert pr["request_id"] == dr["request_id"] == "client-42"
    assert pr["body"]["max_tokens"] == 1 and pr["body"]["stream"] is False
    assert "min_tokens" not in pr["body"] and "stream_options" not in pr["body"]
    assert pr["body"]["kv_transfer_params"] == {"do_remote_decode": True, "do_remote_prefill": False}
    # the decode gets the client's request as is, plus what the prefill returned
    assert dr["body"]["max_tokens"] == 7 and dr["body"]["min_tokens"] == 2
    assert dr["body"]["kv_transfer_params"] == {"do_remote_prefill": True, "pegaflow": {"from": "client-42", "blocks": 3}}


def test_request_id_made_when_client_sends_none(pd):
    endpoint, router = pd
    p, d = endpoint("prefill"), endpoint("decode")
    r = router([p], [d])
    c, resp = post(r.port, "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                     "max_completion_tokens": 5})
    body = json.loads(resp.read())
    assert resp.status == 200
    rid = resp.getheader("X-Request-Id")
    assert rid and seen(p)[0]["request_id"] == rid == seen(d)[0]["request_id"]
    assert seen(p)[0]["body"]["max_completion_tokens"] == 1
    assert seen(d)[0]["body"]["max_completion_tokens"] == 5
    assert body["choices"][0]["message"]["content"] == "tok0tok1tok2tok3"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_passes_chunks_through_as_they_come(pd, tmp_path, path):
    endpoint, router = pd
    gate = tmp_path / "gate"
    p, d = endpoint("prefill"), endpoint("decode", "--gate", str(gate))
    r = router([p], [d])
    chat = "chat" in path
    # (completions: the prefill's token comes first, the decode makes 4 more)
    body = {"model": "m", "stream": True, "max_tokens": 4 if chat else 5}
    body.update({"messages": [{"role": "user", "content": "x"}]} if chat else {"prompt": "x"})
    c, resp = post(r.port, path, body, {"X-Request-Id": "s1"})
    assert resp.status == 200
    assert resp.getheader("Content-Type").startswith("text/event-stream")
    assert resp.getheader("X-Request-Id") == "s1"
    first = resp.readline()
    if not chat:
        assert b'"text": "P"' in first, "the prefill's token first"
        assert resp.readline() == b"\n"
        first = resp.readline()
    # The decode holds its second chunk until the gate opens: the client
    # having the first one proves the router did not buffer the stream.
    assert first.startswith(b"data: ") and b"tok0" in first
    gate.touch()
    rest = resp.read().decode()
    events = [l for l in rest.splitlines() if l.startswith("data: ")]
    toks = [f"tok{i}" for i in range(1, 4)]
    assert [next(t for t in toks if t in e) for e in events[:-1]] == toks, "chunks lost or reordered"
    assert events[-1] == "data: [DONE]"
    assert seen(p)[0]["body"]["stream"] is False


def test_prefill_down_is_a_clear_503_without_touching_decode(pd):
    endpoint, router = pd
    p, d = endpoint("prefill"), endpoint("decode")
    r = router([p], [d])
    p.kill()
    t0 = time.monotonic()
    c, resp = post(r.port, "/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 3})
    body = json.loads(resp.read())
    assert time.monotonic() - t0 < 10
    assert resp.status == 503
    assert body["error"]["type"] == "pd_prefill_unavailable"
    assert "prefill" in body["error"]["message"] and str(p.port) in body["error"]["message"]
    assert seen(d) == [], "a request whose prefill failed must not reach a decode instance"
    # the router's own health says which side is missing
    wait_http(r.port, want=503)


def test_decode_down_is_a_clear_503(pd):
    endpoint, router = pd
    p, d = endpoint("prefill"), endpoint("decode")
    r = router([p], [d])
    d.kill()
    c, resp = post(r.port, "/v1/chat/completions", {"model": "m", "messages": [], "stream": True})
    body = json.loads(resp.read())
    assert resp.status == 503
    assert body["error"]["type"] == "pd_decode_unavailable"
    assert str(d.port) in body["error"]["message"]


def test_dead_endpoint_is_skipped_for_the_next_of_its_side(pd):
    endpoint, router = pd
    p1, p2 = endpoint("prefill"), endpoint("prefill")
    d1, d2 = endpoint("decode"), endpoint("decode")
    r = router([p1, p2], [d1, d2], "--health-interval", "60")  # no probe helps: the hop itself must
    p1.kill()
    d1.kill()
    for i in range(4):
        c, resp = post(r.port, "/v1/completions", {"model": "m", "prompt": "x"}, {"X-Request-Id": f"r{i}"})
        assert resp.status == 200, resp.read()
        resp.read()
    assert len(seen(p2)) == 4 and len(seen(d2)) == 4


def test_decode_dying_mid_stream_ends_the_answer_with_an_error(pd):
    endpoint, router = pd
    p, d = endpoint("prefill"), endpoint("decode", "--chunks", "6", "--die-after", "2")
    r = router([p], [d])
    t0 = time.monotonic()
    c, resp = post(r.port, "/v1/completions", {"model": "m", "prompt": "x", "stream": True})
    assert resp.status == 200
    text = resp.read().decode()  # returns: the router ended the stream
    assert time.monotonic() - t0 < 15
    assert "tok0" in text and "tok1" in text and "tok2" not in text
    last = [l for l in text.splitlines() if l.startswith("data: ")][-1]
    err = json.loads(last[len("data: "):])["error"]
    assert err["type"] == "pd_decode_failed" and "send the request again" in err["message"]


def test_instance_errors_pass_through_unchanged(pd):
    endpoint, router = pd
    p, d = endpoint("prefill", "--status", "400"), endpoint("decode")
    r = router([p], [d])
    c, resp = post(r.port, "/v1/completions", {"model": "m", "prompt": "x"})
    body = json.loads(resp.read())
    assert resp.status == 400 and "stand-in prefill says 400" in body["error"]["message"]
    assert seen(d) == []


def test_a_restarted_instance_is_used_again(pd):
    endpoint, router = pd
    p, d = endpoint("prefill"), endpoint("decode")
    r = router([p], [d])
    port = p.port
    p.kill()
    c, resp = post(r.port, "/v1/completions", {"model": "m", "prompt": "x"})
    assert resp.status == 503
    resp.read()
    p2 = endpoint("prefill", port=port)
    wait_http(r.port, want=200)  # the probe found it again
    c, resp = post(r.port, "/v1/completions", {"model": "m", "prompt": "x"})
    assert resp.status == 200, resp.read()
    resp.read()
    assert len(seen(p2)) >= 1


def test_models_and_bad_body(pd):
    endpoint, router = pd
    p, d = endpoint("prefill"), endpoint("decode")
    r = router([p], [d])
    c = http.client.HTTPConnection("127.0.0.1", r.port, timeout=5)
    c.request("GET", "/v1/models")
    resp = c.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["data"][0]["role"] == "decode"
    c.request("POST", "/v1/completions", body=b"{not json", headers={"Content-Type": "application/json"})
    resp = c.getresponse()
    assert resp.status == 400 and "not JSON" in json.loads(resp.read())["error"]["message"]


def test_router_refuses_to_start_without_both_sides(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pegaflow.router", "--prefill", "127.0.0.1:1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "--decode" in out.stderr


def test_known_dead_decode_side_spares_the_prefill(pd):
    endpoint, router = pd
    p, d = endpoint("prefill"), endpoint("decode")
    r = router([p], [d])
    d.kill()
    wait_http(r.port, want=503)  # the probe noticed
    c, resp = post(r.port, "/v1/completions", {"model": "m", "prompt": "x"})
    body = json.loads(resp.read())
    assert resp.status == 503 and body["error"]["type"] == "pd_decode_unavailable"
    assert seen(p) == [], "no prefill (and no pinned blocks) for a request no decode can take"


def test_client_leaving_mid_stream_does_not_mark_the_decode_down(pd, tmp_path):
    endpoint, router = pd
    gate = tmp_path / "gate"
    p, d = endpoint("prefill"), endpoint("decode", "--gate", str(gate))
    r = router([p], [d], "--health-interval", "60")  # only the hop's own verdict counts
    c, resp = post(r.port, "/v1/completions", {"model": "m", "prompt": "x", "stream": True})
    assert b'"text": "P"' in resp.readline() and resp.readline() == b"\n"  # the prefill's token
    assert b"tok0" in resp.readline()
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    gate.touch()  # the decode writes on; the router finds its client gone
    time.sleep(1.0)
    c2 = http.client.HTTPConnection("127.0.0.1", r.port, timeout=5)
    c2.request("GET", "/health")
    h = json.loads(c2.getresponse().read())
    assert h["decode"][0]["healthy"] is True, h["decode"][0]["last_error"]
    c, resp = post(r.port, "/v1/completions", {"model": "m", "prompt": "x"})
    assert resp.status == 200
    resp.read()


def read_events(resp) -> list[dict]:
    out = []
    for ev in resp.read().split(b"\n\n"):
        ev = ev.strip()
        if ev.startswith(b"data: ") and ev != b"data: [DONE]":
            out.append(json.loads(ev[6:]))
    return out


@pytest.mark.parametrize("stream", [False, True])
def test_the_prefills_token_is_the_clients_first_and_the_decode_continues_from_it(pd, stream):
    endpoint, router = pd
    p, d = endpoint("prefill"), endpoint("decode")
    r = router([p], [d])
    body = {"model": "m", "prompt": "hey", "max_tokens": 4, "min_tokens": 2, "stream": stream,
            "return_token_ids": True, "stream_options": {"include_usage": True} if stream else None}
    c, resp = post(r.port, "/v1/completions", body, {"X-Request-Id": "ft-1"})
    assert resp.status == 200
    (pr,) = seen(p)
    assert pr["body"]["return_token_ids"] is True and pr["body"]["max_tokens"] == 1
    if stream:
        evs = read_events(resp)
        first = evs[0]["choices"][0]
        assert first["text"] == "P" and first["token_ids"] == [900]
        assert first["prompt_token_ids"] == [ord(ch) for ch in "hey"], "the client's prompt, not the decode's"
        rest = [e["choices"][0] for e in evs[1:] if e["choices"]]
        assert "".join(ch["text"] for ch in rest) == "tok0tok1tok2"
        assert all("prompt_token_ids" not in ch for ch in rest)
        assert [t for ch in rest for t in ch["token_ids"]] == [100, 101, 102]
        assert {e["id"] for e in evs} == {"cmpl-ft-1"}, "one completion's id throughout"
        (usage,) = [e["usage"] for e in evs if e.get("usage")]
        assert usage == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    else:
        ans = json.loads(resp.read())
        ch = ans["choices"][0]
        assert ch["text"] == "Ptok0tok1tok2" and ch["token_ids"] == [900, 100, 101, 102]
        assert ch["prompt_token_ids"] == [ord(x) for x in "hey"]
        assert ans["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        assert "kv_transfer_params" not in ans
    (dr,) = seen(d)
    # the decode continues after the prefill's token, with what the prefill lent
    assert dr["body"]["prompt"] == [ord(x) for x in "hey"] + [900]
    assert dr["body"]["max_tokens"] == 3 and dr["body"]["min_tokens"] == 1
    assert dr["body"]["kv_transfer_params"] == {"do_remote_prefill": True, "pegaflow": {"from": "ft-1", "blocks": 3}}


def test_token_ids_stay_out_of_an_answer_that_did_not_ask_for_them(pd):
    endpoint, router = pd
    p, d = endpoint("prefill"), endpoint("decode")
    r = router([p], [d])
    c, resp = post(r.port, "/v1/completions", {"model": "m", "prompt": [5, 6], "max_tokens": 3, "stream": True})
    evs = read_events(resp)
    assert [e["choices"][0]["text"] for e in evs] == ["P", "tok0", "tok1"]
    assert not any("token_ids" in e["choices"][0] or "prompt_token_ids" in e["choices"][0] for e in evs)


@pytest.mark.parametrize("case", ["max_tokens_1", "stopped"])
def test_a_request_its_first_token_ends_is_answered_by_the_prefill_alone(pd, case):
    endpoint, router = pd
    p = endpoint("prefill", *(["--first-finish", "stop"] if case == "stopped" else []))
    d = endpoint("decode")
    r = router([p], [d])
    mt = 1 if case == "max_tokens_1" else 5
    c, resp = post(r.port, "/v1/completions",
                   {"model": "m", "prompt": [1, 2], "max_tokens": mt, "stream": True,
                    "stream_options": {"include_usage": True}})
    evs = read_events(resp)
    assert evs[0]["choices"][0]["text"] == "P"
    assert evs[0]["choices"][0]["finish_reason"] == ("length" if case == "max_tokens_1" else "stop")
    assert evs[-1]["usage"]["completion_tokens"] == 1
    assert seen(d) == [], "no decode hop for a finished request"
    (pr,) = seen(p)
    # nothing to lend for a request no decode continues
    assert ("kv_transfer_params" in pr["body"]) == (case == "stopped")


@pytest.mark.parametrize("why", ["chat", "stop", "logprobs", "logprobs0", "n", "echo", "old-vllm"])
def test_requests_the_first_token_cannot_carry_keep_the_plain_path(pd, why):
    endpoint, router = pd
    p = endpoint("prefill", *(["--no-token-ids"] if why == "old-vllm" else []))
    d = endpoint("decode")
    r = router([p], [d])
    path = "/v1/chat/completions" if why == "chat" else "/v1/completions"
    body = {"model": "m", "max_tokens": 3}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if why == "chat" else {"prompt": [1, 2]})
    body.update({"stop": ["x"]} if why == "stop" else {"logprobs": 1} if why == "logprobs" else
                {"logprobs": 0} if why == "logprobs0" else
                {"n": 2} if why == "n" else {"echo": True} if why == "echo" else {})
    c, resp = post(r.port, path, body)
    assert resp.status == 200
    (dr,) = seen(d)
    assert dr["body"]["max_tokens"] == 3, "the decode computes the first token itself"
    assert dr["body"].get("prompt", [1, 2]) == [1, 2]


def test_a_prefill_without_the_connector_is_named_once_in_the_log(pd, tmp_path):
    """A prefill instance started without PegaKVConnector answers without
    kv_transfer_params: requests still work (the decode computes the
    prompt), and the router's log says once which instance and what to do."""
    endpoint, router = pd
    p, d = endpoint("prefill", "--no-params"), endpoint("decode")
    r = router([p], [d], "--first-token", "decode")
    for i in range(3):
        c, resp = post(r.port, "/v1/completions", {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4},
                       {"X-Request-Id": f"np-{i}"})
        assert resp.status == 200, resp.read()
        resp.read()
        c.close()
    assert all("kv_transfer_params" not in dr["body"] for dr in seen(d))
    log = (tmp_path / "router.err").read_text()
    assert log.count("without kv_transfer_params") == 1, log
    assert f"127.0.0.1:{p.port}" in log and "kv_producer" in log
