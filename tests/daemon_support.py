"""Start a real ksmtuned daemon process against a temp KSM directory, and watch its log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

KNOB_DEFAULTS = {"run": "0", "pages_to_scan": "100", "sleep_millisecs": "20", "pages_sharing": "0",
                 "pages_shared": "0", "full_scans": "0", "pages_unshared": "0", "pages_volatile": "0"}


def fake_ksm_dir(root: Path) -> Path:
    d = root / "ksm"
    d.mkdir()
    for name, value in KNOB_DEFAULTS.items():
        (d / name).write_text(value + "\n")
    return d


class DaemonProc:
    """`python -m ksmtuned --foreground` with its own config, KSM dir, pid file and log."""

    def __init__(self, tmp: Path, config: str = "", sysfs: Path | None = None, extra=(), debug_log=True):
        self.tmp = tmp
        self.sysfs = sysfs or fake_ksm_dir(tmp)
        self.conf = tmp / "ksmtuned.conf"
        self.log = tmp / "ksmtuned.log"
        self.pidfile = tmp / "ksmtune.pid"
        self.state = tmp / "state.json"  # never the machine's /run/ksmtuned/state.json
        self.stderr = tmp / "stderr"
        if debug_log:
            config = f"DEBUG=1\nLOGFILE={self.log}\n" + config
        self.conf.write_text(config)
        os.chmod(self.conf, 0o644)
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None

    def argv(self, *more: str) -> list[str]:
        return [sys.executable, "-m", "ksmtuned", "--config", str(self.conf), "--sysfs", str(self.sysfs),
                "--pidfile", str(self.pidfile), *more]

    def start(self, wait_ticks: int = 1) -> "DaemonProc":
        self._err = open(self.stderr, "w")
        state = [] if "--state-file" in self.extra else ["--state-file", str(self.state)]
        self.proc = subprocess.Popen(self.argv("--foreground", "--force", *state, *self.extra),
                                     stdout=subprocess.DEVNULL, stderr=self._err)
        if wait_ticks:
            self.wait_ticks(wait_ticks)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def ticks(self) -> int:
        try:
            return self.log.read_text().count(": committed ")
        except FileNotFoundError:
            return 0

    def wait_ticks(self, n: int, timeout_s: float = 15.0, poll_s: float = 0.005) -> float:
        """Wait until the log holds at least n complete ticks; the seconds it took."""
        start = time.monotonic()
        deadline = start + timeout_s
        while time.monotonic() < deadline:
            text = self.log.read_text() if self.log.exists() else ""
            if text.count(": committed ") >= n and _complete(text):
                return time.monotonic() - start
            if self.proc and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.stderr.read_text()}")
            time.sleep(poll_s)
        raise AssertionError(f"no tick {n} within {timeout_s}s; log:\n{self.log.read_text() if self.log.exists() else ''}"
                             f"\nstderr:\n{self.stderr.read_text()}")

    def knob(self, name: str) -> str:
        return (self.sysfs / name).read_text().strip()

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _complete(text: str) -> bool:
    """The last tick has written its final line (sysfs is written before it)."""
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    return last.endswith(", stop ksm") or ": KSMCTL start " in last


def ksmtuned(*args: str, env=None, timeout=30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ksmtuned", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)
