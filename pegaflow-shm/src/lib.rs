//! The shared-memory ABI of PegaFlow.
//!
//! Both the owner daemon and every engine compile against this crate. It
//! holds plain `#[repr(C)]` data at fixed offsets (never pointers), the
//! lock-free algorithms that run over it, and the small control-plane
//! protocol spoken on the owner's Unix socket. No threads, no CUDA.
//!
//! Map of the crate (see `docs/abi.md` for the byte layout):
//! - [`geometry`]: pool geometry and the control segment's layout;
//! - [`header`]: magic, ABI version, owner epoch, doorbell;
//! - [`slot_table`]: slab and slot tables, the pin/evict handshake;
//! - [`index`]: the seqlock hash index engines read without locks;
//! - [`ssd_set`]: fingerprints of the blocks the owner's SSD tier holds;
//! - [`client`]: the client table and its counters;
//! - [`ring`], [`request`]: SPSC rings and what engines put in them;
//! - [`doorbell`]: the futex that lets an idle owner sleep;
//! - [`handover`]: the hold table a prefill instance lends GPU blocks
//!   through to a decode instance (P/D, engine to engine);
//! - [`segment`]: creating, re-adopting and mapping the segments;
//! - [`proto`]: the socket hello and CUDA IPC brokering messages.

pub mod client;
pub mod doorbell;
pub mod error;
pub mod geometry;
#[cfg(not(loom))]
pub mod handover;
pub mod header;
pub mod index;
pub mod proto;
pub mod request;
pub mod ring;
#[cfg(not(loom))]
pub mod segment;
pub mod slot_table;
pub mod ssd_set;
pub mod sync;

pub use error::{DecodeError, GeometryError, ProtoError, SegmentError};
pub use geometry::Geometry;
pub use header::ABI_VERSION;
pub use slot_table::{BlockKey, SlotKind, SlotState};

/// The byte offsets docs/abi.md promises. A failure here means the ABI
/// changed: bump `ABI_VERSION` and update the document.
#[cfg(all(test, not(loom)))]
mod abi_layout {
    use std::mem::{offset_of, size_of};

    use crate::client::ClientEntry;
    use crate::header::Header;
    use crate::index::Bucket;
    use crate::ring::RingHeader;
    use crate::slot_table::{SlabEntry, SlotEntry};

    #[test]
    fn offsets_match_docs_abi_md() {
        assert_eq!(
            [
                offset_of!(Header, abi_version),
                offset_of!(Header, geometry),
                offset_of!(Header, segment_id),
                offset_of!(Header, owner_state),
                offset_of!(Header, owner_pid),
                offset_of!(Header, owner_epoch),
                offset_of!(Header, doorbell),
                offset_of!(Header, owner_sleeping),
                offset_of!(Header, owner_tick),
                offset_of!(Header, pool_path),
                offset_of!(Header, hugepages),
                offset_of!(Header, pool_dev),
                offset_of!(Header, pool_ino),
                size_of::<Header>(),
            ],
            [8, 16, 72, 88, 92, 96, 104, 108, 112, 120, 376, 384, 392, 512]
        );
        assert_eq!(
            [
                offset_of!(SlotEntry, namespace),
                offset_of!(SlotEntry, hash),
                offset_of!(SlotEntry, len),
                offset_of!(SlotEntry, last_access),
            ],
            [8, 16, 48, 56]
        );
        assert_eq!(
            [
                offset_of!(SlabEntry, slot_bytes),
                offset_of!(SlabEntry, nslots)
            ],
            [8, 16]
        );
        assert_eq!(
            [
                offset_of!(Bucket, slot_plus_one),
                offset_of!(Bucket, namespace),
                offset_of!(Bucket, hash)
            ],
            [4, 8, 16]
        );
        assert_eq!(
            [
                offset_of!(ClientEntry, pid),
                offset_of!(ClientEntry, start_time),
                offset_of!(ClientEntry, token),
                offset_of!(ClientEntry, namespace),
                offset_of!(ClientEntry, slot_bytes),
                offset_of!(ClientEntry, epoch),
                offset_of!(ClientEntry, stash_target),
                offset_of!(ClientEntry, refill_asked),
                offset_of!(ClientEntry, uid),
                offset_of!(ClientEntry, stash_want),
                offset_of!(ClientEntry, label),
                offset_of!(ClientEntry, engine_counters),
                offset_of!(ClientEntry, owner_counters),
                offset_of!(ClientEntry, refill_done),
                offset_of!(ClientEntry, held_slots),
                size_of::<ClientEntry>(),
            ],
            [4, 8, 16, 24, 32, 40, 48, 52, 56, 60, 64, 128, 256, 320, 328, 384]
        );
        assert_eq!(
            [offset_of!(RingHeader, tail), size_of::<RingHeader>()],
            [128, 256]
        );
        // ABI 3: the SSD membership set follows the client table, 4 KiB
        // aligned, eight u64 buckets per slot id.
        let g = crate::Geometry::for_pool(64 << 20, 2 << 20, 64 << 10, 4).unwrap();
        let l = g.layout();
        let clients_end = l.clients + 4 * l.client.bytes;
        assert_eq!(l.ssd, clients_end.div_ceil(4096) * 4096);
        assert_eq!(g.ssd_buckets(), (g.num_slots() * 8).next_power_of_two());
        assert_eq!(l.total, l.ssd + g.ssd_buckets() * 8);
        assert_eq!(crate::ABI_VERSION, 3);
    }
}
