//! The socket protocol between engines and the owner (control plane only).
//!
//! An engine connects to the owner's Unix socket, says [`Hello`], and keeps
//! the connection open for as long as it lives: the owner learns of the
//! engine's death from the hang-up. Nothing on the hot path (lookup, pin,
//! save, load, release) crosses the socket.
//!
//! Frames are a little-endian `u32` length followed by a bincode (2.x,
//! standard config) encoding of [`ClientMsg`] or [`OwnerMsg`]; frames over
//! [`MAX_FRAME`] are refused before allocation.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::error::ProtoError;
use crate::geometry::Geometry;

pub const MAX_FRAME: u32 = 1 << 20;

/// Where an engine left off, to resume its client entry after an owner
/// restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    pub segment_id: u64,
    pub client: u32,
    pub token: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub abi_version: u32,
    pub pid: u32,
    /// Free text shown by metrics and `pegaflow-inspect` ("vllm tp0").
    pub label: String,
    /// Namespace this engine saves into (0: lookups only).
    pub namespace: u64,
    /// Block size this engine saves (0: lookups only).
    pub slot_bytes: u64,
    pub resume: Option<Resume>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    Hello(Hello),
    /// Store a CUDA IPC handle (event or memory) under `key` for other
    /// engines of this owner; replaces an earlier one of the same key.
    PublishIpc {
        key: String,
        handle: Vec<u8>,
    },
    /// Ask for the handle stored under `key`.
    FetchIpc {
        key: String,
    },
    /// A clean goodbye; the engine released its pins first.
    Goodbye,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub client: u32,
    pub token: u64,
    pub epoch: u64,
    pub segment_id: u64,
    pub control_path: String,
    pub pool_path: String,
    pub geometry: Geometry,
    /// True when the owner resumed the entry named in `Hello::resume`.
    pub resumed: bool,
}

/// Why the owner turned an engine away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    AbiMismatch,
    PermissionDenied,
    TooManyClients,
    BadLayout,
    BadRequest,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OwnerMsg {
    Welcome(Welcome),
    Rejected {
        reason: RejectReason,
        message: String,
    },
    IpcHandle {
        key: String,
        handle: Option<Vec<u8>>,
    },
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_FRAME as usize }>()
}

/// One frame's bytes: length prefix and body.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtoError> {
    let body = bincode::serde::encode_to_vec(msg, config())
        .map_err(|e| ProtoError::Decode(e.to_string()))?;
    let len = u32::try_from(body.len()).map_err(|_| ProtoError::TooLarge(u32::MAX))?;
    if len > MAX_FRAME {
        return Err(ProtoError::TooLarge(len));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Write one frame.
pub fn send<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), ProtoError> {
    w.write_all(&encode(msg)?)?;
    Ok(())
}

/// Take the first complete frame off the front of `buf` (bytes received
/// so far, for a reader that never blocks on its peer). `Ok(None)` while
/// the frame is incomplete; a length over [`MAX_FRAME`] is an error as soon
/// as its four bytes are in.
pub fn take_frame<T: for<'de> Deserialize<'de>>(
    buf: &mut Vec<u8>,
) -> Result<Option<T>, ProtoError> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(len.try_into().expect("4 bytes"));
    if len > MAX_FRAME {
        return Err(ProtoError::TooLarge(len));
    }
    let end = 4 + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    let msg = decode(&buf[4..end]);
    buf.drain(..end);
    msg.map(Some)
}

/// Read one frame; `Err(Closed)` on a clean hang-up between frames.
pub fn recv<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> Result<T, ProtoError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ProtoError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(ProtoError::TooLarge(len));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    decode(&body)
}

/// Decode one frame body (fuzzed).
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ProtoError> {
    let (msg, used) = bincode::serde::decode_from_slice(body, config())
        .map_err(|e| ProtoError::Decode(e.to_string()))?;
    if used != body.len() {
        return Err(ProtoError::Decode(format!(
            "{} trailing bytes",
            body.len() - used
        )));
    }
    Ok(msg)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_reject_oversize() {
        let msg = ClientMsg::Hello(Hello {
            abi_version: 1,
            pid: 42,
            label: "tp0".into(),
            namespace: 9,
            slot_bytes: 2 << 20,
            resume: Some(Resume {
                segment_id: 1,
                client: 3,
                token: 4,
            }),
        });
        let mut buf = Vec::new();
        send(&mut buf, &msg).unwrap();
        let back: ClientMsg = recv(&mut buf.as_slice()).unwrap();
        assert_eq!(back, msg);
        let mut huge = (MAX_FRAME + 1).to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 16]);
        assert!(matches!(
            recv::<ClientMsg>(&mut huge.as_slice()),
            Err(ProtoError::TooLarge(_))
        ));
        assert!(matches!(
            recv::<ClientMsg>(&mut [].as_slice()),
            Err(ProtoError::Closed)
        ));
    }

    #[test]
    fn frames_are_taken_only_when_complete() {
        let a = ClientMsg::FetchIpc { key: "a".into() };
        let b = ClientMsg::Goodbye;
        let mut wire = encode(&a).unwrap();
        wire.extend(encode(&b).unwrap());
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for byte in wire {
            buf.push(byte);
            while let Some(m) = take_frame::<ClientMsg>(&mut buf).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, [a, b]);
        assert!(buf.is_empty());
        let mut huge = (MAX_FRAME + 1).to_le_bytes().to_vec();
        assert!(matches!(
            take_frame::<ClientMsg>(&mut huge),
            Err(ProtoError::TooLarge(_))
        ));
    }
}
