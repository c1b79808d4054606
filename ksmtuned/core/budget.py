"""The budget policy: how hard ksmd scans, as a pure function of counters and the last state.

No I/O, no clock, no logging.  Whether KSM runs at all stays the classic decision
(:mod:`ksmtuned.core.policy`); this law chooses ``pages_to_scan`` and ``sleep_millisecs``
while it runs.  See docs/budget.md for the reasoning, and TUNING.md for the kernel facts.

Two modes:

- **burst** while there is unmerged candidate memory (a new guest, a guest grown, a retune,
  memory ksmd has not visited yet): batches sized so ksmd uses ``burst_pct`` of one core,
  until :data:`BURST_PASSES` full passes have passed since the trigger and the last pass
  gained next to nothing.  A token bucket of burst CPU-seconds caps how much repeated
  (false) triggers can spend.
- **steady** otherwise: long sleeps, batches sized by a closed loop on ksmd's measured
  CPU (its schedstat) to stay within ``steady_pct`` of one core, lowered under churn, and
  never faster than one full pass per ``min_pass_s``.  Churn whose pages merge again and
  then stay merged a while is *held* instead (within ``churn_pct``), once a trial of faster
  passes shows that the re-merges last: see :data:`HOLD_MAX_GROWTH`.

Inputs are one :class:`KsmSample` (counters read this tick, the time given by the caller)
and the previous :class:`BudgetState`; :func:`step` returns a :class:`BudgetDecision` and
the new state.  The decision's values change only when they really should (hysteresis),
because writing ``sleep_millisecs`` wakes ksmd.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Tuple

#: Full passes after a trigger before a burst may end.  A new process is inserted just
#: behind ksmd's cursor: the pass under way skips it, the next visits it once (a checksum),
#: the one after merges it.  So "two visits" are three passes counted from a trigger mid-pass.
BURST_PASSES = 3
#: ksmd's cost per page visit before anything was measured (ns): TUNING.md section 3,
#: a merge is ~1.05 CPU-s per GiB over two visits, i.e. ~2 us per visit.
PRIOR_COST_NS_PER_PAGE = 2000.0
#: Batches are kept within these bounds (pages per wake-up).
MIN_BATCH_PAGES = 1
MAX_BATCH_PAGES = 1_000_000
#: A new batch is written only when it differs from the one in force by more than this
#: fraction (pages_to_scan is cheap to write, but a jittering value is noise in the logs).
HYSTERESIS = 0.125
#: The windows (s) over which the cost of a visit is averaged, per mode: a burst must follow
#: the content quickly; steady spans several of smart scan's skipping cycles.
BURST_COST_WINDOW_S = 3.0
STEADY_COST_WINDOW_S = 300.0
#: Steady mode also watches ksmd's CPU itself over about this long, and cuts the batch when
#: it runs over the budget (the cost estimate lags when the content changes under it).
STEADY_CPU_WINDOW_S = 60.0
#: ...and a correction that integrates the overshoot over that window keeps it down when the
#: cost estimate stays low (smart scan's skipped pages make a counted visit dearer pass after
#: pass, and a five-minute average of the cost lags that); it never speeds ksmd up past 1.
MIN_STEADY_CORRECTION = 0.05
STEADY_DEAD_BAND = 0.05
#: Churn: the weight of one tick in the moving average is dt / CHURN_WINDOW_S.
CHURN_WINDOW_S = 60.0
#: The churn factor never lowers the steady budget below this fraction of it.
CHURN_FLOOR = 0.2
#: A pass "gained next to nothing" when it added at most max(this, tracked/1000) pages saved.
MIN_GAIN_PAGES = 256
#: Smart scan (kernel 6.7+) visits a page that never merged only every 9th pass (mm/ksm.c
#: skip_age(): at most 8 skips).  A new guest's duplicate of such an old page merges only in a
#: pass that visits both, so a burst that finds old unmerged pages lasts this many passes more,
#: and ends only when a whole such cycle gained next to nothing.
SMART_SCAN_PASSES = 9
#: Pass marks kept to measure the gain over the last SMART_SCAN_PASSES passes.
MAX_PASS_MARKS = 32
#: Holding churn.  Pages rewritten and then left alone (a guest rewriting a buffer that goes
#: back to common content) merge again at ksmd's next visit and stay merged until the next
#: rewrite; with one pass per min_pass_s they are unmerged most of the time.  When steady mode
#: sees re-mergeable churn (churn ratio >= HOLD_MIN_CHURN, at least `small` pages broken per
#: min_pass_s, measured over CHURN_WINDOW_S), it tries faster passes for HOLD_TRIAL_S and
#: compares the rate at which merges break: if a re-merge only lasts until the next visit, that
#: rate grows with the scan rate and nothing is held (back off, retried after HOLD_RETRY_S,
#: doubling); if it grew by at most HOLD_MAX_GROWTH of the speed-up, re-merges outlive passes
#: and the policy holds them: one pass per the time in which pages waiting to be merged again
#: stay under HOLD_LOSS of the pages saved (a broken page waits half a pass on average).
#: Breaks that grow with the passes can also mean merges that last long, only not a whole slow
#: pass (pages rewritten every 20 s, passes every 200 s: each fast pass keeps them merged for
#: most of their cycle).  The counters tell the two apart: such merges raise the pages saved,
#: merges that break at once do not (pages_sharing drops only at ksmd's next visit).  So a trial
#: also holds when the pages saved grew by at least HOLD_MIN_GAIN of them.
#: Smart scan undoes much of this on 6.7+ kernels: a merge never resets a page's age, so a
#: churned page ends up visited every 9th pass and waits far longer than half a pass
#: (measured: bench/churn_aging.py; docs/budget.md, "Churn and smart scan").  The hold was
#: designed without that; tests/test_budget_sim.py marks the tables it no longer meets.
HOLD_MIN_CHURN = 0.25
HOLD_TRIAL_S = 40.0
HOLD_SETTLE_S = 10.0  # the trial's first seconds (its cost measured, ksmd at the new rate) not counted
HOLD_MAX_GROWTH = 0.5
HOLD_MIN_SPEEDUP = 2.0
HOLD_LOSS = 0.015
HOLD_MIN_GAIN = 0.01
HOLD_MIN_PASS_S = 1.0
HOLD_RETRY_S = 600.0
HOLD_RATE_WINDOW_S = 30.0  # holding: the break rate's moving average
#: Holding sizes its passes from the larger of the trial's break rate and the current one: from
#: the current one alone, slower passes would see fewer breaks and slow down further (breaks
#: found are a sample of the pages visited).  It stops when the breaks fall under this share
#: of the trial's (the churn has stopped).
HOLD_EXIT_SHARE = 0.1


#: The kinds of trigger, as the metrics label them (the reason text has the details).
TRIGGER_KINDS = ("new-guest", "growth", "retune", "unvisited")


def _kind(trigger: str) -> str:
    if trigger.startswith("new guest"):
        return "new-guest"
    if trigger.startswith("guest "):
        return "growth"
    if trigger == "retune":
        return "retune"
    return "unvisited"


class Mode(enum.Enum):
    OFF = "off"  # the classic law stopped KSM: nothing to tune
    BURST = "burst"
    STEADY = "steady"


@dataclass(frozen=True)
class BudgetSettings:
    """The budget policy's knobs (KSM_BUDGET_* in ksmtuned.conf), in their units."""

    burst_pct: float = 80.0  # % of one core while bursting
    steady_pct: float = 0.25  # % of one core in steady mode
    burst_sleep_ms: int = 20  # ksmd's sleep while bursting (batches sized around it)
    steady_sleep_ms: int = 1000  # ksmd's sleep in steady mode: few wake-ups (35 us each)
    min_pass_s: float = 200.0  # steady: merged memory re-scanned at most once per this
    churn_pct: float = 1.0  # steady, holding re-mergeable churn merged: ksmd's CPU ceiling (0: never)
    growth_kib: int = 32 * 1024  # a guest grown by this much is a trigger
    bucket_cpu_s: float = 30.0  # burst CPU-seconds that may be spent at once
    bucket_refill_pct: float = 1.0  # ...refilled at this % of one core
    holdoff_s: float = 15.0  # after a fruitless burst, retunes/growth wait this long (doubling)
    max_holdoff_s: float = 3600.0
    burst_tick_s: float = 1.0  # the daemon looks again this often while bursting
    steady_tick_s: float = 10.0  # ...and this often in steady mode (the closed loop on ksmd's CPU)
    watch_s: float = 0.5  # between steady ticks, a cheap look for new guests and growth
    hz: int = 250  # the kernel's CONFIG_HZ: ksmd's sleep is rounded up to whole jiffies
    page_kib: int = 4


@dataclass(frozen=True)
class GuestMemory:
    """One guest as the law sees it: its pid, resident memory (kB) and whether any of its memory
    is opted in to KSM (``ksm_mergeable`` of /proc/PID/ksm_stat; None: the kernel does not say).

    A guest with nothing opted in (``mergeable=False``: a QEMU with mem-merge=off, a process
    that only looks like one) is no news and no candidate: ksmd never visits its memory."""

    pid: int
    rss_kib: int
    mergeable: Optional[bool] = None

    @property
    def candidate(self) -> bool:
        return self.mergeable is not False


@dataclass(frozen=True)
class KsmSample:
    """What the caller read this tick.  Counters are the kernel's cumulative values.

    ``time_s``: a monotonic clock (seconds).  ``ksmd_cpu_ns``: schedstat field 1, None when
    unreadable.  ``pages_scanned``/``cow_ksm``: None on kernels without them.  ``running``:
    the classic decision of this tick (run=1).  ``retune``: this tick was asked for
    (SIGUSR1, the libvirt hook).
    """

    time_s: float
    running: bool
    full_scans: int
    pages_shared: int = 0
    pages_sharing: int = 0
    pages_unshared: int = 0
    pages_volatile: int = 0
    ksm_zero_pages: int = 0
    pages_scanned: Optional[int] = None
    pages_skipped: Optional[int] = None
    cow_ksm: Optional[int] = None
    ksmd_cpu_ns: Optional[int] = None
    guests: Tuple[GuestMemory, ...] = ()
    retune: bool = False
    start: bool = False  # the daemon's first tick
    smart_scan: Optional[bool] = None  # /sys/kernel/mm/ksm/smart_scan (None: no such knob)

    @property
    def saved_pages(self) -> int:
        return self.pages_sharing + self.ksm_zero_pages

    @property
    def tracked_pages(self) -> int:
        """Pages ksmd has an rmap item for (visited at least once)."""
        return self.pages_shared + self.pages_sharing + self.pages_unshared + self.pages_volatile

    def candidate_pages(self, page_kib: int) -> int:
        return sum(g.rss_kib for g in self.guests if g.candidate) // page_kib

    @property
    def unmerged_tracked_pages(self) -> int:
        """Pages ksmd visited that are not merged (unique, changing, or skipped by smart scan)."""
        return self.pages_unshared + self.pages_volatile


@dataclass(frozen=True)
class ChurnHold:
    """What steady mode's churn hold (see HOLD_MAX_GROWTH) remembers between ticks."""

    phase: str = ""  # "" (not holding), "trial" (faster passes, measuring), "hold"
    since_s: float = 0.0  # the trial's start
    measure_s: float = 0.0  # ...and of its measurement, with cow_ksm then
    cow0: int = 0
    saved0: int = 0  # pages saved when the trial began
    cow_rate: Optional[float] = None  # merges broken per second while holding
    trial_cow_rate: Optional[float] = None  # ...and in the trial
    rate: Optional[float] = None  # pages per second the trial or the hold asked for
    # steady, not holding, since the last burst or hold: (time, cow_ksm, full_scans) at its
    # first pass boundary; merges broken per second since then, over whole passes only (the
    # pages a pass merges break all at once after it: a shorter window sees a spike or nothing)
    slow_mark: Optional[Tuple[float, int, int]] = None
    slow_cow_rate: Optional[float] = None
    slow_rate: Optional[float] = None  # pages per second asked for then
    fruitless: int = 0  # trials in a row that held nothing
    off_until_s: float = 0.0  # no trial before then
    reason: str = ""


@dataclass(frozen=True)
class BudgetState:
    """What the law remembers between ticks."""

    mode: Mode = Mode.STEADY
    trigger: Optional[str] = None  # why the burst under way started
    trigger_kind: str = ""  # its first trigger's kind (TRIGGER_KINDS), for the metrics
    trigger_full_scans: int = 0
    trigger_time_s: float = 0.0
    burst_passes: int = BURST_PASSES  # full passes the burst under way lasts at least
    gain_window: int = 1  # ...and the passes over which "gained next to nothing" is measured
    pass_marks: Tuple[Tuple[int, int], ...] = ()  # (full_scans, pages saved) seen since the trigger
    last: Optional[KsmSample] = None
    baseline_kib: Tuple[Tuple[int, int], ...] = ()  # (pid, rss_kib) each guest is counted as
    mark_full_scans: int = 0  # the last pass boundary seen, and the counters then
    mark_saved: int = 0
    mark_pages_scanned: Optional[int] = None
    last_pass_gain: Optional[int] = None  # pages saved gained per pass, over the last passes seen
    pass_pages: Optional[int] = None  # pages ksmd visits per full pass (measured)
    # (ksmd CPU ns, pages visited) in a decaying window, per mode: their ratio is the cost of a
    # visit (steady: mostly merged pages, cheap; burst: first visits and merges)
    steady_acc: Tuple[float, float] = (0.0, 0.0)
    burst_acc: Tuple[float, float] = (0.0, 0.0)
    steady_cpu_avg_pct: Optional[float] = None  # ksmd's CPU in steady mode, a moving average
    steady_correction: float = 1.0  # steady batches are scaled by this (the loop's integral term)
    unvisited_floor: int = 0  # unvisited pages that are not news (left after the last burst)
    cpu_pct: Optional[float] = None  # ksmd's CPU over the last tick, % of one core
    bucket_cpu_s: Optional[float] = None  # None: full
    churn_ratio: float = 0.0  # moving average of merges undone by writes / merges made
    pages_to_scan: Optional[int] = None  # what the law last asked for
    sleep_ms: Optional[int] = None
    bursts: int = 0  # bursts started (for the metrics)
    trigger_saved: int = 0  # pages saved when the burst began
    fruitless: int = 0  # bursts in a row that gained next to nothing
    holdoff_until_s: float = 0.0  # until then only a new guest starts a burst
    steady_reason: str = "nothing new to merge"
    hold: ChurnHold = ChurnHold()


@dataclass(frozen=True)
class BudgetDecision:
    mode: Mode
    reason: str  # the trigger, or why it is steady
    trigger: str  # bursting: the first trigger's kind (TRIGGER_KINDS); "" otherwise
    pages_to_scan: Optional[int]  # None: leave as it is (KSM off)
    sleep_ms: Optional[int]
    next_tick_s: Optional[float]  # when the law wants to look again; None: the interval
    cpu_pct: Optional[float]  # ksmd's measured CPU over the last tick
    target_pct: float  # the CPU this decision aims at
    unvisited_kib: int  # guest memory ksmd has no rmap item for (an estimate)
    to_merge_kib: int  # memory that may still merge: new unvisited memory, and (bursting) pages seen once
    eta_s: Optional[float]  # burst: estimated seconds until it is done
    churn_factor: float
    bucket_cpu_s: float
    cost_ns_per_page: float
    churn_hold: str = ""  # "", "trial" or "hold" (see HOLD_MAX_GROWTH)
    cow_ksm_per_s: Optional[float] = None  # merged pages broken by writes per second, last tick

    def explain(self) -> str:
        cpu = "?" if self.cpu_pct is None else f"{self.cpu_pct:.2f}"
        if self.mode is Mode.OFF:
            return "budget: KSM off"
        eta = "" if self.eta_s is None else f", done in ~{self.eta_s:.0f} s"
        return (f"budget {self.mode.value} ({self.reason}): {self.pages_to_scan} pages/"
                f"{self.sleep_ms} ms for {self.target_pct:.2f} % of a core, ksmd {cpu} %, "
                f"~{self.to_merge_kib // 1024} MiB to merge{eta}")


def sleep_wall_s(sleep_ms: int, hz: int) -> float:
    """ksmd's mean real sleep for ``sleep_ms``: msecs_to_jiffies rounds up, and the timer
    wheel fires one jiffy after that at the earliest (10 ms at HZ=250 lasts 12-16 ms,
    TUNING.md section 1), so on average ceil + 1/2 jiffies.  0 ms does not sleep at all."""
    if sleep_ms <= 0:
        return 0.0
    jiffies = math.ceil(sleep_ms * hz / 1000)
    return (jiffies + 0.5) / hz


def _bucket(state: BudgetState, s: BudgetSettings) -> float:
    return s.bucket_cpu_s if state.bucket_cpu_s is None else state.bucket_cpu_s


def _held(new: int, old: Optional[int]) -> int:
    """Keep the batch in force while it is at most HYSTERESIS below the new one (never above:
    the budget is a ceiling), so small swings in the measured cost rewrite nothing."""
    if old is not None and old > 0 and new * (1 - HYSTERESIS) <= old <= new:
        return old
    return new


def _clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


def step(sample: KsmSample, state: BudgetState, s: BudgetSettings) -> tuple[BudgetDecision, BudgetState]:
    """One tick of the budget law.  See the module docstring; docs/budget.md has the why."""
    last = state.last
    new: Dict[str, Any] = {"last": sample}
    # --- what happened since the last tick --------------------------------------------------
    dt: Optional[float] = None
    dcpu_ns: Optional[int] = None
    if last is not None and sample.time_s > last.time_s:
        dt = sample.time_s - last.time_s
        if sample.ksmd_cpu_ns is not None and last.ksmd_cpu_ns is not None:
            dcpu_ns = max(0, sample.ksmd_cpu_ns - last.ksmd_cpu_ns)
    cpu_pct = None if dt is None or dcpu_ns is None else dcpu_ns / (dt * 1e9) * 100.0
    new["cpu_pct"] = cpu_pct
    reset = last is not None and sample.full_scans < last.full_scans  # run=2 zeroes full_scans

    # cost per page visit, measured (it varies ~20x with the content: merged pages are cheap),
    # per mode, as ksmd CPU over pages visited in a decaying window: smart scan's cheap
    # all-skipped passes and the wake-ups are averaged in, in their proportion
    acc = {Mode.BURST: state.burst_acc, Mode.STEADY: state.steady_acc}
    measured_in = state.mode if state.mode is not Mode.OFF else None
    if (measured_in is not None and dt is not None and dcpu_ns is not None and last is not None and not reset
            and sample.pages_scanned is not None and last.pages_scanned is not None):
        dpages = max(0, sample.pages_scanned - last.pages_scanned)
        # a churn trial follows its own cost at once, as a burst does: it is a tenth of the slow one
        fast = measured_in is Mode.BURST or state.hold.phase == "trial"
        keep = math.exp(-dt / (BURST_COST_WINDOW_S if fast else STEADY_COST_WINDOW_S))
        cpu_acc, pages_acc = acc[measured_in]
        acc[measured_in] = (cpu_acc * keep + dcpu_ns, pages_acc * keep + dpages)
    costs = {}
    for m, prior in ((Mode.BURST, PRIOR_COST_NS_PER_PAGE), (Mode.STEADY, PRIOR_COST_NS_PER_PAGE)):
        cpu_acc, pages_acc = acc[m]
        costs[m] = cpu_acc / pages_acc if pages_acc >= 64 else prior
    new.update(burst_acc=acc[Mode.BURST], steady_acc=acc[Mode.STEADY])
    # steady ksmd CPU over the last minute or so: what the cost estimate missed is corrected
    steady_avg = state.steady_cpu_avg_pct
    if measured_in is Mode.STEADY and cpu_pct is not None and dt is not None:
        w = _clamp(dt / STEADY_CPU_WINDOW_S, 0.0, 1.0)
        steady_avg = cpu_pct if steady_avg is None else (1 - w) * steady_avg + w * cpu_pct
    new["steady_cpu_avg_pct"] = steady_avg

    # the burst bucket: refilled over time, charged with ksmd's CPU while bursting
    bucket = _bucket(state, s)
    if dt is not None:
        bucket += dt * s.bucket_refill_pct / 100.0
        if state.mode is Mode.BURST and dcpu_ns is not None:
            bucket -= dcpu_ns / 1e9
    bucket = min(bucket, s.bucket_cpu_s)
    new["bucket_cpu_s"] = bucket

    # churn: merged pages broken by writes (cow_ksm) against merges made, a moving average
    churn = state.churn_ratio
    cow_rate: Optional[float] = None  # merged pages broken per second over this tick
    if dt is not None and last is not None and sample.cow_ksm is not None and last.cow_ksm is not None and not reset:
        # merges made = net change + merges broken; broken pages that are not merged again
        # (erosion) cost no re-merging and say nothing; merged again and broken again is churn
        dcow = max(0, sample.cow_ksm - last.cow_ksm)
        cow_rate = dcow / dt
        made = max(0, sample.saved_pages - last.saved_pages + dcow)
        if made >= 16:
            w = _clamp(dt / CHURN_WINDOW_S, 0.0, 1.0)
            churn = (1 - w) * churn + w * min(1.0, dcow / made)
    new["churn_ratio"] = churn
    churn_factor = _clamp(1.0 - churn, CHURN_FLOOR, 1.0)

    # pass boundaries: gain per pass, pages per pass
    mark_scans, mark_saved, mark_scanned = state.mark_full_scans, state.mark_saved, state.mark_pages_scanned
    gain, pass_pages = state.last_pass_gain, state.pass_pages
    if last is None or reset:
        mark_scans, mark_saved, mark_scanned = sample.full_scans, sample.saved_pages, sample.pages_scanned
        gain = None
    elif sample.full_scans > mark_scans:
        passes = sample.full_scans - mark_scans
        gain = max(0, sample.saved_pages - mark_saved) // passes
        if sample.pages_scanned is not None and mark_scanned is not None:
            pass_pages = max(1, (sample.pages_scanned - mark_scanned) // passes)
        mark_scans, mark_saved, mark_scanned = sample.full_scans, sample.saved_pages, sample.pages_scanned
    new.update(mark_full_scans=mark_scans, mark_saved=mark_saved, mark_pages_scanned=mark_scanned,
               last_pass_gain=gain, pass_pages=pass_pages)

    # --- triggers ------------------------------------------------------------------------------
    baseline = dict(state.baseline_kib)
    triggers = []  # new guests: always a burst
    soft = []  # growth, retunes, unvisited memory: held off after fruitless bursts
    held_off = sample.time_s < state.holdoff_until_s and state.mode is not Mode.BURST
    # only guests with memory opted in to KSM count, and only once they are big enough to matter:
    # a process that merely looks like a guest (nothing opted in, a few MiB) is no news
    now_guests = {g.pid: g.rss_kib for g in sample.guests if g.candidate}
    if last is None:
        baseline = dict(now_guests)  # the first tick: only unvisited memory counts (below)
    else:
        fresh = {pid: rss for pid, rss in now_guests.items() if pid not in baseline}
        if sum(fresh.values()) >= s.growth_kib:
            for pid, rss in fresh.items():
                triggers.append(f"new guest {pid} ({rss // 1024} MiB)")
                baseline[pid] = rss
        for pid, rss in now_guests.items():
            if pid not in baseline:
                continue  # too small yet: counted as new once the new ones add up to growth_kib
            elif rss - baseline[pid] >= s.growth_kib:
                soft.append(f"guest {pid} grew by {(rss - baseline[pid]) // 1024} MiB")
                if not held_off:  # else counted again once the holdoff is over
                    baseline[pid] = rss
            else:
                baseline[pid] = min(baseline[pid], rss)  # shrinking re-arms the growth trigger
        baseline = {pid: kib for pid, kib in baseline.items() if pid in now_guests}
    if sample.retune:
        soft.append("retune")
    candidates = sample.candidate_pages(s.page_kib)
    unvisited = max(0, candidates - sample.tracked_pages)
    unvisited_kib = unvisited * s.page_kib
    # QEMU's own heap and file pages are never tracked, nor memory not opted in: only a large
    # gap that was not there after the last burst is news
    floor = min(state.unvisited_floor, unvisited)
    if (state.mode is not Mode.BURST and sample.running and (unvisited - floor) * s.page_kib >= s.growth_kib
            and unvisited * 4 >= candidates):
        soft.append(f"{unvisited_kib // 1024} MiB not yet visited by ksmd")
    new["baseline_kib"] = tuple(sorted(baseline.items()))
    ignored = None
    if soft and held_off:
        ignored = (f"{'; '.join(soft)} ignored for {state.holdoff_until_s - sample.time_s:.0f} s more "
                   f"({state.fruitless} fruitless bursts)")
    elif soft:
        triggers += soft

    # --- the mode ------------------------------------------------------------------------------
    mode, reason = state.mode, state.trigger
    trig_scans, trig_time, bursts = state.trigger_full_scans, state.trigger_time_s, state.bursts
    trig_saved, fruitless, holdoff_until = state.trigger_saved, state.fruitless, state.holdoff_until_s
    steady_reason = state.steady_reason
    kind = state.trigger_kind
    min_passes, window, marks = state.burst_passes, state.gain_window, state.pass_marks
    if reset and mode is Mode.BURST:
        trig_scans = sample.full_scans
        marks = ()
    if not sample.running:
        mode, reason = Mode.OFF, "KSM off"
    else:
        small = max(MIN_GAIN_PAGES, sample.tracked_pages // 1000)
        if triggers:
            if mode is not Mode.BURST:
                bursts += 1
                trig_saved = sample.saved_pages
                min_passes, window = BURST_PASSES, 1
            # old pages that never merged are visited only every SMART_SCAN_PASSES-th pass: the new
            # memory may duplicate them, so the burst lasts until each was visited beside it
            if sample.smart_scan and sample.unmerged_tracked_pages > small:
                min_passes, window = BURST_PASSES + SMART_SCAN_PASSES, SMART_SCAN_PASSES
            mode, reason = Mode.BURST, "; ".join(triggers)
            kind = _kind(triggers[0])
            trig_scans, trig_time = sample.full_scans, sample.time_s
            marks = ((sample.full_scans, sample.saved_pages),)
        elif mode is Mode.OFF:
            mode = Mode.STEADY
        elif mode is Mode.BURST:
            passes = sample.full_scans - trig_scans
            if not marks or sample.full_scans > marks[-1][0]:
                marks = (marks + ((sample.full_scans, sample.saved_pages),))[-MAX_PASS_MARKS:]
            if window > 1:  # the gain over the last `window` passes, from the latest mark before them
                before = [saved for scans, saved in marks if scans <= sample.full_scans - window]
                window_gain: Optional[int] = max(0, sample.saved_pages - before[-1]) if before else None
            else:
                window_gain = gain
            if passes >= min_passes and window_gain is not None and window_gain <= small:
                mode = Mode.STEADY
                floor = unvisited  # what one whole burst left unvisited is not news next time
                gained = sample.saved_pages - trig_saved
                if gained <= small:  # a false trigger: the next soft ones wait, longer each time
                    fruitless += 1
                    holdoff_until = sample.time_s + min(s.max_holdoff_s, s.holdoff_s * 2 ** (fruitless - 1))
                else:
                    fruitless = 0
                steady_reason = (f"burst done after {passes} passes, {sample.time_s - trig_time:.1f} s, "
                                 f"gained {gained * s.page_kib // 1024} MiB")
        if mode is Mode.STEADY:
            reason = steady_reason if ignored is None else f"{steady_reason}; {ignored}"
    new["unvisited_floor"] = floor
    if mode is not Mode.BURST:
        kind = ""
    new.update(mode=mode, trigger=reason if mode is Mode.BURST else None, trigger_kind=kind,
               trigger_full_scans=trig_scans,
               trigger_time_s=trig_time, burst_passes=min_passes, gain_window=window,
               pass_marks=marks if mode is Mode.BURST else (), bursts=bursts, trigger_saved=trig_saved, fruitless=fruitless,
               holdoff_until_s=holdoff_until, steady_reason=steady_reason)

    # --- how hard ------------------------------------------------------------------------------
    est_pass_pages = max(pass_pages or 0, sample.tracked_pages + unvisited, 1)
    correction = state.steady_correction  # moved only in steady mode, below
    eta = None
    cost = costs[Mode.STEADY]
    if mode is Mode.OFF:
        pages, sleep_ms, target, next_tick = None, None, 0.0, None
    elif mode is Mode.BURST:
        target = s.burst_pct if bucket > 0 else min(s.burst_pct, max(s.steady_pct, s.bucket_refill_pct))
        if bucket <= 0:
            reason = f"{reason}; throttled, burst budget spent"
        sleep_ms = s.burst_sleep_ms
        frac = _clamp(target / 100.0, 0.0, 0.99)
        # ksmd is busy for batch * cost, then sleeps: duty = busy / (busy + sleep)
        busy_s = frac / (1.0 - frac) * sleep_wall_s(sleep_ms, s.hz)
        cost = costs[Mode.BURST]
        pages = int(_clamp(busy_s * 1e9 / cost, MIN_BATCH_PAGES, MAX_BATCH_PAGES))
        pages = _held(pages, state.pages_to_scan if state.mode is Mode.BURST else None)
        next_tick = s.burst_tick_s
        rate = pages / (pages * cost / 1e9 + sleep_wall_s(sleep_ms, s.hz))  # pages per second
        passes_left = max(1, min_passes - (sample.full_scans - trig_scans))
        eta = passes_left * est_pass_pages / rate
    else:
        held, steady_avg, correction = _hold(sample, state, s, dt, cow_rate, churn, steady_avg, correction)
        new["steady_cpu_avg_pct"] = steady_avg
        hold, hold_text = held.phase, held.reason
        holding = hold != ""
        target = s.churn_pct if holding else s.steady_pct * churn_factor
        if (measured_in is Mode.STEADY and steady_avg is not None and dt is not None and steady_avg > 0
                and abs(math.log(target / steady_avg)) > math.log(1 + STEADY_DEAD_BAND)):
            # integral: log(correction) moves by log(target / measured) per window, outside a
            # dead band (the measured CPU wobbles by a few percent: that rewrites nothing)
            w = _clamp(dt / STEADY_CPU_WINDOW_S, 0.0, 1.0)
            correction = _clamp(correction * (target / steady_avg) ** w, MIN_STEADY_CORRECTION, 1.0)
        sleep_ms = s.steady_sleep_ms
        cost = costs[Mode.STEADY]
        cycle_s = sleep_wall_s(sleep_ms, s.hz)
        budget_rate = target / 100.0 * 1e9 / cost  # pages per second the CPU budget pays for
        pass_s = s.min_pass_s
        if hold == "trial":
            pass_s = min(s.min_pass_s, HOLD_MIN_PASS_S)
        elif hold == "hold":
            pass_s = hold_pass_s(sample.saved_pages, max(held.cow_rate or 0.0, held.trial_cow_rate or 0.0), s)
        cap_rate = est_pass_pages / pass_s  # merged memory re-scanned at most this often
        rate = min(budget_rate, cap_rate)
        if hold_text:
            reason = f"{reason}; {hold_text}" if reason else hold_text
        if cap_rate < budget_rate:
            reason_cap = f"capped at one pass per {pass_s:.{1 if holding else 0}f} s"
            reason = f"{reason}; {reason_cap}" if reason else reason_cap
        target_expected = min(target, rate * cost / 1e7)  # the CPU it is expected to cost, %
        if steady_avg is not None and steady_avg > target:
            rate *= max(0.25, target / steady_avg)  # proportional: at once
        rate *= correction
        new["hold"] = replace(held, rate=rate) if holding else replace(held, slow_rate=rate)
        target = target_expected
        pages = int(_clamp(rate * cycle_s, MIN_BATCH_PAGES, MAX_BATCH_PAGES))
        pages = _held(pages, state.pages_to_scan if state.mode is Mode.STEADY else None)
        next_tick = s.steady_tick_s
    if mode is not Mode.STEADY:
        new["hold"] = replace(state.hold, phase="", slow_mark=None, slow_cow_rate=None, reason="")
    new["steady_correction"] = correction
    new.update(pages_to_scan=pages if pages is not None else state.pages_to_scan,
               sleep_ms=sleep_ms if sleep_ms is not None else state.sleep_ms)
    decision = BudgetDecision(
        mode=mode, reason=reason or "", trigger=kind, pages_to_scan=pages, sleep_ms=sleep_ms, next_tick_s=next_tick,
        cpu_pct=cpu_pct, target_pct=target, unvisited_kib=unvisited_kib, eta_s=eta,
        to_merge_kib=(max(0, unvisited - floor) + (sample.pages_volatile if mode is Mode.BURST else 0)) * s.page_kib,
        churn_factor=churn_factor, bucket_cpu_s=bucket, cost_ns_per_page=cost,
        churn_hold=new["hold"].phase, cow_ksm_per_s=cow_rate,
    )
    return decision, replace(state, **new)


def hold_pass_s(saved_pages: int, cow_rate: Optional[float], s: BudgetSettings) -> float:
    """Holding churn: one pass per this long keeps the pages waiting to be merged again (a
    broken page waits half a pass on average: cow_rate * pass / 2) under HOLD_LOSS of those
    saved; never faster than HOLD_MIN_PASS_S, never slower than min_pass_s."""
    if not cow_rate or cow_rate <= 0:
        return s.min_pass_s
    return _clamp(2.0 * HOLD_LOSS * max(1, saved_pages) / cow_rate, min(HOLD_MIN_PASS_S, s.min_pass_s), s.min_pass_s)


def _hold(sample: KsmSample, state: BudgetState, s: BudgetSettings, dt: Optional[float],
          cow_rate: Optional[float], churn: float, steady_avg: Optional[float],
          correction: float) -> Tuple[ChurnHold, Optional[float], float]:
    """Steady mode's churn hold (see HOLD_MAX_GROWTH): the hold after this tick (its phase, its
    words for the reason), and the steady CPU average and correction (both start afresh when
    holding starts or stops: the regimes' costs differ tenfold)."""
    was_steady = state.mode is Mode.STEADY
    h = state.hold
    hold = h.phase if was_steady else ""
    slow_mark = h.slow_mark if was_steady else None
    slow_cow = h.slow_cow_rate if was_steady else None
    cow_hold, since, cow0, measure = h.cow_rate, h.since_s, h.cow0, h.measure_s
    cow_trial, saved0 = h.trial_cow_rate, h.saved0
    fruitless, off_until, text = h.fruitless, h.off_until_s, h.reason
    small = max(MIN_GAIN_PAGES, sample.tracked_pages // 1000)
    start = stop = False
    last = state.last
    if hold == "" and was_steady and sample.cow_ksm is not None and last is not None:
        if slow_mark is None or sample.full_scans < slow_mark[2]:  # none yet, or run=2 reset the counters
            slow_mark, slow_cow = None, None
            if sample.full_scans > last.full_scans:
                slow_mark = (sample.time_s, sample.cow_ksm, sample.full_scans)
        elif sample.full_scans > last.full_scans and sample.time_s - slow_mark[0] >= CHURN_WINDOW_S:
            slow_cow = max(0, sample.cow_ksm - slow_mark[1]) / (sample.time_s - slow_mark[0])
    if hold == "":
        if (s.churn_pct > 0 and sample.cow_ksm is not None and slow_cow is not None
                and churn >= HOLD_MIN_CHURN and slow_cow * s.min_pass_s >= small and sample.time_s >= off_until):
            hold, since, measure, cow0, start = "trial", sample.time_s, math.inf, sample.cow_ksm, True
            saved0 = sample.saved_pages
            text = f"churn: {slow_cow:.0f} merged pages/s broken, trying faster passes"
        elif text and (not text.startswith("churn not held") or sample.time_s >= off_until):
            text = ""
    elif hold == "trial" and sample.cow_ksm is not None:
        if measure == math.inf and sample.time_s - since >= HOLD_SETTLE_S:
            measure, cow0 = sample.time_s, sample.cow_ksm
        elif measure < sample.time_s and sample.time_s - since >= HOLD_TRIAL_S:
            r = max(0, sample.cow_ksm - cow0) / (sample.time_s - measure)
            growth = r / max(slow_cow or 0.0, 1e-9)
            speedup = (h.rate or 0.0) / max(h.slow_rate or 0.0, 1e-9)
            gain = sample.saved_pages - saved0
            outlive = growth <= HOLD_MAX_GROWTH * speedup
            if speedup >= HOLD_MIN_SPEEDUP and (outlive or gain >= max(small, HOLD_MIN_GAIN * saved0)):
                hold, cow_hold, cow_trial, fruitless = "hold", r, r, 0
                why = "re-merges outlive passes" if outlive else f"{gain} pages more saved"
                text = f"holding churn: {r:.0f} merged pages/s broken, {growth:.1f}x for {speedup:.0f}x the passes: {why}"
            else:
                fruitless += 1
                retry_s = min(s.max_holdoff_s, HOLD_RETRY_S * 2 ** (fruitless - 1))
                off_until, stop = sample.time_s + retry_s, True
                why = (f"re-merges grew {growth:.1f}x with {speedup:.1f}x the passes" if speedup >= HOLD_MIN_SPEEDUP
                       else f"the churn budget buys only {speedup:.1f}x the passes")
                text = f"churn not held: {why}; tried again in {retry_s:.0f} s"
    elif hold == "hold" and dt is not None and cow_rate is not None:
        w = _clamp(dt / HOLD_RATE_WINDOW_S, 0.0, 1.0)
        cow_hold = cow_rate if cow_hold is None else (1 - w) * cow_hold + w * cow_rate
        if cow_hold <= HOLD_EXIT_SHARE * (cow_trial or 0.0):
            stop, text = True, f"churn over: {cow_hold:.0f} merged pages/s broken, {cow_trial:.0f} in the trial"
        else:
            text = f"holding churn: {cow_hold:.0f} merged pages/s broken"
    if stop:
        hold, slow_mark, slow_cow, cow_hold, cow_trial = "", None, None, None, None
    if start or stop:
        steady_avg, correction = None, 1.0
    held = replace(h, phase=hold, since_s=since, measure_s=measure, cow0=cow0, cow_rate=cow_hold,
                   trial_cow_rate=cow_trial, saved0=saved0, slow_mark=slow_mark, slow_cow_rate=slow_cow,
                   fruitless=fruitless, off_until_s=off_until, reason=text)
    return held, steady_avg, correction


def steady_start(s: BudgetSettings) -> tuple[int, int]:
    """(pages_to_scan, sleep_ms) the daemon writes at start, before it has measured anything:
    a steady batch at the prior cost, so a daemon killed mid-burst and restarted puts ksmd
    back to a small cost at once."""
    rate = s.steady_pct / 100.0 * 1e9 / PRIOR_COST_NS_PER_PAGE
    return int(_clamp(rate * sleep_wall_s(s.steady_sleep_ms, s.hz), MIN_BATCH_PAGES, MAX_BATCH_PAGES)), s.steady_sleep_ms
