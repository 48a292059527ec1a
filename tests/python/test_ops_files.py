"""The ready-made operations files in ops/: the Grafana dashboard and the
Prometheus alert rules query only metrics a real owner serves (a scrape of
one with engines connected and blocks cached), their PromQL parses
(promtool), the alert rules pass their unit tests (promtool test rules),
and the Kubernetes example validates against Kubernetes' schemas
(kubernetes-validate). scripts/test-all.sh installs promtool (Debian's
prometheus package) and kubernetes-validate (PyPI) when it can; without
them those checks skip, saying so."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from pegaflow import _native
from pegaflow.tensors import describe_kv_tensors
from test_metrics import ROOT, Owner, Scrape  # noqa: F401  (fixtures of the metrics test)

OPS = ROOT / "ops"
DASHBOARD = OPS / "grafana" / "pegaflow-dashboard.json"
ALERTS = OPS / "prometheus" / "pegaflow-alerts.yml"
ALERT_TESTS = OPS / "prometheus" / "pegaflow-alerts.test.yml"
METRIC = re.compile(r"\b(pegaflow_[a-z_]+|up)\b(?!\s*\()")


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> set[str]:
    """Metric names of a real scrape: an owner with a saving engine, a
    looking-up engine, committed blocks and hits."""
    from conftest import Owner as ConftestOwner, find_owner_bin

    binary = find_owner_bin()
    if binary is None:
        pytest.skip("pegaflow-owner binary not found")
    made: list = []

    def make_owner(pool_size="64mb", start=True):
        o = ConftestOwner(binary, tmp_path_factory.mktemp("ops"), pool_size)
        made.append(o)
        return o

    try:
        owner = Owner(make_owner)
        owner.start()
        t = torch.zeros(2, 16, 16, 1, 64, dtype=torch.bfloat16)
        kv = _native.KvCache(
            **describe_kv_tensors([t], 16, 16).native_layout(), model="ops", dtype="bf16",
            name=owner.o.name, socket=owner.o.socket, label="ops-worker", keepalive=t, reserve_wait=0.5,
        )
        sched = _native.Engine(name=owner.o.name, socket=owner.o.socket, label="ops-scheduler")
        assert kv.engine.wait_connected(10) and sched.wait_connected(10)
        time.sleep(0.3)
        keys = [bytes([7, i]) + bytes(30) for i in range(8)]
        assert kv.save(list(range(8)), keys) == 8
        owner.scrape_until("8 commits", lambda s: s("pegaflow_block_commits_total") == 8)
        assert sched.count_hits(kv.namespace, keys) == 8
        sched.lookup(kv.namespace, keys).release()
        names = owner.scrape().names()
        del kv, sched
        return names | {"up"}  # Prometheus' own
    finally:
        for o in made:
            o.cleanup()


def metric_names(expr: str) -> set[str]:
    # label names and functions are not metrics; strip label matchers first
    return set(METRIC.findall(re.sub(r"\{[^}]*\}", "", expr)))


def dashboard_exprs() -> list[tuple[str, str]]:
    d = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in d["panels"] for t in p.get("targets", [])]


def test_dashboard_is_a_grafana_dashboard_of_served_metrics(served):
    d = json.loads(DASHBOARD.read_text())
    assert d["title"] and d["uid"] and isinstance(d["schemaVersion"], int)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert "pegaflow_" in variables["instance"]["definition"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in d["panels"]:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "xywh") and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "stat", "gauge", "table", "bargauge"}, p["type"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["refId"] and t["expr"].count("(") == t["expr"].count(")"), t
    used: set[str] = set()
    for title, expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, f"{title}: {expr} queries no pegaflow metric"
        used |= names
        assert names <= served, f"panel {title!r} queries {sorted(names - served)}, which the owner does not serve"
    # the documented essentials are on it
    for m in ("pegaflow_block_hits_total", "pegaflow_lookup_blocks_total", "pegaflow_saves_dropped_total",
              "pegaflow_owner_running", "pegaflow_pool_used_bytes", "pegaflow_connected_clients"):
        assert m in used, m


def test_alert_rules_query_served_metrics(served):
    doc = yaml.safe_load(ALERTS.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    for want in ("PegaflowOwnerDown", "PegaflowEnginesNotReconnecting", "PegaflowNoEngineConnected",
                 "PegaflowHitRateCollapsed", "PegaflowPoolFullSavesDropped"):
        assert want in names, want
    for r in rules:
        assert r["labels"]["severity"] in {"critical", "warning", "info"}, r
        assert r["annotations"]["summary"] and r["annotations"]["description"], r
        used = metric_names(r["expr"])
        assert used and used <= served, f"{r['alert']} queries {sorted(used - served)}, not served"
    tested = {a["alertname"] for t in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for a in t["alert_rule_test"]}
    assert names <= tested, f"alerts without a promtool unit test: {sorted(names - tested)}"


def promtool() -> str:
    p = shutil.which("promtool")
    if p is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus; scripts/test-all.sh does)")
    return p


def test_promtool_checks_and_unit_tests_the_alert_rules():
    tool = promtool()
    r = subprocess.run([tool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([tool, "test", "rules", ALERT_TESTS.name], capture_output=True, text=True,
                       cwd=ALERT_TESTS.parent)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_promtool_parses_every_dashboard_query(tmp_path):
    tool = promtool()
    # Grafana's variables, as Grafana would substitute them
    rules = [
        {"record": f"pegaflow:dashboard_{i}", "expr": e.replace("$__rate_interval", "1m").replace("$instance", ".*")}
        for i, (_, e) in enumerate(dashboard_exprs())
    ]
    f = tmp_path / "dashboard-queries.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([tool, "check", "rules", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_kubernetes_example_validates():
    files = sorted((OPS / "kubernetes").glob("*.yaml"))
    docs = [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("DaemonSet", "pegaflow-owner") in kinds and any(k == "Deployment" for k, _ in kinds)
    # the owner and vLLM share the host's PID namespace and the same host paths
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("DaemonSet", "Deployment")]
    for spec in pods:
        assert spec.get("hostPID") is True
        paths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
        assert {"/dev/shm", "/dev/hugepages", "/run/pegaflow"} <= paths, paths
    tool = shutil.which("kubernetes-validate") or str(Path(__import__("sys").executable).with_name("kubernetes-validate"))
    if not Path(tool).exists():
        pytest.skip("kubernetes-validate not installed (pip install kubernetes-validate; scripts/test-all.sh does)")
    r = subprocess.run([tool, "--strict", *map(str, files)], capture_output=True, text=True)
    assert r.returncode == 0 and "ERROR" not in r.stdout + r.stderr, r.stdout + r.stderr
