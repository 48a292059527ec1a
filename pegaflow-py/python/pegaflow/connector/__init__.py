"""``PegaKVConnector``: vLLM's KV connector (v1 API) over the PegaFlow pool.

Use it with::

    vllm serve MODEL --kv-transfer-config \\
      '{"kv_connector":"PegaKVConnector","kv_role":"kv_both",
        "kv_connector_module_path":"pegaflow.connector"}'

vLLM builds one connector per role and process: a scheduler-role one in the
scheduler process and a worker-role one in each worker (one per TP rank).
This class is only the face vLLM sees; the work is done by the role objects:

* :mod:`.scheduler` (:class:`SchedulerSide`): lookups, pins, save plans;
* :mod:`.worker` (:class:`WorkerSide`): copies between vLLM's KV tensors and
  the pool;
* :mod:`.metadata`: what the scheduler sends the workers each step;
* :mod:`.namespace`: the KV shape and the namespaces both sides compute;
* :mod:`.keys`: the block keys;
* :mod:`.groups`: hybrid models (several KV cache groups: sliding-window
  and full attention), which vLLM runs with its hybrid KV cache manager
  (the connector implements ``SupportsHMA``).

At start-up vLLM passes each worker's :class:`PegaHandshake` (its TP rank
and namespace) to the scheduler, which looks blocks up under exactly those
namespaces and refuses to start when a rank is wrong or missing.

When the owner is down, lookups miss and saves are skipped (counted); a load
in flight that cannot reach its slots is reported through
``get_block_ids_with_load_errors`` (vLLM recomputes those blocks with
``kv_load_failure_policy: recompute``). No PegaFlow exception reaches vLLM
from the per-step methods.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from pegaflow._log import get_logger, watch_connection
from pegaflow.config import PegaflowConfig
from pegaflow.connector.metadata import LoadSpec, PegaConnectorMetadata, PegaHandshake, SaveSpec
from pegaflow.connector.namespace import (
    SUPPORTED_VLLM,
    KvShape,
    kv_shape,
    layout_tag,
    namespaces_for,
    vllm_version,
    worker_tp_rank,
)
from pegaflow.connector import groups as hma
from pegaflow.connector.scheduler import SchedulerSide
from pegaflow.connector.trace import PegaWorkerMeta
from pegaflow.connector.worker import GraphReplay, WorkerSide
from pegaflow.exceptions import ConfigError

try:  # vLLM >= 0.26
    from vllm.v1.metrics.cache_hit_source import CacheHitSource as _CacheHitSource
except ImportError:  # pragma: no cover - older vLLM
    _CacheHitSource = None

try:  # every supported vLLM (0.25 .. 0.32) has it
    from vllm.distributed.kv_transfer.kv_connector.v1.base import SupportsHMA as _SupportsHMA
except ImportError:  # pragma: no cover - a vLLM without the hybrid manager's interface
    _SupportsHMA = object  # type: ignore[assignment,misc]

if TYPE_CHECKING:  # pragma: no cover
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = [
    "PegaKVConnector",
    "PegaConnectorMetadata",
    "LoadSpec",
    "SaveSpec",
    "PegaHandshake",
    "KvShape",
    "namespaces_for",
    "register",
    "SUPPORTED_VLLM",
]

logger = get_logger("pegaflow.connector")


class PegaKVConnector(KVConnectorBase_V1, _SupportsHMA):  # type: ignore[misc]
    """vLLM KV connector backed by a node-local ``pegaflow-owner``.

    It supports vLLM's hybrid KV cache manager (``SupportsHMA``), so vLLM
    keeps it on: sliding-window groups cost the pool about their window
    (see :mod:`.groups`).
    """

    if _CacheHitSource is not None and hasattr(_CacheHitSource, "HOST"):
        _cache_hit_source = _CacheHitSource.HOST

    def __init__(
        self,
        vllm_config: "VllmConfig",
        role: KVConnectorRole,
        kv_cache_config: "Optional[KVCacheConfig]" = None,
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ver = vllm_version()
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
        layout = layout_tag(vllm_config, kv_cache_config)
        if hma.is_hybrid(kv_cache_config):
            self._init_hybrid(vllm_config, role, kv_cache_config, layout)
            return
        self.groups: Optional[list[hma.Group]] = None
        self.shape = kv_shape(kv_cache_config)
        self.block_size = self.shape.block_size
        namespaces = namespaces_for(vllm_config, self.shape, self.cfg.model_id, kv_cache_config)
        self.is_mla = self.shape.is_mla
        if getattr(ktc, "kv_load_failure_policy", "recompute") == "fail":
            logger.warning(
                "kv_load_failure_policy is 'fail': a load interrupted by an owner restart "
                "fails its request; set it to 'recompute' to recompute those blocks instead"
            )
        self.scheduler_side: Optional[SchedulerSide] = None
        self.worker_side: Optional[WorkerSide] = None
        self._namespaces = namespaces
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler_side = SchedulerSide(
                self.cfg,
                self.block_size,
                namespaces,
                tp_size=int(vllm_config.parallel_config.tensor_parallel_size),
                is_mla=self.is_mla,
                layout=layout,
                role=str(getattr(ktc, "kv_role", None) or "kv_both"),
                max_model_len=int(getattr(vllm_config.model_config, "max_model_len", 0) or 0),
            )
            watch_connection(self.scheduler_side.engine, "scheduler", logger)
        else:
            self.worker_side = WorkerSide(
                self.cfg,
                self.shape,
                kv_cache_config,
                namespaces,
                worker_tp_rank(vllm_config),
                layout,
                role=str(getattr(ktc, "kv_role", None) or "kv_both"),
                graphs=GraphReplay.from_vllm(vllm_config),
            )

    def _init_hybrid(
        self,
        vllm_config: "VllmConfig",
        role: KVConnectorRole,
        kv_cache_config: "KVCacheConfig",
        layout: str,
    ) -> None:
        """Several KV cache groups (vLLM's hybrid manager): one namespace per
        group and rank, one worker side per group."""
        all_groups = hma.kv_groups(kv_cache_config)
        # P/D hand-overs of hybrid models go through the pool (their blocks
        # are per group): nothing to export or lend
        self.cfg = dataclasses.replace(self.cfg, pd_direct=False)
        groups = hma.cached(all_groups)
        self.groups = groups
        self.shape = (groups or all_groups)[0].shape
        self.block_size = self.shape.block_size
        self.is_mla = False
        tp = int(vllm_config.parallel_config.tensor_parallel_size)
        why = [f"group {g.index}: {g.unsupported_why}" for g in hma.unsupported(groups)]
        why += [f"group {g.index}: MLA" for g in groups if g.shape.is_mla]
        if len({g.block_size for g in groups}) != 1:
            why.append(f"block sizes {sorted({g.block_size for g in groups})}")
        cfg = self.cfg
        if why:
            logger.warning(
                "PegaFlow does not cache this model's KV yet (%s): it runs with the connector "
                "but nothing is looked up or saved; see docs/vllm.md (hybrid models)",
                ", ".join(why),
            )
            cfg = dataclasses.replace(cfg, load=False, save=False)
            groups = []
        group_ns = [
            namespaces_for(
                vllm_config, g.shape, cfg.model_id, kv_cache_config, group_tag=hma.group_tag(all_groups, g)
            )
            for g in groups
        ]
        self._namespaces = group_ns[0] if group_ns else [0] * tp
        self.scheduler_side = None
        self.worker_side = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler_side = SchedulerSide(
                cfg,
                self.block_size,
                self._namespaces,
                tp_size=tp,
                is_mla=False,
                layout=layout,
                groups=groups or None,
                group_namespaces=group_ns or None,
            )
            watch_connection(self.scheduler_side.engine, "scheduler", logger)
        else:
            rank = worker_tp_rank(vllm_config)
            sides = [
                WorkerSide(
                    cfg, g.shape, kv_cache_config, group_ns[i], rank, layout, group=g.index,
                    graphs=GraphReplay.from_vllm(vllm_config),
                )
                for i, g in enumerate(groups)
            ]
            self.worker_side = hma.GroupedWorker(sides, rank, layout)  # type: ignore[assignment]
        if groups:
            logger.info(
                "PegaFlow caches a hybrid model: %s",
                ", ".join(
                    f"group {g.index} {g.kind}"
                    + (f" (window {g.window}, {g.window_blocks} blocks)" if g.window else "")
                    + f" {g.shape.num_layers} layers"
                    for g in groups
                ),
            )

    # vLLM asks these while it builds its config and sets up each worker's
    # attention, long before it constructs the connector (after loading
    # the model and profiling memory): the first moments a wrong
    # ``pegaflow.*`` key can be reported, so they parse the config too.

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        PegaflowConfig.from_extra_config(extra_config)
        return super().requires_piecewise_for_cudagraph(extra_config)

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: "VllmConfig") -> Optional[str]:
        ktc = getattr(vllm_config, "kv_transfer_config", None)
        PegaflowConfig.from_extra_config(getattr(ktc, "kv_connector_extra_config", None))
        return super().get_required_kvcache_layout(vllm_config)

    # Handles of the role objects (tests, debugging).

    @property
    def _sched(self) -> SchedulerSide:
        if self.scheduler_side is None:
            raise RuntimeError("a scheduler-side method was called on a worker-role connector")
        return self.scheduler_side

    @property
    def _worker(self) -> WorkerSide:
        if self.worker_side is None:
            raise RuntimeError("a worker-side method was called on a scheduler-role connector")
        return self.worker_side

    @property
    def namespaces(self) -> list[int]:
        """Each TP rank's namespace (MLA: one), as the scheduler looks them up."""
        if self.scheduler_side is not None:
            return self.scheduler_side.namespaces
        return self._namespaces

    @property
    def engine(self) -> Any:
        """The scheduler's owner client."""
        return self._sched.engine

    @property
    def kv(self) -> Any:
        """The worker's ``KvCache`` (None before ``register_kv_caches``)."""
        return self._worker.kv

    @property
    def tp_rank(self) -> int:
        return self._worker.tp_rank

    @property
    def namespace(self) -> int:
        """The namespace this worker saves under."""
        return self._worker.namespace

    # ------------------------------------------------------------ scheduler

    def get_num_new_matched_tokens(
        self, request: "Request", num_computed_tokens: int
    ) -> tuple[Optional[int], bool]:
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int
    ) -> None:
        self._sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        return self._sched.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        self._sched.update_connector_output(connector_output)

    def request_finished(
        self, request: "Request", block_ids: list[int]
    ) -> tuple[bool, Optional[dict[str, Any]]]:
        return self._sched.request_finished(request, block_ids)

    def request_finished_all_groups(
        self, request: "Request", block_ids: tuple[list[int], ...]
    ) -> tuple[bool, Optional[dict[str, Any]]]:
        """vLLM's hybrid manager (``SupportsHMA``): as ``request_finished``,
        with every group's blocks (the scheduler side tracks them itself).
        vLLM >= 0.3x calls only this one when the connector supports HMA,
        for models of one group too."""
        return self.request_finished(request, list(block_ids[0]) if block_ids else [])

    def set_xfer_handshake_metadata(self, metadata: dict[int, Any]) -> None:
        """vLLM hands over what each worker's connector sent, keyed by TP rank."""
        self._sched.adopt_worker_namespaces(metadata)

    def set_xfer_handshake_metadata_pp_aware(self, metadata: dict[tuple[int, int], Any]) -> None:
        # (another connector's handshakes, under MultiConnector, may come
        # from any stage; only ours say this connector runs in a stage > 0)
        if any(pp != 0 and isinstance(m, PegaHandshake) for (pp, _tp), m in metadata.items()):
            raise ConfigError(
                "PegaKVConnector does not support pipeline parallelism "
                "(pipeline_parallel_size > 1): its namespaces do not tell pipeline stages "
                "apart. Run with tensor parallelism only, or without the connector."
            )
        self.set_xfer_handshake_metadata({tp: m for (pp, tp), m in metadata.items() if pp == 0})

    def get_scheduler_stats(self) -> dict[str, Any]:
        """Counters of the scheduler's owner client (tests, debugging)."""
        return self._sched.stats()

    # --------------------------------------------------------------- worker

    def _meta(self) -> Optional[PegaConnectorMetadata]:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta if isinstance(meta, PegaConnectorMetadata) else None

    def get_handshake_metadata(self) -> Optional[PegaHandshake]:
        """Sent once to the scheduler: this worker's rank and namespace."""
        return self._worker.handshake()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register_kv_caches(kv_caches)
        if isinstance(self._worker, hma.GroupedWorker):
            for s in self._worker.sides:
                if s.kv is not None:
                    watch_connection(
                        s.kv.engine, f"worker (TP rank {self.tp_rank}, group {s.group})", logger
                    )
        elif self._worker.kv is not None:
            watch_connection(self._worker.kv.engine, f"worker (TP rank {self.tp_rank})", logger)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        self._worker.start_load_kv(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker.wait_for_layer_load(layer_name)

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: Any,
        **kwargs: Any,
    ) -> None:
        self._worker.save_kv_layer(layer_name, self._meta())

    def wait_for_save(self) -> None:
        self._worker.wait_for_save(self._meta())

    def get_finished(
        self, finished_req_ids: set[str]
    ) -> tuple[Optional[set[str]], Optional[set[str]]]:
        if isinstance(self._worker, hma.GroupedWorker):
            return self._worker.get_finished(finished_req_ids)
        return self._worker.get_finished(finished_req_ids, self._meta())

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.get_block_ids_with_load_errors()

    def build_connector_worker_meta(self) -> Any:
        """The step this worker ran and its finished copies, for the
        scheduler (never empty, so vLLM always returns it)."""
        meta = self._worker.trace.take() or PegaWorkerMeta()
        m = self._meta()
        meta.steps.append(m.step if m is not None else 0)
        if not isinstance(self._worker, hma.GroupedWorker):
            meta.direct_failed.extend(self._worker.direct_failed())
        return meta

    def get_worker_stats(self) -> dict[str, Any]:
        """Counters of this worker's owner client (tests, debugging)."""
        return self._worker.stats()

    def shutdown(self) -> None:
        if self.scheduler_side is not None:
            self.scheduler_side.shutdown()
        if self.worker_side is not None:
            self.worker_side.shutdown()


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
