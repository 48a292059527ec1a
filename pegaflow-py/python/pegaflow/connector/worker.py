"""The worker side of ``PegaKVConnector``: copies between vLLM's KV tensors
and the pool.

Runs in each vLLM worker process (one per TP rank) with one ``KvCache``
bound to this rank's namespace:

* ``register_kv_caches``: describes vLLM's tensors (any supported layout,
  see :mod:`pegaflow.tensors`) and checks them against the shape the
  scheduler computed from the config; an unsupported layout fails here.
* ``start_load_kv``: makes this step's compute wait (on the GPU) for the
  saves still running, then queues the copies of the step's hits, named by
  segment and ``(slot, generation)``, on its own CUDA stream. A layer-wise
  load: ``wait_for_layer_load`` makes each attention layer wait on the GPU
  for its own layer's copy, so the copies overlap the forward pass, and
  ``get_block_ids_with_load_errors`` checks every copied block once the
  copies are done. An async one: ``get_finished`` reports the request in
  ``finished_recving`` once its copies are done and checked. The scheduler
  decides which, per request (``LoadSpec.layerwise``).
* ``save_kv_layer`` / ``wait_for_save``: reserve slots for the step's saves
  at once (one bounded wait), copy layer by layer on the transfer's own
  stream behind each layer's compute, commit once the copies completed;
  ``get_finished`` reports finished requests whose saves are all committed
  in ``finished_sending``.

A load that cannot start (owner away, a block no longer the one pinned, the
pool not registered with CUDA yet) or whose block changed under the copy is
reported through ``get_block_ids_with_load_errors`` (vLLM recomputes those
blocks with ``kv_load_failure_policy: recompute``); a failed save is dropped
and logged. No PegaFlow exception leaves the per-step methods.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from pegaflow import _native
from pegaflow._log import get_logger
from pegaflow.config import PegaflowConfig
from pegaflow.connector.direct import PeerCopier, peer_key
from pegaflow.connector.metadata import PegaConnectorMetadata, PegaHandshake
from pegaflow.connector.namespace import KvShape
from pegaflow.connector.trace import WorkerTrace, now
from pegaflow.exceptions import LayoutError, PegaflowError
from pegaflow.tensors import describe_kv_tensors

if TYPE_CHECKING:  # pragma: no cover
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = get_logger("pegaflow.connector")


@dataclass(frozen=True)
class GraphReplay:
    """Which steps vLLM may replay as a full CUDA graph (its
    ``compilation_config.cudagraph_mode``): ``mixed`` any batch, ``decode``
    uniform-decode batches (every request computing ``uniform_q`` tokens)."""

    mixed: bool = False
    decode: bool = False
    uniform_q: int = 1

    @classmethod
    def from_vllm(cls, vllm_config: Any) -> "GraphReplay":
        mode = getattr(getattr(vllm_config, "compilation_config", None), "cudagraph_mode", None)
        if mode is None or not hasattr(mode, "has_full_cudagraphs") or not mode.has_full_cudagraphs():
            return cls()
        full = type(mode).FULL
        spec = getattr(vllm_config, "speculative_config", None)
        k = int(getattr(spec, "num_speculative_tokens", 0) or 0) if spec is not None else 0
        return cls(mixed=mode.mixed_mode() == full, decode=mode.decode_mode() == full, uniform_q=1 + k)

    def may_replay_full(self, max_query_len: int) -> bool:
        return self.mixed or (self.decode and max_query_len <= self.uniform_q)


class WorkerSide:
    """Worker-role state of one TP rank."""

    def __init__(
        self,
        cfg: PegaflowConfig,
        shape: KvShape,
        kv_cache_config: "KVCacheConfig",
        namespaces: list[int],
        tp_rank: int,
        layout: str,
        group: int = 0,
        role: str = "kv_both",
        graphs: "Optional[GraphReplay]" = None,
    ):
        self.cfg = cfg
        self.role = role
        #: which steps vLLM may run as a full CUDA graph (see start_load_kv)
        self.graphs = graphs or GraphReplay()
        #: vLLM's KV cache group this side copies (hybrid models: one
        #: WorkerSide per group, see .groups; loads and saves of other
        #: groups are not its own)
        self.group = group
        self.shape = shape
        self.block_size = shape.block_size
        self._kv_cache_config = kv_cache_config
        self.tp_rank = tp_rank
        self.rank_index = 0 if shape.is_mla else tp_rank
        self.namespace = namespaces[self.rank_index]
        self.layout = layout
        self.kv: Optional[_native.KvCache] = None
        self.layer_index: dict[str, int] = {}
        self._lock = threading.Lock()
        #: save handles of the current step: handle -> req_id
        self._step_saves: dict[int, str] = {}
        #: this step's saves were begun (even if nothing could be reserved:
        #: asking again per layer would count the same blocks dropped again)
        self._step_begun = False
        self._calibration_seen = False
        self._step_layers_done: set[int] = set()
        #: handles committed or in flight: req_id -> open handles
        self._open: dict[str, set[int]] = {}
        self._handle_req: dict[int, str] = {}
        self._finished_waiting: set[str] = set()
        self._seen_save_reqs: set[str] = set()
        self._recving: set[str] = set()
        #: async loads in flight: load handle -> req_id
        self._load_handles: dict[int, str] = {}
        #: a layer-wise load was queued this step: attention layers wait for it
        self._layerwise_pending = False
        self._load_errors: set[int] = set()
        self._load_stream: Any = None
        self._device_is_cuda = False
        #: when this rank's copies were issued and done (the scheduler traces loads)
        self.trace = WorkerTrace(tp_rank)
        #: P/D prefill: this rank's exported KV cache's key (see .direct)
        self.peer_key = ""
        #: P/D prefill: requests whose blocks are lent (their finished_sending
        #: waits for the scheduler's release), and released ones to report
        self._pd_held: set[str] = set()
        self._pd_release: set[str] = set()
        #: P/D decode: copies from prefills' GPU blocks (made at the first
        #: direct load: an instance that never decodes a P/D request runs
        #: no copier thread), and the device it copies to
        self._peer: Optional[PeerCopier] = None
        self._peer_device: Any = None
        #: this step started direct copies (see get_block_ids_with_load_errors)
        self._direct_pending = False

    def handshake(self) -> PegaHandshake:
        """What the scheduler must know about this worker (sent once)."""
        return PegaHandshake(
            tp_rank=self.tp_rank, namespace=self.namespace, layout=self.layout, peer_key=self.peer_key
        )

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = list(kv_caches)
        group_layers = list(self._kv_cache_config.kv_cache_groups[self.group].layer_names)
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
            reserve_wait=self.cfg.reserve_wait,
        )
        self.layer_index = {n: i for i, n in enumerate(order)}
        if lay.is_cuda:
            self._load_stream = torch.cuda.Stream(device=tensors[0].device)
            if self.cfg.pd_direct:
                self._setup_direct(tensors[0].device)
        logger.info("PegaFlow registered %r for TP rank %d", self.kv, self.tp_rank)

    def _setup_direct(self, device: Any) -> None:
        """P/D on one node: a prefill exports its KV cache for decodes to
        copy from (the owner brokers it); a decode gets a copier."""
        assert self.kv is not None
        if self.role in ("kv_consumer", "kv_both"):
            self._peer_device = device
        if self.role not in ("kv_producer", "kv_both"):
            return
        try:
            export = self.kv.export_peer()
        except PegaflowError as e:
            logger.warning(
                "PegaFlow P/D: TP rank %d cannot lend its GPU blocks to decodes (%s); they load "
                "from the pool. PyTorch's expandable segments cannot be exported: unset "
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True for direct hand-overs",
                self.tp_rank, e,
            )
            return
        key = peer_key(self.tp_rank)
        try:
            self.kv.engine.publish_ipc(key, export)
        except PegaflowError as e:
            # kept by the engine and published once the owner is back
            logger.info("PegaFlow P/D: the owner is away; %s is published when it is back (%s)", key, e)
        self.peer_key = key

    def _stream(self) -> int:
        if not self._device_is_cuda:
            return 0
        return int(torch.cuda.current_stream().cuda_stream)

    def start_load_kv(self, meta: Optional[PegaConnectorMetadata]) -> None:
        if self.kv is None:
            return
        if meta is not None and meta.saves:
            # The step's saves reserve their slots after the forward pass;
            # the owner fills the stash meanwhile (with a full pool, a save
            # larger than the stash otherwise loses what the reservation's
            # short wait cannot evict).
            mine = sum(len(sv.block_ids) for sv in meta.saves if sv.group == self.group)
            if mine:
                self.kv.prepare_saves(mine)
        if self._device_is_cuda:
            try:
                # Saves run on their own stream and may still read blocks
                # vLLM just handed to another request: this step's compute
                # waits for them (on the GPU; they finished long ago unless
                # the link is saturated).
                self.kv.fence_saves(self._stream())
            except PegaflowError as e:
                logger.warning("PegaFlow could not order saves before the step: %s", e)
        if meta is None or not meta.loads:
            return
        stream = 0
        if self._load_stream is not None:
            # Loads get their own stream, ordered after the work queued so
            # far and after the saves (which may read blocks now loaded into).
            self._load_stream.wait_stream(torch.cuda.current_stream())
            stream = int(self._load_stream.cuda_stream)
            try:
                self.kv.fence_saves(stream)
            except PegaflowError:
                pass
        for ld in meta.loads:
            if ld.group != self.group:
                continue
            if ld.direct is not None:
                self._start_direct(ld)
                continue
            blocks = ld.blocks[0] if len(ld.blocks) == 1 else ld.blocks[self.rank_index]
            n = min(len(blocks), len(ld.block_ids))
            if not ld.layerwise:
                self._recving.add(ld.req_id)
            if n == 0:
                continue
            t0 = now()
            try:
                h = self.kv.load(ld.segment_id, blocks[:n], ld.block_ids[:n], stream=stream)
            except PegaflowError as e:
                logger.warning("PegaFlow load of %s failed (%s); vLLM recomputes it", ld.req_id, e)
                self._load_errors.update(ld.block_ids)
                self.trace.not_issued(ld.req_id, n, t0)
                continue
            self.trace.issued(h, ld.req_id, n, self.kv.slot_bytes, t0)
            if ld.layerwise:
                self._layerwise_pending = True
            else:
                self._load_handles[h] = ld.req_id
        if self._layerwise_pending and self._device_is_cuda and self.graphs.may_replay_full(meta.max_query_len):
            # A full CUDA graph replays attention without calling
            # wait_for_layer_load: the forward would read blocks still being
            # copied. Such a step waits for its whole load before it starts.
            cur = self._stream()
            try:
                for layer in range(self.kv.num_segments):
                    self.kv.stream_wait_layer(layer, cur)
            except PegaflowError as e:
                logger.warning("PegaFlow could not order the step after its loads: %s", e)
                self._load_errors.update(b for ld in meta.loads if ld.layerwise for b in ld.block_ids)

    def _start_direct(self, ld: Any) -> None:
        if self._peer is None and self._peer_device is not None:
            self._peer = PeerCopier(self.kv, self.tp_rank, self._peer_device)
        if self._peer is None or not self._peer.start(ld.direct, ld.block_ids, self.trace, ld.req_id):
            t0 = now()
            self._load_errors.update(ld.block_ids)
            self.trace.not_issued(ld.req_id, len(ld.block_ids), t0)
        else:
            self._direct_pending = True

    def direct_failed(self) -> list[str]:
        """Hold tables this worker could not copy from since last asked."""
        return self._peer.take_failed() if self._peer is not None else []

    def wait_for_layer_load(self, layer_name: str) -> None:
        if not self._layerwise_pending or self.kv is None or not self._device_is_cuda:
            return
        layer = self.layer_index.get(layer_name)
        if layer is None:
            return
        try:
            self.kv.stream_wait_layer(layer, self._stream())
        except PegaflowError as e:
            logger.warning("PegaFlow could not order layer %s after its load: %s", layer_name, e)

    def _finish_loads(self, wait: bool) -> None:
        """Check the copies that completed; failed blocks become load errors."""
        if self.kv is None or not self.kv.pending_loads():
            return
        try:
            done = self.kv.poll_loads(wait=wait)
        except PegaflowError as e:
            logger.warning("PegaFlow could not check its loads: %s", e)
            return
        for h, failed in done:
            self.trace.done(h, len(failed))
            if failed:
                logger.warning(
                    "PegaFlow: %d loaded blocks changed under the copy; vLLM recomputes them",
                    len(failed),
                )
                self._load_errors.update(failed)
            self._load_handles.pop(h, None)

    def saw_saves(self, req_id: str) -> bool:
        """Whether this side was asked to save blocks of ``req_id`` (and has
        not reported them all committed yet)."""
        return req_id in self._seen_save_reqs

    def _begin_step_saves(self, meta: Optional[PegaConnectorMetadata]) -> None:
        if self._step_begun or self.kv is None or meta is None or not meta.saves:
            return
        saves = [sv for sv in meta.saves if sv.group == self.group]
        if not saves:
            return
        self._step_begun = True
        for sv in saves:
            self._seen_save_reqs.add(sv.req_id)
        try:
            # One reservation for the whole step: at most one bounded wait.
            begun = self.kv.begin_saves([(sv.block_ids, sv.hashes) for sv in saves])
        except PegaflowError as e:
            logger.warning("PegaFlow saves of this step skipped: %s", e)
            return
        for sv, (h, n) in zip(saves, begun):
            if n:
                self._step_saves[h] = sv.req_id
                self._open.setdefault(sv.req_id, set()).add(h)
                self._handle_req[h] = sv.req_id
        if self._step_saves and not self._calibration_seen:
            # the first save timed the load backends (auto backend, GPU)
            self._calibration_seen = True
            c = self.kv.load_calibration
            if c is not None:
                logger.info(
                    "PegaFlow loads of %d KiB pieces: batched DMA %.1f GB/s, copy kernel %.1f GB/s "
                    "(TP rank %d, %d MiB timed): loads use %s",
                    c["piece_bytes"] >> 10, c["dma_gbps"], c["kernel_gbps"], self.tp_rank,
                    c["bytes"] >> 20, "the copy kernel" if c["chosen"] == "kernel" else "batched DMA",
                )
        self._step_layers_done = set()

    def save_kv_layer(self, layer_name: str, meta: Optional[PegaConnectorMetadata]) -> None:
        if self.kv is None:
            return
        layer = self.layer_index.get(layer_name)
        if layer is None:
            return
        self._begin_step_saves(meta)
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

    def wait_for_save(self, meta: Optional[PegaConnectorMetadata]) -> None:
        if self.kv is None:
            return
        self._begin_step_saves(meta)
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
        self._step_begun = False
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
        self, finished_req_ids: set[str], meta: Optional[PegaConnectorMetadata] = None
    ) -> tuple[Optional[set[str]], Optional[set[str]]]:
        self._poll(wait=False)
        if meta is not None:
            # Lent blocks (P/D prefill): vLLM must not get them back before
            # the scheduler says the decode copied them or the hold expired.
            # vLLM hands a finished request's id and the metadata naming its
            # hold to the same step, so a lent request is never reported early.
            self._pd_held.update(meta.pd_holds)
            for r in meta.pd_released:
                if r in self._pd_held:
                    self._pd_held.discard(r)
                    self._pd_release.add(r)
        for r in finished_req_ids:
            if r in self._seen_save_reqs:
                self._finished_waiting.add(r)
        sending = set()
        for r in list(self._finished_waiting):
            if not self._open.get(r) and r not in self._pd_held:
                sending.add(r)
                self._finished_waiting.discard(r)
                self._open.pop(r, None)
                self._seen_save_reqs.discard(r)
        for r in list(self._pd_release):
            if r in sending:
                self._pd_release.discard(r)
            elif r not in self._seen_save_reqs:
                # no saves of its own to wait for
                sending.add(r)
                self._pd_release.discard(r)
        recving: set[str] = set()
        if self._recving:
            self._finish_loads(wait=False)
            still = set(self._load_handles.values())
            recving = {r for r in self._recving if r not in still}
            self._recving -= recving
        return (sending or None), (recving or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self._peer is not None:
            # Copies completed since the last step (their holds are given
            # back by the copier's thread as soon as they complete). A step
            # that copied waits for its copies: a block copied while its
            # prefill exited must reach vLLM in the output of the step that
            # read it, which vLLM then drops and recomputes.
            self._peer.finish(self.trace, wait=self._direct_pending)
            self._direct_pending = False
            if self._peer.lost:
                self._load_errors |= self._peer.lost
                self._peer.lost = set()
        if self._layerwise_pending:
            # This step's forward waits for its loads on the GPU; they are
            # done (or nearly) once it is queued: check what they copied.
            self._layerwise_pending = False
            self._finish_loads(wait=True)
        errs, self._load_errors = self._load_errors, set()
        return errs

    def stats(self) -> dict[str, Any]:
        """Counters of this worker's owner client (tests, debugging)."""
        if self.kv is None:
            return {}
        s = dict(self.kv.engine.stats())
        s["pending_saves"] = self.kv.pending_saves()
        s["pending_loads"] = self.kv.pending_loads()
        if self._peer is not None:
            s["pd_direct_copies"] = self._peer.copies
            s["pd_direct_bytes"] = self._peer.bytes
            s["pd_direct_gpu_ms"] = self._peer.gpu_ms
        return s

    def shutdown(self) -> None:
        if self._peer is not None:
            self._peer.finish(self.trace, wait=True)
            self._peer.close()
            if self._peer.copies:
                logger.info("PegaFlow P/D: %s", self._peer.summary())
        if self.kv is not None:
            try:
                self.kv.poll_saves(wait=True)
                self.kv.poll_loads(wait=True)
            except PegaflowError:
                pass
