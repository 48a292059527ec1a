//! What the owner does with each 64-byte entry an engine puts in its
//! request ring: `Request::decode` must never panic, and what it accepts must
//! encode back to the same words (the encoding is canonical).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pegaflow_shm::request::{Request, WORDS};

fuzz_target!(|data: [u8; 64]| {
    let mut w = [0u64; WORDS];
    for (word, chunk) in w.iter_mut().zip(data.chunks_exact(8)) {
        *word = u64::from_le_bytes(chunk.try_into().unwrap());
    }
    if let Ok(r) = Request::decode(&w) {
        assert_eq!(r.encode(), w, "accepted a non-canonical request");
    }
});
