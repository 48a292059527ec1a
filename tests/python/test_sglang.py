"""PegaFlow as SGLang's HiCache storage tier, through SGLang's own classes.

The backend is created by SGLang's ``StorageBackendFactory`` from the
documented ``dynamic`` extra config and registered with SGLang's real MHA
and MLA host pools (CPU tensors, every supported ``--hicache-mem-layout``),
against a real pegaflow-owner. Another "SGLang process" is a real
subprocess (sglang_child.py) with pools and a backend of its own.

scripts/py-test.sh runs this file with SGLang on PYTHONPATH
(scripts/sglang-env.sh) and PEGAFLOW_SGLANG_REQUIRED=1; elsewhere it is
skipped when SGLang cannot be imported.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

try:
    warnings.simplefilter("ignore")  # SGLang warns about CUDA-only quantizers on import
    import sglang_harness as h
    import torch
    from sglang.srt.mem_cache.hicache_storage import STORAGE_BATCH_SIZE, PoolName
    from sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller import HybridCacheController
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
    from sglang.srt.server_args import ServerArgs
except Exception as e:  # noqa: BLE001 - any import failure of SGLang's stack
    if os.environ.get("PEGAFLOW_SGLANG_REQUIRED") == "1":
        raise
    pytest.skip(
        f"SGLang is not importable here ({e!r}); scripts/py-test.sh runs these tests with "
        "SGLang on PYTHONPATH (scripts/sglang-env.sh)",
        allow_module_level=True,
    )

import pegaflow
from pegaflow.exceptions import ConfigError, LayoutError
from pegaflow.sglang import PegaHiCacheStorage

HERE = Path(__file__).resolve().parent
LAYOUTS = [("mha", lay) for lay in h.MHA_LAYOUTS] + [("mla", lay) for lay in h.MLA_LAYOUTS]


def connected(backend) -> PegaHiCacheStorage:
    assert backend._loader.engine.wait_connected(10.0), "backend did not reach the owner"
    if backend._saver is not None:
        assert backend._saver.engine.wait_connected(10.0)
    return backend


def published(backend, keys, n=None, timeout=5.0) -> int:
    """batch_exists once the owner has published the commits (it applies
    them from the engine's ring asynchronously)."""
    want = len(keys) if n is None else n
    deadline = time.monotonic() + timeout
    while (got := backend.batch_exists(keys)) < want and time.monotonic() < deadline:
        time.sleep(0.005)
    return got


def run_child(owner, kind, layout, seed, pages, tp_rank=0, tp_size=1) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    p = subprocess.run(
        [sys.executable, str(HERE / "sglang_child.py"), owner.name, owner.socket, kind, layout,
         str(seed), str(pages), str(tp_rank), str(tp_size)],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert p.returncode == 0, f"child failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_factory_creates_and_registers_the_backend(owner):
    pool = h.make_host_pool("mha", "page_first")
    backend = connected(h.attach(h.storage_config(owner), pool))
    assert type(backend) is PegaHiCacheStorage
    assert backend.mem_pool_host is pool
    assert backend.layout.num_pages == pool.page_num
    assert backend.layout.page_bytes == pool.get_dummy_flat_data_page().numel() * 2
    assert backend.namespace != 0


def quick_start_flags() -> list[str]:
    """The SGLang command line of docs/sglang.md's quick start."""
    text = (HERE.parents[1] / "docs" / "sglang.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    cmd = block[block.index("python -m sglang.launch_server"):].replace("\\\n", " ")
    args = shlex.split(cmd.split("\n\n", 1)[0])
    return args[args.index("sglang.launch_server") + 1 :]


def test_the_documented_launch_flags_load_the_backend(owner):
    """docs/sglang.md's flags, parsed by SGLang's own CLI and extra-config
    parser, give a backend SGLang's factory creates and that stores pages."""
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(quick_start_flags())
    assert args.enable_hierarchical_cache and args.hicache_storage_backend == "dynamic"
    extra, *_ = HybridCacheController.parse_storage_backend_extra_config(
        args.hicache_storage_backend_extra_config
    )
    cfg = h.storage_config(owner)
    cfg.extra_config = {**extra, "pegaflow.name": owner.name, "pegaflow.socket": owner.socket}
    pool = h.make_host_pool("mha", args.hicache_mem_layout)
    backend = StorageBackendFactory.create_backend(args.hicache_storage_backend, cfg, pool)
    backend.register_mem_pool_host(pool)
    connected(backend)
    keys = h.page_hashes(h.prompt(11, 2))
    assert backend.batch_set_v1(keys, h.fill(pool, 11, 2)) == [True, True]
    assert published(backend, keys) == 2


def test_without_interface_v1_it_refuses_to_start(owner):
    cfg = h.storage_config(owner)
    del cfg.extra_config["interface_v1"]
    with pytest.raises(ConfigError, match="interface_v1"):
        h.attach(cfg, h.make_host_pool("mha", "page_first"))


def test_unknown_pegaflow_key_is_an_error(owner):
    with pytest.raises(ConfigError, match="pegaflow.nmae"):
        h.attach(h.storage_config(owner, **{"pegaflow.nmae": "x"}), h.make_host_pool("mha", "page_first"))


@pytest.mark.parametrize("kind,layout", LAYOUTS)
def test_set_then_get_is_byte_exact(owner, kind, layout):
    pool = h.make_host_pool(kind, layout)
    backend = connected(h.attach(h.storage_config(owner, is_mla=kind == "mla"), pool))
    n = 5
    keys = h.page_hashes(h.prompt(1, n))
    src = h.fill(pool, 1, n)
    assert backend.batch_exists(keys) == 0
    assert backend.batch_set_v1(keys, src) == [True] * n
    assert published(backend, keys) == n
    assert backend.exists(keys[3])
    assert not backend.exists("ab" * 32)
    # a chain that diverges after 2 pages hits 2
    other = h.page_hashes(h.prompt(1, n)[: 2 * h.PAGE] + h.prompt(2, n - 2))
    assert other[:2] == keys[:2] and backend.batch_exists(other) == 2

    dst = pool.alloc(n * h.PAGE)
    assert not any(h.pages_equal(pool, dst, 1, n))
    assert backend.batch_get_v1(keys, dst) == [True] * n
    assert h.pages_equal(pool, dst, 1, n) == [True] * n
    # the pages of the diverging chain: 2 stored, 3 not
    dst2 = pool.alloc(n * h.PAGE)
    assert backend.batch_get_v1(other, dst2) == [True, True, False, False, False]
    assert h.pages_equal(pool, dst2, 1, 2) == [True, True]
    # saving again what is there copies nothing and reports stored
    assert backend.batch_set_v1(keys, src) == [True] * n
    s = backend.stats()
    assert s["load"]["loaded_blocks"] == n + 2, s
    assert s["save"]["saved_blocks"] == n, s


@pytest.mark.parametrize("kind,layout", [("mha", "layer_first"), ("mla", "page_first")])
def test_another_process_hits_what_the_first_saved(owner, kind, layout):
    pool = h.make_host_pool(kind, layout)
    backend = connected(h.attach(h.storage_config(owner, is_mla=kind == "mla"), pool))
    n = 6
    keys = h.page_hashes(h.prompt(7, n))
    assert backend.batch_set_v1(keys, h.fill(pool, 7, n)) == [True] * n
    assert published(backend, keys) == n
    backend.close()  # the first "server" goes away; its pages stay
    got = run_child(owner, kind, layout, 7, n)
    assert got["namespace"] == backend.namespace
    assert got["exists"] == n
    assert got["got"] == [True] * n
    assert got["byte_exact"] == [True] * n
    assert got["stats"]["load"]["hit_blocks"] >= n


def test_tp_ranks_keep_their_own_shards(owner):
    """MHA: each rank stores its heads under its own namespace; a rank
    never hits another rank's shard."""
    n = 4
    keys = h.page_hashes(h.prompt(3, n))
    ranks = []
    for r in (0, 1):
        pool = h.make_host_pool("mha", "page_first")
        ranks.append((pool, connected(h.attach(h.storage_config(owner, tp_rank=r, tp_size=2), pool))))
    (p0, b0), (p1, b1) = ranks
    assert b0.namespace != b1.namespace
    assert b0.batch_set_v1(keys, h.fill(p0, 3, n)) == [True] * n
    assert published(b0, keys) == n
    assert b1.batch_exists(keys) == 0
    assert b1.batch_get_v1(keys, p1.alloc(n * h.PAGE)) == [False] * n
    # TP=1 of the same model is another format
    single = connected(h.attach(h.storage_config(owner), h.make_host_pool("mha", "page_first")))
    assert single.namespace not in (b0.namespace, b1.namespace)
    assert single.batch_exists(keys) == 0
    # rank 1's own shard, in another process, is found by rank 1 only
    keys13 = h.page_hashes(h.prompt(13, n))
    assert b1.batch_set_v1(keys13, h.fill(p1, 13, n)) == [True] * n
    assert published(b1, keys13) == n
    assert b0.batch_exists(keys13) == 0
    got = run_child(owner, "mha", "page_first", 13, n, tp_rank=1, tp_size=2)
    assert got["namespace"] == b1.namespace
    assert got["got"] == [True] * n and got["byte_exact"] == [True] * n


def test_mla_ranks_share_one_copy_written_by_rank_0(owner):
    n = 4
    keys = h.page_hashes(h.prompt(4, n))
    p0, p1 = h.make_host_pool("mla", "layer_first"), h.make_host_pool("mla", "layer_first")
    b0 = connected(h.attach(h.storage_config(owner, tp_rank=0, tp_size=2, is_mla=True), p0))
    b1 = connected(h.attach(h.storage_config(owner, tp_rank=1, tp_size=2, is_mla=True), p1))
    assert b0.namespace == b1.namespace
    assert b1._saver is None  # SGLang backs MLA up from rank 0 only
    assert b1.batch_set_v1(keys, h.fill(p1, 4, n)) == [False] * n
    assert b0.batch_set_v1(keys, h.fill(p0, 4, n)) == [True] * n
    dst = p1.alloc(n * h.PAGE)
    assert published(b1, keys) == n
    assert b1.batch_get_v1(keys, dst) == [True] * n
    assert h.pages_equal(p1, dst, 4, n) == [True] * n


def test_other_models_and_engines_never_collide(owner):
    n = 3
    keys = h.page_hashes(h.prompt(5, n))
    pool = h.make_host_pool("mha", "page_first")
    a = connected(h.attach(h.storage_config(owner), pool))
    assert a.batch_set_v1(keys, h.fill(pool, 5, n)) == [True] * n
    assert published(a, keys) == n
    other = connected(h.attach(h.storage_config(owner, model="test/other"), h.make_host_pool("mha", "page_first")))
    assert other.batch_exists(keys) == 0
    # another layout of the same model stores other bytes: another namespace
    lf = connected(h.attach(h.storage_config(owner), h.make_host_pool("mha", "layer_first")))
    assert lf.namespace != a.namespace and lf.batch_exists(keys) == 0
    # pegaflow.model_id makes two paths of one model one namespace
    same = h.attach(
        h.storage_config(owner, model="/models/elsewhere", **{"pegaflow.model_id": h.MODEL}),
        h.make_host_pool("mha", "page_first"),
    )
    assert same.namespace == a.namespace
    # a vLLM instance of the same model and geometry saves under a vLLM format
    tl = a.layout.tensor_layout
    vllm_ns = pegaflow.namespace_fingerprint(
        model=h.MODEL, dtype="bfloat16|vllm0.32|NHD", kind="split_kv", order="opaque",
        num_layers=h.LAYERS, num_segments=1, piece_bytes=tl.piece_bytes,
        block_tokens=h.PAGE, dtype_size=2, tp_size=1, tp_rank=0,
    )
    assert vllm_ns != a.namespace


def test_a_full_storage_batch_is_saved_whole(owner):
    """SGLang backs up STORAGE_BATCH_SIZE pages per call; the backend waits
    for the owner to refill its stash rather than dropping most of them."""
    n = STORAGE_BATCH_SIZE
    pool = h.make_host_pool("mha", "page_first", device_tokens=n * h.PAGE, ratio=2.5)
    backend = connected(h.attach(h.storage_config(owner), pool))
    keys = h.page_hashes(h.prompt(6, n))
    src = h.fill(pool, 6, n)
    assert backend.batch_set_v1(keys, src) == [True] * n
    assert published(backend, keys) == n
    dst = pool.alloc(n * h.PAGE)
    assert backend.batch_get_v1(keys, dst) == [True] * n
    assert all(h.pages_equal(pool, dst, 6, n))


def test_owner_down_degrades_and_recovers(make_owner):
    o = make_owner(start=False)
    pool = h.make_host_pool("mla", "page_first_direct")
    backend = h.attach(h.storage_config(o, is_mla=True), pool)
    n = 3
    keys = h.page_hashes(h.prompt(8, n))
    src = h.fill(pool, 8, n)
    # nothing raises into SGLang: misses and failed pages
    assert backend.batch_exists(keys) == 0
    assert backend.batch_set_v1(keys, src) == [False] * n
    assert backend.batch_get_v1(keys, pool.alloc(n * h.PAGE)) == [False] * n
    o.start()
    connected(backend)
    assert backend.batch_set_v1(keys, src) == [True] * n
    assert published(backend, keys) == n
    dst = pool.alloc(n * h.PAGE)
    assert backend.batch_get_v1(keys, dst) == [True] * n
    assert h.pages_equal(pool, dst, 8, n) == [True] * n
    # the owner SIGKILLed and restarted: committed pages survive, the backend reconnects
    o.restart()
    connected(backend)
    assert published(backend, keys) == n


def test_malformed_host_indices_copy_nothing(owner):
    pool = h.make_host_pool("mha", "layer_first")
    backend = connected(h.attach(h.storage_config(owner), pool))
    keys = h.page_hashes(h.prompt(9, 2))
    idx = h.fill(pool, 9, 2)
    assert backend.batch_set_v1(keys, idx[1:]) == [False, False]  # wrong length
    assert backend.batch_set_v1(keys, idx + 1) == [False, False]  # not page-aligned
    shuffled = idx.clone()
    shuffled[:2] = shuffled[:2].flip(0)
    assert backend.batch_set_v1(keys, shuffled) == [False, False]  # not whole pages
    beyond = torch.arange(pool.size, pool.size + 2 * h.PAGE)
    assert backend.batch_get_v1(keys, beyond) == [False, False]  # outside the pool
    assert backend.batch_exists(keys) == 0


def test_hybrid_pools_are_refused(owner):
    pool = h.make_host_pool("mha", "page_first")
    backend = h.attach(h.storage_config(owner), pool)
    # HybridCacheController registers every host pool entry, the KV anchor too
    backend.register_mem_host_pool_v2(pool, PoolName.KV)
    with pytest.raises(LayoutError, match="mamba"):
        backend.register_mem_host_pool_v2(h.make_host_pool("mha", "page_first"), PoolName.MAMBA)
