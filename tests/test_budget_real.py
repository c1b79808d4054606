"""KSM_POLICY=budget against the real kernel: it merges real memory as fast as it bursts, then
brings ksmd's CPU down (schedstat over a window) far below what the classic law costs.

Each test holds the machine's KSM lock (tests/ksmguard.py, via the ``real_ksm`` fixture) only
while it runs, and stays under about a minute.  The bounds are loose on purpose: other
helpers' processes share the CPUs, and other mergeable memory on the host is scanned too.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from ksmtuned.kernel.ksmd import Ksmd
from tests.daemon_support import DaemonProc, start_mergeable

REPO = Path(__file__).resolve().parent.parent
BUDGET = ("KSM_THRES_COEF=100\nKSM_POLICY=budget\nKSM_MONITOR_INTERVAL=60\nKSM_BUDGET_WATCH=0.5\n")
#: steady ksmd CPU allowed over the window, % of one core: the issue's goal (the budget is 0.25 %; the
#: rest is room for a shared machine and other mergeable memory on it; measured: 0.004-0.02 %)
STEADY_BOUND_PCT = 0.3


def read(root: Path, name: str) -> int:
    return int((root / name).read_text())


def budget_of(state: Path) -> dict:
    """The state file's budget block ({} while it is missing or being replaced)."""
    try:
        return json.loads(state.read_text()).get("budget") or {}
    except (OSError, ValueError):
        return {}


def wait_mode(state: Path, mode: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    b = {}
    while time.monotonic() < deadline:
        b = budget_of(state)
        if b.get("mode") == mode:
            return b
        time.sleep(0.1)
    raise AssertionError(f"budget never reached {mode} within {timeout_s} s: {b}")


def ksmd_pct(window_s: float) -> float:
    k = Ksmd()
    a = k.cpu_ns()
    t0 = time.monotonic()
    time.sleep(window_s)
    b = k.cpu_ns()
    return (b - a) / ((time.monotonic() - t0) * 1e9) * 100


def merge_then_steady(real_ksm: Path, tmp_path: Path, match: str, start_work, expected_pages: int):
    state = tmp_path / "state.json"
    with ExitStack() as stack:
        d = DaemonProc(tmp_path, BUDGET + f"KSM_GUEST_MATCH='{match}'\n", sysfs=real_ksm,
                       extra=["--state-file", str(state)])
        stack.callback(d.stop)
        d.start()
        wait_mode(state, "steady", 10)
        t0 = time.monotonic()
        start_work(stack)
        burst = wait_mode(state, "burst", 10)
        deadline = time.monotonic() + 30
        while read(real_ksm, "pages_sharing") < 0.9 * expected_pages and time.monotonic() < deadline:
            time.sleep(0.05)
        t90 = time.monotonic() - t0
        sharing = read(real_ksm, "pages_sharing")
        assert sharing >= 0.9 * expected_pages, f"pages_sharing {sharing} of {expected_pages}"
        done = wait_mode(state, "steady", 30)
        steady = ksmd_pct(15.0)
        assert read(real_ksm, "pages_sharing") >= 0.9 * expected_pages  # kept merged
        assert read(real_ksm, "sleep_millisecs") == 1000
        print(f"t90 {t90:.2f} s (burst: {burst['reason']}); {done['reason']}; steady ksmd {steady:.3f} %")
        return t90, steady


@pytest.mark.root
@pytest.mark.ksm
def test_budget_merges_real_memory_then_ksmd_goes_quiet(real_ksm, tmp_path):
    mib = 64
    pages = mib * 256

    def work(stack):
        start_mergeable(stack, mib)
        start_mergeable(stack, mib)

    t90, steady = merge_then_steady(real_ksm, tmp_path, r"regex:bench\.mergeable", work, 2 * pages)
    assert steady <= STEADY_BOUND_PCT


@pytest.mark.root
@pytest.mark.ksm
def test_a_look_alike_with_nothing_opted_in_sets_off_no_burst(real_ksm, tmp_path):
    """A matched process with 128 MiB that never opted in to KSM is no news (no burst, nothing
    counted as still to merge); the same size opted in is."""
    state = tmp_path / "state.json"
    with ExitStack() as stack:
        d = DaemonProc(tmp_path, BUDGET + "KSM_GUEST_MATCH='regex:bench\\.mergeable'\n", sysfs=real_ksm,
                       extra=["--state-file", str(state)])
        stack.callback(d.stop)
        d.start()
        wait_mode(state, "steady", 10)
        start_mergeable(stack, 128, "plain")
        deadline = time.monotonic() + 5  # ten watch periods
        seen = []
        while time.monotonic() < deadline:
            b = budget_of(state)
            seen.append(b.get("mode"))
            time.sleep(0.1)
        assert "burst" not in seen, seen
        assert "steady" in seen
        start_mergeable(stack, 128)
        burst = wait_mode(state, "burst", 10)
        assert "new guest" in burst["reason"], burst


@pytest.mark.root
@pytest.mark.ksm
def test_a_guest_that_opts_in_after_touching_its_memory_bursts_at_the_next_watch(real_ksm, tmp_path):
    """A process seen with its 128 MiB touched but not yet opted in (madvise comes later) is no
    news then; its opt-in alone (no growth left to see) is, within a watch or two, not at the
    next 10-s steady tick."""
    state = tmp_path / "state.json"
    with ExitStack() as stack:
        d = DaemonProc(tmp_path, BUDGET + "KSM_GUEST_MATCH='regex:bench\\.mergeable'\n", sysfs=real_ksm,
                       extra=["--state-file", str(state)])
        stack.callback(d.stop)
        d.start()
        wait_mode(state, "steady", 10)
        p = start_mergeable(stack, 128, "late", first="touched")
        deadline = time.monotonic() + 3  # six watches: the daemon has seen it, not opted in
        while time.monotonic() < deadline:
            assert budget_of(state).get("mode") != "burst"
            time.sleep(0.1)
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "ready"
        burst = wait_mode(state, "burst", 2.5)
        assert f"new guest {p.pid}" in burst["reason"], burst


@pytest.mark.root
@pytest.mark.ksm
@pytest.mark.qemu
def test_budget_merges_real_guests_then_ksmd_goes_quiet(real_ksm, tmp_path):
    from tests import qemu_support as qs

    qs.require_qemu()
    mib = 256

    def work(stack):
        guests = [qs.start_guest("debian", f"bg{i}", mib, tmp_path) for i in range(3)]
        for g in guests:
            stack.callback(qs.kill_guest, g)
        qs.wait_resident(guests, tmp_path)

    # zero-filled preallocated RAM: all but a few pages of 3 x 256 MiB merge
    t90, steady = merge_then_steady(real_ksm, tmp_path, r"regex:-name bg[0-9]", work, 3 * mib * 256)
    assert steady <= STEADY_BOUND_PCT


@pytest.mark.root
@pytest.mark.ksm
@pytest.mark.slow
def test_churn_that_merges_again_is_held_on_the_real_kernel(real_ksm, tmp_path):
    """A process rewriting a moving 5 % of its 64 MiB each second (each page every 20 s, then left
    with its old content): the steady passes (one per KSM_BUDGET_MIN_PASS, 20 s here to keep the
    test short) see merged pages broken and merged again; a trial of faster passes finds that
    the re-merges outlast a pass (the rate of breaks barely grows), and the law holds them: a
    faster steady rate, ksmd within KSM_BUDGET_CHURN_PCT, the state file and metrics say so."""
    state = tmp_path / "state.json"
    prom = tmp_path / "metrics.prom"
    with ExitStack() as stack:
        d = DaemonProc(tmp_path, BUDGET + "KSM_GUEST_MATCH='regex:bench\\.mergeable'\nKSM_BUDGET_MIN_PASS=20\nKSM_BUDGET_CHURN_PCT=1\n"
                       f"KSM_METRICS_TEXTFILE={prom}\n", sysfs=real_ksm, extra=["--state-file", str(state)])
        stack.callback(d.stop)
        d.start()
        wait_mode(state, "steady", 10)
        start_mergeable(stack, 64, "churn")
        wait_mode(state, "burst", 10)
        wait_mode(state, "steady", 30)
        deadline = time.monotonic() + 300  # two slow passes (20 s or more), a minute measured, the 40-s trial
        seen, b, batches, trial_t = [], {}, [], None
        while time.monotonic() < deadline:
            batches.append((time.monotonic(), read(real_ksm, "pages_to_scan")))
            b = budget_of(state)
            if b.get("churn_hold") and b["churn_hold"] not in seen:
                seen.append(b["churn_hold"])
                trial_t = trial_t or time.monotonic()
            if b.get("churn_hold") == "hold":
                break
            time.sleep(0.5)
        assert seen == ["trial", "hold"], (seen, b)
        assert "holding churn" in b["reason"], b
        assert b["cow_ksm_per_s"] and b["cow_ksm_per_s"] > 100, b  # ~800 pages/s are rewritten
        time.sleep(11)  # the first tick in hold has sized its batch
        held_pages = read(real_ksm, "pages_to_scan")
        # the state file is rewritten by every tick that writes a knob: it never lags sysfs
        assert budget_of(state)["pages_to_scan"] == held_pages, (budget_of(state), held_pages)
        # the slow passes' batch: read before the state file showed the trial (sysfs is written
        # first, the state file within milliseconds after)
        slow_pages = [n for t, n in batches if t < trial_t - 2.0][-1]
        assert held_pages >= 2 * slow_pages, (held_pages, slow_pages)  # a trial needs HOLD_MIN_SPEEDUP (2x)
        pct = ksmd_pct(20.0)
        assert pct <= 1.0 + STEADY_BOUND_PCT, pct  # KSM_BUDGET_CHURN_PCT=1 and room for the machine
        text = prom.read_text()
        assert 'ksmtuned_budget_churn_hold{state="hold"} 1.0' in text, text[-2000:]
        print(f"held: {held_pages} pages/s against {slow_pages} slow, ksmd {pct:.3f} %; {b['reason']}")
