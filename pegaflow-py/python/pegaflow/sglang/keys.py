"""Block keys of SGLang pages: SGLang's own page hashes.

SGLang names each page it stores by a hash chain over the page's tokens
(``sglang.srt.mem_cache.utils.get_hash_str``, C++ since 0.5.2x, Python
before, same bytes)::

    hash[i] = sha256(hash[i-1] || token ids of page i as u32 little-endian)

seeded, for requests with an ``extra_key`` (LoRA adapter id, caller
classification) or a ``cache_salt``, by a sha256 of those
(``storage_namespace_seed``). Nothing in it is per-process: no Python
``hash()``, no random seed. So unlike vLLM's block hashes (which the vLLM
connector must replace by content keys), SGLang's hashes already mean the
same in every process and restart, and are used as PegaFlow keys as they
are: the 64 hex digits are the 32-byte key.

A key that is not 64 hex digits (a future SGLang key scheme with suffixes)
is hashed, with a tag, into 32 bytes: still deterministic, never equal to a
plain page hash.

One caveat, SGLang's own: a LoRA adapter loaded at run time gets a random
``lora_id`` (adapters from ``--lora-paths`` get a deterministic one), so its
pages are shared only within that server's lifetime. That is a miss in
another process, never a wrong hit.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

_TAG = b"pegaflow-sglang-key/v1\0"


def pool_key(key: str) -> bytes:
    """The 32-byte PegaFlow key of an SGLang storage key."""
    if len(key) == 64:
        try:
            return bytes.fromhex(key)
        except ValueError:
            pass
    return hashlib.sha256(_TAG + key.encode("utf-8", "surrogatepass")).digest()


def pool_keys(keys: Sequence[str]) -> list[bytes]:
    return [pool_key(k) for k in keys]
