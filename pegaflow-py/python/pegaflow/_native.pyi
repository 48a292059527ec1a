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
        """Leading hits of the hash chain, without pinning (0 while disconnected).
        Counted as a lookup in the owner's metrics (blocks asked, hits, misses)."""
    def ssd_hits(self, namespace: int, hashes: Sequence[bytes]) -> int:
        """Leading blocks the owner's SSD tier holds (pass the hashes after the pool hits)."""
    def stage(self, namespace: int, hashes: Sequence[bytes]) -> StageTicket:
        """Asks the owner to stage these blocks from SSD into the pool; never waits."""
    def stage_settled(self, ticket: StageTicket) -> bool:
        """Whether the owner finished every stage request up to ``ticket``."""
    def lookup(self, namespace: int, hashes: Sequence[bytes]) -> Pins:
        """Leading hits, pinned; they hold until released through the result.
        Counted as a lookup, unless it pins a prefix of the hits the last
        ``count_hits`` of this namespace found (the same query, counted there)."""
    def release(self, pins: Pins) -> None:
        """Releases every pin ``pins`` still holds (same as ``pins.release()``)."""
    def read_slot(self, slot: int, length: int) -> Optional[bytes]: ...
    def stats(self) -> dict[str, Any]: ...
    def publish_ipc(self, key: str, handle: bytes) -> None:
        """Hands ``handle`` to the owner under ``key`` for other engines of the
        node (published again after a reconnect; raises OwnerUnavailable while
        the owner is away, and publishes when it is back)."""
    def fetch_ipc(self, key: str, timeout: float = 2.0) -> Optional[bytes]:
        """What another engine published under ``key`` (None: nothing)."""

class Pins:
    """The blocks one ``Engine.lookup`` pinned, in the segment it pinned them
    in. Pins are released through this object (any sub-range, idempotently)
    or when it is garbage-collected; never by bare slot ids."""

    @property
    def segment_id(self) -> int: ...
    def __len__(self) -> int: ...
    def blocks(self, start: int = 0, end: Optional[int] = None) -> list[tuple[int, int]]:
        """``(slot, generation)`` of blocks ``start..end``, for ``KvCache.load``."""
    def release(self, start: int = 0, end: Optional[int] = None) -> None: ...
    def held(self) -> int:
        """Pins still held."""

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
        reserve_wait: float = 0.002,
    ) -> None:
        """``reserve_wait``: the longest a save waits (GIL released) for the
        owner to refill a short stash before the rest of the save is dropped."""
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
    @property
    def load_calibration(self) -> dict[str, Any] | None:
        """What the ``auto`` backend measured at the first save (GPU caches
        with batched DMA and 32-256 KiB pieces; else None): ``piece_bytes``,
        ``bytes``, ``dma_gbps``, ``kernel_gbps`` and ``chosen`` (``dma`` or
        ``kernel``), the backend loads of such pieces use since."""
    def begin_save(self, gpu_blocks: Sequence[int], hashes: Sequence[bytes]) -> tuple[int, int]:
        """Reserve slots; returns ``(handle, n)``: the first n blocks will be saved.
        Never waits longer than the engine's reserve_wait (GIL released)."""
    def prepare_saves(self, blocks: int) -> None:
        """Announce this step's saves when it starts: the owner fills the stash meanwhile. Never waits."""
    def begin_saves(
        self, saves: Sequence[tuple[Sequence[int], Sequence[bytes]]]
    ) -> list[tuple[int, int]]:
        """``begin_save`` for one step's saves at once: one reservation, one bounded wait."""
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
        segment_id: int,
        blocks: Sequence[tuple[int, int]],
        gpu_blocks: Sequence[int],
        start: int = 0,
        end: Optional[int] = None,
        stream: int = 0,
    ) -> int:
        """Copy blocks pinned in ``segment_id`` (``(slot, generation)``, from
        ``Pins.blocks()``) into ``gpu_blocks``; returns a handle for
        ``poll_loads``. Raises OwnerUnavailable, copying nothing, when a block
        is not loadable now (owner away or restarted on a new segment, block
        changed, pool registration still running)."""
    def poll_loads(self, wait: bool = False) -> list[tuple[int, list[int]]]:
        """Loads whose copies completed: ``[(handle, failed_gpu_blocks)]``;
        a failed block changed under the copy and must be recomputed."""
    def pending_loads(self) -> int: ...
    def wait_layer(self, layer: int) -> None: ...
    def stream_wait_layer(self, layer: int, stream: int = 0) -> None:
        """Make ``stream`` wait on the GPU (host not blocked) for ``layer``'s loads."""
    def fence_saves(self, stream: int = 0) -> None:
        """Make ``stream`` wait on the GPU for every save queued so far (call
        before a step's compute: saves run on their own stream)."""
    def layer_ready(self, layer: int) -> bool: ...
    def export_peer(self) -> bytes:
        """This GPU cache exported for peer copies (publish it with
        ``Engine.publish_ipc``); TransferError for host caches and memory
        CUDA cannot export (expandable segments)."""
    def pull_peer(
        self, key: str, export: bytes, pairs: Sequence[tuple[int, int]], stream: int = 0
    ) -> None:
        """Queue copies of ``pairs = [(local_block, peer_block)]`` (every layer)
        from the peer cache ``export`` (mapped once, cached under ``key``) on
        ``stream``; record an event there to know when they are done."""
    def peers_mapped(self) -> int: ...

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

class HoldTable:
    """The P/D hold table (docs/pd.md): a prefill lends GPU blocks through
    it, a decode takes, copies and gives them back. States per rank: free,
    held, taken, done, expired."""

    @staticmethod
    def create(
        name: str,
        *,
        capacity: int,  # holds wanted; as many as fit 256 MiB (see .capacity)
        max_blocks: int,
        namespaces: Sequence[int],
        peer_keys: Sequence[str],
        dir: Optional[str] = None,
    ) -> HoldTable: ...
    @staticmethod
    def open(name: str, *, dir: Optional[str] = None) -> HoldTable: ...
    @property
    def name(self) -> str: ...
    @property
    def nonce(self) -> int: ...
    @property
    def ranks(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def max_blocks(self) -> int: ...
    @property
    def namespaces(self) -> list[int]: ...
    @property
    def peer_keys(self) -> list[str]: ...
    @property
    def creator_pid(self) -> int: ...
    def creator_alive(self) -> bool: ...
    def word(self, slot: int, rank: int) -> tuple[str, int, int]: ...
    def hold(self, slot: int, ticket: int, key: bytes, blocks: Sequence[int]) -> None: ...
    def over(self, slot: int, ticket: int) -> bool: ...
    def expire(self, slot: int, ticket: int) -> bool: ...
    def free(self, slot: int, ticket: int) -> None: ...
    def peek(self, slot: int, ticket: int) -> Optional[tuple[int, bytes]]: ...
    def take(self, slot: int, ticket: int, rank: int) -> Optional[tuple[bytes, list[int]]]: ...
    def done(self, slot: int, ticket: int, rank: int) -> bool: ...
    def unlink(self) -> None: ...

class StageTicket:
    """What one ``Engine.stage`` queued."""

    @property
    def queued(self) -> int: ...
