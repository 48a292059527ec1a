//! The slab table and the slot table, and the pin/evict handshake on them.
//!
//! ## Slot states
//!
//! ```text
//!   Free --(owner stashes it for client c)--> Writing(c)
//!   Writing(c) --(Commit from c)--> Committed(key)      [published in the index]
//!   Writing(c) --(Abort from c, or c died)--> Free
//!   Free --(owner stages a block from SSD)--> Writing(OWNER_WRITER)
//!   Writing(OWNER_WRITER) --(read verified)--> Committed   --(read failed)--> Free
//!   Committed --(owner: begin_evict)--> Evicting --(no pins)--> Free, gen + 1
//!                                        Evicting --(a pin)--> Committed
//! ```
//!
//! Only the owner writes slot entries. Engines write only their own pin
//! counters (one `AtomicU32` per slot per client, in the client area).
//!
//! ## Why pins need no locks (Dekker)
//!
//! An engine pins by `[1]` incrementing its own counter (it is the only
//! writer), a SeqCst fence, then `[2]` reading the slot state. The owner
//! evicts by `[3]` swapping the state from `Committed` to `Evicting` (SeqCst),
//! a SeqCst fence, then `[4]` reading every live client's counter. The two
//! fences are totally ordered: if the engine's comes first, `[4]` sees the
//! pin and the owner backs off; if the owner's comes first, `[2]` sees
//! `Evicting` and the engine unpins. Either way no slot is reused under a
//! pin, and an engine pinning 625 blocks pays one fence, not 625 locked
//! instructions. `tests/loom.rs` checks this.
//!
//! A committed slot's key is written before the `Release` store that makes it
//! `Committed`, and is not rewritten until the slot has gone through
//! `Evicting`, which a pin prevents. So a reader that pinned and then saw the
//! same `Committed` state word before and after reading the key read a
//! stable key.

use crate::sync::{fence, AtomicU32, AtomicU64, Ordering};

/// Client ids are 12 bits wide in the state word's client field.
pub const MAX_CLIENTS: u32 = 4096;
/// The client field of a `Writing` slot the owner itself fills (a block
/// staged back from its SSD tier): no engine has this id, so no engine's
/// commit, abort or reclaim can touch it, and a re-adopting owner frees it.
pub const OWNER_WRITER: u16 = 0xFFFF;
pub const SLOT_ENTRY_BYTES: u64 = 64;
pub const SLAB_ENTRY_BYTES: u64 = 64;

/// A block key: the engine's namespace fingerprint and its block hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey {
    pub namespace: u64,
    pub hash: [u8; 32],
}

impl BlockKey {
    pub fn new(namespace: u64, hash: [u8; 32]) -> Self {
        BlockKey { namespace, hash }
    }

    /// The hash as the four little-endian words stored in shm.
    pub fn words(&self) -> [u64; 4] {
        let mut w = [0u64; 4];
        for (i, chunk) in self.hash.chunks_exact(8).enumerate() {
            w[i] = u64::from_le_bytes(chunk.try_into().expect("chunks_exact(8)"));
        }
        w
    }

    pub fn from_words(namespace: u64, w: [u64; 4]) -> Self {
        let mut hash = [0u8; 32];
        for (i, word) in w.iter().enumerate() {
            hash[i * 8..i * 8 + 8].copy_from_slice(&word.to_le_bytes());
        }
        BlockKey { namespace, hash }
    }
}

/// Slot kinds, in the low byte of the state word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SlotKind {
    Free = 0,
    Writing = 1,
    Committed = 2,
    Evicting = 3,
}

/// The decoded 64-bit state word: `kind | client << 8 | gen << 32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotState {
    pub kind: SlotKind,
    /// The writing client for `Writing`; meaningless otherwise.
    pub client: u16,
    /// Bumped every time the slot becomes free, so a stale reference to an
    /// earlier life of the slot never validates.
    pub gen: u32,
}

impl SlotState {
    pub const FREE: SlotState = SlotState {
        kind: SlotKind::Free,
        client: 0,
        gen: 0,
    };

    pub fn pack(self) -> u64 {
        (self.kind as u64) | (u64::from(self.client) << 8) | (u64::from(self.gen) << 32)
    }

    /// `None` for a word no owner writes (corruption, or a newer ABI).
    pub fn unpack(word: u64) -> Option<SlotState> {
        let kind = match word & 0xff {
            0 => SlotKind::Free,
            1 => SlotKind::Writing,
            2 => SlotKind::Committed,
            3 => SlotKind::Evicting,
            _ => return None,
        };
        if (word >> 24) & 0xff != 0 {
            return None;
        }
        Some(SlotState {
            kind,
            client: ((word >> 8) & 0xffff) as u16,
            gen: (word >> 32) as u32,
        })
    }

    pub fn with_kind(self, kind: SlotKind) -> SlotState {
        SlotState { kind, ..self }
    }
}

/// One slab: which slot size it was cut into. Zero = unassigned.
#[repr(C, align(64))]
#[derive(Default)]
pub struct SlabEntry {
    /// Bytes between consecutive slots of this slab; 0 while unassigned.
    pub stride: AtomicU64,
    /// Bytes of the block size the slab serves (<= stride).
    pub slot_bytes: AtomicU64,
    /// Slots this slab was cut into.
    pub nslots: AtomicU32,
    pub _reserved0: u32,
    pub _reserved: [u64; 5],
}

/// One slot's metadata.
#[repr(C, align(64))]
#[derive(Default)]
pub struct SlotEntry {
    /// Packed [`SlotState`].
    pub state: AtomicU64,
    pub namespace: AtomicU64,
    pub hash: [AtomicU64; 4],
    /// Bytes of valid data in the slot.
    pub len: AtomicU64,
    /// Owner tick of the last commit or access; orders the LRU on re-adoption.
    pub last_access: AtomicU64,
}

#[cfg(not(loom))]
const _: () = {
    assert!(std::mem::size_of::<SlotEntry>() as u64 == SLOT_ENTRY_BYTES);
    assert!(std::mem::size_of::<SlabEntry>() as u64 == SLAB_ENTRY_BYTES);
};

impl SlotEntry {
    pub fn load_state(&self) -> Option<SlotState> {
        SlotState::unpack(self.state.load(Ordering::SeqCst))
    }

    pub fn key(&self) -> BlockKey {
        let w = [
            self.hash[0].load(Ordering::Relaxed),
            self.hash[1].load(Ordering::Relaxed),
            self.hash[2].load(Ordering::Relaxed),
            self.hash[3].load(Ordering::Relaxed),
        ];
        BlockKey::from_words(self.namespace.load(Ordering::Relaxed), w)
    }

    /// Owner only: write the key and length, then publish `Committed`.
    pub fn commit(&self, prev: SlotState, key: &BlockKey, len: u64, tick: u64) {
        self.namespace.store(key.namespace, Ordering::Relaxed);
        for (slot, w) in self.hash.iter().zip(key.words()) {
            slot.store(w, Ordering::Relaxed);
        }
        self.len.store(len, Ordering::Relaxed);
        self.last_access.store(tick, Ordering::Relaxed);
        // SeqCst (not just Release) so it takes part in the pin handshake order.
        self.state
            .store(prev.with_kind(SlotKind::Committed).pack(), Ordering::SeqCst);
    }

    /// Engine side: pin this slot if it holds `key`, returning its
    /// generation: [`announce_pin`], a SeqCst fence, [`SlotEntry::validate`].
    /// Engines pinning many blocks announce them all, fence once, then
    /// validate each (see `Engine::lookup`).
    ///
    /// `my_pin` is the calling client's counter for this slot, which only one
    /// thread at a time may write. On failure the counter is back where it was.
    pub fn try_pin(&self, my_pin: &AtomicU32, key: &BlockKey) -> Option<u32> {
        if !announce_pin(my_pin) {
            return None;
        }
        fence(Ordering::SeqCst);
        let gen = self.validate(key);
        if gen.is_none() {
            withdraw_pin(my_pin);
        }
        gen
    }

    /// Engine side, step [2], after the announcement and a SeqCst fence:
    /// the slot's generation if it is committed under `key`.
    pub fn validate(&self, key: &BlockKey) -> Option<u32> {
        let s1 = self.state.load(Ordering::SeqCst);
        let st = SlotState::unpack(s1)?;
        if st.kind != SlotKind::Committed || !self.holds(key) {
            return None;
        }
        // The key is only stable while the state word is unchanged.
        (self.state.load(Ordering::SeqCst) == s1).then_some(st.gen)
    }

    /// Whether the stored key is `key`, word by word (no byte shuffling: this
    /// runs once per block of every lookup).
    fn holds(&self, key: &BlockKey) -> bool {
        self.namespace.load(Ordering::Relaxed) == key.namespace
            && self
                .hash
                .iter()
                .zip(key.words())
                .all(|(w, k)| w.load(Ordering::Relaxed) == k)
    }

    /// Owner side: `Committed(gen)` -> `Evicting(gen)`. Returns the state it
    /// replaced, or `None` if the slot is not committed.
    pub fn begin_evict(&self) -> Option<SlotState> {
        let cur = self.state.load(Ordering::SeqCst);
        let st = SlotState::unpack(cur)?;
        if st.kind != SlotKind::Committed {
            return None;
        }
        // [3] publish Evicting before looking at any pin counter.
        self.state
            .compare_exchange(
                cur,
                st.with_kind(SlotKind::Evicting).pack(),
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .ok()
            .map(|_| st)
    }

    /// Owner side, after `begin_evict` found a pin: back to `Committed`.
    pub fn abort_evict(&self, st: SlotState) {
        self.state
            .store(st.with_kind(SlotKind::Committed).pack(), Ordering::SeqCst);
    }

    /// Owner side: the slot becomes `Free` with the next generation.
    pub fn free(&self, st: SlotState) {
        let next = SlotState {
            kind: SlotKind::Free,
            client: 0,
            gen: st.gen.wrapping_add(1),
        };
        self.len.store(0, Ordering::Relaxed);
        self.state.store(next.pack(), Ordering::SeqCst);
    }

    /// Owner side: hand a free slot to `client` for writing.
    pub fn start_writing(&self, st: SlotState, client: u16) {
        let next = SlotState {
            kind: SlotKind::Writing,
            client,
            gen: st.gen,
        };
        self.state.store(next.pack(), Ordering::SeqCst);
    }
}

/// Engine side, step [1]: count one more pin of this client on the slot.
///
/// A pin counter has a single writer, its client, and the engine
/// serialises its own threads, so a plain load and store suffice; the
/// SeqCst fence the caller issues before validating orders it against the
/// owner's eviction. `false` if the counter is saturated (a caller bug).
pub fn announce_pin(my_pin: &AtomicU32) -> bool {
    let v = my_pin.load(Ordering::Relaxed);
    if v == u32::MAX {
        return false;
    }
    my_pin.store(v + 1, Ordering::Relaxed);
    true
}

/// Engine side: drop one pin (release, or a failed validation). A counter
/// already at zero (a double release) stays at zero.
pub fn withdraw_pin(my_pin: &AtomicU32) {
    let v = my_pin.load(Ordering::Relaxed);
    if v > 0 {
        my_pin.store(v - 1, Ordering::Release);
    }
}

/// [4] of the handshake: does any of these pin counters hold the slot?
/// The fence pairs with the one engines issue between announcing and
/// validating: either this sees their pin, or they see `Evicting`.
///
/// A clean scan ends with an Acquire fence, pairing with the Release store
/// of [`withdraw_pin`]: an engine's last reads of the slot's pool bytes
/// happen before the owner reuses the slot (found by the loom models).
pub fn any_pinned<'a>(pins: impl IntoIterator<Item = &'a AtomicU32>) -> bool {
    fence(Ordering::SeqCst);
    let pinned = pins.into_iter().any(|p| p.load(Ordering::Relaxed) != 0);
    if !pinned {
        fence(Ordering::Acquire);
    }
    pinned
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn key(n: u8) -> BlockKey {
        BlockKey::new(7, [n; 32])
    }

    #[test]
    fn all_zero_is_free() {
        let e = SlotEntry::default();
        assert_eq!(e.load_state(), Some(SlotState::FREE));
    }

    #[test]
    fn state_round_trips_and_rejects_garbage() {
        let s = SlotState {
            kind: SlotKind::Writing,
            client: 4095,
            gen: 0xdead_beef,
        };
        assert_eq!(SlotState::unpack(s.pack()), Some(s));
        assert_eq!(SlotState::unpack(9), None);
        assert_eq!(SlotState::unpack(1 << 24), None);
    }

    #[test]
    fn pin_validates_key_and_state() {
        let e = SlotEntry::default();
        let pin = AtomicU32::new(0);
        assert_eq!(e.try_pin(&pin, &key(1)), None, "free slot must not pin");
        assert_eq!(pin.load(Ordering::SeqCst), 0);
        e.start_writing(SlotState::FREE, 3);
        assert_eq!(e.try_pin(&pin, &key(1)), None, "writing slot must not pin");
        e.commit(e.load_state().unwrap(), &key(1), 100, 1);
        assert_eq!(e.try_pin(&pin, &key(2)), None, "other key must not pin");
        assert_eq!(e.try_pin(&pin, &key(1)), Some(0));
        assert_eq!(pin.load(Ordering::SeqCst), 1);
        assert_eq!(e.key(), key(1));
    }

    #[test]
    fn evict_backs_off_from_a_pin_and_bumps_gen() {
        let e = SlotEntry::default();
        let pin = AtomicU32::new(0);
        e.start_writing(SlotState::FREE, 0);
        e.commit(e.load_state().unwrap(), &key(1), 1, 1);
        e.try_pin(&pin, &key(1)).unwrap();
        let st = e.begin_evict().unwrap();
        assert!(any_pinned([&pin]));
        e.abort_evict(st);
        assert_eq!(e.load_state().unwrap().kind, SlotKind::Committed);
        pin.fetch_sub(1, Ordering::SeqCst);
        let st = e.begin_evict().unwrap();
        assert!(!any_pinned([&pin]));
        e.free(st);
        let now = e.load_state().unwrap();
        assert_eq!((now.kind, now.gen), (SlotKind::Free, 1));
        assert_eq!(e.try_pin(&pin, &key(1)), None);
    }
}
