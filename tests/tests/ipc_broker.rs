//! The owner brokers CUDA IPC handles between engines: what one engine
//! publishes under a key, another fetches byte for byte. (The handles are
//! opaque bytes to the owner; tests/tests/gpu.rs opens real ones on a GPU.)

use std::time::Duration;

use pegaflow_tests::OwnerProc;

#[test]
fn published_handles_reach_other_engines() {
    let owner = OwnerProc::start("ipc");
    let a = pegaflow_core::Engine::connect(owner.engine_config(0, 0)).unwrap();
    let b = pegaflow_core::Engine::connect(owner.engine_config(0, 0)).unwrap();
    assert!(a.wait_connected(Duration::from_secs(5)) && b.wait_connected(Duration::from_secs(5)));
    let t = Duration::from_secs(5);

    assert_eq!(
        b.fetch_ipc("kv/tp0", t).unwrap(),
        None,
        "nothing published yet"
    );
    let handle: Vec<u8> = (0..64u8).collect();
    a.publish_ipc("kv/tp0", &handle).unwrap();
    // Publishing is one-way; the fetch that follows on another connection
    // may race it, so allow the owner a moment.
    assert!(pegaflow_tests::eventually(t, || b
        .fetch_ipc("kv/tp0", t)
        .unwrap()
        .as_deref()
        == Some(&handle[..])));
    // A newer handle under the same key replaces the old one.
    let newer = vec![7u8; 64];
    a.publish_ipc("kv/tp0", &newer).unwrap();
    assert!(pegaflow_tests::eventually(t, || b
        .fetch_ipc("kv/tp0", t)
        .unwrap()
        == Some(newer.clone())));
    // The publisher can read its own key too, and other keys stay unknown.
    assert_eq!(a.fetch_ipc("kv/tp0", t).unwrap(), Some(newer));
    assert_eq!(a.fetch_ipc("event/save/0", t).unwrap(), None);
}

#[test]
fn handles_survive_an_owner_restart() {
    let mut owner = OwnerProc::start("ipc-restart");
    let a = pegaflow_core::Engine::connect(owner.engine_config(0, 0)).unwrap();
    let b = pegaflow_core::Engine::connect(owner.engine_config(0, 0)).unwrap();
    let t = Duration::from_secs(5);
    assert!(a.wait_connected(t) && b.wait_connected(t));
    a.publish_ipc("event/save/tp0", &[9; 64]).unwrap();
    owner.kill9();
    owner.spawn();
    // The owner keeps handles in memory only; the publisher sends its own
    // again when it reconnects.
    assert!(
        pegaflow_tests::eventually(Duration::from_secs(10), || {
            b.is_connected() && b.fetch_ipc("event/save/tp0", t).ok().flatten() == Some(vec![9; 64])
        }),
        "handle not republished after the owner restart; log:\n{}",
        owner.log_text()
    );
}

#[test]
fn fetch_without_an_owner_is_a_clear_error_not_a_hang() {
    let mut owner = OwnerProc::start("ipc-gone");
    let a = pegaflow_core::Engine::connect(owner.engine_config(0, 0)).unwrap();
    assert!(a.wait_connected(Duration::from_secs(5)));
    owner.kill9();
    assert!(pegaflow_tests::eventually(Duration::from_secs(2), || !a.is_connected()));
    let err = a.fetch_ipc("kv/tp0", Duration::from_secs(1)).unwrap_err();
    assert!(
        matches!(err, pegaflow_core::EngineError::OwnerGone),
        "{err}"
    );
}
