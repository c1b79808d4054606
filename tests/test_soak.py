"""Soak: 100,000 adjusts in one process must not grow memory or leak file descriptors.

The daemon object is built as cli builds it (real config parser, real meminfo parser, real
guest scan, real debug log, the state-file observer when it exists) against a temp KSM
directory and a temp procfs whose meminfo the loop rewrites, so that every branch (KSM off,
boost, a failed tick) and every write path runs again and again.  The clock is a fake one
(adjust() never sleeps): 100,000 ticks are 69 days of the default 60 s interval.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ksmtuned.service.config_file import load_config
from ksmtuned.engine.daemon import Daemon
from ksmtuned.kernel.ksm import KsmSysfs
from tests.faultrig import BOOST, STOP, make_sysfs, write_atomic

CYCLES = int(os.environ.get("KSMTUNED_SOAK_CYCLES", 100_000))
WARMUP = 3_000
BAD = "MemTotal: 16777216 kB\nMemFree: x kB\n"  # a failing tick: the error path soaks too


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def quiet_ksmtuned_log():
    """Log records are formatted and written (to /dev/null), not kept in memory by pytest's capture.

    Entered inside the test body: pytest attaches its capture handler to every non-propagating
    logger when each test phase starts, so this replaces the handlers after that.
    """
    logger = logging.getLogger("ksmtuned")
    old = logger.handlers[:], logger.propagate, logger.level
    sink = open(os.devnull, "w")
    handler = logging.StreamHandler(sink)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.handlers[:], logger.propagate, logger.level = old
        sink.close()





@pytest.mark.slow
@pytest.mark.parametrize("with_state", [
    False,
    pytest.param(True, marks=[pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm (tmpfs) for the state file")])],
    ids=["loop", "loop+state-file"])
def test_100k_adjusts_grow_rss_by_less_than_1_mib_and_leak_no_fd(tmp_path, with_state):
    """loop: the daemon as --foreground runs it without its observers, 100,000 adjusts.
    loop+state-file: the same with the state-file/metrics observer (report.py), 30,000 adjusts
    (it costs twice as much per tick), the state file on tmpfs as /run is."""
    cycles = CYCLES if not with_state else min(CYCLES, 30_000)
    # three guests the real scan finds and measures every tick (a sleep named qemu-kvm)
    qemu = tmp_path / "bin" / "qemu-kvm"
    qemu.parent.mkdir()
    qemu.symlink_to(shutil.which("sleep"))
    guests = [subprocess.Popen([str(qemu), "3600"]) for _ in range(3)]
    cleanup = contextlib.ExitStack()
    try:
        cleanup.enter_context(quiet_ksmtuned_log())
        procfs = tmp_path / "proc"
        procfs.mkdir()
        os.symlink("/proc/stat", procfs / "stat")
        for g in guests:
            os.symlink(f"/proc/{g.pid}", procfs / str(g.pid))
        write_atomic(procfs / "meminfo", STOP)
        sysfs = make_sysfs(tmp_path / "ksm")
        conf = tmp_path / "ksmtuned.conf"
        conf.write_text(f"KSM_MONITOR_INTERVAL=0.05\nDEBUG=1\nLOGFILE={tmp_path / 'debug.log'}\n")

        loaded = load_config(conf, env={})
        observers = []
        if with_state:
            from ksmtuned.report.reporter import make_observers

            # on tmpfs, as /run/ksmtuned is: fsync costs nothing there
            state_dir = Path(tempfile.mkdtemp(prefix="ksmtuned-soak-", dir="/dev/shm"))
            observers = make_observers(loaded.settings, state_path=state_dir / "state.json", sysfs=sysfs,
                                       procfs=procfs, config_path=str(conf))
        ticks = itertools.count()
        fake_clock = lambda: next(ticks) * 0.05  # noqa: E731
        daemon = Daemon(loaded, KsmSysfs(sysfs), procfs=procfs, observers=observers, clock=fake_clock,
                        wall_clock=lambda: 1.7e9 + fake_clock(),
                        reload_config=lambda: load_config(conf, env={}, missing_ok=False))
        texts = {"stop": STOP, "boost": BOOST, "bad": BAD}

        current = ["stop"]

        def cycle(i: int) -> None:
            if i % 50 == 0:  # change the pressure: writes to sysfs, INFO lines, branch changes
                current[0] = "bad" if i % 1000 == 500 else ("boost" if (i // 50) % 2 else "stop")
                write_atomic(procfs / "meminfo", texts[current[0]])
            if i % 10_000 == 0 and i:
                assert daemon.reload()  # a SIGHUP now and then: new settings object, debug log reopened
            report = daemon.adjust("interval")
            assert (report.error is not None) == (current[0] == "bad"), report.error

        for i in range(WARMUP):
            cycle(i)
        gc.collect()
        if os.environ.get("KSMTUNED_SOAK_TRACE"):  # where the memory went, when this test fails
            import tracemalloc

            tracemalloc.start(20)
            snap0 = tracemalloc.take_snapshot()
        rss0, fds0, t0 = rss_kib(), open_fds(), time.monotonic()
        samples = []
        for i in range(WARMUP, WARMUP + cycles):
            cycle(i)
            if (i - WARMUP) % 10_000 == 9_999:
                samples.append(rss_kib() - rss0)
        gc.collect()
        rss1, fds1, elapsed = rss_kib(), open_fds(), time.monotonic() - t0

        summary = {"cycles": cycles, "seconds": round(elapsed, 1), "per_adjust_us": round(elapsed / cycles * 1e6),
                   "rss_start_kib": rss0, "rss_end_kib": rss1, "rss_growth_kib": rss1 - rss0,
                   "fds_start": fds0, "fds_end": fds1, "state_file": with_state, "rss_growth_every_10k_kib": samples}
        print("SOAK " + json.dumps(summary))
        if os.environ.get("KSMTUNED_SOAK_TRACE"):
            for stat in tracemalloc.take_snapshot().compare_to(snap0, "traceback")[:3]:
                print(stat, *stat.traceback.format()[-16:], sep="\n")
            tracemalloc.stop()
        (Path(os.environ.get("KSMTUNED_SOAK_REPORT", tmp_path / "soak.json"))).write_text(json.dumps(summary) + "\n")
        log = (tmp_path / "debug.log").read_text()
        assert log.count(": committed ") >= cycles * 0.95  # (failed ticks write no line)
        assert daemon.sysfs.read("run") in ("0", "1")
        assert fds1 <= fds0, summary
        assert rss1 - rss0 < 1024, summary
    finally:
        cleanup.close()
        for g in guests:
            g.kill()
            g.wait()
        if with_state and observers:
            shutil.rmtree(state_dir, ignore_errors=True)
