"""Describe torch KV-cache tensors as a PegaFlow ``KvCache`` layout.

Works from memory geometry only (``data_ptr``, ``shape``, ``stride``,
``element_size``), so it covers every layout vLLM has used without naming
attention backends:

* vLLM <= 0.2x FlashAttention / FlashInfer: one tensor per layer,
  ``[2, num_blocks, ...]`` (K/V leading) or ``[num_blocks, 2, ...]``; a block
  of a layer is a K piece and a V piece (``split_kv``).
* vLLM >= 0.3x standardized views ``[B, H, N, C]`` over one backing
  allocation (K and V side by side in ``C``), and MLA latent caches: a
  block of a layer is one contiguous piece (``mla`` kind: one piece per
  block per layer).

A layout whose block is neither one contiguous run nor two (K and V) is
refused with :class:`pegaflow.LayoutError`, naming the tensor's shape and
strides.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Any, Optional, Sequence

from pegaflow._native import KvCache
from pegaflow.exceptions import LayoutError

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class TensorLayout:
    """What :func:`describe_kv_tensors` found; the arguments of ``KvCache``."""

    kind: str  # "split_kv" | "mla"
    order: str  # "nhd" | "hnd" | "opaque"
    segment_bases: list[int]
    num_layers: int
    num_blocks: int
    block_tokens: int
    block_stride: int
    kv_stride: int
    piece_bytes: int
    dtype_size: int
    is_cuda: bool
    device_index: Optional[int]
    # Element order of one piece: sizes of its dims, outermost first.
    piece_dims: tuple[int, ...]

    def native_layout(self) -> dict[str, Any]:
        """The layout arguments of ``_native.KvCache``."""
        return dict(
            kind=self.kind,
            order=self.order,
            segment_bases=self.segment_bases,
            num_layers=self.num_layers,
            num_blocks=self.num_blocks,
            block_tokens=self.block_tokens,
            block_stride=self.block_stride,
            kv_stride=self.kv_stride,
            piece_bytes=self.piece_bytes,
            dtype_size=self.dtype_size,
        )

    @property
    def slot_bytes(self) -> int:
        pieces = 2 if self.kind == "split_kv" else 1
        return len(self.segment_bases) * pieces * self.piece_bytes


def _dense(sizes: Sequence[int], strides: Sequence[int]) -> bool:
    """True when dims (in any order) tile one contiguous run."""
    dims = sorted((st, sz) for sz, st in zip(sizes, strides) if sz != 1)
    expect = 1
    for st, sz in dims:
        if st != expect:
            return False
        expect *= sz
    return True


def _piece_dims(sizes: Sequence[int], strides: Sequence[int]) -> tuple[int, ...]:
    return tuple(sz for st, sz in sorted(zip(strides, sizes), reverse=True) if sz != 1)


def _describe_one(t: "torch.Tensor", num_blocks: int) -> tuple[str, int, int, int, tuple[int, ...]]:
    shape, stride = list(t.shape), list(t.stride())
    candidates = [d for d, s in enumerate(shape) if s == num_blocks]
    if not candidates:
        raise LayoutError(
            f"KV tensor of shape {tuple(shape)} has no dimension of num_blocks={num_blocks}; "
            "unsupported attention layout"
        )
    # [2, B, ...] with B == 2 is ambiguous; the K/V-leading layout puts the
    # block dim second and K/V first, so prefer the dim with the larger
    # stride only when it is not a K/V dim of size 2 in front.
    errors = []
    for bd in sorted(candidates, key=lambda d: (shape[0] == 2 and d == 0 and len(shape) == 5, d)):
        rest = [d for d in range(len(shape)) if d != bd]
        sizes = [shape[d] for d in rest]
        strides = [stride[d] for d in rest]
        if _dense(sizes, strides):
            return "mla", bd, -1, prod(sizes), _piece_dims(sizes, strides)
        for kd in rest:
            if shape[kd] != 2:
                continue
            r2 = [d for d in rest if d != kd]
            s2 = [shape[d] for d in r2]
            st2 = [stride[d] for d in r2]
            if _dense(s2, st2):
                return "split_kv", bd, kd, prod(s2), _piece_dims(s2, st2)
        errors.append(bd)
    raise LayoutError(
        f"unsupported attention layout: KV tensor of shape {tuple(shape)} and strides "
        f"{tuple(stride)} does not store a block as one contiguous run or as a K and a V "
        "run; pick an attention backend with a paged [2, num_blocks, ...] or "
        "[num_blocks, ...] cache"
    )


def describe_kv_tensors(
    tensors: Sequence["torch.Tensor"],
    num_blocks: int,
    block_tokens: int,
    num_heads: Optional[int] = None,
) -> TensorLayout:
    """Describe per-layer KV tensors (model layer order) as one layout.

    ``num_blocks``: blocks per layer (vLLM's ``num_gpu_blocks``; with kernel
    block splitting, the number of blocks the tensors are indexed by).
    """
    if not tensors:
        raise LayoutError("no KV cache tensors to register")
    first = tensors[0]
    kind, bd, kd, piece_elems, dims = _describe_one(first, num_blocks)
    es = first.element_size()
    for i, t in enumerate(tensors[1:], 1):
        if tuple(t.shape) != tuple(first.shape) or t.stride() != first.stride() or t.dtype != first.dtype:
            raise LayoutError(
                f"KV tensor of layer {i} has shape {tuple(t.shape)}/{t.stride()}/{t.dtype}, layer 0 "
                f"{tuple(first.shape)}/{first.stride()}/{first.dtype}; layers of one cache must match "
                "(hybrid models with several KV cache groups are not supported)"
            )
        if t.device != first.device:
            raise LayoutError(f"KV tensors on several devices ({first.device}, {t.device})")
    order = "opaque"
    if kind == "split_kv" and num_heads is not None and len(dims) == 3:
        if dims[0] == block_tokens and dims[1] == num_heads:
            order = "nhd"
        elif dims[0] == num_heads and dims[1] == block_tokens:
            order = "hnd"
    elif kind == "mla" and num_heads is not None and len(dims) >= 2 and num_heads > 1:
        if dims[0] == block_tokens and dims[1] == num_heads:
            order = "nhd"
        elif dims[0] == num_heads and dims[1] == block_tokens:
            order = "hnd"
    stride = first.stride()
    return TensorLayout(
        kind=kind,
        order=order,
        segment_bases=[int(t.data_ptr()) for t in tensors],
        num_layers=len(tensors),
        num_blocks=num_blocks,
        block_tokens=block_tokens,
        block_stride=stride[bd] * es,
        kv_stride=stride[kd] * es if kd >= 0 else 0,
        piece_bytes=piece_elems * es,
        dtype_size=es,
        is_cuda=first.device.type == "cuda",
        device_index=(first.device.index or 0) if first.device.type == "cuda" else None,
        piece_dims=dims,
    )


def kv_cache_from_tensors(
    tensors: Sequence["torch.Tensor"],
    *,
    num_blocks: int,
    block_tokens: int,
    model: str,
    dtype: str,
    num_heads: Optional[int] = None,
    tp_size: int = 1,
    tp_rank: Optional[int] = None,
    namespace: Optional[int] = None,
    name: Optional[str] = None,
    socket: Optional[str] = None,
    label: str = "",
    backend: str = "auto",
) -> KvCache:
    """A :class:`KvCache` over ``tensors`` (kept alive by it).

    CPU tensors use the host copy backend; CUDA tensors the configured GPU
    backend (``auto``: batched DMA for loads, the copy kernel for saves unless
    loads are in flight, DMA for large pieces; see docs/benchmarks.md).
    """
    lay = describe_kv_tensors(tensors, num_blocks, block_tokens, num_heads)
    kw: dict[str, Any] = dict(
        **lay.native_layout(),
        model=model,
        dtype=dtype,
        tp_size=tp_size,
        tp_rank=tp_rank,
        namespace=namespace,
        name=name,
        socket=socket,
        label=label,
        backend=backend if lay.is_cuda else "host",
        device=lay.device_index,
        keepalive=list(tensors),
    )
    return KvCache(**kw)
