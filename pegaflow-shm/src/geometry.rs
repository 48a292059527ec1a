//! Pool geometry and the byte layout of the control segment derived from it.
//!
//! Everything here is pure arithmetic: the owner computes a [`Geometry`] from
//! its flags, stores it in the segment header, and every reader (engines,
//! `pegaflow-inspect`, a re-adopting owner) recomputes the same [`Layout`]
//! from it. Offsets, never pointers, cross the process boundary.
//!
//! ## Slots and slabs
//!
//! The pool is cut into `num_slabs` slabs of `slab_bytes` each. A slab is
//! given to one *slot class* (one block size, i.e. one KV layout) when first
//! needed and is then cut into `slab_bytes / stride` slots. Slot ids are
//! global and stable: slab `s` owns ids `s * slots_per_slab ..
//! (s + 1) * slots_per_slab`, of which only the first `slab.nslots` exist.
//! `slots_per_slab = slab_bytes / granule_bytes`, so the slot table has room
//! for the smallest slot size the owner accepts.

use crate::error::GeometryError;

/// Alignment of every region of the control segment, and of slot strides.
pub const REGION_ALIGN: u64 = 4096;
/// Slabs are multiples of a 2 MiB huge page.
pub const SLAB_ALIGN: u64 = 2 << 20;
/// Size of one request-ring entry.
pub const REQUEST_BYTES: u64 = 64;
/// Most buckets of the SSD membership set.
pub const MAX_SSD_BUCKETS: u64 = 1 << 25;

/// What the owner chose at creation; stored verbatim in the header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Geometry {
    /// Bytes of KV data in the pool segment; a multiple of `slab_bytes`.
    pub pool_bytes: u64,
    /// Bytes per slab; a multiple of 2 MiB.
    pub slab_bytes: u64,
    /// The smallest slot stride; smaller blocks are rounded up to it.
    pub granule_bytes: u64,
    /// Client table entries.
    pub max_clients: u64,
    /// Entries of each engine->owner request ring (power of two).
    pub request_ring_cap: u64,
    /// Entries of each owner->engine free-slot stash ring (power of two).
    pub stash_ring_cap: u64,
    /// Buckets of the lookup index (power of two).
    pub index_buckets: u64,
}

const _: () = assert!(std::mem::size_of::<Geometry>() == 56);

impl Geometry {
    /// A geometry for `pool_bytes`, with every derived size chosen the way the
    /// owner does by default.
    pub fn for_pool(
        pool_bytes: u64,
        slab_bytes: u64,
        granule_bytes: u64,
        max_clients: u64,
    ) -> Result<Geometry, GeometryError> {
        let mut g = Geometry {
            pool_bytes,
            slab_bytes,
            granule_bytes,
            max_clients,
            request_ring_cap: 4096,
            stash_ring_cap: 8192,
            index_buckets: 0,
        };
        // Two buckets per possible slot keeps linear probing short even
        // when every slot is committed.
        g.index_buckets = (g.num_slots().max(1) * 2).next_power_of_two();
        g.validate()?;
        Ok(g)
    }

    pub fn num_slabs(&self) -> u64 {
        self.pool_bytes / self.slab_bytes.max(1)
    }

    pub fn slots_per_slab(&self) -> u64 {
        self.slab_bytes / self.granule_bytes.max(1)
    }

    /// Slot-table entries: the most slots the pool can ever hold.
    pub fn num_slots(&self) -> u64 {
        self.num_slabs() * self.slots_per_slab()
    }

    /// Buckets of the SSD membership set (`ssd_set`): eight per slot id
    /// (so it holds about four times as many blocks as the pool has slot
    /// ids at half load), a power of two, at most 2^25 (256 MiB).
    pub fn ssd_buckets(&self) -> u64 {
        (self.num_slots().max(1) * 8)
            .next_power_of_two()
            .min(MAX_SSD_BUCKETS)
    }

    /// Checks every invariant the layout arithmetic relies on. Called on
    /// creation and on every header read from another process.
    pub fn validate(&self) -> Result<(), GeometryError> {
        let bad = |what: &'static str| {
            Err(GeometryError::Invalid {
                what,
                geometry: Box::new(*self),
            })
        };
        if self.slab_bytes == 0 || !self.slab_bytes.is_multiple_of(SLAB_ALIGN) {
            return bad("slab size must be a non-zero multiple of 2 MiB");
        }
        if self.pool_bytes < self.slab_bytes || !self.pool_bytes.is_multiple_of(self.slab_bytes) {
            return bad("pool size must be a non-zero multiple of the slab size");
        }
        if self.granule_bytes < REGION_ALIGN
            || !self.granule_bytes.is_multiple_of(REGION_ALIGN)
            || self.granule_bytes > self.slab_bytes
        {
            return bad("minimum slot size must be a multiple of 4 KiB, at most one slab");
        }
        if self.num_slots() >= u64::from(u32::MAX) {
            return bad("too many slots for 32-bit slot ids: raise the minimum slot size");
        }
        if self.max_clients == 0 || self.max_clients > u64::from(crate::slot_table::MAX_CLIENTS) {
            return bad("max clients must be between 1 and 4096");
        }
        for (cap, what) in [
            (
                self.request_ring_cap,
                "request ring capacity must be a power of two >= 2",
            ),
            (
                self.stash_ring_cap,
                "stash ring capacity must be a power of two >= 2",
            ),
            (
                self.index_buckets,
                "index buckets must be a power of two >= 2",
            ),
        ] {
            if cap < 2 || !cap.is_power_of_two() || cap > 1 << 32 {
                return bad(what);
            }
        }
        if self.index_buckets < self.num_slots() {
            return bad("index must have at least one bucket per slot");
        }
        Ok(())
    }

    /// Byte offsets of every region in the control segment.
    pub fn layout(&self) -> Layout {
        let align = |x: u64| x.div_ceil(REGION_ALIGN) * REGION_ALIGN;
        let header = 0;
        let slabs = align(std::mem::size_of::<crate::header::Header>() as u64);
        let slots = align(slabs + self.num_slabs() * crate::slot_table::SLAB_ENTRY_BYTES);
        let index = align(slots + self.num_slots() * crate::slot_table::SLOT_ENTRY_BYTES);
        let clients = align(index + self.index_buckets * crate::index::BUCKET_BYTES);
        let client = ClientLayout::new(self);
        let ssd = align(clients + self.max_clients * client.bytes);
        let total = ssd + self.ssd_buckets() * 8;
        Layout {
            header,
            slabs,
            slots,
            index,
            clients,
            client,
            ssd,
            total,
        }
    }
}

/// Offsets of the regions of the control segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub header: u64,
    pub slabs: u64,
    pub slots: u64,
    pub index: u64,
    pub clients: u64,
    pub client: ClientLayout,
    /// The SSD membership set: `ssd_buckets()` × u64.
    pub ssd: u64,
    pub total: u64,
}

/// Offsets inside one client area, relative to its start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientLayout {
    pub request_ring: u64,
    pub stash_ring: u64,
    pub pins: u64,
    pub bytes: u64,
}

impl ClientLayout {
    fn new(g: &Geometry) -> ClientLayout {
        let align = |x: u64| x.div_ceil(REGION_ALIGN) * REGION_ALIGN;
        let entry = std::mem::size_of::<crate::client::ClientEntry>() as u64;
        let ring_hdr = std::mem::size_of::<crate::ring::RingHeader>() as u64;
        let request_ring = align(entry);
        let stash_ring = align(request_ring + ring_hdr + g.request_ring_cap * REQUEST_BYTES);
        let pins = align(stash_ring + ring_hdr + g.stash_ring_cap * 8);
        let bytes = align(pins + g.num_slots() * 4);
        ClientLayout {
            request_ring,
            stash_ring,
            pins,
            bytes,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn default_geometry_is_valid_and_regions_do_not_overlap() {
        let g = Geometry::for_pool(64 << 30, 32 << 20, 256 << 10, 64).unwrap();
        let l = g.layout();
        assert!(l.header < l.slabs && l.slabs < l.slots && l.slots < l.index);
        assert!(l.index < l.clients && l.clients < l.ssd && l.ssd < l.total);
        assert_eq!(l.total - l.ssd, g.ssd_buckets() * 8);
        assert_eq!(g.ssd_buckets(), 8 * 2048 * 128);
        assert_eq!(g.num_slots(), 2048 * 128);
        assert!(l.client.request_ring < l.client.stash_ring);
        assert!(l.client.stash_ring < l.client.pins && l.client.pins < l.client.bytes);
    }

    #[test]
    fn rejects_bad_geometry() {
        assert!(Geometry::for_pool(3 << 20, 2 << 20, 4096, 8).is_err());
        assert!(Geometry::for_pool(4 << 20, 3 << 20, 4096, 8).is_err());
        assert!(Geometry::for_pool(4 << 20, 2 << 20, 1000, 8).is_err());
        assert!(Geometry::for_pool(4 << 20, 2 << 20, 4096, 0).is_err());
        let mut g = Geometry::for_pool(4 << 20, 2 << 20, 4096, 8).unwrap();
        g.stash_ring_cap = 3;
        assert!(g.validate().is_err());
    }
}
