//! A whole byte stream from a peer's socket, frame headers included, read
//! with `recv` until it errors: never panics, never allocates a claimed
//! length over `MAX_FRAME`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pegaflow_shm::proto::{recv, ClientMsg, OwnerMsg};

fuzz_target!(|stream: &[u8]| {
    let mut r = stream;
    while recv::<ClientMsg>(&mut r).is_ok() {}
    let mut r = stream;
    while recv::<OwnerMsg>(&mut r).is_ok() {}
});
