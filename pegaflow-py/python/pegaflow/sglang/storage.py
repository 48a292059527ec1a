"""``PegaHiCacheStorage``: the node's PegaFlow pool as SGLang's HiCache storage tier.

SGLang loads it by its own dynamic-backend mechanism
(``StorageBackendFactory``, ``--hicache-storage-backend dynamic``), one
instance per scheduler process (TP rank), and drives it through the zero-copy
interface (``"interface_v1": 1``), from its storage threads:

=========================  ===========================  ===================================
SGLang calls               thread                       here
=========================  ===========================  ===================================
``batch_exists(keys)``     prefetch                     ``Engine.count_hits``: shm index, no RPC
``batch_get_v1(keys, hi)`` prefetch I/O                 lookup + pin (shm), copy pool -> host pool, release
``batch_set_v1(keys, hi)`` backup                       skip stored prefix, reserve slots from the stash,
                                                        copy host pool -> pool, commit (ring)
=========================  ===========================  ===================================

``hi`` (``host_indices``) are token indices into SGLang's host pool, page
by page; the copies run in the native host backend (one ``memcpy`` per run,
GIL released), never as Python loops over pages. Loads and saves use two
``KvCache`` bindings of the same layout and namespace, so a backup copy
never holds up a prefetch (each binding serialises its own copies).

Failure model, as for vLLM: the owner down or restarting makes lookups
miss, loads and saves fail (``False`` per page: SGLang recomputes or skips);
nothing raises into SGLang. A full pool drops saves (counted by the owner).
Blocks are checked again after a load's copy; a block evicted meanwhile is
reported as not loaded, never handed over.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, List, Optional

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage

from pegaflow._native import KvCache
from pegaflow.config import PegaflowConfig
from pegaflow.exceptions import ConfigError, LayoutError, PegaflowError
from pegaflow.sglang.keys import pool_keys
from pegaflow.sglang.layout import HostPoolLayout, describe_host_pool, storage_namespace

logger = logging.getLogger("pegaflow.sglang")


def _needs_v1() -> NotImplementedError:
    return NotImplementedError(
        "PegaFlow's SGLang backend implements the zero-copy interface only "
        '("interface_v1": 1): batch_exists, batch_get_v1, batch_set_v1'
    )

#: Seconds a backup batch may wait for the owner to refill this engine's
#: stash of free slots. SGLang backs up from its own thread, off the
#: inference path, in batches of up to 128 pages; waiting for a refill there
#: costs no step time, dropping pages costs hits.
DEFAULT_RESERVE_WAIT = 0.1

_IGNORED_KEYS = ("pegaflow.copy_backend", "pegaflow.load_mode")


class PegaHiCacheStorage(HiCacheStorage):
    """SGLang HiCache storage backed by the node's PegaFlow pool (see module docs).

    ``extra_config`` (``--hicache-storage-backend-extra-config``) must hold
    ``"interface_v1": 1``; the ``pegaflow.*`` keys of docs/sglang.md
    configure the rest.
    """

    def __init__(self, storage_config: Any, kwargs: Optional[dict] = None):
        extra = dict(getattr(storage_config, "extra_config", None) or {})
        if not extra.get("interface_v1"):
            raise ConfigError(
                'PegaFlow\'s SGLang backend needs SGLang\'s zero-copy interface: add "interface_v1": 1 '
                "to --hicache-storage-backend-extra-config (docs/sglang.md has the full flags)"
            )
        cfg = PegaflowConfig.from_extra_config(extra)
        for k in _IGNORED_KEYS:
            if k in extra:
                logger.warning("%s is ignored by the SGLang backend (its copies are host memcpy)", k)
        if "pegaflow.reserve_wait" not in extra:
            cfg = dataclasses.replace(cfg, reserve_wait=DEFAULT_RESERVE_WAIT)
        self.config = cfg
        sc = storage_config
        self.tp_rank = int(sc.tp_rank)
        self.tp_size = int(sc.tp_size)
        self.pp_rank = int(getattr(sc, "pp_rank", 0) or 0)
        self.pp_size = int(getattr(sc, "pp_size", 1) or 1)
        self.cp_rank = int(getattr(sc, "attn_cp_rank", 0) or 0)
        self.cp_size = int(getattr(sc, "attn_cp_size", 1) or 1)
        if int(getattr(sc, "dcp_size", 1) or 1) != 1:
            raise ConfigError(
                "PegaFlow's SGLang backend does not support decode context parallelism; run "
                "without it or use another --hicache-storage-backend"
            )
        if getattr(sc, "should_split_heads", False):
            raise ConfigError(
                "PegaFlow's SGLang backend does not share pages across tensor-parallel sizes "
                "(tp_lcm_size); remove tp_lcm_size from --hicache-storage-backend-extra-config"
            )
        self.is_mla = bool(getattr(sc, "is_mla_model", False))
        writer = getattr(sc, "is_storage_writer", None)
        # SGLang < 0.5.2x has no is_storage_writer: MLA pages are written by rank 0 only.
        self.is_writer = bool(writer) if writer is not None else (not self.is_mla or self.tp_rank == 0)
        self.model = cfg.model_id or (str(sc.model_name) if getattr(sc, "model_name", None) else "")
        if not self.model:
            raise ConfigError(
                "SGLang passed no model name to its storage backend; set pegaflow.model_id in "
                "--hicache-storage-backend-extra-config"
            )
        self.layout: Optional[HostPoolLayout] = None
        self.namespace = 0
        self._loader: Optional[KvCache] = None
        self._saver: Optional[KvCache] = None
        self._load_lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._warned: set[str] = set()
        self.mem_pool_host = None

    # -- registration ---------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Binds the host pool: describes its layout, computes the namespace
        and connects to the owner (in the background: the owner may be down)."""
        super().register_mem_pool_host(mem_pool_host)
        layout = describe_host_pool(mem_pool_host)
        ns = storage_namespace(
            layout,
            model=self.model,
            tp_size=self.tp_size,
            tp_rank=self.tp_rank,
            pp_size=self.pp_size,
            pp_rank=self.pp_rank,
            cp_size=self.cp_size,
            cp_rank=self.cp_rank,
            format_tag=getattr(mem_pool_host, "storage_format_tag", None),
        )
        self.close()
        self.layout, self.namespace = layout, ns
        self._loader = self._bind(layout, ns, "load")
        if self.config.save and self.is_writer:
            self._saver = self._bind(layout, ns, "save")
        logger.info(
            "PegaFlow SGLang storage: %s %s, %d pages of %d tokens (%d bytes), namespace %#018x, "
            "TP rank %d/%d%s, owner %s",
            layout.pool_class, layout.layout, layout.num_pages, layout.page_size,
            layout.page_bytes, ns, self.tp_rank, self.tp_size,
            "" if self._saver is not None else " (reads only)", self._loader.engine.socket,
        )

    def _bind(self, layout: HostPoolLayout, ns: int, role: str) -> KvCache:
        cfg = self.config
        return KvCache(
            **layout.tensor_layout.native_layout(),
            model=self.model,
            dtype=layout.dtype,
            namespace=ns,
            name=cfg.name,
            socket=cfg.socket,
            label=f"sglang tp{self.tp_rank} {role}",
            backend="host",
            device=None,
            keepalive=list(layout.views),
            reserve_wait=cfg.reserve_wait,
        )

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        if str(host_pool_name) == "kv" and (
            self.mem_pool_host is None or host_pool is self.mem_pool_host
        ):
            return super().register_mem_host_pool_v2(host_pool, host_pool_name)
        raise LayoutError(
            f"PegaFlow's SGLang backend stores the KV pool only; this model also has a "
            f"{host_pool_name} host pool ({type(host_pool).__name__}). Hybrid models are not "
            "supported yet; use another --hicache-storage-backend for them"
        )

    # -- the v1 interface -------------------------------------------------

    def batch_exists(self, keys: List[str], extra_info: Any = None) -> int:
        """Leading pages of ``keys`` in the pool (shared-memory index, no RPC)."""
        if not keys or self._loader is None or not self.config.load:
            return 0
        return self._loader.engine.count_hits(self.namespace, pool_keys(keys))

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_get_v1(
        self, keys: List[str], host_indices: torch.Tensor, extra_info: Any = None
    ) -> List[bool]:
        """Copies the pages ``keys`` from the pool into the host pool at
        ``host_indices``; ``[True]`` for each page loaded."""
        n = len(keys)
        kv = self._loader
        if n == 0 or kv is None or not self.config.load:
            return [False] * n
        pages = self._pages(host_indices, n, "batch_get_v1")
        if pages is None:
            return [False] * n
        with self._load_lock:
            pins = kv.engine.lookup(self.namespace, pool_keys(keys))
            try:
                hit = len(pins)
                if hit == 0:
                    return [False] * n
                try:
                    h = kv.load(pins.segment_id, pins.blocks(), pages[:hit])
                    done = dict(kv.poll_loads(wait=True))
                except PegaflowError as e:  # OwnerUnavailable among them
                    self._warn_once("load", "PegaFlow load failed (%s); SGLang recomputes", e)
                    return [False] * n
            finally:
                pins.release()
        failed = done.get(h)
        if failed is None:  # pragma: no cover - poll_loads(wait=True) reports every load
            return [False] * n
        bad = set(failed)
        return [i < hit and pages[i] not in bad for i in range(n)]

    def batch_set_v1(
        self, keys: List[str], host_indices: torch.Tensor, extra_info: Any = None
    ) -> List[bool]:
        """Copies the host pool's pages at ``host_indices`` into the pool
        under ``keys``; ``[True]`` for each page stored (or already there)."""
        n = len(keys)
        kv = self._saver
        if n == 0:
            return []
        if kv is None:
            if self._loader is not None and self.config.save:
                self._warn_once(
                    "reader", "PegaFlow: TP rank %d does not write MLA pages (rank 0 does)",
                    self.tp_rank,
                )
            return [False] * n
        pages = self._pages(host_indices, n, "batch_set_v1")
        if pages is None:
            return [False] * n
        hashes = pool_keys(keys)
        with self._save_lock:
            # A chain's stored prefix needs no copy (the same content under the
            # same key); the owner would drop a duplicate anyway.
            have = kv.engine.count_hits(self.namespace, hashes)
            saved = 0
            if have < n:
                try:
                    saved = kv.save(pages[have:], hashes[have:])
                except PegaflowError as e:
                    self._warn_once("save", "PegaFlow save failed (%s); pages not stored", e)
        ok = have + saved
        return [True] * ok + [False] * (n - ok)

    def _pages(self, host_indices: torch.Tensor, n: int, what: str) -> Optional[list[int]]:
        """Page numbers of ``n`` whole pages given by their token indices,
        or None (logged) when they are not whole pages of this pool."""
        lay = self.layout
        assert lay is not None
        ps = lay.page_size
        idx = host_indices.reshape(-1)
        if idx.device.type != "cpu":
            idx = idx.cpu()
        if idx.numel() != n * ps:
            logger.error(
                "PegaFlow %s: %d keys but %d host indices (page size %d); nothing copied",
                what, n, idx.numel(), ps,
            )
            return None
        rows = idx.to(torch.int64).view(n, ps)
        starts = rows[:, 0]
        ok = bool(
            (starts % ps == 0).all()
            and (starts >= 0).all()
            and (starts < lay.num_pages * ps).all()
            and torch.equal(rows - starts[:, None], torch.arange(ps, dtype=torch.int64).expand(n, ps))
        )
        if not ok:
            logger.error(
                "PegaFlow %s: host indices are not whole pages of the host pool; nothing copied",
                what,
            )
            return None
        return (starts // ps).tolist()

    def _warn_once(self, what: str, msg: str, *args: Any) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning(msg, *args)

    # -- the rest of HiCacheStorage ---------------------------------------

    # The page-copying interface SGLang uses without "interface_v1" (refused
    # in __init__, so never called).
    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Any:
        raise _needs_v1()

    def batch_get(self, keys: List[str], target_locations: Any = None, target_sizes: Any = None) -> Any:
        raise _needs_v1()

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        raise _needs_v1()

    def batch_set(self, keys: List[str], values: Any = None, target_locations: Any = None, target_sizes: Any = None) -> bool:
        raise _needs_v1()

    def clear(self) -> bool:
        logger.warning(
            "PegaFlow: clearing the storage tier from one SGLang server is not supported; the "
            "pool is shared by every engine on the node (restart pegaflow-owner with "
            "--discard-existing to empty it)"
        )
        return False

    def get_stats(self) -> Any:
        return None

    def stats(self) -> dict[str, Any]:
        """PegaFlow's counters of this backend's two bindings (lookups, hits,
        loads; saves, drops)."""
        return {
            role: dict(kv.engine.stats())
            for role, kv in (("load", self._loader), ("save", self._saver))
            if kv is not None
        }

    def close(self) -> None:
        """Drops the bindings (the owner reclaims their slots and pins)."""
        self._loader = None
        self._saver = None
