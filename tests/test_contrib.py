"""The fleet files under contrib/ (issue 14): the scrape-config example, the Grafana dashboard.
(The dashboard's queries are also evaluated by a real Prometheus in tests/test_prometheus.py.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

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


# --- the Kubernetes DaemonSet ----------------------------------------------------------------

MANIFEST = REPO / "contrib" / "kubernetes" / "ksmtuned-daemonset.yaml"


def manifest() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), kinds
    return {d["kind"]: d for d in docs}


def pod(docs: dict) -> tuple[dict, dict]:
    spec = docs["DaemonSet"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


def mounts(spec: dict, container: dict) -> dict[str, dict]:
    """{mountPath: the mount, with its volume under 'volume'}."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    return {m["mountPath"]: {**m, "volume": volumes[m["name"]]} for m in container["volumeMounts"]}


def test_manifests_validate_against_the_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (the test extra) is not installed")
    for kind, doc in manifest().items():
        if kind == "ServiceMonitor":
            continue  # a CRD (Prometheus Operator): no schema in kubernetes-validate; checked below
        kv.validate(doc, "1.30.0", strict=True)  # raises ValidationError naming the field


def test_daemonset_runs_on_the_host_with_the_least_privilege():
    docs = manifest()
    assert {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet", "Service", "ServiceMonitor"} <= set(docs)
    ds = docs["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1"
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spec, c = pod(docs)
    assert spec["hostPID"] is True
    assert not spec.get("hostNetwork") and spec["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
    assert not sc["capabilities"].get("add")
    m = mounts(spec, c)
    hostpaths = {path: mnt["volume"]["hostPath"]["path"] for path, mnt in m.items() if "hostPath" in mnt["volume"]}
    assert sorted(hostpaths.values()) == ["/proc", "/sys/kernel/mm/ksm"]  # no other host directory
    for path, mnt in m.items():
        if mnt["volume"].get("hostPath", {}).get("path") == "/proc":
            assert mnt["readOnly"] is True
        if mnt["volume"].get("hostPath", {}).get("path") == "/sys/kernel/mm/ksm":
            assert mnt["readOnly"] is False and not path.startswith("/sys/")  # /sys is read-only in a container
    ns = docs["Namespace"]["metadata"]
    assert all(d["metadata"].get("namespace") == ns["name"] for k, d in docs.items() if k != "Namespace")
    assert ns["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"  # hostPID, hostPath


def test_daemonset_args_are_real_options_pointing_at_the_host_mounts():
    from ksmtuned.cli import build_parser

    spec, c = pod(manifest())
    args = build_parser().parse_args(c["args"])  # an unknown option: SystemExit
    assert c["command"] == ["/usr/sbin/ksmtuned"] and args.foreground
    m = mounts(spec, c)
    assert m[args.procfs]["volume"]["hostPath"]["path"] == "/proc"
    assert m[args.sysfs]["volume"]["hostPath"]["path"] == "/sys/kernel/mm/ksm"
    for path in (args.pidfile, args.state_file):  # on the writable emptyDir
        assert "emptyDir" in m[str(Path(path).parent)]["volume"]
    # the config: the ConfigMap's key, as the file the daemon reads by default
    conf = [mnt for mnt in m.values() if "configMap" in mnt["volume"]]
    assert len(conf) == 1 and conf[0]["subPath"] in manifest()["ConfigMap"]["data"]
    help_text = subprocess.run([sys.executable, "-m", "ksmtuned", "--help"], capture_output=True, text=True,
                               timeout=30, cwd=REPO).stdout
    assert f"config file (default {conf[0]['mountPath']})" in " ".join(help_text.split())


def test_daemonset_metrics_port_service_and_servicemonitor_agree():
    docs = manifest()
    spec, c = pod(docs)
    conf = docs["ConfigMap"]["data"]["ksmtuned.conf"]
    listen = re.search(r"^KSM_METRICS_LISTEN=(\S+):(\d+)$", conf, re.M)
    assert listen and listen.group(1) == "0.0.0.0"  # the pod's address, not the host's
    (port,) = [p for p in c["ports"] if p["name"] == "metrics"]
    assert port["containerPort"] == int(listen.group(2))
    assert c["livenessProbe"]["httpGet"]["port"] == "metrics"
    svc = docs["Service"]
    (sport,) = svc["spec"]["ports"]
    assert sport["targetPort"] == "metrics" and svc["spec"]["selector"].items() <= \
        docs["DaemonSet"]["spec"]["template"]["metadata"]["labels"].items()
    sm = docs["ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == sport["name"] and ep["path"] == "/metrics"
    # the Prometheus Operator's job label is the Service's name: the one the rules watch
    assert f'up{{job="{svc["metadata"]["name"]}"}}' in RULES.read_text()


def test_daemonset_config_passes_check_config(tmp_path):
    conf = tmp_path / "ksmtuned.conf"
    conf.write_text(manifest()["ConfigMap"]["data"]["ksmtuned.conf"])
    r = subprocess.run([sys.executable, "-m", "ksmtuned", "check-config", "--config", str(conf)],
                       capture_output=True, text=True, timeout=30, cwd=REPO)
    assert r.returncode == 0 and not r.stderr, r.stderr
    assert re.search(r"^KSM_METRICS_LISTEN=0\.0\.0\.0:9729 +# " + re.escape(str(conf)), r.stdout, re.M), r.stdout


def test_the_pods_command_line_adjusts_a_stand_in_host(tmp_path):
    """The container's exact command line, each mount path mapped to what the volume holds here:
    the real /proc, a stand-in KSM directory (never the machine's), the ConfigMap's file (its
    metrics address moved to loopback), an empty run directory.  One adjust (--once) lands."""
    from tests.report_support import fake_ksm_dir, free_port

    docs = manifest()
    spec, c = pod(docs)
    ksm = fake_ksm_dir(tmp_path)
    conf = tmp_path / "ksmtuned.conf"
    conf.write_text(re.sub(r"^KSM_METRICS_LISTEN=.*$", f"KSM_METRICS_LISTEN=127.0.0.1:{free_port()}",
                           docs["ConfigMap"]["data"]["ksmtuned.conf"], flags=re.M) + "KSM_THRES_COEF=100\n")
    here = {}
    for path, mnt in mounts(spec, c).items():
        vol = mnt["volume"]
        if vol.get("hostPath", {}).get("path") == "/proc":
            here[path] = "/proc"
        elif "hostPath" in vol:
            here[path] = str(ksm)
        elif "configMap" in vol:
            here[path] = str(conf)
        else:
            (tmp_path / mnt["name"]).mkdir()
            here[path] = str(tmp_path / mnt["name"])
    args = []
    for a in c["args"]:
        opt, _, value = a.partition("=")
        for path, local in here.items():
            if value == path or value.startswith(path + "/"):
                value = local + value[len(path):]
        args.append(f"{opt}={value}" if value else opt)
    r = subprocess.run([sys.executable, "-m", "ksmtuned", *args, "--config", here["/etc/ksmtuned.conf"], "--once"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert (ksm / "run").read_text().strip() == "1" and (ksm / "pages_to_scan").read_text().strip() == "300"
