"""The KV format of a vLLM instance and the namespaces it saves under.

A namespace is a 64-bit fingerprint of everything that changes a block's
bytes (model, dtype, layout, block size, layers, tensor-parallel size and
rank; see ``_native.namespace_fingerprint``). The scheduler computes every
rank's namespace to look blocks up; each worker computes its own to save and
load. Both must compute it from the same inputs, so everything here is a
function of vLLM's config and ``KVCacheConfig`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from pegaflow import _native
from pegaflow.exceptions import LayoutError

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


def layout_tag(vllm_config: "VllmConfig") -> str:
    """What decides the byte order inside a block, as this vLLM resolves it."""
    cc = vllm_config.cache_config
    tag = getattr(cc, "kv_cache_layout", None)
    if tag is None:
        try:  # vLLM 0.2x: one global NHD/HND switch
            from vllm.v1.attention.backends.utils import get_kv_cache_layout

            tag = get_kv_cache_layout()
        except Exception:  # noqa: BLE001 - older/newer vLLM or uninitialized
            tag = None
    return str(tag or "default")


def namespaces_for(
    vllm_config: "VllmConfig", shape: KvShape, model_id: Optional[str]
) -> list[int]:
    """The namespace of each TP rank (MLA: one, shared by all ranks)."""
    tp = int(vllm_config.parallel_config.tensor_parallel_size)
    model = model_id or str(vllm_config.model_config.model)
    major, minor = vllm_version()
    # The vLLM minor version is part of the format: its KV layouts change
    # between releases, and a wrong guess would load garbage.
    fmt = f"{shape.dtype}|vllm{major}.{minor}|{layout_tag(vllm_config)}"
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
    """This worker's tensor-parallel rank."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # noqa: BLE001 - not initialized (tests, single process)
        pc = vllm_config.parallel_config
        return int(getattr(pc, "rank", 0)) % max(1, int(pc.tensor_parallel_size))
