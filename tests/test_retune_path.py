"""`retune`'s fast path: the hook's command line is read without argparse, and means the same.

`ksmtuned retune [--quiet] [--pidfile PATH] [--procfs DIR]` skips building the full parser
(cli._retune_args); everything else goes to argparse.  These tests hold the two to the same
meaning (a property over generated command lines), check the edge cases as real processes
(exit codes and messages as README "Exit codes" documents them), and check WHAT the retune path
imports (not how long it takes: speed is the benchmark's business, bench/cmdlat.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from ksmtuned.cli import DEFAULT_PROCFS, _opt, _retune_args, build_parser, pidfile_path
from ksmtuned.errors import ExitCode
from tests.daemon_support import DaemonProc

REPO = Path(__file__).resolve().parent.parent


def meaning(args, env) -> tuple:
    """What `cmd_retune` reads from a namespace."""
    return (args.command, args.version, args.quiet, pidfile_path(args, env), _opt(args, "procfs", DEFAULT_PROCFS))


# --- the parse, as a table ---------------------------------------------------------------------

@pytest.mark.parametrize("argv,quiet,pidfile,procfs", [
    (["retune"], False, None, None),
    (["retune", "--quiet"], True, None, None),
    (["retune", "--pidfile", "/run/x.pid"], False, "/run/x.pid", None),
    (["retune", "--quiet", "--pidfile", "/run/x.pid"], True, "/run/x.pid", None),
    (["retune", "--pidfile", "/run/x.pid", "--quiet"], True, "/run/x.pid", None),  # option order
    (["retune", "--pidfile=/run/x.pid", "--quiet"], True, "/run/x.pid", None),
    (["retune", "--pidfile=a=b"], False, "a=b", None),  # only the first "=" splits
    (["retune", "--pidfile="], False, "", None),  # empty: $PIDFILE, else the default (as argparse)
    (["retune", "--pidfile", "a", "--pidfile", "b"], False, "b", None),  # the last one wins
    (["retune", "--procfs", "/p", "--pidfile", "x"], False, "x", "/p"),
    (["retune", "--procfs=/p"], False, None, "/p"),
    (["retune", "--pidfile", "retune"], False, "retune", None),
    (["retune", "--quiet", "--quiet"], True, None, None),
])
def test_fast_path_reads_the_hooks_command_line(argv, quiet, pidfile, procfs):
    args = _retune_args(argv)
    assert args is not None
    assert (args.command, args.version, args.quiet, args.pidfile, args.procfs) == ("retune", False, quiet, pidfile, procfs)


@pytest.mark.parametrize("argv", [
    [], ["status"], ["--pidfile", "x", "retune"],  # not `retune` first: global options, other commands
    ["retune", "--help"], ["retune", "-h"],
    ["retune", "--pid", "x"], ["retune", "--qui"],  # abbreviations: argparse decides
    ["retune", "--quiet=1"],  # argparse: "ignored explicit argument"
    ["retune", "--pidfile"],  # argparse: "expected one argument"
    ["retune", "--pidfile", "-x"], ["retune", "--pidfile", "-"], ["retune", "--pidfile", "--quiet"],
    ["retune", "--config", "c"], ["retune", "--insecure-config"],  # accepted by retune, not by the fast path
    ["retune", "--bogus"], ["retune", "extra"], ["retune", "--"], ["retune", ""], ["retune", "-q"],
    ["Retune"], ["retune ", "--quiet"],
])
def test_anything_else_goes_to_argparse(argv):
    assert _retune_args(argv) is None


# --- the two parsers never disagree ------------------------------------------------------------

VALUES = st.one_of(st.sampled_from(["x", "/run/a.pid", "", "-", "-x", "--quiet", "retune", "=", "a=b", "é"]),
                   st.text(max_size=5))
OPTIONS = st.sampled_from(["--pidfile", "--procfs"])
JUNK = st.sampled_from(["--", "-h", "--help", "--pid", "--qui", "--quiet=", "--config", "--sysfs", "-q", "x", ""])
# mostly well-formed pieces (so that the fast path takes many), now and then one it must refuse
PIECE = st.one_of(
    st.just(["--quiet"]),
    st.tuples(OPTIONS, VALUES).map(list),
    st.tuples(OPTIONS, VALUES).map(lambda ov: [f"{ov[0]}={ov[1]}"]),
    st.one_of(JUNK, st.text(max_size=4)).map(lambda junk: [junk]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(PIECE, max_size=5).map(lambda pieces: [a for piece in pieces for a in piece]),
       st.sampled_from([{}, {"PIDFILE": "/env/ksmtune.pid"}]))
def test_what_the_fast_path_accepts_argparse_reads_the_same(tail, env):
    argv = ["retune", *tail]
    fast = _retune_args(argv)
    if fast is None:
        return
    full = build_parser().parse_args(argv)  # no SystemExit: what the fast path takes is valid
    assert meaning(fast, env) == meaning(full, env), argv


# --- as real processes: exit codes and messages ------------------------------------------------

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


def test_fast_path_signals_a_live_daemon(tmp_path):
    with DaemonProc(tmp_path, "KSM_THRES_COEF=100\nKSM_MONITOR_INTERVAL=3600\n") as d:
        for n, argv in enumerate(([f"--pidfile={d.pidfile}", "--quiet"], ["--procfs", "/proc", "--pidfile", str(d.pidfile)]),
                                 start=2):
            r = run("retune", *argv)
            assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
            d.wait_ticks(n, timeout_s=10)


# --- what the retune path imports --------------------------------------------------------------

HEAVY = ("argparse", "logging", "json", "pydantic", "psutil", "pathlib", "typing", "shutil", "locale")


def imported_by(*argv: str) -> tuple[list[str], subprocess.CompletedProcess]:
    """Every module a `python -S -X importtime -m ksmtuned ...` imports.

    -S: no site, so nothing is imported before ksmtuned asks for it (the dev venv's editable
    install loads pathlib and re from site, which would hide them); -m finds ksmtuned in the
    checkout (cwd).
    """
    return imported_by_args("-m", "ksmtuned", *argv)


def imported_by_args(*args: str) -> tuple[list[str], subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k != "PIDFILE"}
    r = subprocess.run([sys.executable, "-S", "-X", "importtime", *args], capture_output=True,
                       text=True, timeout=30, cwd=REPO, env=env)
    modules = [line.split("|")[-1].strip() for line in r.stderr.splitlines()
               if line.startswith("import time:") and "|" in line and "self [us]" not in line]
    return modules, r


@pytest.mark.parametrize("argv", [
    ["retune", "--quiet", "--pidfile", "/nonexistent/ksmtune.pid"],
    ["retune", "--pidfile=/nonexistent/ksmtune.pid", "--quiet"],
])
def test_retune_imports_nothing_heavy(argv):
    modules, r = imported_by(*argv)
    assert r.returncode == 0
    assert {"ksmtuned.cli", "ksmtuned.pidfile", "ksmtuned.errors"} <= set(modules), modules  # the parse saw them
    # what `-m` itself costs (runpy; on 3.9 its importlib.util brings typing) is not retune's
    runpy_modules, _ = imported_by_args("-c", "import runpy")
    assert not [m for m in modules if m.split(".")[0] in HEAVY and m not in runpy_modules], modules


def test_the_import_check_sees_a_heavy_import():
    """The same check on `retune --help`, which takes the full parser: argparse shows up."""
    modules, r = imported_by("retune", "--help")
    assert r.returncode == 0 and "argparse" in modules


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
    from ksmtuned.pidfile import holds_lock, lock_holders

    pid, locked, opened = holder
    assert holds_lock(pid, locked) and pid in lock_holders(locked)
    assert not holds_lock(pid, opened) and not holds_lock(os.getpid(), locked)
    # the process's own fdinfo is enough: a /proc/locks that shows nothing does not matter
    assert holds_lock(pid, locked, fake_procfs(tmp_path, pid, locks="", fds=True))


def test_proc_locks_decides_when_the_descriptors_cannot_be_read(holder, tmp_path):
    from ksmtuned.pidfile import holds_lock

    pid, locked, _ = holder
    with open("/proc/locks") as f:
        real = f.read()
    assert holds_lock(pid, locked, fake_procfs(tmp_path / "a", pid, locks=real, fds=False))
    assert not holds_lock(pid, locked, fake_procfs(tmp_path / "b", pid, locks="", fds=False))
    assert not holds_lock(pid, locked, fake_procfs(tmp_path / "c", pid, locks=None, fds=False))


def test_running_daemon_through_fdinfo_alone(holder, tmp_path):
    """A pid file naming a process called ksmtuned that holds its lock (seen only in fdinfo here)."""
    from ksmtuned.errors import NotRunningError
    from ksmtuned.pidfile import running_daemon

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
