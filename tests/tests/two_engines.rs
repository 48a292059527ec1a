//! Two engine processes on one owner: what A saves, B finds and loads
//! byte-exact, through shared memory only.

use std::time::Duration;

use pegaflow_tests::{check_block, engine_cmd, fill_block, keys, Audit, OwnerProc};

const NS: u64 = 0x5eed_0001;
const SLOT: u64 = 64 << 10;

fn run(bin: &std::path::Path, args: &[String]) -> String {
    let out = engine_cmd(bin, args).output().expect("run pf-engine");
    assert!(out.status.success(), "pf-engine {args:?} failed: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn save_in_one_process_load_in_another() {
    let owner = OwnerProc::start("two");
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_pf-engine"));
    let s = owner.socket.display().to_string();
    let base = |cmd: &str| {
        vec![
            cmd.to_string(),
            s.clone(),
            owner.name.clone(),
            NS.to_string(),
        ]
    };

    let mut save = base("save");
    save.extend([SLOT, 42, 0, 100].map(|x| x.to_string()));
    let out = run(&bin, &save);
    assert!(
        out.contains("saved 100") && out.contains("visible 100"),
        "{out}"
    );

    let mut load = base("load");
    load.extend([42u64, 0, 100].map(|x| x.to_string()));
    assert!(run(&bin, &load).contains("hits 100 ok 100 bad 0"));

    // A prefix that continues past what was saved hits exactly the saved part.
    let mut partial = base("load");
    partial.extend([42u64, 90, 20].map(|x| x.to_string()));
    assert!(run(&bin, &partial).contains("hits 10 ok 10 bad 0"));

    // Another namespace sees nothing.
    let mut other = vec![
        "load".to_string(),
        s.clone(),
        owner.name.clone(),
        (NS + 1).to_string(),
    ];
    other.extend([42u64, 0, 100].map(|x| x.to_string()));
    assert!(run(&bin, &other).contains("hits 0 "));

    // Both engines have exited: nothing of theirs remains.
    assert!(pegaflow_tests::eventually(Duration::from_secs(2), || {
        Audit::read(&owner.control()).clients.is_empty()
    }));
    let a = Audit::read(&owner.control());
    assert_eq!(
        (a.committed, a.index_entries, a.bad_index_entries),
        (100, 100, 0),
        "{a:?}"
    );
    assert!(a.writing.is_empty() && a.pins.is_empty(), "{a:?}");
}

#[test]
fn in_process_engines_share_and_release() {
    let owner = OwnerProc::start("inproc");
    let a = pegaflow_core::Engine::connect(owner.engine_config(NS, SLOT)).unwrap();
    let b = pegaflow_core::Engine::connect(owner.engine_config(0, 0)).unwrap();
    assert!(a.wait_connected(Duration::from_secs(5)) && b.wait_connected(Duration::from_secs(5)));
    assert!(pegaflow_tests::eventually(Duration::from_secs(2), || a
        .reserve(0)
        .is_empty()
        && {
            let r = a.reserve(1);
            let ok = !r.is_empty();
            for i in 0..r.len() {
                a.abort(&r, i);
            }
            ok
        }));
    let ks = keys(NS, 9, 0, 50);
    let saved = a.save_with(&ks, |i, buf| {
        fill_block(&ks[i], &mut buf[..SLOT as usize]);
        SLOT as usize
    });
    assert_eq!(saved, 50);
    let hashes: Vec<[u8; 32]> = ks.iter().map(|k| k.hash).collect();
    // Visible to the other engine well within a millisecond or so; allow
    // generous slack for a loaded CI machine.
    assert!(pegaflow_tests::eventually(Duration::from_secs(2), || b
        .count_hits(NS, &hashes)
        == 50));
    let pinned = b.lookup(NS, &hashes);
    assert_eq!(pinned.len(), 50);
    let mut ok = 0;
    b.load_with(&pinned, |i, data| ok += check_block(&ks[i], data) as usize);
    assert_eq!(ok, 50);
    let audit = Audit::read(&owner.control());
    assert_eq!(audit.pins.get(&b.client_id().unwrap()), Some(&50));
    b.release(&pinned);
    let audit = Audit::read(&owner.control());
    assert!(
        !audit.pins.contains_key(&b.client_id().unwrap()),
        "{audit:?}"
    );
    let st = b.stats();
    assert_eq!((st.hit_blocks, st.loaded_blocks), (50, 50));
}
