"""What the scheduler and the workers tell each other.

vLLM pickles one :class:`PegaConnectorMetadata` per step from the scheduler
process to every worker (``build_connector_meta`` -> ``bind_connector_metadata``),
so it holds plain lists and bytes only: no tensors, no handles.

Invariants:

* ``LoadSpec.blocks[rank][i]`` is a ``(slot, generation)`` the scheduler
  pinned in segment ``LoadSpec.segment_id``, and keeps pinned until the
  load is over (a layer-wise load: the step's output came back; an async
  one: the workers reported it in ``finished_recving``). Workers copy a
  block only if they are connected to that segment and the slot still holds
  that generation, and check again after the copy. MLA caches have one
  list, shared by all ranks.
* ``SaveSpec.hashes[i]`` is the block key of ``SaveSpec.block_ids[i]``; every
  rank saves the same keys under its own namespace.
* ``group``: vLLM's KV cache group the blocks belong to (hybrid models,
  see :mod:`.groups`; 0 for everything else). Block ids and pins are that
  group's; only the worker side of that group copies them.

Once at start-up, each worker sends the scheduler a :class:`PegaHandshake`
(vLLM's ``get_handshake_metadata`` -> ``set_xfer_handshake_metadata``, keyed
by vLLM's own TP rank of that worker): the namespace the worker saves
under. The scheduler looks blocks up under exactly those namespaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
)

from pegaflow.connector.direct import DirectSpec


@dataclass
class LoadSpec:
    """Copy pinned pool slots into a request's GPU blocks."""

    req_id: str
    block_ids: list[int]
    #: the owner's segment the blocks were pinned in
    segment_id: int
    #: blocks[rank][i] is the (slot, generation) holding block_ids[i] for
    #: that rank (one list for MLA, shared by all ranks).
    blocks: list[list[tuple[int, int]]]
    #: loaded in this step, each attention layer waiting for its own layer
    #: (else asynchronously: reported in finished_recving when done)
    layerwise: bool = True
    #: vLLM's KV cache group of block_ids (hybrid models)
    group: int = 0
    #: copied from a prefill's GPU blocks instead of the pool (see
    #: :mod:`.direct`; ``segment_id`` and ``blocks`` are unused then)
    direct: Optional[DirectSpec] = None


@dataclass
class SaveSpec:
    """Save a request's newly computed full blocks under their keys."""

    req_id: str
    block_ids: list[int]
    hashes: list[bytes]
    #: vLLM's KV cache group of block_ids (hybrid models)
    group: int = 0


@dataclass
class PegaConnectorMetadata(KVConnectorMetadata):
    """One step's loads and saves."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    #: the scheduler's number of this step; workers echo it back
    step: int = 0
    #: most tokens any request computes in this step (1: a batch vLLM may
    #: run as a uniform-decode CUDA graph, whose replay skips the per-layer
    #: load waits; see WorkerSide.start_load_kv)
    max_query_len: int = 0
    #: P/D prefill: requests whose GPU blocks were lent this step (workers
    #: hold their finished_sending), and those whose holds are over
    pd_holds: list[str] = field(default_factory=list)
    pd_released: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PegaHandshake(KVConnectorHandshakeMetadata):
    """A worker's identity, sent to the scheduler once at start-up."""

    #: the TP rank the worker believes it has (vLLM keys the message by its own)
    tp_rank: int
    #: the namespace the worker saves under
    namespace: int
    #: the KV layout tag that went into the namespace (for error messages)
    layout: str
    #: hybrid models: the namespace of each KV cache group (``namespace``
    #: is the first's); empty for a model with one group
    group_namespaces: tuple[int, ...] = ()
    #: the owner-brokered key of this worker's exported KV cache (P/D
    #: direct hand-over); empty when it lends nothing
    peer_key: str = ""
