"""One side of a P/D hand-over in its own process, SIGKILLed mid-transfer by
itself (test_pd_kill.py): vLLM's real Scheduler and PegaKVConnector (both
roles, as vllm_harness drives them) against a pegaflow-owner that outlives it.

    python pd_child.py prefill-dies OWNER_NAME OWNER_SOCKET MODEL_DIR
    python pd_child.py decode-dies OWNER_NAME OWNER_SOCKET MODEL_DIR PARAMS_JSON

``prefill-dies``: a kv_producer prefills PROMPT in two chunks; the first
chunk's two blocks are saved and committed; in the second step, once the
last full block's first layer was copied into its reserved pool slot (the
commit not sent), the process kills itself with SIGKILL.
``decode-dies``: a kv_consumer takes the request with the given
kv_transfer_params, pins the prefill's blocks and starts copying them, then
kills itself with SIGKILL before the load is reported done.

Each prints one JSON line (what it did) before dying.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from vllm_harness import BLOCK, _token_plan, make_instance, make_request, step

PROMPT = list(range(300, 300 + 3 * BLOCK + 5))  # 3 full blocks + 5 tokens (as test_pd.py)


class _Owner:
    def __init__(self, name: str, socket: str):
        self.name, self.socket = name, socket


def ready(inst) -> None:
    assert inst.connector.engine.wait_connected(10)
    for w in inst.workers:
        assert w.kv.engine.wait_connected(10)
    time.sleep(0.3)


def die(report: dict) -> None:
    print(json.dumps(report), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def prefill_dies(owner, model_dir: str) -> None:
    p = make_instance(model_dir, owner, role="kv_producer", max_batched=2 * BLOCK)
    ready(p)
    r = make_request("k1", PROMPT, max_tokens=1)
    r.kv_transfer_params = {"do_remote_decode": True, "do_remote_prefill": False}
    p.scheduler.add_request(r)
    first = step(p)  # the first chunk: blocks 0 and 1, saved and committed
    assert first.num_scheduled_tokens["k1"] == 2 * BLOCK
    w, fwd = p.workers[0], p.forwards[0]
    w.kv.poll_saves(wait=True)
    # the second step, by hand up to its first layer's save
    so = p.scheduler.schedule()
    w.bind_connector_metadata(so.kv_connector_metadata)
    w.start_load_kv(None)
    name0 = fwd.names[0]
    for _rid, toks, positions, blocks in _token_plan(p, so):
        for pos in positions:
            fwd.write(0, blocks[pos // BLOCK], pos % BLOCK, toks, pos)
    w.save_kv_layer(name0, fwd.kv[name0], None)
    saves = [(sv.req_id, len(sv.block_ids)) for sv in so.kv_connector_metadata.saves]
    die({"died": "mid-save", "second_step_saves": saves, "pending_saves": w.kv.pending_saves()})


def decode_dies(owner, model_dir: str, params: dict) -> None:
    d = make_instance(model_dir, owner, role="kv_consumer", extra={"pegaflow.load_mode": "async"})
    ready(d)
    r = make_request("k1", PROMPT, max_tokens=3)
    r.kv_transfer_params = params
    d.scheduler.add_request(r)
    for _ in range(200):
        so = d.scheduler.schedule()
        if so.kv_connector_metadata.loads:
            break
        time.sleep(0.01)
    else:
        die({"died": "no load planned"})
    w = d.workers[0]
    w.bind_connector_metadata(so.kv_connector_metadata)
    w.start_load_kv(None)  # the copies start; the load is never reported done
    die({"died": "mid-load", "loads": [len(ld.block_ids) for ld in so.kv_connector_metadata.loads]})


def main() -> None:
    mode, name, socket, model_dir = sys.argv[1:5]
    owner = _Owner(name, socket)
    if mode == "prefill-dies":
        prefill_dies(owner, model_dir)
    elif mode == "decode-dies":
        decode_dies(owner, model_dir, json.loads(sys.argv[5]))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
