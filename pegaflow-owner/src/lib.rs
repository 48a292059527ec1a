//! The PegaFlow owner daemon as a library: `main.rs` parses flags and calls
//! [`run`]; tests drive the same code.
//!
//! Modules: [`config`] (flags and defaults), [`cache`] (slot classes,
//! allocation, eviction, recovery), [`evict`] (LRU and TinyLFU),
//! [`owner`] (the request loop), [`server`] (the Unix socket),
//! [`prefault`], [`size`].

pub mod cache;
pub mod config;
pub mod evict;
pub mod metrics;
pub mod owner;
pub mod prefault;
pub mod server;
pub mod size;

use std::path::PathBuf;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;

use pegaflow_shm::header::owner_state;
use pegaflow_shm::segment::{
    self, ControlSegment, CreateOptions, Opened, PoolBacking, PoolSegment,
};
use pegaflow_shm::sync::Ordering;
use pegaflow_shm::Geometry;
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
    #[error("--name '{0}' may only contain letters, digits, '-', '_' and '.'")]
    BadName(String),
    #[error("group '{0}' does not exist (--group)")]
    NoSuchGroup(String),
    #[error("cannot listen on {path}: {source}; pass --socket with a writable path")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("metrics endpoint: {0}")]
    Metrics(String),
}

fn mode_and_group(args: &Args) -> Result<(u32, Option<u32>), StartError> {
    match &args.group {
        None => Ok((0o600, None)),
        Some(name) => {
            let g = nix::unistd::Group::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| StartError::NoSuchGroup(name.clone()))?;
            Ok((0o660, Some(g.gid.as_raw())))
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
    let (mode, gid) = mode_and_group(&args)?;
    let metrics_addr = args.metrics_addr().map_err(StartError::Config)?;
    let backing = if args.use_hugepages {
        PoolBacking::Hugetlbfs(match &args.hugepage_dir {
            Some(d) => d.clone(),
            None => segment::find_hugetlbfs()?,
        })
    } else {
        PoolBacking::Shm
    };
    let pool_path = segment::pool_path(&args.name, &backing);
    let pool_dir = pool_path
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(segment::shm_dir);
    let existing_pool = std::fs::metadata(&pool_path)
        .map(|m| m.len())
        .ok()
        .filter(|&n| n > 0);
    let pool_bytes = match (args.pool_size, existing_pool) {
        (Some(n), _) => n,
        // Re-adopting: keep the pool the previous owner made.
        (None, Some(n)) if !args.discard_existing => n,
        _ => {
            let (n, why) = config::default_pool_size(args.use_hugepages, &pool_dir);
            info!("no --pool-size given: using {} ({why})", human(n));
            n
        }
    };
    let slab = args
        .slab_size
        .unwrap_or_else(|| config::default_slab_size(pool_bytes));
    let pool_bytes = pool_bytes / slab * slab;
    if pool_bytes == 0 {
        return Err(StartError::Config(format!(
            "pool size must be at least one slab ({}); raise --pool-size",
            human(slab)
        )));
    }
    let geometry = Geometry::for_pool(
        pool_bytes,
        slab,
        args.min_slot_size,
        u64::from(args.max_clients),
    )?;

    // The index is only worth keeping with the pool it points into.
    let pool_intact = existing_pool == Some(pool_bytes);
    let (seg, opened) = ControlSegment::create_or_adopt(&CreateOptions {
        name: &args.name,
        geometry,
        mode,
        discard_existing: args.discard_existing || !pool_intact,
    })?;
    if opened == Opened::Created && existing_pool.is_some() && !pool_intact {
        tracing::warn!(
            path = %pool_path.display(),
            found = existing_pool.unwrap_or(0),
            requested = pool_bytes,
            "pool file has another size than requested; starting with an empty cache"
        );
    }
    let seg = Arc::new(seg);
    let header = seg.header();
    header
        .owner_state
        .store(owner_state::INITIALISING, Ordering::SeqCst);
    header.owner_pid.store(std::process::id(), Ordering::SeqCst);
    let epoch = header.owner_epoch.fetch_add(1, Ordering::SeqCst) + 1;

    let t = std::time::Instant::now();
    let (pool, pool_opened) = PoolSegment::create_or_adopt(
        &pool_path,
        pool_bytes,
        mode,
        args.use_hugepages,
        opened == Opened::Created || args.discard_existing,
    )?;
    if let Some(g) = gid {
        for p in [seg.path(), pool.path()] {
            let _ = nix::unistd::chown(p, None, Some(nix::unistd::Gid::from_raw(g)));
        }
    }
    seg.set_pool_info(&pool_path, args.use_hugepages);

    let cache = if opened == Opened::Adopted && pool_opened == Opened::Adopted {
        let (cache, _report) = Cache::adopt(seg.clone(), !args.disable_lfu_admission);
        info!(epoch, pool = human(pool_bytes), path = %pool_path.display(), "re-adopted existing segments; committed blocks kept");
        cache
    } else {
        if !args.no_prefault && pool_opened == Opened::Created {
            let page = if args.use_hugepages { 2 << 20 } else { 4096 };
            let threads = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1);
            info!(pool = human(pool_bytes), threads, "prefaulting the pool");
            let d = prefault::prefault(pool.as_ptr(), pool.len(), page, threads);
            info!(
                "prefaulted {} in {:.2} s ({:.1} GB/s)",
                human(pool_bytes),
                d.as_secs_f64(),
                pool_bytes as f64 / d.as_secs_f64().max(1e-9) / 1e9
            );
        }
        Cache::new(seg.clone(), !args.disable_lfu_admission)
    };
    let owner = Arc::new(Owner::new(seg.clone(), pool, cache, epoch));

    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| segment::default_socket_path(&args.name));
    let socket_mode = if gid.is_some() { 0o660 } else { 0o600 };
    let listener = server::bind(&socket, socket_mode).map_err(|source| StartError::Socket {
        path: socket.clone(),
        source,
    })?;
    if let Some(g) = gid {
        let _ = nix::unistd::chown(&socket, None, Some(nix::unistd::Gid::from_raw(g)));
    }
    install_signal_handlers();
    let access = server::Access {
        uid: nix::unistd::geteuid().as_raw(),
        gid,
    };
    info!(
        name = args.name,
        socket = %socket.display(),
        control = %seg.path().display(),
        pool = %pool_path.display(),
        pool_size = human(pool_bytes),
        slab = human(slab),
        slots = geometry.num_slots(),
        max_clients = args.max_clients,
        hugepages = args.use_hugepages,
        lfu_admission = !args.disable_lfu_admission,
        epoch,
        startup_ms = t.elapsed().as_millis() as u64,
        "pegaflow-owner ready"
    );
    if let Some(addr) = metrics_addr {
        metrics::start(addr, owner.clone(), &args.name)?;
    }
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
