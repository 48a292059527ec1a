"""The worker side of ``PegaKVConnector``: copies between vLLM's KV tensors
and the pool.

Runs in each vLLM worker process (one per TP rank) with one ``KvCache``
bound to this rank's namespace:

* ``register_kv_caches``: describes vLLM's tensors (any supported layout,
  see :mod:`pegaflow.tensors`) and checks them against the shape the
  scheduler computed from the config; an unsupported layout fails here.
* ``start_load_kv``: copies pinned slots into the allocated blocks (async,
  on its own CUDA stream); ``get_finished`` reports them in
  ``finished_recving``.
* ``save_kv_layer`` / ``wait_for_save``: reserve slots, copy layer by
  layer, commit once the copies completed; ``get_finished`` reports finished
  requests whose saves are all committed in ``finished_sending``.

A failed load is reported through ``get_block_ids_with_load_errors`` (vLLM
recomputes those blocks with ``kv_load_failure_policy: recompute``); a
failed save is dropped and logged. No PegaFlow exception leaves the per-step
methods.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Optional

import torch

from pegaflow import _native
from pegaflow.config import PegaflowConfig
from pegaflow.connector.metadata import PegaConnectorMetadata, PegaHandshake
from pegaflow.connector.namespace import KvShape
from pegaflow.exceptions import LayoutError, PegaflowError
from pegaflow.tensors import describe_kv_tensors

if TYPE_CHECKING:  # pragma: no cover
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = logging.getLogger("pegaflow.connector")


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
    ):
        self.cfg = cfg
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

    def handshake(self) -> PegaHandshake:
        """What the scheduler must know about this worker (sent once)."""
        return PegaHandshake(tp_rank=self.tp_rank, namespace=self.namespace, layout=self.layout)

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

    def start_load_kv(self, meta: Optional[PegaConnectorMetadata]) -> None:
        if self.kv is None or meta is None:
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

    def _begin_step_saves(self, meta: Optional[PegaConnectorMetadata]) -> None:
        if self._step_saves or self.kv is None or meta is None or not meta.saves:
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

    def stats(self) -> dict[str, Any]:
        """Counters of this worker's owner client (tests, debugging)."""
        if self.kv is None:
            return {}
        s = dict(self.kv.engine.stats())
        s["pending_saves"] = self.kv.pending_saves()
        return s

    def shutdown(self) -> None:
        if self.kv is not None:
            try:
                self.kv.poll_saves(wait=True)
            except PegaflowError:
                pass
