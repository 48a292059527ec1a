"""What the scheduler and the workers tell each other.

vLLM pickles one :class:`PegaConnectorMetadata` per step from the scheduler
process to every worker (``build_connector_meta`` -> ``bind_connector_metadata``),
so it holds plain lists and bytes only: no tensors, no handles.

Invariants:

* ``LoadSpec.slots[rank][i]`` is pinned by the scheduler until the workers
  report the load finished (``finished_recving``); workers only read them.
  MLA caches have one list, shared by all ranks.
* ``SaveSpec.hashes[i]`` is the block key of ``SaveSpec.block_ids[i]``; every
  rank saves the same keys under its own namespace.

Once at start-up, each worker sends the scheduler a :class:`PegaHandshake`
(vLLM's ``get_handshake_metadata`` -> ``set_xfer_handshake_metadata``, keyed
by vLLM's own TP rank of that worker): the namespace the worker saves
under. The scheduler looks blocks up under exactly those namespaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
)


@dataclass
class LoadSpec:
    """Copy pinned pool slots into a request's GPU blocks."""

    req_id: str
    block_ids: list[int]
    #: slots[rank][i] is the pinned slot holding block_ids[i] for that rank
    #: (one list for MLA, shared by all ranks).
    slots: list[list[int]]


@dataclass
class SaveSpec:
    """Save a request's newly computed full blocks under their keys."""

    req_id: str
    block_ids: list[int]
    hashes: list[bytes]


@dataclass
class PegaConnectorMetadata(KVConnectorMetadata):
    """One step's loads and saves."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass(frozen=True)
class PegaHandshake(KVConnectorHandshakeMetadata):
    """A worker's identity, sent to the scheduler once at start-up."""

    #: the TP rank the worker believes it has (vLLM keys the message by its own)
    tp_rank: int
    #: the namespace the worker saves under
    namespace: int
    #: the KV layout tag that went into the namespace (for error messages)
    layout: str
