//! Prometheus `/metrics` and `/health` on `--metrics-addr`, without an async
//! runtime.
//!
//! One thread (`pegaflow-metrics`) owns a `std::net::TcpListener` and a
//! [`Collector`]. Every scrape takes a snapshot of the owner's state (cache
//! stats and occupancy under the state lock, then the slot table and the
//! client table read straight from shm) as a list of [`Sample`]s
//! ([`Collector::collect`]), fills a fresh `metrics-exporter-prometheus`
//! recorder with it and renders it. A fresh recorder per scrape means the
//! output is exactly the snapshot: the series of an engine that left are
//! gone, with no idle timeouts to tune. The OTLP push (`crate::otel`) sends
//! the same snapshots.
//!
//! ## Engine counters and departed engines
//!
//! Engines count their own lookups, hits, saves and loads in their client
//! entry (`pegaflow_shm::client`). When the owner reclaims an entry it adds
//! its counters to `CacheStats::retired_engine` before clearing it, under
//! the state lock; a scrape reads that sum and the live entries under the
//! same lock, so node totals (`pegaflow_block_hits_total` and friends) are
//! exact and never go down while the owner runs.
//!
//! ## A stuck owner
//!
//! `/health` needs no lock: it compares the request loop's heartbeat with
//! `--health-stall-secs`. A scrape waits at most [`LOCK_WAIT`] for the
//! owner's state lock and answers 503 if it cannot get it, so a wedged
//! owner never wedges this thread (and `/health` behind it).
//!
//! The `metrics` crate's counters are integers, while the engines' save and
//! load times are fractional seconds: those few are recorded as gauges and
//! re-typed as counters in the exposition (Prometheus counters may be
//! floats), so `rate()` treats them as counters.
//!
//! Every metric is listed, with its meaning, in docs/operations.md.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{Key, KeyName, Label, Level, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::PrometheusBuilder;
use pegaflow_shm::client::{
    client_state, EngineCounter, OwnerCounter, ENGINE_COUNTERS, OWNER_COUNTERS,
};
use pegaflow_shm::header::owner_state;
use pegaflow_shm::slot_table::SlotKind;
use pegaflow_shm::sync::Ordering;
use tracing::{debug, info, warn};

use crate::owner::{Owner, SHUTDOWN};
use crate::StartError;

/// How often the serving thread wakes up without a request (to see shutdown).
const WAKE_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for the owner's state lock in a scrape.
const LOCK_WAIT: Duration = Duration::from_secs(1);
/// Namespaces given their own `pegaflow_namespace_*` series; blocks of
/// others are summed under `namespace="other"`.
const MAX_NAMESPACE_SERIES: usize = 64;
/// A scraper that sends nothing for this long is dropped.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest request head accepted.
const MAX_REQUEST: usize = 8 << 10;

static META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, None);

/// Every engine counter, in ABI order; the array length makes the compiler
/// check that none is forgotten when the ABI grows one.
const ENGINE: [EngineCounter; ENGINE_COUNTERS] = [
    EngineCounter::Lookups,
    EngineCounter::LookupBlocks,
    EngineCounter::HitBlocks,
    EngineCounter::MissBlocks,
    EngineCounter::SaveBlocks,
    EngineCounter::SaveBytes,
    EngineCounter::SaveNanos,
    EngineCounter::SaveDroppedBlocks,
    EngineCounter::SaveSkippedBlocks,
    EngineCounter::LoadBlocks,
    EngineCounter::LoadBytes,
    EngineCounter::LoadNanos,
    EngineCounter::TouchDropped,
    EngineCounter::CommitRingFull,
    EngineCounter::StageBlocks,
];

const OWNER: [OwnerCounter; OWNER_COUNTERS] = [
    OwnerCounter::Commits,
    OwnerCounter::CommitDuplicates,
    OwnerCounter::AdmissionRejects,
    OwnerCounter::Aborts,
    OwnerCounter::BadRequests,
    OwnerCounter::SlotsStashed,
    OwnerCounter::StagesDone,
    OwnerCounter::StagedBlocks,
];

/// How an engine counter is exported: name after `pegaflow_` (node total)
/// or `pegaflow_client_` (per engine), help text, and whether it counts
/// nanoseconds (exported as seconds).
fn engine_metric(c: EngineCounter) -> (&'static str, &'static str, bool) {
    use EngineCounter::*;
    match c {
        Lookups => ("lookups_total", "Lookups (prefix queries) run by engines.", false),
        LookupBlocks => ("lookup_blocks_total", "Blocks asked for by lookups.", false),
        HitBlocks => (
            "block_hits_total",
            "Blocks found and pinned by lookups (leading hits of each prefix).",
            false,
        ),
        MissBlocks => (
            "block_misses_total",
            "Blocks asked for but not served: the first miss of a prefix and every block after it.",
            false,
        ),
        SaveBlocks => (
            "saved_blocks_total",
            "Blocks engines wrote into the pool and queued for commit.",
            false,
        ),
        SaveBytes => ("save_bytes_total", "Bytes engines wrote into the pool.", false),
        SaveNanos => (
            "save_seconds_total",
            "Time engines spent copying blocks into the pool.",
            true,
        ),
        SaveDroppedBlocks => (
            "saves_dropped_total",
            "Blocks not saved because the engine's stash of free slots was empty (pool under pressure).",
            false,
        ),
        SaveSkippedBlocks => (
            "saves_skipped_total",
            "Blocks not saved because the owner was unreachable.",
            false,
        ),
        LoadBlocks => ("loaded_blocks_total", "Blocks engines copied out of the pool.", false),
        LoadBytes => ("load_bytes_total", "Bytes engines copied out of the pool.", false),
        LoadNanos => (
            "load_seconds_total",
            "Time engines spent copying blocks out of the pool.",
            true,
        ),
        TouchDropped => (
            "touches_dropped_total",
            "Hit notifications dropped because the request ring was full (recency is then stale).",
            false,
        ),
        CommitRingFull => (
            "commits_ring_full_total",
            "Commits an engine could not queue because its request ring was full (the block is not cached).",
            false,
        ),
        StageBlocks => (
            "stage_requests_total",
            "Blocks engines asked the owner to stage back from the SSD tier.",
            false,
        ),
    }
}

fn owner_metric(c: OwnerCounter) -> (&'static str, &'static str) {
    use OwnerCounter::*;
    match c {
        Commits => (
            "commits_total",
            "Blocks of this engine the owner published in the index.",
        ),
        CommitDuplicates => (
            "commit_duplicates_total",
            "Commits of this engine for a key already cached (slot freed).",
        ),
        AdmissionRejects => (
            "admission_rejections_total",
            "Commits of this engine refused by TinyLFU admission.",
        ),
        Aborts => (
            "aborts_total",
            "Reserved slots this engine gave back unused.",
        ),
        BadRequests => (
            "bad_requests_total",
            "Malformed or out-of-range requests from this engine (ignored).",
        ),
        SlotsStashed => (
            "slots_stashed_total",
            "Free slots the owner put in this engine's stash.",
        ),
        StagesDone => (
            "stages_done_total",
            "Stage requests of this engine the owner finished (staged or not).",
        ),
        StagedBlocks => (
            "staged_blocks_total",
            "Blocks the owner staged from SSD into the pool for this engine.",
        ),
    }
}

/// The running endpoint.
pub struct MetricsServer {
    local_addr: SocketAddr,
}

impl MetricsServer {
    /// Where it listens (the real port when `--metrics-addr` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

/// Bind `addr` and serve `/metrics` and `/health` from a background thread
/// until shutdown.
// StartError is the owner's one start-up error type (see `run`).
#[allow(clippy::result_large_err)]
pub fn start(
    addr: SocketAddr,
    owner: Arc<Owner>,
    name: &str,
    stall_after: Duration,
) -> Result<MetricsServer, StartError> {
    let listener = TcpListener::bind(addr).map_err(|e| {
        StartError::Metrics(format!(
            "cannot listen on {addr}: {e}; pass another --metrics-addr HOST:PORT, \
             or --metrics-addr '' to disable the endpoint"
        ))
    })?;
    let local_addr = listener.local_addr().unwrap_or(addr);
    let mut collector = Collector::new(owner, name, stall_after);
    std::thread::Builder::new()
        .name("pegaflow-metrics".into())
        .spawn(move || serve(listener, &mut collector))
        .map_err(|e| StartError::Metrics(format!("cannot start the metrics thread: {e}")))?;
    info!(addr = %local_addr, "serving Prometheus metrics at /metrics and /health");
    Ok(MetricsServer { local_addr })
}

fn serve(listener: TcpListener, collector: &mut Collector) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    while !SHUTDOWN.load(AtomicOrdering::Relaxed) {
        let ready = {
            let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(WAKE_EVERY.as_millis() as u16))
                .map(|n| n > 0)
                .unwrap_or(false)
        };
        if ready {
            match listener.accept() {
                Ok((stream, peer)) => {
                    if let Err(e) = handle(stream, collector) {
                        debug!(%peer, error = %e, "metrics request failed");
                    }
                }
                Err(e) => {
                    warn!(error = %e, "metrics endpoint: accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

fn handle(mut stream: TcpStream, collector: &mut Collector) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return respond(
                &mut stream,
                431,
                "text/plain",
                "request head too large\n",
                true,
            );
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let body_wanted = method == "GET";
    if method != "GET" && method != "HEAD" {
        return respond(&mut stream, 405, "text/plain", "only GET and HEAD\n", true);
    }
    match path {
        "/metrics" => match collector.render() {
            Some(text) => respond(
                &mut stream,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &text,
                body_wanted,
            ),
            None => respond(
                &mut stream,
                503,
                "text/plain",
                &format!(
                    "the owner's state stayed locked for {} s: the owner is stuck; see /health \
                     and its log, and restart it\n",
                    LOCK_WAIT.as_secs()
                ),
                body_wanted,
            ),
        },
        "/health" => {
            let (code, text) = collector.health();
            respond(&mut stream, code, "text/plain", &text, body_wanted)
        }
        _ => respond(
            &mut stream,
            404,
            "text/plain",
            "not found: try /metrics or /health\n",
            body_wanted,
        ),
    }
}

fn respond(
    stream: &mut TcpStream,
    code: u16,
    content_type: &str,
    body: &str,
    with_body: bool,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if with_body {
        out.push_str(body);
    }
    stream.write_all(out.as_bytes())?;
    stream.flush()
}

/// One client entry as read from shm.
struct ClientSample {
    index: u32,
    state: u32,
    pid: u32,
    label: String,
    namespace: u64,
    engine: [u64; ENGINE_COUNTERS],
    owner: [u64; OWNER_COUNTERS],
    requests: u64,
    request_cap: u64,
    stash: u64,
    stash_target: u64,
    pinned_slots: u64,
}

/// Reads the owner's state into Prometheus metrics.
pub struct Collector {
    owner: Arc<Owner>,
    name: String,
    stall_after: Duration,
}

impl Collector {
    pub fn new(owner: Arc<Owner>, name: &str, stall_after: Duration) -> Collector {
        Collector {
            owner,
            name: name.to_string(),
            stall_after,
        }
    }

    /// `/health`: 200 while this process's owner loop serves the segment
    /// and went round within the stall threshold.
    pub fn health(&self) -> (u16, String) {
        let h = self.owner.segment().header();
        let state = h.owner_state.load(Ordering::SeqCst);
        let pid = h.owner_pid.load(Ordering::SeqCst);
        if state != owner_state::RUNNING || pid != std::process::id() {
            let what = match state {
                owner_state::INITIALISING => "initialising",
                owner_state::STOPPED => "stopped",
                owner_state::RUNNING => "running under another pid",
                _ => "not started",
            };
            return (503, format!("owner loop not running: {what} (pid {pid})\n"));
        }
        let lag = self.owner.loop_lag();
        if lag > self.stall_after {
            return (
                503,
                format!(
                    "owner loop stalled: no progress for {:.1} s (--health-stall-secs {}); \
                     engines' commits and stash refills wait. Look at the owner's log and \
                     stack (gdb -p {pid}), then restart it\n",
                    lag.as_secs_f64(),
                    self.stall_after.as_secs_f64()
                ),
            );
        }
        (200, "ok\n".into())
    }

    /// Every used client entry; call with the owner's state locked, so no
    /// entry is reclaimed (its counters moved to the retired sum) half-way.
    fn read_clients(&self) -> Vec<ClientSample> {
        let seg = self.owner.segment();
        let mut out = Vec::new();
        for i in 0..seg.max_clients() {
            let Some(c) = seg.client(i) else { continue };
            let e = c.entry;
            let state = e.state();
            if state == client_state::FREE {
                continue;
            }
            let mut engine = [0u64; ENGINE_COUNTERS];
            for (v, &k) in engine.iter_mut().zip(&ENGINE) {
                *v = e.engine(k);
            }
            let mut owner = [0u64; OWNER_COUNTERS];
            for (v, &k) in owner.iter_mut().zip(&OWNER) {
                *v = e.owner(k);
            }
            out.push(ClientSample {
                index: i,
                state,
                pid: e.pid.load(Ordering::Relaxed),
                label: e.label(),
                namespace: e.namespace.load(Ordering::Relaxed),
                engine,
                owner,
                requests: c.requests.len(),
                request_cap: c.requests.capacity(),
                stash: c.stash.len(),
                stash_target: u64::from(e.stash_target.load(Ordering::Relaxed)),
                pinned_slots: 0,
            });
        }
        out
    }

    /// Pins of each sampled client (a pass over its pin counters, without
    /// the owner's lock).
    fn count_pins(&self, clients: &mut [ClientSample]) {
        let seg = self.owner.segment();
        for c in clients {
            if let Some(v) = seg.client(c.index) {
                c.pinned_slots = v
                    .pins
                    .iter()
                    .filter(|p| p.load(Ordering::Relaxed) != 0)
                    .count() as u64;
            }
        }
    }

    /// The Prometheus text exposition of the current state.
    /// `None` when the owner's state stayed locked for [`LOCK_WAIT`].
    pub fn render(&mut self) -> Option<String> {
        self.collect().map(|samples| prometheus_text(&samples))
    }

    /// Every series of the current state, as `/metrics` serves them and
    /// OTLP pushes them. `None` when the owner's state stayed locked for
    /// [`LOCK_WAIT`].
    pub fn collect(&mut self) -> Option<Vec<Sample>> {
        let started = Instant::now();
        let (stats, occ, ssd, mut clients) = self.owner.try_with_cache(LOCK_WAIT, |c| {
            (
                c.stats.clone(),
                c.occupancy(),
                c.ssd.as_ref().map(|t| t.stats()),
                self.read_clients(),
            )
        })?;
        self.count_pins(&mut clients);
        let seg = self.owner.segment().clone();
        let g = *seg.geometry();
        let header = seg.header();

        let mut m = Emit::default();

        // Owner.
        let epoch = self.owner.epoch();
        m.gauge(
            "pegaflow_owner_info",
            "Constant 1, labelled with the owner's version, ABI version and instance name.",
            vec![
                Label::new("version", env!("CARGO_PKG_VERSION")),
                Label::new("abi_version", pegaflow_shm::ABI_VERSION.to_string()),
                Label::new("name", self.name.clone()),
            ],
            1.0,
        );
        m.gauge(
            "pegaflow_owner_epoch",
            "Owner generation on these segments: 1 for the first owner, +1 per restart.",
            vec![],
            epoch as f64,
        );
        m.counter(
            "pegaflow_owner_restarts_total",
            "Owner starts that re-adopted or re-created these segments after the first (epoch - 1).",
            vec![],
            epoch.saturating_sub(1),
        );
        m.gauge(
            "pegaflow_owner_uptime_seconds",
            "Seconds since this owner process started serving.",
            vec![],
            self.owner.started.elapsed().as_secs_f64(),
        );
        m.gauge(
            "pegaflow_owner_running",
            "1 while the owner's request loop runs (what /health reports).",
            vec![],
            if self.health().0 == 200 { 1.0 } else { 0.0 },
        );

        // Pool.
        m.gauge(
            "pegaflow_pool_capacity_bytes",
            "Bytes of KV data the pool holds (--pool-size rounded down to whole slabs).",
            vec![],
            g.pool_bytes as f64,
        );
        m.gauge(
            "pegaflow_pool_used_bytes",
            "Bytes of committed blocks (block size x committed slots).",
            vec![],
            occ.committed_bytes as f64,
        );
        m.gauge(
            "pegaflow_pool_assigned_bytes",
            "Bytes of slabs cut into slots of some block size.",
            vec![],
            (occ.assigned_slabs * g.slab_bytes) as f64,
        );
        m.gauge(
            "pegaflow_pool_slab_bytes",
            "Bytes per slab (--slab-size).",
            vec![],
            g.slab_bytes as f64,
        );
        for (state, n) in [("assigned", occ.assigned_slabs), ("free", occ.free_slabs)] {
            m.gauge(
                "pegaflow_pool_slabs",
                "Slabs by state: assigned to a block size, or still free.",
                vec![Label::new("state", state)],
                n as f64,
            );
        }
        m.gauge(
            "pegaflow_pool_block_sizes",
            "Distinct block sizes (slot classes) the pool serves.",
            vec![],
            occ.classes as f64,
        );
        m.gauge(
            "pegaflow_pool_hugepages",
            "1 when the pool is on hugetlbfs (--use-hugepages).",
            vec![],
            f64::from(header.hugepages),
        );
        m.gauge(
            "pegaflow_owner_loop_lag_seconds",
            "Seconds since the owner's request loop last went round (at most 0.1 when healthy).",
            vec![],
            self.owner.loop_lag().as_secs_f64(),
        );
        let (slots, namespaces) = slot_states(&seg);
        for (state, n) in [
            ("free", slots[0]),
            ("writing", slots[1]),
            ("committed", slots[2]),
            ("evicting", slots[3]),
            ("invalid", slots[4]),
        ] {
            m.gauge(
                "pegaflow_slots",
                "Slots of assigned slabs by state, read from the slot table.",
                vec![Label::new("state", state)],
                n as f64,
            );
        }
        for (ns, (blocks, bytes)) in &namespaces {
            let label = || vec![Label::new("namespace", ns.clone())];
            m.gauge(
                "pegaflow_namespace_blocks",
                "Committed blocks of this namespace (model, layout, TP rank) in the pool.",
                label(),
                *blocks as f64,
            );
            m.gauge(
                "pegaflow_namespace_bytes",
                "Bytes of the committed blocks of this namespace.",
                label(),
                *bytes as f64,
            );
        }
        // Every namespace with blocks or evictions, so rate() sees the first.
        let mut evictions: std::collections::BTreeMap<String, u64> = namespaces
            .iter()
            .map(|(label, _)| (label.clone(), 0))
            .collect();
        for (ns, n) in &stats.namespace_evictions {
            *evictions.entry(namespace_label(*ns)).or_default() += n;
        }
        for (label, n) in evictions {
            m.counter_owned(
                "pegaflow_namespace_block_evictions_total".into(),
                "Committed blocks of this namespace evicted to make room (owner).",
                vec![Label::new("namespace", label)],
                n,
            );
        }
        m.gauge(
            "pegaflow_free_list_slots",
            "Free slots in the owner's free lists (not yet handed to any stash).",
            vec![],
            occ.free_slots as f64,
        );

        // Cache (owner side; reset when the owner restarts).
        for (name, help, v) in [
            (
                "pegaflow_block_commits_total",
                "Blocks published in the index (insertions).",
                stats.commits,
            ),
            (
                "pegaflow_block_commit_duplicates_total",
                "Commits for a key already cached; the new copy was freed.",
                stats.duplicates,
            ),
            (
                "pegaflow_admission_rejections_total",
                "Commits refused by TinyLFU admission while the pool was full.",
                stats.admission_rejects,
            ),
            (
                "pegaflow_block_evictions_total",
                "Committed blocks evicted to make room.",
                stats.evictions,
            ),
            (
                "pegaflow_eviction_pinned_skips_total",
                "Eviction candidates skipped because an engine had them pinned.",
                stats.evict_pinned_skips,
            ),
            (
                "pegaflow_bad_requests_total",
                "Malformed or out-of-range requests from engines (ignored).",
                stats.bad_requests,
            ),
            (
                "pegaflow_reclaimed_slots_total",
                "Slots freed from engines that disconnected or died while writing them.",
                stats.reclaimed_slots,
            ),
            (
                "pegaflow_reclaimed_clients_total",
                "Client entries reclaimed after their engine disconnected or died.",
                stats.reclaimed_clients,
            ),
            (
                "pegaflow_stash_starved_total",
                "Stash refills that found no free or evictable slot (pool full of pinned blocks).",
                stats.stash_starved,
            ),
        ] {
            m.counter(name, help, vec![], v);
        }

        // All zero without a tier, so dashboards need no special case.
        ssd_metrics(&mut m, &ssd.unwrap_or_default());

        // Engine counters: node totals (retired + live), then per client.
        let mut totals = stats.retired_engine;
        for c in &clients {
            for (t, v) in totals.iter_mut().zip(c.engine) {
                *t = t.wrapping_add(v);
            }
        }
        for (&k, &v) in ENGINE.iter().zip(&totals) {
            let (suffix, help, nanos) = engine_metric(k);
            m.engine(&format!("pegaflow_{suffix}"), help, vec![], v, nanos);
        }

        // Clients.
        let live = clients
            .iter()
            .filter(|c| c.state == client_state::LIVE)
            .count();
        let orphaned = clients
            .iter()
            .filter(|c| c.state == client_state::ORPHANED)
            .count();
        let quarantined = clients
            .iter()
            .filter(|c| c.state == client_state::QUARANTINED)
            .count();
        m.gauge(
            "pegaflow_connected_clients",
            "Engines connected to the owner now.",
            vec![],
            live as f64,
        );
        for (state, n) in [
            ("live", live),
            ("orphaned", orphaned),
            ("quarantined", quarantined),
        ] {
            m.gauge(
                "pegaflow_clients",
                "Client entries by state; orphaned: alive engines of a previous owner not yet reconnected; \
                 quarantined: engines disconnected without a goodbye whose process may still run (their \
                 pins and writing slots are kept until it exits).",
                vec![Label::new("state", state)],
                n as f64,
            );
        }
        m.gauge(
            "pegaflow_max_clients",
            "Client entries available (--max-clients).",
            vec![],
            g.max_clients as f64,
        );
        for c in &clients {
            let labels = || {
                vec![
                    Label::new("client", c.index.to_string()),
                    Label::new("pid", c.pid.to_string()),
                    Label::new("label", c.label.clone()),
                ]
            };
            let mut info = labels();
            info.push(Label::new(
                "state",
                match c.state {
                    client_state::LIVE => "live",
                    client_state::ORPHANED => "orphaned",
                    _ => "quarantined",
                },
            ));
            info.push(Label::new("namespace", format!("{:#018x}", c.namespace)));
            m.gauge(
                "pegaflow_client_info",
                "Constant 1 per client entry, with its state and namespace.",
                info,
                1.0,
            );
            for (&k, &v) in ENGINE.iter().zip(&c.engine) {
                let (suffix, help, nanos) = engine_metric(k);
                m.engine(
                    &format!("pegaflow_client_{suffix}"),
                    help,
                    labels(),
                    v,
                    nanos,
                );
            }
            for (&k, &v) in OWNER.iter().zip(&c.owner) {
                let (suffix, help) = owner_metric(k);
                m.counter_owned(format!("pegaflow_client_{suffix}"), help, labels(), v);
            }
            for (name, help, v) in [
                (
                    "pegaflow_client_request_ring_entries",
                    "Requests queued in the engine's request ring, not yet applied by the owner.",
                    c.requests,
                ),
                (
                    "pegaflow_client_request_ring_capacity_entries",
                    "Capacity of the engine's request ring.",
                    c.request_cap,
                ),
                (
                    "pegaflow_client_stash_slots",
                    "Free slots waiting in the engine's stash.",
                    c.stash,
                ),
                (
                    "pegaflow_client_stash_target_slots",
                    "Free slots the owner tries to keep in the engine's stash.",
                    c.stash_target,
                ),
                (
                    "pegaflow_client_pinned_slots",
                    "Slots the engine holds pinned now.",
                    c.pinned_slots,
                ),
            ] {
                m.gauge(name, help, labels(), v as f64);
            }
        }
        let otlp = crate::otel::export_counts();
        m.counter(
            "pegaflow_otel_exports_total",
            "OTLP pushes the collector accepted (--metrics-otel-endpoint; 0 when off).",
            vec![],
            otlp.ok,
        );
        m.counter(
            "pegaflow_otel_export_failures_total",
            "OTLP pushes that failed: collector unreachable, too slow or refusing (not retried; the next push carries the totals).",
            vec![],
            otlp.failed,
        );
        m.gauge(
            "pegaflow_metrics_collect_seconds",
            "Time this scrape took to collect.",
            vec![],
            started.elapsed().as_secs_f64(),
        );
        Some(m.samples)
    }
}

/// The SSD tier's counters and gauges (docs/operations.md, "SSD tier").
fn ssd_metrics(m: &mut Emit, s: &crate::ssd::SsdStats) {
    for (name, help, v) in [
        ("pegaflow_ssd_written_blocks_total", "Blocks written to the SSD tier.", s.written_blocks),
        ("pegaflow_ssd_written_bytes_total", "Bytes of blocks written to the SSD tier.", s.written_bytes),
        (
            "pegaflow_ssd_write_behind_blocks_total",
            "Blocks queued for writing while still in the pool (written ahead of their eviction).",
            s.write_behind_blocks,
        ),
        ("pegaflow_ssd_staged_blocks_total", "Blocks read back from SSD into the pool.", s.staged_blocks),
        ("pegaflow_ssd_staged_bytes_total", "Bytes read back from SSD into the pool.", s.staged_bytes),
        ("pegaflow_ssd_stage_requests_total", "Stage requests engines sent.", s.stage_requests),
        (
            "pegaflow_ssd_checksum_failures_total",
            "Blocks read back whose key or checksum did not match (dropped, never loaded).",
            s.checksum_failures,
        ),
        ("pegaflow_ssd_read_errors_total", "SSD reads that failed with an I/O error.", s.read_errors),
        ("pegaflow_ssd_write_errors_total", "SSD writes that failed with an I/O error.", s.write_errors),
        ("pegaflow_ssd_evicted_segments_total", "Segments evicted (FIFO) to make room.", s.evicted_segments),
        ("pegaflow_ssd_evicted_blocks_total", "Blocks evicted from the SSD tier with their segment.", s.evicted_blocks),
        (
            "pegaflow_ssd_membership_full_total",
            "Blocks on SSD the membership set in shm had no room for (engines do not see them).",
            s.membership_full,
        ),
        ("pegaflow_ssd_recovered_blocks_total", "Blocks found on disk at start and indexed again.", s.recovered_blocks),
        (
            "pegaflow_ssd_recovery_dropped_total",
            "Records dropped at recovery: torn writes (checksum) in segments being written when the owner stopped.",
            s.recovery_torn,
        ),
        (
            "pegaflow_ssd_recovery_bad_segments_total",
            "Segment files dropped at recovery because their header did not check.",
            s.recovery_bad_segments,
        ),
    ] {
        m.counter(name, help, vec![], v);
    }
    for (reason, v) in [
        ("queue_full", s.dropped_queue_full),
        ("not_admitted", s.dropped_not_admitted),
        ("disk_full", s.dropped_disk_full),
        ("too_large", s.dropped_too_large),
    ] {
        m.counter(
            "pegaflow_ssd_write_dropped_total",
            "Blocks leaving the pool that were not written to SSD, by reason.",
            vec![Label::new("reason", reason)],
            v,
        );
    }
    for (reason, v) in [
        ("in_pool", s.stage_in_pool),
        ("not_on_ssd", s.stage_not_on_ssd),
        ("no_slot", s.stage_no_slot),
        ("queue_full", s.stage_queue_full),
        ("gone", s.stage_gone),
    ] {
        m.counter(
            "pegaflow_ssd_stage_skipped_total",
            "Stage requests not served from SSD, by reason.",
            vec![Label::new("reason", reason)],
            v,
        );
    }
    for (name, help, v) in [
        (
            "pegaflow_ssd_blocks",
            "Blocks the SSD tier holds.",
            s.blocks as f64,
        ),
        (
            "pegaflow_ssd_bytes_on_disk",
            "Bytes of segment files on disk.",
            s.bytes_on_disk as f64,
        ),
        (
            "pegaflow_ssd_capacity_bytes",
            "Bytes the tier may use (after clamping to the filesystems).",
            s.capacity_bytes as f64,
        ),
        ("pegaflow_ssd_segments", "Segment files.", s.segments as f64),
        (
            "pegaflow_ssd_paths",
            "SSD paths (--ssd-cache-path).",
            s.paths as f64,
        ),
        (
            "pegaflow_ssd_direct_io",
            "1 when every path uses O_DIRECT (0: buffered fallback).",
            f64::from(u8::from(s.direct_io)),
        ),
        (
            "pegaflow_ssd_recovering",
            "1 while the SSD index is being recovered in the background.",
            f64::from(u8::from(s.recovering)),
        ),
        (
            "pegaflow_ssd_recovery_seconds",
            "Time the last recovery of the SSD index took.",
            s.recovery_seconds,
        ),
    ] {
        m.gauge(name, help, vec![], v);
    }
}

/// A namespace as a label value (0 stands for every namespace beyond
/// [`MAX_NAMESPACE_SERIES`]).
fn namespace_label(ns: u64) -> String {
    if ns == 0 {
        "other".into()
    } else {
        format!("{ns:#018x}")
    }
}

/// Committed blocks and bytes per namespace label, the most populous first
/// [`MAX_NAMESPACE_SERIES`] on their own, the rest as `other`.
type NamespaceUse = Vec<(String, (u64, u64))>;

/// Counts of slots of assigned slabs by kind (free, writing, committed,
/// evicting, and words no owner writes), and committed blocks and bytes
/// per namespace.
fn slot_states(seg: &pegaflow_shm::segment::ControlSegment) -> ([u64; 5], NamespaceUse) {
    let mut n = [0u64; 5];
    let mut per_ns: std::collections::HashMap<u64, (u64, u64)> = Default::default();
    let per = seg.geometry().slots_per_slab() as usize;
    let slots = seg.slots();
    for (s, slab) in seg.slabs().iter().enumerate() {
        if slab.stride.load(Ordering::Acquire) == 0 {
            continue;
        }
        let count = (slab.nslots.load(Ordering::Relaxed) as usize).min(per);
        let first = s * per;
        for e in slots.iter().skip(first).take(count) {
            let i = match e.load_state().map(|st| st.kind) {
                Some(SlotKind::Free) => 0,
                Some(SlotKind::Writing) => 1,
                Some(SlotKind::Committed) => {
                    let u = per_ns
                        .entry(e.namespace.load(Ordering::Relaxed))
                        .or_default();
                    u.0 += 1;
                    u.1 += e.len.load(Ordering::Relaxed);
                    2
                }
                Some(SlotKind::Evicting) => 3,
                None => 4,
            };
            n[i] += 1;
        }
    }
    let mut v: Vec<(u64, (u64, u64))> = per_ns.into_iter().collect();
    v.sort_unstable_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(&b.0)));
    let mut out: NamespaceUse = Vec::new();
    let mut other = (0, 0);
    for (i, (ns, u)) in v.into_iter().enumerate() {
        if i < MAX_NAMESPACE_SERIES && ns != 0 {
            out.push((namespace_label(ns), u));
        } else {
            other.0 += u.0;
            other.1 += u.1;
        }
    }
    if other.0 > 0 {
        out.push(("other".into(), other));
    }
    (n, out)
}

/// Mark gauges carrying cumulative seconds as counters in the exposition.
fn retype_counters(mut text: String, names: &[String]) -> String {
    for name in names {
        let from = format!("# TYPE {name} gauge\n");
        let to = format!("# TYPE {name} counter\n");
        text = text.replacen(&from, &to, 1);
    }
    text
}

/// One series of a snapshot.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub help: &'static str,
    pub labels: Vec<Label>,
    pub value: Value,
}

/// A sample's type and value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// A count that only goes up (while the owner, or the engine, runs).
    Counter(u64),
    /// Cumulative seconds: a counter that is not an integer.
    Seconds(f64),
    Gauge(f64),
}

/// The Prometheus text exposition (format 0.0.4) of a snapshot.
pub fn prometheus_text(samples: &[Sample]) -> String {
    // The `metrics` crate's counters are integers: cumulative seconds go in
    // as gauges and are re-typed in the text.
    let rec = PrometheusBuilder::new().build_recorder();
    let mut retype: Vec<String> = Vec::new();
    for s in samples {
        let key = Key::from_parts(KeyName::from(s.name.clone()), s.labels.clone());
        let name = KeyName::from(s.name.clone());
        let help = SharedString::const_str(s.help);
        match s.value {
            Value::Counter(v) => {
                rec.describe_counter(name, None, help);
                rec.register_counter(&key, &META).absolute(v);
            }
            Value::Seconds(v) | Value::Gauge(v) => {
                rec.describe_gauge(name, None, help);
                rec.register_gauge(&key, &META).set(v);
                if matches!(s.value, Value::Seconds(_)) && !retype.contains(&s.name) {
                    retype.push(s.name.clone());
                }
            }
        }
    }
    retype_counters(rec.handle().render(), &retype)
}

/// Collects the samples of one snapshot.
#[derive(Default)]
struct Emit {
    samples: Vec<Sample>,
}

impl Emit {
    fn push(&mut self, name: String, help: &'static str, labels: Vec<Label>, value: Value) {
        self.samples.push(Sample {
            name,
            help,
            labels,
            value,
        });
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, labels: Vec<Label>, v: f64) {
        self.push(name.to_string(), help, labels, Value::Gauge(v));
    }

    fn counter(&mut self, name: &'static str, help: &'static str, labels: Vec<Label>, v: u64) {
        self.counter_owned(name.to_string(), help, labels, v);
    }

    fn counter_owned(&mut self, name: String, help: &'static str, labels: Vec<Label>, v: u64) {
        self.push(name, help, labels, Value::Counter(v));
    }

    /// An engine counter: integer counter, or nanoseconds as seconds.
    fn engine(&mut self, name: &str, help: &'static str, labels: Vec<Label>, v: u64, nanos: bool) {
        let value = if nanos {
            Value::Seconds(v as f64 / 1e9)
        } else {
            Value::Counter(v)
        };
        self.push(name.to_string(), help, labels, value);
    }
}

/// The value of `name` with exactly these labels (in this order) in a
/// `/metrics` text, if present; for tests and tools.
pub fn find_sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want = String::new();
    if !labels.is_empty() {
        want.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                want.push(',');
            }
            let _ = write!(want, "{k}=\"{v}\"");
        }
        want.push('}');
    }
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let rest = rest.strip_prefix(want.as_str())?;
        let value = rest.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_engine_counter_has_a_distinct_unit_suffixed_name() {
        let mut names: Vec<_> = ENGINE.iter().map(|&c| engine_metric(c).0).collect();
        for (i, &c) in ENGINE.iter().enumerate() {
            assert_eq!(c as usize, i, "ENGINE must list counters in ABI order");
        }
        for n in &names {
            assert!(n.ends_with("_total"), "{n}");
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ENGINE_COUNTERS);
        for (i, &c) in OWNER.iter().enumerate() {
            assert_eq!(c as usize, i);
            assert!(owner_metric(c).0.ends_with("_total"));
        }
    }

    #[test]
    fn seconds_gauges_render_as_counters_and_labels_are_escaped() {
        let mut m = Emit::default();
        m.engine(
            "pegaflow_save_seconds_total",
            "t",
            vec![Label::new("label", "a\"b")],
            1_500_000_000,
            true,
        );
        m.counter("pegaflow_block_hits_total", "h", vec![], 7);
        let text = prometheus_text(&m.samples);
        assert!(
            text.contains("# TYPE pegaflow_save_seconds_total counter\n"),
            "{text}"
        );
        assert!(!text.contains("gauge"), "{text}");
        assert_eq!(
            find_sample(&text, "pegaflow_save_seconds_total", &[("label", "a\\\"b")]),
            Some(1.5),
            "{text}"
        );
        assert_eq!(
            find_sample(&text, "pegaflow_block_hits_total", &[]),
            Some(7.0)
        );
        assert_eq!(find_sample(&text, "pegaflow_block_hits", &[]), None);
    }
}
