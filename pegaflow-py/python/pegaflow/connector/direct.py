"""The direct P/D hand-over: a decode instance copies a finished prefill's
KV straight out of the prefill's GPU blocks (CUDA IPC; NVLink between two
GPUs that have it), instead of through the pool.

The prefill lends the blocks through its *hold table* (shared memory,
``pegaflow_shm::handover``, docs/pd.md), and vLLM keeps them allocated
(``request_finished`` delays their free) until every decode rank said it
copied them or the hold expired:

* prefill scheduler (:class:`Lender`): at start-up, once every worker
  exported its KV cache (``KvCache.export_peer``, brokered by the owner
  under a per-start key), it creates the table with each rank's namespace
  and key. ``lend`` writes a finished request's block ids and last block
  key into a slot and answers ``{"table", "nonce", "slot", "ticket"}`` in
  ``kv_transfer_params``; each step it tells its workers which holds began
  (``pd_holds``) and which are over (``pd_released``); the workers report a
  request in ``finished_sending`` only once it is released, so vLLM never
  reuses a lent block while a copy may read it.
* decode scheduler (:class:`Borrower`): ``peek`` opens the table the params
  name and checks that every rank still holds the slot under that ticket,
  that its namespaces are this instance's and that the lent key is the
  key of this prompt's own last full block (keys are chained: the whole
  prefix). Then the request loads those blocks in the step that computes
  the rest of its prompt; otherwise it takes the pool path as before.
* decode workers (:class:`PeerCopier`): take their rank's part of the hold
  (HELD -> TAKEN, with their pid), check the key again, queue the copies
  on their own stream, make the step's compute wait for them on the GPU,
  and mark the rank DONE once they completed. A hold that is gone when the
  worker comes (expired) becomes a load error: vLLM recomputes those blocks.

Nothing in ``kv_transfer_params`` is trusted: the table name must be one
PegaFlow makes, block ids come from the table, and a hold is copied only
when its key is the decode prompt's own. A decode that dies while its copy
is TAKEN is noticed by the prefill (its pid is gone) and the hold expires.
"""

from __future__ import annotations

import collections
import hashlib
import os
import queue
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from pegaflow import _native
from pegaflow._log import get_logger
from pegaflow.exceptions import PegaflowError

if TYPE_CHECKING:  # pragma: no cover
    from vllm.v1.request import Request

logger = get_logger("pegaflow.connector")

#: holds a prefill keeps at once (more: those requests use the pool path;
#: fewer when long prompts make a table of that many too large)
MAX_HOLDS = 1024


def tail_key(parent: bytes, tokens: list[int]) -> bytes:
    """The key of a prompt's last, partial block: its tokens after the key
    of the full block before it (the pool keeps full blocks only, so this
    key exists only in hold tables). Requests whose keys carry extra inputs
    (cache salt, LoRA, multimodal) never lend a partial block."""
    h = hashlib.sha256(b"pegaflow-pd-tail-v1")
    h.update(parent)
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


def peer_key(rank: int) -> str:
    """The owner-brokered key a worker publishes its exported cache under:
    new per start, so a restarted prefill is never confused with its past,
    and naming the exporting process (pid and start time), which a decode
    checks around each copy: with TP > 1 each rank's memory is its worker
    process's, not the scheduler's that made the hold table."""
    pid = os.getpid()
    # 96 random bits: with any pid and start time, under the table's 64 bytes
    return f"pd/{uuid.uuid4().hex[:24]}/{rank}/{pid}-{_native.process_start_time(pid) or 0}"


def exporter_alive(key: str) -> bool:
    """Whether the process that exported a cache under ``key`` (made by
    :func:`peer_key`) still runs. A key that names no process (an older
    PegaFlow's) counts as alive: the hold table's creator is checked too."""
    pid, _, start = key.rsplit("/", 1)[-1].partition("-")
    if not (pid.isdigit() and start.isdigit()):
        return True
    return _native.process_alive(int(pid), int(start))


@dataclass(frozen=True)
class DirectSpec:
    """What a decode worker needs to copy one lent request (in LoadSpec)."""

    table: str
    nonce: int
    slot: int
    ticket: int
    #: content key of the last lent block this decode loads (checked again
    #: by each worker after taking its rank)
    key: bytes
    #: the decode loads lent blocks [first, first + len(block_ids))
    first: int


@dataclass
class _Lent:
    slot: int
    ticket: int
    deadline: float
    released: bool = False
    expired: bool = False


class Lender:
    """Prefill side, in the scheduler process: lends finished prompts' GPU
    blocks through a hold table."""

    def __init__(self, block_size: int, max_model_len: int, hold: float):
        self.block_size = block_size
        self.max_blocks = max(1, max_model_len // block_size + 1)
        self.hold_s = hold
        self.table: Optional[Any] = None
        self._free: list[int] = []
        self._ticket = 0
        self._lent: dict[str, _Lent] = {}
        self._new: list[str] = []
        self.counters = {"pd_direct_lent": 0, "pd_direct_copied": 0, "pd_direct_expired": 0, "pd_direct_full": 0}

    def start(self, namespaces: list[int], keys: list[str]) -> None:
        """Creates the table once the workers' keys are known (handshake)."""
        if self.table is not None or not keys or not all(keys):
            if keys and not all(keys):
                logger.info(
                    "PegaFlow P/D: direct GPU-to-GPU hand-over off (a worker could not export its "
                    "KV cache, see its log); decodes load from the pool"
                )
            return
        name = "pegaflow-pd-" + uuid.uuid4().hex
        try:
            self.table = _native.HoldTable.create(
                name,
                capacity=MAX_HOLDS,
                max_blocks=self.max_blocks,
                namespaces=namespaces,
                peer_keys=keys,
            )
        except PegaflowError as e:
            logger.warning("PegaFlow P/D: direct hand-over off: %s", e)
            return
        capacity = self.table.capacity
        self._free = list(range(capacity - 1, -1, -1))
        logger.info(
            "PegaFlow P/D: lending prefills' GPU blocks to decodes through %s (%d holds of up to %d blocks)",
            name, capacity, self.max_blocks,
        )

    def lend(self, req_id: str, block_ids: list[int], key: bytes) -> Optional[dict[str, Any]]:
        """Lends ``block_ids`` (the prompt's full blocks; ``key`` the last
        one's). Returns the params for the decode, or None (not lent)."""
        t = self.table
        if t is None or not block_ids or len(block_ids) > self.max_blocks:
            return None
        if not self._free:
            self.counters["pd_direct_full"] += 1
            if self.counters["pd_direct_full"] % 100 == 1:
                logger.warning(
                    "PegaFlow P/D: all %d holds are in use (decodes slow or gone); this request's "
                    "decode loads from the pool", t.capacity,
                )
            return None
        slot = self._free.pop()
        self._ticket = self._ticket % 0xFFFF_FFFF + 1
        try:
            t.hold(slot, self._ticket, key, block_ids)
        except PegaflowError as e:
            logger.warning("PegaFlow P/D: could not lend the blocks of %s: %s", req_id, e)
            self._free.append(slot)
            return None
        self._lent[req_id] = _Lent(slot, self._ticket, time.monotonic() + self.hold_s)
        self._new.append(req_id)
        self.counters["pd_direct_lent"] += 1
        if self.counters["pd_direct_lent"] % 100 == 0:
            c = self.counters
            logger.info(
                "PegaFlow P/D: lent %d prompts' GPU blocks: %d copied by their decode, %d holds "
                "expired, %d not lent (all holds in use)",
                c["pd_direct_lent"], c["pd_direct_copied"], c["pd_direct_expired"], c["pd_direct_full"],
            )
        return {"table": t.name, "nonce": t.nonce, "slot": slot, "ticket": self._ticket}

    def step(self) -> tuple[list[str], list[str]]:
        """Per step: (holds begun, holds over) for the workers' metadata."""
        new, self._new = self._new, []
        over: list[str] = []
        t = self.table
        if t is None:
            return new, over
        now = time.monotonic()
        for rid, h in self._lent.items():
            if h.released:
                continue
            try:
                if t.over(h.slot, h.ticket):
                    done = True
                elif now >= h.deadline:
                    done = t.expire(h.slot, h.ticket)
                    if done and not h.expired:
                        h.expired = True
                        self.counters["pd_direct_expired"] += 1
                else:
                    done = False
            except PegaflowError as e:  # pragma: no cover - a slot id we made
                logger.error("PegaFlow P/D: hold of %s: %s; releasing it", rid, e)
                done = True
            if done:
                h.released = True
                if not h.expired:
                    self.counters["pd_direct_copied"] += 1
                over.append(rid)
        return new, over

    def sent(self, req_ids: Any) -> None:
        """vLLM got the blocks back (``finished_sending``): the slots are free."""
        for rid in req_ids or ():
            h = self._lent.get(rid)
            if h is None or not h.released:
                continue
            del self._lent[rid]
            try:
                self.table.free(h.slot, h.ticket)  # type: ignore[union-attr]
                self._free.append(h.slot)
            except PegaflowError as e:
                logger.error("PegaFlow P/D: slot %d of %s stays out of use: %s", h.slot, rid, e)

    def shutdown(self) -> None:
        if self.table is not None:
            try:
                self.table.unlink()
            except PegaflowError:
                pass


class _Tables:
    """Hold tables a decode process mapped, by name (a prefill re-created
    under the same name has another nonce); the oldest go beyond 64."""

    def __init__(self) -> None:
        self._tables: dict[str, Any] = {}

    def get(self, name: str, nonce: int) -> Any:
        """The table, or None when it cannot be mapped (gone, not ours, of
        another nonce): the reason is logged at debug level."""
        t = self._tables.get(name)
        if t is not None and t.nonce == nonce:
            return t
        try:
            t = _native.HoldTable.open(name)
        except PegaflowError as e:
            logger.debug("PegaFlow P/D: hold table %s: %s", name, e)
            return None
        if t.nonce != nonce:
            return None
        self._tables[name] = t
        if len(self._tables) > 64:
            self._tables.pop(next(iter(self._tables)))
        return t

    def cached(self, name: str, nonce: int) -> Any:
        t = self._tables.get(name)
        return t if t is not None and t.nonce == nonce else None


class Borrower:
    """Decode side, in the scheduler process: decides which requests copy
    from their prefill's GPU blocks."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._tables = _Tables()
        #: tables this instance cannot copy from (other namespaces, workers failed)
        self._refused: dict[str, str] = {}
        self.counters = {"pd_direct_borrowed": 0, "pd_direct_missed": 0}

    def refuse(self, name: str, why: str) -> None:
        if name not in self._refused:
            self._refused[name] = why
            logger.warning(
                "PegaFlow P/D: not copying from prefill table %s (%s); its requests load from the pool",
                name, why,
            )

    def peek(
        self,
        ann: dict[str, Any],
        hashes: list[bytes],
        namespaces: list[int],
        prompt: Optional[list[int]] = None,
    ) -> Optional[tuple[int, DirectSpec]]:
        """``(blocks, spec)`` when this decode request can copy the first
        ``blocks`` blocks of its prompt from its prefill's GPU: full blocks
        whose last key is its own, or those and the prompt's partial last
        block when the lent key is :func:`tail_key` of its own tail
        (``prompt``: its prompt's token ids; None when its keys carry extra
        inputs)."""
        d = ann.get("direct")
        if not isinstance(d, dict):
            return None
        try:
            name = str(d["table"])
            nonce, slot, ticket = int(d["nonce"]), int(d["slot"]), int(d["ticket"])
        except (KeyError, TypeError, ValueError):
            return None
        if name in self._refused:
            return None
        t = self._tables.get(name, nonce)
        if t is None:
            self.counters["pd_direct_missed"] += 1
            return None
        if list(t.namespaces) != list(namespaces):
            self.refuse(name, "another model, KV layout or TP size: its namespaces differ")
            return None
        try:
            got = t.peek(slot, ticket)
        except PegaflowError:
            got = None
        if got is None or not t.creator_alive():
            self.counters["pd_direct_missed"] += 1
            return None
        n, key = got
        if not (0 < n <= len(hashes) and hashes[n - 1] == key) and not self._tail_matches(
            n, key, ann, hashes, prompt
        ):
            # not this prompt's blocks (a client reused params): never copied
            self.counters["pd_direct_missed"] += 1
            return None
        self.counters["pd_direct_borrowed"] += 1
        return n, DirectSpec(name, nonce, slot, ticket, key, 0)

    def _tail_matches(
        self, n: int, key: bytes, ann: dict[str, Any], hashes: list[bytes], prompt: Optional[list[int]]
    ) -> bool:
        try:
            tokens = int(ann.get("tokens", -1))
        except (TypeError, ValueError):
            return False
        bs = self.block_size
        full = tokens // bs
        if prompt is None or tokens % bs == 0 or n != full + 1 or not 1 <= full <= len(hashes):
            return False
        if tokens > len(prompt):
            return False
        return tail_key(hashes[full - 1], list(prompt[full * bs : tokens])) == key

    def give_back(self, spec: DirectSpec, ranks: int) -> None:
        """The request will not copy (vLLM did not schedule the load): tell
        the prefill at once instead of letting the hold run out."""
        t = self._tables.cached(spec.table, spec.nonce)
        if t is None:
            return
        for r in range(ranks):
            try:
                if t.take(spec.slot, spec.ticket, r) is not None:
                    t.done(spec.slot, spec.ticket, r)
            except PegaflowError:
                pass


class PeerCopier:
    """Decode side, in a worker: copies lent blocks from the prefill's GPU."""

    def __init__(self, kv: Any, rank: int, device: Any):
        import torch

        self._torch = torch
        self.kv = kv
        self.rank = rank
        self.stream = torch.cuda.Stream(device=device)
        self._tables = _Tables()
        self._exports: dict[str, bytes] = {}
        #: copies queued, oldest first: (start event, end event, table,
        #: peer key, slot, ticket, trace handle, bytes, local blocks). A thread waits for each and
        #: gives its hold back as soon as the copy completed (the engine's
        #: loop never blocks on it, and an engine that goes idle right after
        #: still releases the prefill's blocks); the engine's thread then
        #: collects them (``finish``) for the traces and counters.
        self._queue: "queue.Queue[Optional[tuple[Any, ...]]]" = queue.Queue()
        self._completed: "collections.deque[tuple[Any, ...]]" = collections.deque()
        #: notified by the waiting thread at each completed copy
        self._completion = threading.Condition()
        self._waiter = threading.Thread(target=self._wait_loop, name="pegaflow-pd-copies", daemon=True)
        self._waiter.start()
        #: copies done, bytes and GPU milliseconds (the copy alone, timed by
        #: CUDA events: the hand-over rate against the GPU-to-GPU ceiling)
        self.copies = 0
        self.bytes = 0
        self.gpu_ms = 0.0
        #: copies issued per path: "dma" (long runs of blocks) or "kernel"
        self.paths: collections.Counter[str] = collections.Counter()
        self._logged_at = 0
        self._queued = 0
        self._handle = 0
        #: tables whose copies cannot work here (reported to the scheduler)
        self.failed: list[str] = []
        #: blocks copied while their prefill exited (load errors)
        self.lost: set[int] = set()
        self._failed_once: set[str] = set()

    def _export(self, key: str) -> bytes:
        e = self._exports.get(key)
        if e is None:
            e = self.kv.engine.fetch_ipc(key, 5.0)
            if e is None:
                raise PegaflowError(f"the owner has no export under {key!r} (prefill gone, or another owner)")
            self._exports[key] = e
        return e

    def start(self, spec: DirectSpec, block_ids: list[int], trace: Any, req_id: str) -> bool:
        """Takes this rank's part of the hold and queues the copies; the
        current stream waits for them. False: nothing copied (the blocks
        are load errors)."""
        torch = self._torch
        t0 = time.time_ns()  # the clock of the load traces (trace.now)
        try:
            t = self._tables.get(spec.table, spec.nonce)
            if t is None:
                raise PegaflowError(f"hold table {spec.table} is gone or was re-created")
            key = t.peer_keys[self.rank]
            export = self._export(key)
            got = t.take(spec.slot, spec.ticket, self.rank)
        except (PegaflowError, IndexError) as e:
            self._fail(spec.table, str(e))
            return False
        if got is None:
            return False  # expired or given back: recompute
        lent_key, ids = got
        if not (t.creator_alive() and exporter_alive(key)):
            # Its memory is being freed: CUDA leaves reading it undefined.
            # (One that dies during the copy: see _wait_loop.)
            t.done(spec.slot, spec.ticket, self.rank)
            return False
        try:
            remote = ids[spec.first : spec.first + len(block_ids)]
            if lent_key != spec.key or len(remote) < len(block_ids):
                raise PegaflowError("the hold changed between the scheduler's look and the copy")
            cur = torch.cuda.current_stream()
            # The blocks may have been another request's a moment ago: copy
            # after the work queued so far and after saves still reading them.
            self.stream.wait_stream(cur)
            self.kv.fence_saves(int(self.stream.cuda_stream))
            start = torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            path = self.kv.pull_peer(key, export, list(zip(block_ids, remote)), int(self.stream.cuda_stream))
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(self.stream)
            cur.wait_event(ev)
        except PegaflowError as e:
            t.done(spec.slot, spec.ticket, self.rank)
            self._fail(spec.table, str(e))
            return False
        self.paths[path] += 1
        self._handle -= 1
        trace.issued(self._handle, req_id, len(block_ids), self.kv.slot_bytes, t0, source="gpu")
        nbytes = len(block_ids) * self.kv.slot_bytes
        self._queued += 1
        self._queue.put((start, ev, t, key, spec.slot, spec.ticket, self._handle, nbytes, list(block_ids)))
        return True

    def _wait_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            start, ev, t, key, slot, ticket, h, nbytes, blocks = item
            ms, lost = 0.0, blocks
            try:
                ev.synchronize()  # releases the GIL while it waits
                ms = start.elapsed_time(ev)
                # The prefill's memory stayed valid for the whole copy only
                # if the prefill outlived it (CUDA leaves reading the memory
                # of an exporter that exited undefined): else they are lost.
                if t.creator_alive() and exporter_alive(key):
                    lost = ()
            except Exception as e:  # pragma: no cover - a CUDA error: the step fails too
                # never die: the engine's thread waits for this one
                logger.error("PegaFlow P/D: waiting for a copy failed: %s", e)
            try:
                t.done(slot, ticket, self.rank)
            except PegaflowError:
                pass
            with self._completion:
                self._completed.append((h, nbytes, ms, lost))
                self._completion.notify_all()

    def _fail(self, table: str, why: str) -> None:
        if table not in self._failed_once:
            self._failed_once.add(table)
            self.failed.append(table)
            logger.warning(
                "PegaFlow P/D: copying from prefill table %s failed on TP rank %d (%s); vLLM "
                "recomputes those blocks and later requests of that prefill load from the pool. "
                "Both instances must run on this node with peer access between their GPUs; "
                "listing the prefill's GPU after the decode's own in CUDA_VISIBLE_DEVICES is the "
                "tested setup (docs/pd.md)",
                table, self.rank, why,
            )

    def finish(self, trace: Any, wait: bool = False) -> None:
        """Collects the copies completed since the last call (their holds
        are given back already) for the traces and counters; ``wait``: all
        queued copies first (a step that copied, tests, shutdown)."""
        if wait:
            with self._completion:
                done = self._completion.wait_for(
                    lambda: self._queued <= self.copies + len(self._completed), timeout=60
                )
            if not done:  # pragma: no cover - a GPU that hangs
                logger.error("PegaFlow P/D: copies from a prefill's GPU not done after 60 s (TP rank %d)", self.rank)
        while self._completed:
            h, nbytes, ms, lost = self._completed.popleft()
            trace.done(h, len(lost), gpu_ms=ms)
            if lost:
                self.lost.update(lost)
                logger.warning(
                    "PegaFlow P/D: the prefill exited during a copy from its GPU; vLLM recomputes "
                    "those %d blocks (TP rank %d)", len(lost), self.rank,
                )
            self.copies += 1
            self.bytes += nbytes
            self.gpu_ms += ms
        if self.copies - self._logged_at >= 50:
            self._logged_at = self.copies
            logger.info("PegaFlow P/D: %s", self.summary())

    def summary(self) -> str:
        rate = self.bytes / (self.gpu_ms / 1e3) / 1e9 if self.gpu_ms > 0 else 0.0
        return (
            f"TP rank {self.rank} copied {self.copies} hand-overs GPU to GPU, "
            f"{self.bytes / 1e9:.2f} GB in {self.gpu_ms:.1f} ms of copies ({rate:.1f} GB/s; "
            f"{self.paths['dma']} by the copy engines, {self.paths['kernel']} by the copy kernel)"
        )

    def close(self) -> None:
        """Stops the waiting thread after the copies queued so far."""
        self._queue.put(None)
        self._waiter.join(timeout=10)

    def take_failed(self) -> list[str]:
        f, self.failed = self.failed, []
        return f

