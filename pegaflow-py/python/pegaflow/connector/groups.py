"""Hybrid models: several KV cache groups in one model (vLLM's hybrid KV
cache manager, ``SupportsHMA``).

vLLM gives each kind of attention layer its own *group*: its own spec, its
own layers and its own block table (block ids are unique across groups: all
groups draw from one block pool, and their tensors overlay each other).
gpt-oss alternates sliding-window and full attention, Gemma 3 has five local
layers to one global. PegaFlow saves each group under its own namespace
(:func:`group_tag` goes into it), with its own slots (a slot holds one block
of the group's layers), so groups of one model never collide and a model
whose groups differ never shares.

What each group keeps in the pool, and what a hit needs from it:

* **full attention**: every block, as a model with one group. A hit of
  ``n`` blocks needs blocks ``[0, n)``.
* **sliding window** (window ``W`` tokens): a hit of ``n`` blocks needs
  only the blocks vLLM keeps for position ``n * block_size``: from
  ``(n * bs - W + 1) // bs`` on (:meth:`Group.first_needed`, vLLM's own
  ``get_num_skipped_tokens``); vLLM puts its null block in the others. So
  that the group costs the pool about its window rather than the whole
  prompt, a block is saved only when it lies in the window of a
  *checkpoint*: the end of the prompt (its last full block, and the last
  one before it that leaves a token to compute) and every
  :data:`CHECKPOINT_WINDOWS` windows. A prefix shared with a new request is
  therefore hit up to the last checkpoint it covers.
* **mamba / linear attention** (a recurrent state per request, Gated
  DeltaNet included), with vLLM's prefix caching on (its ``align`` mamba
  cache mode, vLLM >= 0.30): block ``i`` of the group's block table holds
  the state after ``(i + 1) * block_size`` tokens when vLLM materialized it
  there (a step that ended on that boundary, or vLLM's prefill checkpoint)
  and vLLM's null block otherwise. PegaFlow saves each state block the step
  that reaches its boundary, under the key of the boundary's block; a hit of
  ``n`` blocks needs the state at ``n`` (block ``n - 1``), which is loaded
  into block ``n - 1``, where vLLM reads it. Such loads are always
  asynchronous: vLLM copies the hit state out of that block before the
  step's layer-wise loads would have started. In any other mode (prefix
  caching off: one running state per request; speculative blocks) the
  model runs with the connector but PegaFlow caches nothing for it.

The hit (:func:`longest_hit`) is the longest prefix every group has what it
needs for: the full groups' common leading hits, then shortened until each
sliding group holds its window, jumping back past the first missing block
each time (a fixed point, reached in a few probes).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from pegaflow._log import get_logger
from pegaflow.connector.metadata import LoadSpec, SaveSpec
from pegaflow.connector.namespace import KvShape
from pegaflow.exceptions import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import KVCacheConfig

    from pegaflow.connector.metadata import PegaConnectorMetadata, PegaHandshake
    from pegaflow.connector.scheduler import ReqState

logger = get_logger("pegaflow.connector")

FULL = "full"
SLIDING = "sliding"
MAMBA = "mamba"

#: Sliding-window groups keep the window before every this many windows
#: of a prompt (besides its end): the pool cost of a sliding group is then
#: at most 1/CHECKPOINT_WINDOWS of a full one, plus one window per prompt.
CHECKPOINT_WINDOWS = 4

#: vLLM's null block: placed in a block table where nothing is stored
#: (blocks before a sliding window); never loaded into, never saved.
NULL_BLOCK = 0


@dataclass(frozen=True)
class Group:
    """One KV cache group of a hybrid model, as PegaFlow treats it."""

    index: int
    kind: str
    shape: KvShape
    layer_names: tuple[str, ...]
    #: sliding window in tokens (sliding groups)
    window: int = 0
    #: vLLM >= 0.32: tokens kept below the window (multi-token prediction)
    extra_retained: int = 0
    #: vLLM's spec class name (messages)
    spec_name: str = ""
    #: vLLM >= 0.32 marks groups it rebuilds itself after a connector load
    #: (accelerator-side replicas): PegaFlow neither saves nor loads them
    transfer: bool = True
    #: why PegaFlow cannot cache this group ("" when it can)
    unsupported_why: str = ""

    @property
    def block_size(self) -> int:
        return self.shape.block_size

    def first_needed(self, n_blocks: int) -> int:
        """First block a hit of ``n_blocks`` blocks needs from this group."""
        if self.kind == MAMBA:
            return max(0, n_blocks - 1)  # the state at the hit boundary only
        if self.kind != SLIDING:
            return 0
        skipped = max(0, n_blocks * self.block_size - self.window + 1 - self.extra_retained)
        return min(n_blocks, skipped // self.block_size)

    @property
    def window_blocks(self) -> int:
        """Blocks a hit needs from this group, at most (sliding groups)."""
        big = 1 << 20
        return big - self.first_needed(big)


def _spec_kind(spec: Any) -> str:
    try:
        from vllm.v1.kv_cache_interface import (
            FullAttentionSpec,
            MambaSpec,
            SlidingWindowSpec,
        )
    except ImportError:  # pragma: no cover
        return "unknown"
    if isinstance(spec, SlidingWindowSpec):
        return SLIDING
    if isinstance(spec, MambaSpec):
        return MAMBA
    # vLLM 0.32's FullAttentionSpec carries a sliding_window when the hybrid
    # manager is off (every block kept): still a full group for PegaFlow.
    if isinstance(spec, FullAttentionSpec):
        return FULL
    return "unknown"


def is_hybrid(kv_cache_config: "KVCacheConfig") -> bool:
    """More than one group, or one group that is not full attention (a
    model whose every layer is sliding-window)."""
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
    if len(groups) != 1:
        return True
    return _spec_kind(groups[0].kv_cache_spec) != FULL


def _shape(spec: Any, num_layers: int) -> KvShape:
    import torch

    page = int(spec.page_size_bytes)
    if _spec_kind(spec) == MAMBA:
        # vLLM hands the connector each mamba layer as the state bytes of a
        # block (conv and SSM state), inside a page padded to the attention
        # layers' page size
        page = int(getattr(spec, "state_content_size_bytes", 0) or getattr(spec, "real_page_size_bytes", page))

    try:
        from vllm.v1.kv_cache_interface import MLAAttentionSpec
    except ImportError:  # pragma: no cover
        MLAAttentionSpec = ()  # type: ignore[assignment]
    dtype = getattr(spec, "dtype", None)
    if dtype is None:
        dtypes = getattr(spec, "dtypes", None) or ()
        dtype = dtypes[0] if dtypes else torch.uint8
    return KvShape(
        block_size=int(spec.block_size),
        num_layers=num_layers,
        layer_block_bytes=page,
        dtype=str(dtype).replace("torch.", ""),
        dtype_size=torch.empty((), dtype=dtype).element_size(),
        is_mla=bool(MLAAttentionSpec) and isinstance(spec, MLAAttentionSpec),
    )


def _mamba_why(spec: Any, kv_cache_config: "KVCacheConfig") -> str:
    """Why PegaFlow cannot cache this mamba group ("" when it can)."""
    from pegaflow.connector.namespace import vllm_version

    if vllm_version() < (0, 30):
        return "mamba state on vLLM < 0.30"
    mode = getattr(spec, "mamba_cache_mode", "none")
    if mode != "align":
        return f"mamba cache mode {mode!r} (needs vLLM's prefix caching on: 'align')"
    if int(getattr(spec, "num_speculative_blocks", 0) or 0):
        return "mamba state with speculative decoding"
    bs = int(spec.block_size)
    for what in ("hash_block_size", "cache_hit_alignment_tokens"):
        v = getattr(kv_cache_config, what, None)
        if v is not None and int(v) != bs:
            return f"mamba state with {what} {v} != block size {bs}"
    return ""


def kv_groups(kv_cache_config: "KVCacheConfig") -> list[Group]:
    """vLLM's KV cache groups, in vLLM's order (the index is vLLM's)."""
    out = []
    for i, g in enumerate(kv_cache_config.kv_cache_groups):
        spec = g.kv_cache_spec
        kind = _spec_kind(spec)
        why = ""
        if kind == MAMBA:
            why = _mamba_why(spec, kv_cache_config)
        elif kind not in (FULL, SLIDING):
            why = type(spec).__name__
        out.append(
            Group(
                index=i,
                kind=kind,
                shape=_shape(spec, len(g.layer_names)),
                layer_names=tuple(g.layer_names),
                window=int(getattr(spec, "sliding_window", 0) or 0) if kind == SLIDING else 0,
                extra_retained=int(getattr(spec, "extra_retained_tokens", 0) or 0),
                spec_name=type(spec).__name__,
                transfer=bool(getattr(g, "enable_kv_transfer", True)),
                unsupported_why=why,
            )
        )
    return out


def unsupported(groups: Sequence[Group]) -> list[Group]:
    """Groups PegaFlow cannot cache yet (with them, it caches nothing)."""
    return [g for g in groups if g.transfer and g.unsupported_why]


def cached(groups: Sequence[Group]) -> list[Group]:
    """The groups PegaFlow saves and loads."""
    return [g for g in groups if g.transfer]


def group_tag(groups: Sequence[Group], g: Group) -> str:
    """What goes into group ``g``'s namespace besides the usual shape: the
    model's whole group structure (kinds, windows, layers), and which group
    this is. Two models that differ in any group never share a namespace."""
    h = hashlib.sha256()
    for x in groups:
        h.update(f"{x.index}|{x.kind}|{x.window}|{x.extra_retained}|{x.spec_name}|".encode())
        h.update("\n".join(x.layer_names).encode() + b"\0")
    return f"hma:{h.hexdigest()[:16]}:g{g.index}/{len(groups)}:{g.kind}:w{g.window}"


def has_state(groups: Sequence[Group]) -> bool:
    """A mamba group is cached: hits are loaded asynchronously (see above)."""
    return any(g.kind == MAMBA for g in groups)


def checkpoint_every(groups: Sequence[Group]) -> int:
    """Blocks between two checkpoints of the sliding groups."""
    wb = max((g.window_blocks for g in groups if g.kind == SLIDING), default=1)
    return max(1, CHECKPOINT_WINDOWS * wb)


def prompt_checkpoints(num_prompt_tokens: int, block_size: int) -> tuple[int, ...]:
    """The boundaries (in blocks) at the end of a prompt that a later
    request may hit: its last full block, and the last one that leaves a
    token to compute when the same prompt comes again."""
    return tuple(sorted({(num_prompt_tokens - 1) // block_size, num_prompt_tokens // block_size}))


def sliding_keeps(g: Group, block: int, every: int, ends: Sequence[int]) -> bool:
    """Whether sliding group ``g`` saves ``block``: it lies in the window of
    a checkpoint (a multiple of ``every``, or one of ``ends``)."""
    nxt = (block // every + 1) * every  # the first multiple of ``every`` after block
    if g.first_needed(nxt) <= block:
        return True
    return any(b > block and g.first_needed(b) <= block for b in ends)


def longest_hit(
    groups: Sequence[Group],
    max_blocks: int,
    held: Callable[[Group, int, int], int],
) -> int:
    """The longest hit (in blocks, at most ``max_blocks``) for which every
    group has what it needs.

    ``held(g, lo, hi)``: how many of blocks ``lo, lo+1, ... hi-1`` of group
    ``g`` the pool holds, counted from ``lo`` up to the first missing one.

    A fixed point: ``n`` starts at the full groups' common leading hits and
    only goes down, each time to just before a block some group needs and
    lacks. No ``n`` above a missing needed block can be a hit (the window of
    every larger boundary contains it, since :meth:`Group.first_needed` never
    decreases), so the first ``n`` every group accepts is the longest hit.
    """
    n = max_blocks
    for g in groups:
        if g.kind == FULL and n > 0:
            n = min(n, held(g, 0, n))
    others = [g for g in groups if g.kind != FULL]
    moved = True
    while n > 0 and moved:
        moved = False
        for g in others:
            lo = g.first_needed(n)
            c = held(g, lo, n)
            if c < n - lo:
                n = lo + c
                moved = True
                break
    return n


@dataclass
class GroupReq:
    """What the scheduler side remembers about one request, per group."""

    #: each group's block ids, in request order (vLLM's null block where
    #: nothing is stored)
    block_ids: list[list[int]]
    #: blocks [0, saved[g]) of group g need no save planning any more
    saved: list[int]
    #: pins of group g (one ``Pins`` per namespace) cover blocks
    #: [pin_from[g], pinned_blocks)
    pins: list[list[Any]] = field(default_factory=list)
    pin_from: list[int] = field(default_factory=list)


def new_group_req(groups: Sequence[Group]) -> GroupReq:
    """Per-group state, indexed by vLLM's group index."""
    n = max((g.index for g in groups), default=-1) + 1
    return GroupReq(block_ids=[[] for _ in range(n)], saved=[0] * n)


class GroupScheduling:
    """The hybrid-model half of the scheduler side (mixed into
    :class:`pegaflow.connector.scheduler.SchedulerSide`, whose state it
    uses): the lookup over every group, one load per group, each group's
    saves. Used when ``self.groups`` is set (a model of several groups)."""

    # set by SchedulerSide
    groups: Optional[list[Group]]
    group_namespaces: Optional[list[list[int]]]
    engine: Any
    block_size: int
    tp_size: int
    load_mode: str
    _loads: list[Any]
    _step_loading: list[Any]
    _loading: dict[str, Any]
    _last_scheduled: set[str]

    _matched: Callable[..., tuple[Optional[int], bool]]

    def _adopt_group_namespaces(self, ours: "dict[int, PegaHandshake]") -> None:
        assert self.groups is not None
        per_rank = [tuple(ours[r].group_namespaces) for r in range(self.tp_size)]
        if any(len(ns) != len(self.groups) for ns in per_rank):
            raise ConfigError(
                f"PegaFlow workers report {[len(ns) for ns in per_rank]} KV cache groups but the "
                f"scheduler has {len(self.groups)}; every worker must run the same model"
            )
        # (the workers report the cached groups, in the scheduler's order)
        self.group_namespaces = [
            [per_rank[r][i] for r in range(self.tp_size)] for i in range(len(self.groups))
        ]

    def _group_lookup(
        self, st: "ReqState", hashes: list[bytes], local: int, num_computed_tokens: int
    ) -> tuple[Optional[int], bool]:
        """A hybrid model's lookup: the longest hit every group has what it
        needs for (``groups.longest_hit``), each group's needed blocks pinned.

        The hit ends on a block boundary that leaves a token to compute:
        vLLM decides which sliding-window blocks it keeps from where the hit
        ends, and so must the lookup."""
        assert self.groups is not None and self.group_namespaces is not None and st.hy is not None
        eng, gns = self.engine, self.group_namespaces
        hashes = hashes[: (st.request.num_tokens - 1) // self.block_size]
        if len(hashes) <= local:
            return 0, False

        pos = {g.index: i for i, g in enumerate(self.groups)}

        def held(g: Group, lo: int, hi: int) -> int:
            return min(eng.count_hits(ns, hashes[lo:hi]) for ns in gns[pos[g.index]])

        n = longest_hit(self.groups, len(hashes), held)
        if n <= local:
            st.hy.saved = [max(s, n) for s in st.hy.saved]
            return 0, False
        pins: list[list[Any]] = []
        pin_from: list[int] = []
        ok = True
        for g, g_ns in zip(self.groups, gns):
            lo = max(local, g.first_needed(n))
            ps = [eng.lookup(ns, hashes[lo:n]) for ns in g_ns]
            pins.append(ps)
            pin_from.append(lo)
            if any(len(p) < n - lo for p in ps):
                ok = False  # evicted since it was counted: a miss this time
        flat = [p for ps in pins for p in ps]
        if not ok or len({p.segment_id for p in flat}) != 1:
            for p in flat:
                p.release()
            return 0, False
        st.pins = flat
        st.hy.pins, st.hy.pin_from = pins, pin_from
        st.pinned_blocks = n
        st.load_from = local
        st.layerwise = not has_state(self.groups) and (
            self.load_mode == "layerwise"
            or (self.load_mode == "auto" and not (self._last_scheduled - {st.request.request_id}))
        )
        st.hy.saved = [max(s, n) for s in st.hy.saved]
        return self._matched(st, num_computed_tokens)

    def _group_loads(self, st: "ReqState", blocks: "KVCacheBlocks") -> None:
        """One LoadSpec per group (an async load is over once every group's
        worker side reported it), each into that group's blocks."""
        assert self.groups is not None and st.hy is not None and st.pins is not None
        ids_all = blocks.get_block_ids()
        st.load_pending = True
        for g, ps, lo in zip(self.groups, st.hy.pins, st.hy.pin_from):
            ids = list(ids_all[g.index][lo : st.pinned_blocks])
            keep = [i for i, b in enumerate(ids) if b != NULL_BLOCK]
            pinned = [p.blocks(0, len(ids)) for p in ps]
            self._loads.append(
                LoadSpec(
                    req_id=st.request.request_id,
                    block_ids=[ids[i] for i in keep],
                    segment_id=st.pins[0].segment_id,
                    blocks=[[b[i] for i in keep] for b in pinned],
                    layerwise=st.layerwise,
                    group=g.index,
                )
            )
        if st.layerwise:
            self._step_loading.append(st)
        else:
            self._loading[st.request.request_id] = st

    def _plan_group_saves(self, meta: "PegaConnectorMetadata", st: "ReqState", computed: int) -> None:
        """Each group's newly computed blocks it keeps (see .groups). A mamba
        group's non-null blocks among them hold the state at their end."""
        assert self.groups is not None and st.hy is not None
        hashes = st.keys.upto(computed // self.block_size)
        every = checkpoint_every(self.groups)
        ends = prompt_checkpoints(st.request.num_prompt_tokens, self.block_size)
        for g in self.groups:
            ids = st.hy.block_ids[g.index]
            top = min(len(hashes), len(ids))
            lo = st.hy.saved[g.index]
            if top <= lo:
                continue
            sel = [
                i
                for i in range(lo, top)
                if ids[i] != NULL_BLOCK
                and (g.kind != SLIDING or sliding_keeps(g, i, every, ends))
            ]
            st.hy.saved[g.index] = top
            if sel:
                meta.saves.append(
                    SaveSpec(
                        req_id=st.request.request_id,
                        block_ids=[ids[i] for i in sel],
                        hashes=[hashes[i] for i in sel],
                        group=g.index,
                    )
                )
                st.had_saves = True


class _GroupTraces:
    def __init__(self, traces: "list[Any]"):
        self.traces = traces

    def take(self) -> Any:
        metas = [m for m in (t.take() for t in self.traces) if m is not None]
        if not metas:
            return None
        out = metas[0]
        for m in metas[1:]:
            out = out.aggregate(m)
        return out


class GroupedWorker:
    """The worker side of a hybrid model: one :class:`WorkerSide` per group
    (each with its own ``KvCache`` over that group's layers, under that
    group's namespace), seen by vLLM as one.

    Groups share vLLM's blocks (a block freed by one group may be handed to
    another in the next step), so every group's saves are fenced before any
    group loads. A request is reported done sending once every group that
    saved blocks of it committed them, done receiving once every group's
    load of it is over (the scheduler sends every group a load spec).
    """

    def __init__(self, sides: "list[Any]", tp_rank: int, layout: str):
        self.sides = sides
        self.tp_rank = tp_rank
        self.layout = layout
        #: finished request -> groups whose saves of it are not committed yet
        self._owing: dict[str, set[int]] = {}
        #: async load -> groups that reported it over
        self._recv_done: dict[str, set[int]] = {}

    @property
    def kv(self) -> Any:
        return self.sides[0].kv if self.sides else None

    @property
    def namespace(self) -> int:
        return self.sides[0].namespace if self.sides else 0

    @property
    def trace(self) -> "_GroupTraces":
        """Every group's copy notes (load traces), taken together."""
        return _GroupTraces([s.trace for s in self.sides if getattr(s, "trace", None) is not None])

    def handshake(self) -> Any:
        from pegaflow.connector.metadata import PegaHandshake

        if not self.sides:
            return None
        return PegaHandshake(
            tp_rank=self.tp_rank,
            namespace=self.sides[0].namespace,
            layout=self.layout,
            group_namespaces=tuple(s.namespace for s in self.sides),
        )

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        for s in self.sides:
            s.register_kv_caches(kv_caches)

    def start_load_kv(self, meta: Any) -> None:
        from pegaflow.exceptions import PegaflowError

        if meta is not None and meta.loads:
            for s in self.sides:
                if s.kv is not None and s._device_is_cuda:
                    try:
                        s.kv.fence_saves(s._stream())
                    except PegaflowError as e:
                        logger.warning("PegaFlow could not order saves before the step: %s", e)
        for s in self.sides:
            s.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        for s in self.sides:
            s.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, meta: Any) -> None:
        for s in self.sides:
            s.save_kv_layer(layer_name, meta)

    def wait_for_save(self, meta: Any) -> None:
        for s in self.sides:
            s.wait_for_save(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[Optional[set[str]], Optional[set[str]]]:
        for r in finished_req_ids:
            owing = {i for i, s in enumerate(self.sides) if s.saw_saves(r)}
            if owing:
                self._owing[r] = owing
        sending: set[str] = set()
        recving: set[str] = set()
        for i, s in enumerate(self.sides):
            snd, rcv = s.get_finished(finished_req_ids)
            for r in snd or ():
                owing = self._owing.get(r)
                if owing is not None:
                    owing.discard(i)
            for r in rcv or ():
                self._recv_done.setdefault(r, set()).add(i)
        for r in [r for r, o in self._owing.items() if not o]:
            del self._owing[r]
            sending.add(r)
        for r in [r for r, d in self._recv_done.items() if len(d) == len(self.sides)]:
            del self._recv_done[r]
            recving.add(r)
        return (sending or None), (recving or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errs: set[int] = set()
        for s in self.sides:
            errs |= s.get_block_ids_with_load_errors()
        return errs

    def stats(self) -> dict[str, Any]:
        """The counters of group 0's owner client, plus every group's."""
        per = [s.stats() for s in self.sides]
        out = dict(per[0]) if per else {}
        out["groups"] = per
        return out

    def shutdown(self) -> None:
        for s in self.sides:
            s.shutdown()
