"""The direct P/D hand-over's protocol (pegaflow.connector.direct, the hold
table of pegaflow_shm::handover) on CPU: a prefill lends its finished
prompt's blocks through a real shared-memory table, vLLM's real scheduler
keeps them allocated until every decode rank is done or the hold expires,
and a decode borrows only a hold whose key is its own prompt's.

The GPU copy itself (CUDA IPC between two instances) runs on the H200s
(scripts/gpu-pd.sh). Here the prefill's workers are CPU workers, which
cannot export their memory, so the tests hand the scheduler the handshake
a GPU worker sends (its peer key); a CPU decode worker then cannot copy
either, and vLLM recomputes the blocks (the failure path, checked too)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest
from vllm.v1.request import RequestStatus

from pegaflow import _native
from pegaflow.connector.direct import tail_key
from pegaflow.connector.keys import request_keys
from pegaflow.exceptions import PegaflowError
from test_pd import PROMPT, decode_request, through_prompt
from test_vllm_scheduler import wait_hits, wait_ready
from vllm_harness import BLOCK, make_instance, make_request, run_until_done, step, verify_blocks


def lending_instance(model_dir, owner, tp=1, **kw):
    """A kv_producer whose workers said they exported their caches (as GPU
    workers do), so its scheduler lends."""
    p = make_instance(model_dir, owner, tp=tp, role="kv_producer", handshake=False, **kw)
    hs = {
        (0, r): dataclasses.replace(w.get_handshake_metadata(), peer_key=f"pd/test{os.getpid()}/{r}")
        for r, w in enumerate(p.workers)
    }
    p.scheduler.connector.set_xfer_handshake_metadata_pp_aware(hs)
    assert p.connector.scheduler_side.lender.table is not None
    return p


def prefill(p, req_id, prompt=PROMPT):
    """The router's prefill hop; returns the answer's kv_transfer_params
    (the request itself stays while its blocks are lent)."""
    r = make_request(req_id, prompt, max_tokens=1)
    r.kv_transfer_params = {"do_remote_decode": True, "do_remote_prefill": False}
    p.scheduler.add_request(r)
    for _ in range(50):
        if req_id in p.kv_transfer_params:
            return p.kv_transfer_params[req_id]
        step(p)
    raise AssertionError(f"{req_id}: no answer after 50 steps")


def lent_key(prompt=PROMPT):
    """The key a prefill lends PROMPT under: 3 full blocks and its 5-token
    tail (the partial block is lent too)."""
    return tail_key(request_keys(make_request("k", prompt), BLOCK, 3)[2], prompt[3 * BLOCK :])


def lent(params):
    d = params["pegaflow"].get("direct")
    assert d is not None, f"nothing lent: {params}"
    return d


def table_of(d):
    return _native.HoldTable.open(d["table"])


def free_blocks(inst) -> int:
    return inst.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def steps_until(inst, cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition never held"
        step(inst)
        time.sleep(0.002)


@pytest.mark.parametrize("tp", [1, 2])
def test_lent_blocks_stay_allocated_until_every_decode_rank_is_done(tiny_model_dir, owner, tp):
    p = lending_instance(tiny_model_dir, owner, tp=tp)
    wait_ready(p)
    before = free_blocks(p)
    params = prefill(p, "r1")
    d = lent(params)
    t = table_of(d)
    assert t.ranks == tp and t.namespaces == p.connector.namespaces
    n, key = t.peek(d["slot"], d["ticket"])
    assert n == 4 and key == lent_key(), "3 full blocks and the partial one"
    for _ in range(5):
        step(p)
    assert "r1" in p.scheduler.requests, "vLLM freed blocks a decode may still copy"
    assert free_blocks(p) < before
    for r in range(tp):
        got = t.take(d["slot"], d["ticket"], r)  # what each decode worker does
        assert got is not None and len(got[1]) == 4
        for _ in range(3):
            step(p)
        if r < tp - 1:
            assert "r1" in p.scheduler.requests, "released before every rank was done"
        assert t.done(d["slot"], d["ticket"], r)
    steps_until(p, lambda: "r1" not in p.scheduler.requests)
    assert free_blocks(p) == before
    assert t.word(d["slot"], 0)[0] == "free"
    st = p.connector.get_scheduler_stats()
    assert st["pd_direct_lent"] == 1 and st["pd_direct_copied"] == 1 and st["pd_direct_expired"] == 0


def test_a_hold_no_decode_takes_expires_and_the_blocks_come_back(tiny_model_dir, owner):
    p = lending_instance(tiny_model_dir, owner, extra={"pegaflow.pd_hold": 0.5})
    wait_ready(p)
    before = free_blocks(p)
    t0 = time.monotonic()
    d = lent(prefill(p, "e1"))
    steps_until(p, lambda: "e1" not in p.scheduler.requests)
    assert time.monotonic() - t0 >= 0.5
    assert free_blocks(p) == before
    t = table_of(d)
    assert t.take(d["slot"], d["ticket"], 0) is None, "an expired hold was handed out"
    assert p.connector.get_scheduler_stats()["pd_direct_expired"] == 1


def test_a_taken_hold_outlives_its_deadline_until_the_taker_dies(tiny_model_dir, owner):
    """A decode worker SIGKILLed mid-copy: the prefill keeps the blocks while
    the taker lives (its copy may still read them), frees them once it is gone."""
    p = lending_instance(tiny_model_dir, owner, extra={"pegaflow.pd_hold": 0.3})
    wait_ready(p)
    d = lent(prefill(p, "k1"))
    code = (
        "import sys, time\n"
        "from pegaflow import _native\n"
        f"t = _native.HoldTable.open({d['table']!r})\n"
        f"assert t.take({d['slot']}, {d['ticket']}, 0) is not None\n"
        "print('taken', flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "taken"
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:
            step(p)
            time.sleep(0.01)
        assert "k1" in p.scheduler.requests, "blocks freed under a live taker's copy"
        assert table_of(d).word(d["slot"], 0)[:2] == ("taken", d["ticket"])
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    steps_until(p, lambda: "k1" not in p.scheduler.requests)
    assert p.connector.get_scheduler_stats()["pd_direct_expired"] == 1


def test_decode_borrows_only_its_own_prompt_and_recomputes_what_it_cannot_copy(tiny_model_dir, owner):
    p = lending_instance(tiny_model_dir, owner)
    dec = make_instance(tiny_model_dir, owner, role="kv_consumer", extra={"pegaflow.pd_wait": 0.2})
    wait_ready(p, dec)
    params = prefill(p, "b1")
    d = lent(params)
    # A client replays the params with another prompt of the same length:
    # the key differs, nothing is borrowed (the pool path finds nothing either).
    other = [t + 1 for t in PROMPT]
    rx = decode_request("bx", params, prompt=other)
    dec.scheduler.add_request(rx)
    so = step(dec)
    assert not [ld for ld in so.kv_connector_metadata.loads if ld.direct is not None]
    assert table_of(d).word(d["slot"], 0)[0] == "held"
    steps_until(dec, lambda: "bx" not in dec.scheduler.requests)

    rd = decode_request("b1", params)
    dec.scheduler.add_request(rd)
    so = step(dec)
    (ld,) = so.kv_connector_metadata.loads
    assert ld.direct is not None and ld.layerwise and len(ld.block_ids) == 4
    assert ld.direct.key == lent_key() and ld.direct.first == 0
    # the whole prompt but its last token, which vLLM must compute
    assert so.num_scheduled_tokens["b1"] == 1
    # A CPU worker cannot copy from a GPU: the blocks are load errors and
    # vLLM recomputes them; the tokens' KV is right either way.
    through_prompt(dec, rd)
    verify_blocks(dec, rd, len(PROMPT))
    run_until_done(dec, ["b1"])
    assert 0 in dec.computed["b1"], "a block nobody copied was not recomputed"
    assert dec.connector.get_scheduler_stats()["pd_direct_borrowed"] == 1


def test_a_decode_that_will_not_copy_gives_the_hold_back_at_once(tiny_model_dir, owner):
    p = lending_instance(tiny_model_dir, owner, extra={"pegaflow.pd_hold": 60})
    dec = make_instance(tiny_model_dir, owner, role="kv_consumer")
    wait_ready(p, dec)
    params = prefill(p, "g1")
    d = lent(params)
    rd = decode_request("g1", params)
    # vLLM asks, then the request is aborted before its blocks are allocated
    dec.connector.get_num_new_matched_tokens(rd, 0)
    dec.connector.request_finished(rd, [])
    assert table_of(d).word(d["slot"], 0)[0] == "done"
    steps_until(p, lambda: "g1" not in p.scheduler.requests, timeout=5)


def test_a_decode_of_another_model_layout_refuses_the_table(tiny_model_dir, owner):
    p = lending_instance(tiny_model_dir, owner)
    dec = make_instance(tiny_model_dir, owner, role="kv_consumer", tp=2)
    wait_ready(p, dec)
    params = prefill(p, "n1")
    rd = decode_request("n1", params)
    dec.scheduler.add_request(rd)
    so = step(dec)
    assert not [ld for ld in so.kv_connector_metadata.loads if ld.direct is not None]
    assert lent(params)["table"] in dec.connector.scheduler_side.borrower._refused


def test_hold_table_refuses_bad_names_garbage_and_a_second_producer(tmp_path):
    name = "pegaflow-pd-" + "ab" * 16
    spec = dict(capacity=2, max_blocks=4, namespaces=[5], peer_keys=["pd/x/0"], dir=str(tmp_path))
    t = _native.HoldTable.create(name, **spec)
    with pytest.raises(PegaflowError, match="live process"):
        _native.HoldTable.create(name, **spec)
    for bad in ("../../etc/passwd", "pegaflow-pd-xyz", "pool"):
        with pytest.raises(PegaflowError, match="not one PegaFlow makes"):
            _native.HoldTable.open(bad, dir=str(tmp_path))
    with pytest.raises(PegaflowError, match="out of range"):
        t.hold(7, 1, b"k" * 32, [1])
    with pytest.raises(PegaflowError, match="do not fit"):
        t.hold(0, 1, b"k" * 32, [1] * 5)
    with pytest.raises(PegaflowError, match="32 bytes"):
        t.hold(0, 1, b"short", [1])
    (tmp_path / ("pegaflow-pd-" + "cd" * 16)).write_bytes(b"\xff" * 4096)
    with pytest.raises(PegaflowError, match="not usable"):
        _native.HoldTable.open("pegaflow-pd-" + "cd" * 16, dir=str(tmp_path))


def test_a_decode_continuing_after_the_prefills_token_borrows_too(tiny_model_dir, owner):
    """pegaflow-router sends the decode the prompt plus the prefill's token
    (pegaflow.router.first_token): the same lent blocks, one token more."""
    p = lending_instance(tiny_model_dir, owner)
    dec = make_instance(tiny_model_dir, owner, role="kv_consumer")
    wait_ready(p, dec)
    params = prefill(p, "c1")
    rd = decode_request("c1", params, prompt=PROMPT + [777])
    dec.scheduler.add_request(rd)
    so = step(dec)
    (ld,) = so.kv_connector_metadata.loads
    assert ld.direct is not None and len(ld.block_ids) == 4
    # the prompt's KV all copied: only the prefill's token is computed (a decode step)
    assert so.num_scheduled_tokens["c1"] == 1
    # two tokens more is another prompt: nothing borrowed
    r2 = decode_request("c2", prefill(p, "c2x"), prompt=PROMPT + [777, 778])
    dec.scheduler.add_request(r2)
    so = step(dec)
    assert not [x for x in so.kv_connector_metadata.loads if x.req_id == "c2" and x.direct is not None]


def test_the_block_the_prefills_token_fills_is_saved_by_a_kv_both_decode(tiny_model_dir, owner):
    """A prompt one token short of whole blocks: the prefill lends its
    partial last block, the prefill's token fills it on the decode. That
    block is in no pool yet: a decode that saves (kv_both) saves it."""
    p = lending_instance(tiny_model_dir, owner)
    dec = make_instance(tiny_model_dir, owner, role="kv_both")
    wait_ready(p, dec)
    prompt = list(range(40, 40 + 4 * BLOCK - 1))
    params = prefill(p, "w1", prompt)
    d = lent(params)
    assert table_of(d).peek(d["slot"], d["ticket"])[0] == 4, "3 full blocks and the partial one"
    whole = prompt + [777]
    rd = decode_request("w1", params, prompt=whole)
    dec.scheduler.add_request(rd)
    so = step(dec)
    (ld,) = so.kv_connector_metadata.loads
    assert ld.direct is not None and len(ld.block_ids) == 4
    through_prompt(dec, rd)
    run_until_done(dec, ["w1"])
    wait_hits(dec, make_request("probe-w1", whole), 4)


def test_a_salted_request_is_lent_and_borrowed_under_its_salted_keys(tiny_model_dir, owner):
    """Keys carry a request's cache salt (LoRA, multimodal inputs): the hold's
    key is the salted one and only a decode with the same salt borrows it."""
    p = lending_instance(tiny_model_dir, owner)
    dec = make_instance(tiny_model_dir, owner, role="kv_consumer")
    wait_ready(p, dec)
    r = make_request("s1", PROMPT, max_tokens=1, cache_salt="salt")
    r.kv_transfer_params = {"do_remote_decode": True, "do_remote_prefill": False}
    p.scheduler.add_request(r)
    while "s1" not in p.kv_transfer_params:
        step(p)
    d = lent(p.kv_transfer_params["s1"])
    n, key = table_of(d).peek(d["slot"], d["ticket"])
    assert n == 3 and key == request_keys(make_request("k", PROMPT, cache_salt="salt"), BLOCK, 3)[2]
    unsalted = decode_request("s0", p.kv_transfer_params["s1"], prompt=PROMPT + [777])
    dec.scheduler.add_request(unsalted)
    so = step(dec)
    assert not [ld for ld in so.kv_connector_metadata.loads if ld.direct is not None], "another salt's KV"
    dec.scheduler.finish_requests(["s0"], RequestStatus.FINISHED_ABORTED)
    rd = make_request("s1", PROMPT + [777], max_tokens=2, cache_salt="salt")
    rd.kv_transfer_params = p.kv_transfer_params["s1"]
    dec.scheduler.add_request(rd)
    so = step(dec)
    (ld,) = so.kv_connector_metadata.loads
    assert ld.direct is not None and len(ld.block_ids) == 3
    assert so.num_scheduled_tokens["s1"] == len(PROMPT) + 1 - 3 * BLOCK


def test_a_preempted_decode_resumes_from_the_pool_not_from_a_hold_it_gave_back(tiny_model_dir, owner):
    """A decode request whose direct load is over and which vLLM preempts
    later asks for its prompt again: the hold is gone (given back), so it
    loads the prompt from the pool (the prefill saved it there), instead of
    claiming the hold again and failing its load."""
    p = lending_instance(tiny_model_dir, owner)
    # 12 blocks (11 usable): two requests growing to 6 blocks each must
    # preempt one; vLLM's own prefix cache off
    dec = make_instance(tiny_model_dir, owner, role="kv_consumer", num_blocks=12, max_batched=512,
                        prefix_caching=False)
    wait_ready(p, dec)
    prompts = {"q1": list(range(10, 10 + 3 * BLOCK)), "q2": list(range(300, 300 + 3 * BLOCK))}
    reqs, holds = {}, {}
    for rid, prompt in prompts.items():
        params = prefill(p, rid, prompt)
        holds[rid] = lent(params)
        reqs[rid] = decode_request(rid, params, prompt=prompt, max_tokens=2 * BLOCK + 4)
    # the pool has the prompts (the prefill saved them) before the decodes run
    for rid, prompt in prompts.items():
        wait_hits(dec, make_request("probe-" + rid, prompt), 3)
    for r in reqs.values():
        dec.scheduler.add_request(r)
    loads: dict[str, list[bool]] = {rid: [] for rid in reqs}
    preempted = set()
    for _ in range(300):
        if not any(rid in dec.scheduler.requests for rid in reqs):
            break
        so = step(dec)
        preempted |= set(so.preempted_req_ids or ())
        for ld in so.kv_connector_metadata.loads:
            loads[ld.req_id].append(ld.direct is not None)
            if ld.direct is not None:
                # what a GPU worker does with the hold (a CPU one cannot
                # copy: vLLM recomputes the blocks): take it, copy, give it back
                d = holds[ld.req_id]
                t = table_of(d)
                if t.take(d["slot"], d["ticket"], 0) is not None:
                    t.done(d["slot"], d["ticket"], 0)
        for r in reqs.values():
            if r.request_id in dec.scheduler.requests and r.status == RequestStatus.RUNNING:
                verify_blocks(dec, r, r.num_computed_tokens)
    assert preempted, "the scenario must preempt"
    for rid in preempted:
        assert loads[rid][0] is True, f"{rid}: first load not from the prefill's GPU: {loads[rid]}"
        assert False in loads[rid][1:], f"{rid}: resumed without a pool load: {loads[rid]}"
        assert loads[rid].count(True) == 1, f"{rid}: claimed the given-back hold again: {loads[rid]}"


def test_a_forged_tail_is_not_borrowed(tiny_model_dir, owner):
    """Same full blocks, another tail: the lent partial block is another
    prompt's, nothing is copied."""
    p = lending_instance(tiny_model_dir, owner)
    dec = make_instance(tiny_model_dir, owner, role="kv_consumer", extra={"pegaflow.pd_wait": 0.1})
    wait_ready(p, dec)
    params = prefill(p, "f1")
    other = PROMPT[:-1] + [PROMPT[-1] + 1]
    rd = decode_request("f1", params, prompt=other)
    dec.scheduler.add_request(rd)
    so = step(dec)
    assert not [ld for ld in so.kv_connector_metadata.loads if ld.direct is not None]
    assert dec.connector.get_scheduler_stats()["pd_direct_missed"] >= 1


def test_a_decode_sees_whether_the_process_that_exported_a_cache_runs():
    """With TP > 1 each rank's KV cache is its worker process's, not the
    scheduler's that made the hold table: the peer key names the exporting
    process (pid and start time), and a decode copies only while it runs."""
    from pegaflow.connector.direct import exporter_alive, peer_key

    key = peer_key(3)
    assert len(key.encode()) < 64, "the hold table keeps keys under 64 bytes"
    assert key.split("/")[2] == "3" and exporter_alive(key)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = _native.process_start_time(child.pid)
        theirs = f"pd/{'ab' * 12}/0/{child.pid}-{start}"
        assert exporter_alive(theirs)
        # the same pid started at another time: a later process reusing it
        assert not exporter_alive(f"pd/{'ab' * 12}/0/{child.pid}-{start + 1}")
        child.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while exporter_alive(theirs):  # a zombie (not reaped yet) is not alive
            assert time.monotonic() < deadline, "a SIGKILLed exporter still counts as alive"
            time.sleep(0.01)
    finally:
        child.kill()
        child.wait()
    assert not exporter_alive(theirs)
    # a key naming no process (an older PegaFlow's): the table's creator decides
    assert exporter_alive(f"pd/{'ab' * 16}/0")
