"""The scheduler side of ``PegaKVConnector``: lookups, pins, save plans.

Runs in vLLM's scheduler process with one owner client (``Engine``) and no
KV tensors. Per request:

* ``get_num_new_matched_tokens``: counts the leading blocks of the request's
  key chain that *every* TP rank's namespace holds, pins them (once per
  request: repeated calls reuse the pins) and returns them as a layer-wise
  load (loaded in the step that computes the rest of the prompt: the
  fastest first token) or as an asynchronous one (the request waits until
  the copy is done: no other request's step waits for it).
  ``pegaflow.load_mode: auto`` (the default) loads layer-wise when no other
  request is running, asynchronously otherwise.
* ``update_state_after_alloc``: records the GPU blocks to load into, or
  releases the pins when vLLM decided not to load.
* ``build_connector_meta``: per step, the loads (GPU block ids, the segment
  and each rank's pinned ``(slot, generation)``) and the saves (newly
  completed blocks + their keys).
* ``update_connector_output``: releases the pins of finished loads: those
  of a layer-wise load once its step's output is back, those of an async
  one once the workers report it in ``finished_recving``.
* ``request_finished``: keeps the blocks of a request that had saves until
  every worker reported them done (``finished_sending``).

Before the first request, ``adopt_worker_namespaces`` replaces the
namespaces the scheduler computed from the config by those the workers
report (vLLM hands them over once at start-up); the TP rank each worker
reports must be the one vLLM gave it.

Invariants: a request's pins are taken once (one ``Pins`` per namespace,
all in one segment) and released through those objects (when its load is
over, when vLLM decides not to load, or when it finishes without a load in
flight; releasing twice is harmless, and a ``Pins`` that is dropped
releases what it still holds); blocks ``[0, saved)`` of a request are never
planned for saving again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Optional

from pegaflow import _native
from pegaflow._log import get_logger
from pegaflow.config import PegaflowConfig
from pegaflow.connector import groups as hma
from pegaflow.connector.groups import GroupScheduling
from pegaflow.connector.keys import KeyChain
from pegaflow.connector.metadata import LoadSpec, PegaConnectorMetadata, PegaHandshake, SaveSpec
from pegaflow.connector.direct import Borrower, DirectSpec, Lender, tail_key
from pegaflow.connector.keys import needs_extra_keys
from pegaflow.connector.pd import PdRoles, announced_for, remote_prefill, wants_remote_decode
from pegaflow.connector.ssd import SsdStager
from pegaflow.connector.trace import LoadTracer
from pegaflow.exceptions import ConfigError, PegaflowError

if TYPE_CHECKING:  # pragma: no cover
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = get_logger("pegaflow.connector")


@dataclass
class ReqState:
    """What the scheduler side remembers about one request."""

    request: "Request"
    #: the request's block keys, computed as its blocks fill
    keys: KeyChain
    block_ids: list[int] = field(default_factory=list)
    #: blocks [0, saved) are in the pool (hit, loaded or saved already)
    saved: int = 0
    #: pins taken by get_num_new_matched_tokens, one ``Pins`` per namespace;
    #: blocks [load_from, pinned_blocks) of each are still pinned
    pins: Optional[list[Any]] = None
    pinned_blocks: int = 0
    #: first block to load (the local prefix-cache hit ends there)
    load_from: int = 0
    load_pending: bool = False
    #: how this request's hit is loaded (decided when it is pinned)
    layerwise: bool = True
    had_saves: bool = False
    #: timings of this request's load (pegaflow.connector.trace)
    trace: Any = None
    #: hybrid models: per-group block ids, save progress and pins
    hy: Optional[hma.GroupReq] = None
    #: P/D decode: copied from the prefill's GPU blocks (see .direct)
    direct: Optional[DirectSpec] = None


class SchedulerSide(GroupScheduling):
    """Scheduler-role state of one vLLM instance."""

    def __init__(
        self,
        cfg: PegaflowConfig,
        block_size: int,
        namespaces: list[int],
        tp_size: int,
        is_mla: bool,
        layout: str,
        groups: "Optional[list[hma.Group]]" = None,
        group_namespaces: Optional[list[list[int]]] = None,
        role: str = "kv_both",
        max_model_len: int = 0,
    ):
        self.cfg = cfg
        #: hybrid models (see .groups): vLLM's KV cache groups and the
        #: namespaces of each group, per TP rank; None for one full group
        self.groups = groups
        self.group_namespaces = group_namespaces
        self.block_size = block_size
        #: per TP rank (MLA: one for all), from the config until the workers report
        self.namespaces = namespaces
        self.tp_size = tp_size
        self.is_mla = is_mla
        self.layout = layout
        self.engine = _native.Engine(
            name=cfg.name,
            socket=cfg.socket,
            label="vllm-scheduler",
            reconnect_interval=cfg.reconnect_interval,
        )
        self._reqs: dict[str, ReqState] = {}
        #: blocks staged from the owner's SSD tier (see pegaflow.connector.ssd)
        self.ssd = SsdStager(self.engine, cfg.ssd_stage, cfg.ssd_stage_timeout)
        self._loads: list[LoadSpec] = []
        self.load_mode = cfg.load_mode
        #: requests the last step ran (auto mode: is anyone else running?)
        self._last_scheduled: set[str] = set()
        #: async loads: req_id -> pins to release once the load reported finished
        self._loading: dict[str, ReqState] = {}
        #: layer-wise loads of the step being built, then (step number, loads)
        #: of each step whose output is not back yet, oldest first
        self._step_loading: list[ReqState] = []
        self._steps_loading: deque[tuple[int, list[ReqState]]] = deque()
        #: number of the last step built (workers echo it back: see
        #: update_connector_output)
        self._step_seq = 0
        self.tracer = LoadTracer(cfg.trace_sample_rate, cfg.slow_load_ms, cfg.trace_seed)
        #: prefill/decode roles (see pegaflow.connector.pd)
        self.pd = PdRoles(role, self.engine, block_size, cfg.pd_wait, cfg.pd_hold)
        #: direct GPU-to-GPU hand-over (see pegaflow.connector.direct):
        #: a prefill lends, a decode borrows; hybrid models use the pool
        direct = cfg.pd_direct and groups is None and max_model_len > 0
        self.lender = (
            Lender(block_size, max_model_len, cfg.pd_hold)
            if direct and role in ("kv_producer", "kv_both")
            else None
        )
        self.borrower = Borrower(block_size) if direct and role in ("kv_consumer", "kv_both") else None

    def adopt_worker_namespaces(self, metadata: dict[int, Any]) -> None:
        """Look blocks up under the namespaces the workers save under.

        ``metadata``: vLLM's TP rank of each worker -> what its connector
        sent (:class:`PegaHandshake`). Raises :class:`ConfigError` when a
        rank is missing, reported twice, or not the one vLLM gave the worker:
        the lookups could never match the saves.
        """
        ours = {int(r): m for r, m in metadata.items() if isinstance(m, PegaHandshake)}
        if not ours:
            # Another connector's handshake (MultiConnector hands every
            # sub-connector the first one); keep the config's namespaces.
            return
        ranks = sorted(ours)
        if ranks != list(range(self.tp_size)):
            raise ConfigError(
                f"PegaFlow heard from workers of TP ranks {ranks} but tensor_parallel_size is "
                f"{self.tp_size}; every rank's worker must load the PegaKVConnector"
            )
        for r, m in ours.items():
            if m.tp_rank != r:
                raise ConfigError(
                    f"the vLLM worker of TP rank {r} built its PegaFlow connector as rank "
                    f"{m.tp_rank}: it would save rank {m.tp_rank}'s namespace and no lookup "
                    "would ever match; this is a bug, please report it"
                )
        if self.is_mla:
            found = {m.namespace for m in ours.values()}
            if len(found) != 1:
                raise ConfigError(
                    f"MLA workers disagree on the shared namespace: {sorted(found)} "
                    f"(KV layouts {sorted({m.layout for m in ours.values()})})"
                )
            namespaces = [found.pop()]
        else:
            namespaces = [ours[r].namespace for r in range(self.tp_size)]
            if len(set(namespaces)) != len(namespaces):
                raise ConfigError(
                    f"two TP ranks' workers save under the same namespace ({namespaces}); "
                    "this is a bug, please report it"
                )
        if self.groups is not None:
            self._adopt_group_namespaces(ours)
        if self.lender is not None:
            self.lender.start(
                [ours[r].namespace for r in range(self.tp_size)],
                [getattr(ours[r], "peer_key", "") for r in range(self.tp_size)],
            )
        if namespaces != self.namespaces:
            logger.info(
                "PegaFlow looks blocks up under the workers' namespaces (their KV layout %s; "
                "the config said %s)",
                sorted({m.layout for m in ours.values()}), self.layout,
            )
        self.namespaces = namespaces

    def _state(self, request: "Request") -> ReqState:
        st = self._reqs.get(request.request_id)
        if st is None:
            st = ReqState(request=request, keys=KeyChain(request, self.block_size))
            if self.groups is not None:
                st.hy = hma.new_group_req(self.groups)
            self._reqs[request.request_id] = st
        return st

    def _release(self, st: ReqState) -> None:
        if st.pins is not None:
            for pins in st.pins:
                pins.release()
        st.pins = None
        st.pinned_blocks = 0
        # A direct load is over too: its hold went back to the prefill. A
        # request vLLM preempts later looks its prompt up again (the pool).
        st.direct = None
        if st.load_pending:
            self.tracer.released(st.request.request_id, st.trace)
        st.trace = None
        st.load_pending = False

    def get_num_new_matched_tokens(
        self, request: "Request", num_computed_tokens: int
    ) -> tuple[Optional[int], bool]:
        if not self.cfg.load:
            return 0, False
        try:
            st = self._state(request)
            if st.pins is None and st.direct is None:
                # Never the whole prompt: vLLM must compute at least one token.
                max_blocks = max(0, (request.num_tokens - 1) // self.block_size + 1)
                hashes = st.keys.upto(max_blocks)
                local = num_computed_tokens // self.block_size
                if len(hashes) <= local or not self.engine.is_connected():
                    return 0, False
                if st.hy is not None:
                    return self._group_lookup(st, hashes, local, num_computed_tokens)
                # Kept across SSD waits: they are part of this load's time.
                st.trace = st.trace or self.tracer.start()
                if self._borrow(st, hashes, local):
                    return self._matched(st, num_computed_tokens)
                if self.pd.should_wait(
                    request,
                    lambda k: min(self.engine.count_hits(ns, hashes[:k]) for ns in self.namespaces),
                    len(hashes),
                ):
                    return None, False
                # A block is a hit only when every rank's namespace has it.
                n = min(self.engine.count_hits(ns, hashes) for ns in self.namespaces)
                if self.ssd.should_wait(request.request_id, self.namespaces, hashes, n):
                    return None, False
                st.trace.mark("lookup")
                if n <= local:
                    st.saved = max(st.saved, n)
                    st.trace = None
                    return 0, False
                pins = [self.engine.lookup(ns, hashes[:n]) for ns in self.namespaces]
                got = min(len(p) for p in pins)
                if len({p.segment_id for p in pins}) != 1:
                    # The owner changed segments between two lookups.
                    got = 0
                # Keep exactly the blocks to load on every rank.
                for p in pins:
                    p.release(0, min(local, len(p)))
                    p.release(min(got, len(p)))
                st.trace.mark("pin")
                st.pins = pins
                st.pinned_blocks = got
                st.load_from = local
                # auto: a prefill's hand-over is loaded layer-wise too: an
                # async load would cost its first token two more steps.
                st.layerwise = self.load_mode == "layerwise" or (
                    self.load_mode == "auto"
                    and (
                        remote_prefill(request) is not None
                        or not (self._last_scheduled - {request.request_id})
                    )
                )
                st.saved = max(st.saved, got)
                if got <= local:
                    self._release(st)
                    return 0, False
            return self._matched(st, num_computed_tokens)
        except PegaflowError:
            logger.exception("PegaFlow lookup failed; treating as a miss")
            return 0, False

    def _borrow(self, st: ReqState, hashes: list[bytes], local: int) -> bool:
        """A decode request whose prefill lent its GPU blocks copies them
        from there (in the step that computes the rest of its prompt)."""
        ann = remote_prefill(st.request) if self.borrower is not None else None
        if ann is None or not announced_for(ann, st.request):
            return False
        prompt = None if needs_extra_keys(st.request) else list(st.request.prompt_token_ids or [])
        got = self.borrower.peek(ann, hashes, self.namespaces, prompt)  # type: ignore[union-attr]
        if got is None:
            return False
        n, spec = got
        if n <= local:
            self.borrower.give_back(spec, len(self.namespaces))  # type: ignore[union-attr]
            return False
        st.direct = spec
        st.pinned_blocks = n
        st.load_from = local
        st.layerwise = True
        # The prefill saved its prompt's full blocks to the pool, not the
        # partial one it lent: the decode saves that once its token fills it.
        st.saved = max(st.saved, min(n, int(ann["tokens"]) // self.block_size))
        st.trace.mark("lookup")
        return True

    def _matched(self, st: ReqState, num_computed_tokens: int) -> tuple[Optional[int], bool]:
        hit_tokens = min(st.pinned_blocks * self.block_size, st.request.num_tokens - 1)
        ext = hit_tokens - num_computed_tokens
        if ext <= 0:
            return 0, False
        return ext, not st.layerwise

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
            if st.direct is not None and not st.load_pending:
                self._give_back(st)
            return
        if st.direct is not None:
            self._direct_load(st, ids)
            return
        if st.pins is None:
            return
        if st.hy is not None:
            self._group_loads(st, blocks)
            return
        n = st.pinned_blocks - st.load_from
        block_ids = list(ids[st.load_from : st.load_from + n])
        if len(block_ids) < n:
            # Fewer blocks than hits were allocated: load what fits.
            n = len(block_ids)
        lo = st.load_from
        st.load_pending = True
        self._loads.append(
            LoadSpec(
                req_id=request.request_id,
                block_ids=block_ids,
                segment_id=st.pins[0].segment_id,
                blocks=[p.blocks(lo, lo + n) for p in st.pins],
                layerwise=st.layerwise,
            )
        )
        self.tracer.loading(request.request_id, st.trace, n, st.layerwise)
        if st.layerwise:
            self._step_loading.append(st)
        else:
            self._loading[request.request_id] = st

    def _direct_load(self, st: ReqState, ids: list[int]) -> None:
        spec = st.direct
        assert spec is not None
        lo = st.load_from
        block_ids = list(ids[lo : st.pinned_blocks])
        if not block_ids:
            self._give_back(st)
            return
        # Each worker checks, after taking its part, that the hold still has
        # the key this request matched (its own, that of the last lent
        # block: keys are chained); the load starts at the first block the
        # local prefix cache does not cover.
        spec = replace(spec, first=lo)
        st.direct = spec
        st.load_pending = True
        self._loads.append(
            LoadSpec(
                req_id=st.request.request_id,
                block_ids=block_ids,
                segment_id=0,
                blocks=[],
                layerwise=True,
                direct=spec,
            )
        )
        self.tracer.loading(st.request.request_id, st.trace, len(block_ids), True, ranks=self.tp_size)
        self._step_loading.append(st)

    def _give_back(self, st: ReqState) -> None:
        if st.direct is not None and self.borrower is not None:
            self.borrower.give_back(st.direct, len(self.namespaces))
        st.direct = None

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> PegaConnectorMetadata:
        self._step_seq += 1
        meta = PegaConnectorMetadata(loads=self._loads, step=self._step_seq)
        self._loads = []
        if self.lender is not None:
            meta.pd_holds, meta.pd_released = self.lender.step()
        # A step's layer-wise loads are over once the workers report that
        # step back (update_connector_output).
        if self._step_loading:
            self._steps_loading.append((self._step_seq, self._step_loading))
        self._step_loading = []
        self._last_scheduled = set(scheduler_output.num_scheduled_tokens)
        meta.max_query_len = max(scheduler_output.num_scheduled_tokens.values(), default=0)
        if not self.cfg.save:
            return meta
        nst = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0]) if new.block_ids else []
            if st.hy is not None:
                if new.block_ids:
                    st.hy.block_ids = [list(b) for b in new.block_ids[: len(st.hy.block_ids)]]
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
                if st.hy is not None:
                    for g, b in enumerate(nb[: len(st.hy.block_ids)]):
                        if req_id in resumed:
                            st.hy.block_ids[g] = list(b)
                        else:
                            st.hy.block_ids[g].extend(b)
            self._plan_save(meta, st, cached.num_computed_tokens[i] + nst.get(req_id, 0))
        return meta

    def _plan_save(self, meta: PegaConnectorMetadata, st: ReqState, computed: int) -> None:
        if self.pd.role == "kv_consumer" and remote_prefill(st.request) is not None:
            return  # its prompt is in the pool already; copies would slow decode steps
        if st.hy is not None:
            self._plan_group_saves(meta, st, computed)
            return
        full = min(computed // self.block_size, len(st.block_ids))
        hashes = st.keys.upto(full)
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
        wmeta = getattr(connector_output, "kv_connector_worker_meta", None)
        self.tracer.worker_notes(wmeta)
        if self.borrower is not None:
            for name in getattr(wmeta, "direct_failed", None) or ():
                self.borrower.refuse(name, "a worker could not copy from it; see the workers' log")
        if self.lender is not None:
            self.lender.sent(connector_output.finished_sending)
        self.pd.saves_committed(connector_output.finished_sending, self.namespaces)
        self.pd.expire(self.namespaces)
        # The workers name the last step they ran (PegaWorkerMeta.steps): its
        # forward pass, and with it every layer-wise copy it waited for, is
        # done once its output is here. Not "one output per step": vLLM
        # returns no connector output at all for a step that computed
        # nothing if the connector had nothing to say, so counting outputs
        # fell behind for good after such steps and held the pins.
        steps = getattr(getattr(connector_output, "kv_connector_worker_meta", None), "steps", None)
        if steps:
            done = min(steps)
            while self._steps_loading and self._steps_loading[0][0] <= done:
                for st in self._steps_loading.popleft()[1]:
                    self._release(st)
        for req_id in connector_output.finished_recving or ():
            st = self._loading.pop(req_id, None)
            if st is not None:
                self._release(st)

    def request_finished(
        self, request: "Request", block_ids: list[int]
    ) -> tuple[bool, Optional[dict[str, Any]]]:
        self._last_scheduled.discard(request.request_id)
        self.ssd.forget(request.request_id)
        self.pd.forget(request.request_id)
        st = self._reqs.pop(request.request_id, None)
        if st is None:
            return False, self.pd.announce(request, 0, lambda n: [], False, self.namespaces)
        lent = self._lend(request, st, block_ids)
        params = self.pd.announce(
            request, st.saved, st.keys.upto, st.had_saves, self.namespaces, pin=lent is None
        )
        if lent is not None and params is not None:
            params["pegaflow"]["direct"] = lent
        if not st.load_pending:
            self._give_back(st)
            self._release(st)
        # else: the load may still read its pinned slots (an aborted request
        # whose step is on the GPU); update_connector_output releases them
        # when that step's output, or the async load's end, is reported.
        return st.had_saves or lent is not None, params

    def _lend(self, request: "Request", st: ReqState, block_ids: list[int]) -> Optional[dict[str, Any]]:
        """A prefill lends its prompt's full GPU blocks to the decode (kept
        until the decode copied them or the hold expired)."""
        if self.lender is None or st.hy is not None or not wants_remote_decode(request):
            return None
        if not _finished_normally(request):
            return None  # aborted: no decode will come
        bs = self.block_size
        tokens = request.num_prompt_tokens
        n = min(tokens // bs, len(block_ids))
        keys = st.keys.upto(n)
        n = min(n, len(keys))
        if n <= 0:
            return None
        key = keys[n - 1]
        if n == tokens // bs and tokens % bs and len(block_ids) > n and not needs_extra_keys(request):
            # The prompt's partial last block too: the decode then computes
            # only the token after the prompt, a plain decode step (a full
            # CUDA graph) instead of a mixed batch with the prompt's tail.
            key = tail_key(key, list(request.prompt_token_ids[n * bs : tokens]))
            n += 1
        return self.lender.lend(request.request_id, list(block_ids[:n]), key)

    def stats(self) -> dict[str, Any]:
        """Counters of the scheduler's owner client (tests, debugging)."""
        out = {**self.engine.stats(), **self.pd.counters}
        for side in (self.lender, self.borrower):
            if side is not None:
                out.update(side.counters)
        return out

    def shutdown(self) -> None:
        self.pd.shutdown()
        if self.lender is not None:
            self.lender.shutdown()


def _finished_normally(request: "Request") -> bool:
    """Finished by its length cap (a prefill's max_tokens 1): a decode
    continues it. Not when stopped (its first token ended it: no decode
    comes), aborted or errored."""
    try:
        from vllm.v1.request import RequestStatus
    except ImportError:  # pragma: no cover
        return True
    return request.status == RequestStatus.FINISHED_LENGTH_CAPPED
