"""PegaFlow: a node-local KV-cache store for LLM inference engines.

``pegaflow-owner`` runs once per node and owns a shared-memory pool; engines
link this package to look up, pin, save and load KV blocks through shared
memory. The vLLM integration is :class:`pegaflow.connector.PegaKVConnector`.

Public API::

    Engine                 connection to the owner (lookup / pin / release / stats)
    KvCache                an engine's KV cache bound to the pool (save / load)
    kv_cache_from_tensors  build a KvCache from torch tensors (CPU or CUDA)
    namespace_fingerprint  the 64-bit namespace of a KV format
    chain_keys             content-derived, prefix-chained 32-byte block keys
    exceptions             PegaflowError and its subclasses
"""

from pegaflow._native import (
    Engine,
    KvCache,
    __version__,
    chain_keys,
    cuda_driver_present,
    namespace_fingerprint,
)
from pegaflow.exceptions import (
    ConfigError,
    LayoutError,
    OwnerRejected,
    OwnerUnavailable,
    PegaflowError,
    TransferError,
)
from pegaflow.tensors import TensorLayout, describe_kv_tensors, kv_cache_from_tensors

__all__ = [
    "Engine",
    "KvCache",
    "TensorLayout",
    "describe_kv_tensors",
    "kv_cache_from_tensors",
    "namespace_fingerprint",
    "chain_keys",
    "cuda_driver_present",
    "__version__",
    "PegaflowError",
    "ConfigError",
    "OwnerUnavailable",
    "OwnerRejected",
    "LayoutError",
    "TransferError",
]
