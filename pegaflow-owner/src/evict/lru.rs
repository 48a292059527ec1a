//! An intrusive LRU list over the slot ids `0..capacity`.
//!
//! The pool's slot ids are dense and fixed for the owner's lifetime, so the
//! list needs no nodes and no map: per slot it keeps the id of its hotter and
//! its colder neighbour in two flat arrays, plus one membership bit. Every
//! operation is O(1) and nothing allocates after [`Lru::new`].
//!
//! # Invariants
//!
//! - A slot is on the list at most once, and exactly when its membership bit
//!   is set; `len` is the number of set bits.
//! - Following `hotter` links from `coldest` visits every member once, in
//!   order of last use, and ends at `hottest`; `colder` links are the exact
//!   reverse. An empty list has `coldest == hottest == NIL`.
//! - A slot that is not on the list has both links `NIL`.
//! - Ids `>= capacity` are never stored. They are ignored rather than
//!   rejected with a panic, because they can come from an engine's ring and
//!   the owner must survive a buggy engine (DESIGN.md, failure model). The
//!   owner should bounds-check ids where it reads them; this is the backstop.

use std::fmt;

/// The "no slot" link. Slot ids are `< capacity <= u32::MAX`, so no valid id
/// can equal it.
const NIL: u32 = u32::MAX;

/// Intrusive LRU over slot ids `0..capacity`, O(1) everything, no allocation
/// after [`Lru::new`].
///
/// Memory: 8 bytes and 1 bit per slot of capacity, whether or not the slot is
/// on the list.
#[derive(Clone)]
pub struct Lru {
    /// `hotter[s]`: the member used just after `s`, or `NIL` if `s` is the
    /// hottest member or not a member.
    hotter: Box<[u32]>,
    /// `colder[s]`: the member used just before `s`, or `NIL` if `s` is the
    /// coldest member or not a member.
    colder: Box<[u32]>,
    /// One bit per slot. The links alone cannot tell a lone member from a
    /// non-member (both have two `NIL` links), hence the extra bit.
    member: Box<[u64]>,
    coldest: u32,
    hottest: u32,
    len: u32,
}

impl Lru {
    /// An empty list that can hold the slot ids `0..capacity`.
    pub fn new(capacity: u32) -> Self {
        let n = capacity as usize;
        Self {
            hotter: vec![NIL; n].into_boxed_slice(),
            colder: vec![NIL; n].into_boxed_slice(),
            member: vec![0; n.div_ceil(64)].into_boxed_slice(),
            coldest: NIL,
            hottest: NIL,
            len: 0,
        }
    }

    /// The number of slot ids this list can hold: valid ids are `0..capacity`.
    pub fn capacity(&self) -> u32 {
        // Lossless: built from a `u32` in `new`.
        self.hotter.len() as u32
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `slot` is on the list; `false` for out-of-range ids.
    pub fn contains(&self, slot: u32) -> bool {
        let s = slot as usize;
        s < self.hotter.len() && self.member[s / 64] & (1 << (s % 64)) != 0
    }

    /// Makes `slot` the most recently used member, inserting it if absent.
    /// Out-of-range ids are ignored.
    pub fn insert_hot(&mut self, slot: u32) {
        if slot >= self.capacity() {
            return;
        }
        if self.contains(slot) {
            self.touch(slot);
            return;
        }
        let s = slot as usize;
        self.member[s / 64] |= 1 << (s % 64);
        self.len += 1;
        self.link_hottest(slot);
    }

    /// Makes `slot` the most recently used member if it is one; otherwise
    /// (absent or out of range) does nothing. Touching never admits: only
    /// [`insert_hot`](Self::insert_hot) does.
    pub fn touch(&mut self, slot: u32) {
        if self.contains(slot) && self.hottest != slot {
            self.unlink(slot);
            self.link_hottest(slot);
        }
    }

    /// Takes `slot` off the list. Returns whether it was on it.
    pub fn remove(&mut self, slot: u32) -> bool {
        if !self.contains(slot) {
            return false;
        }
        let s = slot as usize;
        self.unlink(slot);
        self.member[s / 64] &= !(1 << (s % 64));
        self.len -= 1;
        true
    }

    /// The least recently used member, if any.
    pub fn coldest(&self) -> Option<u32> {
        (self.coldest != NIL).then_some(self.coldest)
    }

    /// Iterate from the coldest towards the hottest (the owner walks this to
    /// find an unpinned victim, skipping pinned ones).
    ///
    /// Each step is O(1); finding a victim costs O(1 + pinned slots skipped).
    /// The iterator borrows the list, so pick the victim first and
    /// [`remove`](Self::remove) it afterwards:
    /// `lru.iter_cold().find(|&s| !pinned(s))`.
    pub fn iter_cold(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::successors(self.coldest(), move |&s| {
            let next = self.hotter[s as usize];
            (next != NIL).then_some(next)
        })
    }

    /// Appends the member `slot`, currently unlinked, at the hot end.
    fn link_hottest(&mut self, slot: u32) {
        let s = slot as usize;
        self.hotter[s] = NIL;
        self.colder[s] = self.hottest;
        match self.hottest {
            NIL => self.coldest = slot,
            old => self.hotter[old as usize] = slot,
        }
        self.hottest = slot;
    }

    /// Splices the member `slot` out of the chain and clears its links; its
    /// membership bit and `len` are the caller's business.
    fn unlink(&mut self, slot: u32) {
        let s = slot as usize;
        let (hotter, colder) = (self.hotter[s], self.colder[s]);
        match hotter {
            NIL => self.hottest = colder,
            h => self.colder[h as usize] = colder,
        }
        match colder {
            NIL => self.coldest = hotter,
            c => self.hotter[c as usize] = hotter,
        }
        self.hotter[s] = NIL;
        self.colder[s] = NIL;
    }
}

impl fmt::Debug for Lru {
    /// Summary only: the arrays are as long as the pool.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lru")
            .field("capacity", &self.capacity())
            .field("len", &self.len)
            .field("coldest", &self.coldest())
            .field("hottest", &(self.hottest != NIL).then_some(self.hottest))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks every invariant in the module docs; returns the cold-to-hot order.
    fn check(lru: &Lru) -> Vec<u32> {
        let order: Vec<u32> = lru.iter_cold().collect();
        assert_eq!(order.len(), lru.len(), "chain length != len");
        let mut back: Vec<u32> =
            std::iter::successors((lru.hottest != NIL).then_some(lru.hottest), |&s| {
                let c = lru.colder[s as usize];
                (c != NIL).then_some(c)
            })
            .collect();
        back.reverse();
        assert_eq!(
            order, back,
            "colder links are not the reverse of hotter links"
        );
        for s in 0..lru.capacity() {
            let on_chain = order.contains(&s);
            assert_eq!(lru.contains(s), on_chain, "membership bit of {s}");
            if !on_chain {
                assert_eq!((lru.hotter[s as usize], lru.colder[s as usize]), (NIL, NIL));
            }
        }
        assert_eq!(lru.coldest(), order.first().copied());
        assert_eq!(lru.is_empty(), order.is_empty());
        order
    }

    #[test]
    fn insertion_order_is_cold_to_hot() {
        let mut lru = Lru::new(8);
        assert_eq!(check(&lru), []);
        assert_eq!(lru.coldest(), None);
        for s in [3, 0, 7, 5] {
            lru.insert_hot(s);
        }
        assert_eq!(check(&lru), [3, 0, 7, 5]);
        assert_eq!(lru.coldest(), Some(3));
        assert_eq!(lru.len(), 4);
    }

    #[test]
    fn touch_moves_to_hot_end() {
        let mut lru = Lru::new(8);
        for s in 0..4 {
            lru.insert_hot(s);
        }
        lru.touch(0); // coldest
        assert_eq!(check(&lru), [1, 2, 3, 0]);
        lru.touch(2); // middle
        assert_eq!(check(&lru), [1, 3, 0, 2]);
        lru.touch(2); // already hottest
        assert_eq!(check(&lru), [1, 3, 0, 2]);
    }

    #[test]
    fn touch_of_absent_slot_does_not_insert() {
        let mut lru = Lru::new(8);
        lru.insert_hot(1);
        lru.touch(4);
        assert_eq!(check(&lru), [1]);
    }

    #[test]
    fn insert_hot_of_member_moves_it() {
        let mut lru = Lru::new(8);
        for s in 0..3 {
            lru.insert_hot(s);
        }
        lru.insert_hot(0);
        assert_eq!(check(&lru), [1, 2, 0]);
        assert_eq!(lru.len(), 3);
    }

    #[test]
    fn remove_from_every_position() {
        let mut lru = Lru::new(8);
        for s in 0..5 {
            lru.insert_hot(s);
        }
        assert!(lru.remove(2)); // middle
        assert_eq!(check(&lru), [0, 1, 3, 4]);
        assert!(lru.remove(0)); // coldest
        assert_eq!(check(&lru), [1, 3, 4]);
        assert!(lru.remove(4)); // hottest
        assert_eq!(check(&lru), [1, 3]);
        assert!(!lru.remove(4), "second remove reports absence");
        assert!(lru.remove(1));
        assert!(lru.remove(3)); // last one
        assert_eq!(check(&lru), []);
        assert_eq!(lru.coldest(), None);
    }

    #[test]
    fn reinsert_after_remove_goes_to_hot_end() {
        let mut lru = Lru::new(4);
        for s in 0..4 {
            lru.insert_hot(s);
        }
        assert!(lru.remove(0));
        lru.insert_hot(0);
        assert_eq!(check(&lru), [1, 2, 3, 0]);
    }

    #[test]
    fn out_of_range_ids_are_ignored() {
        let mut lru = Lru::new(4);
        lru.insert_hot(1);
        for bad in [4, 5, 64, NIL - 1, NIL] {
            lru.insert_hot(bad);
            lru.touch(bad);
            assert!(!lru.remove(bad));
            assert!(!lru.contains(bad));
        }
        assert_eq!(check(&lru), [1]);

        let mut empty = Lru::new(0);
        empty.insert_hot(0);
        empty.touch(0);
        assert!(!empty.remove(0));
        assert_eq!(check(&empty), []);
    }

    #[test]
    fn membership_bits_cross_word_boundaries() {
        let mut lru = Lru::new(130);
        for s in [63, 64, 127, 128, 129] {
            lru.insert_hot(s);
        }
        assert_eq!(check(&lru), [63, 64, 127, 128, 129]);
        assert!(lru.remove(64));
        assert!(lru.contains(63) && !lru.contains(64) && lru.contains(127));
        check(&lru);
    }

    #[test]
    fn victim_walk_skips_pinned_slots() {
        let mut lru = Lru::new(8);
        for s in 0..6 {
            lru.insert_hot(s);
        }
        let pinned = [0, 1, 3];
        let victim = lru.iter_cold().find(|s| !pinned.contains(s));
        assert_eq!(victim, Some(2));
        assert!(lru.remove(2));
        assert_eq!(check(&lru), [0, 1, 3, 4, 5]);
    }
}
