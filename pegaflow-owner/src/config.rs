//! Command-line flags of `pegaflow-owner` and the defaults derived from the
//! machine.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::size::{human, parse_size};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The PegaFlow owner: keeps LLM KV-cache blocks in a shared host-memory pool
/// for every engine on this node, across engine restarts.
///
/// Engines (vLLM with the PegaKVConnector, or any pegaflow-core client)
/// connect to its Unix socket once, then look up, pin, save and load blocks
/// through shared memory without further round trips. The pool and index
/// live in named shared-memory segments, so restarting the owner keeps every
/// committed block.
#[derive(Parser, Debug, Clone)]
#[command(name = "pegaflow-owner", version, about, long_about)]
pub struct Args {
    /// Instance name: selects the segments (/dev/shm/pegaflow-NAME.ctl and
    /// .pool), the owner lock (.lock) and the default socket. Engines must
    /// use the same name.
    #[arg(long, default_value = "default", env = "PEGAFLOW_NAME")]
    pub name: String,

    /// Unix socket engines connect to. Default: /run/pegaflow/NAME.sock
    /// when /run/pegaflow exists or when root, else /tmp/pegaflow/NAME.sock.
    /// Refused when another owner listens on it, when it is not a socket,
    /// or when its directory belongs to another user or is writable by
    /// others without the sticky bit.
    #[arg(long, env = "PEGAFLOW_SOCKET")]
    pub socket: Option<PathBuf>,

    /// KV pool size, e.g. 30gb, 512mb (units kb, mb, gb, tb; binary).
    /// Default: the existing segment's size when re-adopting, else a quarter
    /// of the machine's memory, at most half of the free space in /dev/shm
    /// (or of the free huge pages with --use-hugepages). Another size than
    /// the existing segment's is refused unless --discard-existing is given.
    #[arg(long, value_parser = parse_size)]
    pub pool_size: Option<u64>,

    /// Put the pool on a hugetlbfs mount (2 MiB pages): about 10x faster
    /// start-up and engine registration for large pools. Needs huge pages
    /// reserved (echo N > /proc/sys/vm/nr_hugepages) and a hugetlbfs mount.
    #[arg(long)]
    pub use_hugepages: bool,

    /// hugetlbfs mount to use with --use-hugepages (default: the first
    /// 2 MiB hugetlbfs mount in /proc/mounts).
    #[arg(long, requires = "use_hugepages")]
    pub hugepage_dir: Option<PathBuf>,

    /// Most engines connected at once (each TP rank and each scheduler is
    /// one engine).
    #[arg(long, default_value_t = 64)]
    pub max_clients: u32,

    /// Plain LRU: admit every saved block even when the pool is full,
    /// instead of TinyLFU admission (which keeps one-off prompts from
    /// flushing popular prefixes).
    #[arg(long)]
    pub disable_lfu_admission: bool,

    /// Slab size (multiple of 2 MiB). A slab is cut into slots of one block
    /// size; a block must fit in one slab. Default: the existing segment's
    /// when re-adopting, else pool/256, between 32 MiB and 256 MiB (at most
    /// pool/16 for small pools).
    #[arg(long, value_parser = parse_size)]
    pub slab_size: Option<u64>,

    /// Smallest slot; smaller blocks are padded to it (multiple of 4 KiB).
    /// Smaller values allow more slots at the cost of a larger slot table.
    #[arg(long, value_parser = parse_size, default_value = "256kb")]
    pub min_slot_size: u64,

    /// Let members of this group connect and map the segments (mode 0660,
    /// set explicitly whatever the umask); by default only the owner's user
    /// (and root) may (mode 0600).
    #[arg(long)]
    pub group: Option<String>,

    /// Do not touch every page of a new pool at start (its space is still
    /// reserved up front); see docs/operations.md for the trade-off.
    #[arg(long)]
    pub no_prefault: bool,

    /// Throw away existing segments of this name and create new files
    /// instead of re-adopting them (needed after an ABI or geometry change;
    /// drops the cache; engines still mapping the old files keep their old
    /// bytes until they reconnect).
    #[arg(long)]
    pub discard_existing: bool,

    /// SSD tier: a directory on an SSD for blocks evicted from the pool
    /// (and popular ones written ahead of eviction), kept across owner
    /// restarts and reboots. Repeat the flag or give a comma list for
    /// several devices: blocks are spread over them. The owner makes a
    /// `pegaflow-NAME` directory in each. Default: no SSD tier.
    #[arg(long = "ssd-cache-path", value_delimiter = ',')]
    pub ssd_cache_path: Vec<PathBuf>,

    /// Total bytes the SSD tier may use, split evenly over the paths; a
    /// path's share is clamped (with a warning) to what its filesystem can
    /// hold. When full, the oldest segment of a path is evicted.
    #[arg(long, value_parser = parse_size, default_value = "512gb")]
    pub ssd_cache_capacity: u64,

    /// Pending write batches per SSD path (as in the original PegaFlow):
    /// up to this many 64 MiB batches of blocks leaving the pool are
    /// copied and queued, and this many blocks are written at once. A
    /// block leaving the pool beyond that is dropped (counted), never
    /// waited for.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub ssd_write_queue_depth: u32,

    /// Block reads (stages back into the pool) in flight per SSD path;
    /// more are queued by the owner.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub ssd_prefetch_queue_depth: u32,

    /// Size of the SSD tier's segment files (the unit of its FIFO
    /// eviction). Default: an eighth of a path's capacity, between 16 MiB
    /// and 256 MiB.
    #[arg(long, value_parser = parse_size)]
    pub ssd_segment_size: Option<u64>,

    /// Serve Prometheus /metrics and /health here; empty disables.
    #[arg(long, default_value = "127.0.0.1:9091")]
    pub metrics_addr: String,

    /// Also push the metrics /metrics serves to an OpenTelemetry collector,
    /// over OTLP/HTTP (protobuf), every --metrics-period-secs: e.g.
    /// http://127.0.0.1:4318 (/v1/metrics is appended to a URL without a
    /// path). Plain http:// only: a collector on this node or a sidecar.
    /// Empty (the default) disables it: /metrics already serves every series
    /// to a Prometheus scrape, and a push to a collector nobody runs would
    /// only fail every period. An unreachable collector never slows the
    /// owner: failures are counted and logged once.
    #[arg(long, default_value = "")]
    pub metrics_otel_endpoint: String,

    /// Seconds between two OTLP pushes (with --metrics-otel-endpoint; at
    /// least 0.1); a push waits at most this long (and at most 10 s) for
    /// the collector.
    #[arg(long, default_value_t = 5.0, value_parser = parse_period)]
    pub metrics_period_secs: f64,

    /// /health answers 503 (and pegaflow_owner_running is 0) when the
    /// owner's request loop has not gone round for this many seconds (it
    /// does at least every 100 ms when healthy).
    #[arg(long, default_value_t = 5.0, value_parser = parse_secs)]
    pub health_stall_secs: f64,

    /// Log level: trace, debug, info, warn, error (RUST_LOG overrides).
    #[arg(long, default_value = "info")]
    pub log_level: String,

    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    pub log_format: String,
}

impl Args {
    /// The SSD tier's settings; `None` when no `--ssd-cache-path` is given.
    pub fn ssd_config(&self) -> Option<crate::ssd::SsdConfig> {
        (!self.ssd_cache_path.is_empty()).then(|| crate::ssd::SsdConfig {
            paths: self.ssd_cache_path.clone(),
            capacity: self.ssd_cache_capacity,
            write_depth: self.ssd_write_queue_depth,
            read_depth: self.ssd_prefetch_queue_depth,
            segment_bytes: self.ssd_segment_size.map_or(0, |s| s.div_ceil(4096) * 4096),
        })
    }

    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, String> {
        if self.metrics_addr.trim().is_empty() {
            return Ok(None);
        }
        self.metrics_addr.parse().map(Some).map_err(|e| {
            format!(
                "--metrics-addr '{}': {e} (expected HOST:PORT, or empty to disable)",
                self.metrics_addr
            )
        })
    }
}

impl Args {
    /// Where OTLP pushes go; `None` when `--metrics-otel-endpoint` is empty.
    pub fn metrics_otel_url(&self) -> Result<Option<String>, String> {
        crate::otel::metrics_url(&self.metrics_otel_endpoint)
    }
}

fn parse_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("'{s}' is not a positive number of seconds")),
    }
}

/// An OTLP push period: at least 0.1 s (each push is a full snapshot).
fn parse_period(s: &str) -> Result<f64, String> {
    let v = parse_secs(s)?;
    if v < 0.1 {
        return Err(format!(
            "'{s}': pushes are full snapshots; push at most every 0.1 s"
        ));
    }
    Ok(v)
}

fn meminfo(key: &str) -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn statvfs_free(path: &std::path::Path) -> Option<u64> {
    nix::sys::statvfs::statvfs(path)
        .ok()
        .map(|s| s.blocks_available() * s.fragment_size())
}

/// The default pool size, and why.
pub fn default_pool_size(hugepages: bool, dir: &std::path::Path) -> (u64, String) {
    let total = meminfo("MemTotal:").unwrap_or(4 * GIB);
    let quarter = total / 4;
    let (cap, what) = if hugepages {
        let free = pegaflow_shm::segment::free_hugepages() * 2 * MIB;
        (free, "free huge pages")
    } else {
        (
            statvfs_free(dir).unwrap_or(quarter * 2) / 2,
            "half the free space in /dev/shm",
        )
    };
    let size = quarter.min(cap);
    let why = format!(
        "a quarter of memory ({}) capped at {what} ({})",
        human(quarter),
        human(cap)
    );
    (size, why)
}

/// Slab size for a pool when not given.
pub fn default_slab_size(pool: u64) -> u64 {
    // Small pools still get a few slabs, so several block sizes fit.
    let s = (pool / 256)
        .clamp(32 * MIB, 256 * MIB)
        .min((pool / 16).max(2 * MIB));
    (s / (2 * MIB)).max(1) * 2 * MIB
}
