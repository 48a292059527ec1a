"""Staging blocks from the owner's SSD tier for the scheduler side.

When a request's pool hits end before blocks the owner's SSD tier holds
(read from the membership set in shared memory: no round trip), the
scheduler asks the owner to stage those blocks into the pool (``Stage``
requests on its ring; the owner reads them with io_uring and commits them)
and tells vLLM to ask again later: ``get_num_new_matched_tokens`` returns
``(None, False)``, which vLLM (0.25 and 0.32 alike) answers by skipping the
request for this step and calling again at a later step. No step waits for
the disk. Once the pool holds the staged blocks (or the owner reports every
request settled, or :data:`STAGE_TIMEOUT` passed), the request goes on with
whatever the pool holds then, loaded the usual way.

Settings (``kv_connector_extra_config``): ``pegaflow.ssd_stage: false``
turns staging off; ``pegaflow.ssd_stage_timeout`` (seconds, default 5)
bounds how long one request waits for the disk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

#: seconds one request may wait for its blocks to be staged, by default
STAGE_TIMEOUT = 5.0


@dataclass
class _Pending:
    #: pool hits the request waits for (its pool hits + the staged blocks)
    target: int
    tickets: list[Any]
    deadline: float


class SsdStager:
    """Which requests wait for blocks staged from SSD, and until when."""

    def __init__(self, engine: Any, enabled: bool = True, timeout: float = STAGE_TIMEOUT):
        self.engine = engine
        self.enabled = enabled and hasattr(engine, "stage")
        self.timeout = timeout
        self._pending: dict[str, _Pending] = {}
        #: requests that waited, and blocks asked for (tests, debugging)
        self.requests_staged = 0
        self.blocks_requested = 0

    def should_wait(
        self, req_id: str, namespaces: list[int], hashes: list[bytes], pool_hits: int
    ) -> bool:
        """True: vLLM should ask again later (staging is in flight).

        ``pool_hits``: the leading blocks of ``hashes`` every namespace has
        in the pool now. The first call stages the blocks after them that
        the SSD holds for every namespace; later calls wait until the pool
        covers them, the owner settled the requests, or the timeout.
        """
        if not self.enabled:
            return False
        p = self._pending.get(req_id)
        if p is None:
            rest = hashes[pool_hits:]
            if not rest:
                return False
            extra = min(self.engine.ssd_hits(ns, rest) for ns in namespaces)
            if extra <= 0:
                return False
            tickets = [self.engine.stage(ns, rest[:extra]) for ns in namespaces]
            if not any(t.queued for t in tickets):
                return False
            self._pending[req_id] = _Pending(
                target=pool_hits + extra,
                tickets=tickets,
                deadline=time.monotonic() + self.timeout,
            )
            self.requests_staged += 1
            self.blocks_requested += extra
            return True
        if (
            pool_hits >= p.target
            or all(self.engine.stage_settled(t) for t in p.tickets)
            or time.monotonic() >= p.deadline
        ):
            del self._pending[req_id]
            return False
        return True

    def forget(self, req_id: str) -> None:
        """The request is finished (or aborted): stop tracking it."""
        self._pending.pop(req_id, None)
