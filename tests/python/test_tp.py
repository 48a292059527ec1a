"""Tensor parallelism: each worker saves under its own rank's namespace, and
the scheduler looks blocks up under exactly those namespaces, also when the
scheduler and the workers are separate processes (as in vLLM with TP > 1)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from pegaflow.connector import PegaKVConnector
from pegaflow.exceptions import ConfigError
from test_vllm_scheduler import PROMPT, run_one, wait_hits, wait_ready
from vllm_harness import (
    BLOCK,
    VLLM_MINOR,
    make_instance,
    make_kv_cache_config,
    make_request,
    make_vllm_config,
)

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return env


def _result(p: subprocess.Popen, what: str) -> dict:
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, f"{what} failed:\n{err[-4000:]}"
    return json.loads(out.strip().splitlines()[-1])


def test_scheduler_and_workers_agree_in_separate_processes(tiny_model_dir, tmp_path):
    # The TP=2 failure seen in a real vLLM 0.25: the workers saved, the
    # scheduler never found anything, because its process computed another
    # namespace (vLLM 0.25's KV layout switch answers differently outside a
    # worker). Here each role runs in its own process, as vLLM runs them.
    sock = str(tmp_path / "none.sock")  # no owner needed to compute namespaces
    port = _free_port()
    cmd = [sys.executable, str(HERE / "tp_child.py")]
    workers = [
        subprocess.Popen(cmd + ["worker", tiny_model_dir, sock, str(r), str(port)],
                         env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    sched = subprocess.run(cmd + ["scheduler", tiny_model_dir, sock], env=_env(),
                           capture_output=True, text=True, timeout=180)
    assert sched.returncode == 0, sched.stderr[-4000:]
    s = json.loads(sched.stdout.strip().splitlines()[-1])
    w = [_result(p, f"worker {r}") for r, p in enumerate(workers)]
    # the rank comes from vLLM's TP group (parallel_config.rank was 0 in both)
    assert [x["tp_rank"] for x in w] == [0, 1]
    assert w[0]["namespace"] != w[1]["namespace"]
    assert [x["namespace"] for x in w] == s["namespaces"], (s, w)
    assert [x["handshake"][:2] for x in w] == [[0, w[0]["namespace"]], [1, w[1]["namespace"]]]


def _workers(model_dir, owner, ranks):
    vc = make_vllm_config(model_dir, owner, tp=2)
    kcc = make_kv_cache_config(16, tp=2)
    out = []
    for r in ranks:
        vc.parallel_config.rank = r
        out.append(PegaKVConnector(vc, KVConnectorRole.WORKER, kcc))
    return vc, kcc, out


def test_handshake_rejects_a_wrong_or_missing_rank(tiny_model_dir, owner):
    vc, kcc, (w0, w1) = _workers(tiny_model_dir, owner, [0, 0])  # both think rank 0
    sched = PegaKVConnector(vc, KVConnectorRole.SCHEDULER, kcc)
    hs = {(0, 0): w0.get_handshake_metadata(), (0, 1): w1.get_handshake_metadata()}
    with pytest.raises(ConfigError, match="TP rank 1 built its PegaFlow connector as rank 0"):
        sched.set_xfer_handshake_metadata_pp_aware(hs)
    with pytest.raises(ConfigError, match=r"TP ranks \[0\] but tensor_parallel_size is 2"):
        sched.set_xfer_handshake_metadata_pp_aware({(0, 0): w0.get_handshake_metadata()})
    with pytest.raises(ConfigError, match="pipeline parallelism"):
        sched.set_xfer_handshake_metadata_pp_aware(
            {(0, 0): w0.get_handshake_metadata(), (1, 0): w0.get_handshake_metadata()}
        )
    # another connector's handshake (MultiConnector): ignored
    sched.set_xfer_handshake_metadata({0: object(), 1: object()})


def test_worker_without_tp_group_needs_a_valid_rank(tiny_model_dir, owner):
    vc = make_vllm_config(tiny_model_dir, owner, tp=2)
    kcc = make_kv_cache_config(16, tp=2)
    for bad in (5, -1, None):
        vc.parallel_config.rank = bad
        with pytest.raises(ConfigError, match="parallel_config.rank"):
            PegaKVConnector(vc, KVConnectorRole.WORKER, kcc)


def test_lookups_use_the_namespaces_the_workers_report(tiny_model_dir, owner):
    a = make_instance(tiny_model_dir, owner, tp=2)
    wait_ready(a)
    run_one(a, "a1", PROMPT)
    wait_hits(a, make_request("p", PROMPT), 3)
    # B's scheduler computed other namespaces than its workers save under
    # (what an attention backend forcing its own KV layout in the workers
    # does with vLLM 0.2x): without the handshake it finds nothing ...
    b = make_instance(tiny_model_dir, owner, tp=2, handshake=False)
    wait_ready(b)
    conn = b.connector
    workers_ns = [w.namespace for w in b.workers]
    conn.scheduler_side.namespaces = [ns ^ 1 for ns in workers_ns]
    probe = make_request("probe", PROMPT)
    assert conn.get_num_new_matched_tokens(probe, 0) == (0, False)
    conn.request_finished(probe, [])
    # ... and after vLLM hands it the workers' handshakes, it hits.
    conn.set_xfer_handshake_metadata_pp_aware(
        {(0, r): w.get_handshake_metadata() for r, w in enumerate(b.workers)}
    )
    assert conn.namespaces == workers_ns
    probe = make_request("probe2", PROMPT)
    assert conn.get_num_new_matched_tokens(probe, 0) == (3 * BLOCK, False)  # layer-wise
    conn.request_finished(probe, [])


@pytest.mark.skipif(VLLM_MINOR >= (0, 30), reason="vLLM 0.3x resolves one layout for all processes")
def test_a_backend_forced_layout_is_settled_by_the_handshake(tiny_model_dir, owner):
    # vLLM 0.25's CPU backend (and FlashInfer on Blackwell) force HND in the
    # worker process only; the scheduler process cannot see that.
    from vllm.v1.attention.backends.utils import set_kv_cache_layout

    sched_ns = make_instance(tiny_model_dir, owner, tp=2, handshake=False).connector.namespaces
    set_kv_cache_layout("HND")
    try:
        _vc, _kcc, ws = _workers(tiny_model_dir, owner, [0, 1])
    finally:
        set_kv_cache_layout(None)
    assert [w.namespace for w in ws] != sched_ns
    vc = make_vllm_config(tiny_model_dir, owner, tp=2)
    sched = PegaKVConnector(vc, KVConnectorRole.SCHEDULER, make_kv_cache_config(16, tp=2))
    assert sched.namespaces == sched_ns
    sched.set_xfer_handshake_metadata_pp_aware(
        {(0, r): w.get_handshake_metadata() for r, w in enumerate(ws)}
    )
    assert sched.namespaces == [w.namespace for w in ws]
