"""Worker side in vLLM's real KV layouts, and the owner going away mid-run."""

from __future__ import annotations

import time

import pytest

from pegaflow.exceptions import LayoutError
from test_vllm_scheduler import PROMPT, first_schedule, run_one, wait_hits, wait_ready
from vllm_harness import (
    BLOCK,
    VLLM_MINOR,
    make_instance,
    make_request,
    run_until_done,
    step,
    verify_blocks,
)

NEW_LAYOUTS = ["LBHNC", "LBNHC", "BLHNC", "BLNHC"]


@pytest.mark.parametrize("layout", NEW_LAYOUTS if VLLM_MINOR >= (0, 30) else ["flash-attn"])
def test_layouts_byte_exact(tiny_model_dir, owner, layout):
    a = make_instance(tiny_model_dir, owner, layout=layout)
    b = make_instance(tiny_model_dir, owner, layout=layout)
    wait_ready(a, b)
    run_one(a, "a1", PROMPT)
    wait_hits(b, make_request("p", PROMPT), 3)
    r = make_request("b1", PROMPT)
    first_schedule(b, r)
    step(b)
    verify_blocks(b, r, 3 * BLOCK)
    assert not any(p < 3 * BLOCK for p in b.computed["b1"])
    run_until_done(b, ["b1"])


def test_unsupported_layout_fails_at_startup(tiny_model_dir, owner):
    # heads outermost ([B, H, N, C] viewed over an [H, B, N, C] buffer, as
    # vLLM 0.3x's LHBNC layout does): a block is 4 separate runs (same bytes
    # per block as the spec; 2 runs would be a valid K/V-like split)
    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from pegaflow.connector import PegaKVConnector
    from vllm_harness import DTYPE, HEAD, KV_HEADS, layer_names, make_kv_cache_config, make_vllm_config

    vc = make_vllm_config(tiny_model_dir, owner)
    kcc = make_kv_cache_config(16)
    w = PegaKVConnector(vc, KVConnectorRole.WORKER, kcc)
    caches = {
        n: torch.zeros(2 * KV_HEADS, 16, BLOCK, HEAD, dtype=DTYPE).permute(1, 0, 2, 3)
        for n in layer_names()
    }
    with pytest.raises(LayoutError, match="unsupported attention layout"):
        w.register_kv_caches(caches)


def test_layouts_do_not_share_a_namespace(tiny_model_dir, owner):
    if VLLM_MINOR < (0, 30):
        pytest.skip("one layout per vLLM 0.2x backend")
    a = make_instance(tiny_model_dir, owner, layout="LBHNC")
    b = make_instance(tiny_model_dir, owner, layout="LBNHC")
    assert a.connector.namespaces != b.connector.namespaces


def test_owner_restart_mid_run(tiny_model_dir, owner):
    a = make_instance(tiny_model_dir, owner, extra={"pegaflow.reconnect_interval": 0.05})
    wait_ready(a)
    run_one(a, "a1", PROMPT)
    wait_hits(a, make_request("p", PROMPT), 3)

    owner.kill()
    deadline = time.monotonic() + 5
    while a.connector.engine.is_connected():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # owner down: a new request simply misses and computes (no exception),
    # its saves are skipped
    p2 = list(range(600, 600 + 3 * BLOCK + 2))
    r2 = run_one(a, "a2", p2)
    assert all(p in a.computed["a2"] for p in range(len(p2)))

    owner.start()
    for e in [a.connector.engine] + [w.kv.engine for w in a.workers]:
        assert e.wait_connected(10), "engines did not reconnect by themselves"
    time.sleep(0.3)
    # blocks committed before the kill are still there: a fresh instance
    # (vLLM restarted too) loads them byte-exact
    b = make_instance(tiny_model_dir, owner)
    wait_ready(b)
    wait_hits(b, make_request("p", PROMPT), 3)
    r = make_request("b1", PROMPT)
    first_schedule(b, r)
    step(b)
    verify_blocks(b, r, 3 * BLOCK)
    run_until_done(b, ["b1"])
    # and the old instance saves again after the reconnect
    p3 = list(range(700, 700 + 2 * BLOCK + 1))
    run_one(a, "a3", p3)
    wait_hits(a, make_request("p3", p3), 2)


@pytest.mark.parametrize("mode", ["layerwise", "async"])
def test_owner_killed_while_a_load_is_in_flight(tiny_model_dir, owner, mode):
    a = make_instance(tiny_model_dir, owner)
    b = make_instance(
        tiny_model_dir, owner,
        extra={"pegaflow.reconnect_interval": 0.05, "pegaflow.load_mode": mode},
    )
    wait_ready(a, b)
    run_one(a, "a1", PROMPT)
    wait_hits(b, make_request("p", PROMPT), 3)
    r = make_request("b1", PROMPT)
    b.scheduler.add_request(r)
    so = b.scheduler.schedule()  # pins taken, load scheduled
    assert so.kv_connector_metadata.loads
    owner.kill()
    for w in b.workers:
        deadline = time.monotonic() + 5
        while w.kv.engine.is_connected():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    # the worker cannot reach the slots: the blocks are reported as failed
    # and vLLM (kv_load_failure_policy=recompute) recomputes them; nothing
    # raises into vLLM
    from vllm_harness import KVConnectorOutput, ModelRunnerOutput

    w = b.workers[0]
    w.bind_connector_metadata(so.kv_connector_metadata)
    w.start_load_kv(None)
    w.wait_for_save()
    send, recv = w.get_finished(set())
    errors = w.get_block_ids_with_load_errors()
    w.clear_connector_metadata()
    assert errors
    assert recv == ({"b1"} if mode == "async" else None)
    mro = ModelRunnerOutput(
        req_ids=[], req_id_to_index={}, sampled_token_ids=[],
        kv_connector_output=KVConnectorOutput(
            finished_sending=send, finished_recving=recv, invalid_block_ids=errors
        ),
    )
    b.scheduler.update_from_output(so, mro)
    run_until_done(b, ["b1"])
    assert all(p in b.computed["b1"] for p in range(len(PROMPT))), "failed blocks recomputed"


@pytest.mark.parametrize("mode", ["layerwise", "async"])
def test_a_discarding_restart_never_loads_another_keys_bytes(tiny_model_dir, owner, mode):
    """Issue 9 item 1 through vLLM: pins taken before an owner restart that
    drops the cache name blocks of the old segment; the worker refuses them
    (the load is reported failed and recomputed), even though the new
    segment holds other keys' blocks at the same slot ids."""
    a = make_instance(tiny_model_dir, owner)
    b = make_instance(
        tiny_model_dir, owner,
        extra={"pegaflow.reconnect_interval": 0.05, "pegaflow.load_mode": mode},
    )
    wait_ready(a, b)
    run_one(a, "a1", PROMPT)
    wait_hits(b, make_request("p", PROMPT), 3)
    r = make_request("b1", PROMPT)
    b.scheduler.add_request(r)
    so = b.scheduler.schedule()  # pins taken, load scheduled
    assert so.kv_connector_metadata.loads
    old_segment = so.kv_connector_metadata.loads[0].segment_id
    owner.restart("--discard-existing")
    for inst in (a, b):
        for w in inst.workers:
            deadline = time.monotonic() + 10
            while not (w.kv.engine.is_connected() and w.kv.engine.stats()["epoch"] >= 1
                       and w.kv.engine.stats()["reconnects"] >= 1):
                assert time.monotonic() < deadline, "worker did not reconnect"
                time.sleep(0.01)
    # Another prompt fills the new segment: slot ids of the old pins now
    # hold other keys' bytes.
    other = [t + 400 for t in PROMPT]
    run_one(a, "a2", other)
    wait_hits(a, make_request("p2", other), 3)
    from vllm_harness import KVConnectorOutput, ModelRunnerOutput

    w = b.workers[0]
    w.bind_connector_metadata(so.kv_connector_metadata)
    w.start_load_kv(None)
    w.wait_for_save()
    send, recv = w.get_finished(set())
    errors = w.get_block_ids_with_load_errors()
    w.clear_connector_metadata()
    assert old_segment != 0
    assert set(so.kv_connector_metadata.loads[0].block_ids) <= errors, "an old pin was loaded"
    mro = ModelRunnerOutput(
        req_ids=[], req_id_to_index={}, sampled_token_ids=[],
        kv_connector_output=KVConnectorOutput(
            finished_sending=send, finished_recving=recv, invalid_block_ids=errors
        ),
    )
    b.scheduler.update_from_output(so, mro)
    run_until_done(b, ["b1"])
    assert all(p in b.computed["b1"] for p in range(len(PROMPT))), "failed blocks recomputed"


def test_steps_vllm_may_replay_as_a_full_cuda_graph_wait_for_their_whole_load(tiny_model_dir, owner):
    """A full CUDA graph replays attention without the connector's per-layer
    hooks (vLLM's KVConnectorBase_V1.requires_piecewise_for_cudagraph): a
    step that may run as one waits for its whole load before the forward.
    Which steps: from vLLM's own cudagraph modes, and the scheduler's
    largest query of the step."""
    from vllm.config.compilation import CUDAGraphMode

    from pegaflow.connector.worker import GraphReplay

    inst = make_instance(tiny_model_dir, owner)
    vc = inst.vllm_config

    def replay(mode, q, spec=0):
        vc.compilation_config.cudagraph_mode = mode
        vc.speculative_config = type("Spec", (), {"num_speculative_tokens": spec})() if spec else None
        try:
            return GraphReplay.from_vllm(vc).may_replay_full(q)
        finally:
            vc.speculative_config = None

    assert not replay(CUDAGraphMode.NONE, 1)
    assert not replay(CUDAGraphMode.PIECEWISE, 1)
    assert replay(CUDAGraphMode.FULL, 1) and replay(CUDAGraphMode.FULL, 500)
    for mode in (CUDAGraphMode.FULL_DECODE_ONLY, CUDAGraphMode.FULL_AND_PIECEWISE):
        assert replay(mode, 1), mode
        assert not replay(mode, 2), mode  # a mixed batch runs piecewise: the hooks run
        assert replay(mode, 3, spec=2), mode  # uniform decode with 2 speculative tokens
    # the scheduler tells the workers each step's largest query
    r = make_request("q1", PROMPT)
    inst.scheduler.add_request(r)
    so = step(inst)
    assert so.kv_connector_metadata.max_query_len == len(PROMPT)
    so = step(inst)
    assert so.kv_connector_metadata.max_query_len == 1
