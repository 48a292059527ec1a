#!/usr/bin/env python3
"""GPU benchmark of the connector's worker data path (no vLLM needed).

Starts a pegaflow-owner, allocates CUDA KV caches in vLLM's layouts, and
drives pegaflow.KvCache exactly as PegaKVConnector's worker does: layer-wise
saves (begin_save / save_layers per layer / end_save / poll_saves) on the
current stream, and loads from pinned slots on a side stream with
per-layer waits. Reports save and load GB/s next to a ceiling measured in
the same run (torch pinned-host <-> device copies of the same bytes), and
checks every loaded block byte for byte.

    PYTHONPATH=<unpacked pegaflow wheel> python3 scripts/gpu-connector-bench.py \\
        --owner-bin target/release/pegaflow-owner [--blocks 1024] [--layout both]

Prints one table and one JSON line (STYLE.md); exit status 1 on a byte
mismatch or when no block could be saved.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--owner-bin", required=True)
    p.add_argument("--pool-size", default="16gb")
    p.add_argument("--blocks", type=int, default=1024, help="blocks per transfer (each all layers)")
    p.add_argument("--gpu-blocks", type=int, default=4096, help="blocks in the GPU cache")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--layout", choices=["v025", "v03x", "both"], default="both",
                   help="v025: per layer [2, B, N, H, D] (vLLM 0.2x FlashAttention); "
                        "v03x: per-layer [B, H, N, C] views of one allocation (vLLM 0.3x LBHNC)")
    p.add_argument("--backend", default="auto", choices=["auto", "dma", "kernel"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", type=int, default=0)
    return p.parse_args()


class Owner:
    def __init__(self, binary: str, pool: str):
        self.name = f"bench-{uuid.uuid4().hex[:10]}"
        self.dir = tempfile.mkdtemp(prefix="pegaflow-bench-")
        self.socket = os.path.join(self.dir, "owner.sock")
        self.log = open(os.path.join(self.dir, "owner.log"), "wb")
        self.proc = subprocess.Popen(
            [binary, "--name", self.name, "--socket", self.socket, "--pool-size", pool,
             "--metrics-addr", "", "--log-level", "info"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300  # prefaulting a large pool takes a while
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None:
                sys.exit(f"pegaflow-owner exited; log in {self.dir}/owner.log")
            if time.monotonic() > deadline:
                sys.exit("pegaflow-owner did not come up")
            time.sleep(0.05)

    def dump_log(self, lines: int = 40) -> None:
        self.log.flush()
        with open(os.path.join(self.dir, "owner.log"), "rb") as f:
            tail = f.read().decode(errors="replace").splitlines()[-lines:]
        print("--- owner log (tail) ---", *tail, sep="\n", file=sys.stderr)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for f in os.listdir("/dev/shm"):
            if f.startswith(f"pegaflow-{self.name}"):
                os.unlink(os.path.join("/dev/shm", f))


def make_caches(torch, a, layout: str):
    dev = torch.device("cuda", a.device)
    nb, bs, h, d, L = a.gpu_blocks, a.block_size, a.kv_heads, a.head_dim, a.layers
    if layout == "v025":
        return [torch.empty(2, nb, bs, h, d, dtype=torch.bfloat16, device=dev) for _ in range(L)]
    # vLLM 0.3x: one int8 allocation, layer-major, each layer a [B, H, N, 2*D] view
    page = h * bs * 2 * d * 2
    buf = torch.empty(L * nb * page, dtype=torch.int8, device=dev)
    return [
        buf[l * nb * page:(l + 1) * nb * page].view(torch.bfloat16).view(nb, h, bs, 2 * d)
        for l in range(L)
    ]


def gbps(nbytes: int, secs: float) -> float:
    return nbytes / secs / 1e9 if secs > 0 else 0.0


def ceiling(torch, nbytes: int, device: int, iters: int) -> tuple[float, float]:
    """Best of `iters` single large pinned-host <-> device copies."""
    dev = torch.device("cuda", device)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    d2h = h2d = 0.0
    for _ in range(iters):
        torch.cuda.synchronize(dev)
        t = time.perf_counter()
        host.copy_(gpu, non_blocking=True)
        torch.cuda.synchronize(dev)
        d2h = max(d2h, gbps(nbytes, time.perf_counter() - t))
        t = time.perf_counter()
        gpu.copy_(host, non_blocking=True)
        torch.cuda.synchronize(dev)
        h2d = max(h2d, gbps(nbytes, time.perf_counter() - t))
    return d2h, h2d


def run_layout(torch, pegaflow, a, owner: Owner, layout: str, it_seed: int) -> dict:
    caches = make_caches(torch, a, layout)
    g = torch.Generator(device=f"cuda:{a.device}").manual_seed(it_seed)
    for c in caches:
        c.copy_(torch.randn(c.shape, generator=g, device=c.device, dtype=torch.float32).to(c.dtype))
    kv = pegaflow.kv_cache_from_tensors(
        caches, num_blocks=a.gpu_blocks, block_tokens=a.block_size, model=f"bench-{layout}",
        dtype="bf16", name=owner.name, socket=owner.socket, backend=a.backend,
    )
    if not kv.engine.wait_connected(30):
        sys.exit("could not connect to the owner")
    # The inference path never waits for the pool's CUDA registration (it
    # runs in the background, seconds on a large pool): a load right now
    # fails fast (vLLM would recompute), it does not block.
    t = time.perf_counter()
    try:
        kv.load(0, [(0, 0)], [0])  # segment 0 is never served
        fast_fail = "loaded?!"
    except pegaflow.OwnerUnavailable as e:
        fast_fail = str(e).split(";")[0]
    first_load_ms = (time.perf_counter() - t) * 1e3
    print(f"first load right after KvCache(): {first_load_ms:.2f} ms ({fast_fail})")
    if first_load_ms > 100:
        sys.exit(f"the first load blocked for {first_load_ms:.0f} ms")
    n = min(a.blocks, a.gpu_blocks // 2)
    slot_bytes = kv.slot_bytes
    stream = torch.cuda.current_stream(a.device)
    best_save = best_load = 0.0
    best_save_copy = 0.0
    ok = True
    for it in range(a.iters):
        src = list(range(n))
        dst = list(range(a.gpu_blocks - n, a.gpu_blocks))
        hashes = [f"{layout}-{it}-{i}".encode().ljust(32, b"\0")[:32] for i in range(n)]
        # ---- save: reserve in chunks as slots come, copy layer by layer
        torch.cuda.synchronize(a.device)
        t0 = time.perf_counter()
        copy_secs = 0.0
        saved = 0
        deadline = time.monotonic() + 60
        while saved < n:
            h, got = kv.begin_save(src[saved:], hashes[saved:])
            if got == 0:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.0005)  # stash empty: the owner refills it
                continue
            tc = time.perf_counter()
            for l in range(kv.num_segments):
                kv.save_layers(h, l, l + 1, stream=stream.cuda_stream)
            kv.end_save(h)
            kv.poll_saves(wait=True)
            copy_secs += time.perf_counter() - tc
            saved += got
        save_secs = time.perf_counter() - t0
        if saved < n:
            print(f"warning: only {saved}/{n} blocks could be reserved (pool too small?)")
        best_save = max(best_save, gbps(saved * slot_bytes, save_secs))
        best_save_copy = max(best_save_copy, gbps(saved * slot_bytes, copy_secs))
        # ---- load: pin, copy on a side stream, wait per layer
        deadline = time.monotonic() + 10
        while kv.engine.count_hits(kv.namespace, hashes[:saved]) < saved:
            if time.monotonic() > deadline:
                hits = kv.engine.count_hits(kv.namespace, hashes[:saved])
                print(f"saved blocks never became visible: {hits} of {saved} hit; "
                      f"engine stats {kv.engine.stats()}", file=sys.stderr)
                owner.dump_log()
                sys.exit(1)
            time.sleep(0.001)
        pins = kv.engine.lookup(kv.namespace, hashes[:saved])
        assert len(pins) == saved, f"{len(pins)} of {saved} pinned"
        bd = 1 if layout == "v025" else 0
        s_idx = torch.tensor(src[:saved], device=caches[0].device)
        d_idx = torch.tensor(dst[:saved], device=caches[0].device)
        ref = [c.index_select(bd, s_idx).clone() for c in caches]
        for c in caches:  # clear everything so stale bytes cannot pass
            c.view(torch.uint8).zero_()
        side = torch.cuda.Stream(a.device)
        torch.cuda.synchronize(a.device)
        t0 = time.perf_counter()
        kv.load(pins.segment_id, pins.blocks(), dst[:saved], stream=side.cuda_stream)
        for l in range(kv.num_segments):
            kv.wait_layer(l)
        load_secs = time.perf_counter() - t0
        failed = [f for _, f in kv.poll_loads(wait=True) if f]
        if failed:
            print(f"{sum(map(len, failed))} blocks changed under the load", file=sys.stderr)
            ok = False
        pins.release()
        best_load = max(best_load, gbps(len(pins) * slot_bytes, load_secs))
        # ---- byte-exact check of every loaded block, every layer
        torch.cuda.synchronize(a.device)
        for c, r in zip(caches, ref):
            if not torch.equal(c.index_select(bd, d_idx).view(torch.uint8), r.view(torch.uint8)):
                ok = False
        del ref
        # restore the source for the next iteration
        for c in caches:
            c.copy_(torch.randn(c.shape, generator=g, device=c.device, dtype=torch.float32).to(c.dtype))
    return {
        "layout": layout, "backend": kv.backend, "blocks": n, "slot_bytes": slot_bytes,
        "piece_bytes": slot_bytes // (kv.num_segments * (2 if layout == "v025" else 1)),
        "save_gbps": round(best_save, 2), "save_copy_gbps": round(best_save_copy, 2),
        "load_gbps": round(best_load, 2), "byte_exact": ok,
    }


def main() -> int:
    a = parse()
    import torch

    import pegaflow

    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    owner = Owner(a.owner_bin, a.pool_size)
    try:
        layouts = ["v025", "v03x"] if a.layout == "both" else [a.layout]
        rows = [run_layout(torch, pegaflow, a, owner, l, 1234 + i) for i, l in enumerate(layouts)]
        nbytes = rows[0]["blocks"] * rows[0]["slot_bytes"]
        d2h, h2d = ceiling(torch, nbytes, a.device, a.iters)
    finally:
        owner.stop()
    print(f"{'layout':7} {'backend':9} {'blocks':>6} {'piece KiB':>9} {'save GB/s':>9} "
          f"{'(copy)':>7} {'load GB/s':>9} {'ceil d2h':>8} {'ceil h2d':>8} exact")
    for r in rows:
        print(f"{r['layout']:7} {r['backend']:9} {r['blocks']:6} {r['piece_bytes'] / 1024:9.0f} "
              f"{r['save_gbps']:9.2f} {r['save_copy_gbps']:7.2f} {r['load_gbps']:9.2f} "
              f"{d2h:8.2f} {h2d:8.2f} {r['byte_exact']}")
    out = {"bench": "gpu-connector", "gpu": torch.cuda.get_device_name(a.device),
           "ceiling_d2h_gbps": round(d2h, 2), "ceiling_h2d_gbps": round(h2d, 2), "rows": rows}
    print(json.dumps(out))
    bad = [r for r in rows if not r["byte_exact"] or r["blocks"] == 0]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
