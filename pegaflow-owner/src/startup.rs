//! Start-up: what to do with the segments a previous owner left.
//!
//! The caller holds the instance's [`OwnerLock`]. Then, with `F` the control
//! file and `P` the pool file of the name:
//!
//! | found | without `--discard-existing` | with it |
//! |---|---|---|
//! | nothing | create | create |
//! | `F` valid, same geometry and pool path, `P` the inode `F` names | re-adopt (every committed block kept) | drop both, create |
//! | `F` valid, another geometry (`--pool-size`, `--slab-size`, ...) or pool path | **refuse**, saying what was found and asked | drop both, create |
//! | `F` valid, `P` missing, empty, resized or another inode | warn (committed blocks lost, with the count), create | drop both, create |
//! | `F` missing or empty, `P` present | warn (the pool's blocks are lost), create | drop both, create |
//! | `F` unreadable (bad magic, other ABI, truncated) | **refuse** (the message names `--discard-existing`) | drop both, create |
//!
//! "Create" builds both files under temporary names ([`NewFile`]) with their
//! whole size reserved; the caller publishes them (renames them into place)
//! only once the owner is ready to serve, so a start refused on the way
//! leaves no new file behind. The old files are unlinked first, which gives
//! their space back unless an engine still maps them (it then keeps reading
//! its old pages, never another key's bytes).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pegaflow_shm::segment::{
    self, probe_file, ControlSegment, FileState, NewFile, Perms, PoolBacking, PoolSegment,
};
use pegaflow_shm::Geometry;
use tracing::{info, warn};

use crate::config::{self, Args};
use crate::size::human;
use crate::StartError;

/// The segments the owner will serve.
pub struct Segments {
    pub seg: ControlSegment,
    pub pool: PoolSegment,
    /// New files (pool first, then control) to publish once the owner is
    /// ready; empty when the segments were re-adopted.
    pub unpublished: Vec<NewFile>,
}

impl Segments {
    pub fn adopted(&self) -> bool {
        self.unpublished.is_empty()
    }
}

/// Re-adopt, create or refuse, per the table in the module docs.
pub fn open_segments(
    args: &Args,
    perms: Perms,
    backing: &PoolBacking,
) -> Result<Segments, StartError> {
    let ctl_path = segment::control_path(&args.name);
    let pool_path = segment::pool_path(&args.name, backing);
    let ctl_state = probe_file(&ctl_path)?;
    let pool_state = probe_file(&pool_path)?;
    let existing = match ctl_state {
        FileState::Present { .. } => Some(ControlSegment::open(&ctl_path)),
        _ => None,
    };

    if args.discard_existing {
        match &existing {
            Some(Ok(seg)) => {
                let committed = seg.committed_slots();
                warn!(
                    path = %ctl_path.display(),
                    committed_blocks = committed,
                    "--discard-existing: dropping the existing segments and the {committed} \
                     committed blocks they hold"
                )
            }
            Some(Err(e)) => warn!(
                path = %ctl_path.display(),
                "--discard-existing: replacing an unusable control segment ({e})"
            ),
            None if pool_state != FileState::Missing => warn!(
                path = %pool_path.display(),
                "--discard-existing: dropping the existing pool file"
            ),
            None => {}
        }
        drop(existing);
        let geometry = requested_geometry(args, None, &pool_path)?;
        remove_old(&[&ctl_path, &pool_path])?;
        return create(args, perms, &ctl_path, &pool_path, geometry);
    }

    let seg = existing.transpose()?;
    let geometry = requested_geometry(args, seg.as_ref().map(|s| *s.geometry()), &pool_path)?;
    let Some(seg) = seg else {
        match (ctl_state, pool_state) {
            (FileState::Missing, FileState::Missing) => {
                info!(path = %ctl_path.display(), "no segments of this name yet: creating them")
            }
            (_, FileState::Present { len, .. }) => warn!(
                control = %ctl_path.display(),
                pool = %pool_path.display(),
                "the control segment is {} but the pool file ({}) exists: the blocks cached in it \
                 cannot be found without the control segment and are dropped; starting with an \
                 empty cache",
                missing_or_empty(ctl_state),
                human(len)
            ),
            (FileState::Empty, _) => warn!(
                path = %ctl_path.display(),
                "the control segment is empty (0 bytes): a start was cut short or the file was \
                 truncated; whatever it cached is lost; creating new segments"
            ),
            _ => warn!(
                path = %pool_path.display(),
                "the pool file is empty (0 bytes) and there is no control segment; creating new segments"
            ),
        }
        remove_old(&[&ctl_path, &pool_path])?;
        return create(args, perms, &ctl_path, &pool_path, geometry);
    };

    let found = *seg.geometry();
    if found != geometry {
        return Err(StartError::GeometryChanged {
            path: ctl_path,
            changes: describe_changes(&found, &geometry),
            flags: flags_for(&found),
            committed: seg.committed_slots(),
        });
    }
    let recorded = PathBuf::from(seg.header().pool_path());
    if recorded != pool_path {
        return Err(StartError::PoolMoved {
            path: ctl_path,
            recorded,
            asked: pool_path,
            committed: seg.committed_slots(),
        });
    }
    let lost = match pool_state {
        FileState::Missing => Some("is missing".to_string()),
        FileState::Empty => Some("is empty (0 bytes)".to_string()),
        FileState::Present { len, .. } if len != geometry.pool_bytes => Some(format!(
            "is {} instead of the {} the control segment describes",
            human(len),
            human(geometry.pool_bytes)
        )),
        FileState::Present { id, .. } if id != seg.pool_identity() => {
            Some("is not the file the control segment was created with".to_string())
        }
        FileState::Present { .. } => None,
    };
    if let Some(why) = lost {
        let committed = seg.committed_slots();
        warn!(
            pool = %pool_path.display(),
            control = %ctl_path.display(),
            committed_blocks = committed,
            "the pool file {why}: the {committed} committed blocks of the control segment are \
             lost; starting with an empty cache"
        );
        drop(seg);
        remove_old(&[&ctl_path, &pool_path])?;
        return create(args, perms, &ctl_path, &pool_path, geometry);
    }

    seg.take_over(perms)?;
    let pool = PoolSegment::adopt(
        &pool_path,
        geometry.pool_bytes,
        seg.pool_identity(),
        perms,
        args.use_hugepages,
    )?;
    Ok(Segments {
        seg,
        pool,
        unpublished: Vec::new(),
    })
}

fn missing_or_empty(s: FileState) -> &'static str {
    if s == FileState::Empty {
        "empty (0 bytes)"
    } else {
        "missing"
    }
}

/// The geometry this start asks for. Without `--pool-size` or
/// `--slab-size`, re-adoption keeps what the existing segment has.
fn requested_geometry(
    args: &Args,
    existing: Option<Geometry>,
    pool_path: &Path,
) -> Result<Geometry, StartError> {
    let pool_bytes = match (args.pool_size, existing) {
        (Some(n), _) => n,
        (None, Some(g)) => g.pool_bytes,
        (None, None) => {
            let dir = pool_path
                .parent()
                .map(PathBuf::from)
                .unwrap_or_else(segment::shm_dir);
            let (n, why) = config::default_pool_size(args.use_hugepages, &dir);
            info!("no --pool-size given: using {} ({why})", human(n));
            n
        }
    };
    let slab = match (args.slab_size, existing) {
        (Some(s), _) => s,
        (None, Some(g)) => g.slab_bytes,
        (None, None) => config::default_slab_size(pool_bytes),
    };
    let pool_bytes = pool_bytes / slab.max(1) * slab;
    if pool_bytes == 0 {
        return Err(StartError::Config(format!(
            "pool size must be at least one slab ({}); raise --pool-size",
            human(slab)
        )));
    }
    Ok(Geometry::for_pool(
        pool_bytes,
        slab,
        args.min_slot_size,
        u64::from(args.max_clients),
    )?)
}

/// Unlink the files a previous owner left (whoever still maps them keeps
/// their pages).
fn remove_old(paths: &[&Path]) -> Result<(), StartError> {
    for p in paths {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StartError::Io {
                    what: "cannot remove the old segment",
                    path: p.to_path_buf(),
                    source,
                })
            }
        }
    }
    Ok(())
}

fn create(
    args: &Args,
    perms: Perms,
    ctl_path: &Path,
    pool_path: &Path,
    geometry: Geometry,
) -> Result<Segments, StartError> {
    let t = Instant::now();
    let mut last = t;
    let total = geometry.pool_bytes;
    info!(pool = human(total), path = %pool_path.display(), "reserving the pool");
    let (pool, pool_new) =
        PoolSegment::create(pool_path, total, perms, args.use_hugepages, &mut |done| {
            if last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                info!(
                    "reserving the pool: {} of {} ({:.0}%)",
                    human(done),
                    human(total),
                    100.0 * done as f64 / total as f64
                );
            }
        })?;
    info!(
        "reserved {} for the pool in {:.2} s",
        human(total),
        t.elapsed().as_secs_f64()
    );
    let (seg, ctl_new) =
        ControlSegment::create(ctl_path, geometry, perms, &pool, args.use_hugepages)?;
    Ok(Segments {
        seg,
        pool,
        unpublished: vec![pool_new, ctl_new],
    })
}

/// `64mb`, `2gb`, `4096`: a size as the flags take it.
fn flag_size(bytes: u64) -> String {
    for (unit, shift) in [("tb", 40), ("gb", 30), ("mb", 20), ("kb", 10)] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// The flags that ask for `g` again.
fn flags_for(g: &Geometry) -> String {
    format!(
        "--pool-size {} --slab-size {} --min-slot-size {} --max-clients {}",
        flag_size(g.pool_bytes),
        flag_size(g.slab_bytes),
        flag_size(g.granule_bytes),
        g.max_clients
    )
}

/// What differs between the segment's geometry and the asked one.
fn describe_changes(found: &Geometry, asked: &Geometry) -> String {
    let mut out = Vec::new();
    let mut size = |flag: &str, a: u64, b: u64| {
        if a != b {
            out.push(format!(
                "{flag} {} in the segment, {} asked",
                flag_size(a),
                flag_size(b)
            ));
        }
    };
    size("--pool-size", found.pool_bytes, asked.pool_bytes);
    size("--slab-size", found.slab_bytes, asked.slab_bytes);
    size("--min-slot-size", found.granule_bytes, asked.granule_bytes);
    if found.max_clients != asked.max_clients {
        out.push(format!(
            "--max-clients {} in the segment, {} asked",
            found.max_clients, asked.max_clients
        ));
    }
    if out.is_empty() {
        out.push(format!(
            "internal sizes differ (rings, index: another pegaflow version?): {found:?} in the \
             segment, {asked:?} asked"
        ));
    }
    out.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_sizes_parse_back() {
        for b in [64 << 20, 2 << 20, 64 << 10, 3 << 30, 4096, 1 << 40, 12345] {
            assert_eq!(crate::size::parse_size(&flag_size(b)), Ok(b), "{b}");
        }
        assert_eq!(flag_size(64 << 20), "64mb");
    }
}
