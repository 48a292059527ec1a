//! OTLP metrics push (`--metrics-otel-endpoint`), without an async runtime.
//!
//! The OpenTelemetry SDK's `PeriodicReader` runs its own thread
//! (`OpenTelemetry.Metrics.PeriodicReader`): every `--metrics-period-secs`
//! it collects the instruments and hands them to the OTLP/HTTP exporter,
//! which posts them as protobuf through [`BlockingHttp`] on that same
//! thread. The owner's request loop never takes part.
//!
//! ## The same series as `/metrics`
//!
//! Each series name of a `/metrics` snapshot ([`Collector::collect`]) is one
//! observable instrument; a series `pegaflow_x{a="b"}` is a data point of
//! `pegaflow_x` with attribute `a="b"`, and the value is the same number.
//! Counters are cumulative monotonic sums (integers, or floats for the
//! `*_seconds_total` ones), the rest gauges. The first callback of a
//! collection takes one snapshot, which the others read, so one push is
//! one consistent snapshot, exactly what a scrape at that moment serves.
//!
//! Instruments cannot be created while the SDK collects (callbacks run
//! under its lock): a name first seen in a snapshot (the first engine's
//! `pegaflow_client_*` series) gets its instrument when that snapshot is
//! exported, and is pushed from the next period on.
//!
//! ## A collector that is down or slow
//!
//! A snapshot takes the owner's state lock for at most 1 s, like a scrape;
//! the HTTP post has a timeout (the period, at most [`MAX_TIMEOUT`]). A
//! failed push is not retried (the next one carries the cumulative totals):
//! [`Export`] counts it (`pegaflow_otel_export_failures_total`) and logs the
//! first failure of an outage, with the endpoint and what to check, and its
//! end.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use opentelemetry::metrics::{AsyncInstrument, Meter, MeterProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::Resource;
use tracing::{info, warn};

use crate::metrics::{Collector, Sample, Value};
use crate::owner::Owner;
use crate::StartError;

/// Longest wait for the collector to answer one push.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(10);
/// Where OTLP/HTTP collectors take metrics (appended to an endpoint given
/// without a path).
const METRICS_PATH: &str = "/v1/metrics";

static EXPORTS_OK: AtomicU64 = AtomicU64::new(0);
static EXPORTS_FAILED: AtomicU64 = AtomicU64::new(0);
/// The running pipeline, kept for the life of the process (dropping the
/// provider would stop the reader's thread).
static PROVIDER: OnceLock<SdkMeterProvider> = OnceLock::new();

/// Pushes made since the owner started.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExportCounts {
    /// Accepted by the collector (HTTP 2xx).
    pub ok: u64,
    /// Not delivered: no answer in time, connection refused, HTTP error, or
    /// no snapshot (owner state locked).
    pub failed: u64,
}

/// What `/metrics` reports as `pegaflow_otel_*`.
pub fn export_counts() -> ExportCounts {
    ExportCounts {
        ok: EXPORTS_OK.load(AtomicOrdering::Relaxed),
        failed: EXPORTS_FAILED.load(AtomicOrdering::Relaxed),
    }
}

/// The URL pushes go to, from `--metrics-otel-endpoint`; `None` when it is
/// empty (export off). An endpoint without a path gets `/v1/metrics`, as
/// OTLP/HTTP collectors expect; one with a path is used as given.
pub fn metrics_url(endpoint: &str) -> Result<Option<String>, String> {
    let endpoint = endpoint.trim();
    if endpoint.is_empty() {
        return Ok(None);
    }
    let bad = |why: &str| {
        format!(
            "--metrics-otel-endpoint '{endpoint}': {why} (expected an OTLP/HTTP collector URL \
             such as http://127.0.0.1:4318, or '' to disable the export)"
        )
    };
    let uri: http::Uri = endpoint.parse().map_err(|e| bad(&format!("{e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(bad(
                "https is not supported: the owner pushes plain HTTP; run a collector on this \
                 node (or a sidecar) and let it forward over TLS",
            ))
        }
        _ => return Err(bad("the URL must start with http://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    let base = endpoint.trim_end_matches('/');
    if uri.path() == "/" || uri.path().is_empty() {
        Ok(Some(format!("{base}{METRICS_PATH}")))
    } else {
        Ok(Some(endpoint.to_string()))
    }
}

/// Start pushing to `url` every `period`.
// StartError is the owner's one start-up error type (see `run`).
#[allow(clippy::result_large_err)]
pub fn start(
    url: String,
    period: Duration,
    owner: Arc<Owner>,
    name: &str,
    stall_after: Duration,
) -> Result<(), StartError> {
    let timeout = period.min(MAX_TIMEOUT);
    let transport_error = Arc::new(Mutex::new(None));
    let otlp = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_http_client(BlockingHttp::new(timeout, transport_error.clone()))
        .with_endpoint(url.clone())
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(timeout)
        .with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled())
        .with_temporality(Temporality::Cumulative)
        .build()
        .map_err(|e| StartError::Metrics(format!("--metrics-otel-endpoint {url}: {e}")))?;
    let snapshots = Arc::new(Snapshots {
        state: Mutex::new(SnapshotState {
            collector: Collector::new(owner, name, stall_after),
            points: HashMap::new(),
            fresh: false,
            failed: false,
            known: HashMap::new(),
        }),
        meter: OnceLock::new(),
    });
    let export = Export {
        otlp,
        snapshots: snapshots.clone(),
        url: url.clone(),
        failing: Mutex::new(false),
        transport_error,
    };
    let resource = Resource::builder_empty()
        .with_attributes([
            KeyValue::new("service.name", "pegaflow-owner"),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", instance_id(name)),
            KeyValue::new("pegaflow.name", name.to_string()),
        ])
        .build();
    let provider = SdkMeterProvider::builder()
        .with_reader(
            PeriodicReader::builder(export)
                .with_interval(period)
                .build(),
        )
        .with_resource(resource)
        .build();
    let _ = snapshots.meter.set(provider.meter("pegaflow-owner"));
    // The owner's own series have instruments from the first push on.
    snapshots.register_new();
    PROVIDER
        .set(provider)
        .map_err(|_| StartError::Metrics("the OTLP export was started twice".into()))?;
    info!(
        endpoint = %url,
        period_s = period.as_secs_f64(),
        "pushing metrics over OTLP/HTTP"
    );
    Ok(())
}

/// Host name and instance name: unique per owner in a fleet.
fn instance_id(name: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}/{name}", host.trim())
}

/// The data points of one snapshot, by metric name.
type Points = HashMap<String, Vec<(Vec<KeyValue>, Value)>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Seconds,
    Gauge,
}

impl Kind {
    fn of(v: Value) -> Kind {
        match v {
            Value::Counter(_) => Kind::Counter,
            Value::Seconds(_) => Kind::Seconds,
            Value::Gauge(_) => Kind::Gauge,
        }
    }
}

/// The snapshot the instruments observe, shared by their callbacks (on
/// the reader's thread, during a collection) and [`Export`] (on the same
/// thread, after it).
struct Snapshots {
    state: Mutex<SnapshotState>,
    meter: OnceLock<Meter>,
}

struct SnapshotState {
    collector: Collector,
    points: Points,
    /// `points` belong to the collection in progress (cleared after each
    /// export, so the next collection's first callback takes a new one).
    fresh: bool,
    /// The last snapshot could not be taken (owner state locked).
    failed: bool,
    /// Every name seen, with its kind, and whether it has an instrument.
    known: HashMap<String, (Kind, &'static str, bool)>,
}

impl Snapshots {
    fn lock(&self) -> std::sync::MutexGuard<'_, SnapshotState> {
        // A panic in a callback leaves plain data behind: keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Call `f` with every data point of `name`, taking the collection's
    /// snapshot first if no callback did yet.
    fn each(&self, name: &str, mut f: impl FnMut(Value, &[KeyValue])) {
        let mut st = self.lock();
        if !st.fresh {
            st.take();
        }
        for (attrs, v) in st.points.get(name).into_iter().flatten() {
            f(*v, attrs);
        }
    }

    /// Mark the snapshot used; `Err` when it could not be taken.
    fn finish(&self) -> Result<(), String> {
        let mut st = self.lock();
        if !st.fresh {
            // No callback ran (no instrument yet): snapshot for the names.
            st.take();
        }
        st.fresh = false;
        if st.failed {
            return Err(
                "the owner's state stayed locked for 1 s: the owner is stuck (see \
                        /health and its log); nothing was pushed"
                    .into(),
            );
        }
        Ok(())
    }

    /// Give every name seen so far an instrument; not during a collection.
    fn register_new(self: &Arc<Self>) {
        let Some(meter) = self.meter.get() else {
            return;
        };
        let new: Vec<(String, Kind, &'static str)> = {
            let mut st = self.lock();
            if st.known.is_empty() {
                st.take();
                st.fresh = false;
            }
            st.known
                .iter_mut()
                .filter(|(_, (_, _, made))| !*made)
                .map(|(name, (kind, help, made))| {
                    *made = true;
                    (name.clone(), *kind, *help)
                })
                .collect()
        };
        for (name, kind, help) in new {
            self.instrument(meter, name, kind, help);
        }
    }

    fn instrument(self: &Arc<Self>, meter: &Meter, name: String, kind: Kind, help: &'static str) {
        let snaps = Arc::downgrade(self);
        let key = name.clone();
        let observe = move |f: &mut dyn FnMut(Value, &[KeyValue])| {
            if let Some(s) = snaps.upgrade() {
                s.each(&key, f)
            }
        };
        match kind {
            Kind::Counter => {
                meter
                    .u64_observable_counter(name)
                    .with_description(help)
                    .with_callback(move |o: &dyn AsyncInstrument<u64>| {
                        observe(&mut |v, a| {
                            if let Value::Counter(v) = v {
                                o.observe(v, a)
                            }
                        })
                    })
                    .build();
            }
            Kind::Seconds => {
                meter
                    .f64_observable_counter(name)
                    .with_description(help)
                    .with_callback(move |o: &dyn AsyncInstrument<f64>| {
                        observe(&mut |v, a| {
                            if let Value::Seconds(v) = v {
                                o.observe(v, a)
                            }
                        })
                    })
                    .build();
            }
            Kind::Gauge => {
                meter
                    .f64_observable_gauge(name)
                    .with_description(help)
                    .with_callback(move |o: &dyn AsyncInstrument<f64>| {
                        observe(&mut |v, a| {
                            if let Value::Gauge(v) = v {
                                o.observe(v, a)
                            }
                        })
                    })
                    .build();
            }
        }
    }
}

impl SnapshotState {
    /// Take a snapshot into `points` (empty if the owner's state stayed
    /// locked), recording names not seen before.
    fn take(&mut self) {
        self.fresh = true;
        self.points.clear();
        let Some(samples) = self.collector.collect() else {
            self.failed = true;
            return;
        };
        self.failed = false;
        for Sample {
            name,
            help,
            labels,
            value,
        } in samples
        {
            let kind = Kind::of(value);
            match self.known.get(&name) {
                // One name, one type; a snapshot never breaks it.
                Some(&(k, _, _)) if k != kind => continue,
                Some(_) => {}
                None => {
                    self.known.insert(name.clone(), (kind, help, false));
                }
            }
            let attrs = labels
                .iter()
                .map(|l| KeyValue::new(l.key().to_string(), l.value().to_string()))
                .collect();
            self.points.entry(name).or_default().push((attrs, value));
        }
    }
}

/// The OTLP exporter, counted: what the periodic reader exports through.
struct Export {
    otlp: opentelemetry_otlp::MetricExporter,
    snapshots: Arc<Snapshots>,
    url: String,
    /// The last push failed (its warning was logged).
    failing: Mutex<bool>,
    /// Why the HTTP client's last request failed (the exporter's error
    /// only says "network error").
    transport_error: Arc<Mutex<Option<String>>>,
}

impl Export {
    /// Count the push, and log the first failure of an outage and its end.
    fn account(&self, result: &Result<(), String>) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => {
                EXPORTS_OK.fetch_add(1, AtomicOrdering::Relaxed);
                if std::mem::take(&mut *failing) {
                    info!(endpoint = %self.url, "OTLP metrics push works again");
                }
            }
            Err(e) => {
                EXPORTS_FAILED.fetch_add(1, AtomicOrdering::Relaxed);
                let cause = self
                    .transport_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                let e = match cause {
                    Some(c) => format!("{e}: {c}"),
                    None => e.clone(),
                };
                if !std::mem::replace(&mut *failing, true) {
                    warn!(
                        endpoint = %self.url,
                        error = %e,
                        "OTLP metrics push failed; the owner serves on and tries again every \
                         period (logged again only once it works). Check that an OpenTelemetry \
                         collector listens there with its OTLP/HTTP receiver (port 4318 by \
                         default), or start the owner with --metrics-otel-endpoint '' to turn \
                         the push off; failures count in pegaflow_otel_export_failures_total"
                    );
                }
            }
        }
    }
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export").field("url", &self.url).finish()
    }
}

impl PushMetricExporter for Export {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let mut result = self.snapshots.finish();
        if result.is_ok() {
            result = self.otlp.export(metrics).await.map_err(|e| e.to_string());
        }
        self.account(&result);
        // Outside the collection: new names get their instruments now.
        self.snapshots.register_new();
        result.map_err(OTelSdkError::InternalFailure)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.otlp.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.otlp.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        Temporality::Cumulative
    }
}

/// A blocking HTTP/1.1 client for the exporter: `send_bytes` does its I/O
/// on the calling thread (the export thread, which `block_on`s it) and is
/// done when it returns, so no executor or reactor is needed.
#[derive(Debug)]
struct BlockingHttp {
    agent: ureq::Agent,
    last_error: Arc<Mutex<Option<String>>>,
}

/// Most bytes of a collector's answer read (it is a small protobuf).
const MAX_RESPONSE: u64 = 1 << 20;

impl BlockingHttp {
    fn new(timeout: Duration, last_error: Arc<Mutex<Option<String>>>) -> BlockingHttp {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            // The exporter looks at the status itself.
            .http_status_as_error(false)
            // A node-local collector; an HTTP_PROXY meant for the internet
            // must not capture it.
            .proxy(None)
            .build()
            .new_agent();
        BlockingHttp { agent, last_error }
    }

    fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, ureq::Error> {
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(parts, body.to_vec());
        let mut response = self.agent.run(request)?;
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE)
            .read_to_vec()?;
        let (parts, _) = response.into_parts();
        Ok(Response::from_parts(parts, Bytes::from(body)))
    }
}

#[async_trait::async_trait]
impl HttpClient for BlockingHttp {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        self.send(request).map_err(|e| {
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
            e.into()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_without_a_path_gets_the_otlp_metrics_path() {
        assert_eq!(metrics_url("").unwrap(), None);
        assert_eq!(metrics_url("  ").unwrap(), None);
        for (given, url) in [
            ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/metrics"),
            ("http://127.0.0.1:4318/", "http://127.0.0.1:4318/v1/metrics"),
            (
                "http://collector:4318/custom/path",
                "http://collector:4318/custom/path",
            ),
        ] {
            assert_eq!(metrics_url(given).unwrap().as_deref(), Some(url), "{given}");
        }
    }

    #[test]
    fn bad_endpoints_say_what_to_pass() {
        for (given, says) in [
            ("https://c:4318", "https is not supported"),
            ("127.0.0.1:4318", "must start with http://"),
            ("grpc://c:4317", "must start with http://"),
            ("http://", "--metrics-otel-endpoint"),
            ("http://a b", "--metrics-otel-endpoint"),
        ] {
            let e = metrics_url(given).unwrap_err();
            assert!(
                e.contains(says) && e.contains("http://127.0.0.1:4318"),
                "{given}: {e}"
            );
        }
    }
}
