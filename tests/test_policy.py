"""The classic control law, branch by branch (KSM.md section 2)."""

import pytest

from ksmtuned.core.policy import (
    Branch, Sample, Tuning, bash_div, clamp_npages, decide, limits_for, sleep_ms_for,
    start_lines, thres_kib_for, tick_lines,
)

T = Tuning()
L16 = limits_for(16 * 1024 * 1024, T)  # total 16777216, sleep 10, thres 3355443


@pytest.mark.parametrize("a,b,q", [
    (7, 2, 3), (-7, 2, -3), (7, -2, -3), (-7, -2, 3), (0, 5, 0), (10**30, 3, 333333333333333333333333333333),
])
def test_bash_div_truncates_toward_zero(a, b, q):
    assert bash_div(a, b) == q


def test_bash_div_by_zero_raises():
    with pytest.raises(ZeroDivisionError):
        bash_div(1, 0)


@pytest.mark.parametrize("total_kib,sleep_msec,expected", [
    (16 * 1024 * 1024, 10, 10),      # reference host: exactly KSM_SLEEP_MSEC
    (8 * 1024 * 1024, 10, 20),       # half the RAM sleeps twice as long
    (1024 * 1024, 10, 160),
    (32 * 1024 * 1024, 10, 10),      # 5 ms floored to 10
    (24684084, 10, 10),              # this machine: 6.79 -> floor
    (16 * 1024 * 1024 - 1, 10, 10),  # 10.0000006 truncates to 10
    (3 * 1024 * 1024, 7, 37),        # 37.33 truncates
    (16 * 1024 * 1024, 0, 10),       # zero still floored
    (16 * 1024 * 1024, 11, 11),      # just above the floor
    (16 * 1024 * 1024, -5, 10),      # negative truncates toward zero, then floor
])
def test_sleep_ms(total_kib, sleep_msec, expected):
    assert sleep_ms_for(total_kib, sleep_msec) == expected


@pytest.mark.parametrize("total_kib,coef,const,expected", [
    (16777216, 20, 2048, 3355443),   # 3355443.2 truncated
    (10000, 20, 2048, 2048),         # const wins when bigger
    (10240, 20, 2048, 2048),         # equal: 2048 > 2048 is false, thres stays 2048
    (10245, 20, 2048, 2049),
    (16777216, 0, 0, 0),
    (16777216, 100, 0, 16777216),
    (2**50, 20, 2048, 2**50 * 20 // 100),  # huge totals stay exact integers
])
def test_thres(total_kib, coef, const, expected):
    assert thres_kib_for(total_kib, coef, const) == expected


@pytest.mark.parametrize("npages,lo,hi,expected", [
    (50, 64, 1250, 64), (64, 64, 1250, 64), (1250, 64, 1250, 1250), (1251, 64, 1250, 1250),
    (-300, 0, 10, 0), (5, 10, 1, 10),  # MIN is checked first, as the old increase_npages
])
def test_clamp(npages, lo, hi, expected):
    assert clamp_npages(npages, lo, hi) == expected


# (free, committed, npages before) -> (branch, npages after)   on the 16 GiB reference host
TOTAL, THRES = L16.total_kib, L16.thres_kib
CASES = [
    # no pressure
    ("stop", THRES + 1, 0, 500, Branch.STOP, 500),
    ("stop keeps npages", TOTAL, TOTAL - THRES - 1, 300, Branch.STOP, 300),
    # committed + thres == total: not '<', KSM keeps running (decay: free > thres)
    ("commit edge runs", THRES + 1, TOTAL - THRES, 300, Branch.DECAY, 250),
    # free == thres: not '>', so no stop; not '<', so decay
    ("free edge decays", THRES, 0, 300, Branch.DECAY, 250),
    ("free below boosts", THRES - 1, 0, 0, Branch.BOOST, 300),
    ("boost from zero", 0, 0, 0, Branch.BOOST, 300),
    ("boost clamps at max", 0, 0, 1100, Branch.BOOST, 1250),
    ("boost at max stays", 0, 0, 1250, Branch.BOOST, 1250),
    ("decay clamps at min", THRES + 10, TOTAL, 80, Branch.DECAY, 64),
    ("decay from zero goes to min", THRES + 10, TOTAL, 0, Branch.DECAY, 64),
    ("overcommit, free plenty", TOTAL, 2 * TOTAL, 700, Branch.DECAY, 650),
]


@pytest.mark.parametrize("name,free,committed,npages,branch,after", CASES, ids=[c[0] for c in CASES])
def test_decide(name, free, committed, npages, branch, after):
    d = decide(Sample(free_kib=free, committed_kib=committed), npages, L16, T)
    assert d.branch is branch
    assert d.npages == after
    assert d.run is (branch is not Branch.STOP)
    assert d.sleep_ms == 10
    assert d.committed_plus_thres_kib == committed + THRES


@pytest.mark.parametrize("tuning,npages,free,expected", [
    (Tuning(npages_boost=0), 100, 0, 100),                       # zero boost
    (Tuning(npages_decay=0), 100, THRES, 100),                   # zero decay
    (Tuning(npages_decay=-1000), 900, THRES, 64),                # big decay
    (Tuning(npages_min=0, npages_max=0), 0, 0, 0),               # KSM pinned at 0 pages
    (Tuning(npages_boost=-10, npages_min=0), 5, 0, 0),           # negative boost clamps at MIN
    (Tuning(npages_max=10**9, npages_boost=10**8), 0, 0, 10**8),
])
def test_decide_odd_tunings(tuning, npages, free, expected):
    limits = limits_for(TOTAL, tuning)
    assert decide(Sample(free, 0), npages, limits, tuning).npages == expected


def test_huge_totals():
    total = 64 * 2**40 // 1024  # 64 TiB in kB
    limits = limits_for(total, T)
    assert limits.sleep_ms == 10 and limits.thres_kib == total * 20 // 100
    d = decide(Sample(free_kib=limits.thres_kib - 1, committed_kib=10**15), 0, limits, T)
    assert d.branch is Branch.BOOST and d.npages == 300


def test_debug_lines_are_the_old_daemons():
    assert start_lines(L16) == ["total 16777216", "sleep 10", "thres 3355443"]
    stop = decide(Sample(5898240, 276900), 0, L16, T)
    assert tick_lines(stop) == ["committed 276900 free 5898240",
                                "3632343 < 16777216 and free > 3355443, stop ksm"]
    boost = decide(Sample(2752512, TOTAL), 0, L16, T)
    assert tick_lines(boost) == [f"committed {TOTAL} free 2752512", f"{TOTAL + THRES} > 16777216, start ksm",
                                 "2752512 < 3355443, boost", "KSMCTL start 300 10"]
    # equal values still print '>' on the start and decay lines
    edge = decide(Sample(THRES, TOTAL - THRES), 300, L16, T)
    assert tick_lines(edge)[1:] == ["16777216 > 16777216, start ksm", "3355443 > 3355443, decay",
                                    "KSMCTL start 250 10"]


PURITY_PROBE = """
import logging, sys, time
from ksmtuned.core import policy as p

def clock(*args):
    raise AssertionError("the policy read the clock")

for name in ("time", "time_ns", "monotonic", "monotonic_ns", "perf_counter", "process_time", "sleep"):
    setattr(time, name, clock)
logging.Logger.handle = lambda self, record: sys.exit(f"the policy logged: {record.getMessage()}")
io = []
# every file, process, socket or terminal operation Python audits (PEP 578)
sys.addaudithook(lambda event, args: io.append(event) if event.split(".")[0] in
                 ("open", "os", "socket", "subprocess", "shutil", "fcntl", "syslog", "time", "sys") else None)
T = p.Tuning()
for total_kib in (1024 * 1024, 16 * 1024 * 1024):
    limits = p.limits_for(total_kib, T)
    p.start_lines(limits)
    for free_kib in (0, limits.thres_kib - 1, limits.thres_kib, total_kib):
        for committed_kib in (0, total_kib):
            for npages in (0, 64, 1250, 5000):
                p.tick_lines(p.decide(p.Sample(free_kib, committed_kib), npages, limits, T))
print(io)
"""


def test_the_control_law_does_no_io_reads_no_clock_and_logs_nothing():
    """Run every branch with the clock and logging booby-trapped and an audit hook watching for
    I/O: any file, process, socket or clock use in core/policy fails this test."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", PURITY_PROBE], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
