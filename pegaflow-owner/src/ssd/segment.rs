//! The on-disk format of the SSD tier: log-structured segment files.
//!
//! Each SSD path holds a directory `pegaflow-NAME/` of segment files
//! `seg-SEQ.pfs` (`SEQ`: 16 hex digits, one counter for all paths, so the
//! files of every path sort into one write order). A segment is written
//! front to back, never rewritten (except its header, once, to seal it),
//! and evicted whole (FIFO): unlinked.
//!
//! ```text
//!   offset 0       segment header (4 KiB)
//!   offset 4096    record 0: record header (4 KiB) | payload, padded to 4 KiB
//!   ...            record 1, 2, ... back to back
//! ```
//!
//! Every unit is a multiple of 4 KiB, so records are written and read with
//! `O_DIRECT` straight from (and into) 4 KiB-aligned memory.
//!
//! ## Segment header (first 64 bytes of the 4 KiB, little-endian)
//!
//! | off | type | field |
//! |---|---|---|
//! | 0 | [u8; 8] | magic `PFSSDSEG` |
//! | 8 | u32 | format version (1) |
//! | 12 | u32 | sealed: 1 once every record was written and completed |
//! | 16 | u64 | segment sequence number |
//! | 24 | u64 | segment bytes (the file's size) |
//! | 32 | u64 | records (valid when sealed) |
//! | 40 | u64 | created, Unix ns |
//! | 48 | u64 | reserved, 0 |
//! | 56 | u64 | xxh3-64 of bytes 0..56 |
//!
//! ## Record header (first 96 bytes of the 4 KiB)
//!
//! | off | type | field |
//! |---|---|---|
//! | 0 | [u8; 8] | magic `PFBLOCK1` |
//! | 8 | u64 | namespace |
//! | 16 | [u8; 32] | block hash |
//! | 48 | u64 | len: valid payload bytes |
//! | 56 | u64 | class: the block size of the pool slot it came from (>= len) |
//! | 64 | u64 | segment sequence number (a record of another segment is stale) |
//! | 72 | u32 | record number in the segment |
//! | 76 | u32 | reserved, 0 |
//! | 80 | u64 | xxh3-64 of the payload's `len` bytes |
//! | 88 | u64 | xxh3-64 of bytes 0..88 |
//!
//! ## What recovery trusts
//!
//! A **sealed** segment had every write completed before its header was
//! rewritten: recovery reads its record headers only (4 KiB per block), and
//! each payload checksum is checked when the block is read back (staged).
//! An **unsealed** segment was being written when the owner stopped
//! (SIGKILL, crash, power loss): recovery reads every payload and drops the
//! records whose checksum fails (torn writes). A record header that does not
//! check ends the segment's chain (nothing after it can be located).

use xxhash_rust::xxh3::xxh3_64;

use pegaflow_shm::slot_table::BlockKey;

/// Alignment and size unit of everything on disk.
pub const ALIGN: u64 = 4096;
pub const SEGMENT_MAGIC: [u8; 8] = *b"PFSSDSEG";
pub const RECORD_MAGIC: [u8; 8] = *b"PFBLOCK1";
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of the segment header and of each record header.
pub const HEADER_BYTES: u64 = ALIGN;

pub fn round_up(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

/// Bytes one record of `len` payload bytes takes on disk.
pub fn record_bytes(len: u64) -> u64 {
    HEADER_BYTES + round_up(len)
}

/// The file name of segment `seq`.
pub fn file_name(seq: u64) -> String {
    format!("seg-{seq:016x}.pfs")
}

/// The sequence number in a segment file name, if it is one.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("seg-")?.strip_suffix(".pfs")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub seq: u64,
    pub bytes: u64,
    pub sealed: bool,
    pub records: u64,
    pub created_ns: u64,
}

impl SegmentHeader {
    /// Write into the first 64 bytes of `b` (the rest of the 4 KiB is zero).
    pub fn encode(&self, b: &mut [u8]) {
        b[..HEADER_BYTES as usize].fill(0);
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        put_u32(b, 8, FORMAT_VERSION);
        put_u32(b, 12, u32::from(self.sealed));
        put_u64(b, 16, self.seq);
        put_u64(b, 24, self.bytes);
        put_u64(b, 32, self.records);
        put_u64(b, 40, self.created_ns);
        let ck = xxh3_64(&b[0..56]);
        put_u64(b, 56, ck);
    }

    pub fn decode(b: &[u8]) -> Result<SegmentHeader, &'static str> {
        if b.len() < 64 {
            return Err("short header");
        }
        if b[0..8] != SEGMENT_MAGIC {
            return Err("not a segment (bad magic)");
        }
        if get_u64(b, 56) != xxh3_64(&b[0..56]) {
            return Err("header checksum");
        }
        if get_u32(b, 8) != FORMAT_VERSION {
            return Err("unknown format version");
        }
        let h = SegmentHeader {
            seq: get_u64(b, 16),
            bytes: get_u64(b, 24),
            sealed: get_u32(b, 12) == 1,
            records: get_u64(b, 32),
            created_ns: get_u64(b, 40),
        };
        if h.bytes < 2 * HEADER_BYTES || !h.bytes.is_multiple_of(ALIGN) {
            return Err("impossible segment size");
        }
        Ok(h)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub key: BlockKey,
    pub len: u64,
    pub class: u64,
    pub segment_seq: u64,
    pub number: u32,
    pub checksum: u64,
}

impl RecordHeader {
    pub fn encode(&self, b: &mut [u8]) {
        b[..HEADER_BYTES as usize].fill(0);
        b[0..8].copy_from_slice(&RECORD_MAGIC);
        put_u64(b, 8, self.key.namespace);
        b[16..48].copy_from_slice(&self.key.hash);
        put_u64(b, 48, self.len);
        put_u64(b, 56, self.class);
        put_u64(b, 64, self.segment_seq);
        put_u32(b, 72, self.number);
        put_u64(b, 80, self.checksum);
        let ck = xxh3_64(&b[0..88]);
        put_u64(b, 88, ck);
    }

    pub fn decode(b: &[u8]) -> Result<RecordHeader, &'static str> {
        if b.len() < 96 {
            return Err("short record header");
        }
        if b[0..8] != RECORD_MAGIC {
            return Err("no record (bad magic)");
        }
        if get_u64(b, 88) != xxh3_64(&b[0..88]) {
            return Err("record header checksum");
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&b[16..48]);
        let h = RecordHeader {
            key: BlockKey::new(get_u64(b, 8), hash),
            len: get_u64(b, 48),
            class: get_u64(b, 56),
            segment_seq: get_u64(b, 64),
            number: get_u32(b, 72),
            checksum: get_u64(b, 80),
        };
        if h.len == 0 || h.class < h.len || h.key.namespace == 0 {
            return Err("impossible record");
        }
        Ok(h)
    }
}

/// The checksum of a payload.
pub fn payload_checksum(data: &[u8]) -> u64 {
    xxh3_64(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_reject_any_flipped_byte() {
        let mut b = vec![0u8; 4096];
        let s = SegmentHeader {
            seq: 7,
            bytes: 64 << 20,
            sealed: true,
            records: 30,
            created_ns: 1,
        };
        s.encode(&mut b);
        assert_eq!(SegmentHeader::decode(&b), Ok(s));
        for i in 0..64 {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert!(SegmentHeader::decode(&c).is_err(), "byte {i}");
        }
        let r = RecordHeader {
            key: BlockKey::new(3, [9; 32]),
            len: 100,
            class: 4096,
            segment_seq: 7,
            number: 2,
            checksum: 42,
        };
        r.encode(&mut b);
        assert_eq!(RecordHeader::decode(&b), Ok(r));
        for i in 0..96 {
            let mut c = b.clone();
            c[i] ^= 1;
            assert!(RecordHeader::decode(&c).is_err(), "byte {i}");
        }
        assert_eq!(parse_file_name(&file_name(0xabc)), Some(0xabc));
        assert_eq!(parse_file_name("seg-12.pfs"), None);
        assert_eq!(record_bytes(1), 8192);
        assert_eq!(record_bytes(2 << 20), (2 << 20) + 4096);
    }
}
