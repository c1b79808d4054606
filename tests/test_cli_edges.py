"""The rough edges a first run showed (issue 13), each through the real CLI: exit code and output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.daemon_support import DaemonProc, fake_ksm_dir

ENV = {k: v for k, v in os.environ.items() if k not in ("PIDFILE", "DEBUG", "LOGFILE", "JOURNAL_STREAM")}
ENV["PYTHONPATH"] = str(REPO)


def ksmtuned(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ksmtuned", *args], capture_output=True, text=True, timeout=60,
                          env=ENV, cwd=cwd)


def setup(tmp_path: Path, config: str = "KSM_THRES_COEF=100\n") -> list[str]:
    ksm = fake_ksm_dir(tmp_path)
    conf = tmp_path / "c.conf"
    conf.write_text(config)
    conf.chmod(0o644)
    return ["--config", str(conf), "--sysfs", str(ksm), "--pidfile", str(tmp_path / "pid"),
            "--state-file", str(tmp_path / "state.json"), "--run-dir", str(tmp_path)]


# --- the metrics port: one number everywhere ----------------------------------------------------

def test_the_metrics_port_is_the_same_everywhere():
    files = [REPO / "README.md", REPO / "etc" / "ksmtuned.conf", *sorted((REPO / "docs").glob("*.md")),
             *sorted(REPO.glob("man/*")), *sorted(REPO.glob("contrib/**/*.yml"))]
    ports = {}
    for f in files:
        if f.is_file():
            for m in re.finditer(r"(?:KSM_METRICS_LISTEN=|127\.0\.0\.1:|0\.0\.0\.0:|\[::1\]:|localhost:)(\d{4,5})\b",
                                 f.read_text(errors="replace")):
                ports.setdefault(m.group(1), set()).add(f.relative_to(REPO).as_posix())
    assert set(ports) == {"9729"}, ports


# --- --dry-run is explicit -----------------------------------------------------------------------

def test_dry_run_without_once_is_a_usage_error(tmp_path):
    args = setup(tmp_path)
    r = ksmtuned(*args, "--dry-run")
    assert r.returncode == 2, r.stderr
    assert "--dry-run needs --once" in r.stderr and r.stdout == ""
    assert (tmp_path / "ksm" / "run").read_text() == "0\n" and not (tmp_path / "pid").exists()
    r = ksmtuned(*args, "--dry-run", "--once")
    assert r.returncode == 0, r.stderr
    assert f"would write {tmp_path}/ksm/run: 0 -> 1" in r.stdout
    assert (tmp_path / "ksm" / "run").read_text() == "0\n"  # written: nothing


# --- --once says its decision once ---------------------------------------------------------------

@pytest.mark.parametrize("dry_run", [True, False])
def test_once_prints_the_decision_once(tmp_path, dry_run):
    args = setup(tmp_path)
    if not dry_run and os.geteuid() != 0:
        pytest.skip("the stand-in's files are ours, but the run writes need the preflight as root")
    r = ksmtuned(*args, "--once", *(["--dry-run"] if dry_run else []))
    assert r.returncode == 0, r.stderr
    both = r.stdout + r.stderr
    decision = [line for line in both.splitlines() if "KSM on, boosting" in line]
    assert len(decision) == 1, both
    assert decision[0] in r.stdout.splitlines()[-1]  # on standard output, the command's answer
    if not dry_run:
        assert decision[0].endswith("(pages_to_scan 100 -> 300, sleep_millisecs 20 -> 10, run 0 -> 1)") or \
            "run 0 -> 1" in decision[0], decision[0]
        assert (tmp_path / "ksm" / "run").read_text() == "1"


# --- a second instance, forked, says why once -----------------------------------------------------

def test_a_second_forking_instance_reports_its_error_once(tmp_path):
    d = DaemonProc(tmp_path, "KSM_MONITOR_INTERVAL=3600\n")
    with d:
        r = subprocess.run(d.argv("--force"), capture_output=True, text=True, timeout=60, env=ENV)
        assert r.returncode == 4, r.stderr
        lines = r.stderr.splitlines()
        assert len(lines) == 1, r.stderr
        assert lines[0].startswith(f"ksmtuned: ksmtuned already runs as pid {d.pid} (it holds the lock "), r.stderr
        assert r.stdout == ""


# --- check: a failed check is 5, a check that could not run is 1 --------------------------------

def test_check_exit_codes_tell_a_failed_check_from_a_crash(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text("")
    conf.chmod(0o644)
    procfs = tmp_path / "proc"
    procfs.mkdir()
    (procfs / "meminfo").write_text((REPO / "tests" / "data" / "meminfo-small-vm-6.18").read_text())
    (procfs / "cpuinfo").write_text("processor\t: 0\nphysical id\t: 0\ncore id\t\t: 0\n\n")
    base = ["check", "--config", str(conf), "--pidfile", str(tmp_path / "pid"), "--procfs", str(procfs)]
    # no KSM directory: the `ksm` check fails, the others run
    r = ksmtuned(*base, "--sysfs", str(tmp_path / "no-ksm"))
    assert r.returncode == 5, r.stdout + r.stderr
    assert re.search(r"^FAIL +ksm ", r.stdout, re.M) and r.stdout.splitlines()[-1].startswith("summary: "), r.stdout
    # a crash inside `check` (made here: the checks raise a bug) is 1, never taken for a failed check
    crash = ("import sys, ksmtuned.commands.check as c\n"
             "def broken(host): raise RuntimeError('a bug')\n"
             "c.run_checks = broken\n"
             "from ksmtuned.cli import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", crash, *base, "--sysfs", str(fake_ksm_dir(tmp_path))],
                       capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "RuntimeError: a bug" in r.stderr


# --- every subcommand has a description -----------------------------------------------------------

@pytest.mark.parametrize("command", ["retune", "check-config", "guests", "status", "check"])
def test_every_subcommand_describes_itself(command):
    r = ksmtuned(command, "--help")
    assert r.returncode == 0, r.stderr
    # argparse prints "usage: ...", a blank line, then the description (absent: straight to options)
    body = r.stdout.split("\n\n")
    assert len(body) >= 3 and not body[1].lstrip().startswith(("options:", "optional arguments:")), r.stdout
    assert len(body[1].split()) >= 8, body[1]


def test_top_level_help_says_dry_run_needs_once():
    r = ksmtuned("--help")
    assert r.returncode == 0 and "with --once" in r.stdout


def test_ksmctl_version():
    from ksmtuned import __version__

    r = subprocess.run([sys.executable, "-c", "import sys; from ksmtuned.cli import ksmctl_main; sys.exit(ksmctl_main())",
                        "--version"], capture_output=True, text=True, timeout=30, env=ENV)
    assert r.returncode == 0 and r.stdout.strip() == f"ksmctl (ksmtuned) {__version__}", r.stdout + r.stderr
