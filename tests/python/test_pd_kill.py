"""P/D hand-overs whose prefill or decode process is SIGKILLed mid-transfer
(pd_child.py), against one real pegaflow-owner that outlives them: no hang,
no wrong KV, and the other side and the owner keep serving."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pegaflow.connector.keys import request_keys
from test_pd import PROMPT, decode_request, prefill, through_prompt
from test_vllm_scheduler import wait_hits, wait_ready
from vllm_harness import BLOCK, make_instance, make_request, run_until_done, verify_blocks

HERE = Path(__file__).resolve().parent


def run_child(owner, model_dir, mode, *args) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    p = subprocess.run([sys.executable, str(HERE / "pd_child.py"), mode, owner.name, owner.socket, model_dir, *args],
                       env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == -signal.SIGKILL, f"{mode} child did not die by SIGKILL ({p.returncode}):\n{p.stderr[-4000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def pool_blocks(inst) -> int:
    hashes = request_keys(make_request("probe", PROMPT), BLOCK, 3)
    return min(inst.connector.engine.count_hits(ns, hashes) for ns in inst.connector.namespaces)


ANNOUNCED = {"do_remote_prefill": True, "do_remote_decode": False,
             "pegaflow": {"v": 1, "blocks": 3, "tokens": len(PROMPT)}}


def test_prefill_killed_mid_save(tiny_model_dir, owner):
    """The prefill dies while its last block is half copied into the pool
    (on a GPU its answer can precede the commit: the decode has the params).
    The half-written block never becomes visible; the decode waits pd_wait,
    loads the two committed blocks, computes the rest, byte-exact; a new
    prefill then hands the whole prompt over through the same owner."""
    got = run_child(owner, tiny_model_dir, "prefill-dies")
    assert got["died"] == "mid-save" and got["second_step_saves"] == [["k1", 1]], got
    assert got["pending_saves"] == 1, "the child died after its save was committed"
    d = make_instance(tiny_model_dir, owner, role="kv_consumer", extra={"pegaflow.pd_wait": 0.5})
    wait_ready(d)
    wait_hits(d, make_request("probe", PROMPT), 2)
    time.sleep(0.3)
    assert pool_blocks(d) == 2, "a block the dead prefill never committed is visible"

    rd = decode_request("k1", dict(ANNOUNCED))
    d.scheduler.add_request(rd)
    t0 = time.monotonic()
    through_prompt(d, rd)
    assert 0.5 <= time.monotonic() - t0 < 10
    verify_blocks(d, rd, len(PROMPT))
    assert not any(pos < 2 * BLOCK for pos in d.computed["k1"]), "the committed blocks were not loaded"
    assert 2 * BLOCK in d.computed["k1"], "the block the prefill never committed must be computed"
    run_until_done(d, ["k1"])
    assert d.connector.get_scheduler_stats()["pd_wait_timeouts"] == 1

    # the owner serves on: a new prefill, a new decode request, all 3 blocks
    p = make_instance(tiny_model_dir, owner, role="kv_producer")
    wait_ready(p)
    params = prefill(p, "k2")
    assert params["pegaflow"]["blocks"] == 3
    rd2 = decode_request("k2", params)
    d.scheduler.add_request(rd2)
    through_prompt(d, rd2)
    verify_blocks(d, rd2, 3 * BLOCK)
    assert not any(pos < 3 * BLOCK for pos in d.computed["k2"])
    run_until_done(d, ["k2"])


def test_decode_killed_mid_load(tiny_model_dir, owner):
    """The decode dies with the prefill's blocks pinned and its copy under
    way: the owner drops its pins, the prefill's hold still keeps the blocks,
    and another decode instance takes the request again, byte-exact."""
    p = make_instance(tiny_model_dir, owner, role="kv_producer", extra={"pegaflow.pd_hold": 30})
    wait_ready(p)
    params = prefill(p, "k3")
    got = run_child(owner, tiny_model_dir, "decode-dies", json.dumps(params))
    assert got == {"died": "mid-load", "loads": [3]}, got
    d = make_instance(tiny_model_dir, owner, role="kv_consumer")
    wait_ready(d)
    assert pool_blocks(d) == 3
    rd = decode_request("k3", params)
    d.scheduler.add_request(rd)
    through_prompt(d, rd)
    verify_blocks(d, rd, 3 * BLOCK)
    assert not any(pos < 3 * BLOCK for pos in d.computed["k3"])
    run_until_done(d, ["k3"])
    assert p.connector.scheduler_side.pd.held_requests() == ["k3"]
