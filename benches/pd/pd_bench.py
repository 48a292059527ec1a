#!/usr/bin/env python3
"""Prefill/decode disaggregation against data parallelism on one node, with
real `vllm serve` instances: 1 prefill + 1 decode instance behind
pegaflow-router (KV handed over through pegaflow-owner) against 2 plain
instances (DP2), the same requests at the same steady rate.

Phases, in one run (each starts its own servers and stops them):
  ceilings  GPU0 -> GPU1 copy, GPU -> pinned host and pinned host -> GPU copy
            bandwidth (torch, 1 GiB, median of 10): what a handover could reach
  pd        pegaflow-owner, vLLM kv_producer on GPU0, kv_consumer on GPU1,
            pegaflow-router; correctness prompts (sequential, greedy), then
            the benchmark through the router
  dp2       two vLLM instances without a connector, on GPU0 and GPU1, requests
            alternating between them; the same correctness prompts on the
            first (the reference), then the same benchmark

Correctness: each correctness prompt's greedy tokens through P/D must equal a
single instance's for the same prompt when that instance computes the same
tokens the same way. With the router's default (--first-token prefill) and
the direct hand-over, the decode copies every prompt token's KV (the partial
last block too) from the prefill's cold pass and continues after the
prefill's token: the single instance's cold run ("cold"). Through the pool
(--pd-direct off, or prompts of whole blocks) the decode gets full blocks
only and computes the tail after the prefill's token ("continued": the
instance runs the prompt plus the first cold token, its full blocks from its
own GPU prefix cache). With --first-token decode, the prompt run again warm
("warm"). Identical tokens need the handed-over KV to be byte-exact. The
other references are reported too; they may differ in the last bits of a
GEMM of another shape. A mismatch exits 1.

Benchmark: `--requests` prompts of `--prompt-len` random tokens (distinct per
request, so no prefix cache hits), `--max-tokens` generated each
(ignore_eos), sent at a steady `--rate` per second, streamed (comma lists
of rates and of max tokens: each load in turn on the same instances, fresh
prompts per load). Per request:
TTFT (send -> first token), TPOT ((last - first token) / (tokens - 1)), the
gaps between streamed tokens (ITL). For P/D also the handover: the router's
X-PD-Prefill-Ms says when the prefill answered; TTFT minus that is the time
the decode side took (wait for the blocks, load, last partial block, first
token): the prompt's KV bytes over that time, against the copy ceilings.

Needs: vLLM (any installation), aiohttp (a vLLM dependency), torch with 2 GPUs,
pegaflow on PYTHONPATH, the owner binary (--owner-bin).

  python3 benches/pd/pd_bench.py --owner-bin .carry-pd/pegaflow-owner --attention-backend TRITON_ATTN
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

# Qwen3-8B's config.json (dummy weights: timings do not depend on values).
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def parse_size(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def log(msg: str) -> None:
    print(f"[pd-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))]


def mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


# ---------------------------------------------------------------- ceilings

def ceilings(gib: float = 1.0) -> dict:
    import torch

    n = int(gib * (1 << 30))
    out = {}

    def bench(dst, src, dev) -> float:
        for _ in range(2):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(dev)
        ts = []
        for _ in range(10):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            s = torch.cuda.current_stream(dev)
            a.record(s)
            dst.copy_(src, non_blocking=True)
            b.record(s)
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        return n / statistics.median(ts) / 1e9

    g0 = torch.empty(n, dtype=torch.uint8, device="cuda:0")
    g1 = torch.empty(n, dtype=torch.uint8, device="cuda:1")
    h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    out["peer_access"] = bool(torch.cuda.can_device_access_peer(1, 0))
    with torch.cuda.device(1):
        out["gpu0_to_gpu1_GBps"] = bench(g1, g0, 1)
    with torch.cuda.device(0):
        out["gpu_to_host_GBps"] = bench(h, g0, 0)
    with torch.cuda.device(1):
        out["host_to_gpu_GBps"] = bench(g1, h, 1)
    del g0, g1, h
    torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------- servers

class Proc:
    def __init__(self, name: str, args: list[str], work: Path, env: dict | None = None):
        self.name = name
        self.log = work / f"{name}.log"
        e = dict(os.environ)
        e.update(env or {})
        with open(self.log, "ab") as f:
            self.p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=e, start_new_session=True)

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(timeout=10)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except OSError:
        return 0, b""


def wait_healthy(procs: list[tuple[Proc, str]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(procs)
    while pending:
        for pr, url in list(pending):
            if not pr.alive():
                raise SystemExit(f"{pr.name} exited:\n{pr.tail()}")
            if http_get(url + "/health")[0] == 200:
                pending.remove((pr, url))
        if time.monotonic() > deadline:
            raise SystemExit("not healthy in time: " + ", ".join(p.name for p, _ in pending)
                             + "\n" + "\n".join(p.tail(1500) for p, _ in pending))
        time.sleep(0.5)


def vllm_serve(args, name: str, gpu: int | str, port: int, work: Path, ktc: dict | None) -> Proc:
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(args.model_dir),
           "--served-model-name", "m", "--port", str(port), "--host", "127.0.0.1",
           "--load-format", "dummy", "--skip-tokenizer-init", "--dtype", "bfloat16",
           "--max-model-len", str(args.prompt_len + args.max_tokens + 64),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if not args.no_enforce_eager:
        cmd.append("--enforce-eager")
    elif args.compilation_config:
        cmd += ["--compilation-config", args.compilation_config]
    if args.attention_backend:
        cmd += ["--attention-backend", args.attention_backend]
    if ktc is not None:
        cmd += ["--kv-transfer-config", json.dumps(ktc)]
    return Proc(name, cmd, work, {"CUDA_VISIBLE_DEVICES": str(gpu)})


# ------------------------------------------------------------------ client

def prompt(seed: int, n: int, vocab: int) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(100, vocab - 100) for _ in range(n)]


async def complete(session, url: str, ids: list[int], max_tokens: int) -> list[int]:
    body = {"model": "m", "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    async with session.post(url + "/v1/completions", json=body) as r:
        j = await r.json(content_type=None)
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status} {j}")
        return list(j["choices"][0].get("token_ids") or [])


async def stream_one(session, url: str, ids: list[int], max_tokens: int, rid: str) -> dict:
    body = {"model": "m", "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "stream": True}
    t0 = time.perf_counter()
    stamps: list[float] = []
    ntok = 0
    res: dict = {"ok": False}
    try:
        async with session.post(url + "/v1/completions", json=body, headers={"X-Request-Id": rid}) as r:
            res["prefill_ms"] = float(r.headers.get("X-PD-Prefill-Ms", "nan"))
            if r.status != 200:
                res["error"] = f"{r.status}: {(await r.read())[:300]!r}"
                return res
            buf = b""
            async for chunk in r.content.iter_any():
                now = time.perf_counter()
                buf += chunk
                while b"\n\n" in buf:
                    ev, buf = buf.split(b"\n\n", 1)
                    ev = ev.strip()
                    if not ev.startswith(b"data: ") or ev == b"data: [DONE]":
                        continue
                    d = json.loads(ev[6:])
                    if "error" in d:
                        res["error"] = str(d["error"])[:300]
                        return res
                    for c in d.get("choices", []):
                        k = len(c.get("token_ids") or []) or (1 if c.get("text") else 0)
                        if k:
                            ntok += k
                            stamps.append(now)
    except Exception as e:  # noqa: BLE001 - a failed request is a result
        res["error"] = f"{type(e).__name__}: {e}"
        return res
    if not stamps:
        res["error"] = "no tokens"
        return res
    res.update(ok=True, tokens=ntok, ttft=stamps[0] - t0,
               tpot=(stamps[-1] - stamps[0]) / max(1, ntok - 1),
               itl=[b - a for a, b in zip(stamps, stamps[1:])])
    return res


async def run_load(urls: list[str], prompts: list[list[int]], rate: float, max_tokens: int, tag: str) -> list[dict]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
        t0 = time.perf_counter()
        tasks = []
        for i, p in enumerate(prompts):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            url = urls[i % len(urls)]
            tasks.append(asyncio.create_task(stream_one(s, url, p, max_tokens, f"{tag}-{i}")))
        return list(await asyncio.gather(*tasks))


async def run_correctness(urls_seq: list[str], prompts: list[list[int]], max_tokens: int, repeat: int,
                          continued: bool = False) -> list[list[list[int]]]:
    """Each prompt `repeat` times in a row on urls_seq[0], one at a time.
    ``continued``: then once more as the router's first-token path computes
    it: the first run's first token, then the prompt plus that token
    continued (its full blocks from the instance's GPU prefix cache)."""
    import aiohttp

    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        for p in prompts:
            runs = [await complete(s, urls_seq[0], p, max_tokens) for _ in range(repeat)]
            if continued and runs and runs[0]:
                t1 = runs[0][0]
                runs.append([t1] + await complete(s, urls_seq[0], p + [t1], max_tokens - 1))
            out.append(runs)
    return out


def summarize(rs: list[dict]) -> dict:
    ok = [r for r in rs if r["ok"]]
    ms = lambda xs: [x * 1e3 for x in xs]  # noqa: E731
    ttft = ms([r["ttft"] for r in ok])
    tpot = ms([r["tpot"] for r in ok])
    itl = ms([g for r in ok for g in r["itl"]])
    return {
        "requests": len(rs), "ok": len(ok),
        "errors": sorted({r.get("error", "") for r in rs if not r["ok"]})[:5],
        "ttft_mean_ms": mean(ttft), "ttft_p99_ms": pct(ttft, 99),
        "tpot_mean_ms": mean(tpot), "tpot_p99_ms": pct(tpot, 99),
        "itl_mean_ms": mean(itl), "itl_p99_ms": pct(itl, 99),
    }


def metric_sums(url: str, names: tuple[str, ...]) -> dict[str, float]:
    """Sum of each metric over its labels (the owner's per-client series)."""
    st, body = http_get(url + "/metrics", timeout=5)
    out = {n: 0.0 for n in names}
    for line in body.decode(errors="replace").splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            try:
                out[name] += float(line.rsplit(" ", 1)[1])
            except (ValueError, IndexError):
                pass
    return out


OWNER_SERIES = ("pegaflow_client_load_bytes_total", "pegaflow_client_load_seconds_total",
                "pegaflow_client_save_bytes_total", "pegaflow_client_save_seconds_total",
                "pegaflow_client_saves_dropped_total", "pegaflow_block_evictions_total",
                "pegaflow_admission_rejections_total")


def scrape(url: str, words: tuple[str, ...]) -> dict[str, float]:
    st, body = http_get(url + "/metrics", timeout=5)
    out = {}
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("#") or not any(w in line for w in words):
            continue
        try:
            k, v = line.rsplit(" ", 1)
            out[k] = out.get(k, 0.0) + float(v)
        except ValueError:
            pass
    return out


def handover_traces(log_path: Path, tag: str) -> dict:
    """The decode's load traces (pegaflow.trace_sample_rate 1) of the
    benchmark's requests: how many copied their prefill's GPU blocks, and
    the copies' own GPU time (CUDA events) and bytes."""
    import re

    gpu_ms, nbytes, gpu, pool, failed = [], 0, 0, 0, 0
    pat = re.compile(r'\{"event": "pegaflow\.load".*\}')
    for line in log_path.read_text(errors="replace").splitlines():
        m = pat.search(line)
        if not m:
            continue
        try:
            t = json.loads(m.group(0))
        except ValueError:
            continue
        if tag not in t.get("req_id", ""):
            continue
        failed += t.get("failed_blocks", 0)
        cs = t.get("copies", [])
        if cs and all(c.get("source") == "gpu" for c in cs):
            gpu += 1
            gpu_ms.append(max(c.get("gpu_ms", 0.0) for c in cs))
            nbytes += sum(c.get("bytes", 0) for c in cs)
        else:
            pool += 1
    out = {"loads_from_gpu": gpu, "loads_from_pool": pool, "load_failed_blocks": failed}
    if gpu_ms and sum(gpu_ms) > 0:
        out["handover_copy_ms_median"] = statistics.median(gpu_ms)
        out["handover_copy_ms_p99"] = pct(gpu_ms, 99)
        out["handover_copy_GBps"] = nbytes / (sum(gpu_ms) / 1e3) / 1e9
    return out


# -------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--owner-bin", required=True)
    ap.add_argument("--model-dir", help="default: Qwen3-8B's config with dummy weights, written to the workdir")
    ap.add_argument("--attention-backend", help="TRITON_ATTN with the offline H200 bundle")
    ap.add_argument("--no-enforce-eager", action="store_true", help="CUDA graphs (vLLM compiles and captures them)")
    ap.add_argument("--compilation-config", help="with --no-enforce-eager: vLLM's --compilation-config JSON, e.g. "
                    "'{\"mode\": 0, \"cudagraph_mode\": \"FULL_DECODE_ONLY\"}' (full graphs for decode "
                    "steps without torch.compile: a start in seconds)")
    ap.add_argument("--prompt-len", type=int, default=5000)
    ap.add_argument("--max-tokens", default="128",
                    help="generated per request; a comma list: one per --rate")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--rate", default="2", help="requests per second, steady; a comma list (e.g. 3,4) runs "
                    "each load in turn on the same instances, with fresh prompts")
    ap.add_argument("--check-prompts", type=int, default=3)
    ap.add_argument("--check-tokens", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    ap.add_argument("--pool-size", default="32g")
    ap.add_argument("--phases", default="ceilings,pd,dp2")
    ap.add_argument("--first-token", choices=("prefill", "decode"), default="prefill",
                    help="pegaflow-router --first-token: the prefill's token is the client's first (default), "
                         "or the decode computes it again")
    ap.add_argument("--pd-direct", choices=("on", "off"), default="on",
                    help="on: the decode copies the prefill's GPU blocks directly (pegaflow.pd_direct); "
                         "off: through the pool")
    ap.add_argument("--start-timeout", type=float, default=240)
    ap.add_argument("--workdir", default="/tmp/pd-bench")
    ap.add_argument("--json-out")
    args = ap.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if not args.model_dir:
        args.model_dir = work / "qwen3-8b-shape"
        args.model_dir.mkdir(exist_ok=True)
        (args.model_dir / "config.json").write_text(json.dumps(QWEN3_8B))
    cfg = json.loads((Path(args.model_dir) / "config.json").read_text())
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head * 2
    block = 16
    if args.pd_direct == "on":
        # the decode copies every block the prompt filled, the partial last one too
        handed_tokens = -(-args.prompt_len // block) * block
    else:
        handed_tokens = (args.prompt_len - 1) // block * block
    handover_bytes = handed_tokens * kv_per_token
    phases = set(args.phases.split(","))
    vocab = cfg["vocab_size"]
    rates = [float(x) for x in args.rate.split(",")]
    gens = [int(x) for x in args.max_tokens.split(",")]
    if len(gens) == 1:
        gens *= len(rates)
    if len(gens) != len(rates):
        ap.error("--max-tokens: one value, or one per --rate")
    args.max_tokens = max(gens)  # the instances' --max-model-len
    # Distinct prompts per load: a later load must not hit the pool with an
    # earlier one's.
    loads = [{"rate": rate, "max_tokens": mt, "tag": f"L{k}",
              "prompts": [prompt(1000 * (k + 1) + i, args.prompt_len, vocab) for i in range(args.requests)]}
             for k, (rate, mt) in enumerate(zip(rates, gens))]
    check_prompts = [prompt(i, args.prompt_len, vocab) for i in range(args.check_prompts)]
    warm = [prompt(900 + i, args.prompt_len, vocab) for i in range(4)]
    result: dict = {"first_token": args.first_token, "pd_direct": args.pd_direct,
                    "cuda_graphs": (args.compilation_config or "vLLM default") if args.no_enforce_eager else "off (eager)",
                    "prompt_len": args.prompt_len, "requests": args.requests,
                    "loads": [{"rate": ld["rate"], "max_tokens": ld["max_tokens"]} for ld in loads],
                    "kv_bytes_per_token": kv_per_token, "handover_bytes": handover_bytes}
    ok = True

    if "ceilings" in phases:
        result["ceilings"] = ceilings()
        log(f"ceilings: {result['ceilings']}")

    if "pd" in phases:
        shm_free = shutil.disk_usage("/dev/shm").free
        if parse_size(args.pool_size) > 0.8 * shm_free:
            args.pool_size = f"{int(0.8 * shm_free) >> 30}g"
            log(f"/dev/shm has {shm_free >> 30} GiB free: pool {args.pool_size}")
        name = f"pd-{uuid.uuid4().hex[:8]}"
        sock = str(work / f"{name}.sock")
        owner_metrics = f"127.0.0.1:{free_port()}"
        owner = Proc("owner", [args.owner_bin, "--name", name, "--socket", sock, "--pool-size", args.pool_size,
                               "--metrics-addr", owner_metrics, "--disable-lfu-admission"], work)
        t = time.monotonic()
        while not os.path.exists(sock):
            if not owner.alive() or time.monotonic() - t > 120:
                raise SystemExit(f"owner did not start:\n{owner.tail()}")
            time.sleep(0.1)
        log(f"owner up in {time.monotonic() - t:.1f} s")
        extra = {"pegaflow.name": name, "pegaflow.socket": sock, "pegaflow.pd_direct": args.pd_direct == "on"}
        pp, dp, rp = free_port(), free_port(), free_port()
        base = {"kv_connector": "PegaKVConnector", "kv_connector_module_path": "pegaflow.connector",
                "kv_connector_extra_config": extra, "kv_load_failure_policy": "recompute"}
        procs = [owner]
        try:
            # Each instance sees the other's GPU after its own (docs/pd.md):
            # a CUDA IPC import needs the exporting GPU to be visible.
            D_extra = {**extra, "pegaflow.trace_sample_rate": 1.0}
            P = vllm_serve(args, "prefill", "0,1", pp, work, {**base, "kv_role": "kv_producer"})
            D = vllm_serve(args, "decode", "1,0", dp, work,
                           {**base, "kv_role": "kv_consumer", "kv_connector_extra_config": D_extra})
            procs += [P, D]
            t = time.monotonic()
            wait_healthy([(P, f"http://127.0.0.1:{pp}"), (D, f"http://127.0.0.1:{dp}")], args.start_timeout)
            log(f"prefill and decode instances healthy in {time.monotonic() - t:.0f} s")
            R = Proc("router", [sys.executable, "-m", "pegaflow.router", "--prefill", f"http://127.0.0.1:{pp}",
                                "--decode", f"http://127.0.0.1:{dp}", "--port", str(rp), "--host", "127.0.0.1",
                                "--first-token", args.first_token], work)
            procs.append(R)
            wait_healthy([(R, f"http://127.0.0.1:{rp}")], 60)
            url = f"http://127.0.0.1:{rp}"
            asyncio.run(run_load([url], warm, 4.0, 8, "warmup"))
            if "dp2" not in phases:
                # no DP2 phase to compute the reference: the decode instance
                # computes each prompt cold, as a plain request, first
                ref = asyncio.run(run_correctness([f"http://127.0.0.1:{dp}"], check_prompts, args.check_tokens, 1))
                result["decode_instance_cold_tokens"] = [t[0] for t in ref]
            toks = asyncio.run(run_correctness([url], check_prompts, args.check_tokens, 1))
            result["pd_tokens"] = [t[0] for t in toks]
            if "decode_instance_cold_tokens" in result:
                same = [a == b for a, b in zip(result["pd_tokens"], result["decode_instance_cold_tokens"])]
                result["tokens_identical_to_decode_instance_cold"] = same
                log(f"P/D tokens identical to the decode instance's cold ones: {same}")
                if not all(same):
                    ok = False
            for ld, out in zip(loads, result["loads"]):
                rate, tag = ld["rate"], "pd" + ld["tag"]
                before = scrape(f"http://127.0.0.1:{dp}", ("prefix_cache", "prompt_tokens"))
                o_before = metric_sums(f"http://{owner_metrics}", OWNER_SERIES)
                t = time.monotonic()
                rs = asyncio.run(run_load([url], ld["prompts"], rate, ld["max_tokens"], tag))
                res = out["pd"] = summarize(rs)
                res["wall_s"] = time.monotonic() - t
                after = scrape(f"http://127.0.0.1:{dp}", ("prefix_cache", "prompt_tokens"))
                res["decode_metrics_delta"] = {k: after[k] - before.get(k, 0.0) for k in after}
                o_after = metric_sums(f"http://{owner_metrics}", OWNER_SERIES)
                od = {k: o_after[k] - o_before[k] for k in OWNER_SERIES}
                res["owner_delta"] = od
                if od["pegaflow_client_load_seconds_total"] > 0:
                    res["load_copy_GBps"] = (od["pegaflow_client_load_bytes_total"]
                                             / od["pegaflow_client_load_seconds_total"] / 1e9)
                if od["pegaflow_client_save_seconds_total"] > 0:
                    res["save_copy_GBps"] = (od["pegaflow_client_save_bytes_total"]
                                             / od["pegaflow_client_save_seconds_total"] / 1e9)
                if args.first_token == "prefill":
                    # the client's first token is the prefill's: the decode side
                    # shows as the gap to the second (the decode's first)
                    side = [r["itl"][0] for r in rs if r["ok"] and r["itl"]]
                else:
                    side = [(r["ttft"] - r["prefill_ms"] / 1e3) for r in rs
                            if r["ok"] and r.get("prefill_ms") == r.get("prefill_ms")]
                pre = [r["prefill_ms"] for r in rs if r["ok"] and r.get("prefill_ms") == r.get("prefill_ms")]
                if side:
                    med = statistics.median(side)
                    res["prefill_hop_ms_mean"] = mean(pre)
                    res["decode_side_ms_median"] = med * 1e3
                    res["decode_side_ms_p99"] = pct(side, 99) * 1e3
                    res["handover_GBps_lower_bound"] = handover_bytes / med / 1e9
                res.update(handover_traces(D.log, tag + "-"))
                res["direct"] = args.pd_direct
                log(f"P/D at {rate:g} req/s, {ld['max_tokens']} tokens: {json.dumps(res)}")
        finally:
            for pr in reversed(procs):
                pr.stop()

    if "dp2" in phases:
        p0, p1 = free_port(), free_port()
        A = vllm_serve(args, "dp0", 0, p0, work, None)
        B = vllm_serve(args, "dp1", 1, p1, work, None)
        try:
            t = time.monotonic()
            urls = [f"http://127.0.0.1:{p0}", f"http://127.0.0.1:{p1}"]
            wait_healthy([(A, urls[0]), (B, urls[1])], args.start_timeout)
            log(f"DP2 instances healthy in {time.monotonic() - t:.0f} s")
            asyncio.run(run_load(urls, warm, 4.0, 8, "warmup"))
            toks = asyncio.run(run_correctness(urls, check_prompts, args.check_tokens, 2, continued=True))
            result["single_cold_tokens"] = [t[0] for t in toks]
            result["single_warm_tokens"] = [t[1] for t in toks]
            result["single_continued_tokens"] = [t[2] if len(t) > 2 else [] for t in toks]
            for ld, out in zip(loads, result["loads"]):
                t = time.monotonic()
                rs = asyncio.run(run_load(urls, ld["prompts"], ld["rate"], ld["max_tokens"], "dp" + ld["tag"]))
                res = out["dp2"] = summarize(rs)
                res["wall_s"] = time.monotonic() - t
                log(f"DP2 at {ld['rate']:g} req/s, {ld['max_tokens']} tokens: {json.dumps(res)}")
        finally:
            A.stop()
            B.stop()

    if "pd_tokens" in result and "single_warm_tokens" in result:
        same_warm = [a == b for a, b in zip(result["pd_tokens"], result["single_warm_tokens"])]
        same_cold = [a == b for a, b in zip(result["pd_tokens"], result["single_cold_tokens"])]
        same_cont = [a == b for a, b in zip(result["pd_tokens"], result["single_continued_tokens"])]
        result["tokens_identical_to_single_warm"] = same_warm
        result["tokens_identical_to_single_cold"] = same_cold
        result["tokens_identical_to_single_continued"] = same_cont
        # What one instance computes the same way. The router's first token
        # is the prefill's, and the decode continues after it with the
        # prompt's KV copied from the prefill's GPU, the partial last block
        # too: every prompt token's KV from one cold pass ("cold"). Through
        # the pool the decode gets full blocks only and computes the tail
        # ("continued"). The decode computing the first token again: "warm".
        if args.first_token == "decode":
            result["reference"] = "warm"
        elif args.pd_direct == "on" and args.prompt_len % block:
            result["reference"] = "cold"
        else:
            result["reference"] = "continued"
        same = {"warm": same_warm, "cold": same_cold, "continued": same_cont}[result["reference"]]
        if not all(same) or not all(len(t) == args.check_tokens for t in result["pd_tokens"]):
            ok = False
            log(f"MISMATCH: P/D tokens differ from the single instance's ({result['reference']})")
    report(result)
    for out in result["loads"]:
        if any(out[k]["ok"] != out[k]["requests"] for k in ("pd", "dp2") if k in out):
            ok = False
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result))
    print("JSON " + json.dumps({k: v for k, v in result.items() if not k.endswith("_tokens")}))
    return 0 if ok else 1


def report(r: dict) -> None:
    def f(x, fmt="{:.1f}"):
        return "-" if x is None else fmt.format(x)

    c = r.get("ceilings")
    for by in r["loads"]:
        if "pd" not in by and "dp2" not in by:
            continue  # phases without a load (e.g. ceilings only)
        print()
        print(f"{r['requests']} requests x {r['prompt_len']} prompt tokens, {by['max_tokens']} generated, "
              f"{by['rate']:g} req/s steady; CUDA graphs: {r.get('cuda_graphs')}; "
              f"router --first-token {r.get('first_token')}")
        print("| config | TTFT mean | TTFT p99 | TPOT mean | TPOT p99 | ITL p99 | ok |")
        print("|---|---|---|---|---|---|---|")
        for k, label in (("pd", "P/D (1P+1D)"), ("dp2", "DP2")):
            s = by.get(k)
            if s:
                print(f"| {label} | {f(s['ttft_mean_ms'])} | {f(s['ttft_p99_ms'])} | {f(s['tpot_mean_ms'])} | "
                      f"{f(s['tpot_p99_ms'])} | {f(s['itl_p99_ms'])} | {s['ok']}/{s['requests']} |")
        s = by.get("pd")
        if not s or "handover_GBps_lower_bound" not in s:
            continue
        first = ", after the prefill's" if r.get("first_token") == "prefill" else ""
        print(f"handover: {r['handover_bytes'] / 1e6:.0f} MB per request; prefill hop "
              f"{f(s['prefill_hop_ms_mean'])} ms mean; decode side (wait + load + last block + its first "
              f"token{first}) {f(s['decode_side_ms_median'])} ms median, {f(s['decode_side_ms_p99'])} p99 "
              f"= {s['handover_GBps_lower_bound']:.1f} GB/s")
        if "load_copy_GBps" in s:
            print(f"owner's counters: decode loads at {s['load_copy_GBps']:.1f} GB/s, prefill saves at "
                  f"{s.get('save_copy_GBps', 0):.1f} GB/s (bytes / copy seconds)")
        if "loads_from_gpu" in s:
            print(f"decode loads: {s['loads_from_gpu']} copied from the prefill's GPU, {s['loads_from_pool']} "
                  f"from the pool, {s['load_failed_blocks']} blocks failed (recomputed)")
        if "handover_copy_GBps" in s:
            line = (f"GPU-to-GPU copies: {f(s['handover_copy_ms_median'], '{:.2f}')} ms median, "
                    f"{f(s['handover_copy_ms_p99'], '{:.2f}')} p99 per request, {s['handover_copy_GBps']:.0f} GB/s")
            if c:
                line += f" = {s['handover_copy_GBps'] / c['gpu0_to_gpu1_GBps']:.0%} of the GPU0->GPU1 ceiling"
            print(line)
    if c:
        print(f"ceilings: GPU0->GPU1 {c['gpu0_to_gpu1_GBps']:.0f} GB/s (peer access {c['peer_access']}), "
              f"GPU->host {c['gpu_to_host_GBps']:.0f}, host->GPU {c['host_to_gpu_GBps']:.0f}")
    if "tokens_identical_to_single_warm" in r:
        print(f"tokens identical to a single instance (reference: {r['reference']}): continued "
              f"{r['tokens_identical_to_single_continued']}, warm {r['tokens_identical_to_single_warm']}, "
              f"cold {r['tokens_identical_to_single_cold']}")


if __name__ == "__main__":
    sys.exit(main())
