//! The owner SIGKILLed mid-traffic and restarted: every block committed
//! before the kill loads byte-exact afterwards, and engines reconnect by
//! themselves (same process, same Engine object).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pegaflow_tests::{check_block, eventually, fill_block, keys, Audit, OwnerProc};

const NS: u64 = 0x0d1e_0001;
const SLOT: u64 = 64 << 10;

#[test]
fn owner_killed_mid_traffic_keeps_every_committed_block() {
    let mut owner = OwnerProc::start("ownerkill");
    let writer = pegaflow_core::Engine::connect(owner.engine_config(NS, SLOT)).unwrap();
    let reader = pegaflow_core::Engine::connect(owner.engine_config(0, 0)).unwrap();
    assert!(
        writer.wait_connected(Duration::from_secs(5))
            && reader.wait_connected(Duration::from_secs(5))
    );

    // Traffic: batches of 8 new keys; a batch counts as committed once the
    // reader sees it in the index (that is the promise being tested).
    let committed: Arc<Mutex<Vec<u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (writer, reader, committed, stop) = (
            writer.clone(),
            reader.clone(),
            committed.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let mut batch = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let ks = keys(NS, 11, batch * 8, 8);
                writer.save_with(&ks, |i, buf| {
                    fill_block(&ks[i], &mut buf[..SLOT as usize]);
                    SLOT as usize
                });
                let hashes: Vec<[u8; 32]> = ks.iter().map(|k| k.hash).collect();
                if eventually(Duration::from_millis(200), || {
                    reader.count_hits(NS, &hashes) == 8
                }) {
                    committed.lock().unwrap().push(batch);
                }
                batch += 1;
                if batch >= 48 {
                    // Stay well under the pool so nothing is evicted.
                    batch = 0;
                }
            }
        })
    };
    assert!(eventually(Duration::from_secs(10), || committed
        .lock()
        .unwrap()
        .len()
        >= 20));
    owner.kill9();
    let before: Vec<u64> = committed.lock().unwrap().clone();
    // While the owner is dead: misses and skipped saves, no errors, no hang.
    assert!(eventually(Duration::from_secs(2), || !reader
        .is_connected()
        && !writer.is_connected()));
    let ks = keys(NS, 11, 0, 8);
    let hashes: Vec<[u8; 32]> = ks.iter().map(|k| k.hash).collect();
    assert_eq!(
        reader.lookup(NS, &hashes).len(),
        0,
        "lookups must miss while the owner is down"
    );
    assert_eq!(
        writer.reserve(4).len(),
        0,
        "saves must be skipped while the owner is down"
    );

    owner.spawn();
    assert!(
        eventually(Duration::from_secs(5), || writer.is_connected()
            && reader.is_connected()),
        "engines did not reconnect; log:\n{}",
        owner.log_text()
    );
    assert_eq!(writer.stats().epoch, 2);
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();

    let mut verified = 0;
    let mut batches: Vec<u64> = before.clone();
    batches.sort_unstable();
    batches.dedup();
    for b in batches {
        let ks = keys(NS, 11, b * 8, 8);
        let hashes: Vec<[u8; 32]> = ks.iter().map(|k| k.hash).collect();
        let pinned = reader.lookup(NS, &hashes);
        assert_eq!(
            pinned.len(),
            8,
            "batch {b} committed before the kill is gone"
        );
        reader.load_with(&pinned, |i, d| {
            assert!(check_block(&ks[i], d), "batch {b} block {i} not byte-exact");
            verified += 1;
        });
        reader.release(&pinned);
    }
    assert!(verified >= 160, "only {verified} blocks verified");
    // New saves work after the restart.
    let fresh = keys(NS, 12, 0, 4);
    let saved = writer.save_with(&fresh, |i, buf| {
        fill_block(&fresh[i], &mut buf[..SLOT as usize]);
        SLOT as usize
    });
    assert_eq!(saved, 4);
    let a = Audit::read(&owner.control());
    assert_eq!(a.bad_index_entries, 0, "{a:?}");
    assert!(
        owner.log_text().contains("re-adopted"),
        "restart did not re-adopt"
    );
}

#[test]
fn engine_restart_after_owner_restart_gets_a_fresh_entry_and_old_pins_drop() {
    let mut owner = OwnerProc::start("ownerkill2");
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_pf-engine"));
    let s = owner.socket.display().to_string();
    let save = pegaflow_tests::engine_cmd(
        &bin,
        &[
            "save".into(),
            s.clone(),
            owner.name.clone(),
            NS.to_string(),
            SLOT.to_string(),
            "5".into(),
            "0".into(),
            "10".into(),
        ],
    )
    .output()
    .unwrap();
    assert!(String::from_utf8_lossy(&save.stdout).contains("visible 10"));
    // A holder pins all ten, then the owner dies, then the holder dies.
    let mut hold = pegaflow_tests::engine_cmd(
        &bin,
        &[
            "hold".into(),
            s.clone(),
            owner.name.clone(),
            NS.to_string(),
            "5".into(),
            "0".into(),
            "10".into(),
        ],
    )
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(hold.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "pinned 10");
    owner.kill9();
    owner.spawn();
    // The holder is alive: its entry (and pins) are kept for it.
    assert!(eventually(Duration::from_secs(2), || Audit::read(
        &owner.control()
    )
    .pins
    .values()
    .sum::<u64>()
        == 10));
    hold.kill().unwrap();
    hold.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(3), || Audit::read(&owner.control())
            .pins
            .is_empty()),
        "pins of an engine that died after the owner restart were not reclaimed"
    );
}
