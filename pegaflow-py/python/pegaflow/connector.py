"""``PegaKVConnector``: vLLM's KV connector (v1 API) over the PegaFlow pool.

Use it with::

    vllm serve MODEL --kv-transfer-config \\
      '{"kv_connector":"PegaKVConnector","kv_role":"kv_both",
        "kv_connector_module_path":"pegaflow.connector"}'

How a request flows
-------------------
Scheduler process (one ``Engine``, lookups only):

* ``get_num_new_matched_tokens``: counts the leading blocks of the request's
  hash chain that *every* TP rank's namespace holds, pins them (once per
  request: repeated calls reuse the pins) and returns them as an async load.
* ``update_state_after_alloc``: records the GPU blocks to load into, or
  releases the pins when vLLM decided not to load.
* ``build_connector_meta``: per step, the loads (GPU block ids + each rank's
  pinned slots) and the saves (newly completed blocks + their hashes).
* ``update_connector_output``: releases the pins of finished loads.
* ``request_finished``: keeps the blocks of a request that had saves until
  every worker reported them done (``finished_sending``).

Worker process (one ``KvCache`` per rank, its own namespace):

* ``register_kv_caches``: describes vLLM's tensors (any supported layout,
  see :mod:`pegaflow.tensors`) and checks them against the namespace the
  scheduler computed from the config; an unsupported layout fails here.
* ``start_load_kv``: copies pinned slots into the allocated blocks (async);
  ``get_finished`` reports them in ``finished_recving``.
* ``save_kv_layer`` / ``wait_for_save``: reserve slots, copy layer by
  layer, commit once the copies completed; ``get_finished`` reports finished
  requests whose saves are all committed in ``finished_sending``.

When the owner is down, lookups miss and saves are skipped (counted); a load
in flight that cannot reach its slots is reported through
``get_block_ids_with_load_errors`` (vLLM recomputes those blocks with
``kv_load_failure_policy: recompute``). No PegaFlow exception reaches vLLM
from the per-step methods.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from pegaflow import _native
from pegaflow.config import PegaflowConfig
from pegaflow.exceptions import ConfigError, LayoutError, PegaflowError
from pegaflow.tensors import describe_kv_tensors

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

try:  # vLLM >= 0.26
    from vllm.v1.metrics.cache_hit_source import CacheHitSource as _CacheHitSource
except ImportError:  # pragma: no cover - older vLLM
    _CacheHitSource = None

if TYPE_CHECKING:  # pragma: no cover
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("pegaflow.connector")

#: vLLM minor versions this connector is written and tested against.
SUPPORTED_VLLM = ((0, 25), (0, 32))


def _vllm_version() -> tuple[int, int]:
    import vllm

    parts = str(getattr(vllm, "__version__", "0.0")).split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


# --------------------------------------------------------------------------
# Metadata (scheduler -> workers), plain data so it pickles cheaply
# --------------------------------------------------------------------------


@dataclass
class LoadSpec:
    req_id: str
    block_ids: list[int]
    #: slots[rank][i] is the pinned slot holding block_ids[i] for that rank
    #: (one list for MLA, shared by all ranks).
    slots: list[list[int]]


@dataclass
class SaveSpec:
    req_id: str
    block_ids: list[int]
    hashes: list[bytes]


@dataclass
class PegaConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


# --------------------------------------------------------------------------
# Namespace: computed from the config on both sides
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _KvShape:
    block_size: int
    num_layers: int
    #: bytes of one block of one layer (K and V together)
    layer_block_bytes: int
    dtype: str
    dtype_size: int
    is_mla: bool


def _kv_shape(kv_cache_config: "KVCacheConfig") -> _KvShape:
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
    return _KvShape(
        block_size=int(spec.block_size),
        num_layers=len(layers),
        layer_block_bytes=page,
        dtype=str(dtype).replace("torch.", ""),
        dtype_size=torch.empty((), dtype=dtype).element_size(),
        is_mla=is_mla,
    )


def _layout_tag(vllm_config: "VllmConfig") -> str:
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
    vllm_config: "VllmConfig", shape: _KvShape, model_id: Optional[str]
) -> list[int]:
    """The namespace of each TP rank (MLA: one, shared by all ranks)."""
    tp = int(vllm_config.parallel_config.tensor_parallel_size)
    model = model_id or str(vllm_config.model_config.model)
    major, minor = _vllm_version()
    # The vLLM minor version is part of the format: its KV layouts change
    # between releases, and a wrong guess would load garbage.
    fmt = f"{shape.dtype}|vllm{major}.{minor}|{_layout_tag(vllm_config)}"
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


def _tp_rank(vllm_config: "VllmConfig") -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # noqa: BLE001 - not initialized (tests, single process)
        pc = vllm_config.parallel_config
        return int(getattr(pc, "rank", 0)) % max(1, int(pc.tensor_parallel_size))


# --------------------------------------------------------------------------
# Scheduler-side state
# --------------------------------------------------------------------------


@dataclass
class _ReqState:
    request: "Request"
    block_ids: list[int] = field(default_factory=list)
    #: blocks [0, saved) are in the pool (hit, loaded or saved already)
    saved: int = 0
    #: pins taken by get_num_new_matched_tokens: per namespace, (slot, gen)
    pins: Optional[list[list[tuple[int, int]]]] = None
    pinned_blocks: int = 0
    #: first block to load (the local prefix-cache hit ends there)
    load_from: int = 0
    load_pending: bool = False
    had_saves: bool = False


class PegaKVConnector(KVConnectorBase_V1):
    """vLLM KV connector backed by a node-local ``pegaflow-owner``."""

    if _CacheHitSource is not None and hasattr(_CacheHitSource, "HOST"):
        _cache_hit_source = _CacheHitSource.HOST

    def __init__(
        self,
        vllm_config: "VllmConfig",
        role: KVConnectorRole,
        kv_cache_config: "Optional[KVCacheConfig]" = None,
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ver = _vllm_version()
        if not (SUPPORTED_VLLM[0] <= ver <= SUPPORTED_VLLM[1]):
            logger.warning(
                "PegaKVConnector is tested with vLLM %d.%d .. %d.%d; this is %d.%d",
                *SUPPORTED_VLLM[0], *SUPPORTED_VLLM[1], *ver,
            )
        ktc = vllm_config.kv_transfer_config
        self.cfg = PegaflowConfig.from_extra_config(getattr(ktc, "kv_connector_extra_config", None))
        if kv_cache_config is None:
            raise ConfigError(
                "PegaKVConnector needs vLLM's kv_cache_config (vLLM >= 0.25 passes it)"
            )
        self.shape = _kv_shape(kv_cache_config)
        self.block_size = self.shape.block_size
        self.namespaces = namespaces_for(vllm_config, self.shape, self.cfg.model_id)
        self.is_mla = self.shape.is_mla
        if getattr(ktc, "kv_load_failure_policy", "recompute") == "fail":
            logger.warning(
                "kv_load_failure_policy is 'fail': a load interrupted by an owner restart "
                "fails its request; set it to 'recompute' to recompute those blocks instead"
            )
        if role == KVConnectorRole.SCHEDULER:
            self._init_scheduler()
        else:
            self._init_worker(vllm_config)

    # ------------------------------------------------------------ scheduler

    def _init_scheduler(self) -> None:
        self.engine = _native.Engine(
            name=self.cfg.name,
            socket=self.cfg.socket,
            label="vllm-scheduler",
            reconnect_interval=self.cfg.reconnect_interval,
        )
        self._reqs: dict[str, _ReqState] = {}
        self._loads: list[LoadSpec] = []
        #: req_id -> pins to release once its load reported finished
        self._loading: dict[str, _ReqState] = {}

    def _state(self, request: "Request") -> _ReqState:
        st = self._reqs.get(request.request_id)
        if st is None:
            st = _ReqState(request=request)
            self._reqs[request.request_id] = st
        return st

    @staticmethod
    def _hashes(request: "Request", n: Optional[int] = None) -> list[bytes]:
        hs = list(getattr(request, "block_hashes", None) or [])
        if n is not None:
            hs = hs[:n]
        return [bytes(h) for h in hs]

    def _release(self, st: _ReqState) -> None:
        if st.pins is not None:
            for pins in st.pins:
                if pins:
                    self.engine.release(pins)
        st.pins = None
        st.pinned_blocks = 0

    def get_num_new_matched_tokens(
        self, request: "Request", num_computed_tokens: int
    ) -> tuple[Optional[int], bool]:
        if not self.cfg.load:
            return 0, False
        try:
            st = self._state(request)
            if st.pins is None:
                hashes = self._hashes(request)
                # Never the whole prompt: vLLM must compute at least one token.
                max_blocks = max(0, (request.num_tokens - 1) // self.block_size + 1)
                hashes = hashes[:max_blocks]
                local = num_computed_tokens // self.block_size
                if len(hashes) <= local or not self.engine.is_connected():
                    return 0, False
                # A block is a hit only when every rank's namespace has it.
                n = min(self.engine.count_hits(ns, hashes) for ns in self.namespaces)
                if n <= local:
                    st.saved = max(st.saved, n)
                    return 0, False
                pins = [self.engine.lookup(ns, hashes[:n]) for ns in self.namespaces]
                got = min(len(p) for p in pins)
                # Keep exactly the blocks to load on every rank.
                st.pins = []
                for p in pins:
                    if p[:local]:
                        self.engine.release(p[:local])
                    if p[got:]:
                        self.engine.release(p[got:])
                    st.pins.append(p[local:got])
                st.pinned_blocks = got
                st.load_from = local
                st.saved = max(st.saved, got)
                if got <= local:
                    self._release(st)
                    return 0, False
            hit_tokens = min(st.pinned_blocks * self.block_size, request.num_tokens - 1)
            ext = hit_tokens - num_computed_tokens
            if ext <= 0:
                return 0, False
            return ext, True
        except PegaflowError:
            logger.exception("PegaFlow lookup failed; treating as a miss")
            return 0, False

    def update_state_after_alloc(
        self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int
    ) -> None:
        st = self._state(request)
        try:
            ids = blocks.get_block_ids()[0]
        except (AttributeError, IndexError, TypeError):
            ids = []
        if num_external_tokens <= 0:
            # Not loading (local cache covers it, or the second call after
            # the async load): drop pins that no load will use.
            if st.pins is not None and not st.load_pending:
                self._release(st)
            return
        if st.pins is None:
            return
        n = st.pinned_blocks - st.load_from
        block_ids = list(ids[st.load_from : st.load_from + n])
        if len(block_ids) < n:
            # Fewer blocks than hits were allocated: load what fits.
            n = len(block_ids)
        slots = [[slot for slot, _gen in pins[:n]] for pins in st.pins]
        st.load_pending = True
        self._loads.append(LoadSpec(req_id=request.request_id, block_ids=block_ids, slots=slots))
        self._loading[request.request_id] = st

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = PegaConnectorMetadata(loads=self._loads)
        self._loads = []
        if not self.cfg.save:
            return meta
        nst = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0]) if new.block_ids else []
            self._plan_save(meta, st, new.num_computed_tokens + nst.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        resumed = set(getattr(cached, "resumed_req_ids", ()) or ())
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            nb = cached.new_block_ids[i]
            if nb is not None:
                if req_id in resumed:
                    st.block_ids = list(nb[0])
                else:
                    st.block_ids.extend(nb[0])
            self._plan_save(meta, st, cached.num_computed_tokens[i] + nst.get(req_id, 0))
        return meta

    def _plan_save(self, meta: PegaConnectorMetadata, st: _ReqState, computed: int) -> None:
        full = min(computed // self.block_size, len(st.block_ids))
        hashes = self._hashes(st.request, full)
        full = min(full, len(hashes))
        if full <= st.saved:
            return
        meta.saves.append(
            SaveSpec(
                req_id=st.request.request_id,
                block_ids=st.block_ids[st.saved : full],
                hashes=hashes[st.saved : full],
            )
        )
        st.saved = full
        st.had_saves = True

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        for req_id in connector_output.finished_recving or ():
            st = self._loading.pop(req_id, None)
            if st is not None:
                st.load_pending = False
                self._release(st)

    def request_finished(
        self, request: "Request", block_ids: list[int]
    ) -> tuple[bool, Optional[dict[str, Any]]]:
        st = self._reqs.pop(request.request_id, None)
        if st is None:
            return False, None
        if not st.load_pending:
            self._release(st)
        # else: the load still reads its pinned slots; update_connector_output
        # releases them when the workers report it finished.
        return st.had_saves, None

    def get_scheduler_stats(self) -> dict[str, Any]:
        """Counters of the scheduler's owner client (tests, debugging)."""
        return dict(self.engine.stats())

    # --------------------------------------------------------------- worker

    def _init_worker(self, vllm_config: "VllmConfig") -> None:
        self.tp_rank = _tp_rank(vllm_config)
        self.rank_index = 0 if self.is_mla else self.tp_rank
        self.namespace = self.namespaces[self.rank_index]
        self.kv: Optional[_native.KvCache] = None
        self.layer_index: dict[str, int] = {}
        self._lock = threading.Lock()
        #: save handles of the current step: handle -> req_id
        self._step_saves: dict[int, str] = {}
        self._step_layers_done: set[int] = set()
        #: handles committed or in flight: req_id -> open handles
        self._open: dict[str, set[int]] = {}
        self._handle_req: dict[int, str] = {}
        self._finished_waiting: set[str] = set()
        self._seen_save_reqs: set[str] = set()
        self._recving: set[str] = set()
        self._load_errors: set[int] = set()
        self._load_stream: Any = None
        self._device_is_cuda = False

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = list(kv_caches)
        group_layers = list(self._kv_cache_config.kv_cache_groups[0].layer_names)
        order = [n for n in group_layers if n in kv_caches] or names
        tensors = [kv_caches[n] for n in order]
        num_blocks = int(self._kv_cache_config.num_blocks)
        lay = describe_kv_tensors(tensors, num_blocks, self.block_size)
        expect = self.shape.layer_block_bytes * self.shape.num_layers
        if lay.slot_bytes != expect:
            raise LayoutError(
                f"vLLM's KV tensors hold {lay.slot_bytes} bytes per block across "
                f"{lay.num_layers} layers but the KV cache spec says {expect} "
                f"({self.shape.num_layers} layers x {self.shape.layer_block_bytes}); "
                "unsupported attention layout"
            )
        self._device_is_cuda = lay.is_cuda
        backend = self.cfg.copy_backend if lay.is_cuda else "host"
        self.kv = _native.KvCache(
            **lay.native_layout(),
            model=self.cfg.model_id or "",
            dtype=self.shape.dtype,
            namespace=self.namespace,
            name=self.cfg.name,
            socket=self.cfg.socket,
            label=f"vllm-worker-tp{self.tp_rank}",
            backend=backend,
            device=lay.device_index,
            keepalive=tensors,
        )
        self.layer_index = {n: i for i, n in enumerate(order)}
        if lay.is_cuda:
            self._load_stream = torch.cuda.Stream(device=tensors[0].device)
        logger.info("PegaFlow registered %r for TP rank %d", self.kv, self.tp_rank)

    def _stream(self) -> int:
        if not self._device_is_cuda:
            return 0
        return int(torch.cuda.current_stream().cuda_stream)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        if self.kv is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, PegaConnectorMetadata):
            return
        stream = 0
        if self._load_stream is not None:
            # Loads are async (requests wait in WAITING_FOR_REMOTE_KVS), so
            # they get their own stream, ordered after the work queued so far.
            self._load_stream.wait_stream(torch.cuda.current_stream())
            stream = int(self._load_stream.cuda_stream)
        for ld in meta.loads:
            self._recving.add(ld.req_id)
            slots = ld.slots[0] if len(ld.slots) == 1 else ld.slots[self.rank_index]
            n = min(len(slots), len(ld.block_ids))
            if n == 0:
                continue
            try:
                self.kv.load(slots[:n], ld.block_ids[:n], stream=stream)
            except PegaflowError as e:
                logger.warning("PegaFlow load of %s failed (%s); vLLM recomputes it", ld.req_id, e)
                self._load_errors.update(ld.block_ids)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Loads are asynchronous (whole requests), reported by get_finished.
        return

    def _begin_step_saves(self) -> None:
        if self._step_saves or self.kv is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, PegaConnectorMetadata) or not meta.saves:
            return
        for sv in meta.saves:
            self._seen_save_reqs.add(sv.req_id)
            try:
                h, n = self.kv.begin_save(sv.block_ids, sv.hashes)
            except PegaflowError as e:
                logger.warning("PegaFlow save of %s skipped: %s", sv.req_id, e)
                continue
            if n:
                self._step_saves[h] = sv.req_id
                self._open.setdefault(sv.req_id, set()).add(h)
                self._handle_req[h] = sv.req_id
        self._step_layers_done = set()

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: Any,
        **kwargs: Any,
    ) -> None:
        if self.kv is None:
            return
        layer = self.layer_index.get(layer_name)
        if layer is None:
            return
        self._begin_step_saves()
        if not self._step_saves or layer in self._step_layers_done:
            return
        stream = self._stream()
        for h in list(self._step_saves):
            try:
                self.kv.save_layers(h, layer, layer + 1, stream=stream)
            except PegaflowError as e:
                logger.warning("PegaFlow save failed (%s); dropping it", e)
                self._drop(h)
        self._step_layers_done.add(layer)

    def _drop(self, h: int) -> None:
        req = self._handle_req.pop(h, None)
        self._step_saves.pop(h, None)
        if req is not None:
            self._open.get(req, set()).discard(h)
        try:
            self.kv.abort_save(h)  # type: ignore[union-attr]
        except PegaflowError:
            pass

    def wait_for_save(self) -> None:
        if self.kv is None:
            return
        self._begin_step_saves()
        if self._step_saves:
            # Layers the model did not hand us one by one are copied now.
            missing = [l for l in range(self.kv.num_segments) if l not in self._step_layers_done]
            stream = self._stream()
            for h in list(self._step_saves):
                try:
                    for l in missing:
                        self.kv.save_layers(h, l, l + 1, stream=stream)
                    self.kv.end_save(h)
                except PegaflowError as e:
                    logger.warning("PegaFlow save failed (%s); dropping it", e)
                    self._drop(h)
        self._step_saves = {}
        self._step_layers_done = set()
        self._poll(wait=not self._device_is_cuda)

    def _poll(self, wait: bool) -> None:
        if self.kv is None:
            return
        try:
            done = self.kv.poll_saves(wait=wait)
        except PegaflowError as e:
            logger.warning("PegaFlow commit failed: %s", e)
            return
        for h, _n in done:
            req = self._handle_req.pop(h, None)
            if req is not None:
                self._open.get(req, set()).discard(h)

    def get_finished(
        self, finished_req_ids: set[str]
    ) -> tuple[Optional[set[str]], Optional[set[str]]]:
        self._poll(wait=False)
        for r in finished_req_ids:
            if r in self._seen_save_reqs:
                self._finished_waiting.add(r)
        sending = set()
        for r in list(self._finished_waiting):
            if not self._open.get(r):
                sending.add(r)
                self._finished_waiting.discard(r)
                self._open.pop(r, None)
                self._seen_save_reqs.discard(r)
        recving: set[str] = set()
        if self._recving:
            ready = True
            if self._device_is_cuda and self.kv is not None:
                try:
                    ready = self.kv.layer_ready(self.kv.num_segments - 1)
                except PegaflowError:
                    ready = True
            if ready:
                recving, self._recving = self._recving, set()
        return (sending or None), (recving or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errs, self._load_errors = self._load_errors, set()
        return errs

    def get_worker_stats(self) -> dict[str, Any]:
        """Counters of this worker's owner client (tests, debugging)."""
        if self.kv is None:
            return {}
        s = dict(self.kv.engine.stats())
        s["pending_saves"] = self.kv.pending_saves()
        return s

    def shutdown(self) -> None:
        if getattr(self, "kv", None) is not None:
            try:
                self.kv.poll_saves(wait=True)
            except PegaflowError:
                pass


def register() -> None:
    """``vllm.general_plugins`` entry point: makes ``kv_connector:
    "PegaKVConnector"`` work without ``kv_connector_module_path``."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    except ImportError:  # pragma: no cover
        return
    try:
        KVConnectorFactory.register_connector(
            "PegaKVConnector", "pegaflow.connector", "PegaKVConnector"
        )
    except ValueError:
        pass  # already registered (plugins load once per process, but be safe)
