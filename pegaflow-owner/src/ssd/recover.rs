//! Rebuilding the SSD index from the segment files after any start: an
//! owner restart, or a reboot that emptied `/dev/shm`.
//!
//! Runs on background threads (one per file at a time, up to
//! [`MAX_THREADS`]), so the owner serves the pool while it runs; each
//! finished file is sent to the request loop, which indexes its records.
//! What is trusted is explained in [`super::segment`]: sealed segments by
//! their record headers, unsealed ones (being written when the owner
//! stopped) by every payload's checksum.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam::channel::Sender;
use tracing::{debug, warn};

use super::segment::{
    payload_checksum, record_bytes, round_up, RecordHeader, SegmentHeader, HEADER_BYTES,
};
use super::uring::{open_segment, AlignedBuf, Done};

pub const MAX_THREADS: usize = 8;

/// One segment file to scan.
#[derive(Clone, Debug)]
pub struct ToScan {
    pub seg: u32,
    pub path: PathBuf,
    pub seq: u64,
    pub direct: bool,
}

/// What one file held.
#[derive(Debug, Default)]
pub struct Recovered {
    pub seg: u32,
    /// Valid records: header and the offset of the record.
    pub records: Vec<(RecordHeader, u64)>,
    /// The segment header did not check: the whole file is unusable.
    pub bad_segment: Option<&'static str>,
    pub sealed: bool,
    /// Records of an unsealed segment whose payload checksum failed.
    pub torn: u64,
    /// The chain ended on a record header that does not check before the
    /// sealed record count was reached (corruption of a sealed segment).
    pub broken_chain: bool,
    /// Where the last valid record ends (the next write would go there).
    pub end: u64,
    pub bytes: u64,
}

/// Scan one segment file.
pub fn scan(t: &ToScan) -> Recovered {
    let mut out = Recovered {
        seg: t.seg,
        ..Default::default()
    };
    let file = match open_segment(&t.path, t.direct) {
        Ok(f) => f,
        Err(e) => {
            warn!(path = %t.path.display(), error = %e, "cannot open an SSD segment for recovery");
            out.bad_segment = Some("cannot open");
            return out;
        }
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut hdr = AlignedBuf::new(HEADER_BYTES as usize);
    if file.read_exact_at(hdr.as_mut_slice(), 0).is_err() {
        out.bad_segment = Some("short file");
        return out;
    }
    let sh = match SegmentHeader::decode(hdr.as_slice()) {
        Ok(h) => h,
        Err(why) => {
            out.bad_segment = Some(why);
            return out;
        }
    };
    if sh.seq != t.seq || sh.bytes != len {
        out.bad_segment = Some("header does not match the file (name or size)");
        return out;
    }
    out.sealed = sh.sealed;
    out.bytes = sh.bytes;
    let mut off = HEADER_BYTES;
    let mut number = 0u32;
    let mut payload = AlignedBuf::new(0);
    while off + HEADER_BYTES <= sh.bytes {
        if sh.sealed && u64::from(number) >= sh.records {
            break;
        }
        if file.read_exact_at(hdr.as_mut_slice(), off).is_err() {
            break;
        }
        let rh = match RecordHeader::decode(hdr.as_slice()) {
            Ok(h) if h.segment_seq == sh.seq && h.number == number => h,
            _ => {
                out.broken_chain = sh.sealed;
                break;
            }
        };
        let size = record_bytes(rh.len);
        if off + size > sh.bytes {
            out.broken_chain = sh.sealed;
            break;
        }
        let ok = if sh.sealed {
            true
        } else {
            let padded = round_up(rh.len) as usize;
            if payload.len() < padded {
                payload = AlignedBuf::new(padded);
            }
            file.read_exact_at(&mut payload.as_mut_slice()[..padded], off + HEADER_BYTES)
                .is_ok()
                && payload_checksum(&payload.as_slice()[..rh.len as usize]) == rh.checksum
        };
        if ok {
            out.records.push((rh, off));
        } else {
            out.torn += 1;
            debug!(path = %t.path.display(), off, "torn record dropped");
        }
        off += size;
        out.end = off;
        number += 1;
    }
    out
}

/// Scan `files` on up to [`MAX_THREADS`] threads, sending each result, then
/// `RecoveryFinished`. Returns at once.
pub fn spawn(
    files: Vec<ToScan>,
    done: Sender<Done>,
    wake: Arc<dyn Fn() + Send + Sync>,
) -> std::io::Result<()> {
    let started = Instant::now();
    let files = Arc::new(files);
    let next = Arc::new(AtomicUsize::new(0));
    let threads = files.len().clamp(1, MAX_THREADS);
    let left = Arc::new(AtomicUsize::new(threads));
    for i in 0..threads {
        let (files, next, done, wake, left) = (
            files.clone(),
            next.clone(),
            done.clone(),
            wake.clone(),
            left.clone(),
        );
        std::thread::Builder::new()
            .name(format!("pegaflow-ssd-recover-{i}"))
            .spawn(move || {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(t) = files.get(k) else { break };
                    let r = scan(t);
                    if done.send(Done::Recovered(r)).is_err() {
                        return;
                    }
                    wake();
                }
                if left.fetch_sub(1, Ordering::AcqRel) == 1 {
                    let _ = done.send(Done::RecoveryFinished {
                        elapsed: started.elapsed(),
                    });
                    wake();
                }
            })?;
    }
    Ok(())
}
