//! GPU tests of the data path: every copy backend against the conformance
//! suite, layer-wise transfers for every layout through a real shm pool
//! file, two processes sharing blocks through the pool, CUDA IPC (events and
//! KV memory, peer copies) between two processes, and an engine SIGKILLed
//! mid-copy.
//!
//! On a machine without libcuda (or without a GPU) every test prints
//! `SKIPPED: no CUDA driver (libcuda) on this machine` and passes; run them
//! on a GPU machine with scripts/gpu-test.sh (docs/gpu.md).
//!
//! Child processes are this test binary re-executed on the test
//! `gpu_child_entry` with `PEGAFLOW_GPU_CHILD` set.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pegaflow_core::copy::conformance::{self, GpuMemory, LayoutCase, TestCache, TestMemory};
use pegaflow_core::copy::dma::{DmaBackend, DmaMode};
use pegaflow_core::copy::kernel::KernelBackend;
use pegaflow_core::copy::{
    faster_load_backend, AutoBackend, CopyBackend, CopyBackendKind, Direction, CALIBRATION_BYTES,
};
use pegaflow_core::cuda::{self, ipc, CudaDevice, HostRegistration, Stream};
use pegaflow_core::transfer::KvTransfer;

const CHILD_ENV: &str = "PEGAFLOW_GPU_CHILD";

fn device() -> Option<Arc<CudaDevice>> {
    if !cuda::driver_present() {
        eprintln!("SKIPPED: no CUDA driver (libcuda) on this machine");
        return None;
    }
    if cuda::device_count() == 0 {
        eprintln!("SKIPPED: libcuda is present but sees no GPU");
        return None;
    }
    Some(CudaDevice::open(0).expect("open GPU 0"))
}

fn backends(d: &Arc<CudaDevice>) -> Vec<Arc<dyn CopyBackend>> {
    vec![
        Arc::new(DmaBackend::new(d).expect("dma backend")),
        Arc::new(DmaBackend::with_mode(d, DmaMode::PerPiece).expect("dma loop backend")),
        Arc::new(KernelBackend::new(d).expect("kernel backend")),
        Arc::new(AutoBackend::new(d).expect("auto backend")),
    ]
}

/// A pool file mapped shared, like the owner's pool segment.
struct PoolFile {
    path: std::path::PathBuf,
    base: *mut u8,
    len: usize,
    unlink: bool,
}

impl PoolFile {
    fn create(len: usize) -> PoolFile {
        let dir = std::env::var("PEGAFLOW_TEST_SHM_DIR").unwrap_or_else(|_| "/dev/shm".into());
        let path = std::path::PathBuf::from(dir).join(format!(
            "pegaflow-gputest-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("create pool file");
        f.set_len(len as u64).expect("size pool file");
        let mut p = Self::map(&path, len);
        p.unlink = true;
        p
    }

    fn map(path: &std::path::Path, len: usize) -> PoolFile {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open pool file");
        // SAFETY: shared mapping of a file we just opened, no fixed address.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert!(base != libc::MAP_FAILED, "mmap pool file");
        PoolFile {
            path: path.to_owned(),
            base: base as *mut u8,
            len,
            unlink: false,
        }
    }

    fn register(&self, d: &Arc<CudaDevice>) -> Arc<HostRegistration> {
        // SAFETY: the mapping outlives the registration in every test (the
        // registration is dropped before the PoolFile).
        Arc::new(
            unsafe { cuda::register_pool(d, self.base, self.len) }.expect("cuMemHostRegister pool"),
        )
    }

    fn slot(&self, slot_bytes: usize, i: usize) -> usize {
        assert!((i + 1) * slot_bytes <= self.len);
        self.base as usize + i * slot_bytes
    }

    fn bytes(&self, off: usize, len: usize) -> &[u8] {
        assert!(off + len <= self.len);
        // SAFETY: inside the mapping; callers read after copies completed.
        unsafe { std::slice::from_raw_parts(self.base.add(off), len) }
    }
}

impl Drop for PoolFile {
    fn drop(&mut self) {
        // SAFETY: mapped in map(), unmapped once.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
        if self.unlink {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn rand_suffix() -> u64 {
    // Unique per call within the process; the pid separates processes.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn spawn_child(role: &str, args: &[String]) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("current exe"));
    c.args([
        "--exact",
        "gpu_child_entry",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(
        CHILD_ENV,
        std::iter::once(role.to_string())
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join("|"),
    );
    c
}

// ---------------------------------------------------------------- suites

#[test]
fn conformance_dma_batch() {
    let Some(d) = device() else { return };
    let b = DmaBackend::new(&d).unwrap();
    eprintln!("batch api: {:?}", b.batch_api());
    assert!(
        b.batch_api().is_some() || cuda::driver_version().unwrap() < 12080,
        "a 12.8+ driver must offer cuMemcpyBatchAsync"
    );
    conformance::run_all(&b, &mut GpuMemory::new(&d).unwrap());
}

#[test]
fn conformance_dma_loop() {
    let Some(d) = device() else { return };
    conformance::run_all(
        &DmaBackend::with_mode(&d, DmaMode::PerPiece).unwrap(),
        &mut GpuMemory::new(&d).unwrap(),
    );
}

#[test]
fn conformance_kernel() {
    let Some(d) = device() else { return };
    conformance::run_all(
        &KernelBackend::new(&d).unwrap(),
        &mut GpuMemory::new(&d).unwrap(),
    );
}

#[test]
fn conformance_kernel_few_ctas() {
    // A grid far smaller than the piece count exercises the grid-stride loop.
    let Some(d) = device() else { return };
    conformance::run_all(
        &KernelBackend::new(&d).unwrap().with_max_ctas(3),
        &mut GpuMemory::new(&d).unwrap(),
    );
}

#[test]
fn conformance_auto() {
    let Some(d) = device() else { return };
    conformance::run_all(
        &AutoBackend::new(&d).unwrap(),
        &mut GpuMemory::new(&d).unwrap(),
    );
}

#[test]
fn auto_times_loads_on_a_pool_file_and_loads_with_the_faster_backend() {
    let Some(d) = device() else { return };
    let pool = PoolFile::create(2 * CALIBRATION_BYTES);
    let reg = pool.register(&d);
    let auto = AutoBackend::new(&d).unwrap();
    let piece = 32 << 10;
    let choice = |dir| {
        let p = pegaflow_core::layout::Piece {
            host: 0,
            device: 0,
            len: piece,
        };
        auto.choose(&[p], dir)
    };
    match auto.calibrate_loads(&d, &reg, piece).expect("calibration") {
        None => {
            assert!(
                DmaBackend::new(&d).unwrap().batch_api().is_none(),
                "with batched DMA, 32 KiB pieces are timed"
            );
            eprintln!("SKIPPED the timing: this driver has no batched DMA");
        }
        Some(c) => {
            eprintln!("calibration: {c:?}");
            assert_eq!(c.piece, piece);
            assert_eq!(c.bytes, CALIBRATION_BYTES);
            assert!(c.dma_gbps > 1.0 && c.kernel_gbps > 1.0, "{c:?}");
            assert_eq!(c.chosen, faster_load_backend(c.dma_gbps, c.kernel_gbps));
            assert_eq!(choice(Direction::HostToDevice), c.chosen);
            assert_eq!(choice(Direction::DeviceToHost), CopyBackendKind::Dma);
        }
    }
    // what the rule settles alone is not timed; nor a pool too small
    assert_eq!(auto.calibrate_loads(&d, &reg, 16 << 10).unwrap(), None);
    assert_eq!(auto.calibrate_loads(&d, &reg, 256 << 10).unwrap(), None);
    let small = PoolFile::create(CALIBRATION_BYTES);
    let small_reg = small.register(&d);
    assert_eq!(auto.calibrate_loads(&d, &small_reg, piece).unwrap(), None);
    // whatever it chose, it copies right
    conformance::run_all(&auto, &mut GpuMemory::new(&d).unwrap());
    drop((reg, small_reg));
}

// ------------------------------------------------- layer-wise transfers

#[test]
fn layerwise_transfer_every_backend_every_layout_through_a_pool_file() {
    let Some(d) = device() else { return };
    let cases = [
        LayoutCase::SplitKvLeading,
        LayoutCase::SplitBlockLeading,
        LayoutCase::Mla,
        LayoutCase::CrossLayer,
    ];
    for backend in backends(&d) {
        for case in cases {
            let what = format!("{} {case:?}", backend.name());
            let mut m = GpuMemory::new(&d).unwrap();
            let cache = TestCache::new(&mut m, case, 4, 40, 32 << 10);
            cache.fill(&mut m);
            let sb = cache.layout.slot_bytes();
            let pool = PoolFile::create(32 * sb);
            let reg = pool.register(&d);
            let mut t = KvTransfer::new(cache.layout.clone(), backend.clone(), Some(d.clone()))
                .unwrap()
                .with_pool(reg.clone());
            let blocks: Vec<u32> = vec![7, 8, 9, 10, 0, 39, 20, 21];
            let slots: Vec<usize> = [0usize, 1, 2, 3, 10, 11, 30, 31]
                .iter()
                .map(|&i| pool.slot(sb, i))
                .collect();
            let stream = m.stream();
            for l in 0..cache.layout.num_segments() {
                // SAFETY: slots are in the registered pool, the cache is alive.
                unsafe { t.save(l..l + 1, &blocks, &slots, stream) }.unwrap();
            }
            assert!(t.save_done(true).unwrap(), "{what}");
            assert!(
                t.save_event_handle().unwrap().is_some(),
                "{what}: GPU save events are interprocess"
            );
            cache.verify_saved(
                &blocks,
                &slots,
                0..cache.layout.num_segments(),
                &format!("{what} save"),
            );
            // An address outside the pool is refused, not copied.
            let outside = [pool.base as usize + pool.len];
            // SAFETY: refused before any copy.
            assert!(unsafe { t.save(0..1, &[1], &outside, stream) }.is_err());

            cache.clear(&mut m);
            let dst: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 30, 31];
            // SAFETY: as above.
            unsafe { t.load(0..cache.layout.num_segments(), &dst, &slots, stream) }.unwrap();
            // Host waits layer by layer; the last layer implies all.
            for l in 0..cache.layout.num_segments() {
                t.wait_layer(l).unwrap();
                assert!(t.layer_ready(l).unwrap());
            }
            cache.verify_loaded(&mut m, &blocks, &dst, &format!("{what} load"));

            // GPU-side wait: a second stream waits for the last layer, then
            // copies the loaded bytes out; it must see them.
            cache.clear(&mut m);
            let other = Stream::new(&d).unwrap();
            // SAFETY: as above.
            unsafe { t.load(0..cache.layout.num_segments(), &dst, &slots, stream) }.unwrap();
            t.stream_wait_layer(cache.layout.num_segments() - 1, other.as_ref())
                .unwrap();
            other.synchronize().unwrap();
            assert!(
                t.layer_ready(cache.layout.num_segments() - 1).unwrap(),
                "{what}: stream wait returned before the layer arrived"
            );
            cache.verify_loaded(&mut m, &blocks, &dst, &format!("{what} reload"));
            drop(t);
            drop(reg);
        }
    }
}

// ------------------------------------------------------ multi-process

#[test]
fn gpu_child_entry() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('|').collect();
    let ordinal = std::env::var("PEGAFLOW_GPU_CHILD_DEVICE")
        .map_or(0, |v| v.parse().expect("device ordinal"));
    let d = CudaDevice::open(ordinal).expect("child: open GPU");
    match parts[0] {
        "load" => child_load(&d, &parts[1..]),
        "ipc" => child_ipc(&d, &parts[1..]),
        "save-forever" => child_save_forever(&d, &parts[1..]),
        other => panic!("unknown child role {other}"),
    }
}

const SHARE_LAYERS: usize = 4;
const SHARE_BLOCKS: usize = 64;
const SHARE_PIECE: usize = 32 << 10;

fn parse_list(s: &str) -> Vec<usize> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| x.parse().expect("child arg"))
        .collect()
}

/// Child: map the pool file, register it, load the given slots into fresh
/// GPU blocks and verify they hold the parent's blocks.
fn child_load(d: &Arc<CudaDevice>, args: &[&str]) {
    let (path, len, backend) = (args[0], args[1].parse::<usize>().unwrap(), args[2]);
    let src_blocks: Vec<u32> = parse_list(args[3]).into_iter().map(|b| b as u32).collect();
    let slot_idx = parse_list(args[4]);
    let pool = PoolFile::map(std::path::Path::new(path), len);
    let reg = pool.register(d);
    let mut m = GpuMemory::new(d).unwrap();
    let cache = TestCache::new(
        &mut m,
        LayoutCase::SplitKvLeading,
        SHARE_LAYERS,
        SHARE_BLOCKS,
        SHARE_PIECE,
    );
    let b = pegaflow_core::copy::make_backend(backend.parse().unwrap(), Some(d)).unwrap();
    let mut t = KvTransfer::new(cache.layout.clone(), b, Some(d.clone()))
        .unwrap()
        .with_pool(reg.clone());
    let sb = cache.layout.slot_bytes();
    let slots: Vec<usize> = slot_idx.iter().map(|&i| pool.slot(sb, i)).collect();
    let dst: Vec<u32> = (0..src_blocks.len() as u32)
        .map(|i| SHARE_BLOCKS as u32 - 1 - i)
        .collect();
    // SAFETY: slots inside the registered pool; cache alive.
    unsafe { t.load(0..SHARE_LAYERS, &dst, &slots, m.stream()) }.unwrap();
    t.wait_layer(SHARE_LAYERS - 1).unwrap();
    cache.verify_loaded(&mut m, &src_blocks, &dst, "child load");
    println!("CHILD-OK loaded {} blocks", dst.len());
}

#[test]
fn two_processes_share_blocks_through_the_pool_file() {
    let Some(d) = device() else { return };
    for backend in ["dma", "kernel"] {
        let mut m = GpuMemory::new(&d).unwrap();
        let cache = TestCache::new(
            &mut m,
            LayoutCase::SplitKvLeading,
            SHARE_LAYERS,
            SHARE_BLOCKS,
            SHARE_PIECE,
        );
        cache.fill(&mut m);
        let sb = cache.layout.slot_bytes();
        let pool = PoolFile::create(64 * sb);
        let reg = pool.register(&d);
        let b = pegaflow_core::copy::make_backend(backend.parse().unwrap(), Some(&d)).unwrap();
        let mut t = KvTransfer::new(cache.layout.clone(), b, Some(d.clone()))
            .unwrap()
            .with_pool(reg.clone());
        let blocks: Vec<u32> = (0..20).map(|i| (i * 3) as u32).collect();
        let slot_idx: Vec<usize> = (0..20).map(|i| 63 - 2 * i).collect();
        let slots: Vec<usize> = slot_idx.iter().map(|&i| pool.slot(sb, i)).collect();
        for l in 0..SHARE_LAYERS {
            // SAFETY: slots inside the registered pool; cache alive.
            unsafe { t.save(l..l + 1, &blocks, &slots, m.stream()) }.unwrap();
        }
        t.save_done(true).unwrap();
        let join = |v: &[usize]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let out = spawn_child(
            "load",
            &[
                pool.path.display().to_string(),
                pool.len.to_string(),
                backend.into(),
                join(&blocks.iter().map(|&b| b as usize).collect::<Vec<_>>()),
                join(&slot_idx),
            ],
        )
        .output()
        .expect("spawn child");
        let so = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && so.contains("CHILD-OK"),
            "{backend}: child failed: {so}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Child: fetch the parent's KV memory and save-event handles from the
/// owner, wait for the event on its stream, pull blocks into its own cache,
/// verify, then push its own blocks into the parent's cache.
fn child_ipc(d: &Arc<CudaDevice>, args: &[&str]) {
    let (socket, name) = (args[0], args[1]);
    let engine = pegaflow_core::Engine::connect(pegaflow_core::EngineConfig {
        name: name.into(),
        socket: Some(socket.into()),
        label: "gpu ipc child".into(),
        ..Default::default()
    })
    .expect("child: connect to the owner");
    assert!(
        engine.wait_connected(std::time::Duration::from_secs(10)),
        "child: owner not reachable"
    );
    let fetch = |key: &str| {
        engine
            .fetch_ipc(key, std::time::Duration::from_secs(10))
            .expect("fetch from the owner")
            .unwrap_or_else(|| panic!("the owner has no handle under {key}"))
    };
    let export = ipc::KvIpcExport::decode(&fetch("gpu-test/kv")).expect("decode export");
    let ev_bytes = fetch("gpu-test/save-event");
    let ev_handle: [u8; 64] = ev_bytes
        .as_slice()
        .try_into()
        .expect("64-byte event handle");
    let mut m = GpuMemory::new(d).unwrap();
    let mine = TestCache::new(
        &mut m,
        LayoutCase::SplitKvLeading,
        SHARE_LAYERS,
        SHARE_BLOCKS,
        SHARE_PIECE,
    );
    let remote = ipc::ImportedKv::open(d, &export, &mine.layout).expect("import KV");
    let ev = ipc::import_event(d, &ev_handle).expect("import event");
    ev.wait_on(m.stream()).unwrap();
    let pairs: Vec<(u32, u32)> = (0..10).map(|i| (i as u32, (i * 5) as u32)).collect();
    // Blocks 0..5 with the copy engines, 5..10 (runs of one block, listed
    // backwards) with the copy kernel reading the peer's memory.
    let kernel = KernelBackend::new(d).expect("copy kernel");
    let backwards: Vec<(u32, u32)> = pairs[5..].iter().rev().copied().collect();
    for (part, k, want) in [
        (&pairs[..5], None, CopyBackendKind::Dma),
        (&backwards[..], Some(&kernel), CopyBackendKind::Kernel),
    ] {
        // SAFETY: both caches alive until the sync below.
        let used = unsafe {
            ipc::copy_peer_blocks(
                d,
                &mine.layout,
                remote.layout(),
                part,
                0..SHARE_LAYERS,
                ipc::PeerDirection::Pull,
                k,
                m.stream(),
            )
        }
        .expect("peer pull");
        assert_eq!(used, want, "peer pull of {part:?}");
    }
    m.sync();
    let (dst, src): (Vec<u32>, Vec<u32>) = pairs.iter().copied().unzip();
    mine.verify_loaded(&mut m, &src, &dst, "ipc pull");
    // Push our blocks 0..10 (holding remote blocks 0,5,..) into remote
    // blocks 50..60.
    let push: Vec<(u32, u32)> = (0..10).map(|i| (i as u32, 50 + i as u32)).collect();
    // SAFETY: as above.
    unsafe {
        ipc::copy_peer_blocks(
            d,
            &mine.layout,
            remote.layout(),
            &push,
            0..SHARE_LAYERS,
            ipc::PeerDirection::Push,
            None,
            m.stream(),
        )
    }
    .expect("peer push");
    m.sync();
    drop(remote);
    println!("CHILD-OK ipc");
}

#[test]
fn ipc_kv_memory_and_event_between_two_processes() {
    ipc_through_the_owner(0);
}

/// Two engines on two GPUs of one host: the second pulls and pushes blocks
/// over the GPUs' peer link (NVLink or PCIe peer-to-peer).
#[test]
fn ipc_between_two_gpus_of_one_host() {
    if device().is_none() {
        return;
    }
    if cuda::device_count() < 2 {
        eprintln!("SKIPPED: needs two GPUs (run on the nvidia-h200-x2 device kind)");
        return;
    }
    ipc_through_the_owner(1);
}

/// The parent publishes its KV memory and save event with the owner; a
/// child engine on GPU `child_device` fetches them from the owner.
fn ipc_through_the_owner(child_device: i32) {
    let Some(d) = device() else { return };
    let owner = pegaflow_tests::OwnerProc::start("gpu-ipc");
    let engine =
        pegaflow_core::Engine::connect(owner.engine_config(0, 0)).expect("connect to the owner");
    assert!(engine.wait_connected(std::time::Duration::from_secs(10)));
    let mut m = GpuMemory::new(&d).unwrap();
    let cache = TestCache::new(
        &mut m,
        LayoutCase::SplitKvLeading,
        SHARE_LAYERS,
        SHARE_BLOCKS,
        SHARE_PIECE,
    );
    cache.fill(&mut m);
    let export = ipc::export_kv(&d, &cache.layout).expect("export KV");
    assert_eq!(
        export.allocations.len(),
        SHARE_LAYERS,
        "one allocation per layer tensor"
    );
    let ev = cuda::Event::interprocess(&d).unwrap();
    ev.record(m.stream()).unwrap();
    engine.publish_ipc("gpu-test/kv", &export.encode()).unwrap();
    engine
        .publish_ipc("gpu-test/save-event", &ipc::export_event(&ev).unwrap())
        .unwrap();
    let out = spawn_child(
        "ipc",
        &[owner.socket.display().to_string(), owner.name.clone()],
    )
    .env("PEGAFLOW_GPU_CHILD_DEVICE", child_device.to_string())
    .output()
    .expect("spawn child");
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && so.contains("CHILD-OK"),
        "ipc child failed: {so}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The child pushed remote blocks 0,5,..,45 into our blocks 50..60.
    let mut src: Vec<u32> = (0..SHARE_BLOCKS as u32).collect();
    for i in 0..10u32 {
        src[50 + i as usize] = i * 5;
    }
    let dst: Vec<u32> = (0..SHARE_BLOCKS as u32).collect();
    cache.verify_loaded(&mut m, &src, &dst, "ipc push seen by the exporter");
}

/// Child: register the pool and save into slots `first..first+n` forever,
/// announcing on stdout once copies are in flight.
fn child_save_forever(d: &Arc<CudaDevice>, args: &[&str]) {
    let (path, len, first, n) = (
        args[0],
        args[1].parse::<usize>().unwrap(),
        args[2].parse::<usize>().unwrap(),
        args[3].parse::<usize>().unwrap(),
    );
    let pool = PoolFile::map(std::path::Path::new(path), len);
    let reg = pool.register(d);
    let mut m = GpuMemory::new(d).unwrap();
    let cache = TestCache::new(
        &mut m,
        LayoutCase::SplitKvLeading,
        SHARE_LAYERS,
        SHARE_BLOCKS,
        SHARE_PIECE,
    );
    cache.fill(&mut m);
    let b = pegaflow_core::copy::make_backend("kernel".parse().unwrap(), Some(d)).unwrap();
    let mut t = KvTransfer::new(cache.layout.clone(), b, Some(d.clone()))
        .unwrap()
        .with_pool(reg.clone());
    let sb = cache.layout.slot_bytes();
    let blocks: Vec<u32> = (0..n as u32).collect();
    let slots: Vec<usize> = (first..first + n).map(|i| pool.slot(sb, i)).collect();
    let mut announced = false;
    loop {
        for l in 0..SHARE_LAYERS {
            // SAFETY: slots inside the registered pool; cache alive.
            unsafe { t.save(l..l + 1, &blocks, &slots, m.stream()) }.unwrap();
        }
        if !announced {
            println!("COPYING");
            std::io::stdout().flush().unwrap();
            announced = true;
        }
        // Keep a few saves in flight without an unbounded queue.
        let _ = t.save_done(false);
    }
}

#[test]
fn engine_sigkilled_mid_copy_leaves_the_pool_usable() {
    let Some(d) = device() else { return };
    let layout_sb = {
        let mut m = GpuMemory::new(&d).unwrap();
        TestCache::new(
            &mut m,
            LayoutCase::SplitKvLeading,
            SHARE_LAYERS,
            SHARE_BLOCKS,
            SHARE_PIECE,
        )
        .layout
        .slot_bytes()
    };
    let pool = PoolFile::create(96 * layout_sb);
    // "Committed" blocks in slots 0..32, written by the host: the killed
    // engine never touches them, so they must survive bit for bit.
    let committed = conformance::pattern(99, 32 * layout_sb);
    // SAFETY: inside our mapping, nobody else maps it yet.
    unsafe { std::ptr::copy_nonoverlapping(committed.as_ptr(), pool.base, committed.len()) };

    let mut child = spawn_child(
        "save-forever",
        &[
            pool.path.display().to_string(),
            pool.len.to_string(),
            "32".into(),
            "32".into(),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .spawn()
    .expect("spawn saver");
    let mut lines = BufReader::new(child.stdout.take().expect("child stdout")).lines();
    let t0 = Instant::now();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("COPYING") => break,
            Some(Ok(_)) => continue,
            other => {
                let _ = child.kill();
                panic!("saver never started copying: {other:?}");
            }
        }
    }
    // Let it run a little with copies in flight, then SIGKILL it.
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGKILL) }, 0);
    let status = child.wait().expect("wait saver");
    assert!(!status.success(), "saver was killed");
    eprintln!("saver killed after {:?}", t0.elapsed());

    // The committed slots are untouched.
    assert!(
        pool.bytes(0, committed.len()) == committed.as_slice(),
        "committed slots changed after the saver was killed"
    );
    // Another process (this one) can register the same pool and copy
    // through the slots the dead saver was writing.
    let reg = pool.register(&d);
    let mut m = GpuMemory::new(&d).unwrap();
    let cache = TestCache::new(
        &mut m,
        LayoutCase::SplitKvLeading,
        SHARE_LAYERS,
        SHARE_BLOCKS,
        SHARE_PIECE,
    );
    cache.fill(&mut m);
    let b = pegaflow_core::copy::make_backend("auto".parse().unwrap(), Some(&d)).unwrap();
    let mut t = KvTransfer::new(cache.layout.clone(), b, Some(d.clone()))
        .unwrap()
        .with_pool(reg.clone());
    let sb = cache.layout.slot_bytes();
    let blocks: Vec<u32> = (10..42).collect();
    let slots: Vec<usize> = (32..64).map(|i| pool.slot(sb, i)).collect();
    // SAFETY: slots inside the registered pool; cache alive.
    unsafe { t.save(0..SHARE_LAYERS, &blocks, &slots, m.stream()) }.unwrap();
    t.save_done(true).unwrap();
    cache.verify_saved(&blocks, &slots, 0..SHARE_LAYERS, "save after the kill");
    cache.clear(&mut m);
    // SAFETY: as above.
    unsafe { t.load(0..SHARE_LAYERS, &blocks, &slots, m.stream()) }.unwrap();
    t.wait_layer(SHARE_LAYERS - 1).unwrap();
    cache.verify_loaded(&mut m, &blocks, &blocks, "load after the kill");
    assert!(
        pool.bytes(0, committed.len()) == committed.as_slice(),
        "committed slots changed"
    );
    drop(t);
    drop(reg);
}
