"""The daemon as a real process: signals, pid file, reload, forking, log lines."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemon_support import DaemonProc, fake_ksm_dir, ksmtuned

PRESSURE = "KSM_THRES_COEF=100\nKSM_MONITOR_INTERVAL=3600\n"
RELIEF = "KSM_THRES_COEF=0\nKSM_THRES_CONST=0\nKSM_MONITOR_INTERVAL=3600\n"
DATE = r"[A-Z][a-z]{2} [A-Z][a-z]{2} [ 0-9]\d \d\d:\d\d:\d\d \S+ \d{4}"


def test_first_adjust_at_start_with_old_log_format(tmp_path):
    with DaemonProc(tmp_path, PRESSURE) as d:
        lines = d.log.read_text().splitlines()
        assert [re.sub(f"^{DATE}: ", "", l) for l in lines][:3] == [
            l.split(": ", 1)[1] for l in lines[:3]]
        assert all(re.match(f"^{DATE}: ", l) for l in lines), lines
        texts = [l.split(": ", 1)[1] for l in lines]
        assert texts[0].startswith("total ") and texts[1] == "sleep 10" and texts[2].startswith("thres ")
        assert texts[-2].endswith(", boost") and texts[-1].startswith("KSMCTL start 300 ")
        assert (d.knob("run"), d.knob("pages_to_scan"), d.knob("sleep_millisecs")) == ("1", "300", "10")
        assert d.pidfile.read_text() == f"{d.pid}\n"
        assert open(f"/proc/{d.pid}/comm").read().strip() == "ksmtuned"


def test_retune_adjusts_within_100ms(tmp_path):
    with DaemonProc(tmp_path, PRESSURE) as d:
        latencies = []
        for n in range(2, 7):
            r = ksmtuned("retune", "--pidfile", str(d.pidfile))
            assert r.returncode == 0, r.stderr
            latencies.append(d.wait_ticks(n, timeout_s=5, poll_s=0.001))
        assert d.knob("pages_to_scan") == "1250"  # 300, 600, 900, 1200, 1250 (clamped), 1250
        assert sorted(latencies)[len(latencies) // 2] < 0.1, latencies


def test_interval_ticks_without_signals(tmp_path):
    with DaemonProc(tmp_path, "KSM_THRES_COEF=100\nKSM_MONITOR_INTERVAL=0.1\n") as d:
        d.wait_ticks(4, timeout_s=5)


def test_second_instance_is_refused(tmp_path):
    with DaemonProc(tmp_path, PRESSURE) as d:
        r = subprocess.run(d.argv("--foreground", "--force"), capture_output=True, text=True, timeout=30)
        assert r.returncode == 4
        assert f"ksmtuned already runs as pid {d.pid}" in r.stderr
        assert d.proc.poll() is None and d.pidfile.read_text() == f"{d.pid}\n"


def test_stale_pid_file_is_replaced(tmp_path):
    (tmp_path / "ksmtune.pid").write_text("999999\n")
    with DaemonProc(tmp_path, PRESSURE) as d:
        assert d.pidfile.read_text() == f"{d.pid}\n"


def test_sigterm_removes_pid_file_and_leaves_ksm(tmp_path):
    d = DaemonProc(tmp_path, PRESSURE).start()
    assert d.pidfile.exists()
    assert d.stop() == 0
    assert not d.pidfile.exists()
    assert d.knob("run") == "1"  # left as it is


def test_sigint_exits_cleanly(tmp_path):
    d = DaemonProc(tmp_path, PRESSURE).start()
    d.signal(signal.SIGINT)
    assert d.proc.wait(10) == 0 and not d.pidfile.exists()


def test_sighup_with_broken_config_keeps_settings(tmp_path):
    with DaemonProc(tmp_path, PRESSURE) as d:
        good = d.conf.read_text()
        d.conf.write_text(good + "KSM_NPAGES_BOOST=lots\n")
        d.signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "reload failed" not in d.stderr.read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
        err = d.stderr.read_text()
        assert f"reload failed, keeping the previous settings: {d.conf}:5: KSM_NPAGES_BOOST: expected an integer" in err
        d.wait_ticks(2)  # a failed reload still adjusts, with the settings in force
        assert d.knob("pages_to_scan") == "600"  # still boosting by 300
        d.conf.write_text(good + "KSM_NPAGES_BOOST=50\n")
        d.signal(signal.SIGHUP)
        d.wait_ticks(3)
        assert d.knob("pages_to_scan") == "650"  # the reload adjusted with the new boost
        assert "reloaded" in d.stderr.read_text()


def test_sighup_switches_to_relief_and_stops_ksm(tmp_path):
    with DaemonProc(tmp_path, PRESSURE) as d:
        assert d.knob("run") == "1"
        d.conf.write_text(f"DEBUG=1\nLOGFILE={d.log}\n" + RELIEF)
        d.signal(signal.SIGHUP)
        d.wait_ticks(2)
        assert d.knob("run") == "0"
        assert d.log.read_text().rstrip().endswith("stop ksm")


def test_signal_storm_is_coalesced(tmp_path):
    with DaemonProc(tmp_path, PRESSURE) as d:
        for _ in range(2000):
            os.kill(d.pid, signal.SIGUSR1)
        for _ in range(50):
            os.kill(d.pid, signal.SIGHUP)
            os.kill(d.pid, signal.SIGUSR1)
        d.wait_ticks(2)
        time.sleep(0.3)
        n = d.ticks()
        assert d.proc.poll() is None
        assert 2 <= n < 2100  # coalesced, and not lost
        d.signal(signal.SIGUSR1)
        d.wait_ticks(n + 1)


def test_retune_refuses_a_pid_file_naming_another_process(tmp_path):
    victim = subprocess.Popen(["sleep", "60"])
    try:
        pidfile = tmp_path / "ksmtune.pid"
        pidfile.write_text(f"{victim.pid}\n")
        r = ksmtuned("retune", "--pidfile", str(pidfile))
        assert r.returncode == 3
        assert f"names pid {victim.pid} (sleep), which is not a ksmtuned" in r.stderr
        time.sleep(0.1)
        assert victim.poll() is None  # not signalled (SIGUSR1 would have killed sleep)
    finally:
        victim.kill()
        victim.wait()


def test_retune_refuses_a_ksmtuned_that_does_not_hold_the_lock(tmp_path):
    with DaemonProc(tmp_path, PRESSURE) as d:
        other = tmp_path / "other.pid"
        other.write_text(f"{d.pid}\n")  # the right process, but not its pid file
        r = ksmtuned("retune", "--pidfile", str(other))
        assert r.returncode == 3 and "not a ksmtuned holding that pid file" in r.stderr


@pytest.mark.parametrize("args,code,message", [
    (["retune", "--pidfile", "/nonexistent/x.pid"], 3, "ksmtuned is not running (no valid pid file"),
    (["retune", "--quiet", "--pidfile", "/nonexistent/x.pid"], 0, ""),
    (["--no-such-option"], 2, "unrecognized arguments"),
    (["frobnicate"], 2, "invalid choice"),
    (["--sysfs", "/nonexistent/ksm", "--once"], 69, "this kernel has no KSM"),
])
def test_exit_codes(tmp_path, args, code, message):
    r = ksmtuned(*args, "--config", str(tmp_path / "none.conf"))
    assert r.returncode == code, r.stderr
    assert message in r.stderr


def test_bad_config_exits_78_naming_the_line(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text("KSM_NPAGES_MIN=1\nKSM_NPAGES_MAX=12OO\n")
    r = ksmtuned("--foreground", "--config", str(conf), "--sysfs", str(fake_ksm_dir(tmp_path)),
                 "--pidfile", str(tmp_path / "p"), "--insecure-config")
    assert r.returncode == 78
    assert r.stderr.strip() == f"ksmtuned: {conf}:2: KSM_NPAGES_MAX: expected an integer, got '12OO'"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_non_root_gets_77_and_dry_run_works(world_readable_tmp):
    from tests.conftest import skip_unless_nobody_can_run_python

    skip_unless_nobody_can_run_python()
    tmp_path = world_readable_tmp
    ksm = fake_ksm_dir(tmp_path)
    for f in ksm.iterdir():
        os.chmod(f, 0o644)  # like sysfs: root may write, others only read
    conf = tmp_path / "c.conf"
    conf.write_text("KSM_THRES_COEF=100\n")
    os.chmod(conf, 0o644)
    base = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-m", "ksmtuned",
            "--config", str(conf), "--sysfs", str(ksm), "--pidfile", str(tmp_path / "p")]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    r = subprocess.run(base + ["--once"], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 77 and "must run as root" in r.stderr, r.stderr
    r = subprocess.run(base + ["--dry-run", "--once"], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0, r.stderr
    assert f"would write {ksm}/pages_to_scan: 100 -> 300" in r.stdout
    assert f"would write {ksm}/run: 0 -> 1" in r.stdout
    assert (ksm / "run").read_text().strip() == "0" and (ksm / "pages_to_scan").read_text().strip() == "100"


def test_once_writes_and_exits(tmp_path):
    ksm = fake_ksm_dir(tmp_path)
    conf = tmp_path / "c.conf"
    conf.write_text("KSM_THRES_COEF=100\n")
    r = ksmtuned("--once", "--config", str(conf), "--sysfs", str(ksm), "--insecure-config")
    assert r.returncode == 0, r.stderr
    assert "KSM on, boosting to 300 pages/10 ms" in r.stdout
    assert (ksm / "run").read_text() == "1" and (ksm / "pages_to_scan").read_text() == "300"


def test_debug_flag_writes_old_lines_to_stdout(tmp_path):
    ksm = fake_ksm_dir(tmp_path)
    r = ksmtuned("--once", "--debug", "--config", str(tmp_path / "none"), "--sysfs", str(ksm))
    texts = [l.split(": ", 1)[1] for l in r.stdout.splitlines() if re.match(DATE, l)]
    assert texts[0].startswith("total ") and texts[3].startswith("committed ")


def test_forks_into_background_like_the_old_daemon(tmp_path):
    ksm = fake_ksm_dir(tmp_path)
    conf = tmp_path / "c.conf"
    log = tmp_path / "log"
    pidfile = tmp_path / "pid"
    conf.write_text(f"DEBUG=1\nLOGFILE={log}\nKSM_THRES_COEF=100\nKSM_MONITOR_INTERVAL=3600\n")
    t0 = time.monotonic()
    # the daemon keeps the caller's stdout/stderr (as the old bash daemon): give it files, not pipes
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        r = subprocess.run([sys.executable, "-m", "ksmtuned", "--config", str(conf), "--sysfs", str(ksm),
                            "--pidfile", str(pidfile), "--force", "--insecure-config"],
                           stdout=out, stderr=err, timeout=30)
    assert r.returncode == 0, (tmp_path / "err").read_text()
    assert time.monotonic() - t0 < 10
    pid = int(pidfile.read_text())
    try:
        assert os.getsid(pid) != os.getsid(0)  # a session of its own, detached from ours
        assert os.getpgid(pid) != pid  # not a session leader: it can never regain a terminal
        assert open(f"/proc/{pid}/comm").read().strip() == "ksmtuned"
        r2 = ksmtuned("--foreground", "--config", str(conf), "--sysfs", str(ksm), "--pidfile", str(pidfile),
                      "--force", "--insecure-config")
        assert r2.returncode == 4 and "already runs" in r2.stderr
        assert ksmtuned("retune", "--pidfile", str(pidfile)).returncode == 0
        deadline = time.monotonic() + 5
        while log.read_text().count("committed") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert log.read_text().count("committed") >= 2
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    assert not pidfile.exists()


def test_check_config_shows_sources(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text("# x\nKSM_NPAGES_MAX=2000\nKSM_UNKNOWN=1\n")
    env = dict(os.environ, KSM_THRES_COEF="30")
    r = ksmtuned("check-config", "--config", str(conf), "--insecure-config", env=env)
    assert r.returncode == 0
    assert re.search(rf"^KSM_NPAGES_MAX=2000 +# {conf}:2$", r.stdout, re.M)
    assert re.search(r"^KSM_THRES_COEF=30 +# environment$", r.stdout, re.M)
    assert re.search(r"^KSM_NPAGES_MIN=64 +# default$", r.stdout, re.M)
    assert f"{conf}:3: unknown key KSM_UNKNOWN" in r.stderr


def test_log_reopened_after_rotation(tmp_path):
    with DaemonProc(tmp_path, PRESSURE) as d:
        rotated = tmp_path / "ksmtuned.log.1"
        os.rename(d.log, rotated)
        d.signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not d.log.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        d.wait_ticks(1)
        assert "committed" in d.log.read_text() and "total" not in d.log.read_text()
        assert rotated.read_text().count("committed") == 1


def test_the_running_daemon_loads_prometheus_client_only_for_metrics(tmp_path):
    """prometheus_client is imported only when KSM_METRICS_LISTEN or KSM_METRICS_TEXTFILE is set.
    (The memory budget itself, at most 40 MiB resident with metrics off and 50 MiB with them on,
    pydantic and psutil included, is measured in bench/, not asserted here: issue 10.)"""
    with DaemonProc(tmp_path) as d:
        d.signal(signal.SIGUSR1)
        d.wait_ticks(2)
        maps = Path(f"/proc/{d.pid}/maps").read_text()
        assert "prometheus" not in maps
        code = ("import sys, ksmtuned.cli, ksmtuned.engine.daemon, ksmtuned.report.reporter, ksmtuned.core.config\n"
                "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prometheus_client'))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_descriptors_do_not_grow_with_ticks(tmp_path):
    """Nothing the daemon reads each tick stays open: its descriptors are the same after 20 ticks."""
    with DaemonProc(tmp_path, PRESSURE) as d:
        def listing():  # (the state file's temp file is open while a tick, counted by its log line, ends)
            links = []
            for n in os.listdir(f"/proc/{d.pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{d.pid}/fd/{n}")
                except FileNotFoundError:  # closed between the listing and the look: not held
                    continue
                if not link.startswith(str(d.state.parent / ".state.json.")):
                    links.append(link)
            return sorted(links)

        def fds():  # a listing that holds still: the tick counted by its log line may not be quite over
            a = listing()
            for _ in range(100):
                time.sleep(0.05)
                b = listing()
                if a == b:
                    return a
                a = b
            return a
        d.signal(signal.SIGUSR1)
        d.wait_ticks(2)
        first = fds()
        assert not [f for f in first if f.startswith("/proc/")], first
        for n in range(3, 23):
            d.signal(signal.SIGUSR1)
            d.wait_ticks(n)
        assert fds() == first
