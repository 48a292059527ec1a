"""SGLang's host KV pool described as a PegaFlow ``KvCache`` layout, and the
namespace its pages are stored under.

SGLang's HiCache keeps a host (CPU) copy of its KV cache in a *host pool*:
one big tensor, ``kv_buffer``, cut into pages of ``page_size`` tokens. A
page's token indices are ``p * page_size .. (p + 1) * page_size``; the
storage interface names pages by those indices (``host_indices``).
Where a page's bytes are depends on the pool class and its
``--hicache-mem-layout``:

=====================  ======================================  ===========================
pool, layout           ``kv_buffer`` shape                     one page is
=====================  ======================================  ===========================
MHA ``layer_first``    ``[2, L, tokens, H, D]``                a K and a V run per layer
MHA ``page_first``     ``[2, tokens, L, H, D]``                one K run and one V run
MHA ``page_first_direct`` ``[2, pages, L, page, H, D]``        one K run and one V run
MHA ``page_head``      ``[2, pages, H, page, L, D]``           one K run and one V run
MLA ``layer_first``    ``[L, tokens, 1, C]``                   one run per layer
MLA ``page_first``     ``[tokens, L, 1, C]``                   one run
MLA ``page_first_direct`` ``[pages, L, page, 1, C]``           one run
=====================  ======================================  ===========================

Each is handed to :func:`pegaflow.tensors.describe_kv_tensors` as views
indexed by page (one view per layer for ``layer_first``, one view of the
whole buffer otherwise), so the copies between SGLang's pool and ours are
the native host backend's (``memcpy`` of whole runs, adjacent runs
coalesced), never Python loops. A slot holds one page:
``[segment][K|V][run]``.

Anything else (other pool classes, including subclasses that change the
buffer, ``page_unified``, ``page_first_kv_split``, decode context
parallelism) is refused with :class:`pegaflow.LayoutError` at start-up.

The namespace fingerprints what decides a page's bytes: model, dtype, pool
class, layout, head geometry, page size, layer count, tensor-parallel size
and rank (MLA: no rank, one copy shared by all ranks), pipeline stage and
attention context-parallel rank. Its format string starts with ``sglang|``,
so it never equals a vLLM namespace (``...|vllm0.32|...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from pegaflow import _native
from pegaflow.exceptions import ConfigError, LayoutError
from pegaflow.tensors import TensorLayout, describe_kv_tensors

#: Host pool classes (exact class, not subclasses: those may change the
#: buffer) and the layouts of theirs this backend can describe.
SUPPORTED_POOLS: dict[str, tuple[str, ...]] = {
    "MHATokenToKVPoolHost": ("layer_first", "page_first", "page_first_direct", "page_head"),
    "MLATokenToKVPoolHost": ("layer_first", "page_first", "page_first_direct"),
}

#: Bumped whenever what a stored page means changes (key or byte format).
FORMAT_VERSION = 1


@dataclass(frozen=True)
class HostPoolLayout:
    """What :func:`describe_host_pool` found."""

    pool_class: str
    layout: str
    is_mla: bool
    page_size: int
    num_pages: int
    num_layers: int
    dtype: str
    #: geometry of one token of one layer, for the namespace
    #: (MHA: ``h{heads}d{head_dim}``; MLA: ``c{kv_cache_dim}``)
    token_shape: str
    #: the page-indexed views the layout was read from
    views: tuple[Any, ...]
    tensor_layout: TensorLayout

    @property
    def page_bytes(self) -> int:
        return self.tensor_layout.slot_bytes


def _supported_list() -> str:
    return "; ".join(f"{cls}: {', '.join(lays)}" for cls, lays in SUPPORTED_POOLS.items())


def describe_host_pool(pool: Any) -> HostPoolLayout:
    """Describe an SGLang host pool (``MHATokenToKVPoolHost`` or
    ``MLATokenToKVPoolHost`` on CPU memory) by page."""
    import torch

    cls = type(pool).__name__
    layout = str(getattr(pool, "layout", ""))
    if cls not in SUPPORTED_POOLS:
        raise LayoutError(
            f"PegaFlow's SGLang backend cannot read host pool {cls} (layout {layout!r}); "
            f"supported: {_supported_list()}. Hybrid models (Mamba, SWA, DSA, DeepSeek V4) "
            "and FP4/MXFP8 KV are not supported yet; use another --hicache-storage-backend "
            "for them"
        )
    if layout not in SUPPORTED_POOLS[cls]:
        raise LayoutError(
            f"PegaFlow's SGLang backend does not support --hicache-mem-layout {layout} for "
            f"{cls}; use one of {', '.join(SUPPORTED_POOLS[cls])}"
        )
    if int(getattr(pool, "dcp_size", 1) or 1) != 1:
        raise LayoutError(
            "PegaFlow's SGLang backend does not support decode context parallelism "
            "(the host pool holds a DCP shard); run without it"
        )
    kv = getattr(pool, "kv_buffer", None)
    if not isinstance(kv, torch.Tensor):
        raise LayoutError(
            f"{cls} has no host buffer (kv_buffer is {type(kv).__name__}); an allocator-only "
            "host pool cannot be stored"
        )
    if kv.device.type != "cpu":
        raise LayoutError(f"{cls}.kv_buffer is on {kv.device}; SGLang's host pool must be CPU memory")
    if not kv.is_contiguous():
        raise LayoutError(f"{cls}.kv_buffer (shape {tuple(kv.shape)}) is not contiguous")
    page = int(pool.page_size)
    tokens = int(pool.size)
    if page <= 0 or tokens % page:
        raise LayoutError(f"{cls}: {tokens} host tokens are not whole pages of {page}")
    pages = tokens // page
    is_mla = cls == "MLATokenToKVPoolHost"
    layers = int(pool.layer_num)
    if is_mla:
        width = int(kv.shape[-1])
        token_shape = f"c{width}"
        expect = {
            "layer_first": (layers, tokens, 1, width),
            "page_first": (tokens, layers, 1, width),
            "page_first_direct": (pages, layers, page, 1, width),
        }[layout]
        if layout == "layer_first":
            views = tuple(kv[layer].view(pages, -1) for layer in range(layers))
        else:
            views = (kv.view(pages, -1),)
    else:
        heads, head_dim = int(pool.head_num), int(pool.head_dim)
        token_shape = f"h{heads}d{head_dim}"
        expect = {
            "layer_first": (2, layers, tokens, heads, head_dim),
            "page_first": (2, tokens, layers, heads, head_dim),
            "page_first_direct": (2, pages, layers, page, heads, head_dim),
            "page_head": (2, pages, heads, page, layers, head_dim),
        }[layout]
        if layout == "layer_first":
            views = tuple(kv[:, layer].view(2, pages, -1) for layer in range(layers))
        else:
            views = (kv.view(2, pages, -1),)
    if tuple(kv.shape) != expect:
        raise LayoutError(
            f"{cls} ({layout}) has kv_buffer of shape {tuple(kv.shape)}, expected {expect}; "
            "this SGLang version lays its host pool out differently from what PegaFlow "
            "supports (docs/sglang.md lists the tested versions)"
        )
    if pages == 2:
        # describe_kv_tensors cannot tell a [2, 2, ...] K/V-leading view's
        # page dim from its K/V dim; SGLang pools are never this small.
        raise LayoutError(f"{cls}: a host pool of 2 pages is too small to store")
    tl = describe_kv_tensors(list(views), num_blocks=pages, block_tokens=page)
    want_kind = "mla" if is_mla else "split_kv"
    if tl.kind != want_kind:  # pragma: no cover - the views above make sure
        raise LayoutError(f"{cls} ({layout}) described as {tl.kind}, expected {want_kind}")
    return HostPoolLayout(
        pool_class=cls,
        layout=layout,
        is_mla=is_mla,
        page_size=page,
        num_pages=pages,
        num_layers=layers,
        dtype=str(kv.dtype).replace("torch.", ""),
        token_shape=token_shape,
        views=views,
        tensor_layout=tl,
    )


def storage_namespace(
    layout: HostPoolLayout,
    *,
    model: str,
    tp_size: int,
    tp_rank: int,
    pp_size: int = 1,
    pp_rank: int = 0,
    cp_size: int = 1,
    cp_rank: int = 0,
    format_tag: Optional[str] = None,
) -> int:
    """The 64-bit namespace this host pool's pages are stored under."""
    if not model:
        raise ConfigError(
            "PegaFlow's SGLang backend needs a model identity for its namespace: SGLang passed "
            "no model name; set pegaflow.model_id in --hicache-storage-backend-extra-config"
        )
    if not 0 <= tp_rank < max(tp_size, 1):
        raise ConfigError(f"tensor-parallel rank {tp_rank} is not in 0..{tp_size}")
    fmt = [
        layout.dtype,
        f"sglang-v{FORMAT_VERSION}",
        layout.pool_class,
        layout.layout,
        layout.token_shape,
    ]
    if format_tag:
        fmt.append(f"tag={format_tag}")
    if pp_size > 1:
        fmt.append(f"pp{pp_rank}/{pp_size}")
    if cp_size > 1:
        fmt.append(f"cp{cp_rank}/{cp_size}")
    tl = layout.tensor_layout
    return _native.namespace_fingerprint(
        model=model,
        dtype="|".join(fmt),
        kind=tl.kind,
        order="opaque",
        num_layers=layout.num_layers,
        num_segments=len(tl.segment_bases),
        piece_bytes=tl.piece_bytes,
        block_tokens=layout.page_size,
        dtype_size=tl.dtype_size,
        tp_size=tp_size,
        # MLA pages are the same on every rank: one copy for all of them.
        tp_rank=None if layout.is_mla else tp_rank,
    )
