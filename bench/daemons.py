"""The two daemons under test, each in its own cgroup, driven one tick at a time by SIGUSR1.

Both run against a fake KSM directory (a temp dir; the old daemon sees it bind-mounted over
/sys/kernel/mm/ksm in a private mount namespace, ours gets --sysfs) and a config file (the old
daemon sees it as /etc/ksmtuned.conf, ours gets --config).  They read the real /proc: the
process table is what is being measured.

One tick:
  1. write "0" to the fake `run` (so that both daemons write `run` on this tick: ours writes a
     knob only when it differs), drain the inotify queue, read the cgroup's CPU counter;
  2. SIGUSR1, and the time until `run` is closed after writing (inotify IN_CLOSE_WRITE):
     the retune latency;
  3. wait until the daemon is back in its wait (old: bash blocked in wait4 with a new `sleep`
     child asleep; ours: blocked in sigtimedwait again, after at least one voluntary context
     switch), read the CPU counter again: the tick's CPU, children included.
The old daemon is only signalled while blocked in wait4: a SIGUSR1 that arrives while its loop
runs is lost (the trap runs, then `wait` sleeps the whole interval).  Each SIGUSR1 leaves the
old daemon's previous `sleep 3600` behind (its loop never kills it); we kill it by pid after
the tick, outside the measured window.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from . import common
from .common import Cgroup, FileWatch

TICK_TIMEOUT_S = 30.0


class BrokenBenchmark(RuntimeError):
    """The benchmark itself misbehaved (a daemon died, a tick never completed)."""


def metrics_support() -> str | None:
    """None when prometheus_client (the metrics extra) can be imported, else why not."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError as e:
        return f"prometheus_client is not installed (pip install 'ksmtuned[metrics]'): {e}"
    return None


def blocked_in(pid: int, what: str) -> bool:
    """The process sleeps in a kernel function whose name contains `what` (wchan), or, where
    wchan is hidden, just sleeps."""
    w = common.wchan(pid)
    if w and w != "0":
        return what in w
    f = common.stat_fields(pid)
    return bool(f) and f[0] == "S"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    kind = "?"

    def __init__(self, name: str, workdir: Path, debug: bool, extra_config: dict | None = None,
                 interval_s: float = 3600, ksm_dir: Path | None = None, pressure: bool = True):
        self.name = name
        self.debug = debug
        self.dir = workdir / name
        self.dir.mkdir(parents=True)
        self.ksm_dir = ksm_dir if ksm_dir is not None else common.fake_ksm_dir(self.dir / "ksm")
        self.fake_ksm = ksm_dir is None
        self.logfile = self.dir / "debug.log"
        self.pidfile = self.dir / "pid"
        self.state_file = self.dir / "state.json"
        values: dict[str, object] = {"KSM_MONITOR_INTERVAL": interval_s}
        if pressure:
            # free < threshold: the start-and-boost branch (the most work) on every tick
            values["KSM_THRES_COEF"] = 99
        if debug:
            values.update(DEBUG=1, LOGFILE=self.logfile)
        values.update(extra_config or {})
        self.conf = common.write_config(self.dir / "ksmtuned.conf", values)
        self.cgroup = Cgroup(name)
        self.pid: int | None = None
        self.watch: FileWatch | None = None
        self.ticks = 0
        self.output = open(self.dir / "output", "wb")

    # --- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.watch:
            self.watch.close()
            self.watch = None
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            common.wait_for(lambda: not Path(f"/proc/{self.pid}").exists() or common.stat_fields(self.pid) is None
                            or common.stat_fields(self.pid)[0] == "Z", 5.0, 0.01)
        self.cgroup.remove()
        self.output.close()

    def alive(self) -> bool:
        f = common.stat_fields(self.pid) if self.pid else None
        return bool(f) and f[0] != "Z"

    def tail(self) -> str:
        self.output.flush()
        text = common.read_text(self.dir / "output")
        return text[-2000:]

    # --- one tick -----------------------------------------------------------------------------
    def tick(self) -> tuple[float, float]:
        """(CPU ms of the whole process tree, SIGUSR1 -> run written in ms) for one adjust."""
        assert self.pid and self.watch
        if self.fake_ksm:
            (self.ksm_dir / "run").write_text("0\n")
        self.watch.drain()
        self.before_signal()
        cpu0 = self.cgroup.usage_usec()
        t0 = time.perf_counter()
        os.kill(self.pid, signal.SIGUSR1)
        t_run = self.watch.wait(TICK_TIMEOUT_S)
        if t_run is None:
            raise BrokenBenchmark(f"{self.name}: SIGUSR1 but no write to {self.ksm_dir}/run within "
                                  f"{TICK_TIMEOUT_S} s (alive={self.alive()}); output:\n{self.tail()}")
        if not common.wait_for(self.tick_done, TICK_TIMEOUT_S, 0.001):
            raise BrokenBenchmark(f"{self.name}: tick did not finish within {TICK_TIMEOUT_S} s "
                                  f"(alive={self.alive()}, wchan={common.wchan(self.pid)!r}); output:\n{self.tail()}")
        cpu1 = self.cgroup.usage_usec()
        self.after_tick()
        self.ticks += 1
        return (cpu1 - cpu0) / 1000.0, (t_run - t0) * 1000.0

    def before_signal(self) -> None:
        pass

    def tick_done(self) -> bool:
        raise NotImplementedError

    def after_tick(self) -> None:
        pass

    def rss_kib(self) -> int | None:
        return common.rss_kib(self.pid) if self.pid else None


class Ours(Daemon):
    kind = "ours"

    def start(self) -> None:
        # the one daemon wrapper (tests/fakes/daemon.py), in this daemon's cgroup, its output ours
        from tests.fakes.daemon import DaemonProc

        self.daemon = DaemonProc(self.dir, common.read_text(self.conf), debug_log=False,
                                 sysfs=self.ksm_dir, log=self.logfile,
                                 pidfile=self.pidfile, state=self.state_file,
                                 popen_kw={"env": dict(common.DAEMON_ENV), "stdout": self.output,
                                           "stderr": subprocess.STDOUT, "preexec_fn": self.cgroup.preexec})
        self.proc = self.daemon.start(wait_ticks=0).proc
        self.pid = self.proc.pid
        # ready: the startup adjust has been made and the loop waits for signals
        common.wait_for(lambda: self.proc.poll() is not None or self._waiting(), 30, 0.01)
        if self.proc.poll() is not None or not self._waiting():
            raise BrokenBenchmark(f"{self.name}: our daemon did not start; output:\n{self.tail()}")
        if self.fake_ksm:
            self.watch = FileWatch(self.ksm_dir / "run")

    def _waiting(self) -> bool:
        return blocked_in(self.pid, "sigtimedwait")

    def before_signal(self) -> None:
        self._switches = common.voluntary_switches(self.pid)

    def tick_done(self) -> bool:
        if self.proc.poll() is not None:
            raise BrokenBenchmark(f"{self.name}: our daemon exited ({self.proc.returncode}); output:\n{self.tail()}")
        return self._waiting() and common.voluntary_switches(self.pid) != self._switches

    def stop(self) -> None:
        super().stop()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Old(Daemon):
    kind = "old"

    def __init__(self, *args, oracle: Path, **kw):
        super().__init__(*args, **kw)
        self.oracle = oracle

    def start(self) -> None:
        env = dict(common.DAEMON_ENV, PIDFILE=str(self.pidfile))
        cmd = common.old_daemon_cmd(self.oracle, self.dir, self.conf, self.ksm_dir if self.fake_ksm else None)
        launcher = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=self.output,
                                    stderr=subprocess.STDOUT, preexec_fn=self.cgroup.preexec)
        rc = launcher.wait(30)  # the script forks its loop, writes the pid file and exits
        if rc != 0:
            raise BrokenBenchmark(f"{self.name}: the old daemon's launcher failed ({rc}):\n{self.tail()}")
        self.pid = common.read_pidfile(self.pidfile)
        self.sleeps: set[int] = set()
        found = common.wait_for(self._new_sleep, 10, 0.005)
        if not found:
            raise BrokenBenchmark(f"{self.name}: the old daemon's loop never reached `wait`:\n{self.tail()}")
        self.sleeps = {found}
        if self.fake_ksm:
            self.watch = FileWatch(self.ksm_dir / "run")

    def _new_sleep(self) -> int | None:
        """A `sleep` child of the loop not seen before, asleep, while the loop waits for it."""
        if not blocked_in(self.pid, "do_wait"):
            return None
        for pid in self.cgroup.pids():
            if pid == self.pid or pid in self.sleeps:
                continue
            if common.comm(pid) == "sleep" and common.ppid(pid) == self.pid and blocked_in(pid, "sleep"):
                return pid
        return None

    def tick_done(self) -> bool:
        if not self.alive():
            raise BrokenBenchmark(f"{self.name}: the old daemon's loop died:\n{self.tail()}")
        new = self._new_sleep()
        if new:
            self._latest = new
            return True
        return False

    def after_tick(self) -> None:
        # the previous `sleep 3600` is left behind by the old loop: kill it, outside the window
        for pid in self.sleeps:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        common.wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in self.sleeps), 5, 0.001)
        self.sleeps = {self._latest}

    def helpers_peak_rss(self, workdir: Path) -> dict[str, int] | None:
        """Peak RSS (KiB) of each helper the old loop forks per tick, run with the same arguments
        on the same host now (they live too briefly to sample inside the daemon).

        Measured by GNU time(1) (%M, the child's ru_maxrss): a child forked by a small process
        carries at most that process's RSS into its peak, unlike one forked by this Python.
        None where /usr/bin/time is missing.
        """
        gnu_time = shutil.which("time", path="/usr/bin:/bin")
        if gnu_time is None:
            return None
        pids = subprocess.run(["pgrep", "-f", "-d", " ", "^qemu-system.*-enable-kvm"], capture_output=True,
                              text=True).stdout.strip()
        helpers = {
            "pgrep -f": (["pgrep", "-f", "-d", " ", "^qemu-system.*-enable-kvm"], None),
            "ps -p": (["ps", "-p", pids or "1", "-o", "rsz="], None),
            "awk (meminfo)": (["awk", "/^(MemFree|Buffers|Cached):/ {free += $2}; END {print free}",
                               "/proc/meminfo"], None),
            "awk (sum)": (["awk", "{ sum += $1 }; END { print 0+sum }"], "1000\n2000\n"),
            "date": (["/bin/date"], None),
            "sleep": (["sleep", "0"], None),
        }
        out = {}
        for name, (argv, stdin) in helpers.items():
            report = workdir / "time.out"
            subprocess.run([gnu_time, "-o", str(report), "-f", "%M", *argv], input=stdin or "", text=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(common.DAEMON_ENV))
            text = common.read_text(report).strip().splitlines()
            out[name] = int(text[-1]) if text and text[-1].isdigit() else None
        return out
