"""Every metric docs/operations.md documents, checked against what real
engines did.

One real owner (metrics on, restarted once), and the engines vLLM runs:
the real vLLM scheduler with PegaKVConnector (a lookup-only ``Engine``)
and its two TP workers (``KvCache`` on CPU tensors), plus pegaflow-core
engines in their own processes (``pf-engine``: savers under pool
pressure, a pinning reader, a hand-made engine that queues a bad request,
one that hangs up) and a ``KvCache`` whose request ring the test fills
while the owner's request loop is stopped (ptrace: that thread only).

Expected values come from what the test made happen (prompt lengths, block
counts, what each ``pf-engine`` reported), not from the owner; every
counter must have moved. A metric added to the docs without a check here
fails the test.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import pegaflow
from pegaflow import _native
from pegaflow.tensors import describe_kv_tensors
from conftest import newest_binary
from vllm_harness import BLOCK, make_instance, make_request, run_until_done

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "operations.md"

POOL = 512 << 20
#: pf-engine's pressure blocks: 8 to a 32 MiB slab
BIG = 4 << 20
SMALL = 64 << 10
NS_X = 0x0A11CE
NS_Y = 0x0B0B


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(addr: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class Scrape:
    """One /metrics text, parsed."""

    def __init__(self, text: str):
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            assert m, f"unparsable line {line!r}"
            labels = dict(_LABEL.findall(m.group(2) or ""))
            self.samples.append((m.group(1), labels, float(m.group(3))))

    def all(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [
            (l, v)
            for n, l, v in self.samples
            if n == name and all(l.get(k) == str(x) for k, x in labels.items())
        ]

    def __call__(self, name: str, **labels: str) -> float:
        got = self.all(name, **labels)
        assert len(got) == 1, f"{name}{labels}: {len(got)} samples in\n{self.text}"
        return got[0][1]

    def names(self) -> set[str]:
        return {n for n, _, _ in self.samples}


def documented_metrics() -> set[str]:
    doc = DOCS.read_text()
    ref = doc[doc.index("## Reference: metrics") :]
    return {n for n in re.findall(r"pegaflow_[a-z_]+", ref) if not n.endswith("_")}


class Owner:
    """The conftest owner with its metrics endpoint on."""

    def __init__(self, make_owner):
        self.o = make_owner(pool_size="512mb", start=False)
        self.addr = f"127.0.0.1:{free_port()}"
        self.o.metrics_addr = self.addr

    def start(self) -> None:
        self.o.start(extra=("--min-slot-size", "64kb", "--health-stall-secs", "1"))
        deadline = time.monotonic() + 30
        while True:
            try:
                if http(self.addr, "/health")[0] == 200:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, self.o.log.read_text()[-3000:]
            time.sleep(0.05)

    def scrape(self) -> Scrape:
        code, text = http(self.addr, "/metrics")
        assert code == 200, text
        return Scrape(text)

    def scrape_until(self, what: str, ok, timeout: float = 30.0) -> Scrape:
        deadline = time.monotonic() + timeout
        while True:
            s = self.scrape()
            if ok(s):
                return s
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{s.text}"
            time.sleep(0.05)


class PfEngine:
    """A pegaflow-core engine in its own process (tests/src/bin/pf-engine.rs)."""

    #: every one started, killed when the test ends however it ends
    started: list["PfEngine"] = []

    def __init__(self, binary: Path, owner: Owner, *args, stay: bool = False):
        argv = [str(binary), args[0], owner.o.socket, owner.o.name, *map(str, args[1:])]
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        PfEngine.started.append(self)
        self.lines: list[str] = []
        if not stay:
            out, err = self.p.communicate(timeout=60)
            assert self.p.returncode == 0, f"pf-engine {args}: {out}\n{err}"
            self.lines = out.splitlines()

    def read_until(self, prefix: str) -> str:
        while True:
            line = self.p.stdout.readline()
            assert line, f"pf-engine exited: {self.p.stderr.read()}"
            self.lines.append(line.strip())
            if line.startswith(prefix):
                return line.strip()

    def value(self, prefix: str) -> int:
        return int(next(l for l in self.lines if l.startswith(prefix)).split()[1])

    def stats(self) -> dict[str, int]:
        line = next(l for l in self.lines if l.startswith("stats "))
        return {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


@pytest.fixture(autouse=True)
def _kill_pf_engines():
    yield
    while PfEngine.started:
        PfEngine.started.pop().kill()


class ThreadStop:
    """Stops one thread of a child process with ptrace (the rest runs on):
    the owner's request loop is its main thread."""

    PTRACE_SEIZE, PTRACE_INTERRUPT, PTRACE_DETACH, WALL = 0x4206, 0x4207, 17, 0x40000000

    def __init__(self, tid: int):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        self.tid = tid
        if self.libc.ptrace(self.PTRACE_SEIZE, tid, None, None) != 0:
            pytest.skip(f"ptrace is not allowed here (errno {ctypes.get_errno()})")
        assert self.libc.ptrace(self.PTRACE_INTERRUPT, tid, None, None) == 0
        pid, status = os.waitpid(tid, self.WALL)
        assert pid == tid and os.WIFSTOPPED(status), status

    def resume(self) -> None:
        assert self.libc.ptrace(self.PTRACE_DETACH, self.tid, None, None) == 0


def engines_of(inst) -> dict[str, object]:
    """label -> owner client (Engine) of a harness vLLM instance."""
    out = {"vllm-scheduler": inst.connector.engine}
    for w in inst.workers:
        out[f"vllm-worker-tp{w.tp_rank}"] = w.kv.engine
    return out


# ------------------------------------------------------------------ test


def test_every_documented_metric_tracks_real_traffic(tiny_model_dir, make_owner):
    pf = newest_binary("pf-engine")
    if pf is None:
        pytest.skip("pf-engine not built (cargo build --workspace --bins)")
    owner = Owner(make_owner)
    checked: set[str] = set()

    def check(name: str, got: float, want, how: str = "==") -> None:
        checked.add(name)
        ok = {
            "==": lambda: got == want,
            ">": lambda: got > want,
            ">=": lambda: got >= want,
            "<": lambda: got < want,
        }[how]()
        assert ok, f"{name}: {got} is not {how} {want}"

    # ---- owner 1, then down: an orphan, and saves skipped while it is away.
    owner.start()
    orphan = _native.Engine(
        name=owner.o.name, socket=owner.o.socket, label="orphan", reconnect_interval=600
    )
    assert orphan.wait_connected(5)
    owner.o.kill()
    deadline = time.monotonic() + 5
    while orphan.is_connected():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    inst = make_instance(
        tiny_model_dir, owner.o, tp=2, prefix_caching=False,
        extra={"pegaflow.reconnect_interval": 0.05},
    )
    # 70 tokens + 4 generated: 4 full blocks per rank, no owner to save them
    r0 = make_request("r0", [5 + i % 700 for i in range(70)], max_tokens=4)
    inst.scheduler.add_request(r0)
    run_until_done(inst, ["r0"])
    for w in inst.workers:
        assert w.kv.engine.stats()["save_skipped_blocks"] == 4

    owner.start()  # epoch 2: re-adopts the segments; the orphan waits 600 s
    for e in engines_of(inst).values():
        assert e.wait_connected(10)
    s = owner.scrape_until("the skipped saves published", lambda s: s("pegaflow_saves_skipped_total") == 8)
    check("pegaflow_owner_epoch", s("pegaflow_owner_epoch"), 2)
    check("pegaflow_owner_restarts_total", s("pegaflow_owner_restarts_total"), 1)
    check("pegaflow_clients", s("pegaflow_clients", state="orphaned"), 1)
    check("pegaflow_client_info", s("pegaflow_client_info", label="orphan", state="orphaned"), 1)
    for r in (0, 1):
        check(
            "pegaflow_client_saves_skipped_total",
            s("pegaflow_client_saves_skipped_total", label=f"vllm-worker-tp{r}"), 4,
        )
    time.sleep(0.3)  # the owner fills the workers' stashes

    # ---- vLLM: a miss, a full hit, a partial hit (prefix caching off, so
    # every repeat reaches PegaFlow, as a restarted or second vLLM would).
    prompt = [(7 * i + 3) % 900 + 10 for i in range(8 * BLOCK + 5)]  # 8 full blocks
    other = prompt[: 5 * BLOCK] + [11] * (3 * BLOCK + 5)  # shares 5 blocks
    for rid, p in (("r1", prompt), ("r2", prompt), ("r3", other)):
        inst.scheduler.add_request(make_request(rid, p, max_tokens=4))
        run_until_done(inst, [rid])
        # the next request must find this one's saves committed
        owner.scrape_until(
            f"{rid}'s saves committed",
            lambda s: all(
                s("pegaflow_client_request_ring_entries", label=f"vllm-worker-tp{r}") == 0
                for r in (0, 1)
            ),
        )
    # per request and rank namespace: 8 asked; hits 0, 8, 5; saves 8, 0, 3
    sched = {"lookups": 6, "lookup_blocks": 48, "hits": 26, "misses": 22}
    worker = {"saved": 11, "loaded": 13, "skipped": 4}
    slot_w = inst.workers[0].kv.slot_bytes
    st = inst.connector.get_scheduler_stats()
    assert (st["lookups"], st["hit_blocks"], st["miss_blocks"]) == (6, 26, 22), st

    # ---- pegaflow-core engines in other processes
    # the same 20 blocks saved twice: 20 commits, then 20 duplicates
    dup = [PfEngine(pf, owner, "save", NS_X, SMALL, 1, 0, 20) for _ in range(2)]
    assert [d.value("saved") for d in dup] == [20, 20]
    bad = PfEngine(pf, owner, "bad", NS_X, SMALL, stay=True)
    bad.read_until("bad 1")
    hung = PfEngine(pf, owner, "hangup", NS_X, SMALL, 3, stay=True)
    hung.read_until("hungup")

    # ---- a KvCache whose request ring fills while the request loop is stopped
    t = torch.zeros(2, 2100, BLOCK, 1, 64, dtype=torch.bfloat16)  # 4 KiB blocks
    lay = describe_kv_tensors([t], 2100, BLOCK)
    kv = _native.KvCache(
        **lay.native_layout(), model="ring", dtype="bf16", name=owner.o.name,
        socket=owner.o.socket, label="ring", keepalive=t, reserve_wait=0.5,
    )
    assert kv.engine.wait_connected(5)
    owner.scrape_until("the ring engine's stash", lambda s: s("pegaflow_client_stash_slots", label="ring") >= 50)
    hot = [bytes([1, i]) + bytes(30) for i in range(50)]
    assert kv.save(list(range(50)), hot) == 50
    commits = 20 + 22 + 50
    owner.scrape_until("50 ring commits", lambda s: s("pegaflow_block_commits_total") == commits)
    ring_keys = [bytes([2]) + i.to_bytes(4, "little") + bytes(27) for i in range(2049)]
    h, n = kv.begin_saves([(list(range(2049)), ring_keys)])[0]
    assert n == 2049, "the owner did not fill the stash for 2049 blocks"
    kv.save_layers(h)
    kv.end_save(h)
    owner.scrape_until("an empty ring", lambda s: s("pegaflow_client_request_ring_entries", label="ring") == 0)
    loop = ThreadStop(owner.o.proc.pid)
    stopped = time.monotonic()
    try:
        # 2100 one-hit lookups: 2048 touches fill half the ring, 52 are dropped
        for _ in range(2100):
            kv.engine.lookup(kv.namespace, hot[:1]).release()
        # 2048 commits fill the ring; the 2049th cannot be queued
        kv.poll_saves(wait=True)
        time.sleep(max(0.0, 1.2 - (time.monotonic() - stopped)))
        code, body = http(owner.addr, "/health")
        assert code == 503 and "stalled" in body, (code, body)
        s = owner.scrape()
        check("pegaflow_owner_running", s("pegaflow_owner_running"), 0)
        check("pegaflow_owner_loop_lag_seconds", s("pegaflow_owner_loop_lag_seconds"), 1, ">")
        check("pegaflow_client_request_ring_entries", s("pegaflow_client_request_ring_entries", label="ring"), 4096)
        check(
            "pegaflow_client_request_ring_capacity_entries",
            s("pegaflow_client_request_ring_capacity_entries", label="ring"), 4096,
        )
    finally:
        loop.resume()
    commits += 2048
    s = owner.scrape_until("the ring drained", lambda s: s("pegaflow_block_commits_total") == commits)
    assert http(owner.addr, "/health") == (200, "ok\n")
    check("pegaflow_client_touches_dropped_total", s("pegaflow_client_touches_dropped_total", label="ring"), 52)
    check("pegaflow_client_commits_ring_full_total", s("pegaflow_client_commits_ring_full_total", label="ring"), 1)
    # 3 reserved (the unqueued one among them) and given back
    h, n = kv.begin_save([0, 1, 2], ring_keys[:3])
    assert n == 3
    kv.abort_save(h)
    s = owner.scrape_until("3 aborts", lambda s: s("pegaflow_client_aborts_total", label="ring") >= 3)
    ring = kv.engine.stats()
    assert (ring["lookups"], ring["hit_blocks"], ring["saved_blocks"]) == (2100, 2100, 50 + 2048), ring

    # ---- pool pressure in one class (4 MiB blocks): fill the pool, pin
    # all of that class, ask for more (starved, pinned skips, dropped), then
    # unpin and save again (evictions; admission rejections, as the pinned
    # blocks were hit and the new ones were not)
    runs = []
    done = 0
    while owner.scrape()("pegaflow_pool_slabs", state="free") > 0:
        runs.append(PfEngine(pf, owner, "save", NS_Y, BIG, 2, done, 64))
        done += 64
        assert len(runs) < 10, "the pool never filled"
    hold = PfEngine(pf, owner, "pinall", NS_Y, 2, 0, done, stay=True)
    pinned = int(hold.read_until("pinned").split()[1])
    hold.read_until("stats")
    s = owner.scrape()
    assert pinned == s("pegaflow_namespace_blocks", namespace=f"{NS_Y:#018x}") > 0, s.text
    starved = PfEngine(pf, owner, "save", NS_Y, BIG, 2, 10_000, 64)
    assert starved.stats()["dropped"] > 0, starved.lines
    runs.append(starved)
    s = owner.scrape()
    check("pegaflow_client_pinned_slots", s("pegaflow_client_pinned_slots", label=f"pf-engine {hold.p.pid}"), pinned)
    check("pegaflow_stash_starved_total", s("pegaflow_stash_starved_total"), 1, ">=")
    check("pegaflow_eviction_pinned_skips_total", s("pegaflow_eviction_pinned_skips_total"), pinned, ">=")
    check("pegaflow_clients", s("pegaflow_clients", state="quarantined"), 1)
    check("pegaflow_client_bad_requests_total", s("pegaflow_client_bad_requests_total", label="pf-engine bad"), 1)
    for c in ("commits", "commit_duplicates", "admission_rejections", "aborts", "slots_stashed"):
        assert s.all(f"pegaflow_client_{c}_total", label="pf-engine bad")
    hold.kill()
    owner.scrape_until("the pins gone", lambda s: s("pegaflow_slots", state="committed") > 0 and not s.all(
        "pegaflow_client_pinned_slots", label=f"pf-engine {hold.p.pid}"))
    evicting = PfEngine(pf, owner, "save", NS_Y, BIG, 2, 20_000, 16, "stay", stay=True)
    evicting.read_until("stats")
    runs.append(evicting)
    s = owner.scrape_until("the evicting saver's commits applied", lambda s: s(
        "pegaflow_client_request_ring_entries", label=f"pf-engine {evicting.p.pid}") == 0)
    lab = f"pf-engine {evicting.p.pid}"
    check("pegaflow_client_admission_rejections_total", s("pegaflow_client_admission_rejections_total", label=lab), 0, ">")
    check(
        "pegaflow_client_commits_total",
        s("pegaflow_client_commits_total", label=lab) + s("pegaflow_client_admission_rejections_total", label=lab),
        s("pegaflow_client_saved_blocks_total", label=lab),
    )
    evicting.kill()
    for p in (bad, hung):
        p.kill()

    # ---- the final look: node totals are what every engine did
    pf_runs = dup + runs
    pf_stats = [r.stats() for r in pf_runs] + [hold.stats()]
    left = len(pf_runs) + 3  # + hold, bad, hung
    s = owner.scrape_until(
        "every pf-engine reclaimed",
        lambda s: s("pegaflow_reclaimed_clients_total") == left and s("pegaflow_connected_clients") == 4,
    )
    sum_pf = lambda k: sum(x[k] for x in pf_stats)  # noqa: E731
    lookups = sched["lookups"] + 2100 + sum_pf("lookups")
    hits = sched["hits"] + 2100 + sum_pf("hits")
    misses = sched["misses"] + sum_pf("misses")
    saved = 2 * worker["saved"] + 50 + 2048 + sum_pf("saved")
    dropped = sum_pf("dropped") + ring["save_dropped_blocks"]
    assert dropped >= 8  # the starved saver's
    saved_pf_bytes = sum(
        r.stats()["saved"] * (BIG if r in runs else SMALL) for r in pf_runs
    )
    check("pegaflow_lookups_total", s("pegaflow_lookups_total"), lookups)
    check("pegaflow_lookup_blocks_total", s("pegaflow_lookup_blocks_total"), hits + misses)
    check("pegaflow_block_hits_total", s("pegaflow_block_hits_total"), hits)
    check("pegaflow_block_misses_total", s("pegaflow_block_misses_total"), misses)
    check("pegaflow_saved_blocks_total", s("pegaflow_saved_blocks_total"), saved)
    check(
        "pegaflow_save_bytes_total", s("pegaflow_save_bytes_total"),
        2 * worker["saved"] * slot_w + (50 + 2049) * kv.slot_bytes + saved_pf_bytes,
    )
    check("pegaflow_save_seconds_total", s("pegaflow_save_seconds_total"), 0, ">")
    check("pegaflow_saves_dropped_total", s("pegaflow_saves_dropped_total"), dropped)
    check("pegaflow_saves_skipped_total", s("pegaflow_saves_skipped_total"), 8)
    check("pegaflow_loaded_blocks_total", s("pegaflow_loaded_blocks_total"), 2 * worker["loaded"])
    check("pegaflow_load_bytes_total", s("pegaflow_load_bytes_total"), 2 * worker["loaded"] * slot_w)
    check("pegaflow_load_seconds_total", s("pegaflow_load_seconds_total"), 0, ">")
    check("pegaflow_touches_dropped_total", s("pegaflow_touches_dropped_total"), 52)
    check("pegaflow_commits_ring_full_total", s("pegaflow_commits_ring_full_total"), 1)
    # owner side: every saved block was published, a duplicate or refused
    check(
        "pegaflow_block_commits_total", s("pegaflow_block_commits_total"),
        saved - s("pegaflow_block_commit_duplicates_total") - s("pegaflow_admission_rejections_total"),
    )
    check("pegaflow_block_commit_duplicates_total", s("pegaflow_block_commit_duplicates_total"), 20)
    check("pegaflow_admission_rejections_total", s("pegaflow_admission_rejections_total"), 0, ">")
    check("pegaflow_block_evictions_total", s("pegaflow_block_evictions_total"), 0, ">")
    check(
        "pegaflow_namespace_block_evictions_total",
        s("pegaflow_namespace_block_evictions_total", namespace=f"{NS_Y:#018x}"),
        s("pegaflow_block_evictions_total"),
    )
    check("pegaflow_bad_requests_total", s("pegaflow_bad_requests_total"), 1)
    check("pegaflow_reclaimed_clients_total", s("pegaflow_reclaimed_clients_total"), left)
    check("pegaflow_reclaimed_slots_total", s("pegaflow_reclaimed_slots_total"), 3, ">=")
    check("pegaflow_stash_starved_total", s("pegaflow_stash_starved_total"), 1, ">=")
    check("pegaflow_eviction_pinned_skips_total", s("pegaflow_eviction_pinned_skips_total"), pinned, ">=")

    # per engine: the scheduler looks up, the workers save and load
    labels = {"client", "pid", "label"}
    for name, want in (
        ("lookups", sched["lookups"]), ("lookup_blocks", sched["lookup_blocks"]),
        ("block_hits", sched["hits"]), ("block_misses", sched["misses"]),
        ("saved_blocks", 0), ("loaded_blocks", 0),
    ):
        check(f"pegaflow_client_{name}_total", s(f"pegaflow_client_{name}_total", label="vllm-scheduler"), want)
    ns = {r: inst.workers[r].namespace for r in (0, 1)}
    for r in (0, 1):
        lab = f"vllm-worker-tp{r}"
        for name, want in (
            ("saved_blocks", worker["saved"]), ("commits", worker["saved"]),
            ("save_bytes", worker["saved"] * slot_w), ("loaded_blocks", worker["loaded"]),
            ("load_bytes", worker["loaded"] * slot_w), ("saves_skipped", worker["skipped"]),
            ("lookups", 0), ("saves_dropped", 0), ("touches_dropped", 0), ("commits_ring_full", 0),
            ("commit_duplicates", 0), ("admission_rejections", 0), ("bad_requests", 0),
        ):
            check(f"pegaflow_client_{name}_total", s(f"pegaflow_client_{name}_total", label=lab), want)
        check("pegaflow_client_save_seconds_total", s("pegaflow_client_save_seconds_total", label=lab), 0, ">")
        check("pegaflow_client_load_seconds_total", s("pegaflow_client_load_seconds_total", label=lab), 0, ">")
        check("pegaflow_client_slots_stashed_total", s("pegaflow_client_slots_stashed_total", label=lab), worker["saved"], ">=")
        check("pegaflow_client_aborts_total", s("pegaflow_client_aborts_total", label=lab), 0, ">=")
        check("pegaflow_client_stash_target_slots", s("pegaflow_client_stash_target_slots", label=lab), 0, ">")
        info = s.all("pegaflow_client_info", label=lab)
        assert len(info) == 1 and info[0][0]["namespace"] == f"{ns[r]:#018x}", info
        assert info[0][0]["state"] == "live" and set(info[0][0]) == labels | {"state", "namespace"}
        # blocks of this rank's namespace: its saves (the pool never evicted them)
        check("pegaflow_namespace_blocks", s("pegaflow_namespace_blocks", namespace=f"{ns[r]:#018x}"), worker["saved"])
        check("pegaflow_namespace_bytes", s("pegaflow_namespace_bytes", namespace=f"{ns[r]:#018x}"), worker["saved"] * slot_w)
        check(
            "pegaflow_namespace_block_evictions_total",
            s("pegaflow_namespace_block_evictions_total", namespace=f"{ns[r]:#018x}"), 0,
        )
    check("pegaflow_client_pinned_slots", s("pegaflow_client_pinned_slots", label="ring"), 0)
    check("pegaflow_client_stash_slots", s("pegaflow_client_stash_slots", label="ring"), 0, ">")

    # clients
    check("pegaflow_connected_clients", s("pegaflow_connected_clients"), 4)  # scheduler, 2 workers, ring
    check("pegaflow_clients", s("pegaflow_clients", state="live"), 4)
    check("pegaflow_clients", s("pegaflow_clients", state="quarantined"), 0)
    check("pegaflow_max_clients", s("pegaflow_max_clients"), 64)

    # owner and pool
    info = s.all("pegaflow_owner_info")
    assert len(info) == 1
    assert info[0][0] == {"version": pegaflow.__version__, "abi_version": info[0][0]["abi_version"],
                          "name": owner.o.name}, info
    check("pegaflow_owner_info", info[0][1], 1)
    check("pegaflow_owner_uptime_seconds", s("pegaflow_owner_uptime_seconds"), 0, ">")
    check("pegaflow_owner_running", s("pegaflow_owner_running"), 1)
    check("pegaflow_owner_loop_lag_seconds", s("pegaflow_owner_loop_lag_seconds"), 1, "<")
    check("pegaflow_pool_capacity_bytes", s("pegaflow_pool_capacity_bytes"), POOL)
    slab = s("pegaflow_pool_slab_bytes")
    check("pegaflow_pool_slab_bytes", slab, 32 << 20)
    assigned, free = s("pegaflow_pool_slabs", state="assigned"), s("pegaflow_pool_slabs", state="free")
    check("pegaflow_pool_slabs", assigned + free, POOL // slab)
    check("pegaflow_pool_assigned_bytes", s("pegaflow_pool_assigned_bytes"), assigned * slab)
    # block sizes: the workers', pf-engine's small and big ones, the ring's
    check("pegaflow_pool_block_sizes", s("pegaflow_pool_block_sizes"), 4)
    check("pegaflow_pool_hugepages", s("pegaflow_pool_hugepages"), 0)
    committed = s("pegaflow_slots", state="committed")
    per_ns = s.all("pegaflow_namespace_blocks")
    check("pegaflow_slots", committed, sum(v for _, v in per_ns))
    check("pegaflow_pool_used_bytes", s("pegaflow_pool_used_bytes"), sum(v for _, v in s.all("pegaflow_namespace_bytes")))
    check("pegaflow_slots", s("pegaflow_slots", state="invalid"), 0)
    check("pegaflow_slots", s("pegaflow_slots", state="evicting"), 0)
    check("pegaflow_free_list_slots", s("pegaflow_free_list_slots"), s("pegaflow_slots", state="free"))
    check(
        "pegaflow_slots", s("pegaflow_slots", state="writing"),
        sum(v for _, v in s.all("pegaflow_client_stash_slots")),
    )
    check("pegaflow_metrics_collect_seconds", s("pegaflow_metrics_collect_seconds"), 1, "<")

    # The OTLP push is off here (tests/tests/otlp.rs pushes to a receiver).
    check("pegaflow_otel_exports_total", s("pegaflow_otel_exports_total"), 0)
    check("pegaflow_otel_export_failures_total", s("pegaflow_otel_export_failures_total"), 0)

    documented = documented_metrics()
    # The SSD tier is off here: its series are served, all zero
    # (tests/python/test_ssd.py drives them with the tier on).
    staging = {n for n in documented if n.startswith("pegaflow_ssd_") or "stage" in n}
    for name in sorted(staging):
        for _, v in s.all(name):
            check(name, v, 0)
    assert documented - s.names() == set(), "documented but not served"
    assert s.names() - documented == set(), "served but not documented"
    assert documented - checked == set(), "documented metrics this test does not check"
    orphan  # kept alive (orphaned) to the end
