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


# --- who holds the pid file's lock: the holder's own fdinfo, else /proc/locks -----------------

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
other = os.open(sys.argv[2], os.O_RDONLY)  # open, not locked
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path):
    """A process holding an exclusive flock on tmp_path/locked.pid, with tmp_path/open.pid merely open."""
    locked, opened = tmp_path / "locked.pid", tmp_path / "open.pid"
    opened.write_text("")
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(locked), str(opened)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "locked\n"
        yield p.pid, locked, opened
    finally:
        p.kill()
        p.wait()


def fake_procfs(root: Path, pid: int, locks: str | None, fds: bool) -> Path:
    """A procfs where PID is the real /proc/PID (fds=True) or only its comm, and `locks` says what it's told."""
    d = root / "fakeproc"
    d.mkdir(parents=True)
    if fds:
        (d / str(pid)).symlink_to(f"/proc/{pid}")
    else:
        (d / str(pid)).mkdir()
        (d / str(pid) / "comm").write_text("ksmtuned\n")
    if locks is not None:
        (d / "locks").write_text(locks)
    return d


def test_lock_holder_seen_in_its_fdinfo_and_in_proc_locks(holder, tmp_path):
    from ksmtuned.service.pidfile import holds_lock, lock_holders

    pid, locked, opened = holder
    assert holds_lock(pid, locked) and pid in lock_holders(locked)
    assert not holds_lock(pid, opened) and not holds_lock(os.getpid(), locked)
    # the process's own fdinfo is enough: a /proc/locks that shows nothing does not matter
    assert holds_lock(pid, locked, fake_procfs(tmp_path, pid, locks="", fds=True))


def test_proc_locks_decides_when_the_descriptors_cannot_be_read(holder, tmp_path):
    from ksmtuned.service.pidfile import holds_lock

    pid, locked, _ = holder
    with open("/proc/locks") as f:
        real = f.read()
    assert holds_lock(pid, locked, fake_procfs(tmp_path / "a", pid, locks=real, fds=False))
    assert not holds_lock(pid, locked, fake_procfs(tmp_path / "b", pid, locks="", fds=False))
    assert not holds_lock(pid, locked, fake_procfs(tmp_path / "c", pid, locks=None, fds=False))


def test_running_daemon_through_fdinfo_alone(holder, tmp_path):
    """A pid file naming a process called ksmtuned that holds its lock (seen only in fdinfo here)."""
    from ksmtuned.errors import NotRunningError
    from ksmtuned.service.pidfile import running_daemon

    pid, locked, _ = holder
    locked.write_text(f"{pid}\n")
    procfs = tmp_path / "p"
    procfs.mkdir()
    (procfs / str(pid)).mkdir()
    (procfs / str(pid) / "comm").write_text("ksmtuned\n")
    (procfs / str(pid) / "fd").symlink_to(f"/proc/{pid}/fd")
    (procfs / str(pid) / "fdinfo").symlink_to(f"/proc/{pid}/fdinfo")
    (procfs / "locks").write_text("")
    assert running_daemon(locked, procfs) == pid
    (procfs / str(pid) / "comm").write_text("python3\n")
    with pytest.raises(NotRunningError, match=r"\(python3\), which is not a ksmtuned holding that pid file"):
        running_daemon(locked, procfs)


def test_pidfile_from_the_config_file_is_the_one_retune_reads(tmp_path):
    """PIDFILE= in ksmtuned.conf moves the daemon's pid file; retune, status and check follow it."""
    with DaemonProc(tmp_path, "KSM_THRES_COEF=100\nKSM_MONITOR_INTERVAL=3600\n") as d:
        conf = tmp_path / "retune.conf"
        conf.write_text(f"PIDFILE={d.pidfile}\n")
        os.chmod(conf, 0o644)
        r = run("retune", "--config", str(conf), "--insecure-config")
        assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
        d.wait_ticks(2, timeout_s=10)
        r = run("status", "--json", "--config", str(conf), "--insecure-config", "--state-file", str(tmp_path / "none.json"))
        assert r.returncode == 0 and f'"pid": {d.pid}' in r.stdout, r.stdout + r.stderr
