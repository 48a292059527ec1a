"""Block keys: the 32-byte, prefix-chained name of each full block.

A request's block ``i`` is saved and looked up as ``(namespace, key[i])``.
The scheduler computes the keys (:class:`KeyChain`, one per request, grown
as the request's tokens are computed) and hands the workers those of the
blocks they save (:class:`pegaflow.connector.metadata.SaveSpec`).

vLLM's own ``request.block_hashes`` cannot be the keys: vLLM 0.25 seeds them
with a random value per process unless ``PYTHONHASHSEED`` is set, and later
versions still do for ``--prefix-caching-hash-algo xxhash``, so another
process (a restarted vLLM, a second instance) would never find what this one
saved. The keys here depend only on the content:

    key[i] = blake3(tag, key[i-1], token ids of block i, extra[i])

computed in Rust (``pegaflow._native.chain_keys``; byte format and version
tag in ``pegaflow-core/src/keys.rs``). ``extra[i]`` is everything vLLM mixes
into its own hash of block ``i`` besides the tokens, taken from vLLM's own
``generate_block_hash_extra_keys`` so the two never disagree on what makes
blocks different: the cache salt (first block), the LoRA adapter (0.25: its
name; 0.32: name and path), multimodal items overlapping the block (their
content hash and offset) and prompt-embedding digests. Those values are
serialized by :func:`encode_extra`, a fixed, tagged encoding of None, bool,
int, str, bytes and tuples/lists, never with Python's ``hash()``.

The namespace (model, layout, vLLM version, TP rank, ...) is not part of
the key: it is the other half of the pool's ``(namespace, key)``.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Callable, Optional

from pegaflow import _native
from pegaflow._log import get_logger

if TYPE_CHECKING:  # pragma: no cover
    from vllm.v1.request import Request

logger = get_logger("pegaflow.connector")

_warned: set[str] = set()


class UnkeyableRequest(Exception):
    """The request's extra hash inputs cannot be serialized deterministically."""


def encode_extra(value: Any) -> bytes:
    """A deterministic encoding of vLLM's extra block-hash keys.

    One tag byte per value: ``N`` None, ``T``/``F`` bool, ``i`` int (8 bytes,
    signed little-endian), ``s`` str (u32 length + UTF-8), ``b`` bytes (u32
    length + bytes), ``l`` tuple or list (u32 count + items). Anything else
    raises :class:`UnkeyableRequest`.
    """
    out = bytearray()
    _encode(value, out)
    return bytes(out)


def _encode(v: Any, out: bytearray) -> None:
    if v is None:
        out += b"N"
    elif v is True:
        out += b"T"
    elif v is False:
        out += b"F"
    elif isinstance(v, int):
        try:
            out += b"i" + struct.pack("<q", v)
        except struct.error:
            raise UnkeyableRequest(f"integer {v} does not fit in 64 bits") from None
    elif isinstance(v, str):
        b = v.encode("utf-8", "surrogatepass")
        out += b"s" + struct.pack("<I", len(b)) + b
    elif isinstance(v, (bytes, bytearray, memoryview)):
        b = bytes(v)
        out += b"b" + struct.pack("<I", len(b)) + b
    elif isinstance(v, (tuple, list)):
        out += b"l" + struct.pack("<I", len(v))
        for x in v:
            _encode(x, out)
    else:
        raise UnkeyableRequest(f"cannot encode a {type(v).__name__} deterministically")


def needs_extra_keys(request: "Request") -> bool:
    """Whether the request's keys carry more than its tokens (what makes
    vLLM's generate_block_hash_extra_keys return anything)."""
    return bool(
        getattr(request, "mm_features", None)
        or getattr(request, "lora_request", None) is not None
        or getattr(request, "cache_salt", None)
        or getattr(request, "prompt_embeds", None) is not None
    )


def _vllm_extra_keys() -> Optional[Callable[..., Any]]:
    try:
        from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys
    except ImportError:  # pragma: no cover - a vLLM without it
        return None
    return generate_block_hash_extra_keys


def _warn_once(what: str, msg: str, *args: Any) -> None:
    if what not in _warned:
        _warned.add(what)
        logger.warning(msg, *args)


class KeyChain:
    """The keys of one request's full blocks, computed once each.

    Tokens of a request are only ever appended, so a key, once computed,
    stays valid; :meth:`upto` hashes only the blocks not keyed yet. A
    request whose extra inputs cannot be keyed gets no keys (it is neither
    looked up nor saved) rather than wrong ones.
    """

    __slots__ = ("request", "block_size", "keys", "_mm_idx", "_extra", "_dead")

    def __init__(self, request: "Request", block_size: int):
        self.request = request
        self.block_size = block_size
        self.keys: list[bytes] = []
        #: vLLM's cursor into request.mm_features, carried from block to block
        self._mm_idx = 0
        self._extra = _vllm_extra_keys() if needs_extra_keys(request) else None
        self._dead = False
        if self._extra is None and needs_extra_keys(request):
            self._dead = True
            _warn_once(
                "no-extra-keys",
                "this vLLM has no generate_block_hash_extra_keys; requests with a cache "
                "salt, LoRA, multimodal inputs or prompt embeddings are not cached by PegaFlow",
            )

    def upto(self, n: int) -> list[bytes]:
        """The keys of the first ``n`` full blocks (fewer when the request
        has fewer full blocks, none when it cannot be keyed)."""
        if self._dead:
            return []
        bs = self.block_size
        n = min(n, self.request.num_tokens // bs)
        have = len(self.keys)
        if n > have:
            try:
                self._extend(have, n)
            except (UnkeyableRequest, ValueError, TypeError, OverflowError) as e:
                # Tokens or extras we cannot key: keep the keys computed so
                # far (they are right) and key nothing after them.
                self._dead = True
                _warn_once(
                    type(e).__name__,
                    "PegaFlow cannot key request %s past block %d (%s); it is cached only "
                    "up to there",
                    self.request.request_id, have, e,
                )
        return self.keys[:n]

    def _extend(self, start: int, end: int) -> None:
        bs = self.block_size
        tokens = self.request.all_token_ids[start * bs : end * bs]
        extra: Optional[list[Optional[bytes]]] = None
        if self._extra is not None:
            extra = []
            for i in range(start, end):
                ek, self._mm_idx = self._extra(self.request, i * bs, (i + 1) * bs, self._mm_idx)
                extra.append(None if ek is None else encode_extra(ek))
        parent = self.keys[-1] if self.keys else None
        if not isinstance(tokens, list):
            tokens = list(tokens)
        self.keys.extend(_native.chain_keys(parent, tokens, bs, extra))


def request_keys(request: "Request", block_size: int, n: Optional[int] = None) -> list[bytes]:
    """The keys of a request's first ``n`` full blocks (all when None)."""
    chain = KeyChain(request, block_size)
    return chain.upto(request.num_tokens // block_size if n is None else n)
