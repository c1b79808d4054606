"""KSM_POLICY=budget in the real daemon process, against a stand-in KSM directory: crash-safe
start values, steady values left on SIGTERM mid-burst, the kernel advisor taken and given
back (or left alone), and budget ticks between adjusts (a burst ends without waiting for the
monitor interval).  The real-KSM behaviour is in test_budget_real.py."""

from __future__ import annotations

import signal
import time

import pytest

from ksmtuned.core.budget import BudgetSettings, steady_start
from tests.daemon_support import DaemonProc, fake_ksm_dir

# free < threshold: the classic law keeps KSM running (so the budget chooses the rates)
# no guests: the machine may run other tests' QEMU guests, unknown to this stand-in KSM directory
PRESSURE = "KSM_THRES_COEF=100\nKSM_POLICY=budget\nKSM_GUEST_MATCH='regex:^no-such-guest$'\n"
STEADY_PAGES, STEADY_SLEEP = steady_start(BudgetSettings())


def wait_for(predicate, timeout_s: float = 15.0, poll_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return False


def test_start_writes_steady_values_before_anything(tmp_path):
    sysfs = fake_ksm_dir(tmp_path)
    (sysfs / "pages_to_scan").write_text("10000\n")  # a dead daemon's burst, left behind
    (sysfs / "sleep_millisecs").write_text("0\n")
    with DaemonProc(tmp_path, PRESSURE, sysfs=sysfs) as d:
        assert d.knob("run") == "1"
        assert int(d.knob("sleep_millisecs")) == STEADY_SLEEP
        assert int(d.knob("pages_to_scan")) <= STEADY_PAGES
        log = d.log.read_text()
        assert "budget steady" in log and "KSMCTL start" in log


def test_classic_policy_writes_the_classic_values(tmp_path):
    with DaemonProc(tmp_path, "KSM_THRES_COEF=100\n") as d:
        assert d.knob("sleep_millisecs") == "10" or int(d.knob("sleep_millisecs")) >= 10
        assert d.knob("pages_to_scan") == "300"
        assert "budget" not in d.log.read_text()


def test_retune_bursts_and_the_burst_ends_between_adjusts(tmp_path):
    """SIGUSR1 starts a burst; three passes later with nothing gained it is over, seconds
    before the 60 s interval: the budget's own ticks saw it."""
    with DaemonProc(tmp_path, PRESSURE) as d:
        d.signal(signal.SIGUSR1)
        assert wait_for(lambda: d.knob("sleep_millisecs") == str(BudgetSettings().burst_sleep_ms)), d.log.read_text()
        assert "budget burst (retune)" in d.log.read_text()
        for scans in range(1, 6):
            (d.sysfs / "full_scans").write_text(f"{scans}\n")
            time.sleep(1.2)
        assert wait_for(lambda: d.knob("sleep_millisecs") == str(STEADY_SLEEP), timeout_s=10), d.log.read_text()
        assert "burst done after" in d.log.read_text()
        assert d.ticks() == 2  # the start and the retune: the rest were budget ticks


def test_sigterm_mid_burst_leaves_steady_values(tmp_path):
    d = DaemonProc(tmp_path, PRESSURE).start()
    d.signal(signal.SIGUSR1)
    assert wait_for(lambda: d.knob("sleep_millisecs") == str(BudgetSettings().burst_sleep_ms))
    burst_pages = int(d.knob("pages_to_scan"))
    assert burst_pages > STEADY_PAGES
    assert d.stop() == 0
    assert int(d.knob("sleep_millisecs")) == STEADY_SLEEP
    assert int(d.knob("pages_to_scan")) <= STEADY_PAGES


def test_advisor_is_taken_over_and_given_back(tmp_path):
    sysfs = fake_ksm_dir(tmp_path)
    (sysfs / "advisor_mode").write_text("none [scan-time]\n")
    d = DaemonProc(tmp_path, PRESSURE, sysfs=sysfs).start()
    assert d.knob("advisor_mode") == "none"
    assert int(d.knob("sleep_millisecs")) == STEADY_SLEEP
    assert d.stop() == 0
    assert d.knob("advisor_mode") == "scan-time"
    assert "took the scan rate over from the kernel's advisor" in d.stderr.read_text()


def test_advisor_left_alone_when_configured(tmp_path):
    sysfs = fake_ksm_dir(tmp_path)
    (sysfs / "advisor_mode").write_text("none [scan-time]\n")
    with DaemonProc(tmp_path, PRESSURE + "KSM_BUDGET_ADVISOR=leave\n", sysfs=sysfs) as d:
        d.signal(signal.SIGUSR1)
        d.wait_ticks(2)
        assert "[scan-time]" in (d.sysfs / "advisor_mode").read_text()
        assert d.knob("pages_to_scan") == "100" and d.knob("sleep_millisecs") == "20"  # untouched
        assert d.knob("run") == "1"
    err = d.stderr.read_text()
    assert err.count("owns the scan rate (KSM_BUDGET_ADVISOR=leave)") == 1, err


def test_state_file_status_and_metrics_show_the_mode(tmp_path):
    import json

    pytest.importorskip("prometheus_client")  # the metrics extra (the Debian package only recommends it)

    from tests.daemon_support import ksmtuned

    state = tmp_path / "state.json"
    prom = tmp_path / "ksmtuned.prom"
    with DaemonProc(tmp_path, PRESSURE + f"KSM_METRICS_TEXTFILE={prom}\n", extra=["--state-file", str(state)]) as d:
        d.signal(signal.SIGUSR1)
        assert wait_for(lambda: state.exists() and (json.loads(state.read_text()).get("budget") or {}).get("mode") == "burst")
        b = json.loads(state.read_text())["budget"]
        assert b["reason"] == "retune" and b["trigger"] == "retune"
        assert b["target_cpu_pct"] == 80.0 and b["eta_s"] is not None
        assert wait_for(lambda: 'ksmtuned_budget_mode{mode="burst",trigger="retune"} 1.0' in prom.read_text())
        assert "ksmtuned_budget_target_cpu_ratio 0.8" in prom.read_text()
        r = ksmtuned("status", "--sysfs", str(d.sysfs), "--pidfile", str(d.pidfile), "--state-file", str(state))
        assert r.returncode == 0, r.stderr
        assert "budget burst (retune)" in r.stdout


def test_reload_to_classic_leaves_steady_values_then_classic_takes_over(tmp_path):
    with DaemonProc(tmp_path, PRESSURE) as d:
        d.signal(signal.SIGUSR1)
        assert wait_for(lambda: d.knob("sleep_millisecs") == str(BudgetSettings().burst_sleep_ms))
        d.conf.write_text(d.conf.read_text().replace("KSM_POLICY=budget", "KSM_POLICY=classic"))
        d.signal(signal.SIGHUP)
        # the classic ramp again: npages 300 at start, +300 on the retune and on the reload
        assert wait_for(lambda: d.knob("sleep_millisecs") == "10", timeout_s=10), d.stderr.read_text()
        assert d.knob("pages_to_scan") == "900"
        assert "budget: sleep_millisecs 20 -> 1000" in d.stderr.read_text()  # steady values left first


def test_once_leaves_steady_values(tmp_path):
    from tests.daemon_support import ksmtuned

    sysfs = fake_ksm_dir(tmp_path)
    conf = tmp_path / "ksmtuned.conf"
    conf.write_text(PRESSURE + "KSM_BUDGET_ADVISOR=take\n")
    r = ksmtuned("--config", str(conf), "--sysfs", str(sysfs), "--pidfile", str(tmp_path / "p"), "--once",
                 "--state-file", str(tmp_path / "state.json"))
    assert r.returncode == 0, r.stderr
    assert (sysfs / "run").read_text().strip() == "1"
    assert int((sysfs / "sleep_millisecs").read_text()) == STEADY_SLEEP
