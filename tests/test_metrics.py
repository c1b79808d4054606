"""Prometheus metrics: a real HTTP scrape and the textfile of a real daemon, parsed with
prometheus_client's parser; the shipped rules file."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client", reason="the metrics extra (prometheus_client) is not installed")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from ksmtuned.report.metrics import KSM_METRICS, families  # noqa: E402
from ksmtuned.core.ticks import GuestData, TickData  # noqa: E402
from tests.report_support import REPO, Daemon, FakeGuests, free_port, read_sysfs, running  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
RULES = REPO / "contrib" / "prometheus" / "ksmtuned.rules.yml"
BOOST = "KSM_THRES_COEF=100\n"


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(smp: dict, name: str, **labels) -> float:
    return smp[(name, tuple(sorted(labels.items())))]


def test_http_scrape_and_textfile_match_sysfs(tmp_path):
    port = free_port()
    textfile = tmp_path / "textfile" / "ksmtuned.prom"
    textfile.parent.mkdir()
    guests = FakeGuests(tmp_path)
    try:
        gpid = guests.start("metricsguest", "-m", "64M")
        config = BOOST + f"KSM_MONITOR_INTERVAL=3600\nKSM_METRICS_LISTEN={port}\nKSM_METRICS_TEXTFILE={textfile}\n"
        with running(tmp_path, config) as d:
            st = d.wait_adjusts(1)
            text = scrape(port)
            sysfs = read_sysfs(d.sysfs)
            file_text = textfile.read_text()
    finally:
        guests.stop()
    smp = samples(text)
    assert samples(file_text) == smp  # the same tick, the same numbers
    assert stat_mode(textfile) == 0o644
    assert all(name.startswith("ksmtuned") for name, _ in smp)
    assert not any(name.startswith("node_ksmd") for name, _ in smp)
    # every KSM file the kernel (here: the fake directory) offers, with its unit
    for file, (metric, kind, _help, scale) in KSM_METRICS.items():
        name = metric + "_total" if kind == "counter" else metric
        assert value(smp, name) == pytest.approx(sysfs[file] * scale), file
    assert value(smp, "ksmtuned_ksm_sleep_seconds") == pytest.approx(0.010)  # written by this tick
    assert value(smp, "ksmtuned_ksm_pages_to_scan") == 300
    assert value(smp, "ksmtuned_ksm_general_profit_bytes") == sysfs["general_profit"]
    assert value(smp, "ksmtuned_ksm_saved_bytes") == sysfs["pages_sharing"] * PAGE
    assert value(smp, "ksmtuned_ksm_advisor_mode", mode="none") == 1
    # the daemon's own loop data
    inputs = st["inputs"]
    assert value(smp, "ksmtuned_memory_total_bytes") == inputs["total_kib"] * 1024
    assert value(smp, "ksmtuned_memory_free_bytes") == inputs["free_kib"] * 1024
    assert value(smp, "ksmtuned_memory_committed_bytes") == inputs["committed_kib"] * 1024
    assert value(smp, "ksmtuned_memory_threshold_bytes") == inputs["thres_kib"] * 1024
    assert value(smp, "ksmtuned_npages") == 300
    assert value(smp, "ksmtuned_decisions_total", decision="boost") == 1
    assert value(smp, "ksmtuned_decisions_total", decision="stop") == 0
    assert value(smp, "ksmtuned_decisions_total", decision="error") == 0
    assert value(smp, "ksmtuned_adjust_duration_seconds_count") == 1
    assert value(smp, "ksmtuned_last_adjust_duration_seconds") == pytest.approx(st["duration_s"], abs=1e-6)
    assert value(smp, "ksmtuned_last_adjust_timestamp_seconds") == pytest.approx(st["time"], abs=0.01)
    assert value(smp, "ksmtuned_monitor_interval_seconds") == 3600
    assert value(smp, "ksmtuned_running") == 1
    if st["ksmd"]["pid"] is not None:
        assert value(smp, "ksmtuned_ksmd_cpu_seconds_total") == pytest.approx(st["ksmd"]["cpu_seconds"])
    else:  # no ksmd thread: a kernel without KSM, and then no such sample
        assert not Path("/sys/kernel/mm/ksm").exists()
        assert not any(name == "ksmtuned_ksmd_cpu_seconds_total" for name, _ in smp)
    # per guest, labelled by the guest's name
    labels = (("guest", "metricsguest"), ("pid", str(gpid)))
    assert smp[("ksmtuned_guest_memory_bytes", labels)] > 0
    mine = [g for g in st["guests"] if g["pid"] == gpid]
    assert mine and smp[("ksmtuned_guest_memory_bytes", labels)] == mine[0]["memory_kib"] * 1024
    if mine[0]["ksm_merging_pages"] is not None:  # kernel >= 6.1
        assert smp[("ksmtuned_guest_ksm_merging_bytes", labels)] == mine[0]["ksm_merging_pages"] * PAGE
    else:  # no /proc/PID/ksm_stat: no per-guest KSM sample
        assert not Path(f"/proc/{gpid}/ksm_stat").exists()
        assert ("ksmtuned_guest_ksm_merging_bytes", labels) not in smp


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def test_textfile_is_never_seen_half_written(tmp_path):
    textfile = tmp_path / "ksmtuned.prom"
    d = Daemon(tmp_path, BOOST + f"KSM_MONITOR_INTERVAL=0.02\nKSM_METRICS_TEXTFILE={textfile}\n")
    d.start()
    stamps = set()
    reads = 0
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            text = textfile.read_text()
            reads += 1
            # whole: ends with the last family, every line complete, and it parses
            assert text.endswith("\n") and "# TYPE ksmtuned_guest_ksm_profit_bytes gauge" in text, text[-300:]
            smp = samples(text)
            stamps.add(value(smp, "ksmtuned_last_adjust_timestamp_seconds"))
    finally:
        assert d.stop() == 0
    assert len(stamps) >= 20, f"only {len(stamps)} distinct ticks in {reads} reads"
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


def test_signals_reach_the_loop_while_the_http_server_runs(tmp_path):
    """The server thread inherits the blocked signal mask: SIGUSR1 retunes, SIGTERM stops cleanly."""
    port = free_port()
    d = Daemon(tmp_path, BOOST + f"KSM_MONITOR_INTERVAL=3600\nKSM_METRICS_LISTEN=127.0.0.1:{port}\n").start()
    try:
        threads = [t for t in os.listdir(f"/proc/{d.proc.pid}/task") if t != str(d.proc.pid)]
        assert threads, "no HTTP server thread"
        for tid in threads:  # (the main thread unblocks them only inside sigtimedwait)
            _assert_blocked(d.proc.pid, tid)
        for n in range(2, 7):
            scrape(port)
            os.kill(d.proc.pid, signal.SIGUSR1)
            d.wait_adjusts(n, timeout_s=5)
        assert value(samples(scrape(port)), "ksmtuned_decisions_total", decision="boost") == 6
    finally:
        assert d.stop() == 0
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def _assert_blocked(pid: int, tid: str) -> None:
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            mask = int(line.split()[1], 16)
            for sig in (signal.SIGUSR1, signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                assert mask & (1 << (sig - 1)), f"thread {tid} does not block {sig!r}"
            return
    raise AssertionError("no SigBlk")


def test_reload_moves_the_endpoint(tmp_path):
    a, b = free_port(), free_port()
    d = Daemon(tmp_path, BOOST + f"KSM_MONITOR_INTERVAL=3600\nKSM_METRICS_LISTEN={a}\n").start()
    try:
        scrape(a)
        d.conf.write_text(BOOST + f"KSM_MONITOR_INTERVAL=3600\nKSM_METRICS_LISTEN=127.0.0.1:{b}\n")
        os.kill(d.proc.pid, signal.SIGHUP)
        d.wait_adjusts(2)
        assert value(samples(scrape(b)), "ksmtuned_adjust_duration_seconds_count") == 2
        with pytest.raises(urllib.error.URLError):
            scrape(a)
    finally:
        assert d.stop() == 0


def test_a_busy_port_does_not_stop_the_daemon_and_reload_tries_again(tmp_path):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    d = Daemon(tmp_path, BOOST + f"KSM_MONITOR_INTERVAL=3600\nKSM_METRICS_LISTEN={port}\n").start()
    try:
        assert d.wait_adjusts(1)["decision"]["branch"] == "boost"
        assert f"cannot serve metrics on 127.0.0.1:{port}" in d.stderr.read_text()
        busy.close()  # the admin frees the port and reloads
        os.kill(d.proc.pid, signal.SIGHUP)
        d.wait_adjusts(2)
        assert value(samples(scrape(port)), "ksmtuned_decisions_total", decision="boost") == 2
    finally:
        busy.close()
        assert d.stop() == 0


def test_prometheus_client_is_imported_only_when_metrics_are_configured(tmp_path):
    code = (
        "import sys\n"
        "from ksmtuned.core.config import Settings\n"
        "from ksmtuned.report.reporter import make_observers\n"
        "make_observers(Settings(), state_path=None)\n"
        "print('prometheus_client' in sys.modules)\n"
        f"make_observers(Settings.from_aliases({{'KSM_METRICS_TEXTFILE': {str(tmp_path / 'm.prom')!r}}}), state_path=None)\n"
        "print('prometheus_client' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert r.stdout.split() == ["False", "True"], r.stderr


def _full_tick() -> TickData:
    ksm = {name: 7 for name in KSM_METRICS}
    ksm["advisor_mode"] = "scan-time"
    return TickData(
        time_s=1.7e9, duration_s=0.003, reason="interval", error=None, decision="decay", explain="x", run=True,
        npages=250, sleep_ms=10, total_kib=16 << 20, free_kib=8 << 20, committed_kib=4 << 20, thres_kib=3 << 20,
        free_metric="classic", ps_metric="rss", interval_s=60.0, guest_match=("redhat",), ksm=ksm, ksmd_pid=40,
        ksmd_cpu_s=12.5, guests=(GuestData(1, "a", "redhat", 100, 5, -20), GuestData(2, 'b"\\', "libvirt", 1, None, None)),
        decisions={"stop": 1, "boost": 2, "decay": 3, "error": 4}, adjusts=10, adjust_seconds_sum=0.05,
        last_success_s=1.7e9)


def test_metric_names_are_ksmtuned_prefixed_and_unique():
    from prometheus_client import CollectorRegistry, generate_latest
    from ksmtuned.report.metrics import LastTickCollector

    collector = LastTickCollector("9")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    assert generate_latest(registry) == b""  # before the first tick: nothing, not an error
    collector.data = _full_tick()
    fams = list(families(collector.data, "9"))
    names = [f.name for f in fams]
    assert len(names) == len(set(names))
    assert all(n.startswith("ksmtuned") for n in names)
    smp = samples(generate_latest(registry).decode())
    assert value(smp, "ksmtuned_guest_ksm_profit_bytes", guest="a", pid="1") == -20
    assert value(smp, "ksmtuned_guest_ksm_merging_bytes", guest="a", pid="1") == 5 * PAGE
    assert value(smp, "ksmtuned_guest_memory_bytes", guest='b"\\', pid="2") == 1024  # label escaping
    assert value(smp, "ksmtuned_decisions_total", decision="error") == 4
    assert value(smp, "ksmtuned_ksm_advisor_mode", mode="scan-time") == 1


def test_the_textfile_is_generate_latest_of_the_registry(tmp_path):
    """One renderer: prometheus_client's own exposition, for the textfile as for a scrape."""
    from prometheus_client import generate_latest
    from ksmtuned.report.metrics import Metrics

    m = Metrics("9")
    textfile = tmp_path / "ksmtuned.prom"
    m.configure(None, str(textfile))
    assert m.render() == b""  # before the first tick: nothing, not an error
    odd = GuestData(3, 'new\nline "q" back\\slash ü', "regex", 1, 2, 3)
    m.update(TickData(**{**_full_tick().__dict__, "guests": (odd,), "error": "x", "last_success_s": None}))
    assert textfile.read_bytes() == generate_latest(m.registry) != b""
    smp = samples(textfile.read_text())
    assert value(smp, "ksmtuned_guest_memory_bytes", guest='new\nline "q" back\\slash ü', pid="3") == 1024


def exported_names() -> set[str]:
    """Every sample name the exporter can produce (a tick where everything is present)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from ksmtuned.report.metrics import LastTickCollector

    collector = LastTickCollector("9")
    collector.data = _full_tick()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return {name for name, _ in samples(generate_latest(registry).decode())}


def test_rules_use_only_metrics_that_exist():
    used = set(re.findall(r"(?<![:\w])ksmtuned_[a-z0-9_]+(?![:\w])", RULES.read_text()))  # not record names
    assert used, "no ksmtuned_ metric in the rules file"
    assert used <= exported_names(), used - exported_names()


def test_rules_file_is_valid():
    promtool = shutil.which("promtool")
    if promtool:
        r = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        return
    yaml = pytest.importorskip("yaml", reason="neither promtool (Debian: prometheus) nor PyYAML is installed")
    doc = yaml.safe_load(RULES.read_text())
    names = set()
    for group in doc["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule), rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            if "alert" in rule:
                assert rule["labels"]["severity"] in ("info", "warning", "critical")
                assert rule["annotations"]["summary"]
            names.add(rule.get("alert") or rule.get("record"))
    assert {"KsmdHighCpu", "KsmNegativeProfit", "KsmtunedNotAdjusting"} <= names


RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # ksmd: 0.15 s of CPU per second, for an hour
      - series: 'ksmtuned_ksmd_cpu_seconds_total{{instance="busy"}}'
        values: '0+9x60'
      - series: 'ksmtuned_ksmd_cpu_seconds_total{{instance="calm"}}'
        values: '0+1x60'
      - series: 'ksmtuned_ksm_general_profit_bytes{{instance="busy"}}'
        values: '-4096x120'
      - series: 'ksmtuned_ksm_run{{instance="busy"}}'
        values: '1x120'
      # last success at t=0, interval 60 s: stale after 4 minutes (+5m for)
      - series: 'ksmtuned_last_success_timestamp_seconds{{instance="busy"}}'
        values: '0x120'
      - series: 'ksmtuned_monitor_interval_seconds{{instance="busy"}}'
        values: '60x120'
      # ...while its adjusts run (and fail) every minute: it still exports
      - series: 'ksmtuned_last_adjust_timestamp_seconds{{instance="busy"}}'
        values: '0+60x120'
      # a host whose metrics vanish after 10 minutes (endpoint down, textfile removed)
      - series: 'ksmtuned_last_adjust_timestamp_seconds{{instance="gone"}}'
        values: '0+60x10 stale'
      - series: 'ksmtuned_monitor_interval_seconds{{instance="gone"}}'
        values: '60x10 stale'
      # a dead daemon's textfile, served on: the timestamps stay put (not adjusting either, but
      # that is KsmtunedNotExporting's to say)
      - series: 'ksmtuned_last_adjust_timestamp_seconds{{instance="stale"}}'
        values: '0x120'
      - series: 'ksmtuned_last_success_timestamp_seconds{{instance="stale"}}'
        values: '0x120'
      - series: 'ksmtuned_monitor_interval_seconds{{instance="stale"}}'
        values: '60x120'
    alert_rule_test:
      - eval_time: 50m
        alertname: KsmdHighCpu
        exp_alerts:
          - exp_labels: {{severity: warning, instance: busy}}
            exp_annotations:
              summary: "ksmd uses 15% of a CPU on busy"
              description: "ksmd has used more than 10 % of a core for 30 minutes. Lower KSM_NPAGES_MAX or raise KSM_SLEEP_MSEC in /etc/ksmtuned.conf, or check that the guests' memory is mergeable at all (see ksmtuned_ksm_saved_bytes and `ksmtuned check`)."
      - eval_time: 30m
        alertname: KsmNegativeProfit
        exp_alerts: []
      - eval_time: 70m
        alertname: KsmNegativeProfit
        exp_alerts:
          - exp_labels: {{severity: warning, instance: busy}}
            exp_annotations:
              summary: "KSM loses memory on busy (-4kiB)"
              description: "general_profit has been negative for an hour while ksmd runs: its rmap metadata outweighs what it merges. Guest RAM on transparent huge pages is a common cause (`ksmtuned check`, thp_guests)."
      - eval_time: 5m
        alertname: KsmtunedNotAdjusting
        exp_alerts: []
      - eval_time: 20m
        alertname: KsmtunedNotAdjusting
        exp_alerts:
          - exp_labels: {{severity: warning, instance: busy}}
            exp_annotations:
              summary: "ksmtuned has not adjusted KSM on busy for 20m 0s"
              description: "The last successful adjust is older than three monitor intervals while the daemon still runs: every adjust fails (see ksmtuned_decisions_total{{decision=\\"error\\"}} and `journalctl -u ksmtuned`)."
      - eval_time: 5m
        alertname: KsmtunedNotExporting
        exp_alerts: []
      - eval_time: 30m
        alertname: KsmtunedNotExporting
        exp_alerts:
          - exp_labels: {{severity: warning, instance: gone}}
            exp_annotations:
              summary: "ksmtuned on gone stopped exporting fresh metrics"
              description: "No adjust of ksmtuned on gone has been exported for three monitor intervals: the daemon is stopped or hangs (`systemctl status ksmtuned`), its endpoint is unreachable, or node_exporter serves a textfile nobody writes any more."
          - exp_labels: {{severity: warning, instance: stale}}
            exp_annotations:
              summary: "ksmtuned on stale stopped exporting fresh metrics"
              description: "No adjust of ksmtuned on stale has been exported for three monitor intervals: the daemon is stopped or hangs (`systemctl status ksmtuned`), its endpoint is unreachable, or node_exporter serves a textfile nobody writes any more."
"""


def test_rules_fire_when_they_should(tmp_path):
    """promtool's rule unit tests: the alerts fire on the situations they describe, not before."""
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool missing (Debian package prometheus)")
    tests = tmp_path / "rules_test.yml"
    tests.write_text(RULE_TESTS.format(rules=json.dumps(str(RULES))))
    r = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
