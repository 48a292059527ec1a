//! What engines put in their request ring, and its decoder.
//!
//! Each request is 64 bytes (eight little-endian words). Word 0 holds the
//! tag in its low 32 bits and a tag-specific `u32` above. The owner decodes
//! every entry with [`Request::decode`], which never panics on any input
//! (fuzzed in `fuzz/`); ids and lengths are range-checked by the owner
//! against the slot table after decoding.
//!
//! `Commit` and `Abort` carry the generation of the slot as the engine got it
//! from its stash. The owner applies them only to a slot that is still
//! `Writing(that engine, that generation)`, so a request from an earlier life
//! of the slot (queued before a reclaim, or replayed after an owner
//! restart) can never publish or free a slot handed out since.
//!
//! `Stage` (ABI 3) asks the owner to read one block back from its SSD tier
//! into a pool slot; the engine never waits for it (it looks the block up
//! again later). The owner counts every `Stage` it has finished, served or
//! not, in the client's `stages_done` counter.

use crate::error::DecodeError;
use crate::slot_table::BlockKey;

pub const WORDS: usize = 8;
/// Slot ids one `Touch` carries.
pub const TOUCH_MAX: usize = 14;

const TAG_COMMIT: u32 = 1;
const TAG_ABORT: u32 = 2;
const TAG_TOUCH: u32 = 3;
const TAG_STAGE: u32 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// The engine finished copying `len` bytes of `key` into `slot` (which it
    /// took from its stash at generation `gen`): publish it.
    Commit {
        slot: u32,
        gen: u32,
        len: u64,
        key: BlockKey,
    },
    /// The engine took `slot` (at generation `gen`) from its stash but will
    /// not write it: free it.
    Abort { slot: u32, gen: u32 },
    /// The engine hit these slots: refresh their recency and frequency.
    Touch { count: u32, slots: [u32; TOUCH_MAX] },
    /// Read `key` back from the owner's SSD tier into the pool (if the tier
    /// has it and a slot can be had); a later lookup hits it.
    Stage { key: BlockKey },
}

impl Request {
    pub fn encode(&self) -> [u64; WORDS] {
        let mut w = [0u64; WORDS];
        match *self {
            Request::Commit {
                slot,
                gen,
                len,
                key,
            } => {
                w[0] = u64::from(TAG_COMMIT) | u64::from(slot) << 32;
                w[1] = len;
                w[2] = key.namespace;
                w[3..7].copy_from_slice(&key.words());
                w[7] = u64::from(gen);
            }
            Request::Abort { slot, gen } => {
                w[0] = u64::from(TAG_ABORT) | u64::from(slot) << 32;
                w[1] = u64::from(gen);
            }
            Request::Touch { count, slots } => {
                w[0] = u64::from(TAG_TOUCH) | u64::from(count) << 32;
                for (i, pair) in slots.chunks(2).enumerate() {
                    w[1 + i] = u64::from(pair[0]) | u64::from(pair[1]) << 32;
                }
            }
            Request::Stage { key } => {
                w[0] = u64::from(TAG_STAGE);
                w[1] = key.namespace;
                w[2..6].copy_from_slice(&key.words());
            }
        }
        w
    }

    pub fn decode(w: &[u64; WORDS]) -> Result<Request, DecodeError> {
        let tag = w[0] as u32;
        let arg = (w[0] >> 32) as u32;
        match tag {
            TAG_COMMIT => {
                if w[7] >> 32 != 0 {
                    return Err(DecodeError::NonZeroPadding);
                }
                let key = BlockKey::from_words(w[2], [w[3], w[4], w[5], w[6]]);
                Ok(Request::Commit {
                    slot: arg,
                    gen: w[7] as u32,
                    len: w[1],
                    key,
                })
            }
            TAG_ABORT => {
                if w[1] >> 32 != 0 || w[2..].iter().any(|&x| x != 0) {
                    return Err(DecodeError::NonZeroPadding);
                }
                Ok(Request::Abort {
                    slot: arg,
                    gen: w[1] as u32,
                })
            }
            TAG_TOUCH => {
                if arg as usize > TOUCH_MAX {
                    return Err(DecodeError::BadCount(arg));
                }
                let mut slots = [0u32; TOUCH_MAX];
                for i in 0..TOUCH_MAX {
                    let word = w[1 + i / 2];
                    slots[i] = if i % 2 == 0 {
                        word as u32
                    } else {
                        (word >> 32) as u32
                    };
                }
                if slots[arg as usize..].iter().any(|&s| s != 0) {
                    return Err(DecodeError::NonZeroPadding);
                }
                Ok(Request::Touch { count: arg, slots })
            }
            TAG_STAGE => {
                if arg != 0 || w[6] != 0 || w[7] != 0 {
                    return Err(DecodeError::NonZeroPadding);
                }
                Ok(Request::Stage {
                    key: BlockKey::from_words(w[1], [w[2], w[3], w[4], w[5]]),
                })
            }
            other => Err(DecodeError::UnknownTag(other)),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let key = BlockKey::new(0xabcdef, [7; 32]);
        let mut slots = [0u32; TOUCH_MAX];
        slots[..3].copy_from_slice(&[1, 2, u32::MAX]);
        for r in [
            Request::Commit {
                slot: 42,
                gen: u32::MAX,
                len: 2 << 20,
                key,
            },
            Request::Abort { slot: 7, gen: 3 },
            Request::Touch { count: 3, slots },
            Request::Stage { key },
        ] {
            assert_eq!(Request::decode(&r.encode()), Ok(r));
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert_eq!(Request::decode(&[0; 8]), Err(DecodeError::UnknownTag(0)));
        assert_eq!(
            Request::decode(&[3 | 15 << 32, 0, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::BadCount(15))
        );
        assert_eq!(
            Request::decode(&[2, 1 << 32, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::NonZeroPadding)
        );
        assert_eq!(
            Request::decode(&[2, 1, 5, 0, 0, 0, 0, 0]),
            Err(DecodeError::NonZeroPadding)
        );
        assert_eq!(
            Request::decode(&[1, 0, 0, 0, 0, 0, 0, 1 << 32]),
            Err(DecodeError::NonZeroPadding)
        );
        assert_eq!(
            Request::decode(&[4 | 1 << 32, 1, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::NonZeroPadding)
        );
        assert_eq!(
            Request::decode(&[4, 1, 0, 0, 0, 0, 9, 0]),
            Err(DecodeError::NonZeroPadding)
        );
        assert_eq!(
            Request::decode(&[5, 0, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::UnknownTag(5))
        );
    }
}
