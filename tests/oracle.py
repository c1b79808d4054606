"""Differential harness: the old bash ksmtuned and ours, run side by side on the same inputs.

One harness run (one scenario) looks like this::

    pytest process                                   (this module, test side: Harness)
      unshare --pid --fork --mount-proc --mount --kill-child
        python tests/oracle.py --supervise META      (PID 1 of a new pid namespace: Supervisor)
          /proc/meminfo  <- bind mount of ONE fake meminfo file, rewritten in place between ticks
          fake guests    qemu-system-x86_64 ... -enable-kvm  (tests/data/oracle/fakeguest.py)
          side "old"     own mount namespace: /sys/kernel/mm/ksm <- its fake KSM dir,
                         /etc/ksmtuned.conf <- its config; runs the Debian bash ksmtuned
          side "new"     same, runs ``python -m ksmtuned --foreground --config /etc/ksmtuned.conf``

Both daemons therefore see the same processes with the same RSS and the same meminfo, and
each writes its own KSM directory and its own LOGFILE (DEBUG=1).  The supervisor takes JSON
commands on stdin and answers on stdout, one line each.

Ticks are driven by SIGUSR1 with ``KSM_MONITOR_INTERVAL=3600``.  Our daemon adjusts once at
startup; the old one only after an interval, so the harness gives the old one a SIGUSR1 to
produce the equivalent of our startup adjust ("tick 0").  A tick is complete when its last
debug line (``KSMCTL start N S`` or ``... stop ksm``) is in the daemon's log; both daemons
write sysfs before that line.  The old daemon's loop loses a SIGUSR1 that arrives outside
its ``wait`` builtin (the trap runs, then ``wait`` blocks for the full interval), so the
supervisor signals it only once it is blocked in wait4 (``/proc/PID/wchan`` = do_wait).

Cleanup needs no bookkeeping: when the supervisor (PID 1 of the namespace) exits, the kernel
kills every process in the namespace (guests, daemons, the old daemon's ``sleep`` children),
and ``--kill-child`` makes the supervisor die with ``unshare``.

Only the standard library is imported at module level: the supervisor runs this file as a
script inside the namespace.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "oracle"
MEMINFO_TEMPLATE = DATA / "meminfo"
KSM_SYSFS_FIXTURE = DATA / "ksm_sysfs.json"
FAKE_GUEST = DATA / "fakeguest.py"

ORACLE_ENV = "KSMTUNED_ORACLE"
ORACLE_IN_REPO = REPO / ".oracle" / "usr" / "sbin" / "ksmtuned"

KSM_DIR = "/sys/kernel/mm/ksm"
CONF_PATH = "/etc/ksmtuned.conf"
# The knobs both daemons write; the rest of the fake directory must stay untouched.
KNOBS = ("run", "pages_to_scan", "sleep_millisecs")

# `date` in the C locale: "Sun Nov 29 05:09:43 UTC 2026" (day of month space-padded).
DATE_RE = r"[A-Z][a-z]{2} [A-Z][a-z]{2} [ 0-9][0-9] [0-9]{2}:[0-9]{2}:[0-9]{2} \S+ [0-9]{4}"
LINE_RE = re.compile(rf"^(?P<date>{DATE_RE}): (?P<text>.*)$")
# The last debug line of a tick: sysfs is written before it.
TICK_END_RE = re.compile(r"^KSMCTL start -?\d+ -?\d+$|, stop ksm$")

DAEMON_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
    "TZ": "UTC",
}

# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def find_oracle() -> Path | None:
    """The old daemon's script: $KSMTUNED_ORACLE, else $REPO/.oracle/usr/sbin/ksmtuned."""
    env = os.environ.get(ORACLE_ENV)
    for candidate in ([Path(env)] if env else []) + [ORACLE_IN_REPO]:
        if candidate.is_file():
            return candidate
    return None


def skip_reason(oracle_needed: bool = True) -> str | None:
    """Why the differential tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (pid and mount namespaces, bind mounts over /proc and /sys)"
    if shutil.which("unshare") is None:
        return "needs unshare(1) from util-linux"
    missing = [tool for tool in ("bash", "pgrep", "ps", "awk", "date") if shutil.which(tool) is None]
    if missing:
        return f"the old ksmtuned needs {', '.join(missing)} (bash, procps, awk, coreutils)"
    if not Path("/sys/kernel/mm").is_dir():
        return "needs /sys/kernel/mm to mount a fake KSM directory on"
    if oracle_needed and find_oracle() is None:
        return (
            f"old ksmtuned not found: set {ORACLE_ENV} or unpack Debian's ksmtuned package "
            f"into {REPO / '.oracle'} (apt-get download ksmtuned && dpkg -x ksmtuned_*.deb .oracle)"
        )
    return None


def split_line(raw: str) -> tuple[str | None, str]:
    """('<date>', '<text>') for a debug line; (None, raw) when it has no date prefix."""
    m = LINE_RE.match(raw)
    if m is None:
        return None, raw
    return m.group("date"), m.group("text")


def render_meminfo(template: str, values: dict[str, int]) -> str:
    """The template with the named fields replaced, formatted as the kernel does."""
    out, seen = [], set()
    for line in template.splitlines():
        key = line.split(":", 1)[0]
        if key in values:
            line = f"{key + ':':<16}{values[key]:>8} kB"
            seen.add(key)
        out.append(line)
    missing = set(values) - seen
    if missing:
        raise ValueError(f"meminfo template lacks {sorted(missing)}")
    return "\n".join(out) + "\n"


def rewrite_in_place(path: Path, text: str) -> None:
    """Replace a file's content keeping its inode (it is bind-mounted over /proc/meminfo)."""
    with open(path, "r+") as f:
        f.seek(0)
        f.truncate()
        f.write(text)


# ---------------------------------------------------------------------------------------------
# Test side
# ---------------------------------------------------------------------------------------------


class HarnessError(RuntimeError):
    """The harness could not do what was asked (not a difference between the daemons)."""


@dataclasses.dataclass(frozen=True)
class Meminfo:
    """The memory picture both daemons see. free = MemFree + Buffers + Cached."""

    total_kib: int
    free_kib: int
    buffers_kib: int = 0
    cached_kib: int = 0

    @classmethod
    def with_free(cls, total_kib: int, free_kib: int) -> Meminfo:
        """Split free_kib over the three fields the classic law sums (all non-zero if possible)."""
        buffers = min(1024, free_kib // 4)
        cached = min(8192, free_kib // 4)
        return cls(total_kib, free_kib - buffers - cached, buffers, cached)

    @property
    def classic_free_kib(self) -> int:
        return self.free_kib + self.buffers_kib + self.cached_kib

    def render(self) -> str:
        free = self.classic_free_kib
        return render_meminfo(
            MEMINFO_TEMPLATE.read_text(),
            {
                "MemTotal": self.total_kib,
                "MemFree": self.free_kib,
                # Deliberately unlike the classic free memory, so a daemon that reads
                # MemAvailable in classic mode shows up as a difference.
                "MemAvailable": max(0, free // 2),
                "Buffers": self.buffers_kib,
                "Cached": self.cached_kib,
            },
        )


@dataclasses.dataclass
class SideResult:
    """What one daemon did in one tick."""

    raw_lines: list[str]
    lines: list[str]  # date prefix stripped
    dates_ok: bool
    knobs: dict[str, str]  # run, pages_to_scan, sleep_millisecs
    sysfs: dict[str, str]  # every file in the fake KSM directory
    latency_s: float | None  # SIGUSR1 -> last line seen; None for our startup tick


@dataclasses.dataclass
class Tick:
    index: int
    meminfo: Meminfo
    committed_kib: int | None  # as last measured by the harness before the tick
    sides: dict[str, SideResult]


@dataclasses.dataclass
class Side:
    name: str
    kind: str  # "old" or "new"
    dir: Path
    log_to_stdout: bool = False  # no LOGFILE: the debug lines go to standard output

    @property
    def ksm_dir(self) -> Path:
        return self.dir / "ksm"

    @property
    def conf(self) -> Path:
        return self.dir / "ksmtuned.conf"

    @property
    def logfile(self) -> Path:
        return self.dir / "ksmtuned.log"

    @property
    def log(self) -> Path:
        """Where this side's debug lines land."""
        return self.stdout if self.log_to_stdout else self.logfile

    @property
    def pidfile(self) -> Path:
        return self.dir / "ksmtune.pid"

    @property
    def stdout(self) -> Path:
        return self.dir / "stdout"

    @property
    def stderr(self) -> Path:
        return self.dir / "stderr"


class Harness:
    """One namespace with fake guests and two daemons fed the same inputs.

    Use as a context manager: ``launch()`` happens on enter, everything dies on exit.
    """

    def __init__(
        self,
        workdir: Path,
        sides: dict[str, str],
        oracle: Path | None = None,
        timeout_s: float = 10.0,
    ):
        self.workdir = workdir
        self.oracle = oracle or find_oracle()
        self.timeout_s = timeout_s
        self.sides = {name: Side(name, kind, workdir / name) for name, kind in sides.items()}
        if "old" in sides.values() and self.oracle is None:
            raise HarnessError("no old ksmtuned to run (see skip_reason())")
        self.meminfo_path = workdir / "meminfo"
        self.meminfo: Meminfo | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._buf = b""
        self.ticks: list[Tick] = []
        self.guests: dict[str, dict[str, Any]] = {}
        self.last_committed_kib: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Harness:
        self.launch()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def launch(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.meminfo_path.write_text(MEMINFO_TEMPLATE.read_text())
        from tests.fakes.ksm import fake_ksm_dir  # here: the supervisor runs this file as a script

        fixture = json.loads(KSM_SYSFS_FIXTURE.read_text())["files"]
        for side in self.sides.values():
            fake_ksm_dir(side.ksm_dir, fixture)  # tests/fakes: the one fake KSM directory
            side.logfile.touch()
            side.stdout.touch()
        meta = {
            "meminfo": str(self.meminfo_path),
            "fake_guest": str(FAKE_GUEST),
            "guest_dir": str(self.workdir / "guestbin"),
            "python": os.path.realpath(sys.executable),
        }
        (self.workdir / "meta.json").write_text(json.dumps(meta))
        self._stderr = open(self.workdir / "supervisor.stderr", "wb")
        self.proc = subprocess.Popen(
            [
                "unshare", "--pid", "--fork", "--mount-proc", "--mount",
                "--propagation", "private", "--kill-child",
                sys.executable, "-I", str(Path(__file__).resolve()),
                "--supervise", str(self.workdir / "meta.json"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd="/",
        )
        self.request("hello")

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self._stderr.close()

    # -- protocol ----------------------------------------------------------------------------

    def request(self, op: str, timeout_s: float | None = None, **args: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"op": op, "args": args}).encode() + b"\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + (timeout_s or self.timeout_s) + 5
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f"supervisor did not answer {op!r}{self._diagnostics()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise HarnessError(f"supervisor died during {op!r}{self._diagnostics()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        answer = json.loads(line)
        if not answer.get("ok"):
            raise HarnessError(f"{op}: {answer.get('error')}{self._diagnostics()}")
        return answer

    def _diagnostics(self) -> str:
        parts = []
        err = self.workdir / "supervisor.stderr"
        if err.exists() and err.stat().st_size:
            parts.append(f"supervisor stderr:\n{err.read_text(errors='replace')[-3000:]}")
        for side in self.sides.values():
            for path in (side.stderr, side.stdout, side.logfile):
                if path.exists() and path.stat().st_size:
                    text = path.read_text(errors="replace")[-3000:]
                    parts.append(f"{side.name} ({side.kind}) {path.name}:\n{text}")
        return ("\n" + "\n".join(parts)) if parts else ""

    # -- inputs ------------------------------------------------------------------------------

    def add_guests(self, mib: list[int]) -> int:
        """Start fake guests of the given sizes; returns the committed memory (sum of RSS, kB)."""
        names = [f"g{len(self.guests) + i}" for i in range(len(mib))]
        answer = self.request("guests", mib=mib, names=names)
        for name, pid, rss in zip(names, answer["pids"], answer["rss_kib"]):
            self.guests[name] = {"pid": pid, "rss_kib": rss}
        return self.committed_kib()

    def kill_guest(self, name: str) -> int:
        self.request("kill_guest", name=name)
        del self.guests[name]
        return self.committed_kib()

    def committed_kib(self) -> int:
        """Sum of the guests' RSS as measured by the supervisor (checked stable)."""
        self.last_committed_kib = int(self.request("committed")["committed_kib"])
        return self.last_committed_kib

    def set_meminfo(self, meminfo: Meminfo) -> None:
        rewrite_in_place(self.meminfo_path, meminfo.render())
        self.meminfo = meminfo

    # -- daemons -----------------------------------------------------------------------------

    def start(
        self,
        config: str | dict[str, str],
        meminfo: Meminfo,
        env: dict[str, str] | None = None,
        log_to_stdout: bool = False,
    ) -> Tick:
        """Write each side's config, start the daemons and return tick 0.

        ``config`` is the config file body (or one per side).  Unless it contains the
        placeholder ``@LOGFILE@``, the lines ``DEBUG=1``, ``LOGFILE=<side's log>`` (left out
        with ``log_to_stdout``: the lines then go to the daemon's standard output, a file)
        and ``KSM_MONITOR_INTERVAL=3600`` are put in front of it (a later line may override).
        """
        self.set_meminfo(meminfo)
        for side in self.sides.values():
            side.log_to_stdout = log_to_stdout
            body = config[side.name] if isinstance(config, dict) else config
            logfile = "" if log_to_stdout else f"LOGFILE={side.logfile}\n"
            if "@LOGFILE@" in body:
                text = body.replace("@LOGFILE@", str(side.logfile))
            else:
                text = f"DEBUG=1\n{logfile}KSM_MONITOR_INTERVAL=3600\n{body}"
            side.conf.write_text(text)
            side.conf.chmod(0o644)
            if side.kind == "old":
                argv, cwd = ["/bin/bash", str(self.oracle)], "/"
            else:
                # --force: ours refuses to start beside another tuner, and the old daemon
                # runs in the same pid namespace on purpose.
                argv = [
                    sys.executable, "-m", "ksmtuned", "--foreground", "--force",
                    "--config", CONF_PATH,
                ]
                cwd = str(REPO)
            self.request(
                "spawn",
                timeout_s=self.timeout_s,
                name=side.name,
                kind=side.kind,
                argv=argv,
                cwd=cwd,
                env={**DAEMON_ENV, **(env or {}), "PIDFILE": str(side.pidfile)},
                ksm_dir=str(side.ksm_dir),
                conf=str(side.conf),
                log=str(side.log),
                pidfile=str(side.pidfile),
                stdout=str(side.stdout),
                stderr=str(side.stderr),
                timeout=self.timeout_s,
            )
        # Tick 0: ours adjusted by itself at startup; the old one needs a SIGUSR1.
        signal_names = [s.name for s in self.sides.values() if s.kind == "old"]
        answer = self.request(
            "tick",
            timeout_s=self.timeout_s,
            send=signal_names,
            collect=list(self.sides),
            timeout=self.timeout_s,
        )
        return self._record(answer, startup=True)

    def tick(self, meminfo: Meminfo | None = None, settle_s: float = 0.0) -> Tick:
        """Optionally change meminfo, wait settle_s, SIGUSR1 both daemons, return the tick."""
        if meminfo is not None:
            self.set_meminfo(meminfo)
        if settle_s:
            time.sleep(settle_s)
        names = list(self.sides)
        answer = self.request(
            "tick", timeout_s=self.timeout_s, send=names, collect=names, timeout=self.timeout_s
        )
        return self._record(answer, startup=False)

    def quiet(self, seconds: float = 0.2) -> dict[str, list[str]]:
        """Lines any daemon logged without being asked to, over the next ``seconds``."""
        return self.request("quiet", names=list(self.sides), seconds=seconds)["lines"]

    def _record(self, answer: dict[str, Any], startup: bool) -> Tick:
        assert self.meminfo is not None
        results = {}
        for name, side in self.sides.items():
            got = answer["sides"][name]
            parsed = [split_line(raw) for raw in got["lines"]]
            sysfs = {p.name: p.read_text().strip() for p in sorted(side.ksm_dir.iterdir())}
            results[name] = SideResult(
                raw_lines=got["lines"],
                lines=[text for _, text in parsed],
                dates_ok=all(date is not None for date, _ in parsed),
                knobs={k: sysfs.get(k, "<missing>") for k in KNOBS},
                sysfs=sysfs,
                latency_s=None if (startup and side.kind == "new") else got["latency_s"],
            )
        tick = Tick(len(self.ticks), self.meminfo, self.last_committed_kib, results)
        self.ticks.append(tick)
        return tick

    def describe(self) -> str:
        """Every tick so far, side by side, for assertion messages."""
        out = []
        for t in self.ticks:
            m = t.meminfo
            out.append(
                f"tick {t.index}: MemTotal={m.total_kib} free={m.classic_free_kib} "
                f"committed={t.committed_kib} (measured before the tick)"
            )
            for name, r in t.sides.items():
                out.append(f"  {name:>4} knobs={r.knobs} latency={r.latency_s}")
                out.extend(f"       | {line}" for line in r.raw_lines)
        return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Supervisor side (PID 1 inside the namespace)
# ---------------------------------------------------------------------------------------------

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
# Syscall numbers on the architectures CI may use; used only when /proc/PID/wchan is hidden.
WAIT4_NR = {"x86_64": 61, "aarch64": 260}
RT_SIGTIMEDWAIT_NR = {"x86_64": 128, "aarch64": 137}

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    rc = _libc.mount(
        source.encode() if source else None,
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target} ({fstype}): {os.strerror(err)}")


def _unshare_mount_ns() -> None:
    if _libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNS): {os.strerror(err)}")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)


def _sig_bit(signum: int) -> int:
    return 1 << (signum - 1)


def _proc_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def _alive(pid: int) -> bool:
    try:
        return _proc_status(pid)["State"][0] not in "ZX"
    except (FileNotFoundError, ProcessLookupError, KeyError):
        return False


def _blocked_in(pid: int, wchan_prefix: str, numbers: dict[str, int]) -> bool:
    """Whether pid sleeps in the kernel function (wchan) or, where wchan is hidden, the syscall."""
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
    except OSError:
        wchan = ""
    if wchan and wchan != "0":
        return wchan.startswith(wchan_prefix)
    nr = numbers.get(platform.machine())
    try:
        return nr is not None and Path(f"/proc/{pid}/syscall").read_text().split()[0] == str(nr)
    except OSError:
        return False


def _rss_kib(pid: int) -> int:
    """VmRSS in kB (what ps shows as rsz)."""
    return int(_proc_status(pid)["VmRSS"].split()[0])


class Supervisor:
    def __init__(self, meta: dict[str, Any]):
        self.meta = meta
        self.guests: dict[str, subprocess.Popen[bytes]] = {}
        self.daemons: dict[str, dict[str, Any]] = {}
        self.children: list[subprocess.Popen[bytes]] = []

    # The namespace's /proc exists now (unshare --mount-proc): put the fake meminfo over it.
    def setup(self) -> None:
        if os.getpid() != 1:
            raise RuntimeError(f"supervisor must be PID 1 of its namespace, is {os.getpid()}")
        _mount(self.meta["meminfo"], "/proc/meminfo", None, MS_BIND)
        guest_dir = Path(self.meta["guest_dir"])
        guest_dir.mkdir(parents=True, exist_ok=True)
        link = guest_dir / "qemu-system-x86_64"
        if not link.exists():
            link.symlink_to(self.meta["python"])

    def reap(self) -> None:
        """PID 1 duty: collect exited orphans (the old daemon's front process, guests)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for popen in self.children:
                if popen.pid == pid and popen.returncode is None:
                    # Reaped here: tell Popen, which must not wait for it again.
                    popen.returncode = os.waitstatus_to_exitcode(status)

    # -- ops ---------------------------------------------------------------------------------

    def op_hello(self) -> dict[str, Any]:
        return {"pid": os.getpid()}

    def op_guests(self, mib: list[int], names: list[str]) -> dict[str, Any]:
        guest_dir = self.meta["guest_dir"]
        started = []
        for size, name in zip(mib, names):
            popen = subprocess.Popen(
                ["qemu-system-x86_64", "-I", "-S", self.meta["fake_guest"],
                 "-enable-kvm", "-name", f"guest={name}", "-m", str(size)],
                executable=f"{guest_dir}/qemu-system-x86_64",
                env={"PATH": f"{guest_dir}:/usr/bin:/bin"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                cwd="/",
            )
            self.guests[name] = popen
            self.children.append(popen)
            started.append(popen)
        for popen in started:
            assert popen.stdout is not None
            if popen.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"fake guest {popen.args} did not start")
        pids = [p.pid for p in started]
        for pid in pids:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if comm != "qemu-system-x86" or not re.match(r"^qemu-system.*-enable-kvm", cmdline):
                raise RuntimeError(f"fake guest {pid} looks wrong: comm={comm!r} cmdline={cmdline!r}")
        return {"pids": pids, "rss_kib": [_rss_kib(pid) for pid in pids]}

    def op_kill_guest(self, name: str) -> dict[str, Any]:
        popen = self.guests.pop(name)
        popen.kill()
        popen.wait()
        return {}

    def op_committed(self) -> dict[str, Any]:
        """Sum of guest RSS as the old daemon reads it (ps -o rsz=), stable over 20 ms.

        ps reads VmRSS from /proc/PID/status; /proc/PID/stat's rss field can differ from it
        by per-CPU counter batches on recent kernels, so do not substitute another source."""
        last = None
        for _ in range(100):
            now = self._ps_rsz_sum()
            if now == last:
                return {"committed_kib": now}
            last = now
            time.sleep(0.02)
        raise RuntimeError("guest RSS does not settle")

    def _ps_rsz_sum(self) -> int:
        pids = [str(p.pid) for p in self.guests.values()]
        if not pids:
            return 0
        out = subprocess.run(
            ["ps", "-p", ",".join(pids), "-o", "rsz="], capture_output=True, text=True, check=True
        ).stdout.split()
        if len(out) != len(pids):
            raise RuntimeError(f"ps saw {len(out)} of the guests {pids}")
        return sum(int(v) for v in out)

    def op_spawn(
        self, name: str, kind: str, argv: list[str], cwd: str, env: dict[str, str],
        ksm_dir: str, conf: str, log: str, pidfile: str, stdout: str, stderr: str,
        timeout: float,
    ) -> dict[str, Any]:
        workdir = Path(pidfile).parent

        def enter_own_mount_namespace() -> None:
            # Runs in the child between fork and exec: everything mounted here is private
            # to this daemon and disappears with it.
            _unshare_mount_ns()
            if not os.path.isdir(KSM_DIR):  # kernel without KSM: make a place to mount on
                _mount("tmpfs", "/sys/kernel/mm", "tmpfs", 0, "mode=755")
                os.mkdir(KSM_DIR)
            _mount(ksm_dir, KSM_DIR, None, MS_BIND)
            if not os.path.isfile(CONF_PATH):
                # Nothing to bind over: an overlay on /etc (upper layer on a private tmpfs,
                # so the host's /etc never changes) provides an empty file to bind onto.
                scratch = workdir / "etc-overlay"
                scratch.mkdir(exist_ok=True)
                _mount("tmpfs", str(scratch), "tmpfs", 0, "mode=755")
                (scratch / "upper").mkdir()
                (scratch / "work").mkdir()
                (scratch / "upper" / "ksmtuned.conf").touch()
                _mount(
                    "overlay", "/etc", "overlay", 0,
                    f"lowerdir=/etc,upperdir={scratch}/upper,workdir={scratch}/work",
                )
            _mount(conf, CONF_PATH, None, MS_BIND)

        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            popen = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                preexec_fn=enter_own_mount_namespace,
            )
        self.children.append(popen)
        deadline = time.monotonic() + timeout
        pid = None
        while time.monotonic() < deadline:
            self.reap()
            try:
                text = Path(pidfile).read_text().strip()
            except FileNotFoundError:
                text = ""
            if text.isdigit() and _alive(int(text)):
                pid = int(text)
                break
            if kind == "new" and popen.poll() is not None:
                raise RuntimeError(f"{name}: daemon exited with {popen.returncode} before writing {pidfile}")
            time.sleep(0.002)
        if pid is None:
            raise RuntimeError(f"{name}: no live pid in {pidfile} after {timeout}s (exit={popen.poll()})")
        if kind == "new" and pid != popen.pid:
            raise RuntimeError(f"{name}: pid file says {pid}, the --foreground daemon is {popen.pid}")
        self.daemons[name] = {"pid": pid, "kind": kind, "log": log, "offset": 0, "popen": popen}
        return {"pid": pid}

    def _signal_ready(self, name: str) -> bool:
        d = self.daemons[name]
        try:
            status = _proc_status(d["pid"])
        except FileNotFoundError:
            raise RuntimeError(f"{name}: daemon {d['pid']} is gone") from None
        caught = int(status["SigCgt"], 16) & _sig_bit(signal.SIGUSR1)
        blocked = int(status["SigBlk"], 16) & _sig_bit(signal.SIGUSR1)
        if d["kind"] == "old":
            # bash only notices the trapped signal promptly inside the `wait` builtin.
            return bool(caught) and _blocked_in(d["pid"], "do_wait", WAIT4_NR)
        # Ours: a handler or a blocked signal is never lost.  Inside sigtimedwait() the
        # kernel unblocks the awaited signals for the wait, so SigBlk no longer shows it.
        return bool(caught or blocked) or _blocked_in(
            d["pid"], "do_sigtimedwait", RT_SIGTIMEDWAIT_NR
        )

    def _new_lines(self, name: str) -> list[str]:
        d = self.daemons[name]
        with open(d["log"], "rb") as f:
            f.seek(d["offset"])
            data = f.read()
        end = data.rfind(b"\n") + 1  # only complete lines
        d["offset"] += end
        return data[:end].decode(errors="replace").splitlines()

    def op_tick(self, send: list[str], collect: list[str], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        sent: dict[str, float] = {}
        for name in send:
            while not self._signal_ready(name):
                self.reap()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: never ready for SIGUSR1 (not waiting)")
                time.sleep(0.001)
        for name in send:
            os.kill(self.daemons[name]["pid"], signal.SIGUSR1)
            sent[name] = time.monotonic()
        result: dict[str, dict[str, Any]] = {name: {"lines": [], "latency_s": None} for name in collect}
        pending = set(collect)
        while pending:
            for name in sorted(pending):
                lines = self._new_lines(name)
                result[name]["lines"].extend(lines)
                if lines and TICK_END_RE.search(split_line(lines[-1])[1]):
                    if name in sent:
                        result[name]["latency_s"] = time.monotonic() - sent[name]
                    pending.discard(name)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"tick incomplete for {sorted(pending)} after {timeout}s: {result}")
            for name in pending:
                if not _alive(self.daemons[name]["pid"]):
                    raise RuntimeError(f"{name}: daemon died; lines so far {result[name]['lines']}")
            self.reap()
            time.sleep(0.001)
        return {"sides": result}

    def op_quiet(self, names: list[str], seconds: float) -> dict[str, Any]:
        time.sleep(seconds)
        return {"lines": {name: self._new_lines(name) for name in names}}

    def op_ps(self) -> dict[str, Any]:
        out = subprocess.run(["ps", "-eo", "pid,ppid,stat,rsz,args"], capture_output=True, text=True)
        return {"ps": out.stdout}


def _supervise(meta_path: str) -> int:
    meta = json.loads(Path(meta_path).read_text())
    sup = Supervisor(meta)
    out = sys.stdout
    try:
        sup.setup()
    except Exception:
        traceback.print_exc()
        return 1
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = getattr(sup, "op_" + request["op"])(**request.get("args", {}))
            answer["ok"] = True
        except Exception:
            answer = {"ok": False, "error": traceback.format_exc()}
        out.write(json.dumps(answer) + "\n")
        out.flush()
        sup.reap()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--supervise":
        sys.exit(_supervise(sys.argv[2]))
    print(f"usage: {sys.argv[0]} --supervise META.json (run by tests/oracle.py's Harness)", file=sys.stderr)
    sys.exit(2)
