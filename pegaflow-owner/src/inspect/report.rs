//! The read-only reports: `status`, `clients`, `pool`, `keys`. Each builds
//! one JSON value (`--json`) and a text rendering of the same facts.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use pegaflow_shm::client::client_state;
use pegaflow_shm::segment::pid_alive;
use pegaflow_shm::slot_table::SlotKind;
use pegaflow_shm::sync::Ordering;
use serde_json::{json, Value};

use super::{
    assigned_slots, client_state_name, engine_counters, hex, owner_counters, owner_facts,
    owner_state_name, slot_kind_name, BucketRead, InspectError, Target,
};

/// Human-readable bytes (binary units).
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Slot counts by kind over the assigned slabs, and committed bytes.
/// `Writing` slots are split: `stashed` (idle in a client's stash, handed
/// out but not taken yet) and `writing` (taken: being written or committed).
#[derive(Default)]
struct SlotCounts {
    free: u64,
    stashed: u64,
    writing: u64,
    committed: u64,
    evicting: u64,
    invalid: u64,
    committed_bytes: u64,
}

/// Slot ids waiting in some client's stash (as `Writing` of that client
/// at the generation the stash holds; anything else is `verify`'s business).
fn stashed_slots(t: &Target) -> std::collections::HashSet<u32> {
    let seg = &t.seg;
    let slots = seg.slots();
    let mut out = std::collections::HashSet::new();
    for i in 0..seg.max_clients() {
        let Some(c) = seg.client(i) else { continue };
        if c.entry.state() == client_state::FREE {
            continue;
        }
        let (head, tail) = c.stash.positions();
        if tail < head || tail - head > c.stash.capacity() {
            continue;
        }
        for w in t.stash_words(i, head, tail).unwrap_or_default() {
            let (slot, gen) = (w as u32, (w >> 32) as u32);
            let ours = slots
                .get(slot as usize)
                .and_then(|e| e.load_state())
                .is_some_and(|st| {
                    st.kind == SlotKind::Writing && u32::from(st.client) == i && st.gen == gen
                });
            if ours {
                out.insert(slot);
            }
        }
    }
    out
}

fn slot_counts(
    t: &Target,
    stashed: &std::collections::HashSet<u32>,
    slab: Option<u32>,
) -> SlotCounts {
    let slots = t.seg.slots();
    let mut c = SlotCounts::default();
    for s in assigned_slots(&t.seg) {
        if slab.is_some_and(|x| x != s.slab) {
            continue;
        }
        match s.state.map(|st| st.kind) {
            Some(SlotKind::Free) => c.free += 1,
            Some(SlotKind::Writing) if stashed.contains(&s.slot) => c.stashed += 1,
            Some(SlotKind::Writing) => c.writing += 1,
            Some(SlotKind::Committed) => {
                c.committed += 1;
                c.committed_bytes += slots[s.slot as usize].len.load(Ordering::Relaxed);
            }
            Some(SlotKind::Evicting) => c.evicting += 1,
            None => c.invalid += 1,
        }
    }
    c
}

fn slot_json(c: &SlotCounts) -> Value {
    json!({
        "free": c.free,
        "stashed": c.stashed,
        "writing": c.writing,
        "committed": c.committed,
        "evicting": c.evicting,
        "invalid": c.invalid,
    })
}

/// Length and (device, inode) of the file at `path`.
fn file_facts(path: &str) -> Option<(u64, (u64, u64))> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.len(), (m.dev(), m.ino())))
}

pub fn status(t: &Target) -> Result<(Value, String), InspectError> {
    let seg = &t.seg;
    let h = seg.header();
    let g = *seg.geometry();
    let o = owner_facts(seg);
    let counts = slot_counts(t, &stashed_slots(t), None);
    let index_entries = t
        .buckets()?
        .iter()
        .filter(|b| matches!(b, BucketRead::Entry { .. }))
        .count() as u64;
    let ssd_set = seg.ssd_set();
    let (ssd_entries, ssd_buckets) = (ssd_set.len() as u64, ssd_set.capacity() as u64);
    let (mut live, mut orphaned, mut quarantined) = (0u64, 0u64, 0u64);
    for i in 0..seg.max_clients() {
        match seg.client(i).map(|c| c.entry.state()) {
            Some(client_state::LIVE) => live += 1,
            Some(client_state::ORPHANED) => orphaned += 1,
            Some(client_state::QUARANTINED) => quarantined += 1,
            _ => {}
        }
    }
    let pool_path = h.pool_path();
    let pool_facts = file_facts(&pool_path);
    let pool_file = pool_facts.map(|(len, _)| len);
    // Whether the file at the pool path is the one this segment was created
    // with (an owner that made new segments replaced both files).
    let pool_is_ours = pool_facts.map(|(_, id)| id == (h.pool_dev, h.pool_ino));
    let owner_summary = if o.alive {
        format!("{} (pid {}, alive)", owner_state_name(o.state), o.pid)
    } else if o.state == pegaflow_shm::header::owner_state::STOPPED {
        format!("stopped cleanly (last owner pid {})", o.pid)
    } else if o.pid == 0 {
        format!("{} (never started)", owner_state_name(o.state))
    } else {
        format!(
            "not running: pid {} died while {} (killed or crashed; this is what it left, \
             which the next owner re-adopts)",
            o.pid,
            owner_state_name(o.state)
        )
    };
    let v = json!({
        "control": t.path.display().to_string(),
        "abi_version": h.abi_version,
        "segment_id": format!("{:#018x}", h.segment_id),
        "created_unix_ns": h.created_unix_ns,
        "owner": {
            "version": h.owner_version(),
            "state": owner_state_name(o.state),
            "pid": o.pid,
            "alive": o.alive,
            "epoch": o.epoch,
            "restarts": o.epoch.saturating_sub(1),
            "tick": o.tick,
        },
        "pool": {
            "path": pool_path,
            "bytes": g.pool_bytes,
            "file_bytes": pool_file,
            "file_is_this_segments": pool_is_ours,
            "dev": h.pool_dev,
            "ino": h.pool_ino,
            "hugepages": h.hugepages != 0,
        },
        "geometry": {
            "pool_bytes": g.pool_bytes,
            "slab_bytes": g.slab_bytes,
            "min_slot_bytes": g.granule_bytes,
            "slabs": g.num_slabs(),
            "max_slots": g.num_slots(),
            "max_clients": g.max_clients,
            "request_ring_cap": g.request_ring_cap,
            "stash_ring_cap": g.stash_ring_cap,
            "index_buckets": g.index_buckets,
        },
        "slots": slot_json(&counts),
        "committed_bytes": counts.committed_bytes,
        "index_entries": index_entries,
        "ssd": { "announced_blocks": ssd_entries, "membership_buckets": ssd_buckets },
        "clients": { "live": live, "orphaned": orphaned, "quarantined": quarantined },
    });
    let mut s = String::new();
    let _ = writeln!(s, "control     {}", t.path.display());
    let _ = writeln!(
        s,
        "segment     {:#018x}, shm ABI v{}",
        h.segment_id, h.abi_version
    );
    let _ = writeln!(
        s,
        "owner       {owner_summary}{}",
        h.owner_version()
            .map(|v| format!(", version {v}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "epoch       {} ({} restart{})",
        o.epoch,
        o.epoch.saturating_sub(1),
        if o.epoch == 2 { "" } else { "s" }
    );
    let _ = writeln!(
        s,
        "pool        {} at {}{}{}",
        human(g.pool_bytes),
        if pool_path.is_empty() {
            "?"
        } else {
            &pool_path
        },
        if h.hugepages != 0 { " (hugepages)" } else { "" },
        match (pool_file, pool_is_ours) {
            (None, _) => " [file missing]".to_string(),
            (_, Some(false)) => " [another file: this segment's pool was replaced]".to_string(),
            (Some(n), _) if n != g.pool_bytes => format!(" [file is {} bytes]", n),
            _ => String::new(),
        }
    );
    let _ = writeln!(
        s,
        "geometry    {} slabs of {}, min slot {}, {} slot ids, {} index buckets, {} client entries",
        g.num_slabs(),
        human(g.slab_bytes),
        human(g.granule_bytes),
        g.num_slots(),
        g.index_buckets,
        g.max_clients
    );
    let _ = writeln!(
        s,
        "slots       {} committed ({}), {} stashed, {} writing, {} free, {} evicting, {} invalid",
        counts.committed,
        human(counts.committed_bytes),
        counts.stashed,
        counts.writing,
        counts.free,
        counts.evicting,
        counts.invalid
    );
    let _ = writeln!(s, "index       {index_entries} entries");
    let _ = writeln!(
        s,
        "ssd tier    {ssd_entries} blocks announced (membership set of {ssd_buckets} buckets; 0 without --ssd-cache-path)"
    );
    let _ = writeln!(
        s,
        "clients     {live} live, {orphaned} orphaned, {quarantined} quarantined"
    );
    Ok((v, s))
}

pub fn clients(t: &Target) -> Result<(Value, String), InspectError> {
    let seg = &t.seg;
    let mut rows = Vec::new();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>4} {:<9} {:>8} {:<5} {:<16} {:<18} {:>10} {:>11} {:>11} {:>7}",
        "id", "state", "pid", "alive", "label", "namespace", "slot", "requests", "stash", "pinned"
    );
    for i in 0..seg.max_clients() {
        let Some(c) = seg.client(i) else { continue };
        let e = c.entry;
        let state = e.state();
        if state == client_state::FREE {
            continue;
        }
        let pid = e.pid.load(Ordering::Relaxed);
        let alive = pid_alive(pid);
        let (rh, rt) = c.requests.positions();
        let (sh, st) = c.stash.positions();
        let pinned = c
            .pins
            .iter()
            .filter(|p| p.load(Ordering::Relaxed) != 0)
            .count();
        let ns = e.namespace.load(Ordering::Relaxed);
        let slot_bytes = e.slot_bytes.load(Ordering::Relaxed);
        let target = e.stash_target.load(Ordering::Relaxed);
        let label = e.label();
        let engine: BTreeMap<_, _> = engine_counters(e).into_iter().collect();
        let owner: BTreeMap<_, _> = owner_counters(e).into_iter().collect();
        rows.push(json!({
            "client": i,
            "state": client_state_name(state),
            "pid": pid,
            "alive": alive,
            "uid": e.uid.load(Ordering::Relaxed),
            "label": label,
            "namespace": format!("{ns:#018x}"),
            "slot_bytes": slot_bytes,
            "epoch": e.epoch.load(Ordering::Relaxed),
            "request_ring": { "head": rh, "tail": rt, "depth": rt.wrapping_sub(rh), "capacity": c.requests.capacity() },
            "stash": {
                "head": sh, "tail": st, "depth": st.wrapping_sub(sh),
                "capacity": c.stash.capacity(), "target": target,
                "refill_pending": e.refill_asked.load(Ordering::Relaxed) != e.refill_done.load(Ordering::Relaxed),
            },
            "pinned_slots": pinned,
            "engine_counters": engine,
            "owner_counters": owner,
        }));
        let _ = writeln!(
            s,
            "{:>4} {:<9} {:>8} {:<5} {:<16} {:<18} {:>10} {:>11} {:>11} {:>7}",
            i,
            client_state_name(state),
            pid,
            if alive { "yes" } else { "NO" },
            label,
            format!("{ns:#018x}"),
            human(slot_bytes),
            format!("{}/{}", rt.wrapping_sub(rh), c.requests.capacity()),
            format!("{}/{}", st.wrapping_sub(sh), target),
            pinned
        );
        let counters = engine_counters(e)
            .into_iter()
            .chain(owner_counters(e))
            .filter(|(_, v)| *v != 0)
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        if !counters.is_empty() {
            let _ = writeln!(s, "     {counters}");
        }
    }
    if rows.is_empty() {
        s.push_str("(no clients)\n");
    }
    Ok((json!({ "clients": rows }), s))
}

pub fn pool(t: &Target) -> Result<(Value, String), InspectError> {
    let seg = &t.seg;
    let g = *seg.geometry();
    let per = g.slots_per_slab();
    let mut slabs = Vec::new();
    let mut by_size: BTreeMap<u64, (u64, u64, SlotCounts)> = BTreeMap::new();
    let mut free_slabs = 0;
    let stashed = stashed_slots(t);
    for (i, slab) in seg.slabs().iter().enumerate() {
        let stride = slab.stride.load(Ordering::Acquire);
        if stride == 0 {
            free_slabs += 1;
            continue;
        }
        let bytes = slab.slot_bytes.load(Ordering::Relaxed);
        let nslots = u64::from(slab.nslots.load(Ordering::Relaxed));
        let c = slot_counts(t, &stashed, Some(i as u32));
        slabs.push(json!({
            "slab": i,
            "first_slot": i as u64 * per,
            "block_bytes": bytes,
            "stride": stride,
            "nslots": nslots,
            "slots": slot_json(&c),
            "committed_bytes": c.committed_bytes,
        }));
        let e = by_size
            .entry(bytes)
            .or_insert((0, 0, SlotCounts::default()));
        e.0 += 1;
        e.1 += nslots;
        e.2.free += c.free;
        e.2.stashed += c.stashed;
        e.2.writing += c.writing;
        e.2.committed += c.committed;
        e.2.evicting += c.evicting;
        e.2.invalid += c.invalid;
        e.2.committed_bytes += c.committed_bytes;
    }
    let classes: Vec<Value> = by_size
        .iter()
        .map(|(bytes, (n, slots, c))| {
            json!({
                "block_bytes": bytes,
                "slabs": n,
                "slots": slots,
                "by_state": slot_json(c),
                "committed_bytes": c.committed_bytes,
            })
        })
        .collect();
    let v = json!({
        "pool_bytes": g.pool_bytes,
        "slab_bytes": g.slab_bytes,
        "min_slot_bytes": g.granule_bytes,
        "slabs_total": g.num_slabs(),
        "slabs_free": free_slabs,
        "block_sizes": classes,
        "slabs": slabs,
    });
    let mut s = String::new();
    let _ = writeln!(
        s,
        "pool {} in {} slabs of {} ({} free), min slot {}",
        human(g.pool_bytes),
        g.num_slabs(),
        human(g.slab_bytes),
        free_slabs,
        human(g.granule_bytes)
    );
    let _ = writeln!(
        s,
        "{:>12} {:>6} {:>8} {:>10} {:>8} {:>8} {:>8} {:>9} {:>12}",
        "block size",
        "slabs",
        "slots",
        "committed",
        "stashed",
        "writing",
        "free",
        "evicting",
        "used"
    );
    for (bytes, (n, slots, c)) in &by_size {
        let _ = writeln!(
            s,
            "{:>12} {:>6} {:>8} {:>10} {:>8} {:>8} {:>8} {:>9} {:>12}",
            human(*bytes),
            n,
            slots,
            c.committed,
            c.stashed,
            c.writing,
            c.free,
            c.evicting,
            human(c.committed_bytes)
        );
    }
    if by_size.is_empty() {
        s.push_str("(no slab assigned yet: nothing was saved)\n");
    }
    Ok((v, s))
}

pub fn keys(
    t: &Target,
    namespace: Option<u64>,
    limit: Option<usize>,
) -> Result<(Value, String), InspectError> {
    let seg = &t.seg;
    let slots = seg.slots();
    let indexed: std::collections::HashMap<_, u32> = t
        .buckets()?
        .into_iter()
        .filter_map(|b| match b {
            BucketRead::Entry { key, slot } => Some((key, slot)),
            _ => None,
        })
        .collect();
    let mut rows = Vec::new();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>8} {:<18} {:<64} {:>10} {:>6} {:<9} {:>7}",
        "slot", "namespace", "hash", "bytes", "gen", "state", "indexed"
    );
    let mut total = 0usize;
    for info in assigned_slots(seg) {
        let Some(st) = info.state else { continue };
        if !matches!(st.kind, SlotKind::Committed | SlotKind::Evicting) {
            continue;
        }
        let e = &slots[info.slot as usize];
        let key = e.key();
        if namespace.is_some_and(|ns| ns != key.namespace) {
            continue;
        }
        total += 1;
        if limit.is_some_and(|l| rows.len() >= l) {
            continue;
        }
        let len = e.len.load(Ordering::Relaxed);
        let in_index = indexed.get(&key) == Some(&info.slot);
        rows.push(json!({
            "slot": info.slot,
            "namespace": format!("{:#018x}", key.namespace),
            "hash": hex(&key.hash),
            "bytes": len,
            "gen": st.gen,
            "state": slot_kind_name(st.kind),
            "last_access": e.last_access.load(Ordering::Relaxed),
            "indexed": in_index,
        }));
        let _ = writeln!(
            s,
            "{:>8} {:<18} {:<64} {:>10} {:>6} {:<9} {:>7}",
            info.slot,
            format!("{:#018x}", key.namespace),
            hex(&key.hash),
            len,
            st.gen,
            slot_kind_name(st.kind),
            if in_index { "yes" } else { "NO" }
        );
    }
    let _ = writeln!(
        s,
        "{total} key{}{}{}",
        if total == 1 { "" } else { "s" },
        namespace
            .map(|ns| format!(" in namespace {ns:#018x}"))
            .unwrap_or_default(),
        if rows.len() < total {
            format!(" ({} shown; raise --limit)", rows.len())
        } else {
            String::new()
        }
    );
    Ok((
        json!({
            "namespace": namespace.map(|ns| format!("{ns:#018x}")),
            "total": total,
            "shown": rows.len(),
            "keys": rows,
        }),
        s,
    ))
}
