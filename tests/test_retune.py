"""`ksmtuned retune` as real processes: exit codes and messages (README "Exit codes"), the pid
file it reads (the same as the daemon's: --pidfile, else PIDFILE from the config, else from the
environment, else the default), and who holds the pid file's lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ksmtuned.errors import ExitCode
from tests.daemon_support import DaemonProc

REPO = Path(__file__).resolve().parent.parent


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "PIDFILE"}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "ksmtuned", *args], capture_output=True, text=True, timeout=30,
                          env=e, cwd=REPO)


def test_retune_without_daemon_in_both_forms_and_orders(tmp_path):
    missing = tmp_path / "none.pid"
    for argv in (["--pidfile", str(missing)], [f"--pidfile={missing}"], ["--pid", str(missing)]):
        r = run("retune", *argv)
        assert r.returncode == ExitCode.NOT_RUNNING and r.stdout == ""
        assert r.stderr == f"ksmtuned: ksmtuned is not running (no valid pid file at {missing})\n"
        for quiet in (["--quiet", *argv], [*argv, "--quiet"]):
            r = run("retune", *quiet)
            assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_pidfile_from_the_environment_and_an_empty_option(tmp_path):
    from_env = tmp_path / "env.pid"
    for argv in (["retune"], ["retune", "--pidfile="]):  # "" is no value: $PIDFILE wins, as with argparse
        r = run(*argv, env={"PIDFILE": str(from_env)})
        assert r.returncode == ExitCode.NOT_RUNNING and f"no valid pid file at {from_env})" in r.stderr


def test_procfs_option_is_honoured(tmp_path):
    """A pid file naming a live process, but a proc directory that has no such pid: refused as gone."""
    pidfile = tmp_path / "ksmtune.pid"
    pidfile.write_text(f"{os.getpid()}\n")
    (tmp_path / "proc").mkdir()
    for argv in (["--procfs", str(tmp_path / "proc")], [f"--procfs={tmp_path / 'proc'}"]):
        r = run("retune", "--pidfile", str(pidfile), *argv)
        assert r.returncode == ExitCode.NOT_RUNNING
        assert f"names pid {os.getpid()}, which is gone" in r.stderr


@pytest.mark.parametrize("argv,message", [
    (["retune", "--bogus"], "ksmtuned: error: unrecognized arguments: --bogus"),
    (["retune", "--pidfile"], "ksmtuned retune: error: argument --pidfile: expected one argument"),
    (["retune", "--pidfile", "-x"], "ksmtuned retune: error: argument --pidfile: expected one argument"),
    (["retune", "--quiet=1"], "ksmtuned retune: error: argument --quiet: ignored explicit argument '1'"),
    (["retune", "extra"], "ksmtuned: error: unrecognized arguments: extra"),
])
def test_usage_errors_still_exit_2_from_argparse(argv, message):
    r = run(*argv)
    assert r.returncode == ExitCode.USAGE and r.stdout == ""
    assert r.stderr.startswith("usage: ksmtuned") and message in r.stderr, r.stderr


def test_retune_help_is_argparse_help():
    r = run("retune", "--help", env={"COLUMNS": "100"})
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith("usage: ksmtuned retune [-h]")
    assert "--quiet" in r.stdout and "--pidfile PATH" in r.stdout and "(for hooks)" in r.stdout


def test_retune_signals_a_live_daemon(tmp_path):
    with DaemonProc(tmp_path, "KSM_THRES_COEF=100\nKSM_MONITOR_INTERVAL=3600\n") as d:
        for n, argv in enumerate(([f"--pidfile={d.pidfile}", "--quiet"], ["--procfs", "/proc", "--pidfile", str(d.pidfile)]),
                                 start=2):
            r = run("retune", *argv)
            assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
            d.wait_ticks(n, timeout_s=10)


# --- who holds the pid file's lock: the kernel says (F_GETLK on the root-only lock file) ------

HOLDER = """
import sys, time
from ksmtuned.service.pidfile import PidFile
p = PidFile(sys.argv[1])
p.acquire()
p.write_pid()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path):
    """A process holding tmp_path/locked.pid as the daemon does (the lock file, then the pid file)."""
    locked = tmp_path / "locked.pid"
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(locked)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert p.stdout.readline() == "locked\n"
        yield p, locked
    finally:
        p.kill()
        p.wait()


def test_lock_holder_is_named_by_the_kernel_and_the_lock_file_is_private(holder, tmp_path):
    from ksmtuned.service.pidfile import PidFile, lock_holder
    from ksmtuned.errors import AlreadyRunningError

    p, locked = holder
    lock = Path(f"{locked}.lock")
    assert lock_holder(locked) == p.pid
    assert locked.read_text() == f"{p.pid}\n" and locked.stat().st_mode & 0o777 == 0o644
    assert lock.stat().st_mode & 0o777 == 0o600
    with pytest.raises(AlreadyRunningError, match=f"already runs as pid {p.pid}"):
        PidFile(locked).acquire()
    p.kill()
    p.wait()
    assert lock_holder(locked) == 0  # killed: the kernel dropped the lock with the process
    assert lock_holder(tmp_path / "none.pid") == 0
    taker = PidFile(locked)
    taker.acquire()  # the files a dead daemon left are taken over
    taker.release()
    assert not locked.exists() and not lock.exists()


def test_a_lock_file_others_could_open_is_refused(tmp_path):
    from ksmtuned.service.pidfile import PidFile
    from ksmtuned.errors import KsmtunedError

    pidfile = tmp_path / "x.pid"
    Path(f"{pidfile}.lock").write_text("")
    os.chmod(f"{pidfile}.lock", 0o644)
    with pytest.raises(KsmtunedError, match="mode 0600"):
        PidFile(pidfile).acquire()
    assert not pidfile.exists()


def test_pidfile_from_the_config_file_is_the_one_retune_reads(tmp_path):
    """PIDFILE= in ksmtuned.conf moves the daemon's pid file; retune, status and check follow it."""
    with DaemonProc(tmp_path, "KSM_THRES_COEF=100\nKSM_MONITOR_INTERVAL=3600\n") as d:
        conf = tmp_path / "retune.conf"
        conf.write_text(f"PIDFILE={d.pidfile}\n")
        os.chmod(conf, 0o644)
        r = run("retune", "--config", str(conf), "--insecure-config")
        assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
        d.wait_ticks(2, timeout_s=10)
        r = run("status", "--json", "--config", str(conf), "--insecure-config", "--sysfs", str(d.sysfs),
                "--state-file", str(tmp_path / "none.json"))
        assert r.returncode == 0 and f'"pid": {d.pid}' in r.stdout, r.stdout + r.stderr
