"""A hybrid model (gpt-oss's shape: sliding-window and full attention layers
alternating) through vLLM's real Scheduler with its hybrid KV cache manager,
the KVCacheConfig vLLM itself derives for that model (get_kv_cache_configs),
PegaKVConnector in both roles and a real owner; on vLLM 0.25 and 0.32.

What stands in for the model is vllm_harness.FakeForward: per token, layer
and rank it writes bytes that depend only on the token's prefix, in the
block vLLM gave that layer's group. A hit must leave exactly those bytes in
every block vLLM reads (the full layers' blocks up to the hit, the sliding
layers' blocks inside the window), and vLLM must keep its hybrid manager on.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from vllm.v1.core.kv_cache_utils import get_kv_cache_configs
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, SlidingWindowSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.structured_output import StructuredOutputManager
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from pegaflow.connector import PegaKVConnector
from pegaflow.connector import groups as hma
from vllm_harness import BLOCK, DTYPE, HEAD, KV_HEADS, VLLM_MINOR, FakeForward, make_request, make_vllm_config

WINDOW = 32  # tokens: two blocks
LAYERS = 4  # sliding, full, sliding, full
NUM_BLOCKS = 96


def names() -> list[str]:
    return [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]


GPT_OSS = ("sliding", "full", "sliding", "full")
JAMBA = ("mamba", "full", "mamba", "full")


def specs(tp: int, kinds: tuple[str, ...] = GPT_OSS) -> dict[str, Any]:
    heads = KV_HEADS // tp
    full = FullAttentionSpec(block_size=BLOCK, num_kv_heads=heads, head_size=HEAD, dtype=DTYPE)
    out: dict[str, Any] = {}
    for n, kind in zip(names(), kinds):
        if kind == "sliding":
            out[n] = SlidingWindowSpec(
                block_size=BLOCK, num_kv_heads=heads, head_size=HEAD, dtype=DTYPE, sliding_window=WINDOW
            )
        elif kind == "mamba":
            # a conv and an SSM state, padded to the attention page as vLLM does
            out[n] = MambaSpec(
                block_size=BLOCK,
                shapes=((4, 64), (8, 32)),
                dtypes=(DTYPE, DTYPE),
                page_size_padded=full.page_size_bytes,
            )
        else:
            out[n] = full
    return out


def allocate(kcc, vc) -> dict[str, torch.Tensor]:
    """The KV tensors vLLM's runner allocates, on CPU: groups overlay each
    other in one allocation per KVCacheTensor."""
    if VLLM_MINOR >= (0, 30):
        from vllm.v1.worker.utils import allocate_kv_cache

        cc = vc.cache_config
        try:
            layout = cc.get_resolved_kv_cache_layout()
        except ValueError:
            from vllm.config.cache import _layout_from_name  # type: ignore

            layout = _layout_from_name(cc.kv_cache_layout or "LBHNC")
        return allocate_kv_cache(kcc, torch.device("cpu"), layout)
    # vLLM 0.25's GPU runner: a raw int8 buffer per KVCacheTensor, viewed by
    # each layer sharing it as FlashAttention's [2, num_blocks, block, heads, head]
    out = {}
    spec_of = {n: g.kv_cache_spec for g in kcc.kv_cache_groups for n in g.layer_names}
    for t in kcc.kv_cache_tensors:
        raw = torch.zeros(t.size, dtype=torch.int8)
        for n in t.shared_by:
            s = spec_of[n]
            if isinstance(s, MambaSpec):
                out[n] = raw  # (its state views; never copied here)
                continue
            out[n] = raw.view(s.dtype).view(2, kcc.num_blocks, s.block_size, s.num_kv_heads, s.head_size)
    return out


class Hybrid:
    """One vLLM instance of the hybrid model: Scheduler + TP workers."""

    def __init__(self, model_dir: str, owner: Any, tp: int = 1, kinds: tuple[str, ...] = GPT_OSS, **kw: Any):
        vc = make_vllm_config(model_dir, owner, tp=tp, num_blocks=NUM_BLOCKS, **kw)
        if VLLM_MINOR >= (0, 30):
            vc.cache_config.kv_cache_layout = "LBHNC"
        # vLLM on a GPU keeps it on with this connector (see the test
        # below); this CPU platform under the GPU wheel turns it off
        vc.scheduler_config.disable_hybrid_kv_cache_manager = False
        self.vc = vc
        page = specs(tp)[names()[1]].page_size_bytes
        self.kcc = get_kv_cache_configs(vc, [specs(tp, kinds)], [page * LAYERS * NUM_BLOCKS])[0]
        #: the layers the fake forward writes (none with mamba layers: what
        #: is checked then is only that nothing is cached)
        self.attn = [] if "mamba" in kinds else list(range(LAYERS))
        self.scheduler = Scheduler(
            vllm_config=vc,
            kv_cache_config=self.kcc,
            structured_output_manager=StructuredOutputManager(vc),
            block_size=BLOCK,
            log_stats=True,
        )
        self.group_of = {n: gi for gi, g in enumerate(self.kcc.kv_cache_groups) for n in g.layer_names}
        self.workers, self.forwards = [], []
        for r in range(tp):
            vc.parallel_config.rank = r
            w = PegaKVConnector(vc, KVConnectorRole.WORKER, self.kcc)
            kv = allocate(self.kcc, vc)
            w.register_kv_caches(kv)
            self.workers.append(w)
            f = FakeForward({n: kv[n] for n in names() if isinstance(kv[n], torch.Tensor)}, r)
            self.forwards.append(f)
        vc.parallel_config.rank = 0
        self.connector.set_xfer_handshake_metadata_pp_aware(
            {(0, r): w.get_handshake_metadata() for r, w in enumerate(self.workers)}
        )
        self.computed: dict[str, list[int]] = {}
        self.next_token = 500

    @property
    def connector(self) -> PegaKVConnector:
        return self.scheduler.connector  # type: ignore[return-value]

    def blocks(self, rid: str, layer: int) -> list[int]:
        return list(self.scheduler.kv_cache_manager.get_block_ids(rid)[self.group_of[names()[layer]]])

    def step(self) -> Any:
        so = self.scheduler.schedule()
        meta = so.kv_connector_metadata
        sends, recvs, errors = [], [], set()
        plans = []
        for rid, n in so.num_scheduled_tokens.items():
            req = self.scheduler.requests[rid]
            start = req.num_computed_tokens - n
            toks = list(req.all_token_ids)
            pos = range(start, min(start + n, len(toks)))
            self.computed.setdefault(rid, []).extend(pos)
            plans.append((rid, toks, pos))
        for w, fwd in zip(self.workers, self.forwards):
            w.bind_connector_metadata(meta)
            w.start_load_kv(None)
            for li, name in enumerate(names()):
                w.wait_for_layer_load(name)
                if li not in self.attn:
                    continue
                for rid, toks, pos in plans:
                    blocks = self.blocks(rid, li)
                    for p in pos:
                        b = blocks[p // BLOCK]
                        assert b != hma.NULL_BLOCK, f"{rid}: layer {li} computes position {p} into the null block"
                        fwd.write(self.attn.index(li), b, p % BLOCK, toks, p)
                w.save_kv_layer(name, fwd.kv[name], None)
            w.wait_for_save()
            s, r = w.get_finished(set(so.finished_req_ids))
            sends.append(set(s or ()))
            recvs.append(set(r or ()))
            errors |= w.get_block_ids_with_load_errors()
            w.clear_connector_metadata()
        ids = list(so.num_scheduled_tokens)
        sampled = []
        for rid in ids:
            req = self.scheduler.requests[rid]
            if req.num_computed_tokens >= req.num_prompt_tokens:
                self.next_token += 1
                sampled.append([self.next_token % 900 + 10])
            else:
                sampled.append([])
        kco = KVConnectorOutput(
            finished_sending=set.intersection(*sends) or None,
            finished_recving=set.intersection(*recvs) or None,
            invalid_block_ids=errors,
        )
        mro = ModelRunnerOutput(
            req_ids=ids,
            req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=sampled,
            logprobs=None,
            prompt_logprobs_dict={},
            pooler_output=[],
            kv_connector_output=kco,
        )
        self.scheduler.update_from_output(so, mro)
        return so

    def run(self, rid: str, prompt: list[int], max_tokens: int = 3) -> Any:
        req = make_request(rid, prompt, max_tokens)
        self.scheduler.add_request(req)
        for _ in range(200):
            if rid not in self.scheduler.requests:
                return req
            self.step()
        raise AssertionError(f"{rid} not done")

    def verify(self, req: Any, upto: int) -> int:
        """Every position < upto in a block vLLM holds for a layer (not the
        null block) has exactly what the forward writes; returns how many
        (position, layer) pairs were checked."""
        toks = list(req.all_token_ids)
        checked = 0
        for fwd in self.forwards:
            for li in self.attn:
                blocks = self.blocks(req.request_id, li)
                for p in range(upto):
                    b = blocks[p // BLOCK]
                    if b == hma.NULL_BLOCK:
                        continue
                    ok = fwd.check(self.attn.index(li), b, p % BLOCK, toks, p)
                    assert ok, f"layer {li} position {p} (block {b}) differs"
                    checked += 1
        return checked


PROMPT = list(range(100, 100 + 9 * BLOCK + 5))  # 9 full blocks + 5 tokens


def test_vllm_keeps_its_hybrid_manager_on(tiny_model_dir, owner):
    # What VllmConfig asks (both versions) before it turns the hybrid
    # manager off with "Turning off hybrid kv cache manager because ...
    # a KV connector that does not support it" (the platform of these tests,
    # CPU under the GPU wheel, turns it off anyway: tests/e2e shows the log)
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    vc = make_vllm_config(tiny_model_dir, owner)
    assert KVConnectorFactory.supports_hma_config(vc.kv_transfer_config)


@pytest.mark.parametrize("tp", [1, 2])
def test_hybrid_hit_across_instances(tiny_model_dir, owner, tp):
    a = Hybrid(tiny_model_dir, owner, tp=tp)
    groups = a.connector.groups
    assert groups is not None and [g.kind for g in groups].count(hma.SLIDING) >= 1
    for w in a.workers:
        for s in w.worker_side.sides:
            assert s.kv.engine.wait_connected(5.0)
    time.sleep(0.3)
    ra = a.run("a1", PROMPT)
    assert all(p in a.computed["a1"] for p in range(len(PROMPT)))
    b = Hybrid(tiny_model_dir, owner, tp=tp)
    for w in b.workers:
        for s in w.worker_side.sides:
            assert s.kv.engine.wait_connected(5.0)
    time.sleep(0.3)
    hit = (len(PROMPT) - 1) // BLOCK * BLOCK
    deadline = time.monotonic() + 5
    while True:
        rb = make_request("b1", PROMPT, 3)
        ext, _ = b.connector.get_num_new_matched_tokens(rb, 0)
        if ext == hit or time.monotonic() > deadline:
            break
        b.connector._sched.request_finished(rb, [])
        time.sleep(0.05)
    assert ext == hit, f"hit {ext} tokens, want {hit}"
    b.connector._sched.request_finished(rb, [])
    rb = make_request("b1", PROMPT, 3)
    b.scheduler.add_request(rb)
    so = b.step()
    assert so.num_scheduled_tokens["b1"] == len(PROMPT) - hit
    assert not any(p < hit for p in b.computed["b1"]), "B recomputed hit tokens"
    b.verify(rb, len(PROMPT))
    # sliding layers: only the window before the hit was loaded
    sw = [g for g in groups if g.kind == hma.SLIDING][0]
    sw_blocks = b.blocks("b1", names().index(sw.layer_names[0]))
    assert sw_blocks[: sw.first_needed(hit // BLOCK)] == [hma.NULL_BLOCK] * sw.first_needed(hit // BLOCK)
    for _ in range(20):
        if "b1" not in b.scheduler.requests:
            break
        b.step()


def test_sliding_groups_keep_only_their_window(tiny_model_dir, owner):
    a = Hybrid(tiny_model_dir, owner)
    for w in a.workers:
        for s in w.worker_side.sides:
            assert s.kv.engine.wait_connected(5.0)
    time.sleep(0.3)
    a.run("a1", PROMPT)
    time.sleep(0.3)
    sched = a.connector._sched
    req = make_request("probe", PROMPT)
    from pegaflow.connector.keys import request_keys

    keys = request_keys(req, BLOCK, 9)
    for g, gns in zip(sched.groups, sched.group_namespaces):
        held = [bool(sched.engine.count_hits(gns[0], [k])) for k in keys]
        if g.kind == hma.FULL:
            assert all(held), held
        else:
            # the windows (two blocks) before the checkpoint at block 8
            # (every 4 windows) and before the prompt's end (block 9)
            assert g.first_needed(8) == 6 and g.first_needed(9) == 7
            assert [i for i, h in enumerate(held) if h] == [6, 7, 8], held


def test_mamba_hybrid_runs_with_the_connector_caching_nothing(tiny_model_dir, owner):
    """Mamba / linear-attention groups are not cached yet: vLLM must still
    run such a model with the connector (it needs the hybrid manager, which
    stays on), and the connector must neither look up nor save anything."""
    a = Hybrid(tiny_model_dir, owner, kinds=JAMBA)
    assert hma.MAMBA in [g.kind for g in a.connector.groups]
    a.run("a1", PROMPT)
    a.run("a2", PROMPT)
    st = a.connector.get_scheduler_stats()
    assert st["lookups"] == 0, st
    # no worker side, so nothing can be saved
    assert all(w.worker_side.sides == [] for w in a.workers)
