"""The KV format of a vLLM instance and the namespaces it saves under.

A namespace is a 64-bit fingerprint of everything that changes a block's
bytes (model, dtype, layout, block size, layers, tensor-parallel size and
rank; see ``_native.namespace_fingerprint``). Each worker computes its own
to save and load; the scheduler computes every rank's to look blocks up,
then replaces them by what the workers report at start-up (the handshake,
see :mod:`.metadata`), so a difference between processes cannot make every
lookup miss. Everything here is a function of vLLM's config and
``KVCacheConfig``, not of process state, so the two normally agree anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from pegaflow import _native
from pegaflow.exceptions import ConfigError, LayoutError

if TYPE_CHECKING:  # pragma: no cover
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

#: vLLM minor versions this connector is written and tested against.
SUPPORTED_VLLM = ((0, 25), (0, 32))


def vllm_version() -> tuple[int, int]:
    """(major, minor) of the installed vLLM; (0, 0) when unparsable."""
    import vllm

    parts = str(getattr(vllm, "__version__", "0.0")).split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


@dataclass(frozen=True)
class KvShape:
    """The KV cache as vLLM's ``KVCacheConfig`` describes it (one group)."""

    block_size: int
    num_layers: int
    #: bytes of one block of one layer (K and V together)
    layer_block_bytes: int
    dtype: str
    dtype_size: int
    is_mla: bool


def kv_shape(kv_cache_config: "KVCacheConfig") -> KvShape:
    """The shape of a single-group KV cache; hybrid models are refused."""
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
    if len(groups) != 1:
        raise LayoutError(
            f"PegaKVConnector supports models with one KV cache group; this one has {len(groups)} "
            "(hybrid attention: sliding window / mamba layers). Disable the hybrid KV cache "
            "manager (--disable-hybrid-kv-cache-manager) or run without the connector."
        )
    spec = groups[0].kv_cache_spec
    layers = list(groups[0].layer_names)
    try:
        from vllm.v1.kv_cache_interface import MLAAttentionSpec
    except ImportError:  # pragma: no cover
        MLAAttentionSpec = ()  # type: ignore[assignment]
    is_mla = isinstance(spec, MLAAttentionSpec) if MLAAttentionSpec else False
    dtype = getattr(spec, "dtype", None)
    if dtype is None:
        raise LayoutError(f"unsupported KV cache spec {type(spec).__name__} (no dtype)")
    page = int(spec.page_size_bytes)
    return KvShape(
        block_size=int(spec.block_size),
        num_layers=len(layers),
        layer_block_bytes=page,
        dtype=str(dtype).replace("torch.", ""),
        dtype_size=torch.empty((), dtype=dtype).element_size(),
        is_mla=is_mla,
    )


def layout_tag(
    vllm_config: "VllmConfig", kv_cache_config: "Optional[KVCacheConfig]" = None
) -> str:
    """What decides the byte order inside a block, as this vLLM resolves it.

    vLLM 0.3x resolves the layout once, in the engine core, and hands it to
    the scheduler and every worker (``KVCacheConfig.kv_cache_layout``,
    ``CacheConfig.kv_cache_layout``). vLLM 0.2x has one process-global
    NHD/HND switch whose lookup (``get_kv_cache_layout``) depends on the
    process: it raises outside a worker's config context and caches its
    first answer. Its inputs are read here directly instead, so a scheduler
    and a worker in different processes (tensor parallelism) agree. Only an
    attention backend that forces a layout in the worker (vLLM 0.25's CPU
    backend, FlashInfer on Blackwell) can still make them differ; the
    workers' handshake settles that (``SchedulerSide.adopt_worker_namespaces``).
    """
    tag = getattr(kv_cache_config, "kv_cache_layout", None)
    cc = vllm_config.cache_config
    if tag is None:
        tag = getattr(cc, "kv_cache_layout", None)
    if tag is None and not hasattr(cc, "kv_cache_layout"):
        tag = _layout_tag_02x(vllm_config)
    return str(tag or "default")


def _layout_tag_02x(vllm_config: "VllmConfig") -> Optional[str]:
    # vLLM 0.2x get_kv_cache_layout(), minus its process-dependent parts:
    # a backend's override (set in this process only), the environment,
    # what the configured connector requires, else NHD.
    try:
        from vllm.v1.attention.backends import utils as attn_utils
    except ImportError:  # pragma: no cover - a vLLM without it
        return None
    override = getattr(attn_utils, "_KV_CACHE_LAYOUT_OVERRIDE", None)
    if override is not None:
        return str(override)
    try:
        import vllm.envs as envs

        env = envs.VLLM_KV_CACHE_LAYOUT
    except (ImportError, AttributeError):  # pragma: no cover
        env = None
    if env:
        return str(env)
    ktc = vllm_config.kv_transfer_config
    if ktc is not None:
        try:
            from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

            cls = KVConnectorFactory.get_connector_class(ktc)
            required = cls.get_required_kvcache_layout(vllm_config)
        except Exception:  # noqa: BLE001 - an unregistered or broken connector
            required = None
        if required is not None:
            return str(required)
    return "NHD"


def namespaces_for(
    vllm_config: "VllmConfig",
    shape: KvShape,
    model_id: Optional[str],
    kv_cache_config: "Optional[KVCacheConfig]" = None,
    group_tag: Optional[str] = None,
) -> list[int]:
    """The namespace of each TP rank (MLA: one, shared by all ranks).

    ``group_tag``: a hybrid model's KV cache group (``groups.group_tag``),
    so that each group, and each model's set of groups, has its own."""
    tp = int(vllm_config.parallel_config.tensor_parallel_size)
    model = model_id or str(vllm_config.model_config.model)
    major, minor = vllm_version()
    # The vLLM minor version is part of the format: its KV layouts change
    # between releases, and a wrong guess would load garbage.
    fmt = f"{shape.dtype}|vllm{major}.{minor}|{layout_tag(vllm_config, kv_cache_config)}"
    if group_tag is not None:
        fmt += f"|{group_tag}"
    common = dict(
        model=model,
        dtype=fmt,
        kind="mla" if shape.is_mla else "split_kv",
        order="opaque",
        num_layers=shape.num_layers,
        num_segments=shape.num_layers,
        piece_bytes=shape.layer_block_bytes // (1 if shape.is_mla else 2),
        block_tokens=shape.block_size,
        dtype_size=shape.dtype_size,
        tp_size=tp,
    )
    if shape.is_mla:
        return [_native.namespace_fingerprint(tp_rank=None, **common)]
    return [_native.namespace_fingerprint(tp_rank=r, **common) for r in range(tp)]


def worker_tp_rank(vllm_config: "VllmConfig") -> int:
    """This worker's tensor-parallel rank.

    In a vLLM worker the TP group is initialized before the connector is
    built (vLLM 0.25 and 0.32 even broadcast over it first), and its
    ``rank_in_group`` is the rank vLLM itself uses. Without a TP group (a
    process that is not a vLLM worker: tests, tools) the rank vLLM's
    ``Worker`` writes into ``parallel_config.rank`` is used. Either way an
    impossible value is an error, never a silent rank 0; the scheduler then
    checks each worker's rank against vLLM's (``adopt_worker_namespaces``).
    """
    pc = vllm_config.parallel_config
    tp = int(pc.tensor_parallel_size)
    group = _tp_group()
    if group is not None:
        world, rank = int(group.world_size), int(group.rank_in_group)
        if world != tp or not 0 <= rank < tp:
            raise ConfigError(
                f"vLLM's tensor-parallel group has rank {rank} of {world} but "
                f"tensor_parallel_size is {tp}; PegaFlow cannot tell which shard this "
                "worker holds (a vLLM bug or an unsupported parallel setup)"
            )
        return rank
    rank = getattr(pc, "rank", None)
    world = int(getattr(pc, "world_size", tp) or tp)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < max(world, tp):
        raise ConfigError(
            f"PegaKVConnector worker: no tensor-parallel group and parallel_config.rank is "
            f"{rank!r} (world size {world}); build worker connectors in a vLLM worker, or set "
            "parallel_config.rank to this worker's rank"
        )
    return rank % tp


def _tp_group() -> Any:
    """vLLM's TP group in this process, or None when it has none."""
    try:
        from vllm.distributed.parallel_state import get_tp_group, model_parallel_is_initialized
    except ImportError:  # pragma: no cover - a vLLM without them
        return None
    if not model_parallel_is_initialized():
        return None
    return get_tp_group()
