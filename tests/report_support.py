"""Helpers for the status/check/metrics/state tests (issue 4): a real daemon on a fake KSM
directory, fake QEMU guests (real processes), and a fake procfs that shows only them (the
fakes themselves are tests/fakes)."""

from __future__ import annotations

import contextlib
import signal
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from tests.fakes import ksm as _ksm
from tests.fakes import guests as _guests
from tests.fakes import proc as _proc
from tests.fakes.daemon import DaemonProc

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


class Daemon(DaemonProc):
    """The daemon (tests/fakes/daemon.py) on a full fake KSM dir, with its own pid and state
    files and no debug log: the tests read its state file."""

    def __init__(self, tmp: Path, config: str = "", sysfs: Path | None = None, state: Path | None = None):
        super().__init__(tmp, config, sysfs=sysfs or fake_ksm_dir(tmp), debug_log=False,
                         state=state or tmp / "run" / "state.json", stderr_name="daemon.stderr")

    def start(self, wait_state: bool = True) -> "Daemon":  # type: ignore[override]
        super().start(wait_ticks=0)
        if wait_state:
            self.wait_adjusts(1)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:  # type: ignore[override]
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        return super().stop(sig=sig)


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
