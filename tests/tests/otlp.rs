//! `--metrics-otel-endpoint`: a real owner pushes its metrics to a real
//! OTLP/HTTP receiver, and a collector that is down or hangs never stalls it.
//!
//! The receiver is a small HTTP/1.1 server on 127.0.0.1 that decodes each
//! `POST /v1/metrics` body as an `ExportMetricsServiceRequest` with the
//! `opentelemetry-proto` crate (the messages generated from the
//! OpenTelemetry protocol definitions) and answers as a collector does.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, NumberDataPoint};
use pegaflow_core::Engine;
use pegaflow_tests::{eventually, fill_block, keys, OwnerProc};
use prost::Message;

const NS: u64 = 0x07e1_0001;
const SLOT: u64 = 64 << 10;
const OWNER_ARGS: [&str; 6] = [
    "--pool-size",
    "32mb",
    "--slab-size",
    "2mb",
    "--min-slot-size",
    "64kb",
];

// ------------------------------------------------------------ receiver

/// How the receiver treats a connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Decode and answer 200 with an `ExportMetricsServiceResponse`.
    Collect,
    /// Accept and never answer (a wedged collector).
    Hang,
}

/// A series: metric name and its attributes, sorted.
type Series = (String, BTreeMap<String, String>);

/// One decoded push.
struct Push {
    at: Instant,
    service: Option<String>,
    /// `true` for a monotonic cumulative sum, `false` for a gauge.
    points: BTreeMap<Series, (bool, f64)>,
}

struct Receiver {
    addr: SocketAddr,
    pushes: Arc<Mutex<Vec<Push>>>,
    stop: Arc<AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start(mode: Mode) -> Receiver {
        Self::start_on("127.0.0.1:0".parse().unwrap(), mode)
    }

    fn start_on(addr: SocketAddr, mode: Mode) -> Receiver {
        let listener = TcpListener::bind(addr).expect("bind the OTLP receiver");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let pushes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (pushes.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(AtomicOrdering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        if mode == Mode::Hang {
                            held.push(conn);
                            continue;
                        }
                        let p = p.clone();
                        std::thread::spawn(move || serve(conn, &p));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Receiver {
            addr,
            pushes,
            stop,
            accept: Some(accept),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn count(&self) -> usize {
        self.pushes.lock().unwrap().len()
    }

    /// The first push received after `after`, waiting for it.
    fn push_after(&self, after: Instant, timeout: Duration) -> Push {
        let t = Instant::now();
        loop {
            {
                let mut v = self.pushes.lock().unwrap();
                if let Some(i) = v.iter().position(|p| p.at > after) {
                    return v.swap_remove(i);
                }
            }
            assert!(t.elapsed() < timeout, "no OTLP push after {timeout:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // Closes the listener (and hung connections) before returning, so
        // the port can be bound again.
        self.stop.store(true, AtomicOrdering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Serve the requests of one keep-alive connection.
fn serve(conn: TcpStream, pushes: &Mutex<Vec<Push>>) {
    let mut out = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let request_line = line.trim_end().to_string();
        let mut len = None;
        let mut content_type = String::new();
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let h = line.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').expect("header line");
            match k.to_ascii_lowercase().as_str() {
                "content-length" => len = Some(v.trim().parse::<usize>().unwrap()),
                "content-type" => content_type = v.trim().to_string(),
                "transfer-encoding" => panic!("unexpected transfer-encoding {v}"),
                _ => {}
            }
        }
        assert_eq!(request_line, "POST /v1/metrics HTTP/1.1");
        assert_eq!(content_type, "application/x-protobuf");
        let mut body = vec![0; len.expect("a Content-Length")];
        r.read_exact(&mut body).unwrap();
        let req = ExportMetricsServiceRequest::decode(body.as_slice())
            .expect("an ExportMetricsServiceRequest");
        pushes.lock().unwrap().push(decode(req));
        let answer = ExportMetricsServiceResponse::default().encode_to_vec();
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n\r\n",
            answer.len()
        );
        out.write_all(head.as_bytes()).unwrap();
        out.write_all(&answer).unwrap();
    }
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                other => panic!("attribute {} is not a string: {other:?}", kv.key),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn number(p: &NumberDataPoint) -> f64 {
    match p.value {
        Some(number_data_point::Value::AsInt(v)) => v as f64,
        Some(number_data_point::Value::AsDouble(v)) => v,
        None => panic!("a data point without a value"),
    }
}

fn decode(req: ExportMetricsServiceRequest) -> Push {
    let mut push = Push {
        at: Instant::now(),
        service: None,
        points: BTreeMap::new(),
    };
    for rm in req.resource_metrics {
        let res = attrs(&rm.resource.map(|r| r.attributes).unwrap_or_default());
        push.service = res.get("service.name").cloned();
        for sm in rm.scope_metrics {
            for m in sm.metrics {
                let (sum, points) = match m.data {
                    Some(metric::Data::Sum(s)) => {
                        // Cumulative (2), monotonic: a Prometheus counter.
                        assert!(s.is_monotonic, "{} is a non-monotonic sum", m.name);
                        assert_eq!(s.aggregation_temporality, 2, "{}", m.name);
                        (true, s.data_points)
                    }
                    Some(metric::Data::Gauge(g)) => (false, g.data_points),
                    other => panic!("{}: unexpected data {other:?}", m.name),
                };
                for p in &points {
                    let series = (m.name.clone(), attrs(&p.attributes));
                    let old = push.points.insert(series, (sum, number(p)));
                    assert!(old.is_none(), "{} pushed twice", m.name);
                }
            }
        }
    }
    push
}

// ------------------------------------------------------------ /metrics

fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// A `/metrics` text: every sample, and the names typed `counter`.
struct Scrape {
    samples: BTreeMap<Series, f64>,
    counters: std::collections::BTreeSet<String>,
}

impl Scrape {
    fn get(addr: &str) -> Scrape {
        let (code, text) = http_get(addr, "/metrics");
        assert_eq!(code, 200, "{text}");
        let mut samples = BTreeMap::new();
        let mut counters = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                if kind == "counter" {
                    counters.insert(name.to_string());
                }
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, parse_labels(l.strip_suffix('}').unwrap())),
                None => (series, BTreeMap::new()),
            };
            samples.insert((name.to_string(), labels), value.parse().unwrap());
        }
        Scrape { samples, counters }
    }

    fn value(&self, name: &str) -> f64 {
        self.samples[&(name.to_string(), BTreeMap::new())]
    }
}

/// `a="x",b="y\"z"` as a map (Prometheus escapes: `\\`, `\"`, `\n`).
fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        assert_eq!(chars.next(), Some('"'));
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => {}
                },
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').to_string(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    out
}

/// Where the owner serves `/metrics` (it was given port 0).
fn metrics_addr(owner: &OwnerProc) -> String {
    let t = Instant::now();
    loop {
        let log = owner.log_text();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("serving Prometheus metrics"))
        {
            let addr = line.split("addr=").nth(1).expect("addr= in the log line");
            return addr.split_whitespace().next().unwrap().to_string();
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no metrics line in:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn start_owner(tag: &str, endpoint: &str, period: &str) -> (OwnerProc, String) {
    let mut args = OWNER_ARGS.to_vec();
    args.extend([
        "--metrics-addr",
        "127.0.0.1:0",
        "--metrics-otel-endpoint",
        endpoint,
        "--metrics-period-secs",
        period,
    ]);
    let owner = OwnerProc::start_with(tag, &args);
    let addr = metrics_addr(&owner);
    (owner, addr)
}

fn engine(owner: &OwnerProc) -> Engine {
    let e = Engine::connect(owner.engine_config(NS, SLOT)).unwrap();
    assert!(e.wait_connected(Duration::from_secs(5)));
    e
}

/// Save `n` blocks, then look up `n + miss` of them and load the hits.
fn traffic(e: &Engine, seed: u64, n: u64, miss: u64) -> usize {
    let ks = keys(NS, seed, 0, n + miss);
    let saved = e.save_with(&ks[..n as usize], |i, buf| {
        fill_block(&ks[i], &mut buf[..SLOT as usize]);
        SLOT as usize
    });
    assert_eq!(saved, n as usize);
    let hashes: Vec<[u8; 32]> = ks.iter().map(|k| k.hash).collect();
    // Commits are applied by the owner's loop: wait until all are visible.
    let mut p = e.lookup(NS, &hashes);
    let t = Instant::now();
    while p.len() < n as usize {
        e.release(&p);
        assert!(t.elapsed() < Duration::from_secs(5), "saves not committed");
        std::thread::sleep(Duration::from_millis(5));
        p = e.lookup(NS, &hashes);
    }
    let loaded = e.load_with(&p, |_, _| {});
    e.release(&p);
    loaded
}

// ------------------------------------------------------------ tests

/// Every series `/metrics` serves reaches the receiver with the same value:
/// counters (the ones real traffic moved included) exactly, and gauges that
/// do not move by themselves.
#[test]
fn a_push_carries_what_metrics_serves() {
    let rx = Receiver::start(Mode::Collect);
    let (owner, addr) = start_owner("otlp", &rx.endpoint(), "0.2");
    let e = engine(&owner);
    // Retried lookups (waiting for commits) count too: read the totals back.
    assert_eq!(traffic(&e, 1, 8, 4), 8);

    // Quiet: no engine counter moves any more.
    let quiet = |s: &Scrape| {
        s.value("pegaflow_loaded_blocks_total") == 8.0
            && s.value("pegaflow_block_commits_total") == 8.0
    };
    assert!(eventually(Duration::from_secs(10), || quiet(&Scrape::get(
        &addr
    ))));
    // A name first seen in one push is pushed from the next one on: skip one.
    let first = rx.push_after(Instant::now(), Duration::from_secs(10));
    let push = rx.push_after(first.at, Duration::from_secs(10));
    let scrape = Scrape::get(&addr);
    assert_eq!(push.service.as_deref(), Some("pegaflow-owner"));

    assert_eq!(scrape.value("pegaflow_saved_blocks_total"), 8.0);
    assert_eq!(scrape.value("pegaflow_loaded_blocks_total"), 8.0);
    assert_eq!(scrape.value("pegaflow_load_bytes_total"), (8 * SLOT) as f64);
    assert!(scrape.value("pegaflow_block_misses_total") >= 4.0);
    // (the owner counts an export once the collector's answer is back: the
    // collector may have both pushes a moment before the counter moves)
    assert!(eventually(Duration::from_secs(10), || Scrape::get(&addr)
        .value("pegaflow_otel_exports_total")
        >= 2.0));
    assert_eq!(scrape.value("pegaflow_otel_export_failures_total"), 0.0);

    let pushed: std::collections::BTreeSet<&str> =
        push.points.keys().map(|(n, _)| n.as_str()).collect();
    let served: std::collections::BTreeSet<&str> =
        scrape.samples.keys().map(|(n, _)| n.as_str()).collect();
    assert_eq!(pushed, served, "pushed and served metric names differ");

    // Values that move by themselves between the push and the scrape.
    let moving = [
        "pegaflow_owner_uptime_seconds",
        "pegaflow_owner_loop_lag_seconds",
        "pegaflow_metrics_collect_seconds",
        "pegaflow_otel_exports_total",
    ];
    let mut compared = 0;
    for (series, &v) in &scrape.samples {
        let Some(&(sum, pv)) = push.points.get(series) else {
            panic!("{series:?} is served but was not pushed");
        };
        assert_eq!(
            sum,
            scrape.counters.contains(&series.0),
            "{series:?}: counter on one side, gauge on the other"
        );
        if moving.contains(&series.0.as_str()) {
            continue;
        }
        assert_eq!(pv, v, "{series:?}: pushed {pv}, served {v}");
        compared += 1;
    }
    assert_eq!(push.points.len(), scrape.samples.len());
    assert!(compared > 100, "only {compared} series compared");
    // The engine's own series, labelled as on /metrics.
    let client = push
        .points
        .iter()
        .find(|((n, _), _)| n == "pegaflow_client_loaded_blocks_total")
        .expect("a per-engine series");
    assert_eq!(client.1 .1, 8.0);
    assert_eq!(client.0 .1.get("label").map(String::as_str), Some("test"));
}

/// A collector that refuses connections, then one that never answers: the
/// owner serves engines and `/health` throughout, counts every failed push,
/// logs one warning naming the endpoint and the fix, and says when pushes
/// work again.
#[test]
fn a_dead_or_hung_collector_never_stalls_the_owner() {
    // A port nobody listens on (bound, then closed).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let endpoint = format!("http://{port}");
    // A push waits up to a period (1 s) for an answer: long enough that a
    // push holding up anything else would show below.
    let (owner, addr) = start_owner("otlp-dead", &endpoint, "1");
    let e = engine(&owner);
    let failures = || Scrape::get(&addr).value("pegaflow_otel_export_failures_total");
    assert!(
        eventually(Duration::from_secs(10), || failures() >= 2.0),
        "refused pushes not counted"
    );

    // Now a collector that accepts and never answers.
    let hung = Receiver::start_on(port, Mode::Hang);
    let before = failures();
    let t = Instant::now();
    let mut seed = 10;
    while t.elapsed() < Duration::from_secs(3) {
        let h = Instant::now();
        let (code, body) = http_get(&addr, "/health");
        assert_eq!((code, body.as_str()), (200, "ok\n"));
        assert!(
            h.elapsed() < Duration::from_millis(500),
            "/health took {:?}",
            h.elapsed()
        );
        let op = Instant::now();
        assert_eq!(traffic(&e, seed, 4, 1), 4);
        assert!(
            op.elapsed() < Duration::from_secs(1),
            "engine traffic took {:?}",
            op.elapsed()
        );
        seed += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    // Each hung push times out after the period (1 s) and is counted.
    assert!(
        eventually(Duration::from_secs(5), || failures() >= before + 2.0),
        "hung pushes are not timed out: {} then {}",
        before,
        failures()
    );
    assert_eq!(Scrape::get(&addr).value("pegaflow_otel_exports_total"), 0.0);
    drop(hung);

    // And a working one on the same port: pushes resume.
    let rx = Receiver::start_on(port, Mode::Collect);
    assert!(eventually(Duration::from_secs(10), || rx.count() >= 2));
    assert!(Scrape::get(&addr).value("pegaflow_otel_exports_total") >= 1.0);

    let log = owner.log_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("OTLP metrics push failed"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning per outage:\n{log}");
    assert!(
        warnings[0].contains(&endpoint) && warnings[0].contains("--metrics-otel-endpoint ''"),
        "the warning must name the endpoint and the fix: {}",
        warnings[0]
    );
    assert!(log.contains("OTLP metrics push works again"), "{log}");
}

/// A URL the owner cannot push to is refused at start, saying what to pass.
#[test]
fn an_https_endpoint_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let name = pegaflow_tests::unique_name("otlp-https");
    let out = std::process::Command::new(pegaflow_tests::owner_bin())
        .args(["--name", &name, "--metrics-addr", "", "--pool-size", "8mb"])
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .args(["--metrics-otel-endpoint", "https://collector:4318"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("https is not supported") && err.contains("http://127.0.0.1:4318"),
        "unclear error: {err}"
    );
    assert!(!pegaflow_shm::segment::control_path(&name).exists());
}

/// The push needs no `/metrics` endpoint: with `--metrics-addr ''` the
/// collector still gets every series.
#[test]
fn the_push_works_without_the_metrics_endpoint() {
    let rx = Receiver::start(Mode::Collect);
    let mut args = OWNER_ARGS.to_vec();
    let endpoint = rx.endpoint();
    args.extend([
        "--metrics-addr",
        "",
        "--metrics-otel-endpoint",
        &endpoint,
        "--metrics-period-secs",
        "0.2",
    ]);
    let owner = OwnerProc::start_with("otlp-noaddr", &args);
    let e = engine(&owner);
    assert_eq!(traffic(&e, 3, 2, 0), 2);
    let t = Instant::now();
    let loaded = |p: &Push| {
        p.points
            .get(&("pegaflow_loaded_blocks_total".to_string(), BTreeMap::new()))
            .map(|v| v.1)
    };
    loop {
        let p = rx.push_after(t, Duration::from_secs(10));
        if loaded(&p) == Some(2.0) {
            let running = ("pegaflow_owner_running".to_string(), BTreeMap::new());
            assert_eq!(p.points.get(&running), Some(&(false, 1.0)));
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "loads never pushed");
    }
    assert!(!owner.log_text().contains("serving Prometheus metrics"));
}
