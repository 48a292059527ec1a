"""One vLLM process of test_cross_process.py: vLLM's real Scheduler and
PegaKVConnector (both roles, as vllm_harness drives them) against a
pegaflow-owner that outlives this process.

    python xproc_child.py save|load OWNER_NAME OWNER_SOCKET MODEL_DIR

``save`` runs the prompts and waits until their blocks are visible; ``load``
runs them in a fresh instance and reports, per prompt, how many tokens came
from PegaFlow and whether that KV is byte-exact. Prints one JSON line.
Uses only the connector's public face, so it runs against any version of
the connector (the old keys included).
"""

from __future__ import annotations

import json
import sys
import time
from types import SimpleNamespace

from vllm.v1.request import RequestStatus
from vllm_harness import BLOCK, make_instance, make_request, run_until_done, step, verify_blocks

PROMPT = list(range(100, 100 + 3 * BLOCK + 8))  # 3 full blocks + 8 tokens
#: name -> (prompt, cache_salt)
CASES = {
    "plain": (PROMPT, None),
    "salted": ([t + 1 for t in PROMPT], "tenant-1"),
}


def wait_ready(inst) -> None:
    assert inst.connector.engine.wait_connected(10)
    for w in inst.workers:
        assert w.kv.engine.wait_connected(10)
    time.sleep(0.3)  # let the owner fill the workers' stashes


def pool_hit_tokens(inst, req_id, prompt, salt) -> int:
    """Tokens the connector would load for this prompt (pins released)."""
    conn = inst.connector
    r = make_request(req_id, prompt, cache_salt=salt)
    n, _ = conn.get_num_new_matched_tokens(r, 0)
    conn.request_finished(r, [])
    return int(n or 0)


def main() -> None:
    role, name, sock, model_dir = sys.argv[1:5]
    cases = dict(CASES)
    if role == "load" and len(sys.argv) > 5:
        # the salted prompt, asked for under another tenant's salt
        cases["other_salt"] = (CASES["salted"][0], sys.argv[5])
    owner = SimpleNamespace(name=name, socket=sock)
    inst = make_instance(model_dir, owner, extra={"pegaflow.reconnect_interval": 0.05})
    wait_ready(inst)
    out: dict = {"vllm_hash0": {}}
    if role == "save":
        for case, (prompt, salt) in cases.items():
            r = make_request(case, prompt, max_tokens=2, cache_salt=salt)
            out["vllm_hash0"][case] = bytes(r.block_hashes[0]).hex()
            inst.scheduler.add_request(r)
            run_until_done(inst, [case])
        # saved means visible to others: wait until this process's own
        # lookups see every block
        deadline = time.monotonic() + 10
        for case, (prompt, salt) in cases.items():
            while pool_hit_tokens(inst, f"probe-{case}", prompt, salt) < 3 * BLOCK:
                assert time.monotonic() < deadline, f"{case}: saved blocks never became visible"
                time.sleep(0.02)
    else:
        out["hit_tokens"] = {}
        out["byte_exact"] = {}
        for case, (prompt, salt) in cases.items():
            r = make_request(case, prompt, max_tokens=2, cache_salt=salt)
            out["vllm_hash0"][case] = bytes(r.block_hashes[0]).hex()
            inst.scheduler.add_request(r)
            so = step(inst)
            if case not in so.num_scheduled_tokens:
                # an async load: the request waits for it a step
                assert r.status == RequestStatus.WAITING_FOR_REMOTE_KVS
                step(inst)  # the load finished; the tail is computed now
            # a layer-wise load happens in the step that computes the tail:
            # either way the first position computed is where the hit ends
            hit = min(inst.computed[case]) if inst.computed.get(case) else 0
            if hit:
                verify_blocks(inst, r, hit)
                out["byte_exact"][case] = True
            out["hit_tokens"][case] = hit
            run_until_done(inst, [case])
        out["stats"] = {k: int(v) for k, v in inst.connector.get_scheduler_stats().items()
                        if isinstance(v, (int, bool))}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
