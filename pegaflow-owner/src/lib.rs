//! The PegaFlow owner daemon as a library: `main.rs` parses flags and calls
//! [`run`]; tests drive the same code.
//!
//! Modules: [`config`] (flags and defaults), [`cache`] (slot classes,
//! allocation, eviction, recovery), [`evict`] (LRU and TinyLFU),
//! [`owner`] (the request loop), [`server`] (the Unix socket),
//! [`startup`] (re-adopt, create or refuse the segments), [`ssd`] (the
//! SSD tier behind the pool), [`metrics`] (Prometheus `/metrics` and
//! `/health`), [`otel`] (the same metrics pushed over OTLP), [`prefault`],
//! [`size`].

pub mod cache;
pub mod config;
pub mod evict;
pub mod metrics;
pub mod otel;
pub mod owner;
pub mod prefault;
pub mod server;
pub mod size;
pub mod ssd;
pub mod startup;

use std::path::PathBuf;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;

use pegaflow_shm::header::owner_state;
use pegaflow_shm::segment::{self, OwnerLock, Perms, PoolBacking};
use pegaflow_shm::sync::Ordering;
use tracing::info;

use crate::cache::Cache;
use crate::config::Args;
use crate::owner::{Owner, SHUTDOWN};
use crate::size::human;

/// Everything that can stop the owner from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Segment(#[from] pegaflow_shm::SegmentError),
    #[error(transparent)]
    Geometry(#[from] pegaflow_shm::GeometryError),
    #[error(transparent)]
    Socket(#[from] server::BindError),
    #[error("--name '{0}' may only contain letters, digits, '-', '_' and '.'")]
    BadName(String),
    #[error("group '{0}' does not exist (--group)")]
    NoSuchGroup(String),
    #[error(
        "{path} holds a cache of {committed} committed blocks made with other settings \
         ({changes}). To keep it, start with the old settings: {flags}. To drop those \
         {committed} blocks and start with an empty cache of the new size, add --discard-existing"
    )]
    GeometryChanged {
        path: PathBuf,
        changes: String,
        flags: String,
        committed: u64,
    },
    #[error(
        "{path} was created with its pool at {recorded}, but this start puts the pool at {asked} \
         (--use-hugepages, --hugepage-dir or PEGAFLOW_SHM_DIR changed?). To keep its {committed} \
         committed blocks, start with the old settings; to drop them, add --discard-existing"
    )]
    PoolMoved {
        path: PathBuf,
        recorded: PathBuf,
        asked: PathBuf,
        committed: u64,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("metrics endpoint: {0}")]
    Metrics(String),
    #[error(transparent)]
    Ssd(#[from] ssd::SsdError),
}

/// Mode and group of every file the owner makes: 0600, or 0660 and the
/// `--group` group.
fn perms(args: &Args) -> Result<Perms, StartError> {
    match &args.group {
        None => Ok(Perms::PRIVATE),
        Some(name) => {
            let g = nix::unistd::Group::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| StartError::NoSuchGroup(name.clone()))?;
            Ok(Perms {
                mode: 0o660,
                gid: Some(g.gid.as_raw()),
            })
        }
    }
}

/// Files this start created; removed if the start fails after all, so a
/// refused start leaves nothing behind (files it found are never touched).
#[derive(Default)]
struct Created {
    paths: Vec<PathBuf>,
}

impl Created {
    fn keep(&mut self) {
        self.paths.clear();
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Start the owner and serve until SIGINT/SIGTERM.
pub fn run(args: Args) -> Result<(), StartError> {
    if args.name.is_empty()
        || !args
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(StartError::BadName(args.name.clone()));
    }
    let perms = perms(&args)?;
    let metrics_addr = args.metrics_addr().map_err(StartError::Config)?;
    let otel_url = args.metrics_otel_url().map_err(StartError::Config)?;
    let backing = if args.use_hugepages {
        PoolBacking::Hugetlbfs(match &args.hugepage_dir {
            Some(d) => d.clone(),
            None => segment::find_hugetlbfs()?,
        })
    } else {
        PoolBacking::Shm
    };
    let t = std::time::Instant::now();
    // Held until run() returns; the kernel drops it if we die.
    let _lock = OwnerLock::acquire(&args.name, perms)?;
    for p in segment::remove_unpublished(&args.name, &backing) {
        info!(path = %p.display(), "removed a temporary file of a start that did not finish");
    }
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| segment::default_socket_path(&args.name));
    // Before any segment is touched: a refused socket changes nothing.
    server::check_socket_path(&socket)?;

    let segs = startup::open_segments(&args, perms, &backing)?;
    let adopted = segs.adopted();
    let pool_path = segs.pool.path().to_path_buf();
    let geometry = *segs.seg.geometry();
    let seg = Arc::new(segs.seg);
    let header = seg.header();
    header
        .owner_state
        .store(owner_state::INITIALISING, Ordering::SeqCst);
    header.owner_pid.store(std::process::id(), Ordering::SeqCst);
    header.set_owner_version(env!("CARGO_PKG_VERSION"));
    let epoch = header.owner_epoch.fetch_add(1, Ordering::SeqCst) + 1;

    let cache = if adopted {
        let (cache, _report) = Cache::adopt(seg.clone(), !args.disable_lfu_admission);
        info!(epoch, pool = human(geometry.pool_bytes), path = %pool_path.display(), "re-adopted existing segments; committed blocks kept");
        cache
    } else {
        if !args.no_prefault {
            let page = if args.use_hugepages { 2 << 20 } else { 4096 };
            let threads = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1);
            info!(
                pool = human(geometry.pool_bytes),
                threads, "prefaulting the pool"
            );
            let d = prefault::prefault(segs.pool.as_ptr(), segs.pool.len(), page, threads);
            info!(
                "prefaulted {} in {:.2} s ({:.1} GB/s)",
                human(geometry.pool_bytes),
                d.as_secs_f64(),
                geometry.pool_bytes as f64 / d.as_secs_f64().max(1e-9) / 1e9
            );
        }
        Cache::new(seg.clone(), !args.disable_lfu_admission)
    };
    let mut cache = cache;
    if let Some(cfg) = args.ssd_config() {
        let bell_seg = seg.clone();
        let wake: ssd::Wake = Arc::new(move || {
            let h = bell_seg.header();
            pegaflow_shm::doorbell::Doorbell {
                word: &h.doorbell,
                sleeping: &h.owner_sleeping,
            }
            .ring();
        });
        let tier = ssd::Tier::start(
            cfg,
            &args.name,
            seg.clone(),
            segs.pool.as_ptr(),
            segs.pool.len(),
            wake,
        )?;
        cache.attach_ssd(tier);
    } else {
        // No tier: engines must not see a previous run's membership.
        seg.ssd_set().clear();
    }
    let owner = Arc::new(Owner::new(seg.clone(), segs.pool, cache, epoch));

    // From here on, what this start makes is removed again if it fails.
    let mut created = Created::default();
    for f in segs.unpublished {
        created.paths.push(f.publish()?);
    }
    let listener = server::bind(&socket, perms.mode, perms.gid)?;
    created.paths.push(socket.clone());
    install_signal_handlers();
    let access = server::Access {
        uid: nix::unistd::geteuid().as_raw(),
        gid: perms.gid,
    };
    info!(
        name = args.name,
        socket = %socket.display(),
        control = %seg.path().display(),
        pool = %pool_path.display(),
        pool_size = human(geometry.pool_bytes),
        slab = human(geometry.slab_bytes),
        slots = geometry.num_slots(),
        max_clients = args.max_clients,
        hugepages = args.use_hugepages,
        lfu_admission = !args.disable_lfu_admission,
        epoch,
        startup_ms = t.elapsed().as_millis() as u64,
        "pegaflow-owner ready"
    );
    let stall = std::time::Duration::from_secs_f64(args.health_stall_secs);
    if let Some(addr) = metrics_addr {
        metrics::start(addr, owner.clone(), &args.name, stall)?;
    }
    if let Some(url) = otel_url {
        let period = std::time::Duration::from_secs_f64(args.metrics_period_secs);
        otel::start(url, period, owner.clone(), &args.name, stall)?;
    }
    created.keep();
    let srv = server::Server::new(owner.clone(), listener, socket, access);
    let server_thread = std::thread::Builder::new()
        .name("pegaflow-socket".into())
        .spawn(move || srv.run())
        .map_err(|e| StartError::Config(format!("cannot start the socket thread: {e}")))?;
    owner.run();
    let _ = server_thread.join();
    Ok(())
}

extern "C" fn on_signal(_: libc::c_int) {
    SHUTDOWN.store(true, AtomicOrdering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; sigaction with a zeroed mask is valid.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}
