"""Exception classes of PegaFlow.

```
PegaflowError
 +-- ConfigError        bad argument or configuration (fix the call / the config)
 +-- OwnerUnavailable   the owner is not connected right now (down or restarting)
 +-- OwnerRejected      the owner refused this engine (ABI mismatch, permissions)
 +-- LayoutError        the KV cache layout is invalid or unsupported
 +-- TransferError      a copy failed (CUDA error, slot outside the pool)
```
"""

from pegaflow._native import (
    ConfigError,
    LayoutError,
    OwnerRejected,
    OwnerUnavailable,
    PegaflowError,
    TransferError,
)

__all__ = [
    "PegaflowError",
    "ConfigError",
    "OwnerUnavailable",
    "OwnerRejected",
    "LayoutError",
    "TransferError",
]
