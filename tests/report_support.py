"""Helpers for the status/check/metrics/state tests (issue 4): a real daemon on a fake KSM
directory, fake QEMU guests (real processes), and a fake procfs that shows only them."""

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

#: A fake KSM directory: distinct values, so a mix-up between counters shows.
FAKE_KSM = {
    "run": "0", "pages_to_scan": "100", "sleep_millisecs": "20", "full_scans": "17", "pages_shared": "1234",
    "pages_sharing": "56789", "pages_unshared": "4321", "pages_volatile": "55", "pages_scanned": "987654",
    "pages_skipped": "321", "general_profit": "210987654", "ksm_zero_pages": "12", "stable_node_chains": "3",
    "stable_node_dups": "9", "max_page_sharing": "256", "merge_across_nodes": "1", "use_zero_pages": "0",
    "smart_scan": "1", "advisor_mode": "[none] scan-time", "advisor_max_cpu": "70",
    "advisor_target_scan_time": "200", "advisor_min_pages_to_scan": "500", "advisor_max_pages_to_scan": "30000",
}


def fake_ksm_dir(root: Path, values: dict[str, str] | None = None) -> Path:
    d = root / "mm" / "ksm"
    d.mkdir(parents=True)
    for name, value in (values or FAKE_KSM).items():
        (d / name).write_text(value + "\n")
    return d


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

#: The fake guest: optionally puts -thp-mib MiB on transparent huge pages, says ready, sleeps.
GUEST_CODE = """
import mmap, signal, sys
a = sys.argv
thp = int(a[a.index('-thp-mib') + 1]) if '-thp-mib' in a else 0
if thp:
    m = mmap.mmap(-1, thp << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    for i in range(0, len(m), 4096):
        m[i] = 1
sys.stdout.write('ready\\n')
sys.stdout.flush()
signal.pause()
"""


class FakeGuests:
    """Real processes that look like QEMU guests: comm qemu-system-x86, argv -enable-kvm -m ... -smp ..."""

    def __init__(self, tmp: Path):
        self.bin = tmp / "bin"
        self.bin.mkdir(exist_ok=True)
        self.exe = self.bin / "qemu-system-x86_64"
        if not self.exe.exists():
            self.exe.symlink_to(os.path.realpath(sys.executable))
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, *qemu_args: str) -> int:
        argv = ["qemu-system-x86_64", "-S", "-c", GUEST_CODE, "-enable-kvm", "-name", f"guest={name}", *qemu_args]
        p = subprocess.Popen(argv, executable=str(self.exe), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.procs.append(p)
        assert p.stdout is not None
        if p.stdout.readline().strip() != b"ready":
            raise AssertionError(f"fake guest {name} did not start")
        return p.pid

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
            if p.stdout:
                p.stdout.close()
        self.procs.clear()


MEMINFO = """MemTotal:       {total} kB
MemFree:        {free} kB
MemAvailable:   {free} kB
Buffers:               0 kB
Cached:                0 kB
SwapTotal:      {swap} kB
SwapFree:       {swap} kB
AnonHugePages:         0 kB
"""


def cpuinfo(cores: int, threads_per_core: int = 1) -> str:
    blocks = []
    n = 0
    for core in range(cores):
        for _ in range(threads_per_core):
            blocks.append(f"processor\t: {n}\nphysical id\t: 0\nsiblings\t: {cores * threads_per_core}\n"
                          f"core id\t\t: {core}\ncpu cores\t: {cores}\n")
            n += 1
    return "\n".join(blocks) + "\n"


def fake_procfs(root: Path, pids: list[int], total_gib: float, swap_gib: float = 0, cores: int = 2,
                threads_per_core: int = 1) -> Path:
    """A procfs that shows only ``pids`` (symlinks to the real /proc/PID) and a crafted host."""
    d = root / "proc"
    d.mkdir()
    total = int(total_gib * 1024 * 1024)
    (d / "meminfo").write_text(MEMINFO.format(total=total, free=total // 2, swap=int(swap_gib * 1024 * 1024)))
    (d / "cpuinfo").write_text(cpuinfo(cores, threads_per_core))
    for name in ("stat", "uptime", "locks"):
        (d / name).symlink_to(f"/proc/{name}")
    for pid in pids:
        (d / str(pid)).symlink_to(f"/proc/{pid}")
    return d


@contextlib.contextmanager
def ksm_read_lock():
    """Hold the machine-wide KSM lock (tests/ksmguard) while only reading: knobs stay put."""
    from tests import ksmguard

    with ksmguard.machine_lock(ksmguard.LOCK_PATH, timeout_s=900):
        yield
