"""Drive vLLM's real Scheduler and PegaKVConnector (both roles) on CPU.

Nothing of vLLM is mocked: the config classes, the Scheduler, the KV cache
manager, Request and its block hasher, ModelRunnerOutput and the KV tensors
(vLLM's own allocator on >= 0.3x) are vLLM's. What stands in for the model
is :class:`FakeForward`: it writes, for every token the scheduler computes,
bytes that depend only on the token's prefix, layer and position in the
block, into vLLM's KV tensors, exactly where attention would. So a block
loaded from PegaFlow must equal, byte for byte, what the forward pass would
have computed; any wrong slot, offset or layer shows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import vllm
from vllm import SamplingParams
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
)
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from pegaflow.connector import PegaKVConnector

VLLM_MINOR = tuple(int(x) for x in vllm.__version__.split(".")[:2])
EOS = 2
BLOCK = 16
NUM_LAYERS = 2
KV_HEADS = 2
HEAD = 16
DTYPE = torch.bfloat16


def make_vllm_config(
    model_dir: str,
    owner: Any,
    *,
    tp: int = 1,
    extra: Optional[dict] = None,
    max_batched: int = 256,
    max_seqs: int = 16,
    policy: str = "recompute",
    num_blocks: int = 64,
    prefix_caching: bool = True,
    role: str = "kv_both",
) -> VllmConfig:
    model = ModelConfig(
        model=model_dir,
        tokenizer=model_dir,
        skip_tokenizer_init=True,
        dtype="bfloat16",
        max_model_len=1024,
        seed=0,
    )
    cache = CacheConfig(block_size=BLOCK, gpu_memory_utilization=0.9, cache_dtype="auto", enable_prefix_caching=prefix_caching)
    cache.num_gpu_blocks = num_blocks
    sched = SchedulerConfig(
        max_num_seqs=max_seqs,
        max_num_batched_tokens=max_batched,
        max_model_len=1024,
        enable_chunked_prefill=True,
        is_encoder_decoder=False,
    )
    ex = {"pegaflow.name": owner.name, "pegaflow.socket": owner.socket}
    ex.update(extra or {})
    ktc = KVTransferConfig(
        kv_connector="PegaKVConnector",
        kv_role=role,
        kv_connector_module_path="pegaflow.connector",
        kv_connector_extra_config=ex,
        kv_load_failure_policy=policy,
    )
    par = ParallelConfig(tensor_parallel_size=tp)
    return VllmConfig(
        model_config=model,
        cache_config=cache,
        scheduler_config=sched,
        kv_transfer_config=ktc,
        parallel_config=par,
        device_config=DeviceConfig("cpu"),
    )


def layer_names() -> list[str]:
    return [f"model.layers.{i}.self_attn.attn" for i in range(NUM_LAYERS)]


def make_kv_cache_config(num_blocks: int, tp: int = 1, layout: str = "LBHNC") -> KVCacheConfig:
    heads = KV_HEADS // tp if KV_HEADS % tp == 0 else KV_HEADS
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=heads, head_size=HEAD, dtype=DTYPE)
    names = layer_names()
    page = spec.page_size_bytes
    return KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[KVCacheTensor(size=page * num_blocks, shared_by=[n]) for n in names]
        if VLLM_MINOR < (0, 30)
        else _tensors_032(names, page, num_blocks, layout),
        kv_cache_groups=[KVCacheGroupSpec(names, spec)],
    )


def _tensors_032(names, page, num_blocks, layout):
    # vLLM 0.3x: one backing allocation; layer l of block b at
    # l * layer_stride + b * block_stride.
    if layout.startswith("B"):  # block-outermost: a block's layers side by side
        return [
            KVCacheTensor(
                size=page * num_blocks * len(names),
                layers=list(names),
                offset=0,
                layer_stride=page,
                block_stride=page * len(names),
            )
        ]
    return [
        KVCacheTensor(
            size=page * num_blocks * len(names),
            layers=list(names),
            offset=0,
            layer_stride=page * num_blocks,
            block_stride=page,
        )
    ]


def allocate_kv(kv_cache_config: KVCacheConfig, vllm_config: VllmConfig) -> dict[str, torch.Tensor]:
    """The KV tensors vLLM's GPU runner would allocate, on CPU."""
    if VLLM_MINOR >= (0, 30):
        from vllm.v1.worker.utils import allocate_kv_cache

        cc = vllm_config.cache_config
        try:
            layout = cc.get_resolved_kv_cache_layout()
        except ValueError:
            from vllm.config.cache import _layout_from_name  # type: ignore

            layout = _layout_from_name(cc.kv_cache_layout or "LBHNC")
        return allocate_kv_cache(kv_cache_config, torch.device("cpu"), layout)
    # vLLM 0.2x FlashAttention: per layer [2, num_blocks, block_size, heads, head]
    spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    out = {}
    for n in kv_cache_config.kv_cache_groups[0].layer_names:
        out[n] = torch.zeros(
            (2, kv_cache_config.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size),
            dtype=spec.dtype,
        )
    return out


def token_rows(t: torch.Tensor) -> tuple[int, int]:
    """(block dim, token-in-block dim) of a layer tensor in vLLM's layout."""
    if VLLM_MINOR >= (0, 30):
        return 0, 2  # [B, H, N, C]
    return 1, 2  # [2, B, N, H, D]


class FakeForward:
    """Writes KV for computed tokens; see the module docs."""

    def __init__(self, kv: dict[str, torch.Tensor], rank: int = 0):
        self.kv = kv
        self.rank = rank
        self.names = list(kv)
        self.computed_positions: dict[str, set[int]] = {}

    def value(self, tokens: list[int], pos: int, layer: int, numel: int) -> torch.Tensor:
        h = hashlib.sha256(repr((tokens[: pos + 1], layer, self.rank)).encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little"))
        return torch.randn(numel, generator=g).to(DTYPE)

    def token_view(self, layer: int, block: int, off: int) -> torch.Tensor:
        t = self.kv[self.names[layer]]
        bd, nd = token_rows(t)
        return t.select(bd, block).select(nd - 1, off)

    def write(self, layer: int, block: int, off: int, tokens: list[int], pos: int) -> None:
        v = self.token_view(layer, block, off)
        v.copy_(self.value(tokens, pos, layer, v.numel()).view(v.shape))

    def check(self, layer: int, block: int, off: int, tokens: list[int], pos: int) -> bool:
        v = self.token_view(layer, block, off)
        return torch.equal(v.reshape(-1), self.value(tokens, pos, layer, v.numel()))


@dataclass
class Instance:
    """One vLLM instance: a Scheduler (with its connector) and TP workers."""

    vllm_config: VllmConfig
    scheduler: Scheduler
    workers: list[PegaKVConnector]
    forwards: list[FakeForward]
    kv: list[dict[str, torch.Tensor]]
    computed: dict[str, list[int]] = field(default_factory=dict)
    loaded_tokens: dict[str, int] = field(default_factory=dict)
    #: what request_finished answered (vLLM's EngineCoreOutput.kv_transfer_params)
    kv_transfer_params: dict[str, Any] = field(default_factory=dict)
    next_token: int = 500

    @property
    def connector(self) -> PegaKVConnector:
        return self.scheduler.connector  # type: ignore[return-value]


def make_instance(
    model_dir: str,
    owner: Any,
    *,
    tp: int = 1,
    num_blocks: int = 64,
    layout: str = "LBHNC",
    handshake: bool = True,
    **kw,
) -> Instance:
    vc = make_vllm_config(model_dir, owner, tp=tp, num_blocks=num_blocks, **kw)
    if VLLM_MINOR >= (0, 30):
        vc.cache_config.kv_cache_layout = layout
    kcc = make_kv_cache_config(num_blocks, tp, layout)
    sched = Scheduler(
        vllm_config=vc,
        kv_cache_config=kcc,
        structured_output_manager=StructuredOutputManager(vc),
        block_size=BLOCK,
        log_stats=True,
    )
    workers, kvs, fwd = [], [], []
    for r in range(tp):
        vc.parallel_config.rank = r
        w = PegaKVConnector(vc, KVConnectorRole.WORKER, kcc)
        kv = allocate_kv(kcc, vc)
        w.register_kv_caches(kv)
        workers.append(w)
        kvs.append(kv)
        fwd.append(FakeForward(kv, r))
    vc.parallel_config.rank = 0
    if handshake:
        # vLLM's EngineCore, once the workers registered their caches:
        # each worker's handshake, keyed by (pp_rank, vLLM's tp_rank)
        sched.connector.set_xfer_handshake_metadata_pp_aware(
            {(0, r): w.get_handshake_metadata() for r, w in enumerate(workers)}
        )
    return Instance(vc, sched, workers, fwd, kvs)


_hasher_ready = False


def make_request(req_id: str, prompt: list[int], max_tokens: int = 4, **extra: Any) -> Request:
    """A vLLM Request with vLLM's own block hasher (sha256, as vLLM's
    default); ``extra``: Request arguments such as cache_salt, lora_request,
    mm_features."""
    global _hasher_ready
    if not _hasher_ready:
        init_none_hash(sha256)
        _hasher_ready = True
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    sp.update_from_generation_config({}, EOS) if hasattr(sp, "update_from_generation_config") else None
    return Request(
        request_id=req_id,
        prompt_token_ids=list(prompt),
        sampling_params=sp,
        pooling_params=None,
        block_hasher=get_request_block_hasher(BLOCK, sha256),
        **extra,
    )


def step(inst: Instance, *, sample: bool = True) -> Any:
    """One engine step: schedule, run the workers (loads, fake forward,
    saves), feed the output back. Returns the SchedulerOutput."""
    so = inst.scheduler.schedule()
    meta = so.kv_connector_metadata
    sending: Optional[set] = None
    recving: Optional[set] = None
    errors: set[int] = set()
    all_send: list[set] = []
    all_recv: list[set] = []
    worker_meta = None
    for w, fwd in zip(inst.workers, inst.forwards):
        w.bind_connector_metadata(meta)
        w.start_load_kv(None)
        # the forward pass: write KV of the scheduled tokens, layer by layer
        plans = _token_plan(inst, so)
        for li, name in enumerate(fwd.names):
            w.wait_for_layer_load(name)
            for req_id, toks, positions, blocks in plans:
                for p in positions:
                    fwd.write(li, blocks[p // BLOCK], p % BLOCK, toks, p)
            w.save_kv_layer(name, fwd.kv[name], None)
        w.wait_for_save()
        s, r = w.get_finished(set(so.finished_req_ids))
        all_send.append(set(s or ()))
        all_recv.append(set(r or ()))
        errors |= w.get_block_ids_with_load_errors()
        m = w.build_connector_worker_meta()
        if m is not None:  # vLLM's KVOutputAggregator aggregates them
            worker_meta = m if worker_meta is None else worker_meta.aggregate(m)
        w.clear_connector_metadata()
    # vLLM's KVOutputAggregator: a request is done when every worker says so
    sending = set.intersection(*all_send) if all_send else set()
    recving = set.intersection(*all_recv) if all_recv else set()
    for rid, n in so.num_scheduled_tokens.items():
        inst.computed.setdefault(rid, [])
    req_ids = list(so.num_scheduled_tokens)
    sampled = []
    for rid in req_ids:
        req = inst.scheduler.requests[rid]
        done_prefill = req.num_computed_tokens + 0 >= req.num_prompt_tokens
        # the scheduler already advanced num_computed_tokens in schedule()
        if sample and req.num_computed_tokens >= req.num_prompt_tokens:
            inst.next_token += 1
            sampled.append([inst.next_token % 900 + 10])
        else:
            sampled.append([])
    kco = KVConnectorOutput(
        finished_sending=sending or None,
        finished_recving=recving or None,
        invalid_block_ids=errors,
        kv_connector_worker_meta=worker_meta,
    )
    mro = ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=sampled,
        logprobs=None,
        prompt_logprobs_dict={},
        pooler_output=[],
        kv_connector_output=kco,
    )
    if not so.total_num_scheduled_tokens:
        # vLLM's model runner with nothing to compute (every request waits
        # for a load): kv_connector_no_forward() returns
        # ModelRunnerOutput.with_kv_conn_output_only(), which is
        # EMPTY_MODEL_RUNNER_OUTPUT, without a connector output, when the
        # connector had nothing to report. The connector's
        # update_connector_output is then not called for that step.
        mro = ModelRunnerOutput.with_kv_conn_output_only(kco)
    outs = inst.scheduler.update_from_output(so, mro)
    for eco in (outs or {}).values():
        for o in eco.outputs:
            if o.kv_transfer_params is not None:
                inst.kv_transfer_params[o.request_id] = o.kv_transfer_params
    return so


def _token_plan(inst: Instance, so) -> list[tuple[str, list[int], range, list[int]]]:
    out = []
    for rid, n in so.num_scheduled_tokens.items():
        req = inst.scheduler.requests[rid]
        # schedule() already advanced num_computed_tokens by n
        start = req.num_computed_tokens - n
        blocks = inst.scheduler.kv_cache_manager.get_block_ids(rid)[0]
        toks = list(req.all_token_ids)
        positions = range(start, min(start + n, len(toks)))
        inst.computed.setdefault(rid, []).extend(positions)
        out.append((rid, toks, positions, list(blocks)))
    return out


def run_until_done(inst: Instance, req_ids: list[str], max_steps: int = 200) -> int:
    steps = 0
    while steps < max_steps:
        if all(r not in inst.scheduler.requests for r in req_ids):
            return steps
        step(inst)
        steps += 1
    raise AssertionError(f"requests {req_ids} not done after {max_steps} steps")


def verify_blocks(inst: Instance, req: Request, upto_tokens: int) -> None:
    """Every position < upto_tokens of `req` holds exactly the KV its prefix
    produces, in every layer and every TP rank."""
    blocks = inst.scheduler.kv_cache_manager.get_block_ids(req.request_id)[0]
    toks = list(req.all_token_ids)
    for fwd in inst.forwards:
        for li in range(NUM_LAYERS):
            for p in range(upto_tokens):
                assert fwd.check(li, blocks[p // BLOCK], p % BLOCK, toks, p), (
                    f"{req.request_id}: layer {li} position {p} (block {blocks[p // BLOCK]}) differs"
                )
