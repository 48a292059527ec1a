//! Stable-Rust fuzz smoke of every decoder of another process's bytes (the
//! same decoders as the libFuzzer targets in `fuzz/`, see docs/fuzzing.md):
//! millions of random and mutated inputs, no panic allowed, and whatever is
//! accepted must re-encode to something that decodes the same.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-verify cargo test -p pegaflow-shm --test decode_fuzz
//! PEGAFLOW_FUZZ_SCALE=10 ...   # ten times the inputs
//! PEGAFLOW_FUZZ_SEED=123 ...   # another deterministic stream
//! ```

#![cfg(not(loom))]

use pegaflow_shm::geometry::Geometry;
use pegaflow_shm::proto::{
    decode, recv, send, ClientMsg, Hello, OwnerMsg, RejectReason, Resume, Welcome, MAX_FRAME,
};
use pegaflow_shm::request::{Request, TOUCH_MAX, WORDS};
use pegaflow_shm::slot_table::BlockKey;

/// xorshift64*: deterministic, seedable, no dependency.
struct Rng(u64);

impl Rng {
    fn new(salt: u64) -> Rng {
        let seed = std::env::var("PEGAFLOW_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_f00d_u64);
        Rng((seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Mostly small numbers, sometimes edge values, sometimes anything.
    fn interesting(&mut self) -> u64 {
        match self.below(6) {
            0 => 0,
            1 => self.below(20),
            2 => u64::MAX - self.below(3),
            3 => 1 << self.below(64),
            4 => u64::from(u32::MAX) + self.below(3) - 1,
            _ => self.next(),
        }
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max as u64 + 1) as usize;
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn scale() -> u64 {
    std::env::var("PEGAFLOW_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

// ---------------------------------------------------------------------------
// Request ring entries
// ---------------------------------------------------------------------------

fn random_request(rng: &mut Rng) -> Request {
    match rng.below(4) {
        3 => {
            let mut hash = [0u8; 32];
            hash.iter_mut().for_each(|b| *b = rng.next() as u8);
            Request::Stage {
                key: BlockKey::new(rng.interesting(), hash),
            }
        }
        0 => {
            let mut hash = [0u8; 32];
            hash.iter_mut().for_each(|b| *b = rng.next() as u8);
            Request::Commit {
                slot: rng.interesting() as u32,
                gen: rng.interesting() as u32,
                len: rng.interesting(),
                key: BlockKey::new(rng.interesting(), hash),
            }
        }
        1 => Request::Abort {
            slot: rng.interesting() as u32,
            gen: rng.interesting() as u32,
        },
        _ => {
            let count = rng.below(TOUCH_MAX as u64 + 1) as u32;
            let mut slots = [0u32; TOUCH_MAX];
            for s in &mut slots[..count as usize] {
                *s = rng.interesting() as u32;
            }
            Request::Touch { count, slots }
        }
    }
}

fn check_request(w: &[u64; WORDS]) -> bool {
    match Request::decode(w) {
        Ok(r) => {
            assert_eq!(&r.encode(), w, "accepted a non-canonical request {w:x?}");
            true
        }
        Err(_) => false,
    }
}

#[test]
fn request_decode_random_and_mutated() {
    let mut rng = Rng::new(1);
    let (mut accepted, mut total) = (0u64, 0u64);
    for _ in 0..3_000_000 * scale() {
        // A valid entry with a few words or bits changed, or pure noise.
        let mut w = if rng.below(4) == 0 {
            std::array::from_fn(|_| rng.interesting())
        } else {
            random_request(&mut rng).encode()
        };
        for _ in 0..rng.below(3) {
            let i = rng.below(WORDS as u64) as usize;
            match rng.below(3) {
                0 => w[i] ^= 1 << rng.below(64),
                1 => w[i] = rng.interesting(),
                _ => w[0] = (w[0] & !0xffff_ffff) | rng.below(5),
            }
        }
        total += 1;
        accepted += u64::from(check_request(&w));
    }
    // Both outcomes must have been exercised, or the generator is broken.
    assert!(
        accepted > total / 20 && accepted < total,
        "{accepted}/{total} accepted"
    );
}

// ---------------------------------------------------------------------------
// Socket frames
// ---------------------------------------------------------------------------

fn random_string(rng: &mut Rng) -> String {
    let n = rng.below(12) as usize;
    (0..n)
        .map(|_| char::from_u32(rng.below(0x800) as u32).unwrap_or('x'))
        .collect()
}

fn random_client_msg(rng: &mut Rng) -> ClientMsg {
    match rng.below(4) {
        0 => ClientMsg::Hello(Hello {
            abi_version: rng.interesting() as u32,
            pid: rng.interesting() as u32,
            label: random_string(rng),
            namespace: rng.interesting(),
            slot_bytes: rng.interesting(),
            resume: (rng.below(2) == 0).then(|| Resume {
                segment_id: rng.interesting(),
                client: rng.interesting() as u32,
                token: rng.interesting(),
            }),
        }),
        1 => ClientMsg::PublishIpc {
            key: random_string(rng),
            handle: rng.bytes(70),
        },
        2 => ClientMsg::FetchIpc {
            key: random_string(rng),
        },
        _ => ClientMsg::Goodbye,
    }
}

fn random_owner_msg(rng: &mut Rng) -> OwnerMsg {
    match rng.below(3) {
        0 => OwnerMsg::Welcome(Welcome {
            client: rng.interesting() as u32,
            token: rng.interesting(),
            epoch: rng.interesting(),
            segment_id: rng.interesting(),
            control_path: random_string(rng),
            pool_path: random_string(rng),
            geometry: Geometry {
                pool_bytes: rng.interesting(),
                slab_bytes: rng.interesting(),
                granule_bytes: rng.interesting(),
                max_clients: rng.interesting(),
                request_ring_cap: rng.interesting(),
                stash_ring_cap: rng.interesting(),
                index_buckets: rng.interesting(),
            },
            resumed: rng.below(2) == 0,
        }),
        1 => OwnerMsg::Rejected {
            reason: [
                RejectReason::AbiMismatch,
                RejectReason::PermissionDenied,
                RejectReason::TooManyClients,
                RejectReason::BadLayout,
                RejectReason::BadRequest,
            ][rng.below(5) as usize],
            message: random_string(rng),
        },
        _ => OwnerMsg::IpcHandle {
            key: random_string(rng),
            handle: (rng.below(2) == 0).then(|| rng.bytes(70)),
        },
    }
}

/// Flip, overwrite, insert, delete or truncate a few bytes.
fn mutate(rng: &mut Rng, b: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(b.len() as u64 + 1) as usize;
        match rng.below(6) {
            0 if at < b.len() => b[at] ^= 1 << rng.below(8),
            1 if at < b.len() => b[at] = [0, 0xff, 0xfb, 0xfc, 0xfd, 0x80][rng.below(6) as usize],
            2 => b.insert(at, rng.next() as u8),
            3 if at < b.len() => {
                b.remove(at);
            }
            4 => b.truncate(at),
            _ => b.extend_from_slice(&rng.bytes(4)),
        }
    }
}

fn body<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    let mut frame = Vec::new();
    send(&mut frame, msg).expect("encodes");
    frame.split_off(4)
}

/// Decode `b`; if accepted, it must re-encode and decode to the same value.
fn check_frame<T>(b: &[u8]) -> bool
where
    T: serde::Serialize + for<'de> serde::Deserialize<'de> + PartialEq + std::fmt::Debug,
{
    match decode::<T>(b) {
        Ok(msg) => {
            let again: T = decode(&body(&msg)).expect("a re-encoded message decodes");
            assert_eq!(again, msg);
            true
        }
        Err(_) => false,
    }
}

fn fuzz_frames<T>(salt: u64, gen: fn(&mut Rng) -> T)
where
    T: serde::Serialize + for<'de> serde::Deserialize<'de> + PartialEq + std::fmt::Debug,
{
    let mut rng = Rng::new(salt);
    let (mut accepted, mut total) = (0u64, 0u64);
    for _ in 0..300_000 * scale() {
        let mut b = if rng.below(5) == 0 {
            rng.bytes(48)
        } else {
            let mut b = body(&gen(&mut rng));
            if rng.below(8) != 0 {
                mutate(&mut rng, &mut b);
            }
            b
        };
        if rng.below(50) == 0 {
            // A huge claimed length (varint 0xfd = u64 follows) early on.
            let at = rng.below(b.len() as u64 + 1) as usize;
            b.splice(
                at..at,
                [0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
            );
        }
        total += 1;
        accepted += u64::from(check_frame::<T>(&b));
    }
    assert!(
        accepted > total / 20 && accepted < total,
        "{accepted}/{total} accepted"
    );
}

#[test]
fn client_msg_decode_random_and_mutated() {
    fuzz_frames(2, random_client_msg);
}

#[test]
fn owner_msg_decode_random_and_mutated() {
    fuzz_frames(3, random_owner_msg);
}

/// Whole streams through `recv`, frame headers included.
#[test]
fn recv_streams() {
    let mut rng = Rng::new(4);
    for _ in 0..40_000 * scale() {
        let mut stream = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let mut b = body(&random_client_msg(&mut rng));
            if rng.below(3) == 0 {
                mutate(&mut rng, &mut b);
            }
            let len = match rng.below(10) {
                0 => rng.next() as u32,
                1 => MAX_FRAME + rng.below(2) as u32,
                2 => b.len() as u32 + rng.below(3) as u32,
                _ => b.len() as u32,
            };
            stream.extend_from_slice(&len.to_le_bytes());
            stream.extend_from_slice(&b);
        }
        if rng.below(4) == 0 {
            let cut = rng.below(stream.len() as u64 + 1) as usize;
            stream.truncate(cut);
        }
        let mut r = stream.as_slice();
        while recv::<ClientMsg>(&mut r).is_ok() {}
        let mut r = stream.as_slice();
        while recv::<OwnerMsg>(&mut r).is_ok() {}
    }
}
