"""A real ksmtuned daemon process (``python -m ksmtuned --foreground --force``) with its own
config, KSM directory, pid file and debug log in a temp directory; a fake /proc on demand."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .ksm import fake_ksm_dir

REPO = Path(__file__).resolve().parent.parent.parent


class DaemonProc:
    """`python -m ksmtuned --foreground --force` with its own config, KSM dir, pid file and log."""

    def __init__(self, tmp: Path, config: str = "", sysfs: Optional[Path] = None, extra: Sequence[str] = (),
                 debug_log: bool = True, procfs: Optional[Path] = None):
        self.tmp = Path(tmp)
        self.sysfs = sysfs or fake_ksm_dir(self.tmp / "ksm")
        self.conf = self.tmp / "ksmtuned.conf"
        self.log = self.tmp / "ksmtuned.log"
        self.pidfile = self.tmp / "ksmtune.pid"
        self.stderr = self.tmp / "stderr"
        self.procfs = procfs
        if debug_log:
            config = f"DEBUG=1\nLOGFILE={self.log}\n" + config
        self.conf.write_text(config)
        os.chmod(self.conf, 0o644)
        self.extra = list(extra)
        self.proc: Optional[subprocess.Popen] = None
        self._err = None

    def argv(self, *more: str) -> list:
        procfs = ["--procfs", str(self.procfs)] if self.procfs else []
        return [sys.executable, "-m", "ksmtuned", "--config", str(self.conf), "--sysfs", str(self.sysfs),
                "--pidfile", str(self.pidfile), *procfs, *more]

    def start(self, wait_ticks: int = 1) -> "DaemonProc":
        self._err = open(self.stderr, "w")
        self.proc = subprocess.Popen(self.argv("--foreground", "--force", *self.extra),
                                     stdout=subprocess.DEVNULL, stderr=self._err, cwd=REPO)
        if wait_ticks:
            self.wait_ticks(wait_ticks)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def lines(self) -> list:
        try:
            return self.log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def ticks(self) -> int:
        try:
            return self.log.read_text().count(": committed ")
        except FileNotFoundError:
            return 0

    def committed(self) -> list:
        """The committed kB of every tick so far (the old daemon's debug line)."""
        return [int(line.split(": committed ", 1)[1].split()[0]) for line in self.lines() if ": committed " in line]

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

    def tick(self, timeout_s: float = 30.0) -> None:
        """One more adjust, now (SIGUSR1), and wait for it."""
        n = self.ticks()
        self.signal(signal.SIGUSR1)
        self.wait_ticks(n + 1, timeout_s)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def knob(self, name: str) -> str:
        return (self.sysfs / name).read_text().strip()

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, timeout_s: float = 10.0) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._err:
            self._err.close()
        return self.proc.returncode

    def __enter__(self) -> "DaemonProc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _complete(text: str) -> bool:
    """The last tick has written its final line (sysfs is written before it)."""
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    return last.endswith(", stop ksm") or ": KSMCTL start " in last
