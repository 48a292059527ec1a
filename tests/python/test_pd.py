"""Prefill/decode roles (pegaflow.connector.pd) through vLLM's real
Scheduler: a kv_producer instance prefills and announces its blocks in
kv_transfer_params, a kv_consumer instance given those params loads them
instead of computing them, with a real pegaflow-owner in between. Failures:
the announced blocks missing (a prefill that died before its saves
committed), the owner down, a decode that never comes (the producer's hold
expires). See vllm_harness.py for what stands in for the model."""

from __future__ import annotations

import time

import pytest

from test_vllm_scheduler import wait_hits, wait_ready
from vllm_harness import BLOCK, make_instance, make_request, run_until_done, step, verify_blocks
from vllm.v1.request import RequestStatus

PROMPT = list(range(300, 300 + 3 * BLOCK + 5))  # 3 full blocks + 5 tokens


def prefill(p, req_id, prompt=PROMPT):
    """The router's prefill hop: the request with max_tokens 1 and
    do_remote_decode; returns what the instance answered."""
    r = make_request(req_id, prompt, max_tokens=1)
    r.kv_transfer_params = {"do_remote_decode": True, "do_remote_prefill": False}
    p.scheduler.add_request(r)
    run_until_done(p, [req_id])
    return p.kv_transfer_params[req_id]


def decode_request(req_id, params, prompt=PROMPT, max_tokens=3):
    r = make_request(req_id, prompt, max_tokens=max_tokens)
    r.kv_transfer_params = params  # as vLLM sets it from the HTTP request
    return r


def through_prompt(inst, req, timeout=10.0):
    """Steps until the request's prompt is computed (it still runs: its KV
    blocks can be checked)."""
    deadline = time.monotonic() + timeout
    while not (req.num_computed_tokens >= req.num_prompt_tokens and req.request_id in inst.computed):
        assert time.monotonic() < deadline, f"{req.request_id}: prompt not computed in {timeout} s"
        step(inst)
        time.sleep(0.001)  # a waiting request's steps are empty: do not spin


def saves_of(so, req_id):
    meta = so.kv_connector_metadata
    return [sv for sv in (meta.saves if meta else []) if sv.req_id == req_id]


@pytest.mark.parametrize("tp,mode", [(1, "auto"), (2, "auto"), (1, "async")])
def test_prefill_announces_decode_loads_and_does_not_save(tiny_model_dir, owner, tp, mode):
    p = make_instance(tiny_model_dir, owner, tp=tp, role="kv_producer")
    d = make_instance(tiny_model_dir, owner, tp=tp, role="kv_consumer", extra={"pegaflow.load_mode": mode})
    wait_ready(p, d)
    params = prefill(p, "r1")
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["pegaflow"] == {"v": 1, "blocks": 3, "tokens": len(PROMPT)}
    # the producer pinned what it announced once its saves committed
    assert p.connector.scheduler_side.pd.held_requests() == ["r1"]

    # the decode instance is busy decoding another request
    bg = make_request("bg", list(range(700, 720)), max_tokens=50)
    d.scheduler.add_request(bg)
    step(d)
    rd = decode_request("r1", params)
    d.scheduler.add_request(rd)
    # (the owner publishes committed blocks a moment after the commit: the
    # decode may wait a step or two for them, computing nothing meanwhile)
    deadline = time.monotonic() + 10
    while True:
        so = step(d)
        if so.kv_connector_metadata.loads:
            break
        assert "r1" not in so.num_scheduled_tokens
        assert time.monotonic() < deadline, "the handed-over blocks never became visible"
        time.sleep(0.005)
    loads = so.kv_connector_metadata.loads
    if mode == "auto":
        # layer-wise even though another request runs: the hand-over and
        # the prompt's last partial block in one step (the fastest first token)
        assert [(ld.req_id, ld.layerwise, len(ld.block_ids)) for ld in loads] == [("r1", True, 3)]
        assert so.num_scheduled_tokens["r1"] == len(PROMPT) - 3 * BLOCK
    else:
        assert [(ld.req_id, ld.layerwise, len(ld.block_ids)) for ld in loads] == [("r1", False, 3)]
        assert "r1" not in so.num_scheduled_tokens
    through_prompt(d, rd)
    verify_blocks(d, rd, 3 * BLOCK)
    run_until_done(d, ["r1"])
    assert not any(pos < 3 * BLOCK for pos in d.computed["r1"]), "the decode recomputed handed-over tokens"
    assert 3 * BLOCK in d.computed["r1"]
    st = d.connector.get_scheduler_stats()
    assert st["hit_blocks"] >= 3 * len(d.connector.namespaces)
    assert st["pd_wait_timeouts"] == 0


def test_decode_kv_is_byte_exact_and_no_saves(tiny_model_dir, owner):
    p = make_instance(tiny_model_dir, owner, role="kv_producer")
    d = make_instance(tiny_model_dir, owner, role="kv_consumer")
    wait_ready(p, d)
    params = prefill(p, "x")
    rd = decode_request("x", params, max_tokens=2 * BLOCK)
    d.scheduler.add_request(rd)
    saves = []
    deadline = time.monotonic() + 10
    while not (rd.num_computed_tokens > len(PROMPT) and "x" in d.computed):
        assert time.monotonic() < deadline, "the prompt was never computed"
        saves += saves_of(step(d), "x")
        time.sleep(0.002)
    assert not any(pos < 3 * BLOCK for pos in d.computed["x"])
    verify_blocks(d, rd, 3 * BLOCK)  # KV the decode never computed, byte for byte
    while "x" in d.scheduler.requests:
        saves += saves_of(step(d), "x")
    assert saves == [], "a consumer must not save a handed-over request's blocks"


def test_decode_waits_for_blocks_still_being_saved(tiny_model_dir, owner):
    d = make_instance(tiny_model_dir, owner, role="kv_consumer", extra={"pegaflow.pd_wait": 30})
    p = make_instance(tiny_model_dir, owner, role="kv_producer")
    wait_ready(p, d)
    # The router sends the decode hop only after the prefill answered, but
    # the prefill's saves may commit after its answer: the decode has the
    # params before the pool has the blocks.
    ann = {"do_remote_prefill": True, "do_remote_decode": False,
           "pegaflow": {"v": 1, "blocks": 3, "tokens": len(PROMPT)}}
    rd = decode_request("w1", ann)
    d.scheduler.add_request(rd)
    for _ in range(3):
        so = step(d)
        assert "w1" not in so.num_scheduled_tokens, "the decode computed what its prefill is saving"
        assert rd.status == RequestStatus.WAITING
    prefill(p, "w1")
    wait_hits(d, make_request("probe", PROMPT), 3)
    through_prompt(d, rd)
    verify_blocks(d, rd, 3 * BLOCK)
    run_until_done(d, ["w1"])
    assert not any(pos < 3 * BLOCK for pos in d.computed["w1"])
    assert d.connector.get_scheduler_stats()["pd_waits"] == 1


def test_missing_blocks_are_computed_after_pd_wait(tiny_model_dir, owner):
    """A prefill that died after answering, before its last saves committed:
    the decode waits pd_wait, loads what the pool has and computes the rest."""
    p = make_instance(tiny_model_dir, owner, role="kv_producer")
    d = make_instance(tiny_model_dir, owner, role="kv_consumer", extra={"pegaflow.pd_wait": 0.3})
    wait_ready(p, d)
    # only the first 2 blocks made it into the pool
    prefill(p, "part", PROMPT[: 2 * BLOCK + 1])
    wait_hits(d, make_request("probe", PROMPT), 2)
    ann = {"do_remote_prefill": True, "do_remote_decode": False,
           "pegaflow": {"v": 1, "blocks": 3, "tokens": len(PROMPT)}}
    rd = decode_request("m1", ann)
    d.scheduler.add_request(rd)
    t0 = time.monotonic()
    so = step(d)
    assert "m1" not in so.num_scheduled_tokens
    while "m1" not in so.num_scheduled_tokens and not so.kv_connector_metadata.loads:
        assert time.monotonic() - t0 < 5, "the decode waited past pd_wait"
        so = step(d)
    assert time.monotonic() - t0 >= 0.3, "the decode did not wait for the announced blocks"
    through_prompt(d, rd)
    assert time.monotonic() - t0 < 5
    verify_blocks(d, rd, len(PROMPT))
    run_until_done(d, ["m1"])
    assert not any(pos < 2 * BLOCK for pos in d.computed["m1"]), "the 2 blocks present were not loaded"
    assert 2 * BLOCK in d.computed["m1"], "the missing block must be computed"
    assert d.connector.get_scheduler_stats()["pd_wait_timeouts"] == 1


def test_owner_down_decode_computes_at_once(tiny_model_dir, owner):
    p = make_instance(tiny_model_dir, owner, role="kv_producer")
    d = make_instance(tiny_model_dir, owner, role="kv_consumer", extra={"pegaflow.pd_wait": 60})
    wait_ready(p, d)
    params = prefill(p, "o1")
    owner.kill()
    deadline = time.monotonic() + 10
    while d.connector.engine.is_connected():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    rd = decode_request("o1", params)
    d.scheduler.add_request(rd)
    so = step(d)
    # no wait for an owner that is gone: the whole prompt is computed now
    assert so.num_scheduled_tokens["o1"] == len(PROMPT)
    through_prompt(d, rd)
    verify_blocks(d, rd, len(PROMPT))
    run_until_done(d, ["o1"])


def test_producer_hold_expires_when_no_decode_comes(tiny_model_dir, owner):
    p = make_instance(tiny_model_dir, owner, role="kv_producer", extra={"pegaflow.pd_hold": 2})
    wait_ready(p)
    prefill(p, "h1")
    pd = p.connector.scheduler_side.pd
    (held,) = pd._held.values()
    while not held.complete():  # committed blocks show in the owner's index a moment later
        assert time.monotonic() < held.deadline, "the announced blocks were never all pinned"
        step(p)
        time.sleep(0.002)
    assert all(pins.held() == 3 for pins in held.pins)
    time.sleep(max(0.0, held.deadline - time.monotonic()) + 0.05)
    step(p)  # the scheduler's next call releases it
    assert pd.held_requests() == []
    assert all(pins.held() == 0 for pins in held.pins)
    assert p.connector.get_scheduler_stats()["pd_hold_expired"] == 1


def test_plain_requests_unchanged_on_both_roles(tiny_model_dir, owner):
    """No kv_transfer_params: a producer announces nothing, a consumer does
    not wait and loads as a kv_both instance would."""
    p = make_instance(tiny_model_dir, owner, role="kv_producer")
    d = make_instance(tiny_model_dir, owner, role="kv_consumer")
    wait_ready(p, d)
    r = make_request("n1", PROMPT, max_tokens=1)
    p.scheduler.add_request(r)
    run_until_done(p, ["n1"])
    assert "n1" not in p.kv_transfer_params
    assert p.connector.scheduler_side.pd.held_requests() == []
    wait_hits(d, make_request("probe", PROMPT), 3)
    rd = make_request("n2", PROMPT, max_tokens=2)
    d.scheduler.add_request(rd)
    so = step(d)
    assert so.num_scheduled_tokens["n2"] == len(PROMPT) - 3 * BLOCK  # layer-wise, as before
    through_prompt(d, rd)
    verify_blocks(d, rd, 3 * BLOCK)
    run_until_done(d, ["n2"])


def test_params_of_another_prompt_do_not_make_a_decode_wait(tiny_model_dir, owner):
    d = make_instance(tiny_model_dir, owner, role="kv_consumer", extra={"pegaflow.pd_wait": 60})
    wait_ready(d)
    ann = {"do_remote_prefill": True, "pegaflow": {"v": 1, "blocks": 3, "tokens": len(PROMPT) + 1}}
    rd = decode_request("z1", ann)
    d.scheduler.add_request(rd)
    so = step(d)
    assert so.num_scheduled_tokens["z1"] == len(PROMPT)
    run_until_done(d, ["z1"])


def test_pd_config_keys():
    from pegaflow.config import PegaflowConfig
    from pegaflow.exceptions import ConfigError

    c = PegaflowConfig.from_extra_config({"pegaflow.pd_wait": "2.5", "pegaflow.pd_hold": 0})
    assert (c.pd_wait, c.pd_hold) == (2.5, 0.0)
    for bad in ({"pegaflow.pd_wait": "soon"}, {"pegaflow.pd_hold": -1}):
        with pytest.raises(ConfigError, match="pegaflow.pd_"):
            PegaflowConfig.from_extra_config(bad)


def test_prefill_with_a_pool_hit_announces_blocks_it_did_not_save(tiny_model_dir, owner):
    """Prefix hits come from the pool on the prefill side too: a second
    prefill of a prompt already in the pool loads it instead of computing
    it, and still announces (and pins) all its blocks for the decode."""
    p1 = make_instance(tiny_model_dir, owner, role="kv_producer")
    p2 = make_instance(tiny_model_dir, owner, role="kv_producer")
    d = make_instance(tiny_model_dir, owner, role="kv_consumer")
    wait_ready(p1, p2, d)
    prefill(p1, "first")
    wait_hits(p2, make_request("probe", PROMPT), 3)
    params = prefill(p2, "again")
    assert not any(pos < 3 * BLOCK for pos in p2.computed["again"]), "the prefill recomputed a pool hit"
    assert params["pegaflow"]["blocks"] == 3
    held = p2.connector.scheduler_side.pd._held["again"]
    assert all(pins.held() == 3 for pins in held.pins)
    rd = decode_request("again", params)
    d.scheduler.add_request(rd)
    through_prompt(d, rd)
    verify_blocks(d, rd, 3 * BLOCK)
    assert not any(pos < 3 * BLOCK for pos in d.computed["again"])
    run_until_done(d, ["again"])


def test_a_hold_that_never_completes_says_why_and_what_to_do(tiny_model_dir, owner):
    """Announced blocks that never show in the pool (refused by a full
    pool's TinyLFU admission, the usual cause; here: two keys that were
    never saved) make the decode recompute. The producer
    says so once, with the fix, instead of leaving the slow TTFT
    unexplained."""
    import logging

    p = make_instance(tiny_model_dir, owner, role="kv_producer", extra={"pegaflow.pd_hold": 0.5})
    wait_ready(p)
    pd = p.connector.scheduler_side.pd
    records: list[logging.LogRecord] = []
    handler = type("H", (logging.Handler,), {"emit": lambda self, r: records.append(r)})()
    from pegaflow.connector import pd as pd_module

    log = pd_module.logger
    log.addHandler(handler)
    try:
        params = prefill(p, "h1")
        assert params["pegaflow"]["blocks"] == 3
        (held,) = pd._held.values()
        # Two blocks it announced never reach the pool (as when the owner
        # refuses or loses them): the producer can pin only 3 of 5.
        held.hashes.extend([b"\x01" * 32, b"\x02" * 32])
        deadline = held.deadline + 1.0
        while pd.held_requests():
            assert time.monotonic() < deadline, "the hold never ended"
            step(p)
            time.sleep(0.01)
        for i in range(2, 4):
            pd._incomplete(f"h{i}", held)  # the next ones are counted, not logged again
    finally:
        log.removeHandler(handler)
    warned = [r.getMessage() for r in records if "P/D" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "--disable-lfu-admission" in warned[0] and "h1" in warned[0], warned[0]
    assert p.connector.get_scheduler_stats()["pd_hold_incomplete"] == 3
