//! What the owner decodes from an engine's socket: a frame body as
//! `ClientMsg`. Must never panic or allocate past the frame limit, and what
//! it accepts must survive a re-encode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pegaflow_shm::proto::{decode, send, ClientMsg};

fuzz_target!(|body: &[u8]| {
    if let Ok(msg) = decode::<ClientMsg>(body) {
        let mut frame = Vec::new();
        send(&mut frame, &msg).expect("a decoded message re-encodes");
        let again: ClientMsg = decode(&frame[4..]).expect("re-encoded message decodes");
        assert_eq!(again, msg);
    }
});
