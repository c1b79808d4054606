"""Faults the kernel, the file system and the administrator can cause, against a real daemon.

Each test starts ``python -m ksmtuned --foreground`` and causes the fault for real where this
machine can: a renamed directory, a knob the daemon's credentials may not write (root without
CAP_DAC_OVERRIDE, as under the shipped unit), a read-only bind mount, the real KSM advisor, a
16 KiB tmpfs, real signals, real processes.  Only what the kernel cannot be made to do on
demand is injected, and each such test says how (EBUSY through strace's fault injection).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.faultrig import (
    BOOST, GIB_KIB, STOP, TOTAL_KIB, Daemon, make_procfs, make_sysfs, meminfo_text, read_text, wait_until,
    write_atomic,
)

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, capabilities, other users)")


def _ok_knobs(d: Daemon, run: str, pages: str | None = None, sleep_ms: str = "10") -> bool:
    if d.knob("run") != run:
        return False
    return pages is None or (d.knob("pages_to_scan") == pages and d.knob("sleep_millisecs") == sleep_ms)


# --- the KSM directory ---------------------------------------------------------------------


def test_ksm_directory_missing_at_start_exits_69_with_a_clear_message(tmp_path):
    d = Daemon(tmp_path, sysfs=tmp_path / "no-ksm-here")
    d.start(wait=False)
    assert d.proc.wait(15) == 69
    err = d.stderr()
    assert f"{tmp_path / 'no-ksm-here'}: no such directory: this kernel has no KSM" in err
    assert "Traceback" not in err
    assert not d.pidfile.exists()


def test_ksm_directory_vanishing_while_running_is_logged_retried_and_recovered(tmp_path):
    d = Daemon(tmp_path, interval_s=0.02, meminfo=BOOST).start()
    with d:
        wait_until(lambda: _ok_knobs(d, "1", "1250"), what="boosted to KSM_NPAGES_MAX")
        away = tmp_path / "ksm.away"
        os.rename(d.sysfs, away)
        wait_until(lambda: "adjust failed" in d.stderr(), what="the failure logged")
        time.sleep(0.2)  # a few failing ticks at 0.02 s
        assert d.alive()
        # while it is away, KSM is switched off by hand; the daemon must put it back on
        (away / "run").write_text("0\n")
        os.rename(away, d.sysfs)
        wait_until(lambda: "adjusting works again" in d.stderr(), what="recovery logged")
        wait_until(lambda: d.knob("run") == "1", what="run written again")
        err = d.stderr()
        assert f"{d.sysfs}: no such directory" in err
        assert "Traceback" not in err and "unexpected" not in err
        assert d.stop() == 0


def test_a_shorter_value_overwrites_a_longer_one_whole(tmp_path):
    """Found by these tests: 300 over 1250 left "3000" in a regular-file KSM directory."""
    d = Daemon(tmp_path, interval_s=3600, meminfo=BOOST)
    (d.sysfs / "pages_to_scan").write_text("1250\n")
    with d.start():
        assert d.knob("pages_to_scan") == "300"
        assert d.stop() == 0


# --- a knob that refuses writes ------------------------------------------------------------

# The shipped unit keeps no CAP_DAC_OVERRIDE: root then gets EACCES on a mode-0444 knob.
NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


@root
def test_run_not_writable_at_start_exits_77(tmp_path):
    d = Daemon(tmp_path, prefix=NO_DAC)
    (d.sysfs / "run").chmod(0o444)
    d.start(wait=False)
    assert d.proc.wait(15) == 77
    assert f"{d.sysfs / 'run'}: permission denied" in d.stderr()


@root
def test_knob_refusing_writes_with_eacces_is_logged_and_retried(tmp_path):
    d = Daemon(tmp_path, interval_s=0.02, meminfo=STOP, prefix=NO_DAC).start()
    with d:
        (d.sysfs / "pages_to_scan").chmod(0o444)
        write_atomic(d.meminfo, BOOST)
        wait_until(lambda: "Permission denied" in d.stderr() or "permission denied" in d.stderr(),
                   what="EACCES logged")
        # the rest of the decision still lands: ksmd runs, at the sleep the law asks for
        wait_until(lambda: d.knob("run") == "1" and d.knob("sleep_millisecs") == "10", what="run=1 still written")
        assert d.knob("pages_to_scan") == "100"  # the kernel refused it: unchanged
        assert d.alive()
        (d.sysfs / "pages_to_scan").chmod(0o644)
        wait_until(lambda: d.knob("pages_to_scan") == "1250", what="pages_to_scan written after recovery")
        assert "adjusting works again" in d.stderr()
        assert "Traceback" not in d.stderr()
        assert d.stop() == 0


@root
def test_read_only_ksm_directory_erofs_while_running_then_writable_again(tmp_path):
    d = Daemon(tmp_path, interval_s=0.02, meminfo=STOP).start()
    mounted = False
    with d:
        try:
            subprocess.run(["mount", "--bind", str(d.sysfs), str(d.sysfs)], check=True)
            mounted = True
            subprocess.run(["mount", "-o", "remount,bind,ro", str(d.sysfs)], check=True)
            write_atomic(d.meminfo, BOOST)
            wait_until(lambda: "read-only file system" in d.stderr().lower(), what="EROFS logged")
            time.sleep(0.1)
            assert d.alive() and d.knob("run") == "0"
            subprocess.run(["mount", "-o", "remount,bind,rw", str(d.sysfs)], check=True)
            wait_until(lambda: _ok_knobs(d, "1"), what="run=1 after the remount")
            assert "adjusting works again" in d.stderr()
        finally:
            if mounted:
                subprocess.run(["umount", "-l", str(d.sysfs)], check=False)
        assert d.stop() == 0


@root
def test_read_only_ksm_directory_at_start_exits_77_not_restartable(tmp_path):
    """A read-only /sys (a container) cannot be fixed by a restart: 77, which the unit does not restart."""
    sysfs = make_sysfs(tmp_path / "ksm")
    subprocess.run(["mount", "--bind", str(sysfs), str(sysfs)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(sysfs)], check=True)
        d = Daemon(tmp_path, sysfs=sysfs)
        d.start(wait=False)
        assert d.proc.wait(15) == 77
        assert f"{sysfs / 'run'}: read-only file system" in d.stderr()
    finally:
        subprocess.run(["umount", "-l", str(sysfs)], check=False)


def test_directory_in_place_of_a_knob_is_an_error_not_a_crash(tmp_path):
    """EISDIR: the kernel cannot do this to sysfs; it stands in for 'any other errno'."""
    d = Daemon(tmp_path, interval_s=0.02, meminfo=STOP).start()
    with d:
        (d.sysfs / "sleep_millisecs").unlink()
        (d.sysfs / "sleep_millisecs").mkdir()
        write_atomic(d.meminfo, BOOST)
        wait_until(lambda: "Is a directory" in d.stderr(), what="EISDIR logged")
        wait_until(lambda: d.knob("run") == "1", what="run still written")
        (d.sysfs / "sleep_millisecs").rmdir()
        time.sleep(0.1)
        assert not (d.sysfs / "sleep_millisecs").exists()  # a knob is never created, only written
        write_atomic(d.sysfs / "sleep_millisecs", "20\n")
        wait_until(lambda: d.knob("sleep_millisecs") == "10", what="the knob written again")
        assert "Traceback" not in d.stderr()
        assert d.stop() == 0


@pytest.mark.parametrize("errname", ["EBUSY", "EINVAL"])
@root
def test_knob_refusing_writes_injected_by_strace_then_detached(tmp_path, errname):
    """No KSM knob the daemon writes returns EBUSY on 6.18, so strace injects it into the running
    daemon's write(2) on pages_to_scan only; detaching strace is the fault going away."""
    if not shutil.which("strace"):
        pytest.skip("strace is not installed")
    d = Daemon(tmp_path, interval_s=0.02, meminfo=STOP).start()
    with d:
        knob = d.sysfs / "pages_to_scan"
        strace = subprocess.Popen(
            ["strace", "-qq", "-f", "-p", str(d.pid), "-e", "trace=write", "-e", f"inject=write:error={errname}",
             "-P", str(knob), "-o", str(tmp_path / "strace.out")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: read_text(Path(f"/proc/{d.pid}/status")).count("TracerPid:\t0") == 0,
                       what="strace attached")
            write_atomic(d.meminfo, BOOST)
            message = os.strerror(getattr(errno, errname))
            wait_until(lambda: message in d.stderr(), what=f"{errname} logged")
            wait_until(lambda: d.knob("run") == "1", what="run still written")
            # not written (in this regular-file stand-in the O_TRUNC before the failed write empties it)
            assert d.knob("pages_to_scan") in ("100", "")
            assert "(INJECTED)" in read_text(tmp_path / "strace.out")
        finally:
            strace.terminate()
            strace.wait(10)
        wait_until(lambda: d.knob("pages_to_scan") == "1250", what="pages_to_scan written once strace left")
        assert d.alive() and "Traceback" not in d.stderr()
        assert d.stop() == 0


# --- the real KSM advisor -------------------------------------------------------------------


@pytest.mark.ksm
@root
def test_advisor_scan_time_while_running_and_back(real_ksm, tmp_path):
    """On 6.18, pages_to_scan is EINVAL while advisor_mode=scan-time (the advisor owns it)."""
    if not (real_ksm / "advisor_mode").exists():
        pytest.skip("this kernel has no KSM advisor (advisor_mode appeared in 6.8)")
    d = Daemon(tmp_path, interval_s=0.05, sysfs=real_ksm, meminfo=BOOST).start()
    with d:
        wait_until(lambda: d.knob("run") == "1" and d.knob("pages_to_scan") == "1250", what="boosted to max")
        (real_ksm / "advisor_mode").write_text("scan-time")
        # the kernel now owns pages_to_scan (it set the advisor's minimum); switch run off by hand:
        # the daemon still owns run and must switch it back on
        (real_ksm / "run").write_text("0")
        wait_until(lambda: "advisor" in d.stderr(), what="the advisor warning")
        wait_until(lambda: d.knob("run") == "1", what="run switched on again under the advisor")
        start = d.ticks()
        wait_until(lambda: d.ticks() >= start + 5, what="5 more ticks under the advisor")
        assert d.knob("pages_to_scan") != "1250"  # the advisor's, not ours
        err = d.stderr()
        assert err.count("advisor_mode=scan-time") == 1, err
        assert "adjust failed" not in err
        (real_ksm / "advisor_mode").write_text("none")
        wait_until(lambda: d.knob("pages_to_scan") == "1250", what="pages_to_scan ours again")
        wait_until(lambda: "advisor is off again" in d.stderr(), what="the advisor-off message")
        assert d.stop() == 0


# --- /proc/meminfo ------------------------------------------------------------------------

FULL = meminfo_text(free_kib=1 * GIB_KIB)
BAD_MEMINFO = {
    "missing MemTotal": (FULL.replace("MemTotal:", "MemTotalX:"), "missing field MemTotal"),
    "missing Cached": ("".join(l + "\n" for l in FULL.splitlines() if not l.startswith("Cached")),
                       "missing field Cached"),
    "garbage line": (FULL + "this is not meminfo\n", ":8: expected 'Field: N kB'"),
    "not a number": (FULL.replace(f"MemFree:        {GIB_KIB}", "MemFree:        12O4"),
                     "MemFree: expected an integer"),
    "empty": ("", "missing field MemFree"),
    "free above total": (meminfo_text(free_kib=TOTAL_KIB + 1), "above MemTotal"),
}


@pytest.mark.parametrize("case", list(BAD_MEMINFO))
def test_bad_meminfo_skips_the_tick_names_the_field_and_recovers(tmp_path, case):
    text, message = BAD_MEMINFO[case]
    d = Daemon(tmp_path, interval_s=0.02, meminfo=STOP).start()
    with d:
        write_atomic(d.meminfo, text)
        wait_until(lambda: message in d.stderr(), what=message)
        ticks = d.ticks()
        time.sleep(0.1)
        assert d.ticks() == ticks, "a tick was not skipped"
        assert d.knob("run") == "0" and d.alive()
        write_atomic(d.meminfo, BOOST)
        wait_until(lambda: d.knob("run") == "1", what="the tick after the fix")
        err = d.stderr()
        assert f"{d.meminfo}" in err and "adjusting works again" in err and "Traceback" not in err
        assert d.stop() == 0


def test_bad_meminfo_at_start_is_refused_with_the_field(tmp_path):
    d = Daemon(tmp_path, meminfo="MemFree: 1 kB\n")
    d.start(wait=False)
    assert d.proc.wait(15) != 0
    assert f"{d.meminfo}: missing field MemTotal" in d.stderr()
    assert "Traceback" not in d.stderr()
