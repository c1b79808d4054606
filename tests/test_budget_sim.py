"""The budget law driving the ksmd simulator (tests/ksmdsim.py): bursts converge, steady CPU
stays in budget, churn backs off, false triggers are capped, nothing-to-merge stays cheap.

Sizes are the benchmark's (3 guests x 256 MiB) so the times compare with TUNING.md's table.
The simulator is slow where ksmd is fast (flat out re-visits ~5 M pages a second), so
reference runs stop as soon as they have what they measure.

The whole module is `slow` (about 2.5 min on Python 3.13, more on 3.9): it is pure and
deterministic, so .ci/run runs it once, in the main tier, not again under each other Python.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest

from ksmtuned.core import budget
from ksmtuned.core.budget import BudgetSettings, BudgetState, GuestMemory, KsmSample, Mode, step
from tests.ksmdsim import Budget, Churner, Costs, Fixed, Host, Ksmd, Proc, Run, sleep_wall_s_measured

pytestmark = pytest.mark.slow

GUEST_PAGES = 65536  # 256 MiB
QEMU_EXTRA_KIB = 18 * 1024  # QEMU's own resident memory, never mergeable (TUNING.md: 274 of 296 MB)
DEFAULTS = BudgetSettings()

# content mixes: (common to all guests, zero); the rest is unique
MIXES = {"zero": (0.0, 1.0), "mixed": (0.6, 0.1)}


def host_with(n_guests: int, mix: str, at_s: float, run_cls, *args, stagger_s: float = 0.0):
    k = Ksmd()
    h = Host(k)
    tuner = run_cls(h, *args) if run_cls is Budget else run_cls(k, *args)
    r = Run(h, tuner)
    common, zero = MIXES[mix]
    for g in range(n_guests):
        r.at(at_s + g * stagger_s, lambda: h.start_guest(GUEST_PAGES, common, zero, extra_kib=QEMU_EXTRA_KIB))
    return h, tuner, r


def run_until_merged(r: Run, h: Host, since_s: float, frac: float, limit_s: float, step_s: float = 0.25):
    """Advance until pages saved reach ``frac`` of what is mergeable now; the time it took."""
    while r.t < limit_s:
        r.until(r.t + step_s)
        if r.t > since_s and h.guests:
            t = r.time_to(frac * h.mergeable_pages(), since_s)
            if t is not None:
                return t
    return None


START_S = 0.35  # between two of the budget's watch ticks (0, 0.5, 1.0 ...): no lucky alignment


@functools.lru_cache(maxsize=None)
def flat_out_t90(mix: str) -> float:
    """Time to 90 % merged, flat out (10000 pages / 0 ms), guests started at START_S."""
    h, _, r = host_with(3, mix, START_S, Fixed, 10000, 0)
    return run_until_merged(r, h, START_S, 0.9, 10.0, step_s=0.05)


@functools.lru_cache(maxsize=None)
def flat_out_third_guest_t90() -> float:
    """Flat out: two guests merged, a third started at 2.0 s; its time to 90 %."""
    h, _, r = host_with(2, "mixed", 0.1, Fixed, 10000, 0)
    r.at(2.0, lambda: h.start_guest(GUEST_PAGES, 0.6, 0.1, extra_kib=QEMU_EXTRA_KIB))
    r.until(2.0)
    return run_until_merged(r, h, 2.0, 0.9, 6.0, step_s=0.05)


@pytest.mark.parametrize("mix", ["zero", "mixed"])
def test_burst_after_new_guests_converges_within_twice_flat_out(mix):
    h, tuner, r = host_with(3, mix, START_S, Budget, DEFAULTS)
    t90 = run_until_merged(r, h, START_S, 0.9, 30.0, step_s=0.05)
    flat = flat_out_t90(mix)
    assert t90 is not None
    # the daemon sees a new guest at its next watch tick: at most watch_s late
    assert t90 <= 2 * flat + DEFAULTS.watch_s, (t90, flat)
    r.until(60.0)
    assert r.saved() >= 0.99 * h.mergeable_pages()
    assert [m for _, m in tuner.modes()] == [Mode.STEADY, Mode.BURST, Mode.STEADY]
    print(f"{mix}: budget t90 {t90:.2f} s, flat out {flat:.2f} s, burst CPU {r.cpu_s(0, 10):.2f} s")


def test_guest_started_later_is_merged_from_its_own_start():
    h, tuner, r = host_with(2, "mixed", 0.5, Budget, DEFAULTS)
    r.until(60.0)
    start = 60.3  # between two watch ticks
    r.at(start, lambda: h.start_guest(GUEST_PAGES, 0.6, 0.1, extra_kib=QEMU_EXTRA_KIB))
    r.until(start)
    t90 = run_until_merged(r, h, start, 0.9, start + 30, step_s=0.05)
    flat = flat_out_third_guest_t90()
    assert t90 is not None and t90 <= 2 * flat + DEFAULTS.watch_s, (t90, flat)
    print(f"third guest: budget t90 {t90:.2f} s, flat out {flat:.2f} s")


def _second_guest_beside_an_old_one(tuner_cls, *args):
    """One mixed guest that has run for hours (its unmerged pages aged by smart scan), then a
    second with the same pattern: its common pages can only merge with the old guest's."""
    h, tuner, r = host_with(1, "mixed", 0.5, tuner_cls, *args)
    r.until(20.0)
    h.ksmd.age_unmerged(h.guests[0])
    start = 20.3  # between two watch ticks
    r.at(start, lambda: h.start_guest(GUEST_PAGES, 0.6, 0.1, extra_kib=QEMU_EXTRA_KIB))
    r.until(start)
    return h, tuner, r, start


@functools.lru_cache(maxsize=None)
def flat_out_second_guest() -> tuple:
    """Flat out: (pages saved 10 s after the second guest started, its time to 90 % of that).
    Not all the common pages merge: a new page visited after its third pass falls into smart
    scan's rhythm too, and where that is the old page's 9-pass rhythm shifted, they never meet
    (the real kernel does the same: the benchmark's targets are what flat out merged)."""
    h, _, r, start = _second_guest_beside_an_old_one(Fixed, 10000, 0)
    r.until(start + 10)
    plateau = r.saved()
    return plateau, r.time_to(0.9 * plateau, start)


def test_a_new_guest_merges_with_an_old_guests_skipped_pages():
    """Smart scan visits the old guest's unmerged pages only every 9th pass: the burst lasts
    until they have come round beside the new guest's (staggered guests, benchmark scenario 3)."""
    h, tuner, r, start = _second_guest_beside_an_old_one(Budget, DEFAULTS)
    plateau, flat = flat_out_second_guest()
    before = r.saved()
    assert plateau > 2 * before  # the common pages are most of what merges
    r.until(start + 30)
    t90 = r.time_to(0.9 * plateau, start)
    assert t90 is not None and t90 <= 2 * flat + DEFAULTS.watch_s, (t90, flat, r.saved(), plateau)
    bursts = [d for t, d in tuner.decisions if t >= start and d.mode is Mode.BURST]
    assert bursts and "new guest" in bursts[0].reason
    assert tuner.decisions[-1][1].mode is Mode.STEADY
    print(f"second guest beside an old one: budget t90 {t90:.2f} s, flat out {flat:.2f} s; "
          f"{r.saved()} vs flat out's {plateau} pages saved")


@pytest.mark.parametrize("mix,budget_pct", [("zero", 0.25), ("mixed", 0.25), ("mixed", 0.1), ("mixed", 1.0)])
def test_steady_cpu_stays_within_the_budget(mix, budget_pct):
    s = BudgetSettings(steady_pct=budget_pct)
    h, tuner, r = host_with(3, mix, 0.5, Budget, s)
    r.until(60.0)
    assert tuner.decisions[-1][1].mode is Mode.STEADY
    saved = r.saved()
    r.until(660.0)
    pct = r.cpu_pct(60.0, 660.0)
    assert pct <= budget_pct, pct
    assert r.saved() >= saved  # the memory stays merged
    print(f"{mix} @ {budget_pct} %: steady ksmd {pct:.3f} % over 600 s")


def test_nothing_to_merge_stays_cheap():
    """Unique content only: one burst (the memory is new), then steady under the budget."""
    k = Ksmd()
    h = Host(k)
    tuner = Budget(h, DEFAULTS)
    r = Run(h, tuner)
    for _ in range(3):
        r.at(0.5, lambda: h.start_guest(GUEST_PAGES, 0.0, 0.0, extra_kib=QEMU_EXTRA_KIB))
    r.until(60.0)
    burst_cpu = r.cpu_s(0, 60)
    r.until(660.0)
    pct = r.cpu_pct(60.0, 660.0)
    assert r.saved() == 0
    assert pct <= DEFAULTS.steady_pct, pct
    # the one burst: about BURST_PASSES + 1 passes of unique pages (3 us each), no more
    assert burst_cpu <= (budget.BURST_PASSES + 2) * 3 * GUEST_PAGES * 3e-6, burst_cpu
    print(f"unique only: burst {burst_cpu:.2f} CPU-s, steady {pct:.3f} %")


#: the budget with churn holding on (KSM_BUDGET_CHURN_PCT=1), whatever the default
HOLDING = replace(DEFAULTS, churn_pct=1.0)


def churn_run(settings, per_s, same=True, pool=None, stop_s=None, until_s=630.0):
    """Three zero guests merged, then guest 0's pages rewritten from 30 s on (stopped at stop_s)."""
    h, tuner, r = host_with(3, "zero", 0.5, Budget, settings)
    r.until(30.0)
    c = Churner(h, h.guests[0], per_s, same=same, pool=pool)
    r.churners.append(c)
    if stop_s is not None:
        r.at(stop_s, lambda: r.churners.remove(c))
    means = []
    while r.t < until_s:
        r.until(r.t + 1.0)
        means.append((r.t, r.saved()))
    return h, tuner, r, means


def mean_saved(means, start_s, end_s):
    vals = [v for t, v in means if start_s <= t <= end_s]
    return sum(vals) / len(vals)


#: The churn-hold tables the law does not meet since the simulator ages pages as mm/ksm.c does
#: (2026-12-03): strict, so a law that meets them again turns them green.
AGING = ("the churn hold was designed against a simulator that reset smart scan's age at each merge; "
         "mm/ksm.c never does, churned pages end up skipped 8 passes in 9 (docs/budget.md, 'Churn and smart scan')")


@pytest.mark.parametrize("rewrites_per_s", [200, pytest.param(2000, marks=pytest.mark.xfail(
    strict=True, reason=AGING + ": held, but 161,491 pages saved of 196,607, not 184,810"))])
def test_churn_that_merges_again_is_held(rewrites_per_s):
    """A guest rewriting its pages with what they held (each every ~5 min, or ~30 s): ksmd would
    merge them again and keep them merged for long, so after a trial of faster passes the law
    holds them - more saved than one pass per 200 s leaves (the guard alone), within the churn
    budget; and once the churn stops, back to the steady budget."""
    h, tuner, r, means = churn_run(HOLDING, rewrites_per_s, stop_s=630.0, until_s=930.0)
    held = [d for t, d in tuner.decisions if 450.0 <= t <= 630.0]
    assert held and all(d.churn_hold == "hold" for d in held), {d.churn_hold for d in held}
    assert "holding churn" in held[-1].reason, held[-1].reason
    assert r.cpu_pct(450.0, 630.0) <= HOLDING.churn_pct, r.cpu_pct(450.0, 630.0)
    _, _, _, slow = churn_run(replace(DEFAULTS, churn_pct=0.0), rewrites_per_s, until_s=630.0)
    ours, guard = mean_saved(means, 450.0, 630.0), mean_saved(slow, 450.0, 630.0)
    assert ours >= guard + 0.01 * h.mergeable_pages(), (ours, guard)
    # the pages waiting to be merged again stay near HOLD_LOSS of those saved (+ the sim's jitter)
    assert ours >= (1 - 4 * budget.HOLD_LOSS) * h.mergeable_pages(), ours
    after = [d for t, d in tuner.decisions if t >= 900.0]
    assert after and all(d.churn_hold == "" for d in after), {d.churn_hold for d in after}
    assert r.cpu_pct(900.0, 930.0) <= DEFAULTS.steady_pct
    print(f"churn {rewrites_per_s}/s: held {ours:.0f} vs {guard:.0f} saved (guard only) of "
          f"{h.mergeable_pages()}, ksmd {r.cpu_pct(450.0, 630.0):.3f} %")


@pytest.mark.xfail(strict=True, reason=AGING + ": the trial is not held")
def test_churn_whose_merges_outlast_a_fast_pass_only_is_held_for_the_pages_it_saves():
    """10,000 pages rewritten with what they held, 2000 a second: a merge lasts ~5 s, far less
    than a slow pass (200 s) and about a trial's pass, so the breaks grow nearly with the passes
    (20x for 38x) - as the bench's churn helper made them grow on the real kernel - yet each
    fast pass keeps most of those pages merged: the trial sees the pages saved grow, and holds."""
    h, tuner, r, means = churn_run(HOLDING, 2000, pool=10000, until_s=630.0)
    held = [d for t, d in tuner.decisions if 450.0 <= t <= 630.0]
    assert held and all(d.churn_hold == "hold" for d in held), {d.churn_hold for d in held}
    reasons = [d.reason for t, d in tuner.decisions if "holding churn" in d.reason]
    assert "pages more saved" in reasons[0], reasons[0]
    assert r.cpu_pct(450.0, 630.0) <= HOLDING.churn_pct, r.cpu_pct(450.0, 630.0)
    _, _, _, slow = churn_run(replace(DEFAULTS, churn_pct=0.0), 2000, pool=10000, until_s=630.0)
    ours, guard = mean_saved(means, 450.0, 630.0), mean_saved(slow, 450.0, 630.0)
    assert ours >= guard + 0.02 * h.mergeable_pages(), (ours, guard)
    print(f"churn 2000/s of 10,000: held {ours:.0f} vs {guard:.0f} saved (guard only), ksmd {r.cpu_pct(450.0, 630.0):.3f} %")


@pytest.mark.xfail(strict=True, reason=AGING + ": skipped pages break less, the trial holds")
def test_churn_that_breaks_before_the_next_pass_backs_off():
    """2000 pages rewritten every 0.5 s: a merge never outlives a pass, so faster passes only
    merge and break them more often.  The trial sees the breaks grow with the passes, the law
    goes back to the slow passes (lowered by the churn factor) and tries again only later."""
    h, tuner, r, _ = churn_run(HOLDING, 4000, pool=2000)
    hold = [d.churn_hold for t, d in tuner.decisions]
    assert "trial" in hold, "no trial"
    late = [d for t, d in tuner.decisions if t >= 420.0]
    assert all(d.churn_hold == "" for d in late), {d.churn_hold for d in late}
    assert "churn not held: re-merges grew" in late[-1].reason, late[-1].reason
    assert late[-1].churn_factor < 0.9, late[-1].churn_factor
    factor = max(d.churn_factor for d in late)
    pct = r.cpu_pct(420.0, 630.0)
    assert pct <= DEFAULTS.steady_pct * factor, (pct, factor)
    print(f"toggling churn: factor {factor:.2f}, ksmd {pct:.3f} % after the trial")


def test_erosion_neither_holds_nor_backs_off():
    """Pages rewritten with new data never merge again: nothing to hold, nothing to back off
    from (their visits are the steady budget's ordinary cost)."""
    h, tuner, r, _ = churn_run(HOLDING, 2000, same=False)
    assert all(d.churn_hold == "" for t, d in tuner.decisions)
    d = tuner.decisions[-1][1]
    assert d.churn_factor >= 0.9, d.churn_factor
    assert r.cpu_pct(330.0, 630.0) <= DEFAULTS.steady_pct
    assert r.saved() >= 0.5 * h.mergeable_pages()


def test_false_triggers_are_capped():
    """A retune every 5 s for 10 minutes (a hook storm): fruitless bursts hold later retunes
    off, longer each time, and the bucket bounds what bursts may spend."""
    h, tuner, r = host_with(3, "mixed", 0.5, Budget, DEFAULTS)
    r.until(30.0)
    for i in range(120):
        t = 30.0 + 5 * i
        r.at(t, functools.partial(tuner.retune, t))
    r.until(630.0)
    pct = r.cpu_pct(30.0, 630.0)
    spent = r.cpu_s(30.0, 630.0)
    assert spent <= DEFAULTS.bucket_cpu_s + 600 * DEFAULTS.bucket_refill_pct / 100
    assert tuner.state.bursts <= 10, tuner.state.bursts  # 15, 30, 60, ... s of holdoff
    assert pct <= 1.0, pct
    print(f"retune every 5 s: {tuner.state.bursts} bursts, ksmd {pct:.3f} % over 600 s")


def test_bucket_throttles_endless_real_work():
    """New guests, one after another (a guest restart loop): real triggers are never held
    off, but once the bucket is spent the bursts run at the refill rate."""
    s = BudgetSettings(bucket_cpu_s=2.0)
    k = Ksmd()
    h = Host(k)
    tuner = Budget(h, s)
    r = Run(h, tuner)
    guests = []

    def restart():
        if guests:
            h.stop_guest(guests.pop())
        guests.append(h.start_guest(GUEST_PAGES // 4, 0.0, 0.0))

    for i in range(60):
        r.at(0.5 + 10 * i, restart)
    r.until(600.0)
    spent = r.cpu_s(0, 600.0)
    assert spent <= s.bucket_cpu_s + 600 * max(s.bucket_refill_pct, s.steady_pct) / 100 * 1.5, spent
    throttled = [d for _, d in tuner.decisions if "burst budget spent" in d.reason]
    assert throttled
    print(f"restart loop: {spent:.2f} CPU-s in 600 s")


def test_budget_steady_costs_far_less_than_classic_max():
    h, tuner, r = host_with(3, "mixed", 0.5, Fixed, 1250, 10)
    r.until(20.0)
    classic = r.cpu_pct(10.0, 20.0)
    h2, _, r2 = host_with(3, "mixed", 0.5, Budget, DEFAULTS)
    r2.until(130.0)
    ours = r2.cpu_pct(70.0, 130.0)
    assert ours * 10 <= classic, (ours, classic)
    assert r2.saved() >= r.saved()
    print(f"classic max 1250/10 ms: {classic:.2f} %, budget steady {ours:.3f} %")


@pytest.mark.parametrize("sleep_ms,hz", [(10, 250), (20, 250), (1, 250), (10, 100), (1000, 250), (3, 1000)])
def test_the_law_models_ksmds_jiffy_rounding(sleep_ms, hz):
    """budget.sleep_wall_s is the simulator's (and the kernel's) mean sleep."""
    assert budget.sleep_wall_s(sleep_ms, hz) == pytest.approx(sleep_wall_s_measured(sleep_ms, hz), rel=0.05)


def test_ten_ms_sleeps_twelve_to_sixteen_at_250_hz():
    k = Ksmd(hz=250)
    k.sleep_millisecs = 10
    sleeps = sorted({round((k._sleep_ns(t * 1e6) - t * 1e6) / 1e6, 3) for t in [0.0, 1.0, 2.5, 3.9]})
    assert min(sleeps) > 12.0 - 1e-9 and max(sleeps) <= 16.0


def test_new_process_waits_a_pass_behind_the_cursor():
    k = Ksmd(smart_scan=False, costs=Costs())
    a = k.add(Proc([1] * 100 + [2] * 100))
    k.write("pages_to_scan", 50)
    k.write("sleep_millisecs", 1)
    k.write("run", 1)
    k.advance(0.001)  # one batch: the cursor is inside a
    assert k.full_scans == 0 and k.pages_scanned == 50
    b = k.add(Proc([3] * 100))
    k.advance(1.0)
    # b was inserted behind the cursor: the first pass never saw it
    assert k.full_scans >= 3
    merged_b = sum(b.ksm)
    assert merged_b == 100
    assert k.procs.index(b) < k.procs.index(a)


def test_smart_scan_skips_pages_that_never_merge():
    k = Ksmd(smart_scan=True)
    k.add(Proc(list(range(10, 1010))))  # unique
    k.write("pages_to_scan", 10000)
    k.write("sleep_millisecs", 0)
    k.write("run", 1)
    while k.full_scans < 20:
        k.advance(k.now_ns / 1e9 + 0.01)
    assert k.pages_skipped > 0
    assert k.pages_scanned < 20 * 1000 * 0.6


# --- the law alone ------------------------------------------------------------------------------

def sample(t, **kw):
    kw.setdefault("running", True)
    kw.setdefault("full_scans", 0)
    return KsmSample(time_s=t, **kw)


def test_ksm_off_is_left_alone():
    d, st = step(sample(0.0, running=False), BudgetState(), DEFAULTS)
    assert d.mode is Mode.OFF and d.pages_to_scan is None and d.sleep_ms is None


def test_steady_values_do_not_jitter():
    """Small changes in the measured cost leave the batch alone: nothing is rewritten."""
    st = BudgetState()
    guests = (GuestMemory(1, 1 << 20),)
    values = set()
    cpu = 0
    scanned = 0
    for i in range(60):
        cpu += 2_500_000 + (i % 3) * 100_000  # 0.25 % +- a bit
        scanned += 5000 + (i % 2) * 200
        d, st = step(sample(float(i), full_scans=i // 10, pages_shared=100, pages_sharing=262000,
                            pages_scanned=scanned, ksmd_cpu_ns=cpu, guests=guests), st, DEFAULTS)
        if i > 10:
            values.add((d.pages_to_scan, d.sleep_ms))
    assert len(values) == 1, values


def test_steady_holds_the_budget_while_visits_grow_dearer():
    """On the real kernel a unique page that smart scan skips more and more makes each counted
    visit dearer, pass after pass (a budget benchmark run of 2026-12-02: 0.25 % crept to 0.30 %).
    The cost estimate, a five-minute average, lags that; the loop on ksmd's measured CPU must
    still bring it down to the budget, not settle above it (it settled at ~1.12x the budget
    while its correction was only proportional to the last minute's overshoot)."""
    st = BudgetState()
    guests = tuple(GuestMemory(pid, 262144 + 18432, mergeable=True) for pid in (1, 2, 3))
    pages = 3 * 65536
    cpu_ns, scanned, t, d = 0.0, 0, 0.0, None
    spent = []  # (t, cpu_ns)
    while t <= 900.0:
        d, st = step(sample(t, full_scans=scanned // pages, pages_unshared=pages, pages_scanned=scanned,
                            ksmd_cpu_ns=int(cpu_ns), guests=guests, smart_scan=True), st, DEFAULTS)
        assert d.mode is Mode.STEADY
        cost_ns = 3000 + 6 * t  # 3 us a visit at first, 8.4 us after 15 minutes
        wakeups = d.next_tick_s / budget.sleep_wall_s(d.sleep_ms, DEFAULTS.hz)
        scanned += int(d.pages_to_scan * wakeups)
        cpu_ns += d.pages_to_scan * wakeups * cost_ns + wakeups * 17_000
        t += d.next_tick_s
        spent.append((t, cpu_ns))
    since = next(c for u, c in spent if u >= 300.0)
    pct = (spent[-1][1] - since) / ((spent[-1][0] - 300.0) * 1e9) * 100
    assert pct <= DEFAULTS.steady_pct * (1 + budget.STEADY_DEAD_BAND) * 1.01, pct
    assert pct >= DEFAULTS.steady_pct * 0.8, pct  # and does not starve
    print(f"visits growing dearer: steady {pct:.3f} % from 5 to 15 minutes")


def test_a_burst_ends_only_after_three_passes_and_a_fruitless_one():
    st = BudgetState()
    g = (GuestMemory(1, 1 << 20),)
    d, st = step(sample(0.0, guests=()), st, DEFAULTS)
    d, st = step(sample(1.0, guests=g, pages_scanned=0, ksmd_cpu_ns=0), st, DEFAULTS)
    assert d.mode is Mode.BURST and "new guest 1" in d.reason
    saved = 0
    # passes 1 and 2 gain nothing (the new guest was behind the cursor, then its first visit)
    for t, scans, saved in [(2.0, 1, 0), (3.0, 2, 0), (4.0, 3, 200_000), (5.0, 4, 200_100)]:
        d, st = step(sample(t, guests=g, full_scans=scans, pages_sharing=saved, pages_volatile=262144 - saved,
                            pages_scanned=int(t * 262144), ksmd_cpu_ns=int(t * 8e8)), st, DEFAULTS)
        expected = Mode.STEADY if t == 5.0 else Mode.BURST
        assert d.mode is expected, (t, d.explain())
    assert "gained" in d.reason


def _steady_then(guests_later, t_later=11.0):
    """Ten steady ticks with one merged guest, then one tick with ``guests_later`` beside it."""
    st = BudgetState()
    old = GuestMemory(1, 1 << 20, True)
    for i in range(10):
        d, st = step(sample(float(i), full_scans=i, pages_sharing=262000, pages_shared=100, guests=(old,),
                            pages_scanned=i * 1000, ksmd_cpu_ns=i * 10**6), st, DEFAULTS)
    assert d.mode is Mode.STEADY
    return step(sample(t_later, full_scans=11, pages_sharing=262000, pages_shared=100, guests=(old, *guests_later),
                       pages_scanned=11000, ksmd_cpu_ns=11 * 10**6), st, DEFAULTS)


def test_a_process_with_nothing_opted_in_is_no_news():
    """ksm_stat says ksm_mergeable: no (a look-alike, a QEMU with mem-merge=off): no burst, and
    its memory is not counted as memory ksmd has still to visit."""
    d, st = _steady_then((GuestMemory(2, 512 * 1024, False),))
    assert d.mode is Mode.STEADY and d.to_merge_kib < 1024, d.explain()  # the old guest: 176 kB unvisited
    # the same process once it opts in (QEMU madvises its RAM before it touches it): new
    d, _ = step(sample(12.0, full_scans=11, pages_sharing=262000, pages_shared=100, pages_scanned=12000,
                       ksmd_cpu_ns=12 * 10**6, guests=(GuestMemory(1, 1 << 20, True), GuestMemory(2, 512 * 1024, True))),
                st, DEFAULTS)
    assert d.mode is Mode.BURST and "new guest 2" in d.reason, d.explain()


def test_small_new_processes_are_no_news_until_they_add_up():
    few = tuple(GuestMemory(10 + i, 1024, True) for i in range(5))  # 5 MiB in all
    d, st = _steady_then(few)
    assert d.mode is Mode.STEADY, d.explain()
    many = tuple(GuestMemory(10 + i, 1024, True) for i in range(DEFAULTS.growth_kib // 1024))
    d, _ = _steady_then(many)
    assert d.mode is Mode.BURST and "new guest" in d.reason, d.explain()


def test_unknown_mergeable_counts_as_a_guest():
    """Kernels before ksm_mergeable (6.x): a new guest is news, as before."""
    d, _ = _steady_then((GuestMemory(2, 512 * 1024),))
    assert d.mode is Mode.BURST and "new guest 2" in d.reason


def test_burst_batch_aims_at_the_burst_share_of_a_core():
    st = BudgetState(mode=Mode.BURST, trigger="test", burst_acc=(2000.0 * 1e6, 1e6))
    d, _ = step(sample(0.0, guests=(GuestMemory(1, 1 << 20),)), st, DEFAULTS)
    busy = d.pages_to_scan * 2000e-9
    duty = busy / (busy + budget.sleep_wall_s(d.sleep_ms, DEFAULTS.hz))
    assert duty == pytest.approx(DEFAULTS.burst_pct / 100, rel=0.02)
    assert d.sleep_ms > 0  # never sleep 0: ksmd would spin until someone writes again


BUDGET_PURITY_PROBE = """
import logging, sys, time
from ksmtuned.core import budget as b
from ksmtuned.core.budget import GuestMemory, KsmSample

def clock(*args):
    raise AssertionError("the budget law read the clock")

for name in ("time", "time_ns", "monotonic", "monotonic_ns", "perf_counter", "process_time", "sleep"):
    setattr(time, name, clock)
logging.Logger.handle = lambda self, record: sys.exit(f"the budget law logged: {record.getMessage()}")
io = []
sys.addaudithook(lambda event, args: io.append(event) if event.split(".")[0] in
                 ("open", "os", "socket", "subprocess", "shutil", "fcntl", "syslog", "time", "sys") else None)
s = b.BudgetSettings()
st = b.BudgetState()
b.steady_start(s)
for i in range(40):  # steady, a new guest (burst), passes, growth, a retune, KSM off, churn
    guests = (GuestMemory(1, 1 << 20),) if i >= 3 else ()
    if i >= 20:
        guests += (GuestMemory(2, (1 << 19) + i * (1 << 16)),)
    d, st = b.step(KsmSample(time_s=float(i), running=i % 17 != 16, full_scans=i // 3, pages_sharing=i * 1000,
                             pages_volatile=5000, pages_scanned=i * 50000, cow_ksm=i * 300,
                             ksmd_cpu_ns=i * 10**8, guests=guests, retune=i == 30), st, s)
    d.explain()
print(io)
"""


def test_the_budget_law_does_no_io_no_clock_no_logging():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", BUDGET_PURITY_PROBE], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
