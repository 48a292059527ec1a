"""Block keys: the 32-byte, prefix-chained name of each full block.

A request's block i is saved and looked up as ``(namespace, key[i])``; the
scheduler computes the keys and hands the workers those of the blocks they
save (:class:`pegaflow.connector.metadata.SaveSpec`).

Currently the keys are vLLM's own ``request.block_hashes``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # pragma: no cover
    from vllm.v1.request import Request


def request_keys(request: "Request", n: Optional[int] = None) -> list[bytes]:
    """The keys of the request's first ``n`` full blocks (all when None)."""
    hs = list(getattr(request, "block_hashes", None) or [])
    if n is not None:
        hs = hs[:n]
    return [bytes(h) for h in hs]
