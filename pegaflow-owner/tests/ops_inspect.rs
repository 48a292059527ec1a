//! `pegaflow-inspect` against a real owner: every subcommand in text and
//! JSON, on a live owner, post-mortem after SIGKILL, and on deliberately
//! corrupted copies of a segment.

mod ops_support;

use std::path::{Path, PathBuf};

use ops_support::*;
use pegaflow_shm::geometry::Layout;
use pegaflow_shm::segment::ControlSegment;
use pegaflow_shm::slot_table::{SlotKind, SlotState, SLOT_ENTRY_BYTES};

const NS: u64 = 0x0000_0000_0bad_cafe;
const OTHER_NS: u64 = 0x0000_0000_0000_0777;
const LEN: usize = 50_000;

fn ok(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout {}\nstderr {}",
        o.status.code(),
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(o)
}

/// An owner with 30 blocks of NS and 5 of OTHER_NS committed by two engines.
fn populated(tag: &str) -> (OwnerProc, pegaflow_core::Engine, pegaflow_core::Engine) {
    let owner = OwnerProc::start(tag);
    let a = owner.engine("inspect-a", NS, SLOT_BYTES);
    let b = owner.engine("inspect-b", OTHER_NS, SLOT_BYTES);
    assert_eq!(save_all(&owner, &a, "inspect-a", &keys(NS, 0..30), LEN), 30);
    assert_eq!(
        save_all(&owner, &b, "inspect-b", &keys(OTHER_NS, 0..5), LEN),
        5
    );
    owner.scrape_until("35 commits", |t| {
        sample(t, "pegaflow_block_commits_total", &[]) == Some(35.0)
    });
    (owner, a, b)
}

#[test]
fn every_subcommand_on_a_live_owner() {
    let (owner, a, _b) = populated("live");
    let pinned = a.lookup(NS, &(0..10).map(hash).collect::<Vec<_>>());
    assert_eq!(pinned.len(), 10);
    let me = std::process::id();

    // status
    let text = ok(&owner.inspect(&["status"]));
    assert!(text.contains("running (pid"), "{text}");
    assert!(text.contains("35 committed"), "{text}");
    assert!(text.contains("2 live"), "{text}");
    let s = json(&owner.inspect(&["status", "--json"]));
    assert_eq!(s["owner"]["alive"], true);
    assert_eq!(s["owner"]["pid"], owner.pid());
    assert_eq!(s["owner"]["epoch"], 1);
    assert_eq!(s["owner"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["slots"]["committed"], 35);
    assert_eq!(s["index_entries"], 35);
    assert_eq!(s["committed_bytes"], 35 * LEN as u64);
    assert_eq!(s["clients"]["live"], 2);
    assert_eq!(s["pool"]["bytes"], 64u64 << 20);
    assert_eq!(s["pool"]["file_bytes"], 64u64 << 20);
    assert_eq!(s["geometry"]["slab_bytes"], 2u64 << 20);
    assert_eq!(s["geometry"]["min_slot_bytes"], 64u64 << 10);
    // --json also works before the subcommand, and --control names the file.
    let ctl = owner.control();
    let s2 = json(&inspect_raw(&[
        "--json",
        "--control",
        ctl.to_str().unwrap(),
        "status",
    ]));
    assert_eq!(s2["slots"]["committed"], 35);

    // clients
    let text = ok(&owner.inspect(&["clients"]));
    assert!(
        text.contains("inspect-a") && text.contains("inspect-b"),
        "{text}"
    );
    let c = json(&owner.inspect(&["clients", "--json"]));
    let list = c["clients"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    let ca = list.iter().find(|c| c["label"] == "inspect-a").unwrap();
    assert_eq!(ca["pid"], me);
    assert_eq!(ca["state"], "live");
    assert_eq!(ca["alive"], true);
    assert_eq!(ca["namespace"], format!("{NS:#018x}"));
    assert_eq!(ca["slot_bytes"], SLOT_BYTES);
    assert_eq!(ca["pinned_slots"], 10);
    assert_eq!(ca["engine_counters"]["hit_blocks"], 10);
    assert_eq!(ca["engine_counters"]["save_blocks"], 30);
    assert_eq!(ca["owner_counters"]["commits"], 30);
    assert_eq!(ca["request_ring"]["capacity"], 4096);
    let stash = &ca["stash"];
    // (the target halves when a second engine of the block size connects,
    // so the depth may exceed it for a while)
    assert!(stash["depth"].as_u64().unwrap() > 0);
    assert!(stash["depth"].as_u64().unwrap() <= stash["capacity"].as_u64().unwrap());
    // Idle stash slots are `stashed`, not `writing`: nothing is being
    // written now.
    let depth: u64 = list
        .iter()
        .map(|c| c["stash"]["depth"].as_u64().unwrap())
        .sum();
    let s = json(&owner.inspect(&["status", "--json"]));
    assert_eq!(
        (
            s["slots"]["stashed"].as_u64(),
            s["slots"]["writing"].as_u64()
        ),
        (Some(depth), Some(0)),
        "{s}"
    );
    let text = ok(&owner.inspect(&["status"]));
    assert!(
        text.contains(&format!("{depth} stashed, 0 writing")),
        "{text}"
    );
    let p = json(&owner.inspect(&["pool", "--json"]));
    assert_eq!(
        p["block_sizes"][0]["by_state"]["stashed"].as_u64(),
        Some(depth),
        "{p}"
    );

    // pool
    let text = ok(&owner.inspect(&["pool"]));
    assert!(text.contains("64.0 KiB"), "{text}");
    let p = json(&owner.inspect(&["pool", "--json"]));
    let sizes = p["block_sizes"].as_array().unwrap();
    assert_eq!(sizes.len(), 1, "{p}");
    assert_eq!(sizes[0]["block_bytes"], SLOT_BYTES);
    assert_eq!(sizes[0]["by_state"]["committed"], 35);
    assert_eq!(
        p["slabs_free"].as_u64().unwrap() + sizes[0]["slabs"].as_u64().unwrap(),
        32
    );

    // keys, with and without a namespace filter and a limit
    let k = json(&owner.inspect(&["keys", "--json"]));
    assert_eq!(k["total"], 35);
    let k = json(&owner.inspect(&["keys", "--json", "--namespace", &format!("{OTHER_NS:#x}")]));
    assert_eq!(k["total"], 5);
    let rows = k["keys"].as_array().unwrap();
    assert!(rows
        .iter()
        .all(|r| r["namespace"] == format!("{OTHER_NS:#018x}")
            && r["indexed"] == true
            && r["bytes"] == LEN as u64));
    let mut got: Vec<String> = rows
        .iter()
        .map(|r| r["hash"].as_str().unwrap().into())
        .collect();
    let mut want: Vec<String> = (0..5)
        .map(|i| hash(i).iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    let k = json(&owner.inspect(&[
        "keys",
        "--json",
        "--namespace",
        &NS.to_string(),
        "--limit",
        "3",
    ]));
    assert_eq!(
        (k["total"].as_u64(), k["shown"].as_u64()),
        (Some(30), Some(3))
    );
    let text = ok(&owner.inspect(&["keys", "--namespace", "12345"]));
    assert!(text.contains("0 keys in namespace"), "{text}");

    // verify: a healthy live owner with pins held and stashes full.
    let text = ok(&owner.inspect(&["verify"]));
    assert!(text.starts_with("OK") || text.contains("\nOK"), "{text}");
    let v = json(&owner.inspect(&["verify", "--json"]));
    assert_eq!(v["ok"], true);
    assert_eq!(v["errors"], 0);
    assert_eq!(v["checked"]["committed"], 35);
    assert_eq!(v["checked"]["index_entries"], 35);
    assert_eq!(v["checked"]["clients"], 2);
    assert!(v["checked"]["stash_entries"].as_u64().unwrap() > 0);

    // Inspecting disturbed nothing: the owner still serves and the engine
    // still hits and saves.
    a.release(&pinned);
    assert_eq!(save_all(&owner, &a, "inspect-a", &keys(NS, 30..32), LEN), 2);
    owner.scrape_until("37 commits", |t| {
        sample(t, "pegaflow_block_commits_total", &[]) == Some(37.0)
    });
}

#[test]
fn post_mortem_after_sigkill() {
    let (mut owner, a, _b) = populated("dead");
    let pinned = a.lookup(NS, &(0..4).map(hash).collect::<Vec<_>>());
    assert_eq!(pinned.len(), 4);
    let dead_pid = owner.pid();
    owner.kill9();

    let text = ok(&owner.inspect(&["status"]));
    assert!(
        text.contains(&format!(
            "owner       not running: pid {dead_pid} died while running"
        )),
        "{text}"
    );
    assert!(!text.contains("owner       running"), "{text}");
    let s = json(&owner.inspect(&["status", "--json"]));
    assert_eq!(s["owner"]["alive"], false);
    assert_eq!(
        s["owner"]["state"], "running",
        "killed, so never marked stopped"
    );
    assert_eq!(s["slots"]["committed"], 35);
    let c = json(&owner.inspect(&["clients", "--json"]));
    let ca = c["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["label"] == "inspect-a")
        .cloned()
        .unwrap();
    assert_eq!(ca["pinned_slots"], 4);
    let k = json(&owner.inspect(&["keys", "--json", "--namespace", &NS.to_string()]));
    assert_eq!(k["total"], 30);
    let p = json(&owner.inspect(&["pool", "--json"]));
    assert_eq!(p["block_sizes"][0]["by_state"]["committed"], 35);
    let v = json(&owner.inspect(&["verify", "--json", "--recheck-ms", "50"]));
    assert_eq!(v["ok"], true, "{v}");

    // The segment a dead owner left is what the next owner adopts.
    owner.launch();
    let s = json(&owner.inspect(&["status", "--json"]));
    assert_eq!(s["owner"]["alive"], true);
    assert_eq!(s["owner"]["epoch"], 2);
    assert_eq!(s["slots"]["committed"], 35);
    a.release(&pinned);
}

/// Copy `ctl` to `dir/name` and let `f` corrupt the copy's bytes.
fn corrupt_copy(
    ctl: &Path,
    dir: &Path,
    name: &str,
    f: impl FnOnce(&mut Vec<u8>, &Layout),
) -> PathBuf {
    let layout = *ControlSegment::open_read_only(ctl).unwrap().layout();
    let mut bytes = std::fs::read(ctl).unwrap();
    f(&mut bytes, &layout);
    let out = dir.join(name);
    std::fs::write(&out, bytes).unwrap();
    out
}

fn put_u64(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
}

fn verify_copy(path: &Path) -> (i32, String, serde_json::Value) {
    let p = path.to_str().unwrap();
    let text = inspect_raw(&["--control", p, "verify", "--recheck-ms", "20"]);
    let js = inspect_raw(&["--control", p, "verify", "--json", "--recheck-ms", "20"]);
    assert_eq!(text.status.code(), js.status.code());
    (text.status.code().unwrap_or(-1), stdout(&text), json(&js))
}

#[test]
fn verify_names_deliberate_corruption() {
    let (mut owner, a, b) = populated("corrupt");
    // Quiesce: no engine, no owner writes while we copy.
    drop((a, b));
    owner.scrape_until("engines gone", |t| {
        sample(t, "pegaflow_connected_clients", &[]) == Some(0.0)
    });
    owner.kill9();
    let ctl = owner.control();
    let work = tempfile::tempdir().unwrap();

    let (code, text, _) = verify_copy(&corrupt_copy(&ctl, work.path(), "clean.ctl", |_, _| {}));
    assert_eq!(code, 0, "{text}");

    // Pick a committed slot and its index bucket from the real segment.
    let seg = ControlSegment::open_read_only(&ctl).unwrap();
    let (slot, st) = seg
        .slots()
        .iter()
        .enumerate()
        .find_map(|(i, e)| {
            e.load_state()
                .filter(|s| s.kind == SlotKind::Committed)
                .map(|s| (i as u64, s))
        })
        .expect("a committed slot");
    let key = seg.slots()[slot as usize].key();
    let mask = seg.geometry().index_buckets - 1;
    let bucket = (0..=mask)
        .map(|k| (pegaflow_shm::index::home(&key, mask) + k) & mask)
        .find(|&i| {
            let at = seg.layout().index + i * 64;
            let raw = std::fs::read(&ctl).unwrap();
            u32::from_le_bytes(raw[at as usize + 4..at as usize + 8].try_into().unwrap())
                == slot as u32 + 1
        })
        .expect("the slot's bucket");
    let home = pegaflow_shm::index::home(&key, mask);

    // 1. A committed slot flipped to Free: the index points at a free slot.
    let p = corrupt_copy(&ctl, work.path(), "slot-free.ctl", |b, l| {
        let free = SlotState {
            kind: SlotKind::Free,
            ..st
        };
        put_u64(b, l.slots + slot * SLOT_ENTRY_BYTES, free.pack());
    });
    let (code, text, js) = verify_copy(&p);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("index-slot-not-committed"), "{text}");
    assert!(
        text.contains(&format!("points at slot {slot}, which is free")),
        "{text}"
    );
    assert!(text.contains("CORRUPT"), "{text}");
    assert_eq!(js["ok"], false);
    assert!(js["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["check"] == "index-slot-not-committed" && f["severity"] == "error"));

    // 2. The slot's index bucket emptied: a committed slot the index lost.
    let p = corrupt_copy(&ctl, work.path(), "bucket-empty.ctl", |b, l| {
        let at = l.index + bucket * 64;
        b[at as usize..at as usize + 64].fill(0);
    });
    let (code, text, _) = verify_copy(&p);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(&format!("committed-not-indexed: slot {slot} ")),
        "{text}"
    );

    // 3. The entry moved one bucket before its home (which is left empty):
    // present, but no lookup reaches it.
    let prev = (home + mask) & mask;
    let raw = std::fs::read(&ctl).unwrap();
    let prev_at = (seg.layout().index + prev * 64) as usize;
    if bucket == home && raw[prev_at + 4..prev_at + 8] == [0; 4] {
        let p = corrupt_copy(&ctl, work.path(), "bucket-moved.ctl", |b, l| {
            let from = (l.index + bucket * 64) as usize;
            let to = (l.index + prev * 64) as usize;
            let entry: Vec<u8> = b[from..from + 64].to_vec();
            b[to..to + 64].copy_from_slice(&entry);
            b[from..from + 64].fill(0);
        });
        let (code, text, _) = verify_copy(&p);
        assert_eq!(code, 1, "{text}");
        assert!(
            text.contains(&format!("index-unreachable: index bucket {prev} ")),
            "{text}"
        );
        assert!(
            text.contains(&format!("committed-unreachable: slot {slot} ")),
            "{text}"
        );
    }

    // 4. A garbage state word.
    let p = corrupt_copy(&ctl, work.path(), "slot-garbage.ctl", |b, l| {
        put_u64(b, l.slots + slot * SLOT_ENTRY_BYTES, 0xff);
    });
    let (code, text, _) = verify_copy(&p);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(&format!("slot-garbage-state: slot {slot} ")),
        "{text}"
    );

    // 5. A FREE client entry that still holds a pin.
    let p = corrupt_copy(&ctl, work.path(), "free-pin.ctl", |b, l| {
        let client = 5u64;
        let at = l.clients + client * l.client.bytes + l.client.pins + slot * 4;
        b[at as usize..at as usize + 4].copy_from_slice(&3u32.to_le_bytes());
    });
    let (code, text, _) = verify_copy(&p);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("free-client-holds-pins: client 5"), "{text}");

    // 6. Slab table inconsistent with the geometry.
    let p = corrupt_copy(&ctl, work.path(), "slab.ctl", |b, l| {
        let slab = slot / 32; // 32 slots of 64 KiB per 2 MiB slab
        let at = l.slabs + slab * 64 + 16; // nslots
        b[at as usize..at as usize + 4].copy_from_slice(&7u32.to_le_bytes());
    });
    let (code, text, _) = verify_copy(&p);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("slab-bad-nslots"), "{text}");

    // 7. A live-looking client with impossible ring positions and a stash
    // entry that is out of range.
    let p = corrupt_copy(&ctl, work.path(), "ring.ctl", |b, l| {
        let base = l.clients + 7 * l.client.bytes;
        b[base as usize..base as usize + 4].copy_from_slice(&1u32.to_le_bytes()); // LIVE
        let req = base + l.client.request_ring;
        put_u64(b, req, 10); // head
        put_u64(b, req + 128, 5); // tail < head
        let stash = base + l.client.stash_ring;
        put_u64(b, stash + 128, 1); // one entry
        put_u64(b, stash + 256, 0xffff_fff0); // slot id far out of range
    });
    let (code, text, _) = verify_copy(&p);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("ring-positions: client 7 request ring"),
        "{text}"
    );
    assert!(
        text.contains("stash-slot-out-of-range: client 7 stash[0]"),
        "{text}"
    );

    // Not a segment at all, and a missing one: exit 2 with what to do.
    let junk = work.path().join("junk.ctl");
    std::fs::write(&junk, vec![0x55u8; 4096]).unwrap();
    let o = inspect_raw(&["--control", junk.to_str().unwrap(), "verify"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad magic"));
    let o = inspect_raw(&[
        "--control",
        work.path().join("nope.ctl").to_str().unwrap(),
        "status",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(json(&o)["error"].as_str().unwrap().contains("--name"));
}

#[test]
fn inspect_never_writes_the_segment() {
    let (mut owner, a, b) = populated("readonly");
    drop((a, b));
    owner.scrape_until("engines gone", |t| {
        sample(t, "pegaflow_connected_clients", &[]) == Some(0.0)
    });
    owner.kill9();
    let ctl = owner.control();
    let before = std::fs::read(&ctl).unwrap();
    let mtime = std::fs::metadata(&ctl).unwrap().modified().unwrap();
    for args in [
        &["status"][..],
        &["clients", "--json"],
        &["pool"],
        &["keys", "--json"],
        &["verify"],
    ] {
        ok(&owner.inspect(args));
    }
    assert!(
        std::fs::read(&ctl).unwrap() == before,
        "inspect changed the segment"
    );
    assert_eq!(std::fs::metadata(&ctl).unwrap().modified().unwrap(), mtime);
    // And it works on a file it may only read.
    let ro = tempfile::tempdir().unwrap();
    let copy = ro.path().join("ro.ctl");
    std::fs::write(&copy, &before).unwrap();
    let mut perm = std::fs::metadata(&copy).unwrap().permissions();
    perm.set_readonly(true);
    std::fs::set_permissions(&copy, perm).unwrap();
    let s = json(&inspect_raw(&[
        "--control",
        copy.to_str().unwrap(),
        "status",
        "--json",
    ]));
    assert_eq!(s["slots"]["committed"], 35);
}
