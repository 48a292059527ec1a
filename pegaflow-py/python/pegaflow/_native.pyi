"""Type stubs of the PyO3 extension ``pegaflow._native``."""

from os import PathLike
from typing import Any, Optional, Sequence

__version__: str

class PegaflowError(Exception): ...
class ConfigError(PegaflowError): ...
class OwnerUnavailable(PegaflowError): ...
class OwnerRejected(PegaflowError): ...
class LayoutError(PegaflowError): ...
class TransferError(PegaflowError): ...

class Engine:
    """Connection to a ``pegaflow-owner``. Constructing it never fails because
    the owner is down (it connects in the background); it raises
    OwnerRejected when the owner refuses this engine."""

    def __init__(
        self,
        name: Optional[str] = None,
        socket: Optional[str | PathLike[str]] = None,
        namespace: int = 0,
        slot_bytes: int = 0,
        label: str = "",
        reconnect_interval: float = 0.2,
    ) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def socket(self) -> str: ...
    @property
    def namespace(self) -> int: ...
    @property
    def slot_bytes(self) -> int: ...
    def is_connected(self) -> bool: ...
    def wait_connected(self, timeout: float) -> bool:
        """Waits (GIL released) up to ``timeout`` seconds for a session."""
    def count_hits(self, namespace: int, hashes: Sequence[bytes]) -> int:
        """Leading hits of the hash chain, without pinning (0 while disconnected)."""
    def lookup(self, namespace: int, hashes: Sequence[bytes]) -> list[tuple[int, int]]:
        """Leading hits, pinned, as ``(slot, generation)``; release them later."""
    def release(self, blocks: Sequence[tuple[int, int]]) -> None: ...
    def read_slot(self, slot: int, length: int) -> Optional[bytes]: ...
    def stats(self) -> dict[str, Any]: ...

class KvCache:
    """An engine's KV cache (described by plain numbers) bound to the pool.

    ``kind``: ``split_kv`` (a K and a V piece per block per layer), ``mla``
    (one piece per block per layer) or ``cross_layer`` (one piece per block).
    CPU tensors need ``backend="host"`` and ``device=None``; CUDA tensors a
    ``device`` ordinal and ``auto``/``dma``/``kernel``.
    """

    def __init__(
        self,
        *,
        kind: str,
        order: str,
        segment_bases: Sequence[int],
        num_layers: int,
        num_blocks: int,
        block_tokens: int,
        block_stride: int,
        kv_stride: int,
        piece_bytes: int,
        dtype_size: int,
        model: str,
        dtype: str,
        tp_size: int = 1,
        tp_rank: Optional[int] = None,
        namespace: Optional[int] = None,
        name: Optional[str] = None,
        socket: Optional[str | PathLike[str]] = None,
        label: str = "",
        backend: str = "auto",
        device: Optional[int] = None,
        keepalive: Any = None,
    ) -> None: ...
    @property
    def engine(self) -> Engine: ...
    @property
    def namespace(self) -> int: ...
    @property
    def slot_bytes(self) -> int: ...
    @property
    def num_segments(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def backend(self) -> str: ...
    def begin_save(self, gpu_blocks: Sequence[int], hashes: Sequence[bytes]) -> tuple[int, int]:
        """Reserve slots; returns ``(handle, n)``: the first n blocks will be saved."""
    def save_layers(self, handle: int, start: int = 0, end: Optional[int] = None, stream: int = 0) -> None: ...
    def end_save(self, handle: int) -> None: ...
    def poll_saves(self, wait: bool = False) -> list[tuple[int, int]]:
        """Commit ended saves whose copies completed: ``[(handle, committed)]``."""
    def abort_save(self, handle: int) -> None: ...
    def pending_saves(self) -> int: ...
    def save(self, gpu_blocks: Sequence[int], hashes: Sequence[bytes], stream: int = 0) -> int:
        """One-shot save of all layers; returns blocks committed."""
    def load(
        self,
        slots: Sequence[int],
        gpu_blocks: Sequence[int],
        start: int = 0,
        end: Optional[int] = None,
        stream: int = 0,
    ) -> None:
        """Copy pinned slots into blocks (raises OwnerUnavailable when the owner is away)."""
    def wait_layer(self, layer: int) -> None: ...
    def layer_ready(self, layer: int) -> bool: ...

def namespace_fingerprint(
    *,
    model: str,
    dtype: str,
    kind: str,
    order: str,
    num_layers: int,
    num_segments: int,
    piece_bytes: int,
    block_tokens: int,
    dtype_size: int,
    tp_size: int,
    tp_rank: Optional[int],
) -> int: ...
def cuda_driver_present() -> bool: ...
def chain_keys(
    parent: Optional[bytes],
    token_ids: Sequence[int],
    block_size: int,
    extra: Optional[Sequence[Optional[bytes]]] = None,
) -> list[bytes]:
    """32-byte keys of the full blocks of ``token_ids``, prefix-chained from
    ``parent`` (the key of the block before, None at the start). ``extra``:
    None, or one entry (bytes or None) per full block. Byte format:
    ``pegaflow_core::keys`` (raises ValueError on bad arguments)."""
