"""pegaflow._native on its own: exceptions, degraded mode, and a byte-exact
CPU round trip through a real owner with vLLM 0.2x's per-layer layout."""

from __future__ import annotations

import pytest
import torch

import pegaflow
from pegaflow import (
    ConfigError,
    Engine,
    LayoutError,
    OwnerUnavailable,
    PegaflowError,
    kv_cache_from_tensors,
)


def test_exception_hierarchy():
    for e in (ConfigError, LayoutError, OwnerUnavailable, pegaflow.OwnerRejected, pegaflow.TransferError):
        assert issubclass(e, PegaflowError)
    assert issubclass(PegaflowError, Exception)


def test_engine_without_owner_degrades(tmp_path):
    e = Engine(name="pytest-nobody", socket=str(tmp_path / "none.sock"), reconnect_interval=0.05)
    assert not e.is_connected()
    assert not e.wait_connected(0.1)
    assert e.count_hits(7, [b"\x01" * 32]) == 0
    pins = e.lookup(7, [b"\x01" * 32])
    assert len(pins) == 0 and pins.segment_id == 0
    pins.release()  # harmless while disconnected
    e.release(pins)
    assert e.stats()["connected"] is False
    with pytest.raises(ConfigError):
        e.count_hits(7, [b"x" * 33])


def test_bad_layouts_are_layout_errors(tmp_path):
    t = torch.zeros(4, 3, 5, dtype=torch.float32)  # no dimension of num_blocks
    with pytest.raises(LayoutError, match="num_blocks"):
        kv_cache_from_tensors([t], num_blocks=8, block_tokens=16, model="m", dtype="f32",
                              socket=str(tmp_path / "x.sock"))
    # heads outside blocks: a block is neither one run nor a K and a V run
    t = torch.zeros(4, 8, 16, 8, dtype=torch.bfloat16)  # [H, B, N, D]
    with pytest.raises(LayoutError, match="unsupported attention layout"):
        kv_cache_from_tensors([t], num_blocks=8, block_tokens=16, model="m", dtype="bf16",
                              socket=str(tmp_path / "x.sock"))


def wait_hits(engine, ns, hashes, n, timeout=5.0):
    """Commits are published by the owner asynchronously."""
    import time

    deadline = time.monotonic() + timeout
    while engine.count_hits(ns, hashes) < n:
        assert time.monotonic() < deadline, f"only {engine.count_hits(ns, hashes)} of {n} hits"
        time.sleep(0.005)


def save_all(kv, blocks, hashes, timeout=5.0):
    """Right after connecting, the owner may not have filled this engine's
    stash yet: saves are then dropped (by design), so retry until stored."""
    import time

    deadline = time.monotonic() + timeout
    while kv.save(blocks, hashes) < len(blocks):
        assert time.monotonic() < deadline, "saves kept being dropped"
        time.sleep(0.01)


def _fill(t: torch.Tensor, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))


@pytest.mark.parametrize("shape_kind", ["kv_leading", "block_leading", "mla"])
def test_cpu_round_trip_byte_exact(owner, shape_kind):
    nb, bs, h, d, layers = 12, 16, 2, 16, 3

    def make():
        if shape_kind == "kv_leading":  # vLLM 0.2x FlashAttention
            return [torch.zeros(2, nb, bs, h, d, dtype=torch.bfloat16) for _ in range(layers)]
        if shape_kind == "block_leading":  # FlashInfer [B, 2, N, H, D]
            return [torch.zeros(nb, 2, bs, h, d, dtype=torch.bfloat16) for _ in range(layers)]
        return [torch.zeros(nb, bs, 576, dtype=torch.bfloat16) for _ in range(layers)]  # MLA

    src, dst = make(), make()
    for i, t in enumerate(src):
        _fill(t, i)
    kw = dict(num_blocks=nb, block_tokens=bs, model="tiny", dtype="bf16", name=owner.name, socket=owner.socket)
    a = kv_cache_from_tensors(src, **kw)
    b = kv_cache_from_tensors(dst, **kw)
    assert a.namespace == b.namespace
    assert a.engine.wait_connected(5) and b.engine.wait_connected(5)
    hashes = [bytes([i]) * 32 for i in range(1, 5)]
    save_all(a, [3, 7, 0, 11], hashes)
    assert a.backend == "host" and a.load_calibration is None  # CPU tensors: nothing to time
    wait_hits(b.engine, b.namespace, hashes, 4)
    pins = b.engine.lookup(b.namespace, hashes + [b"\xff" * 32])
    assert len(pins) == 4 and pins.held() == 4
    h = b.load(pins.segment_id, pins.blocks(), [1, 2, 5, 9])
    for l in range(layers):
        b.wait_layer(l)
    assert b.poll_loads(wait=True) == [(h, [])]
    b.engine.release(pins)
    assert pins.held() == 0
    bd = 1 if shape_kind == "kv_leading" else 0
    for s, d_ in zip(src, dst):
        for sb, db in zip([3, 7, 0, 11], [1, 2, 5, 9]):
            assert torch.equal(s.select(bd, sb), d_.select(bd, db))
        # nothing else was written
        untouched = [x for x in range(nb) if x not in (1, 2, 5, 9)]
        assert not d_.index_select(bd, torch.tensor(untouched)).any()


def test_layer_wise_save_commits_only_after_end(owner):
    t = [torch.ones(2, 4, 16, 2, 16, dtype=torch.bfloat16) for _ in range(2)]
    kv = kv_cache_from_tensors(t, num_blocks=4, block_tokens=16, model="m", dtype="bf16",
                               name=owner.name, socket=owner.socket)
    assert kv.engine.wait_connected(5)
    save_all(kv, [0], [b"warm" * 8])  # stash filled
    h, n = kv.begin_save([1, 2], [b"a" * 32, b"b" * 32])
    assert n == 2
    kv.save_layers(h, 0, 1)
    assert kv.poll_saves(wait=True) == []  # not ended: nothing committed
    assert kv.engine.count_hits(kv.namespace, [b"a" * 32]) == 0
    kv.save_layers(h, 1, 2)
    kv.end_save(h)
    assert kv.poll_saves(wait=True) == [(h, 2)]
    wait_hits(kv.engine, kv.namespace, [b"a" * 32, b"b" * 32], 2)
    with pytest.raises(ConfigError):
        kv.save_layers(h, 0, 1)  # handle is gone


def test_a_waiting_save_releases_the_gil(owner):
    """Issue 9 item 8: begin_save may wait (at most reserve_wait) for the
    owner to refill a short stash; other Python threads (vLLM's) must run
    meanwhile."""
    import os
    import signal
    import threading
    import time

    t = [torch.zeros(2, 64, 16, 2, 16, dtype=torch.bfloat16) for _ in range(2)]
    lay = pegaflow.tensors.describe_kv_tensors(t, 64, 16)
    kv = pegaflow._native.KvCache(
        **lay.native_layout(), model="gil", dtype="bf16", name=owner.name, socket=owner.socket,
        keepalive=t, reserve_wait=0.5,
    )
    assert kv.engine.wait_connected(5)
    time.sleep(0.2)  # the owner fills the stash (a few slots, fewer than 64)
    os.kill(owner.proc.pid, signal.SIGSTOP)  # nobody refills it now
    window = [float("inf"), float("inf")]
    inside = 0
    stop = threading.Event()

    def spin():
        nonlocal inside
        while not stop.is_set():
            now = time.monotonic()
            if window[0] < now < window[1]:
                inside += 1

    th = threading.Thread(target=spin)
    th.start()
    try:
        time.sleep(0.05)
        t0 = time.monotonic()
        # the middle of the wait: only a released GIL lets the thread in
        window[:] = [t0 + 0.1, t0 + 0.35]
        h, n = kv.begin_save(list(range(64)), [bytes([i]) * 32 for i in range(64)])
        took = time.monotonic() - t0
    finally:
        stop.set()
        th.join()
        os.kill(owner.proc.pid, signal.SIGCONT)
    assert n < 64 and took >= 0.4, (n, took)  # it did wait for the refill
    assert inside > 100, f"other threads ran {inside} loop turns while the save waited {took:.2f} s"
    kv.abort_save(h)
