"""Prefill/decode roles of ``PegaKVConnector`` (vLLM's ``kv_role``).

A prefill instance (``kv_producer``) computes a prompt's KV and saves it
into the pool; a decode instance (``kv_consumer``) loads it from there
instead of computing it. vLLM ties the two requests together with
``kv_transfer_params`` (the router, :mod:`pegaflow.router`, carries them):

* the router asks the prefill with ``{"do_remote_decode": true}``;
* the prefill's ``request_finished`` answers (vLLM puts it in the HTTP
  answer) ``{"do_remote_prefill": true, "pegaflow": {"v": 1, "blocks": N,
  "tokens": T}}``: its N leading full blocks of the T-token prompt are (or
  are about to be) in the pool, under the content keys both sides compute
  alike (:mod:`.keys`);
* the decode, given those params, waits (the request only, no step) until
  the pool holds those N blocks, at most ``pegaflow.pd_wait`` seconds, then
  loads them and computes only the prompt's last partial block. With
  ``pegaflow.load_mode: auto`` (the default) the load is layer-wise, in the
  step that computes that block (each layer's attention waits on the GPU
  for its own layer's copy, which overlaps the other layers' compute): an
  async load would cost the first token two more decode steps (measured on
  H200: docs/benchmarks.md). ``async`` keeps other requests' steps from
  ever waiting for a copy, at that price.

Guarantees and failure behaviour:

* Wrong tokens are impossible by construction: the decode loads nothing but
  blocks found under the keys of its own prompt's tokens; the params only
  say how many to wait for. A prefill that died before committing its saves,
  an owner restart or eviction make blocks missing; the decode then loads
  what is there after ``pd_wait`` and computes the rest (slower, same
  tokens). An owner that is down makes the decode compute everything at
  once (no wait).
* The prefill pins the blocks it announced once its saves committed and
  holds them ``pegaflow.pd_hold`` seconds, so the pool's eviction cannot
  take them while the decode is on its way; a decode that never comes
  (dead, or the router gave up) only delays their eviction by that long.
  Pins are released on the scheduler's next call after the deadline and
  at shutdown; an owner restart drops them with its pool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from pegaflow._log import get_logger
from pegaflow.exceptions import PegaflowError

if TYPE_CHECKING:  # pragma: no cover
    from vllm.v1.request import Request

logger = get_logger("pegaflow.connector")

#: version of the ``kv_transfer_params["pegaflow"]`` dict
PARAMS_VERSION = 1

def remote_prefill(request: "Request") -> Optional[dict[str, Any]]:
    """The prefill's announcement this decode request carries, if any."""
    p = getattr(request, "kv_transfer_params", None)
    if not isinstance(p, dict) or not p.get("do_remote_prefill"):
        return None
    ours = p.get("pegaflow")
    if not isinstance(ours, dict) or ours.get("v") != PARAMS_VERSION:
        return None
    return ours


def announced_for(ann: dict[str, Any], request: "Request") -> bool:
    """Whether a prefill's announcement is this request's: its prompt, or
    its prompt plus the token the prefill sampled (pegaflow-router sends
    the decode that continuation, see pegaflow.router.first_token)."""
    try:
        tokens = int(ann.get("tokens", -1))
    except (TypeError, ValueError):
        return False
    return tokens in (request.num_prompt_tokens, request.num_prompt_tokens - 1)


def wants_remote_decode(request: "Request") -> bool:
    p = getattr(request, "kv_transfer_params", None)
    return isinstance(p, dict) and bool(p.get("do_remote_decode"))


@dataclass
class _Held:
    deadline: float
    hashes: list[bytes]
    pins: list[Any] = field(default_factory=list)

    def complete(self) -> bool:
        return bool(self.pins) and all(p.held() >= len(self.hashes) for p in self.pins)


class PdRoles:
    """Per-instance P/D state of the scheduler side.

    ``role``: vLLM's ``kv_role``. A ``kv_both`` instance does both jobs
    (it answers ``do_remote_decode`` and honours ``do_remote_prefill``); the
    roles only change defaults: a consumer never saves the blocks of a
    request that came with a remote prefill (they are in the pool already,
    and the copies would slow its decode steps).
    """

    def __init__(self, role: str, engine: Any, block_size: int, wait: float, hold: float):
        self.role = role
        self.engine = engine
        self.block_size = block_size
        self.wait = wait
        self.hold = hold
        #: consumer: req_id -> monotonic deadline of the wait for the producer's blocks
        self._waiting: dict[str, float] = {}
        #: producer: req_id -> (deadline, keys to pin once its saves committed)
        self._to_pin: dict[str, tuple[float, list[bytes]]] = {}
        #: producer: req_id -> pins held until the deadline
        self._held: dict[str, _Held] = {}
        self.counters = {
            "pd_announced": 0,
            "pd_waits": 0,
            "pd_wait_timeouts": 0,
            "pd_held": 0,
            "pd_hold_expired": 0,
            "pd_hold_incomplete": 0,
        }

    # ------------------------------------------------------------ consumer

    def should_wait(
        self,
        request: "Request",
        have: Callable[[int], int],
        max_blocks: int,
    ) -> bool:
        """Whether this decode request must wait for its prefill's blocks.

        ``have(n)``: leading blocks of the request's first ``n`` the pool
        holds on every rank (0 when the owner is away). True until the
        announced blocks are all there or ``pd_wait`` passed since the first
        call; then it logs what is missing and gives up (the rest is computed).
        """
        ann = remote_prefill(request)
        if ann is None:
            return False
        try:
            want = min(int(ann.get("blocks", 0)), max_blocks)
        except (TypeError, ValueError):
            return False
        if not announced_for(ann, request):
            # Not this prompt's prefill (a client reused params): the keys
            # still decide what is loaded; only the wait is skipped.
            return False
        if want <= 0 or not self.engine.is_connected():
            self._waiting.pop(request.request_id, None)
            return False
        n = have(want)
        rid = request.request_id
        if n >= want:
            self._waiting.pop(rid, None)
            return False
        now = time.monotonic()
        deadline = self._waiting.get(rid)
        if deadline is None:
            self._waiting[rid] = now + self.wait
            self.counters["pd_waits"] += 1
            return self.wait > 0
        if now < deadline:
            return True
        self._waiting.pop(rid, None)
        self.counters["pd_wait_timeouts"] += 1
        logger.warning(
            "PegaFlow P/D: request %s: the prefill announced %d blocks but the pool holds %d after "
            "%.1f s (prefill died before its saves committed, or they were evicted); computing "
            "the other %d here",
            rid, want, n, self.wait, want - n,
        )
        return False

    def forget(self, req_id: str) -> None:
        self._waiting.pop(req_id, None)

    # ------------------------------------------------------------ producer

    def announce(
        self,
        request: "Request",
        saved_blocks: int,
        keys: Callable[[int], list[bytes]],
        saves_pending: bool,
        namespaces: list[int],
        pin: bool = True,
    ) -> Optional[dict[str, Any]]:
        """The ``kv_transfer_params`` a finished prefill request answers
        with (None when it was not asked for a remote decode)."""
        if not wants_remote_decode(request):
            return None
        prompt_blocks = request.num_prompt_tokens // self.block_size
        n = min(saved_blocks, prompt_blocks)
        self.counters["pd_announced"] += 1
        if n > 0 and self.hold > 0 and pin:
            hashes = keys(n)[:n]
            if saves_pending:
                self._to_pin[request.request_id] = (time.monotonic() + self.hold, hashes)
            else:
                self._pin(request.request_id, hashes, namespaces)
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "pegaflow": {"v": PARAMS_VERSION, "blocks": n, "tokens": request.num_prompt_tokens},
        }

    def saves_committed(self, req_ids: Any, namespaces: list[int]) -> None:
        for rid in req_ids or ():
            pending = self._to_pin.pop(rid, None)
            if pending is not None:
                self._pin(rid, pending[1], namespaces)

    def _pin(self, rid: str, hashes: list[bytes], namespaces: list[int]) -> None:
        h = _Held(time.monotonic() + self.hold, hashes)
        self._held[rid] = h
        self.counters["pd_held"] += 1
        self._repin(rid, h, namespaces)

    def _repin(self, rid: str, h: _Held, namespaces: list[int]) -> None:
        # The owner publishes committed blocks a moment after the commit, so
        # the first lookup may pin fewer than were saved: pin again (new pins
        # first, then the old ones go) until all are held or the hold ends.
        try:
            pins = [self.engine.lookup(ns, h.hashes) for ns in namespaces]
        except PegaflowError as e:
            logger.warning("PegaFlow P/D: could not pin the blocks of %s for its decode: %s", rid, e)
            return
        old, h.pins = h.pins, pins
        for p in old:
            try:
                p.release()
            except PegaflowError:
                pass

    def expire(self, namespaces: Optional[list[int]] = None, now: Optional[float] = None) -> None:
        """Releases the pins whose hold is over; tops up incomplete ones."""
        now = time.monotonic() if now is None else now
        for rid in [r for r, (d, _) in self._to_pin.items() if d <= now]:
            # its saves never reported committed within the hold: nothing to pin
            del self._to_pin[rid]
        for rid, h in list(self._held.items()):
            if h.deadline <= now:
                if not h.complete():
                    self._incomplete(rid, h)
                self._release(rid)
                self.counters["pd_hold_expired"] += 1
            elif namespaces is not None and not h.complete():
                self._repin(rid, h, namespaces)

    def _incomplete(self, rid: str, h: _Held) -> None:
        """Some announced blocks never showed in the pool during the hold:
        the decode computed them. Say why it happens and what to do (once,
        then every 100th time: it repeats for every request)."""
        n = self.counters["pd_hold_incomplete"]
        self.counters["pd_hold_incomplete"] += 1
        if n % 100:
            return
        got = min((p.held() for p in h.pins), default=0)
        logger.warning(
            "PegaFlow P/D: only %d of the %d blocks announced for %s were in the pool while its "
            "hold lasted (%d request(s) so far): its decode computes the rest. Usually the pool "
            "refused them: TinyLFU admission keeps a full pool's blocks against new ones, which "
            "is every prefill's; run pegaflow-owner with --disable-lfu-admission for P/D, and a "
            "pool that holds the prompts in flight (docs/pd.md)",
            got,
            len(h.hashes),
            rid,
            n + 1,
        )

    def _release(self, rid: str) -> None:
        h = self._held.pop(rid, None)
        if h is None:
            return
        for p in h.pins:
            try:
                p.release()
            except PegaflowError:
                pass

    def held_requests(self) -> list[str]:
        return list(self._held)

    def shutdown(self) -> None:
        for rid in list(self._held):
            self._release(rid)
        self._to_pin.clear()
