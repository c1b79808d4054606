"""Issue 11: the holes an unprivileged user or an odd file on the host opened, attacked again.

Each test drives the real daemon or the real command; the attacker is the user ``nobody``
(setpriv), the odd files are real FIFOs, /dev/zero, a full tmpfs.  Bounded in count and time,
loopback only.  The numbers the metrics attack measures are printed (pytest -s) and are in
docs/security.md.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.faultrig import Daemon, make_procfs, make_sysfs, read_text, wait_until

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (another user: nobody)")
KSMTUNED = [sys.executable, "-m", "ksmtuned"]
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
SYSTEM_PYTHON = "/usr/bin/python3"  # the pyenv shim does not work for nobody


def run(argv, timeout=30, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("cwd", REPO)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


def nobody_python(code: str, *args: str, **kw) -> subprocess.Popen:
    """A Python process of nobody's running ``code``; its stdout is a pipe of lines."""
    return subprocess.Popen(AS_NOBODY + [SYSTEM_PYTHON, "-c", textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(10)


# --- class 1: the pid file's lock is one no other user can take ------------------------------

WAITER = """
import fcntl, os, sys
pidfile = sys.argv[1]
try:
    os.open(pidfile + ".lock", os.O_RDONLY)
    print("lock file opened", flush=True)
except OSError as e:
    print("lock file:", e.strerror, flush=True)
fd = os.open(pidfile, os.O_RDONLY)
print("waiting", flush=True)
fcntl.flock(fd, fcntl.LOCK_EX)  # the old attack: wait on the pid file's own lock
print("took the pid file's flock", flush=True)
import time
time.sleep(60)
"""


@root
def test_nobody_waiting_on_the_lock_cannot_keep_a_killed_daemon_from_restarting(world_readable_tmp):
    d = Daemon(world_readable_tmp / "d").start()
    os.chmod(d.base, 0o755)
    waiter = nobody_python(WAITER, str(d.pidfile))
    try:
        assert waiter.stdout.readline() == "lock file: Permission denied\n"
        assert waiter.stdout.readline() == "waiting\n"
        d.proc.send_signal(signal.SIGKILL)  # dies uncleanly: pid file and lock file stay
        d.proc.wait(10)
        assert waiter.stdout.readline() == "took the pid file's flock\n"  # what the attack got...
        assert d.pidfile.exists()
        again = Daemon(world_readable_tmp / "d2", pidfile=d.pidfile).start()  # ...and it no longer matters
        with again:
            assert again.pidfile.read_text() == f"{again.pid}\n"
            ticks = again.ticks()
            r = run(KSMTUNED + ["retune", "--pidfile", str(again.pidfile)])
            assert r.returncode == 0, r.stderr
            wait_until(lambda: again.ticks() > ticks, what="the retune")
            assert again.stop() == 0
    finally:
        stop(waiter)
        d.stop()


IMPOSTOR = """
import ctypes, fcntl, os, signal, sys, time
signal.signal(signal.SIGUSR1, lambda *a: print("signalled", flush=True))
ctypes.CDLL(None).prctl(15, b"ksmtuned", 0, 0, 0)  # PR_SET_NAME: the daemon's name
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("ready", flush=True)
time.sleep(60)
"""


@root
def test_root_retune_never_signals_a_process_of_nobody_behind_a_reused_pid(world_readable_tmp):
    d = Daemon(world_readable_tmp / "d").start()
    os.chmod(d.base, 0o755)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    impostor = nobody_python(IMPOSTOR, str(d.pidfile))
    try:
        assert impostor.stdout.readline() == "ready\n"
        # the kernel gave the dead daemon's pid to nobody's process: what root's stale pid file
        # now names (written after the impostor started, so its start time is no tell)
        d.pidfile.write_text(f"{impostor.pid}\n")
        for argv in (["retune"], ["retune", "--quiet"], ["status"], ["check"]):
            r = run(KSMTUNED + argv + ["--pidfile", str(d.pidfile), "--sysfs", str(d.sysfs)])
            assert "Traceback" not in r.stderr, r.stderr
            if argv[0] == "retune":
                assert r.returncode == (0 if "--quiet" in argv else 3), r.stderr
            if argv == ["retune"]:
                assert f"names pid {impostor.pid} (ksmtuned)" in r.stderr and "not signalling" in r.stderr
            if argv[0] == "status":
                assert "ksmtuned: not running" in r.stdout
        # the same as nobody: its own status sees through it too (uid, not the lock file)
        r = run(AS_NOBODY + [SYSTEM_PYTHON, "-m", "ksmtuned", "status", "--pidfile", str(d.pidfile),
                             "--sysfs", str(d.sysfs)])
        assert "ksmtuned: not running" in r.stdout, r.stdout + r.stderr
        time.sleep(0.3)
        assert impostor.poll() is None
        impostor.kill()
        out, _ = impostor.communicate(10)
        assert "signalled" not in out
    finally:
        stop(impostor)
