"""The one wrapper of a real ksmtuned daemon process (``python -m ksmtuned --foreground
--force``) for tests and benchmarks: its own config, KSM directory, pid file, state file and
debug log in a temp directory; a fake /proc with a writable meminfo on demand; an argv prefix
(strace for fault injection) and Popen extras (a cgroup's preexec_fn, an environment)."""

from __future__ import annotations

import json
import os
import signal as signals
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import proc as fake_proc
from .ksm import fake_ksm_dir

REPO = Path(__file__).resolve().parent.parent.parent


class DaemonProc:
    """`python -m ksmtuned --foreground --force` with its own config, KSM dir, pid file and log.

    ``config``: the config text; with ``debug_log`` (default) ``DEBUG=1`` and ``LOGFILE=<log>``
    come first.  ``meminfo``: build a fake procfs (tests/fakes/proc.py: pid 1 and the real
    /proc/stat) whose meminfo the test rewrites.  ``prefix``: argv before python (strace).
    ``popen_kw``: more Popen arguments (env, preexec_fn).  ``force``: pass --force.
    ``count_only``: a tick is complete once its "committed" line is written (fault tests, where
    the last line of a tick can be an error), not only after its final line.
    """

    def __init__(self, tmp: Path, config: str = "", sysfs: Optional[Path] = None, extra: Sequence[str] = (),
                 debug_log: bool = True, procfs: Optional[Path] = None, state: Optional[Path] = None,
                 stderr_name: str = "stderr", *, log: Optional[Path] = None, pidfile: Optional[Path] = None,
                 meminfo: Optional[str] = None, prefix: Sequence[str] = (), force: bool = True,
                 popen_kw: Optional[dict] = None, count_only: bool = False, cwd: Optional[Path] = None):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.sysfs = sysfs or fake_ksm_dir(self.tmp / "ksm")
        self.conf = self.tmp / "ksmtuned.conf"
        self.log = Path(log) if log else self.tmp / "ksmtuned.log"
        self.pidfile = Path(pidfile) if pidfile else self.tmp / "ksmtune.pid"
        self.state = state or self.tmp / "state.json"  # never the machine's /run/ksmtuned/state.json
        self.stderr = self.tmp / stderr_name
        self.stdout = self.tmp / "stdout"
        if meminfo is not None and procfs is None:
            procfs = fake_proc.view_of(self.tmp / "proc", [1], meminfo=meminfo, links=("stat",))
        self.procfs = procfs
        if debug_log:
            config = f"DEBUG=1\nLOGFILE={self.log}\n" + config
        fake_proc.write_atomic(self.conf, config)
        os.chmod(self.conf, 0o644)
        self.extra = list(extra)
        self.prefix = list(prefix)
        self.force = force
        self.popen_kw = dict(popen_kw or {})
        self.count_only = count_only
        self.cwd = cwd or REPO
        self.proc: Optional[subprocess.Popen] = None
        self._err = None

    @property
    def meminfo(self) -> Path:
        """The fake procfs's meminfo (rewrite it with tests.fakes.proc.write_atomic)."""
        assert self.procfs is not None
        return self.procfs / "meminfo"

    def argv(self, *more: str) -> list:
        procfs = ["--procfs", str(self.procfs)] if self.procfs else []
        return [sys.executable, "-m", "ksmtuned", "--config", str(self.conf), "--sysfs", str(self.sysfs),
                "--pidfile", str(self.pidfile), *procfs, *more]

    def daemon_argv(self) -> list:
        """The daemon's whole command line (prefix, --foreground, --force, the state file, extra)."""
        state = [] if "--state-file" in self.extra else ["--state-file", str(self.state)]
        force = ["--force"] if self.force else []
        return [*self.prefix, *self.argv("--foreground", *force, *state, *self.extra)]

    def start(self, wait_ticks: int = 1, *, wait: Optional[bool] = None, timeout_s: float = 15.0) -> "DaemonProc":
        """Start; wait until ``wait_ticks`` ticks are in the debug log (``wait=False``: none)."""
        self._err = open(self.stderr, "a")
        with open(self.stdout, "ab") as out:
            kw = {"stdin": subprocess.DEVNULL, "stdout": out, "stderr": self._err, "cwd": self.cwd}
            kw.update(self.popen_kw)  # a benchmark's own output file, environment, cgroup
            self.proc = subprocess.Popen(self.daemon_argv(), **kw)
        if wait is False:
            wait_ticks = 0
        if wait_ticks:
            self.wait_ticks(wait_ticks, timeout_s)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cli(self, *args: str) -> list:
        """argv of a short command (status, check) aimed at this daemon's files."""
        return [sys.executable, "-m", "ksmtuned", *args, "--config", str(self.conf), "--sysfs", str(self.sysfs),
                "--pidfile", str(self.pidfile)]

    def lines(self) -> list:
        try:
            return self.log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def log_text(self) -> str:
        """The debug log (or, without LOGFILE, the daemon's stdout) so far."""
        return read_text(self.log) if self.log.exists() or not self.stdout.exists() else read_text(self.stdout)

    def stderr_text(self) -> str:
        return read_text(self.stderr)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ticks(self) -> int:
        """Adjusts that wrote their 'committed N free N' debug line."""
        return self.log_text().count(": committed ")

    def wait_more(self, more: int = 1, timeout_s: float = 10.0) -> int:
        """Wait for ``more`` ticks after the ones so far; the count then."""
        start = self.ticks()
        return wait_until(lambda: self.ticks() >= start + more and self.ticks(), timeout_s,
                          what=f"{more} more tick(s)")

    def retune_and_wait(self, timeout_s: float = 10.0) -> None:
        """SIGUSR1, and wait until a tick is counted (any tick: see count_only)."""
        start = self.ticks()
        self.signal(signals.SIGUSR1)
        wait_until(lambda: self.ticks() > start, timeout_s, what="a tick after SIGUSR1")

    def committed(self) -> list:
        """The committed kB of every tick so far (the old daemon's debug line)."""
        return [int(line.split(": committed ", 1)[1].split()[0]) for line in self.lines() if ": committed " in line]

    def wait_ticks(self, n: int, timeout_s: float = 15.0, poll_s: float = 0.005) -> float:
        """Wait until the log holds at least n complete ticks; the seconds it took."""
        start = time.monotonic()
        deadline = start + timeout_s
        while time.monotonic() < deadline:
            text = self.log_text()
            if text.count(": committed ") >= n and (self.count_only or _complete(text)):
                return time.monotonic() - start
            if self.proc and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.stderr.read_text()}")
            time.sleep(poll_s)
        raise AssertionError(f"no tick {n} within {timeout_s}s; log:\n{self.log_text()}\nstderr:\n{self.stderr_text()}")

    def tick(self, timeout_s: float = 30.0) -> None:
        """One more adjust, now (SIGUSR1), and wait for it."""
        n = self.ticks()
        self.signal(signals.SIGUSR1)
        self.wait_ticks(n + 1, timeout_s)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def knob(self, name: str) -> str:
        """A knob's value; for a selection ('[none] scan-time'), the selected word."""
        text = (self.sysfs / name).read_text().strip()
        if "[" in text and "]" in text:
            text = text[text.index("[") + 1 : text.index("]")]
        return text

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def read_state(self) -> Optional[dict]:
        """The state file the daemon writes (None before the first write, or for a planted file)."""
        try:
            return json.loads(self.state.read_bytes())
        except (FileNotFoundError, ValueError, RecursionError):
            return None

    def wait_adjusts(self, n: int, timeout_s: float = 20.0) -> dict:
        """Wait until this daemon's state file counts at least n adjusts; that state."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = self.read_state()
            if st and self.proc and (st.get("daemon") or {}).get("pid") == self.proc.pid and st["counts"]["adjusts"] >= n:
                return st
            if self.proc and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.stderr.read_text()}")
            time.sleep(0.01)
        raise AssertionError(f"no adjust {n} within {timeout_s}s: {self.stderr.read_text()}")

    def stop(self, timeout_s: float = 15.0, sig: int = signals.SIGTERM) -> Optional[int]:
        """``sig`` (SIGTERM), and its exit code; a daemon that does not stop within ``timeout_s``
        is killed and the test fails."""
        if self.proc is None:
            return None
        hung = False
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                hung = True
        if self._err:
            self._err.close()
        if hung:
            raise AssertionError(f"daemon did not stop within {timeout_s} s of signal {sig}")
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, now (teardown of a daemon a test may have left hung)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._err:
            self._err.close()

    def __enter__(self) -> "DaemonProc":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            self.kill()  # the test failed: no second error from a slow stop
        else:
            self.stop()


def wait_until(pred: Callable[[], object], timeout_s: float = 10.0, interval_s: float = 0.01, what: str = ""):
    """Poll ``pred`` until it returns something true; that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or pred}")
        time.sleep(interval_s)


def read_text(path: Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _complete(text: str) -> bool:
    """The last tick has written its final line (sysfs is written before it)."""
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    return last.endswith(", stop ksm") or ": KSMCTL start " in last
