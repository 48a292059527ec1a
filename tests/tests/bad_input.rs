//! Bad input gets a clear error and loses nothing: a wrong ABI version, a
//! second owner, garbage and out-of-range ids in a ring, a corrupt ring, a
//! peer with other credentials. The owner keeps serving everyone else.

use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use pegaflow_shm::proto::{self, ClientMsg, Hello, OwnerMsg, RejectReason};
use pegaflow_shm::request::Request;
use pegaflow_shm::segment::ControlSegment;
use pegaflow_shm::slot_table::BlockKey;
use pegaflow_shm::sync::Ordering;
use pegaflow_tests::{check_block, eventually, fill_block, keys, owner_bin, Audit, OwnerProc};

const NS: u64 = 0xbad0_0001;
const SLOT: u64 = 64 << 10;

fn hello(abi: u32, slot_bytes: u64) -> ClientMsg {
    ClientMsg::Hello(Hello {
        abi_version: abi,
        pid: std::process::id(),
        label: "raw".into(),
        namespace: if slot_bytes > 0 { NS } else { 0 },
        slot_bytes,
        resume: None,
    })
}

/// A healthy engine saves and loads; called after each abuse.
fn healthy(owner: &OwnerProc, seed: u64) {
    let e = pegaflow_core::Engine::connect(owner.engine_config(NS, SLOT)).unwrap();
    assert!(e.wait_connected(Duration::from_secs(5)));
    let ks = keys(NS, seed, 0, 8);
    let saved = e.save_with(&ks, |i, b| {
        fill_block(&ks[i], &mut b[..SLOT as usize]);
        SLOT as usize
    });
    assert_eq!(saved, 8);
    let hashes: Vec<[u8; 32]> = ks.iter().map(|k| k.hash).collect();
    assert!(eventually(Duration::from_secs(2), || e
        .count_hits(NS, &hashes)
        == 8));
    let p = e.lookup(NS, &hashes);
    let mut ok = 0;
    e.load_with(&p, |i, d| ok += check_block(&ks[i], d) as usize);
    e.release(&p);
    assert_eq!(ok, 8);
}

#[test]
fn wrong_abi_version_is_rejected_with_the_fix() {
    let owner = OwnerProc::start("abi");
    let mut s = UnixStream::connect(&owner.socket).unwrap();
    proto::send(&mut s, &hello(999, 0)).unwrap();
    match proto::recv::<OwnerMsg>(&mut s).unwrap() {
        OwnerMsg::Rejected {
            reason: RejectReason::AbiMismatch,
            message,
        } => {
            assert!(
                message.contains("999") && message.contains("upgrade"),
                "{message}"
            )
        }
        other => panic!("expected an ABI rejection, got {other:?}"),
    }
    healthy(&owner, 1);
}

#[test]
fn segment_of_another_abi_version_refuses_to_start_and_is_kept() {
    let mut owner = OwnerProc::start("abiseg");
    healthy(&owner, 1);
    owner.terminate();
    // Pretend an older binary wrote the segment.
    let path = owner.control();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..12].copy_from_slice(&0u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let out = Command::new(owner_bin())
        .args(&owner.args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("ABI version 0") && err.contains("--discard-existing"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "a refused start must not touch the segment"
    );
}

#[test]
fn second_owner_on_the_same_name_names_the_first() {
    let owner = OwnerProc::start("second");
    let out = Command::new(owner_bin())
        .args(&owner.args)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("pid {}", owner.pid())) && err.contains("--name"),
        "{err}"
    );
    healthy(&owner, 2);
}

#[test]
fn garbage_and_out_of_range_ids_in_a_ring_are_counted_and_ignored() {
    let owner = OwnerProc::start("garbage");
    healthy(&owner, 3);
    // A raw client: hello by hand, then scribble into its own request ring.
    let mut s = UnixStream::connect(&owner.socket).unwrap();
    proto::send(&mut s, &hello(pegaflow_shm::ABI_VERSION, SLOT)).unwrap();
    let w = match proto::recv::<OwnerMsg>(&mut s).unwrap() {
        OwnerMsg::Welcome(w) => w,
        other => panic!("{other:?}"),
    };
    let seg = ControlSegment::open(std::path::Path::new(&w.control_path)).unwrap();
    let me = seg.client(w.client).unwrap();
    let committed_before = Audit::read(&owner.control()).committed;
    let key = BlockKey::new(NS, [0xee; 32]);
    let mut bad = vec![
        [0xdead_beefu64, 1, 2, 3, 4, 5, 6, 7], // unknown tag
        Request::Commit {
            slot: u32::MAX,
            gen: 0,
            len: 1,
            key,
        }
        .encode(), // out of range
        Request::Commit {
            slot: 3,
            gen: 0,
            len: 1,
            key,
        }
        .encode(), // not ours
        Request::Abort {
            slot: 1 << 30,
            gen: 0,
        }
        .encode(), // out of range
        [3 | 200 << 32, 0, 0, 0, 0, 0, 0, 0],  // touch count
    ];
    // A slot we do own, committed with an absurd length.
    assert!(eventually(Duration::from_secs(2), || !me.stash.is_empty()));
    let [w0] = me.stash.pop().unwrap().unwrap();
    bad.push(
        Request::Commit {
            slot: w0 as u32,
            gen: (w0 >> 32) as u32,
            len: u64::MAX,
            key,
        }
        .encode(),
    );
    for b in &bad {
        assert!(me.requests.push(b));
    }
    let h = seg.header();
    pegaflow_shm::doorbell::Doorbell {
        word: &h.doorbell,
        sleeping: &h.owner_sleeping,
    }
    .ring();
    assert!(
        eventually(Duration::from_secs(2), || me
            .entry
            .owner(pegaflow_shm::client::OwnerCounter::BadRequests)
            == 6),
        "bad requests counted: {}",
        me.entry
            .owner(pegaflow_shm::client::OwnerCounter::BadRequests)
    );
    assert!(owner.log_text().contains("ignored a bad request"));
    let a = Audit::read(&owner.control());
    assert_eq!(
        a.committed, committed_before,
        "garbage must not commit anything: {a:?}"
    );
    assert_eq!(a.bad_index_entries, 0);
    healthy(&owner, 4);

    // A corrupt ring (tail far beyond head) gets this client disconnected.
    me.requests.positions();
    let (head, _) = me.requests.positions();
    let tail_cell = unsafe_tail(&me);
    tail_cell.store(head + 1_000_000, Ordering::SeqCst);
    pegaflow_shm::doorbell::Doorbell {
        word: &h.doorbell,
        sleeping: &h.owner_sleeping,
    }
    .ring();
    let mut buf = [0u8; 1];
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
    assert_eq!(
        n, 0,
        "the owner should hang up on a client with a corrupt ring"
    );
    assert!(owner.log_text().contains("corrupted its request ring"));
    healthy(&owner, 5);
}

/// The request ring's tail word, to corrupt it on purpose.
fn unsafe_tail<'a>(
    c: &'a pegaflow_shm::segment::ClientView<'a>,
) -> &'a pegaflow_shm::sync::AtomicU64 {
    c.requests.tail_cell()
}

#[test]
fn peer_with_other_credentials_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: needs root to run a client as another user");
        return;
    }
    let owner = OwnerProc::start("creds");
    // Let anyone reach the socket so the owner's own check is what refuses.
    std::fs::set_permissions(
        &owner.socket,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let dir = owner.socket.parent().unwrap();
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_pf-engine"));
    let mut cmd = pegaflow_tests::engine_cmd(
        &bin,
        &[
            "load".into(),
            owner.socket.display().to_string(),
            owner.name.clone(),
            NS.to_string(),
            "1".into(),
            "0".into(),
            "1".into(),
        ],
    );
    // SAFETY: setgid/setuid in the child between fork and exec; both are
    // async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("permission denied") && text.contains("--group"),
        "{text}"
    );
    assert!(owner
        .log_text()
        .contains("refused an engine with other credentials"));
    healthy(&owner, 6);
}
