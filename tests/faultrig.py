"""A real ksmtuned daemon in a sandbox of temp files, for the fault, security and soak tests.

The daemon runs as its own process (``python -m ksmtuned --foreground --force ...``) against
a temp directory standing in for /sys/kernel/mm/ksm (or the real one, under ``real_ksm``) and
a temp procfs whose ``meminfo`` the test writes.  The temp procfs also drives the process
scan, so it links the real ``/proc/stat`` (the boot time) and ``/proc/1`` (a process table
with a pid in it): the scan is real but sees no guest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from tests.fakes import ksm as _ksm
from tests.fakes import proc as _proc

GIB_KIB = _proc.GIB_KIB
TOTAL_KIB = _proc.TOTAL_KIB  # threshold at the default KSM_THRES_COEF=20: 3,355,443 kB


meminfo_text = _proc.meminfo_text
write_atomic = _proc.write_atomic


#: free 8 GiB of 16: no pressure, KSM off (run=0)
STOP = meminfo_text(free_kib=8 * GIB_KIB)
#: free 1 GiB of 16, below the 3.2 GiB threshold: boost (run=1, pages_to_scan += 300)
BOOST = meminfo_text(free_kib=1 * GIB_KIB)


def make_sysfs(root: Path, run: str = "0", pages_to_scan: str = "100", sleep_millisecs: str = "20") -> Path:
    return _ksm.fake_ksm_dir(root, {"run": run, "pages_to_scan": pages_to_scan, "sleep_millisecs": sleep_millisecs})


def make_procfs(root: Path, meminfo: str = STOP) -> Path:
    return _proc.view_of(root, [1], meminfo=meminfo, links=("stat",))


def wait_until(pred: Callable[[], object], timeout_s: float = 10.0, interval_s: float = 0.01, what: str = ""):
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


class Daemon:
    """One real ksmtuned process and its files under ``base``."""

    def __init__(self, base: Path, conf: str | None = None, interval_s: float = 3600, sysfs: Path | None = None,
                 procfs: Path | None | str = "fake", meminfo: str = STOP, pidfile: Path | None = None,
                 logfile: Path | None | str = "default", extra_args: Sequence[str] = (),
                 prefix: Sequence[str] = (), force: bool = True):
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.sysfs = Path(sysfs) if sysfs else make_sysfs(self.base / "ksm")
        if procfs == "fake":
            self.procfs: Path | None = make_procfs(self.base / "proc", meminfo)
        else:
            self.procfs = Path(procfs) if procfs else None
        self.pidfile = Path(pidfile) if pidfile else self.base / "ksmtuned.pid"
        self.logfile = self.base / "debug.log" if logfile == "default" else (Path(logfile) if logfile else None)
        self.config = self.base / "ksmtuned.conf"
        if conf is None:
            conf = f"KSM_MONITOR_INTERVAL={interval_s}\nDEBUG=1\n"
            if self.logfile:
                conf += f"LOGFILE={self.logfile}\n"
        write_atomic(self.config, conf)
        self.stderr_path = self.base / "stderr"
        self.stdout_path = self.base / "stdout"
        # the state file goes with the rest, never to the machine's /run/ksmtuned
        self.state_file = self.base / "state.json"
        self.extra_args = list(extra_args)
        self.prefix = list(prefix)
        self.force = force
        self.proc: subprocess.Popen | None = None

    @property
    def meminfo(self) -> Path:
        assert self.procfs is not None
        return self.procfs / "meminfo"

    def argv(self) -> list[str]:
        argv = self.prefix + [sys.executable, "-m", "ksmtuned", "--foreground", "--config", str(self.config),
                              "--sysfs", str(self.sysfs), "--pidfile", str(self.pidfile)]
        if self.force:
            argv.append("--force")
        if self.procfs is not None:
            argv += ["--procfs", str(self.procfs)]
        if "--state-file" not in self.extra_args:
            argv += ["--state-file", str(self.state_file)]
        return argv + self.extra_args

    def start(self, wait: bool = True, timeout_s: float = 15.0) -> "Daemon":
        """Start; with wait, return once the first adjust is in the debug log."""
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(self.argv(), stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        if wait:
            wait_until(lambda: self.ticks() >= 1 or self.proc.poll() is not None, timeout_s, what="the first tick")
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}: {self.stderr()}"
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return read_text(self.logfile) if self.logfile else read_text(self.stdout_path)

    def stderr(self) -> str:
        return read_text(self.stderr_path)

    def ticks(self) -> int:
        """Adjusts that completed (each writes one 'committed N free N' debug line)."""
        return self.log().count(": committed ")

    def knob(self, name: str) -> str:
        text = (self.sysfs / name).read_text().strip()
        if "[" in text:
            text = text[text.index("[") + 1 : text.index("]")]
        return text

    def signal(self, signo: int) -> None:
        os.kill(self.pid, signo)

    def wait_ticks(self, more: int = 1, timeout_s: float = 10.0) -> int:
        start = self.ticks()
        return wait_until(lambda: self.ticks() >= start + more and self.ticks(), timeout_s,
                          what=f"{more} more tick(s)")

    def retune_and_wait(self, timeout_s: float = 10.0) -> None:
        start = self.ticks()
        self.signal(signal.SIGUSR1)
        wait_until(lambda: self.ticks() > start, timeout_s, what="a tick after SIGUSR1")

    def stop(self, timeout_s: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not stop within {timeout_s} s of SIGTERM") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
