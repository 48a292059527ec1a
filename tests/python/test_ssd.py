"""The SSD tier through vLLM's real Scheduler: a block the pool evicted to
the owner's SSD tier is staged back into the pool while vLLM asks again
later (no step waits for the disk), then loaded byte-exact."""

from __future__ import annotations

import time
import uuid

from conftest import ROOT
from test_metrics import Scrape, free_port, http
from test_vllm_scheduler import run_one, wait_ready
from pegaflow.connector.keys import request_keys
from vllm_harness import BLOCK, make_instance, make_request, step, verify_blocks


def test_a_block_evicted_to_ssd_is_staged_back_and_loaded(tiny_model_dir, make_owner):
    # On the real disk (O_DIRECT), beside the build.
    ssd = ROOT / "target" / "ssd-tests" / f"py-{uuid.uuid4().hex[:8]}"
    ssd.mkdir(parents=True)
    owner = make_owner(pool_size="8mb", start=False)
    owner.metrics_addr = f"127.0.0.1:{free_port()}"
    # 128 slots of 64 KiB; every evicted block goes to disk (no TinyLFU).
    owner.start(extra=(
        "--slab-size", "2mb", "--min-slot-size", "64kb", "--disable-lfu-admission",
        "--ssd-cache-path", str(ssd), "--ssd-cache-capacity", "64mb", "--ssd-segment-size", "8mb",
    ))
    a = make_instance(tiny_model_dir, owner)
    wait_ready(a)
    prompts = [list(range(10 + 60 * i, 10 + 60 * i + 3 * BLOCK + 4)) for i in range(60)]
    first = request_keys(make_request("k", prompts[0]), BLOCK, 3)
    conn = a.connector
    for i, p in enumerate(prompts):
        run_one(a, f"a{i}", p, max_tokens=1)
    # 180 blocks into a pool of 128: the first prompt's went to the SSD.
    deadline = time.monotonic() + 10
    while not (min(conn.engine.ssd_hits(ns, first) for ns in conn.namespaces) == 3
               and min(conn.engine.count_hits(ns, first) for ns in conn.namespaces) == 0):
        assert time.monotonic() < deadline, (
            f"pool hits {[conn.engine.count_hits(ns, first) for ns in conn.namespaces]}, "
            f"ssd hits {[conn.engine.ssd_hits(ns, first) for ns in conn.namespaces]}"
        )
        time.sleep(0.02)

    b = make_instance(tiny_model_dir, owner)  # a new vLLM instance, nothing local
    wait_ready(b)
    r = make_request("b1", prompts[0], max_tokens=2)
    b.scheduler.add_request(r)
    waited = 0
    while "b1" not in b.computed or not b.computed["b1"]:
        step(b)
        waited += 1
        assert waited < 500, "the staged request never ran"
        time.sleep(0.005)
    assert b.connector.scheduler_side.ssd.requests_staged == 1
    assert not any(p < 3 * BLOCK for p in b.computed["b1"]), "staged blocks were recomputed"
    verify_blocks(b, r, 3 * BLOCK)

    # The owner's metrics say the same (a real scrape).
    code, text = http(owner.metrics_addr, "/metrics")
    assert code == 200
    m = Scrape(text)
    assert m("pegaflow_ssd_written_blocks_total") >= 3
    assert m("pegaflow_ssd_staged_blocks_total") >= 3
    assert m("pegaflow_ssd_staged_bytes_total") > 0
    assert m("pegaflow_ssd_stage_requests_total") >= 3
    assert m("pegaflow_stage_requests_total") >= 3  # what the engines asked
    assert sum(v for _, v in m.all("pegaflow_client_staged_blocks_total")) >= 3
    assert m("pegaflow_ssd_checksum_failures_total") == 0
    assert m("pegaflow_ssd_read_errors_total") == 0 and m("pegaflow_ssd_write_errors_total") == 0
