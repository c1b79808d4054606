"""Helpers shared by the benchmarks: paths, cgroups, /proc readers, idle processes, inotify.

Only the standard library here: the benchmarks must run where matplotlib is missing (the plots
are then skipped, the numbers are not).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ORACLE_ENV = "KSMTUNED_ORACLE"
ORACLE_CANDIDATES = (REPO / ".oracle" / "usr" / "sbin" / "ksmtuned", Path("/tmp/oldksm/root/usr/sbin/ksmtuned"))
KSM_DIR = Path("/sys/kernel/mm/ksm")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# What both daemons run with: the C locale so `date` prints as the old daemon's log expects.
DAEMON_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
    "TZ": "UTC",
}


class Skip(Exception):
    """A precondition is missing (not root, no KSM, no QEMU...): the measurement is skipped, not failed."""


def python() -> str:
    """The interpreter that runs our daemon: the one running the benchmark (the project's venv)."""
    return sys.executable


def ours_argv(*args: str) -> list[str]:
    return [python(), "-m", "ksmtuned", *args]


def find_oracle() -> Path | None:
    """The old bash daemon: $KSMTUNED_ORACLE, else $REPO/.oracle/..., else /tmp/oldksm/root/..."""
    env = os.environ.get(ORACLE_ENV)
    for candidate in ([Path(env)] if env else []) + list(ORACLE_CANDIDATES):
        if candidate.is_file():
            return candidate
    return None


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise Skip(f"{what} needs root")


# --- statistics ------------------------------------------------------------------------------


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def percentile(xs, p: float):
    """Nearest-rank percentile (p in 0..100); None for no data."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = max(0, min(len(xs) - 1, int(round(p / 100 * len(xs) + 0.5)) - 1))
    return xs[k]


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


# --- /proc readers ---------------------------------------------------------------------------


def read_text(path, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return default
    except OSError as e:
        if e.errno in (errno.ESRCH, errno.ENOENT):
            return default
        raise


def status_fields(pid: int) -> dict[str, str]:
    out = {}
    for line in read_text(f"/proc/{pid}/status").splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def rss_kib(pid: int) -> int | None:
    v = status_fields(pid).get("VmRSS")
    return int(v.split()[0]) if v else None


def voluntary_switches(pid: int) -> int | None:
    v = status_fields(pid).get("voluntary_ctxt_switches")
    return int(v) if v else None


def wchan(pid: int) -> str:
    return read_text(f"/proc/{pid}/wchan").strip()


def comm(pid: int) -> str:
    return read_text(f"/proc/{pid}/comm").strip()


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the comm, numbered so that [0] is field 3 (state)."""
    text = read_text(f"/proc/{pid}/stat")
    if not text:
        return None
    return text[text.rindex(")") + 2 :].split()


def ppid(pid: int) -> int | None:
    f = stat_fields(pid)
    return int(f[1]) if f else None


def proc_cpu_s(pid: int, children: bool = True) -> float | None:
    """utime+stime (+ cutime+cstime of reaped children) of a process, seconds (CLK_TCK resolution)."""
    f = stat_fields(pid)
    if not f:
        return None
    ticks = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if children else 0)
    return ticks / CLK_TCK


def runtime_ns(pid: int) -> int | None:
    """Time on CPU in ns from /proc/PID/schedstat (finer than stat's CLK_TCK); stat as the fallback."""
    text = read_text(f"/proc/{pid}/schedstat")
    if text:
        return int(text.split()[0])
    s = proc_cpu_s(pid, children=False)
    return None if s is None else int(s * 1e9)


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def count_processes() -> int:
    return sum(1 for name in os.listdir("/proc") if name.isdigit())


def find_kthread(name: str) -> int | None:
    """The pid of a kernel thread by comm (ksmd), children of kthreadd (pid 2)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and comm(int(entry)) == name and ppid(int(entry)) == 2:
            return int(entry)
    return None


# --- cgroup v2: CPU of a process and everything it forks --------------------------------------


def cgroup2_root() -> Path | None:
    """A writable cgroup2 mount (pure v2 at /sys/fs/cgroup, or the hybrid /sys/fs/cgroup/unified)."""
    for line in read_text("/proc/self/mounts").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            path = Path(parts[1])
            if os.access(path, os.W_OK):
                return path
    return None


class Cgroup:
    """A cgroup v2 directory for one measured process tree; CPU from cpu.stat usage_usec.

    Every process the daemon forks stays in it (the old daemon's pgrep/ps/awk/date, and the
    `sleep` it leaves behind on each SIGUSR1), so the CPU sum is the whole tree's and the
    cleanup is exact: kill every pid listed in cgroup.procs.
    """

    _serial = 0

    def __init__(self, name: str):
        root = cgroup2_root()
        if root is None:
            raise Skip("no writable cgroup2 mount to account a daemon's CPU with its children")
        Cgroup._serial += 1
        self.path = root / f"ksmtuned-bench.{os.getpid()}.{Cgroup._serial}.{name}"
        self.path.mkdir()

    def preexec(self) -> None:
        """For subprocess's preexec_fn: move the child (before exec) into this cgroup."""
        with open(self.path / "cgroup.procs", "w") as f:
            f.write("0")

    def usage_usec(self) -> int:
        for line in read_text(self.path / "cpu.stat").splitlines():
            k, _, v = line.partition(" ")
            if k == "usage_usec":
                return int(v)
        raise RuntimeError(f"{self.path}/cpu.stat has no usage_usec")

    def pids(self) -> list[int]:
        return [int(x) for x in read_text(self.path / "cgroup.procs").split()]

    def kill_all(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)

    def remove(self) -> None:
        self.kill_all()
        for _ in range(200):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                time.sleep(0.01)


# --- idle processes --------------------------------------------------------------------------


class IdleProcesses:
    """Idle `sleep` processes that bring the host's process count to a target; killed by pid."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self.sleep = shutil.which("sleep") or "/bin/sleep"

    def top_up(self, target_total: int) -> int:
        """Spawn until /proc lists at least target_total processes; the number spawned."""
        need = target_total - count_processes()
        for _ in range(max(0, need)):
            self.procs.append(subprocess.Popen([self.sleep, "infinity"], stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return max(0, need)

    def stop(self) -> None:
        for p in self.procs:
            try:
                p.kill()
            except ProcessLookupError:
                pass
        for p in self.procs:
            p.wait()
        self.procs.clear()


class FakeGuests:
    """Processes that both guest patterns count (tests/fakes/guests.py: comm qemu-system-x86,
    cmdline ^qemu-system...-enable-kvm), each holding MIB MiB of private memory."""

    def __init__(self, workdir: Path, count: int, mib: int = 8):
        from tests.fakes.guests import FakeGuests as Shared

        self._shared = Shared(workdir)
        for i in range(count):
            self._shared.start("qemu-system-x86_64", "qemu-system-x86_64", ["-enable-kvm", "-name", f"guest=bench{i}"],
                               mib=mib)
        self.procs = self._shared.procs

    def stop(self) -> None:
        self._shared.stop()


class _suppress_lookup:
    def __enter__(self):
        return self

    def __exit__(self, et, e, tb):
        return et is ProcessLookupError


# --- inotify (ctypes): when a daemon writes a KSM file -----------------------------------------

IN_CLOSE_WRITE = 0x00000008
_libc = ctypes.CDLL(None, use_errno=True)


class FileWatch:
    """IN_CLOSE_WRITE on one file; wait() returns perf_counter() taken right after the wake-up."""

    def __init__(self, path: Path):
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if _libc.inotify_add_watch(self.fd, str(path).encode(), IN_CLOSE_WRITE) < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"inotify_add_watch {path}")

    def drain(self) -> None:
        while True:
            try:
                if not os.read(self.fd, 65536):
                    return
            except BlockingIOError:
                return

    def wait(self, timeout_s: float) -> float | None:
        r, _, _ = select.select([self.fd], [], [], timeout_s)
        if not r:
            return None
        t = time.perf_counter()
        self.drain()
        return t

    def close(self) -> None:
        os.close(self.fd)


# --- fake KSM directory, configs -------------------------------------------------------------

KSM_DEFAULTS = {
    "run": "0", "pages_to_scan": "100", "sleep_millisecs": "20", "pages_shared": "0", "pages_sharing": "0",
    "pages_unshared": "0", "pages_volatile": "0", "full_scans": "0", "max_page_sharing": "256",
    "merge_across_nodes": "1", "use_zero_pages": "0", "advisor_mode": "[none] scan-time",
}


def fake_ksm_dir(path: Path) -> Path:
    from tests.fakes.ksm import fake_ksm_dir as shared

    return shared(path, KSM_DEFAULTS)


def write_config(path: Path, values: dict[str, object]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    os.chmod(path, 0o644)
    return path


def old_daemon_cmd(oracle: Path, workdir: Path, conf: Path, ksm_dir: Path | None) -> list[str]:
    """unshare(1) into a private mount namespace that shows `conf` as /etc/ksmtuned.conf and,
    when ksm_dir is given, `ksm_dir` as /sys/kernel/mm/ksm; then exec the old daemon.

    The real /etc is never written: where /etc/ksmtuned.conf does not exist, a private overlay
    (upper layer on a private tmpfs) makes a place to bind the config on.
    """
    scratch = workdir / "etc-overlay"
    scratch.mkdir(exist_ok=True)
    steps = []
    if ksm_dir is not None:
        steps.append(f"mount --bind {ksm_dir} {KSM_DIR}")
    if not Path("/etc/ksmtuned.conf").exists():
        steps += [
            f"mount -t tmpfs tmpfs {scratch}",
            f"mkdir {scratch}/upper {scratch}/work",
            f": > {scratch}/upper/ksmtuned.conf",
            f"mount -t overlay overlay -o lowerdir=/etc,upperdir={scratch}/upper,workdir={scratch}/work /etc",
        ]
    steps.append(f"mount --bind {conf} /etc/ksmtuned.conf")
    steps.append(f"exec /bin/bash {oracle}")
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-ec", " && ".join(steps)]


def wait_for(pred, timeout_s: float, interval_s: float = 0.002):
    """Poll pred() until it returns a true value (returned) or the timeout (None)."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            return None
        time.sleep(interval_s)


def read_pidfile(path: Path, timeout_s: float = 10.0) -> int:
    def get():
        text = read_text(path).strip()
        return int(text) if text.isdigit() else None

    pid = wait_for(get, timeout_s, 0.01)
    if pid is None:
        raise RuntimeError(f"no pid in {path} after {timeout_s} s")
    return pid


def tempdir(prefix: str) -> Path:
    """A temp dir on tmpfs where there is one (/dev/shm): the fake KSM files, the state file and
    the logs then cost what they cost on sysfs and /run, not a disk journal's truncate and fsync."""
    base = None
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and any(
            line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in read_text("/proc/self/mounts").splitlines()):
        base = str(shm)
    return Path(tempfile.mkdtemp(prefix=f"ksmtuned-bench-{prefix}-", dir=base))


def count_guest_like() -> int:
    """Live processes that Red Hat's (comm) or Debian's (cmdline) guest pattern counts."""
    import re

    redhat = re.compile(r"^qemu(-(kvm|system-.+)|:.{1,11})$")
    debian = re.compile(rb"^qemu-system.*-enable-kvm")
    n = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        cmdline = read_text(f"/proc/{name}/cmdline").encode().replace(b"\0", b" ")
        if not cmdline:
            continue  # kernel thread or zombie
        if redhat.match(comm(int(name))) or debian.match(cmdline):
            n += 1
    return n


def cleanup(path: Path) -> None:
    """Remove a benchmark's temp dir, unless KSMTUNED_BENCH_KEEP is set (to read the daemons' logs)."""
    if not os.environ.get("KSMTUNED_BENCH_KEEP"):
        shutil.rmtree(path, ignore_errors=True)
