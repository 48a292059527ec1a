//! What an engine decodes from the owner's socket: a frame body as
//! `OwnerMsg`. Must never panic, and what it accepts must survive a
//! re-encode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pegaflow_shm::proto::{decode, send, OwnerMsg};

fuzz_target!(|body: &[u8]| {
    if let Ok(msg) = decode::<OwnerMsg>(body) {
        let mut frame = Vec::new();
        send(&mut frame, &msg).expect("a decoded message re-encodes");
        let again: OwnerMsg = decode(&frame[4..]).expect("re-encoded message decodes");
        assert_eq!(again, msg);
    }
});
