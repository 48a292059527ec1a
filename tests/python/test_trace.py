"""Load traces (pegaflow.connector.trace) through vLLM's real Scheduler and
the connector's worker side: a slow load is always written, with every
phase in order; sampling off and a huge threshold write nothing; the
sample rate holds (fixed seed)."""

from __future__ import annotations

import json
import logging
import math
import time

import pytest

from pegaflow.config import PegaflowConfig
from pegaflow.connector import trace
from pegaflow.exceptions import ConfigError
from test_vllm_scheduler import PROMPT, run_one, wait_hits, wait_ready
from vllm_harness import BLOCK, make_instance, make_request, run_until_done


class Records(logging.Handler):
    """The JSON lines written on the trace logger."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def loads(self) -> list[dict]:
        return [json.loads(l) for l in self.lines]


@pytest.fixture
def records():
    h = Records()
    level = trace.logger.level
    trace.logger.addHandler(h)
    trace.logger.setLevel(logging.INFO)  # vLLM's default level
    yield h
    trace.logger.removeHandler(h)
    trace.logger.setLevel(level)


def loader(tiny_model_dir, owner, tp=1, **cfg):
    """A saver instance with PROMPT's 3 blocks in the pool, and a loader
    that finds them on every request (its own prefix cache off)."""
    a = make_instance(tiny_model_dir, owner, tp=tp)
    extra = {f"pegaflow.{k}": v for k, v in cfg.items()}
    b = make_instance(tiny_model_dir, owner, tp=tp, prefix_caching=False, extra=extra)
    wait_ready(a, b)
    run_one(a, "a1", PROMPT)
    wait_hits(b, make_request("p", PROMPT), 3)
    return b


def test_the_trace_logger_is_vllms():
    assert trace.logger.name == "vllm.pegaflow.connector.trace"


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("mode", ["layerwise", "async"])
def test_a_slow_load_is_traced_with_every_phase_in_order(tiny_model_dir, owner, records, mode, tp):
    b = loader(
        tiny_model_dir, owner, tp=tp,
        load_mode=mode, trace_sample_rate=0, slow_load_ms=100,
    )
    # The workers start their step 150 ms late (as behind a long step).
    for w in b.workers:
        start = w.start_load_kv

        def late(ctx, _start=start, **kw):
            time.sleep(0.15)
            _start(ctx, **kw)

        w.start_load_kv = late
    run_one(b, "b1", PROMPT)
    (rec,) = records.loads()
    assert (rec["event"], rec["reason"], rec["req_id"], rec["mode"]) == (
        "pegaflow.load", "slow", "b1", mode,
    )
    slot = b.workers[0].kv.slot_bytes
    assert (rec["blocks"], rec["bytes"], rec["failed_blocks"]) == (3, 3 * slot * tp, 0)
    assert [p["phase"] for p in rec["phases"]] == list(trace.PHASES)
    at = [p["at_ms"] for p in rec["phases"]]
    assert at == sorted(at), rec
    assert math.isclose(sum(p["ms"] for p in rec["phases"]), rec["total_ms"], abs_tol=0.01)
    assert at[-1] == rec["total_ms"]
    phase = {p["phase"]: p["ms"] for p in rec["phases"]}
    assert phase["dispatch"] >= 150, rec  # the late start shows where it went
    assert rec["load_ms"] >= 150
    assert rec["load_ms"] <= rec["total_ms"]
    assert [c["rank"] for c in rec["copies"]] == list(range(tp))
    for c in rec["copies"]:
        assert (c["blocks"], c["bytes"], c["failed"]) == (3, 3 * slot, 0)
        assert c["issue_at_ms"] >= 150 and c["done_at_ms"] >= c["issue_at_ms"]
    assert rec["start"].endswith("Z")
    # the request was served from the pool
    assert b.connector.get_scheduler_stats()["hit_blocks"] >= 3


@pytest.mark.parametrize(
    "rate, slow, traced",
    [(0, 1e12, False), (1, 1e12, True), (0, 0, True)],
    ids=["off", "every-sampled", "every-slow"],
)
def test_sampling_and_threshold_choose_what_is_written(
    tiny_model_dir, owner, records, rate, slow, traced
):
    b = loader(tiny_model_dir, owner, trace_sample_rate=rate, slow_load_ms=slow)
    hits = b.connector.get_scheduler_stats()["hit_blocks"]
    for i in range(4):
        run_one(b, f"b{i}", PROMPT)
    assert b.connector.get_scheduler_stats()["hit_blocks"] - hits == 4 * 3
    got = records.loads()
    if not traced:
        assert got == []
    else:
        assert [r["req_id"] for r in got] == [f"b{i}" for i in range(4)]
        assert {r["reason"] for r in got} == {"sampled" if rate else "slow"}


def test_the_sample_rate_holds(tiny_model_dir, owner, records):
    rate, n = 0.25, 160
    b = loader(
        tiny_model_dir, owner,
        load_mode="layerwise", trace_sample_rate=rate, slow_load_ms=1e12, trace_seed=12345,
    )
    hits = b.connector.get_scheduler_stats()["hit_blocks"]
    ids = [f"s{i}" for i in range(n)]
    for batch in range(0, n, 16):
        # 16 requests in one step; each its own lookup and load
        chunk = ids[batch : batch + 16]
        for rid in chunk:
            b.scheduler.add_request(make_request(rid, PROMPT, max_tokens=1))
        run_until_done(b, chunk)
    assert b.connector.get_scheduler_stats()["hit_blocks"] - hits == 3 * n
    got = records.loads()
    assert {r["reason"] for r in got} == {"sampled"}
    assert len({r["req_id"] for r in got}) == len(got)
    # Binomial(160, 0.25): mean 40, sd 5.5; the seed makes it one fixed draw.
    mean, sd = n * rate, math.sqrt(n * rate * (1 - rate))
    assert abs(len(got) - mean) <= 3.5 * sd, len(got)


@pytest.mark.parametrize(
    "key, value, says",
    [
        ("trace_sample_rate", 1.5, "between 0"),
        ("trace_sample_rate", "often", "a fraction"),
        ("trace_sample_rate", True, "a fraction"),
        ("slow_load_ms", -1, ">= 0"),
        ("slow_load_ms", "slow", "milliseconds"),
        ("trace_seed", 1.5, "an integer"),
        ("trace_seed", "abc", "an integer"),
    ],
)
def test_bad_trace_settings_are_refused(key, value, says):
    with pytest.raises(ConfigError, match=f"pegaflow.{key}.*{says}"):
        PegaflowConfig.from_extra_config({f"pegaflow.{key}": value})


def test_trace_settings_defaults_and_parsing():
    c = PegaflowConfig.from_extra_config({})
    assert (c.trace_sample_rate, c.slow_load_ms, c.trace_seed) == (0.01, 1000.0, None)
    c = PegaflowConfig.from_extra_config(
        {"pegaflow.trace_sample_rate": "0.5", "pegaflow.slow_load_ms": 20, "pegaflow.trace_seed": "3"}
    )
    assert (c.trace_sample_rate, c.slow_load_ms, c.trace_seed) == (0.5, 20.0, 3)


def test_a_load_that_cannot_start_is_traced_with_its_failed_blocks(tiny_model_dir, owner, records):
    b = loader(
        tiny_model_dir, owner,
        load_mode="layerwise", trace_sample_rate=0, slow_load_ms=0, reconnect_interval=0.05,
    )
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
    from vllm_harness import KVConnectorOutput, ModelRunnerOutput

    w = b.workers[0]
    w.bind_connector_metadata(so.kv_connector_metadata)
    w.start_load_kv(None)
    w.wait_for_save()
    errors = w.get_block_ids_with_load_errors()
    meta = w.build_connector_worker_meta()
    w.clear_connector_metadata()
    assert errors
    mro = ModelRunnerOutput(
        req_ids=[], req_id_to_index={}, sampled_token_ids=[],
        kv_connector_output=KVConnectorOutput(invalid_block_ids=errors, kv_connector_worker_meta=meta),
    )
    b.scheduler.update_from_output(so, mro)
    (rec,) = records.loads()
    assert (rec["req_id"], rec["blocks"], rec["failed_blocks"], rec["bytes"]) == ("b1", 3, 3, 0)
    assert [p["phase"] for p in rec["phases"]] == list(trace.PHASES)
    assert rec["copies"][0]["failed"] == 3


def test_a_copy_note_that_comes_after_the_release_is_in_the_record(records, monkeypatch):
    """A P/D direct copy's worker sees it done from another thread, often a
    step after the step that used it: its record waits for every rank's
    note (decode loads were counted "from the pool" without this), and is
    written anyway once the wait is over."""
    t = trace.LoadTracer(sample_rate=1.0, slow_load_ms=1e12)
    w = [trace.WorkerTrace(r) for r in range(2)]

    def load(req_id):
        lt = t.start()
        lt.mark("lookup")
        t.loading(req_id, lt, 313, True, ranks=2)
        for wt in w:
            wt.issued(hash((req_id, wt.rank)), req_id, 313, 1 << 20, trace.now(), source="gpu")
        return lt

    lt = load("late")
    w[0].done(hash(("late", 0)), 0, gpu_ms=2.0)
    t.worker_notes(w[0].take())
    t.released("late", lt)
    assert records.loads() == [], "written before rank 1's note"
    w[1].done(hash(("late", 1)), 0, gpu_ms=2.5)
    t.worker_notes(w[1].take())
    (r,) = records.loads()
    assert r["req_id"] == "late" and [c["source"] for c in r["copies"]] == ["gpu", "gpu"]
    assert [c["gpu_ms"] for c in r["copies"]] == [2.0, 2.5] and r["bytes"] == 2 * 313 << 20

    # a note that never comes: written with what came once the wait is over
    monkeypatch.setattr(trace, "LATE_NOTES_S", 0.0)
    lt = load("lost")
    t.released("lost", lt)
    t.worker_notes(None)
    assert [r["req_id"] for r in records.loads()] == ["late", "lost"]
    assert records.loads()[1]["copies"] == []
