//! The owner's Prometheus endpoint, scraped over real HTTP from a real owner
//! process while real engines (pegaflow-core) drive traffic.

mod ops_support;

use std::time::{Duration, Instant};

use ops_support::*;

const NS: u64 = 0x00a1_1ce0_0000_0001;
const LEN: usize = 60_000;

fn get(text: &str, name: &str) -> f64 {
    sample(text, name, &[]).unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
}

fn get_l(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, name, labels).unwrap_or_else(|| panic!("{name}{labels:?} missing from:\n{text}"))
}

#[test]
fn scrape_matches_engine_traffic() {
    let owner = OwnerProc::start("scrape");
    let pid = std::process::id().to_string();
    let a_labels = [("client", "0"), ("pid", pid.as_str()), ("label", "ops-a")];

    let a = owner.engine("ops-a", NS, SLOT_BYTES);
    let saved_keys = keys(NS, 0..40);
    assert_eq!(save_all(&owner, &a, "ops-a", &saved_keys, LEN), 40);
    owner.scrape_until("40 commits", |t| {
        sample(t, "pegaflow_block_commits_total", &[]) == Some(40.0)
    });

    // 40 hits then 10 misses; then a prefix of 5 misses.
    let mut hashes: Vec<[u8; 32]> = (0..40).map(hash).collect();
    hashes.extend((100..110).map(hash));
    let pinned = a.lookup(NS, &hashes);
    assert_eq!(pinned.len(), 40);
    let mut loaded = 0;
    a.load_with(&pinned, |i, bytes| {
        assert_eq!(bytes.len(), LEN);
        assert!(bytes.iter().all(|&b| b == i as u8), "block {i} content");
        loaded += 1;
    });
    assert_eq!(loaded, 40);
    let none = a.lookup(NS, &(200..205).map(hash).collect::<Vec<_>>());
    assert!(none.is_empty());

    // While the 40 blocks are pinned, the scrape shows it.
    let t = owner.scrape();
    assert_eq!(get_l(&t, "pegaflow_client_pinned_slots", &a_labels), 40.0);

    a.release(&pinned);

    // A second, lookup-only engine.
    let b = owner.engine("ops-b", 0, 0);
    let pb = b.lookup(NS, &(0..10).map(hash).collect::<Vec<_>>());
    assert_eq!(pb.len(), 10);
    b.release(&pb);

    let t = owner.scrape_until("request rings drained", |t| {
        sample(t, "pegaflow_client_request_ring_entries", &a_labels) == Some(0.0)
    });
    let slot_bytes = SLOT_BYTES as f64;
    for (name, want) in [
        ("pegaflow_block_commits_total", 40.0),
        ("pegaflow_saved_blocks_total", 40.0),
        ("pegaflow_save_bytes_total", (40 * LEN) as f64),
        ("pegaflow_block_hits_total", 50.0),
        ("pegaflow_block_misses_total", 15.0),
        ("pegaflow_lookups_total", 3.0),
        ("pegaflow_lookup_blocks_total", 65.0),
        ("pegaflow_loaded_blocks_total", 40.0),
        ("pegaflow_load_bytes_total", (40 * LEN) as f64),
        ("pegaflow_saves_dropped_total", 0.0),
        ("pegaflow_bad_requests_total", 0.0),
        ("pegaflow_block_evictions_total", 0.0),
        ("pegaflow_admission_rejections_total", 0.0),
        ("pegaflow_connected_clients", 2.0),
        ("pegaflow_pool_capacity_bytes", (64u64 << 20) as f64),
        ("pegaflow_pool_used_bytes", 40.0 * slot_bytes),
        ("pegaflow_owner_epoch", 1.0),
        ("pegaflow_owner_restarts_total", 0.0),
        ("pegaflow_owner_running", 1.0),
        ("pegaflow_max_clients", 64.0),
    ] {
        assert_eq!(get(&t, name), want, "{name} in:\n{t}");
    }
    assert!(get(&t, "pegaflow_save_seconds_total") > 0.0);
    assert!(get(&t, "pegaflow_load_seconds_total") > 0.0);
    assert!(t.contains("# TYPE pegaflow_save_seconds_total counter\n"));
    assert_eq!(get_l(&t, "pegaflow_slots", &[("state", "committed")]), 40.0);
    assert_eq!(get_l(&t, "pegaflow_clients", &[("state", "live")]), 2.0);
    // 64 KiB slots, 32 to a 2 MiB slab: committed blocks plus the stash
    // (writing) plus free slots fill the assigned slabs exactly.
    let slabs = get_l(&t, "pegaflow_pool_slabs", &[("state", "assigned")]);
    assert_eq!(
        get_l(&t, "pegaflow_pool_slabs", &[("state", "free")]) + slabs,
        32.0
    );
    assert_eq!(
        get(&t, "pegaflow_pool_assigned_bytes"),
        slabs * (2u64 << 20) as f64
    );
    let by_state: f64 = ["free", "writing", "committed", "evicting", "invalid"]
        .iter()
        .map(|s| get_l(&t, "pegaflow_slots", &[("state", s)]))
        .sum();
    assert_eq!(by_state, slabs * 32.0);
    assert_eq!(get_l(&t, "pegaflow_slots", &[("state", "invalid")]), 0.0);
    assert_eq!(
        get_l(&t, "pegaflow_slots", &[("state", "writing")]),
        get_l(&t, "pegaflow_client_stash_slots", &a_labels)
    );
    for (name, want) in [
        ("pegaflow_client_block_hits_total", 40.0),
        ("pegaflow_client_block_misses_total", 15.0),
        ("pegaflow_client_saved_blocks_total", 40.0),
        ("pegaflow_client_save_bytes_total", (40 * LEN) as f64),
        ("pegaflow_client_load_bytes_total", (40 * LEN) as f64),
        ("pegaflow_client_commits_total", 40.0),
        ("pegaflow_client_pinned_slots", 0.0),
    ] {
        assert_eq!(get_l(&t, name, &a_labels), want, "{name} in:\n{t}");
    }
    let stash = get_l(&t, "pegaflow_client_stash_slots", &a_labels);
    let target = get_l(&t, "pegaflow_client_stash_target_slots", &a_labels);
    assert!(
        stash > 0.0 && stash <= target,
        "stash {stash} target {target}"
    );
    let b_labels = [("client", "1"), ("pid", pid.as_str()), ("label", "ops-b")];
    assert_eq!(
        get_l(&t, "pegaflow_client_block_hits_total", &b_labels),
        10.0
    );

    assert_metrics_documented(&t);

    // B leaves: its series go, the node totals keep its counts.
    drop(b);
    let t = owner.scrape_until("B gone", |t| {
        sample(t, "pegaflow_connected_clients", &[]) == Some(1.0)
    });
    assert_eq!(
        sample(&t, "pegaflow_client_block_hits_total", &b_labels),
        None
    );
    assert_eq!(get(&t, "pegaflow_block_hits_total"), 50.0);
    assert_eq!(get(&t, "pegaflow_lookups_total"), 3.0);
    assert_eq!(get(&t, "pegaflow_reclaimed_clients_total"), 1.0);

    let (code, body) = http_get(owner.metrics, "/health").unwrap();
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, _) = http_get(owner.metrics, "/nope").unwrap();
    assert_eq!(code, 404);
}

#[test]
fn owner_restart_keeps_blocks_and_counts_the_epoch() {
    let mut owner = OwnerProc::start("restart");
    let a = owner.engine("ops-r", NS, SLOT_BYTES);
    assert_eq!(save_all(&owner, &a, "ops-r", &keys(NS, 0..20), LEN), 20);
    owner.scrape_until("20 commits", |t| {
        sample(t, "pegaflow_block_commits_total", &[]) == Some(20.0)
    });

    owner.kill9();
    owner.launch();
    let t = owner.scrape_until("the engine back", |t| {
        sample(t, "pegaflow_connected_clients", &[]) == Some(1.0)
    });
    assert_eq!(get(&t, "pegaflow_owner_epoch"), 2.0);
    assert_eq!(get(&t, "pegaflow_owner_restarts_total"), 1.0);
    assert_eq!(get_l(&t, "pegaflow_slots", &[("state", "committed")]), 20.0);
    assert_eq!(
        get(&t, "pegaflow_pool_used_bytes"),
        20.0 * SLOT_BYTES as f64
    );
    // The new owner's own counters start from zero...
    assert_eq!(get(&t, "pegaflow_block_commits_total"), 0.0);
    // ...and every block committed before the kill still hits.
    let deadline = Instant::now() + TIMEOUT;
    let hashes: Vec<_> = (0..20).map(hash).collect();
    loop {
        let p = a.lookup(NS, &hashes);
        let n = p.len();
        a.release(&p);
        if n == 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {n} of 20 blocks hit after the restart"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A clean stop: /health goes away with the process.
    let status = owner.terminate();
    assert!(status.success(), "{status}: {}", owner.log());
    assert!(http_get(owner.metrics, "/health").is_err());
}

#[test]
fn health_says_unhealthy_while_the_request_loop_is_stuck() {
    let owner = OwnerProc::start_with("stall", &["--health-stall-secs", "1"]);
    let a = owner.engine("ops-stall", NS, SLOT_BYTES);
    assert_eq!(http_get(owner.metrics, "/health").unwrap().0, 200);
    // The request loop is the owner's main thread; the socket and metrics
    // threads keep running.
    let stop = match ThreadStop::new(owner.pid()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("SKIPPED: cannot stop a thread with ptrace here ({e})");
            return;
        }
    };
    let stuck_since = Instant::now();
    let (code, body) = loop {
        let (code, body) = http_get(owner.metrics, "/health").unwrap();
        if code != 200 || stuck_since.elapsed() > TIMEOUT {
            break (code, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("stalled") && body.contains("--health-stall-secs"),
        "{body}"
    );
    assert!(stuck_since.elapsed() >= Duration::from_millis(900));
    // A scrape still answers: from the engines' shm counters, or (if the
    // loop was stopped holding its lock) a 503 saying so, never a hang.
    let (code, text) = http_get(owner.metrics, "/metrics").unwrap();
    match code {
        200 => {
            assert_eq!(get(&text, "pegaflow_owner_running"), 0.0, "{text}");
            assert!(
                get(&text, "pegaflow_owner_loop_lag_seconds") > 1.0,
                "{text}"
            );
        }
        503 => assert!(text.contains("stuck"), "{text}"),
        _ => panic!("/metrics answered {code}: {text}"),
    }
    // Commits queue up unapplied while it is stuck...
    let before = sample(
        &owner.scrape_or_empty(),
        "pegaflow_block_commits_total",
        &[],
    );
    assert_eq!(save_some(&a, &keys(NS, 0..4)), 4);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        sample(
            &owner.scrape_or_empty(),
            "pegaflow_block_commits_total",
            &[]
        ),
        before
    );
    // ...and are applied once it runs again; /health recovers.
    drop(stop);
    let t = owner.scrape_until("commits applied", |t| {
        sample(t, "pegaflow_block_commits_total", &[]) == Some(4.0)
    });
    assert_eq!(get(&t, "pegaflow_owner_running"), 1.0);
    assert!(get(&t, "pegaflow_owner_loop_lag_seconds") < 1.0);
    assert_eq!(
        http_get(owner.metrics, "/health").unwrap(),
        (200, "ok\n".into())
    );
}

/// Save `keys` from whatever the engine's stash holds (no waiting for the
/// owner); returns blocks queued for commit.
fn save_some(e: &pegaflow_core::Engine, keys: &[pegaflow_core::BlockKey]) -> usize {
    e.save_with(keys, |_, buf| {
        buf[..LEN].fill(7);
        LEN
    })
}

#[test]
fn metrics_bind_failure_is_a_clear_start_error_and_empty_disables() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let name = format!("ops-bind-{}", std::process::id());
    let run = |metrics: &str, sock: &str| {
        let mut c = std::process::Command::new(OWNER);
        c.args(["--name", &name, "--socket"])
            .arg(dir.path().join(sock))
            .args(["--pool-size", "8mb", "--slab-size", "2mb", "--no-prefault"])
            .args(["--metrics-addr", metrics])
            .env("PEGAFLOW_SHM_DIR", dir.path());
        c
    };
    let out = run(&addr, "a.sock").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&addr) && err.contains("--metrics-addr") && err.contains("disable"),
        "{err}"
    );
    // Not a terminal: plain text, no colour codes.
    assert!(!err.contains('\x1b'), "{err:?}");

    // Empty: the owner serves engines but no HTTP.
    let log = dir.path().join("empty.log");
    let mut child = run("", "b.sock")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while !dir.path().join("b.sock").exists() {
        assert!(Instant::now() < deadline, "owner did not start");
        assert!(child.try_wait().unwrap().is_none(), "owner exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains("pegaflow-owner ready"), "{text}");
    assert!(
        !text.contains('\x1b'),
        "colour codes in a log file: {text:?}"
    );
    assert!(!text.contains("serving Prometheus"), "{text}");
    drop(taken);
}

/// docs/operations.md lists exactly the metrics a scrape with clients shows.
fn assert_metrics_documented(scrape: &str) {
    let doc_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md");
    let doc = std::fs::read_to_string(&doc_path).unwrap();
    let scraped: std::collections::BTreeSet<&str> = scrape
        .lines()
        .filter(|l| l.starts_with("pegaflow_"))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    for name in &scraped {
        assert!(
            doc.contains(&format!("`{name}`")) || doc.contains(&format!("`{name}{{")),
            "{name} is served but not documented in docs/operations.md"
        );
    }
    let documented: std::collections::BTreeSet<String> = doc
        .match_indices("pegaflow_")
        .map(|(i, _)| {
            doc[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect::<String>()
        })
        .filter(|n| !n.ends_with('_'))
        .collect();
    for name in &documented {
        assert!(
            scraped.contains(name.as_str()),
            "docs/operations.md documents {name}, which /metrics does not serve"
        );
    }
}
