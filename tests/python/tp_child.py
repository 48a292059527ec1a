"""One process of test_tp.py, as vLLM runs it with tensor parallelism:

    python tp_child.py scheduler MODEL_DIR SOCKET
    python tp_child.py worker MODEL_DIR SOCKET RANK PORT

``scheduler``: the scheduler-role connector in a process of its own, with no
vLLM config context (vLLM's EngineCore builds its Scheduler that way).
``worker``: a worker-role connector built the way vLLM's Worker builds it:
inside ``set_current_vllm_config``, after vLLM's distributed environment and
TP group are up (gloo on CPU, world size 2). ``parallel_config.rank`` is left
at 0 on purpose: the rank must come from vLLM's TP group. Prints one JSON
line with what the connector computed.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

from vllm.config import set_current_vllm_config
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm_harness import make_kv_cache_config, make_vllm_config

from pegaflow.connector import PegaKVConnector


def main() -> None:
    role, model_dir, sock = sys.argv[1:4]
    owner = SimpleNamespace(name="tp-child", socket=sock)
    vc = make_vllm_config(model_dir, owner, tp=2)
    kcc = make_kv_cache_config(16, tp=2)
    if role == "scheduler":
        c = PegaKVConnector(vc, KVConnectorRole.SCHEDULER, kcc)
        print(json.dumps({"namespaces": c.namespaces}), flush=True)
        return
    rank, port = int(sys.argv[4]), int(sys.argv[5])
    from vllm.distributed.parallel_state import (
        ensure_model_parallel_initialized,
        init_distributed_environment,
    )

    vc.parallel_config.rank = 0
    with set_current_vllm_config(vc):
        init_distributed_environment(
            world_size=2,
            rank=rank,
            distributed_init_method=f"tcp://127.0.0.1:{port}",
            local_rank=rank,
            backend="gloo",
        )
        ensure_model_parallel_initialized(2, 1)
        w = PegaKVConnector(vc, KVConnectorRole.WORKER, kcc)
    hs = w.get_handshake_metadata()
    print(json.dumps({"tp_rank": w.tp_rank, "namespace": w.namespace,
                      "handshake": hs and [hs.tp_rank, hs.namespace, hs.layout]}), flush=True)


if __name__ == "__main__":
    main()
