"""Load traces: where the time of a request's load from PegaFlow went.

A load crosses two processes: vLLM's scheduler looks the request's blocks
up and pins them, vLLM schedules it, every TP worker issues the copies and
sees them done, and the scheduler releases the pins. Each side notes when
its phases end (``time.time_ns``: one clock for the node's processes); the
workers hand their notes to the scheduler with each step's output (vLLM's
``KVConnectorWorkerMetadata``, aggregated over the TP workers), and when
the scheduler releases the pins it writes the load as one JSON line on the
``pegaflow.connector.trace`` logger (vLLM's logger, so vLLM's format and
stream) if

* the request was sampled (``pegaflow.trace_sample_rate``, drawn once per
  request at its lookup; ``pegaflow.trace_seed`` fixes the draws), or
* the load took ``pegaflow.slow_load_ms`` or longer, from the start of the
  lookup to the last rank's copy seen done: every slow load is written.

The phases of a record are contiguous (each starts when the one before
ended, so their ``ms`` add up to ``total_ms``):

``lookup``
    counting the hits in every rank's namespace (and any wait for blocks
    staged from the owner's SSD tier);
``pin``
    pinning them;
``scheduled``
    until vLLM allocated GPU blocks for the hit and scheduled the request;
``dispatch``
    until the (last) worker started issuing the copies: the step reaching
    the worker, behind the step before it;
``copy_issue``
    queueing the copies;
``copy_done``
    until the worker saw them done: for a layer-wise load at the end of the
    step that uses it (so it includes that step's forward pass), for an
    async load at the first poll after they completed;
``release``
    until the scheduler released the pins (the step's output back).

With TP, each ``copies`` entry is one rank's; the phases follow the last
rank. Timing every load costs a few clock reads; only traced loads are
formatted and logged.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

from pegaflow._log import get_logger

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
except ImportError:  # pragma: no cover - a vLLM without the worker -> scheduler channel
    KVConnectorWorkerMetadata = object  # type: ignore[misc,assignment]

logger = get_logger("pegaflow.connector.trace")

#: the scheduler-side phases, in order (the copies' come from the workers)
PHASES = ("lookup", "pin", "scheduled", "dispatch", "copy_issue", "copy_done", "release")


def now() -> int:
    return time.time_ns()


@dataclass
class CopyNote:
    """One worker's copy of one load (picklable: it crosses processes)."""

    req_id: str
    rank: int
    blocks: int
    bytes: int
    issue_start: int
    issue_end: int
    #: when the worker saw the copy done (0: never issued)
    done: int = 0
    #: blocks that could not be loaded (recomputed by vLLM)
    failed: int = 0
    #: where the blocks came from: "pool", or "gpu" (a P/D prefill's GPU)
    source: str = "pool"
    #: GPU time of the copy alone (CUDA events; "gpu" copies), 0 if unknown
    gpu_ms: float = 0.0


@dataclass
class PegaWorkerMeta(KVConnectorWorkerMetadata):
    """What the workers tell the scheduler after a step: its finished
    copies (load traces) and the step each worker ran (layer-wise loads of
    that step and before are over: their pins can go)."""

    copies: list[CopyNote] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    #: P/D hold tables whose direct copies failed on this worker
    direct_failed: list[str] = field(default_factory=list)

    def aggregate(self, other: "PegaWorkerMeta") -> "PegaWorkerMeta":
        return PegaWorkerMeta(
            self.copies + list(getattr(other, "copies", ())),
            self.steps + list(getattr(other, "steps", ())),
            self.direct_failed + list(getattr(other, "direct_failed", ())),
        )


#: Copies a worker remembers while they run; the oldest are forgotten beyond
#: (a copy the native side never reports done must not grow this forever).
MAX_IN_FLIGHT = 4096


class WorkerTrace:
    """The worker's notes: when each load's copies were issued and seen done."""

    def __init__(self, rank: int):
        self.rank = rank
        self._issued: dict[int, CopyNote] = {}
        self._done: list[CopyNote] = []

    def issued(
        self, handle: int, req_id: str, blocks: int, slot_bytes: int, start: int, source: str = "pool"
    ) -> None:
        self._issued[handle] = CopyNote(
            req_id, self.rank, blocks, blocks * slot_bytes, start, now(), source=source
        )
        if len(self._issued) > MAX_IN_FLIGHT:
            self._issued.pop(next(iter(self._issued)))

    def not_issued(self, req_id: str, blocks: int, start: int) -> None:
        t = now()
        self._done.append(CopyNote(req_id, self.rank, blocks, 0, start, t, t, blocks))

    def done(self, handle: int, failed: int, gpu_ms: float = 0.0) -> None:
        note = self._issued.pop(handle, None)
        if note is not None:
            note.done = now()
            note.failed = failed
            note.gpu_ms = gpu_ms
            self._done.append(note)

    def take(self) -> Optional[PegaWorkerMeta]:
        """The copies seen done since the last call, for the scheduler."""
        if not self._done:
            return None
        out, self._done = self._done, []
        return PegaWorkerMeta(out)


@dataclass
class LoadTrace:
    """One request's load, as the scheduler sees it."""

    start: int
    sampled: bool
    #: scheduler-side phase -> when it ended
    ends: dict[str, int] = field(default_factory=dict)
    blocks: int = 0
    layerwise: bool = True
    copies: list[CopyNote] = field(default_factory=list)
    #: ranks whose copy notes the record waits for after the release
    ranks: int = 0

    def mark(self, phase: str) -> None:
        self.ends[phase] = now()


#: how long a released load's record waits for a late copy note
LATE_NOTES_S = 2.0


def _complete(t: LoadTrace) -> bool:
    return len({c.rank for c in t.copies}) >= t.ranks


class LoadTracer:
    """The scheduler's side: starts traces, joins the workers' notes, writes
    the records."""

    def __init__(self, sample_rate: float, slow_load_ms: float, seed: Optional[int] = None):
        self.sample_rate = sample_rate
        self.slow_ns = int(slow_load_ms * 1e6)
        self._rng = random.Random(seed)
        #: loads handed to the workers: req_id -> trace
        self._loading: dict[str, LoadTrace] = {}
        #: released loads still missing a rank's copy note: req_id ->
        #: (trace, when to write it anyway)
        self._late: dict[str, tuple[LoadTrace, int]] = {}

    def start(self) -> LoadTrace:
        return LoadTrace(start=now(), sampled=self._rng.random() < self.sample_rate)

    def loading(
        self, req_id: str, trace: Optional[LoadTrace], blocks: int, layerwise: bool, ranks: int = 0
    ) -> None:
        """The load was scheduled: the workers copy it in the coming step.
        ``ranks``: the record waits (up to :data:`LATE_NOTES_S`) for that
        many ranks' copy notes after the release: a P/D direct copy's
        worker sees it done from another thread, often a step after the
        step that used it."""
        if trace is None:
            return
        trace.mark("scheduled")
        trace.blocks = blocks
        trace.layerwise = layerwise
        trace.ranks = ranks
        self._loading[req_id] = trace

    def worker_notes(self, meta: Any) -> None:
        """Attach the copies the workers report (``KVConnectorOutput.
        kv_connector_worker_meta``) to their loads."""
        for note in getattr(meta, "copies", None) or ():
            t = self._loading.get(note.req_id)
            if t is None:
                late = self._late.get(note.req_id)
                t = late[0] if late is not None else None
            if t is not None:
                t.copies.append(note)
        if self._late:
            at = now()
            for req_id, (t, deadline) in list(self._late.items()):
                if _complete(t) or at >= deadline:
                    del self._late[req_id]
                    self._write(req_id, t)

    def released(self, req_id: str, trace: Optional[LoadTrace]) -> None:
        """The load's pins were released: write its record if it is traced
        (once every rank's copy note came, see :meth:`loading`)."""
        if self._loading.pop(req_id, None) is None or trace is None:
            return
        trace.mark("release")
        if not _complete(trace):
            if len(self._late) >= MAX_IN_FLIGHT:
                old = next(iter(self._late))
                self._write(old, self._late.pop(old)[0])
            self._late[req_id] = (trace, now() + int(LATE_NOTES_S * 1e9))
            return
        self._write(req_id, trace)

    def _write(self, req_id: str, trace: LoadTrace) -> None:
        done = max((c.done for c in trace.copies), default=0)
        load_ns = (done or trace.ends["release"]) - trace.start
        if load_ns >= self.slow_ns:
            reason = "slow"
        elif trace.sampled:
            reason = "sampled"
        else:
            return
        logger.info("%s", json.dumps(self.record(req_id, trace, reason, load_ns)))

    def record(self, req_id: str, t: LoadTrace, reason: str, load_ns: int) -> dict[str, Any]:
        def ms(ns: int) -> float:
            return round(ns / 1e6, 3)

        last = lambda attr: max((getattr(c, attr) for c in t.copies), default=0)  # noqa: E731
        ends = {
            "lookup": t.ends.get("lookup", t.start),
            "pin": t.ends.get("pin", t.start),
            "scheduled": t.ends.get("scheduled", t.start),
            "dispatch": last("issue_start"),
            "copy_issue": last("issue_end"),
            "copy_done": last("done"),
            "release": t.ends["release"],
        }
        phases = []
        prev = t.start
        for name in PHASES:
            # Phases the workers did not report (a copy never issued) take
            # no time; a clock read on another CPU never runs backwards.
            end = max(prev, ends[name] or prev)
            phases.append({"phase": name, "at_ms": ms(end - t.start), "ms": ms(end - prev)})
            prev = end
        copies = [
            {
                "rank": c.rank,
                "blocks": c.blocks,
                "bytes": c.bytes,
                "failed": c.failed,
                "issue_at_ms": ms(c.issue_start - t.start),
                "issue_ms": ms(c.issue_end - c.issue_start),
                "done_at_ms": ms(c.done - t.start) if c.done else None,
                "source": c.source,
                "gpu_ms": round(c.gpu_ms, 3),
            }
            for c in sorted(t.copies, key=lambda c: c.rank)
        ]
        started = datetime.fromtimestamp(t.start / 1e9, tz=timezone.utc)
        return {
            "event": "pegaflow.load",
            "reason": reason,
            "req_id": req_id,
            "mode": "layerwise" if t.layerwise else "async",
            "blocks": t.blocks,
            "bytes": sum(c.bytes for c in t.copies),
            "failed_blocks": sum(c.failed for c in t.copies),
            "start": started.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "load_ms": ms(load_ns),
            "total_ms": ms(prev - t.start),
            "phases": phases,
            "copies": copies,
        }
