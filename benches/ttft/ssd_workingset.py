#!/usr/bin/env python3
"""Hit rate and TTFT inside a real vLLM when the working set is larger than
the pool: the pool alone against the pool with the SSD tier behind it.

The workload: ``--prompts`` distinct prompts (default 12 x 10,000 tokens,
Llama-3.1-8B shape: 15.7 GB of KV) sent one at a time, in the same order,
``--passes`` times (default 3), with vLLM's own GPU prefix cache reset
between passes (so every hit of a later pass comes from PegaFlow). The
pool holds ``1 / --ratio`` of the working set (default 3: a third).

Two configurations, each with a fresh owner and a fresh vLLM process:

  pool      the pool alone (the owner's defaults: TinyLFU admission)
  pool+ssd  the same pool with ``--ssd-cache-path`` on ``--ssd-dir``

For each pass it prints the hit rate (prompt tokens vLLM reports as cached
over prompt tokens), the TTFT median and p90, and what the owner did
(blocks hit in the pool, staged from SSD, written to SSD). The first token
of every request of a later pass must equal the first pass's (same prompt,
same KV); mismatches are counted and reported (bf16 with dummy weights can
flip near-tied tokens, as vLLM's own prefix cache does: see
docs/benchmarks.md).

  python3 benches/ttft/ssd_workingset.py --attention-backend TRITON_ATTN --ssd-dir /var/tmp/pf-ssd
  python3 benches/ttft/ssd_workingset.py --small --ssd-dir /var/tmp/pf-ssd      # CPU, tiny model

Phases run through ttft_bench.py's phase runner (one process each).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

import ttft_bench as tb  # noqa: E402

SSD_KEYS = (
    "pegaflow_block_hits_total",
    "pegaflow_block_commits_total",
    "pegaflow_ssd_staged_blocks_total",
    "pegaflow_ssd_staged_bytes_total",
    "pegaflow_ssd_written_blocks_total",
    "pegaflow_ssd_stage_requests_total",
    "pegaflow_ssd_checksum_failures_total",
    "pegaflow_admission_rejections_total",
    "pegaflow_saved_blocks_total",
    "pegaflow_saves_dropped_total",
    "pegaflow_commits_ring_full_total",
    "pegaflow_block_evictions_total",
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny Llama, 2,000-token prompts (CPU builds of vLLM)")
    ap.add_argument("--prompts", type=int, default=12, help="distinct prompts in the working set (default 12)")
    ap.add_argument("--prompt-len", type=int, help="tokens per prompt (default 10000; --small 2000)")
    ap.add_argument("--passes", type=int, default=3, help="passes over the working set (default 3)")
    ap.add_argument("--ratio", type=float, default=3.0, help="working set / pool size (default 3)")
    ap.add_argument("--ssd-dir", required=True, help="directory for the SSD tier (on the disk to measure)")
    ap.add_argument("--configs", default="pool,pool+ssd", help="comma list of pool, pool+ssd")
    ap.add_argument("--owner-bin", help="pegaflow-owner (default: $PEGAFLOW_OWNER_BIN, PATH, target/)")
    ap.add_argument("--owner-args", default="", help="extra pegaflow-owner flags for both configs (write --owner-args=--flag)")
    ap.add_argument("--attention-backend", help="e.g. TRITON_ATTN (the offline H200 bundle)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-cache-memory-bytes", type=int, help="vLLM's KV cache size (default: vLLM's; --small 1 GiB)")
    ap.add_argument("--phase-timeout", type=float, default=400)
    ap.add_argument("--workdir", help="keep logs here (default: a temp dir, removed)")
    ap.add_argument("--json-out", help="also write the results as JSON here")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--connector-config", default="{}",
                    help='extra kv_connector_extra_config as JSON, e.g. \'{"pegaflow.load_mode": "async"}\'')
    args = ap.parse_args()
    args.prompt_len = args.prompt_len or (2000 if args.small else 10000)
    # make_prompts() also draws decode prompts; none are needed here.
    args.decode_prompt_len, args.decoders, args.bg_prompts = 1, 0, 0
    if args.small:
        args.kv_cache_memory_bytes = args.kv_cache_memory_bytes or (1 << 30)

    binary = tb.find_owner_bin(args.owner_bin)
    if not binary:
        raise SystemExit("pegaflow-owner not found: build it (cargo build --release -p pegaflow-owner) or pass --owner-bin")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ssd-ws-"))
    work.mkdir(parents=True, exist_ok=True)

    # --small: the tiny Llama with more KV per token (4 KiB), so that a third
    # of the working set is still a pool of whole 2 MiB slabs.
    cfg = {**tb.TINY_LLAMA, "num_hidden_layers": 4, "num_key_value_heads": 4} if args.small else tb.LLAMA_3_1_8B
    mdir = work / "model"
    mdir.mkdir(exist_ok=True)
    (mdir / "config.json").write_text(json.dumps(cfg, indent=1))
    prompts_path = work / "prompts.json"
    tb.make_prompts(args, cfg, prompts_path)

    kvtok = tb.kv_bytes_per_token(cfg, args.dtype, 1)
    ws_bytes = args.prompts * args.prompt_len * kvtok
    pool_bytes = int(ws_bytes / args.ratio)
    pool = f"{max(pool_bytes >> 20, 4)}mb"
    small_slabs = ["--slab-size", "2mb"] if args.small else []
    ssd_cap = f"{max(int(ws_bytes * 1.5) >> 20, 256)}mb"

    on_cpu = False
    try:
        import importlib.metadata as md

        on_cpu = md.version("vllm").endswith("+cpu")
    except Exception:
        pass
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    env.update(PYTHONUNBUFFERED="1", VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    if on_cpu:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")

    llm = dict(model=str(mdir), load_format="dummy", skip_tokenizer_init=True, dtype=args.dtype,
               enforce_eager=True, enable_prefix_caching=True, max_model_len=args.prompt_len + 64, seed=0)
    if args.attention_backend:
        llm["attention_backend"] = args.attention_backend
    if args.kv_cache_memory_bytes:
        llm["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes

    steps = ["pass1"]
    for i in range(2, args.passes + 1):
        steps += ["reset", f"pass{i}"]

    tb.log(f"working set {args.prompts} x {args.prompt_len} tokens = {ws_bytes / 1e9:.2f} GB of KV; pool {pool} (1/{args.ratio:g}); SSD tier in {args.ssd_dir} (cap {ssd_cap})")
    results: dict[str, dict] = {}
    for config in args.configs.split(","):
        extra = small_slabs + args.owner_args.split()
        ssd_root = Path(args.ssd_dir) / f"ws-{os.getpid()}"
        if config == "pool+ssd":
            ssd_root.mkdir(parents=True, exist_ok=True)
            extra += ["--ssd-cache-path", str(ssd_root), "--ssd-cache-capacity", ssd_cap]
        elif config != "pool":
            ap.error(f"unknown config {config!r}")
        owner = tb.Owner(binary, work, pool, extra)
        owner.log = work / f"owner-{config}.log"
        try:
            up = owner.start()
            tb.log(f"[{config}] owner up in {up:.2f} s")
            spec = {"llm": llm, "prompts": str(prompts_path), "out": str(work / f"{config}.json"), "kind": "ttft",
                    "steps": steps, "metrics_addr": owner.metrics_addr, "owner_keys": list(SSD_KEYS),
                    "kv_transfer_config": {
                        "kv_connector": "PegaKVConnector",
                        "kv_role": "kv_both",
                        "kv_connector_module_path": "pegaflow.connector",
                        "kv_load_failure_policy": "recompute",
                        "kv_connector_extra_config": {"pegaflow.name": owner.name, "pegaflow.socket": owner.socket,
                                                      "pegaflow.ssd_stage_timeout": 30,
                                                      **json.loads(args.connector_config)},
                    }}
            spec_path = work / f"{config}.spec.json"
            spec_path.write_text(json.dumps(spec))
            t = time.perf_counter()
            snap = Snapshots(Path(binary).with_name("pegaflow-inspect"), owner.name, work / f"inspect-{config}.txt")
            with snap, open(work / f"{config}.log", "wb") as f:
                try:
                    rc = subprocess.run([sys.executable, str(HERE.parent / "ttft_bench.py"), "--run-phase",
                                         str(spec_path)], stdout=f, stderr=subprocess.STDOUT, env=env,
                                        timeout=args.phase_timeout, start_new_session=True, check=False).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            out = work / f"{config}.json"
            if rc == 0 and out.exists():
                results[config] = json.loads(out.read_text())
                tb.log(f"[{config}] done in {time.perf_counter() - t:.1f} s")
            else:
                tail = (work / f"{config}.log").read_text(errors="replace")[-2000:]
                results[config] = {"error": f"exit {rc}"}
                tb.log(f"[{config}] FAILED ({rc}):\n{tail}")
            results.setdefault(config, {})["dropped"] = labelled(owner.metrics_addr, ("_dropped_total",
                                                                                    "_skipped_total"))
        finally:
            owner.stop()
            shutil.rmtree(ssd_root, ignore_errors=True)

    ok = report(args, steps, results, kvtok)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


class Snapshots:
    """`pegaflow-inspect` pool and client tables every few seconds while a
    phase runs (occupancy by state, pins and held slots per engine), into
    the work dir: what the pool looked like when hits stopped."""

    def __init__(self, inspect: Path, name: str, out: Path, every: float = 8.0):
        import threading

        self.inspect, self.name, self.out, self.every = inspect, name, out, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        if not self.inspect.is_file():
            return
        with open(self.out, "w") as f:
            while not self.stop.wait(self.every):
                f.write(f"=== t={time.strftime('%H:%M:%S')}\n")
                for cmd in ("pool", "clients"):
                    r = subprocess.run([str(self.inspect), "--name", self.name, cmd], capture_output=True,
                                       text=True, timeout=30, check=False)
                    f.write(r.stdout + r.stderr)
                f.flush()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=60)


def labelled(addr: str, suffix: tuple[str, ...]) -> dict[str, float]:
    """Labelled samples of counters ending in `suffix` (drops and skips by reason)."""
    out = {}
    for line in tb.metrics_text(addr).splitlines():
        name = line.split("{", 1)[0]
        if not line.startswith("#") and "{" in line and name.endswith(suffix) and "client" not in name:
            key, _, val = line.rpartition(" ")
            if float(val):
                out[key] = float(val)
    return out


def report(args, steps, results, kvtok) -> bool:
    ok = True
    passes = [s for s in steps if s != "reset"]
    print(f"\nworking set: {args.prompts} prompts x {args.prompt_len} tokens, pool = 1/{args.ratio:g} of it, "
          f"{args.passes} passes in order (vLLM's GPU prefix cache reset between passes)")
    print(f"{'config':<9} {'pass':<6} {'hit rate':>8} {'TTFT p50':>9} {'p90':>8} {'pool hits':>9} "
          f"{'staged':>7} {'to SSD':>7} {'GB/s staged':>11} {'tok diff':>8}")
    summary = {}
    for config, r in results.items():
        if "error" in r:
            print(f"{config:<9} FAILED: {r['error']}")
            ok = False
            continue
        first = [x["token"] for x in r[passes[0]]]
        for p in passes:
            rows = r[p]
            cached = sum(x["cached"] for x in rows)
            rate = cached / (len(rows) * args.prompt_len)
            ms = [x["ms"] for x in rows]
            own = r.get(p + "_owner", {})
            staged_b = own.get("pegaflow_ssd_staged_bytes_total", 0.0)
            diff = sum(1 for a, b in zip(first, (x["token"] for x in rows)) if a != b)
            gbps = staged_b / (sum(ms) / 1e3) / 1e9 if staged_b else 0.0
            print(f"{config:<9} {p:<6} {rate:>7.0%} {tb.med(ms):>7.0f}ms {tb.pct(ms, 0.9):>6.0f}ms "
                  f"{own.get('pegaflow_block_hits_total', 0):>9.0f} {own.get('pegaflow_ssd_staged_blocks_total', 0):>7.0f} "
                  f"{own.get('pegaflow_ssd_written_blocks_total', 0):>7.0f} {gbps:>11.2f} {diff:>8}")
            summary[f"{config}/{p}"] = {"hit_rate": rate, "ttft_ms_p50": tb.med(ms), "ttft_ms_p90": tb.pct(ms, 0.9),
                                        "token_diffs": diff, **{k: own.get(k, 0.0) for k in SSD_KEYS}}
            if own.get("pegaflow_ssd_checksum_failures_total", 0):
                print(f"  checksum failures in {config}/{p}: {own['pegaflow_ssd_checksum_failures_total']:.0f}")
                ok = False
        for k, v in r.get("dropped", {}).items():
            print(f"  {config}: {k} {v:.0f}")
    last = passes[-1]
    a, b = summary.get(f"pool/{last}"), summary.get(f"pool+ssd/{last}")
    if a and b:
        print(f"\n{last}: hit rate {a['hit_rate']:.0%} -> {b['hit_rate']:.0%} with the tier; "
              f"TTFT p50 {a['ttft_ms_p50']:.0f} -> {b['ttft_ms_p50']:.0f} ms "
              f"({b['ttft_ms_p50'] / a['ttft_ms_p50']:.2f}x)")
    print(json.dumps({"bench": "ssd_workingset", "prompts": args.prompts, "prompt_len": args.prompt_len,
                      "ratio": args.ratio, "kv_bytes_per_token": kvtok, "results": summary}))
    return ok


if __name__ == "__main__":
    sys.exit(main())
