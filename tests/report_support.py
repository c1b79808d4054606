"""Helpers for the status/check/metrics/state tests (issue 4): a real daemon on a fake KSM
directory, fake QEMU guests (real processes), and a fake procfs that shows only them (the
fakes themselves are tests/fakes)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from tests.fakes import ksm as _ksm
from tests.fakes import guests as _guests
from tests.fakes import proc as _proc

#: A fake KSM directory: distinct values, so a mix-up between counters shows.
FAKE_KSM = _ksm.FULL


def fake_ksm_dir(root: Path, values: dict[str, str] | None = None) -> Path:
    """ROOT/mm/ksm (transparent_hugepage can go beside it, in ROOT/mm), tests/fakes/ksm.py."""
    d = root / "mm" / "ksm"
    d.parent.mkdir(parents=True, exist_ok=True)
    d.mkdir()
    return _ksm.fake_ksm_dir(d, values or FAKE_KSM)


def read_sysfs(d: Path) -> dict[str, int | str]:
    """The directory as `status` should report it (ints where numbers, advisor's selected word)."""
    out: dict[str, int | str] = {}
    for f in sorted(d.iterdir()):
        text = f.read_text().strip()
        if "[" in text:
            text = text[text.index("[") + 1:text.index("]")]
        out[f.name] = int(text) if text.lstrip("-").isdigit() else text
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """`python -m ksmtuned --foreground --force` on a fake KSM dir, with its own pid and state files."""

    def __init__(self, tmp: Path, config: str = "", sysfs: Path | None = None, state: Path | None = None):
        self.tmp = tmp
        self.sysfs = sysfs or fake_ksm_dir(tmp)
        self.conf = tmp / "ksmtuned.conf"
        self.pidfile = tmp / "ksmtune.pid"
        self.state = state or tmp / "run" / "state.json"
        self.stderr = tmp / "daemon.stderr"
        self.conf.write_text(config)
        os.chmod(self.conf, 0o644)
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str) -> list[str]:
        """argv of a short command (status, check) aimed at this daemon's files."""
        return [sys.executable, "-m", "ksmtuned", *args, "--config", str(self.conf), "--sysfs", str(self.sysfs),
                "--pidfile", str(self.pidfile)]

    def start(self, wait_state: bool = True) -> "Daemon":
        argv = [sys.executable, "-m", "ksmtuned", "--foreground", "--force", "--config", str(self.conf),
                "--sysfs", str(self.sysfs), "--pidfile", str(self.pidfile), "--state-file", str(self.state)]
        with open(self.stderr, "a") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
        if wait_state:
            self.wait_adjusts(1)
        return self

    def read_state(self) -> dict | None:
        try:
            return json.loads(self.state.read_bytes())
        except (FileNotFoundError, ValueError, RecursionError):
            return None  # not written yet (or a planted file that is not ours)

    def wait_adjusts(self, n: int, timeout_s: float = 20.0) -> dict:
        """Wait until the daemon's state file counts at least n adjusts; that state."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = self.read_state()
            if st and self.proc and (st.get("daemon") or {}).get("pid") == self.proc.pid and st["counts"]["adjusts"] >= n:
                return st
            if self.proc and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.stderr.read_text()}")
            time.sleep(0.01)
        raise AssertionError(f"no adjust {n} within {timeout_s}s: {self.stderr.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


@contextlib.contextmanager
def running(tmp: Path, config: str = "", **kw):
    d = Daemon(tmp, config, **kw)
    try:
        yield d.start()
    finally:
        d.stop()


# --- fake guests and a fake procfs --------------------------------------------------------

class FakeGuests(_guests.FakeGuests):
    """Real processes that look like QEMU guests (tests/fakes/guests.py), started by guest name."""

    def start(self, name: str, *qemu_args: str) -> int:  # type: ignore[override]
        return self.guest(name, *qemu_args)


cpuinfo = _proc.cpuinfo


def fake_procfs(root: Path, pids: list[int], total_gib: float, swap_gib: float = 0, cores: int = 2,
                threads_per_core: int = 1) -> Path:
    """A procfs that shows only ``pids`` (symlinks to the real /proc/PID) and a crafted host."""
    total = int(total_gib * 1024 * 1024)
    return _proc.view_of(root / "proc", pids,
                         meminfo=_proc.meminfo_text(total_kib=total, free_kib=total // 2,
                                                    swap_kib=int(swap_gib * 1024 * 1024), anon_huge_kib=0),
                         cpu=_proc.cpuinfo(cores, threads_per_core), links=("stat", "uptime", "locks"))


@contextlib.contextmanager
def ksm_read_lock():
    """Hold the machine-wide KSM lock (tests/ksmguard) while only reading: knobs stay put."""
    from tests import ksmguard

    with ksmguard.machine_lock(ksmguard.LOCK_PATH, timeout_s=900):
        yield
