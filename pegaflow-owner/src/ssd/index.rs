//! The owner's private index of what the SSD tier holds: key -> record
//! location, and the segments records live in. Only the request loop
//! touches it; engines see its keys through the membership set in shm.

use std::collections::HashMap;
use std::path::PathBuf;

use pegaflow_shm::slot_table::BlockKey;

/// Where a block lives on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    pub seg: u32,
    /// Sequence number of its segment: the larger one wins when a key was
    /// written twice.
    pub seq: u64,
    /// Offset of the record (its header) in the segment file.
    pub off: u64,
    pub len: u64,
    /// Block size of the pool slot it came from.
    pub class: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegState {
    /// Being appended to.
    Open,
    /// No more appends; sealed once its last write completed.
    Full,
    Sealed,
    /// Found at start; its records arrive from a recovery thread.
    Recovering,
    /// Recovered (never appended to again).
    Recovered,
}

pub struct SegMeta {
    pub path: usize,
    pub file: PathBuf,
    pub seq: u64,
    pub bytes: u64,
    pub next_off: u64,
    pub next_number: u32,
    pub writes_inflight: u32,
    pub state: SegState,
    /// Keys written here (some may have moved to a newer segment since).
    pub keys: Vec<BlockKey>,
}

#[derive(Default)]
pub struct SsdIndex {
    pub map: HashMap<BlockKey, Loc>,
    pub segs: HashMap<u32, SegMeta>,
    next_id: u32,
}

impl SsdIndex {
    pub fn new_seg_id(&mut self) -> u32 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    pub fn get(&self, key: &BlockKey) -> Option<Loc> {
        self.map.get(key).copied()
    }

    /// Map `key` to `loc` unless a newer record of it is indexed. Returns
    /// whether the key is new to the index (`false`: replaced or kept).
    pub fn insert(&mut self, key: BlockKey, loc: Loc) -> Option<bool> {
        match self.map.get(&key) {
            Some(old) if old.seq > loc.seq || (old.seq == loc.seq && old.off >= loc.off) => None,
            Some(_) => {
                self.map.insert(key, loc);
                if let Some(s) = self.segs.get_mut(&loc.seg) {
                    s.keys.push(key);
                }
                Some(false)
            }
            None => {
                self.map.insert(key, loc);
                if let Some(s) = self.segs.get_mut(&loc.seg) {
                    s.keys.push(key);
                }
                Some(true)
            }
        }
    }

    /// Forget `key` if it still maps to a record of `seg` at `off`.
    pub fn remove_at(&mut self, key: &BlockKey, seg: u32, off: u64) -> bool {
        if self
            .map
            .get(key)
            .is_some_and(|l| l.seg == seg && l.off == off)
        {
            self.map.remove(key);
            true
        } else {
            false
        }
    }

    /// Drop a segment; returns the keys that were indexed in it.
    pub fn remove_segment(&mut self, seg: u32) -> (Option<SegMeta>, Vec<BlockKey>) {
        let Some(meta) = self.segs.remove(&seg) else {
            return (None, Vec::new());
        };
        let gone: Vec<BlockKey> = meta
            .keys
            .iter()
            .filter(|k| self.map.get(k).is_some_and(|l| l.seg == seg))
            .copied()
            .collect();
        for k in &gone {
            self.map.remove(k);
        }
        (Some(meta), gone)
    }
}
