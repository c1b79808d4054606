"""The fleet files under contrib/ (issue 14): the scrape-config example, the Grafana dashboard.
(The dashboard's queries are also evaluated by a real Prometheus in tests/test_prometheus.py.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.report_support import REPO

yaml = pytest.importorskip("yaml", reason="PyYAML (the test extra) is not installed")

RULES = REPO / "contrib" / "prometheus" / "ksmtuned.rules.yml"
SCRAPE = REPO / "contrib" / "prometheus" / "scrape.yml"
DASHBOARD = REPO / "contrib" / "grafana" / "ksmtuned.json"


def recording_rules() -> set[str]:
    return {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of the dashboard."""
    doc = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in doc["panels"] for t in p["targets"]]


def test_every_dashboard_query_is_a_recording_rule():
    rules = recording_rules()
    exprs = dashboard_exprs()
    assert exprs
    for title, expr in exprs:
        name = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?", expr.strip())
        assert name, f"{title}: {expr!r} is not a (selected) recording rule"
        assert name.group(1) in rules, f"{title}: {name.group(1)} is not recorded in {RULES.name}"


def test_dashboard_has_the_panels_a_fleet_needs():
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 30
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    used = {expr for _, expr in dashboard_exprs()}
    # memory saved per host and in total, ksmd CPU, decisions over time, guests
    assert {"instance:ksmtuned_ksm_saved:bytes", "ksmtuned:ksm_saved_bytes:sum", "instance:ksmtuned_ksmd_cpu:rate5m",
            "ksmtuned:ksmd_cpu:sum_rate5m", "ksmtuned:decisions:sum_rate5m", "ksmtuned:guests:sum",
            "instance:ksmtuned_guests:count", "ksmtuned:hosts:count"} <= used
    for p in doc["panels"]:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert t["refId"] and t["datasource"] == p["datasource"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]


def test_scrape_example_is_a_valid_prometheus_config(tmp_path):
    doc = yaml.safe_load(SCRAPE.read_text())
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    # KsmtunedMetricsAbsent watches this job name
    assert "ksmtuned" in jobs and 'up{job="ksmtuned"}' in RULES.read_text()
    port = int(re.search(r"KSM_METRICS_LISTEN=[\d.]*:(\d+)", (REPO / "etc" / "ksmtuned.conf").read_text()).group(1))
    for target in jobs["ksmtuned"]["static_configs"][0]["targets"]:
        assert target.endswith(f":{port}")  # the shipped config's port
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool missing (Debian package prometheus)")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({**doc, "rule_files": [str(RULES)]}))
    r = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
