//! Engines SIGKILLed at random points of save and load, 200+ rounds: no
//! slot, pin or stash entry leaks (checked against the segment the owner
//! keeps), the owner notices each death within a second, and a long-lived
//! engine beside them keeps working and never reads a torn block.

use std::process::Stdio;
use std::time::{Duration, Instant};

use pegaflow_tests::{check_block, engine_cmd, eventually, fill_block, keys, Audit, OwnerProc};

const NS: u64 = 0xc4a5_0001;
const SLOT: u64 = 64 << 10;
const ROUNDS: u64 = 200;

#[test]
fn engines_killed_at_random_points_leak_nothing() {
    let owner = OwnerProc::start("crash");
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_pf-engine"));
    // The survivor: saves and verifies its own keys between rounds.
    let survivor = pegaflow_core::Engine::connect(owner.engine_config(NS + 1, SLOT)).unwrap();
    assert!(survivor.wait_connected(Duration::from_secs(5)));
    let mine = keys(NS + 1, 3, 0, 40);
    let hashes: Vec<[u8; 32]> = mine.iter().map(|k| k.hash).collect();

    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut slowest_reclaim = Duration::ZERO;
    for round in 0..ROUNDS {
        let seed = next() | 1;
        let args: Vec<String> = vec![
            "chaos".into(),
            owner.socket.display().to_string(),
            owner.name.clone(),
            NS.to_string(),
            SLOT.to_string(),
            seed.to_string(),
        ];
        let mut child = engine_cmd(&bin, &args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill anywhere from before its hello to deep inside its traffic.
        std::thread::sleep(Duration::from_micros(next() % 40_000));
        let pid = child.id();
        child.kill().unwrap();
        let status = child.wait().unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
        assert!(
            !out.contains("CORRUPT"),
            "round {round}: a chaos engine read a corrupt block"
        );
        assert!(
            status.code().is_none(),
            "round {round}: engine exited by itself: {status} {out}"
        );
        // The owner reclaims the dead engine's entry within a second.
        let t = Instant::now();
        assert!(
            eventually(Duration::from_secs(1), || Audit::read(&owner.control())
                .clients
                .iter()
                .all(|c| c.2 != pid)),
            "round {round}: owner did not reclaim pid {pid} within 1 s; log:\n{}",
            owner.log_text()
        );
        slowest_reclaim = slowest_reclaim.max(t.elapsed());

        if round % 20 == 0 {
            let saved = survivor.save_with(&mine, |i, buf| {
                fill_block(&mine[i], &mut buf[..SLOT as usize]);
                SLOT as usize
            });
            assert!(
                saved > 0 || survivor.count_hits(NS + 1, &hashes) > 0,
                "survivor cannot save"
            );
            let pinned = survivor.lookup(NS + 1, &hashes);
            let mut bad = 0;
            survivor.load_with(&pinned, |i, d| bad += !check_block(&mine[i], d) as usize);
            survivor.release(&pinned);
            assert_eq!(bad, 0, "survivor read a corrupt block in round {round}");
        }
    }
    assert!(survivor.is_connected(), "the survivor lost its connection");

    // Only the survivor is left; everything else is accounted for.
    let me = survivor.client_id().unwrap();
    let a = Audit::read(&owner.control());
    assert_eq!(a.clients.len(), 1, "{a:?}");
    assert_eq!(a.clients[0].0, me);
    assert!(a.pins.is_empty(), "leaked pins: {a:?}");
    assert_eq!(
        a.leaked_writing(),
        0,
        "writing slots beyond the survivor's stash: {a:?}"
    );
    assert_eq!(a.evicting, 0, "{a:?}");
    assert_eq!(a.bad_index_entries, 0, "{a:?}");
    assert_eq!(a.committed, a.index_entries, "{a:?}");
    let reclaims = owner
        .log_text()
        .matches("its slots and pins are reclaimed")
        .count() as u64;
    println!(
        "{ROUNDS} rounds; {reclaims} engines reclaimed; slowest reclaim {slowest_reclaim:?}; final {a:?}"
    );
}
