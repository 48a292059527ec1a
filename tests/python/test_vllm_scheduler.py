"""vLLM's real Scheduler driving PegaKVConnector through whole request
lifetimes, with the worker side on CPU tensors in vLLM's own layout and a
real pegaflow-owner. See vllm_harness.py for what stands in for the model."""

from __future__ import annotations

import time

import pytest

from pegaflow.connector.keys import request_keys
from vllm_harness import (
    BLOCK,
    make_instance,
    make_request,
    run_until_done,
    step,
    verify_blocks,
)
from vllm.v1.request import RequestStatus


def wait_ready(*insts, timeout=5.0):
    for inst in insts:
        assert inst.connector.engine.wait_connected(timeout)
        for w in inst.workers:
            assert w.kv.engine.wait_connected(timeout)
    time.sleep(0.3)  # let the owner fill the workers' stashes


def wait_hits(inst, prompt_req, n_blocks, timeout=5.0):
    conn = inst.connector
    hashes = request_keys(prompt_req, BLOCK, n_blocks)
    deadline = time.monotonic() + timeout
    while min(conn.engine.count_hits(ns, hashes) for ns in conn.namespaces) < n_blocks:
        assert time.monotonic() < deadline, "saved blocks never became visible"
        time.sleep(0.01)


PROMPT = list(range(100, 100 + 3 * BLOCK + 8))  # 3 full blocks + 8 tokens


def run_one(inst, req_id, prompt, max_tokens=3):
    req = make_request(req_id, prompt, max_tokens)
    inst.scheduler.add_request(req)
    steps = 0
    while req_id in inst.scheduler.requests:
        step(inst)
        steps += 1
        assert steps < 100
    return req


def first_schedule(inst, req):
    """Adds `req`, runs the step that schedules it; returns that output."""
    inst.scheduler.add_request(req)
    return step(inst)


@pytest.mark.parametrize("mode", ["layerwise", "async"])
@pytest.mark.parametrize("tp", [1, 2])
def test_miss_then_hit_across_instances(tiny_model_dir, owner, tp, mode):
    a = make_instance(tiny_model_dir, owner, tp=tp)
    # a second vLLM instance
    b = make_instance(tiny_model_dir, owner, tp=tp, extra={"pegaflow.load_mode": mode})
    wait_ready(a, b)
    # miss: A computes everything and saves the 3 full prompt blocks
    ra = run_one(a, "a1", PROMPT)
    assert all(p in a.computed["a1"] for p in range(len(PROMPT)))
    wait_hits(b, make_request("probe", PROMPT), 3)
    # hit: B loads 3 blocks, computes only the tail
    rb = make_request("b1", PROMPT, max_tokens=3)
    so = first_schedule(b, rb)
    if mode == "async":
        # first step: async load only, nothing computed
        assert "b1" not in so.num_scheduled_tokens
        assert rb.status == RequestStatus.WAITING_FOR_REMOTE_KVS or "b1" in b.scheduler.requests
        step(b)  # the load finished; now it runs
    else:
        # layer-wise: loaded and the tail computed in the same step
        assert so.num_scheduled_tokens["b1"] == len(PROMPT) - 3 * BLOCK
        assert so.kv_connector_metadata.loads
    verify_blocks(b, rb, 3 * BLOCK)  # byte-exact KV that B never computed
    assert not any(p < 3 * BLOCK for p in b.computed["b1"]), "B recomputed hit tokens"
    run_until_done(b, ["b1"])
    st = b.connector.get_scheduler_stats()
    assert st["hit_blocks"] >= 3 * len(b.connector.namespaces)


def test_partial_hit(tiny_model_dir, owner):
    a = make_instance(tiny_model_dir, owner)
    wait_ready(a)
    run_one(a, "a1", PROMPT)
    wait_hits(a, make_request("p", PROMPT), 3)
    # shares the first 2 blocks, then diverges
    other = PROMPT[: 2 * BLOCK] + [7] * (2 * BLOCK + 3)
    r = make_request("a2", other, max_tokens=2)
    a.scheduler.add_request(r)
    # prefix caching in vLLM's own GPU cache would also hit; evict it by
    # using a fresh instance for the partial-hit request
    b = make_instance(tiny_model_dir, owner)
    wait_ready(b)
    a.scheduler.finish_requests("a2", RequestStatus.FINISHED_ABORTED)
    r = make_request("b2", other, max_tokens=2)
    first_schedule(b, r)
    step(b)
    verify_blocks(b, r, 2 * BLOCK)
    assert not any(p < 2 * BLOCK for p in b.computed["b2"])
    assert 2 * BLOCK in b.computed["b2"], "the diverging block must be computed"
    run_until_done(b, ["b2"])
    verify_blocks(b, r, 0)


def test_miss_when_nothing_cached(tiny_model_dir, owner):
    a = make_instance(tiny_model_dir, owner)
    wait_ready(a)
    r = make_request("m1", list(range(5000 % 900, 5000 % 900 + 40)))
    so = first_schedule(a, r)
    assert so.num_scheduled_tokens.get("m1") == 40
    assert a.connector.get_scheduler_stats()["hit_blocks"] == 0


def test_repeated_lookup_has_no_side_effects(tiny_model_dir, owner):
    a = make_instance(tiny_model_dir, owner)
    wait_ready(a)
    run_one(a, "a1", PROMPT)
    b = make_instance(tiny_model_dir, owner)
    wait_ready(b)
    wait_hits(b, make_request("p", PROMPT), 3)
    r = make_request("b1", PROMPT)
    conn = b.connector
    first = conn.get_num_new_matched_tokens(r, 0)
    lookups = conn.get_scheduler_stats()["lookups"]
    for _ in range(5):
        assert conn.get_num_new_matched_tokens(r, 0) == first
    assert conn.get_scheduler_stats()["lookups"] == lookups  # pinned once
    assert first == (3 * BLOCK, False)  # layer-wise: loaded in the step that computes the tail
    # vLLM never scheduled it: finishing releases the pins
    assert conn.request_finished(r, []) == (False, None)
    assert not conn.scheduler_side._reqs


def test_abort_while_loading_releases_everything(tiny_model_dir, owner):
    a = make_instance(tiny_model_dir, owner)
    wait_ready(a)
    run_one(a, "a1", PROMPT)
    b = make_instance(tiny_model_dir, owner, extra={"pegaflow.load_mode": "async"})
    wait_ready(b)
    wait_hits(b, make_request("p", PROMPT), 3)
    free0 = b.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    r = make_request("b1", PROMPT)
    b.scheduler.add_request(r)
    so = b.scheduler.schedule()  # allocates blocks, load in flight
    assert r.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    b.scheduler.finish_requests("b1", RequestStatus.FINISHED_ABORTED)
    # the worker still runs the step that was scheduled (the load), then
    # reports it; vLLM frees the blocks only then
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    w = b.workers[0]
    w.bind_connector_metadata(so.kv_connector_metadata)
    w.start_load_kv(None)
    w.wait_for_save()
    send, recv = w.get_finished(set())
    w.clear_connector_metadata()
    assert recv == {"b1"}
    mro = ModelRunnerOutput(
        req_ids=[], req_id_to_index={}, sampled_token_ids=[],
        kv_connector_output=KVConnectorOutput(finished_sending=send, finished_recving=recv),
    )
    b.scheduler.update_from_output(so, mro)
    step(b)
    assert "b1" not in b.scheduler.requests
    assert b.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == free0
    assert not b.connector.scheduler_side._reqs and not b.connector.scheduler_side._loading


def test_request_finishing_while_its_save_is_in_flight(tiny_model_dir, owner):
    a = make_instance(tiny_model_dir, owner)
    wait_ready(a)
    r = make_request("s1", PROMPT, max_tokens=1)
    so = first_schedule(a, r)
    # max_tokens=1: the prompt step is also the last one; its saves were in
    # this step's metadata, so vLLM must keep the blocks until the workers
    # report finished_sending
    assert so.kv_connector_metadata.saves, "the prompt's full blocks are saved"
    assert "s1" in a.scheduler.requests, "blocks freed before the save was confirmed"
    assert r.status == RequestStatus.FINISHED_LENGTH_CAPPED
    held = a.scheduler.kv_cache_manager.get_block_ids("s1")[0]
    assert len(held) >= 3
    step(a)  # the workers report finished_sending: now freed
    assert "s1" not in a.scheduler.requests
    wait_hits(a, r, 3)


def test_preemption_resumes_from_the_pool(tiny_model_dir, owner):
    # 12 blocks (11 usable): two requests growing to 6 blocks each must
    # preempt one; it resumes with its saved blocks loaded from PegaFlow
    # vLLM's own prefix cache off: the resumed request can only get its
    # blocks back from PegaFlow
    a = make_instance(tiny_model_dir, owner, num_blocks=12, max_batched=512, prefix_caching=False)
    wait_ready(a)
    p1 = list(range(10, 10 + 3 * BLOCK))
    p2 = list(range(300, 300 + 3 * BLOCK))
    r1 = make_request("p1", p1, max_tokens=2 * BLOCK + 4)
    r2 = make_request("p2", p2, max_tokens=2 * BLOCK + 4)
    a.scheduler.add_request(r1)
    a.scheduler.add_request(r2)
    preempted = False
    for _ in range(300):
        if "p1" not in a.scheduler.requests and "p2" not in a.scheduler.requests:
            break
        so = step(a)
        if so.preempted_req_ids:
            preempted = True
        # every running request's KV is exactly what its prefix produces,
        # including blocks that came back from the pool after preemption
        for r in (r1, r2):
            if r.request_id in a.scheduler.requests and r.status == RequestStatus.RUNNING:
                verify_blocks(a, r, r.num_computed_tokens)
    assert preempted, "the scenario must preempt"
    assert "p1" not in a.scheduler.requests and "p2" not in a.scheduler.requests
    assert a.connector.get_scheduler_stats()["hit_blocks"] > 0, "resume did not use the pool"


def test_layerwise_pins_outlive_an_abort_until_the_step_is_back(tiny_model_dir, owner):
    """A request aborted while its layer-wise load runs on the GPU: the pins
    stay until that step's output is back (the copy may still read the
    slots), then go; nothing leaks."""
    a = make_instance(tiny_model_dir, owner)
    wait_ready(a)
    run_one(a, "a1", PROMPT)
    b = make_instance(tiny_model_dir, owner)
    wait_ready(b)
    wait_hits(b, make_request("p", PROMPT), 3)
    r = make_request("b1", PROMPT)
    b.scheduler.add_request(r)
    so = b.scheduler.schedule()  # the load is in this step
    assert so.kv_connector_metadata.loads
    side = b.connector.scheduler_side
    st = side._reqs["b1"]
    pins = list(st.pins)
    b.scheduler.finish_requests("b1", RequestStatus.FINISHED_ABORTED)
    assert all(p.held() == 3 for p in pins), "pins released while the step may still copy"
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    w = b.workers[0]
    w.bind_connector_metadata(so.kv_connector_metadata)
    w.start_load_kv(None)
    w.wait_for_save()
    send, recv = w.get_finished(set())
    errors = w.get_block_ids_with_load_errors()
    worker_meta = w.build_connector_worker_meta()
    w.clear_connector_metadata()
    assert not errors
    mro = ModelRunnerOutput(
        req_ids=[], req_id_to_index={}, sampled_token_ids=[],
        kv_connector_output=KVConnectorOutput(
            finished_sending=send, finished_recving=recv, kv_connector_worker_meta=worker_meta
        ),
    )
    b.scheduler.update_from_output(so, mro)
    assert all(p.held() == 0 for p in pins), "pins leaked after the step came back"
    step(b)
    assert "b1" not in b.scheduler.requests
    assert not side._reqs and not side._steps_loading


def test_auto_mode_loads_asynchronously_while_others_decode(tiny_model_dir, owner):
    """pegaflow.load_mode auto (the default): a hit is loaded layer-wise when
    the instance is otherwise idle, asynchronously while other requests run
    (their steps must not wait for the copy)."""
    a = make_instance(tiny_model_dir, owner)
    wait_ready(a)
    run_one(a, "a1", PROMPT)
    b = make_instance(tiny_model_dir, owner)  # auto by default
    wait_ready(b)
    wait_hits(b, make_request("p", PROMPT), 3)
    # idle: layer-wise
    r1 = make_request("b1", PROMPT, max_tokens=2)
    so = first_schedule(b, r1)
    assert so.kv_connector_metadata.loads[0].layerwise
    assert so.num_scheduled_tokens["b1"] == len(PROMPT) - 3 * BLOCK
    verify_blocks(b, r1, 3 * BLOCK)
    run_until_done(b, ["b1"])
    # another request decoding (in a fresh instance: b's own prefix cache
    # now holds the prompt): async
    c = make_instance(tiny_model_dir, owner)
    wait_ready(c)
    c.scheduler.add_request(make_request("dec", [7] * (BLOCK + 3), max_tokens=40))
    step(c)
    step(c)
    assert "dec" in c.scheduler.requests
    r2 = make_request("c2", PROMPT, max_tokens=2)
    so = first_schedule(c, r2)
    assert so.kv_connector_metadata.loads and not so.kv_connector_metadata.loads[0].layerwise
    assert "c2" not in so.num_scheduled_tokens and "dec" in so.num_scheduled_tokens
    step(c)  # the load is done; c2 runs with its tail
    verify_blocks(c, r2, 3 * BLOCK)
    assert not any(p < 3 * BLOCK for p in c.computed["c2"])
    run_until_done(c, ["c2", "dec"])


def test_layerwise_pins_are_released_after_steps_without_a_forward(tiny_model_dir, owner):
    """Steps in which nothing is computed (every request waits for blocks
    staged from SSD or announced by a prefill) come back from vLLM without a
    connector output when the connector had nothing to report, so
    update_connector_output is not called for them. A layer-wise load of a
    later step must still release its pins when its own step is back (seen
    on the H200: pins held for good, the pool filled with pinned blocks and
    every save and stage after failed)."""
    a = make_instance(tiny_model_dir, owner)
    wait_ready(a)
    run_one(a, "a1", PROMPT)
    b = make_instance(tiny_model_dir, owner, extra={"pegaflow.load_mode": "layerwise"})
    wait_ready(b)
    wait_hits(b, make_request("p", PROMPT), 3)
    for _ in range(3):
        step(b)  # nothing scheduled: as while a request waits for staging
    r = make_request("b1", PROMPT, 3)
    so = first_schedule(b, r)
    assert so.kv_connector_metadata.loads and so.kv_connector_metadata.loads[0].layerwise
    side = b.connector.scheduler_side
    run_until_done(b, ["b1"])
    assert b.connector.engine.stats()["hit_blocks"] >= 3
    held = [st for _, entry in side._steps_loading for st in entry]
    assert not held, f"{len(held)} layer-wise loads still hold their pins after their step came back"
