#!/usr/bin/env python3
"""GPU test of the direct P/D hand-over, byte for byte, between two real
processes on two GPUs of one host (one GPU works too: both on it).

A prefill process fills a vLLM-shaped KV cache (bf16, 36 layers of
[2, blocks, 16, 8, 128], as Qwen3-8B) with random bytes on GPU0, exports
it through a real pegaflow-owner (``KvCache.export_peer``, brokered) and
lends 312 blocks (a 5,000-token prompt) through a hold table. A decode
process on GPU1 copies them with the connector's own ``PeerCopier`` into
other block ids of its cache and both compare SHA-256 digests of every
lent block, layer by layer, and again for blocks in three orders
(contiguous, backwards on both sides, opposite ways: the copy engines for
long runs, the copy kernel for short ones), timed. Then: an expired hold is refused without a
copy; a hold whose key is not the decode's is refused; a decode SIGKILLed
while holding a taken rank lets the prefill expire it; blocks copied while
the hold's creator (the prefill) was SIGKILLed are load errors.

    python3 tests/e2e/gpu_pd_direct.py --owner-bin PATH     # exits 0 when all pass
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

LAYERS, BLOCKS, BLOCK, HEADS, DIM = 36, 2048, 16, 8, 128
LENT = 312
#: block orders a hand-over meets (vLLM's free queue gives a finished
#: request's blocks back in reverse): slot, ticket, the prefill's blocks,
#: the decode's blocks. Each is copied, timed and checked byte for byte.
ORDERS = {
    "contiguous": (4, 5, list(range(400, 400 + LENT)), list(range(1000, 1000 + LENT))),
    "backwards on both sides": (5, 6, list(range(800 + LENT - 1, 799, -1)), list(range(1400 + LENT - 1, 1399, -1))),
    "opposite ways": (6, 7, list(range(1200, 1200 + LENT)), list(range(BLOCKS - 1, BLOCKS - 1 - LENT, -1))),
}


def kv_tensors(torch, dev, fill: bool):
    shape = (2, BLOCKS, BLOCK, HEADS, DIM)
    g = torch.Generator(device=dev).manual_seed(1234)
    out = []
    for _ in range(LAYERS):
        if fill:
            t = torch.randint(-32768, 32767, shape, dtype=torch.int16, device=dev, generator=g).view(torch.bfloat16)
        else:
            t = torch.zeros(shape, dtype=torch.bfloat16, device=dev)
        out.append(t)
    return out


def digest(torch, tensors, blocks) -> str:
    h = hashlib.sha256()
    idx = torch.tensor(blocks, device=tensors[0].device)
    for t in tensors:
        h.update(t.index_select(1, idx).contiguous().view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()


def cache(torch, tensors, name, sock, label):
    from pegaflow.tensors import kv_cache_from_tensors

    return kv_cache_from_tensors(tensors, num_blocks=BLOCKS, block_tokens=BLOCK, model="pd-direct-test",
                                 dtype="bfloat16", name=name, socket=sock, label=label)


def producer(a) -> None:
    import torch
    from pegaflow import _native

    dev = torch.device("cuda:0")
    kv = kv_tensors(torch, dev, fill=True)
    c = cache(torch, kv, a.name, a.sock, "pd-direct-prefill")
    assert c.engine.wait_connected(10), "owner not reachable"
    key = f"pd/{uuid.uuid4().hex}/0"
    c.engine.publish_ipc(key, c.export_peer())
    t = _native.HoldTable.create("pegaflow-pd-" + uuid.uuid4().hex, capacity=8, max_blocks=400,
                                 namespaces=[c.namespace], peer_keys=[key])
    lent = list(range(7, 7 + 2 * LENT, 2))  # every other block: not one contiguous run
    t.hold(0, 1, b"K" * 32, lent)
    t.hold(1, 2, b"K" * 32, lent)  # expires before the decode comes
    t.hold(2, 3, b"Z" * 32, lent)  # another prompt's key
    t.hold(3, 4, b"K" * 32, lent)  # taken by a decode that is SIGKILLed
    assert t.expire(1, 2)
    for slot, ticket, blocks, _ in ORDERS.values():
        t.hold(slot, ticket, b"K" * 32, blocks)
    torch.cuda.synchronize()
    print(json.dumps({"table": t.name, "nonce": t.nonce, "namespace": c.namespace, "key": key,
                      "digest": digest(torch, kv, lent),
                      "orders": {k: digest(torch, kv, v[2]) for k, v in ORDERS.items()}}), flush=True)
    # wait for the decode to finish slot 0 and for slot 3's taker to die
    deadline = time.monotonic() + 120
    while not (t.over(0, 1) and t.expire(3, 4)):
        assert time.monotonic() < deadline, f"holds not over: {t.word(0, 0)} {t.word(3, 0)}"
        time.sleep(0.01)
    print(json.dumps({"over": True, "slot3": t.word(3, 0)}), flush=True)
    sys.stdin.readline()


class Trace:
    def issued(self, *a, **k):
        pass

    def done(self, *a, **k):
        pass


def creator(a) -> None:
    """A second hold table over the producer's exported cache, made by this
    process: its death is a prefill's (the hold's creator) exiting."""
    from pegaflow import _native

    info = json.loads(a.info)
    t = _native.HoldTable.create("pegaflow-pd-" + uuid.uuid4().hex, capacity=2, max_blocks=400,
                                 namespaces=[info["namespace"]], peer_keys=[info["key"]])
    t.hold(0, 1, b"K" * 32, list(range(7, 7 + LENT)))
    print(json.dumps({"table": t.name, "nonce": t.nonce}), flush=True)
    time.sleep(600)


def consumer(a) -> None:
    import torch
    from pegaflow.connector.direct import DirectSpec, PeerCopier

    info = json.loads(a.info)
    dev = torch.device("cuda:0")
    kv = kv_tensors(torch, dev, fill=False)
    c = cache(torch, kv, a.name, a.sock, "pd-direct-decode")
    assert c.engine.wait_connected(10), "owner not reachable"
    assert c.namespace == info["namespace"]
    pc = PeerCopier(c, 0, dev)
    dst = list(range(100, 100 + LENT))
    res = {}
    if a.mode == "copy":
        spec = DirectSpec(info["table"], info["nonce"], 0, 1, b"K" * 32, 0)
        t0 = time.perf_counter()
        assert pc.start(spec, dst, Trace(), "r0"), pc.failed
        pc.finish(Trace(), wait=True)
        res["wall_ms"] = (time.perf_counter() - t0) * 1e3
        res["gpu_ms"] = pc.gpu_ms
        res["bytes"] = pc.bytes
        res["digest"] = digest(torch, kv, dst)
        res["untouched_zero"] = bool((kv[0][:, 99] == 0).all().item() and (kv[-1][:, 100 + LENT] == 0).all().item())
        # expired hold: refused, nothing copied; another prompt's key: refused
        kv[0][:, dst[0]].zero_()
        res["expired_copied"] = pc.start(DirectSpec(info["table"], info["nonce"], 1, 2, b"K" * 32, 0), dst, Trace(), "r1")
        res["wrong_key_copied"] = pc.start(DirectSpec(info["table"], info["nonce"], 2, 3, b"K" * 32, 0), dst, Trace(), "r2")
        pc.finish(Trace(), wait=True)
        torch.cuda.synchronize()
        res["after_refusals_zero"] = bool((kv[0][:, dst[0]] == 0).all().item())
        # the orders blocks come in: each copy timed alone (CUDA events)
        res["orders"] = {}
        for k, (slot, ticket, _, local) in ORDERS.items():
            before, paths = pc.gpu_ms, dict(pc.paths)
            assert pc.start(DirectSpec(info["table"], info["nonce"], slot, ticket, b"K" * 32, 0), local, Trace(), k)
            pc.finish(Trace(), wait=True)
            path = [p for p, n in pc.paths.items() if n > paths.get(p, 0)]
            res["orders"][k] = {"gpu_ms": pc.gpu_ms - before, "path": path, "digest": digest(torch, kv, local)}
        print(json.dumps(res), flush=True)
    elif a.mode == "lost":
        # The copy queued behind a second of GPU work; the parent SIGKILLs
        # the hold's creator meanwhile: the copied blocks must be lost.
        held = json.loads(a.held)
        torch.cuda._sleep(2_000_000_000)  # GPU clock cycles: about a second on an H200
        spec = DirectSpec(held["table"], held["nonce"], 0, 1, b"K" * 32, 0)
        assert pc.start(spec, dst, Trace(), "lost"), pc.failed
        print(json.dumps({"queued": True}), flush=True)
        sys.stdin.readline()
        pc.finish(Trace(), wait=True)
        print(json.dumps({"lost": sorted(pc.lost) == sorted(dst), "n": len(pc.lost)}), flush=True)
    else:  # take slot 3 and wait to be killed
        from pegaflow import _native

        t = _native.HoldTable.open(info["table"])
        assert t.take(3, 4, 0) is not None
        print(json.dumps({"taken": True}), flush=True)
        time.sleep(600)


def json_line(proc) -> dict | None:
    """The next JSON line a child prints; skips its log lines (pegaflow's
    logger writes to stdout, as vLLM's does). None: it exited first."""
    for line in iter(proc.stdout.readline, ""):
        if line.startswith("{"):
            return json.loads(line)
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--owner-bin")
    ap.add_argument("--role", choices=("producer", "consumer", "creator"))
    ap.add_argument("--mode", default="copy")
    ap.add_argument("--name")
    ap.add_argument("--sock")
    ap.add_argument("--info")
    ap.add_argument("--held")
    a = ap.parse_args()
    if a.role == "creator":
        creator(a)
        return 0
    if a.role == "producer":
        producer(a)
        return 0
    if a.role == "consumer":
        consumer(a)
        return 0

    import torch

    n = torch.cuda.device_count()
    if n == 0:
        print("SKIP: no GPU")
        return 0
    p_gpus, d_gpus = ("0,1", "1,0") if n >= 2 else ("0", "0")
    work = Path(tempfile.mkdtemp(prefix="pd-direct-"))
    name = f"pdd-{uuid.uuid4().hex[:8]}"
    sock = str(work / "owner.sock")
    owner = subprocess.Popen([a.owner_bin, "--name", name, "--socket", sock, "--pool-size", "1g"],
                             stdout=open(work / "owner.log", "wb"), stderr=subprocess.STDOUT)
    # faulthandler: a child that dies of a signal says where
    me = [sys.executable, "-X", "faulthandler", __file__, "--name", name, "--sock", sock]
    procs = [owner]
    ok = True
    try:
        while not os.path.exists(sock):
            assert owner.poll() is None, (work / "owner.log").read_text()
            time.sleep(0.05)
        P = subprocess.Popen(me + ["--role", "producer"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": p_gpus})
        procs.append(P)
        src = json_line(P)
        assert src, "producer failed"
        info = json.dumps(src)
        # a decode that takes slot 3, then is SIGKILLed
        K = subprocess.Popen(me + ["--role", "consumer", "--mode", "take", "--info", info], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": d_gpus})
        procs.append(K)
        assert json_line(K)["taken"]
        D = subprocess.run(me + ["--role", "consumer", "--info", info], capture_output=True, text=True,
                           env={**os.environ, "CUDA_VISIBLE_DEVICES": d_gpus}, timeout=300)
        if D.returncode != 0:
            print(D.stderr[-4000:])
            return 1
        res = json.loads(D.stdout.strip().splitlines()[-1])
        # the hold's creator exits while the copy is queued on the GPU
        C = subprocess.Popen(me + ["--role", "creator", "--info", info], stdout=subprocess.PIPE, text=True)
        procs.append(C)
        held = json.dumps(json_line(C))
        L = subprocess.Popen(me + ["--role", "consumer", "--mode", "lost", "--info", info, "--held", held],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             stderr=open(work / "lost.err", "w"), env={**os.environ, "CUDA_VISIBLE_DEVICES": d_gpus})
        procs.append(L)
        assert json_line(L)["queued"]
        C.send_signal(signal.SIGKILL)
        C.wait()
        L.stdin.write("\n")
        L.stdin.flush()
        lost = json_line(L)
        L.wait(timeout=60)
        if lost is None:
            print(f"the 'lost' consumer exited with {L.returncode}; its stderr:")
            print((work / "lost.err").read_text()[-4000:])
            return 1
        K.send_signal(signal.SIGKILL)
        K.wait()
        over = json_line(P)
        checks = {
            "lent blocks byte-exact on the decode's GPU": res["digest"] == src["digest"],
            "neighbouring blocks untouched": res["untouched_zero"],
            "an expired hold is not copied": res["expired_copied"] is False,
            "another prompt's hold is not copied": res["wrong_key_copied"] is False,
            "nothing written by refused holds": res["after_refusals_zero"],
            "the prefill sees the copy done and the dead taker's hold expired": over["over"]
            and over["slot3"][0] == "expired",
            "blocks copied while the hold's creator exited are load errors": lost["lost"],
        }
        for k, o in res["orders"].items():
            checks[f"{k}: byte-exact"] = o["digest"] == src["orders"][k]
        # long runs go to the copy engines, scattered blocks to the kernel
        checks["runs of blocks copied by the copy engines"] = (
            res["orders"]["contiguous"]["path"] == ["dma"]
            and res["orders"]["backwards on both sides"]["path"] == ["dma"])
        checks["blocks running opposite ways copied by the copy kernel"] = (
            res["orders"]["opposite ways"]["path"] == ["kernel"])
        for k, v in checks.items():
            print(f"{'PASS' if v else 'FAIL'}: {k}")
            ok &= v
        mb = res["bytes"] / 1e6
        print(f"copied {LENT} blocks ({mb:.0f} MB, GPUs {d_gpus}) in {res['gpu_ms']:.2f} ms of GPU time "
              f"({res['bytes'] / res['gpu_ms'] / 1e6:.0f} GB/s), {res['wall_ms']:.1f} ms wall including the "
              f"first mapping of the prefill's cache")
        for k, o in res["orders"].items():
            print(f"{k}: {LENT} blocks in {o['gpu_ms']:.2f} ms of GPU time ({res['bytes'] / o['gpu_ms'] / 1e6:.0f} "
                  f"GB/s) by {'/'.join(o['path'])}")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.kill()
                p.wait()
    print("gpu_pd_direct: " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
