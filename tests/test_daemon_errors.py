"""A lasting fault at a short interval: logged once, again every 10 minutes, and its end logged."""

import logging
import os
from pathlib import Path

from ksmtuned.core.config import build_settings
from ksmtuned.engine.daemon import Daemon
from ksmtuned.kernel.ksm import KsmSysfs
from tests.daemon_support import fake_ksm_dir


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_same_error_is_rate_limited_and_recovery_logged(tmp_path, caplog):
    ksm = fake_ksm_dir(tmp_path)
    (ksm / "pages_to_scan").unlink()
    (ksm / "pages_to_scan").mkdir()  # a knob that refuses every write (EISDIR)
    loaded = build_settings([], {"KSM_THRES_COEF": "100"}, "none")
    clock = Clock()
    d = Daemon(loaded, KsmSysfs(ksm), procfs=Path("/proc"), clock=clock)
    caplog.set_level(logging.DEBUG, logger="ksmtuned.engine.daemon")
    for _ in range(100):
        d.adjust("interval")
        clock.now += 1  # a 1 s interval
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "pages_to_scan" in errors[0].getMessage()
    assert (ksm / "run").read_text() == "1"  # the other writes still happened
    assert d.npages == 1250  # and the law moved on
    clock.now += 600
    d.adjust("interval")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and "again, still" in errors[1].getMessage()
    os.rmdir(ksm / "pages_to_scan")
    (ksm / "pages_to_scan").write_text("100")
    d.adjust("interval")
    assert (ksm / "pages_to_scan").read_text() == "1250"
    assert any("adjusting works again (after 700 s of failures)" in r.getMessage() for r in caplog.records)


def test_different_meminfo_errors_are_each_logged_and_each_rate_limited(tmp_path, caplog):
    """Issue 11: after one meminfo error, a different one was silenced for ten minutes."""
    ksm = fake_ksm_dir(tmp_path)
    procfs = tmp_path / "proc"
    procfs.mkdir()
    good = "MemTotal: 16777216 kB\nMemFree: 8388608 kB\nBuffers: 0 kB\nCached: 0 kB\n"
    (procfs / "meminfo").write_text(good)
    loaded = build_settings([], {}, "none")
    clock = Clock()
    d = Daemon(loaded, KsmSysfs(ksm), procfs=procfs, clock=clock)
    d.adjust("start")
    caplog.set_level(logging.DEBUG, logger="ksmtuned.engine.daemon")
    bad = ["MemTotal: 16777216 kB\nBuffers: 0 kB\nCached: 0 kB\n",  # no MemFree
           "MemTotal: 16777216 kB\nMemFree: x kB\nBuffers: 0 kB\nCached: 0 kB\n"]  # not a number
    for i in range(40):  # alternating, every second
        (procfs / "meminfo").write_text(bad[i % 2])
        d.adjust("interval")
        clock.now += 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and errors[0] != errors[1], errors
