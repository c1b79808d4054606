"""A ksmd simulator: what the budget law is tested against when the kernel cannot be made to
do a thing on demand (a 10-minute steady state in a second, a host of 3 x 256 MiB guests
with chosen content, churn at a chosen rate).

It follows mm/ksm.c (6.12 era) where it matters to a tuner (TUNING.md section 1):

- ksmd wakes, visits up to ``pages_to_scan`` pages, sleeps ``sleep_millisecs`` rounded up to
  whole jiffies, plus one jiffy of the timer wheel (10 ms at HZ=250 sleeps 12-16 ms); 0 ms
  does not sleep.  Writing ``sleep_millisecs`` wakes it at once, ``pages_to_scan`` does not.
- A batch ends early at the end of a pass (``full_scans`` += 1); the unstable tree is rebuilt
  every pass.
- Every page needs two visits (cmp_and_merge_page): a visit to a page that is not a KSM page
  first compares its checksum with the last visit's, and if it changed (a first visit, or a
  page written since) only records it.  A later visit whose checksum matches searches the
  stable tree (a page equal to a KSM page merges with it), then the unstable tree, and merges
  with an equal page found there (both become one KSM page in the stable tree).
- A new process is inserted just behind the cursor: the pass under way skips it.
- Smart scan: a visit to a page that is not a KSM page ages it (its rmap item's ``age``);
  from age 3 it is skipped more and more (every 2nd, 3rd, 5th, then 9th pass), never while it
  is a KSM page; skipped pages do not count against the batch.  The age is never reset: a page
  merged, broken by a write and merged again keeps aging, so churned pages end up visited only
  every 9th pass (the age counts "scan iterations since creation" of the rmap item).
- A write to a merged page breaks it (``cow_ksm``).

Costs are per visit by outcome, and per wake-up (:class:`Costs`, calibrated from
measurements on this machine: TUNING.md section 3, /work/coord/calibration.md).  ksmd is
assumed to get a CPU whenever it wants one, so its busy time is its wall time.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Callable, List, Optional

ZERO = 0  # the content id of a zero-filled page
PAGE_KIB = 4
_unique_ids = itertools.count(1 << 40)


def unique_id() -> int:
    return next(_unique_ids)


@dataclass(frozen=True)
class Costs:
    """ksmd's CPU per event, ns: /work/coord/calibration.md (budgetbench, this machine,
    kernel 6.18, 2026-12-02; +-50 %, content-dependent), which measured per visit over the two
    merge passes 1370 (zero), 1670-1880 (identical) and 2280-2460 ns (unique), so with a
    ~1000 ns first visit, 1700-2700 for a merging second visit and ~3700 for a unique one."""

    wakeup: float = 17_000  # 12-20 us per wake-up (fit intercepts 18-27 us)
    revisit_merged: float = 180  # 0.16-0.20 us per re-visit of a KSM page
    checksum: float = 1_000  # a first visit, or a page that changed since the last one
    unique: float = 3_700  # a stable unique page: checksum, stable and unstable tree searches
    merge: float = 2_200  # a merge (with a KSM page, or with a page of the unstable tree)
    skip: float = 100  # a page smart scan skips (not measured alone: small)


def skip_age(age: int) -> int:
    """mm/ksm.c skip_age(): how many passes a fruitless page is skipped next."""
    if age <= 3:
        return 1
    if age <= 5:
        return 2
    if age <= 8:
        return 4
    return 8


class Proc:
    """One process's mergeable memory: a content id per page."""

    def __init__(self, contents: List[int], name: str = "", pid: int = 0):
        self.name = name
        self.pid = pid
        n = len(contents)
        self.content = list(contents)
        self.rmap = bytearray(n)  # 1: ksmd has an rmap item for the page (visited once)
        self.chk = [None] * n  # the checksum (content) at the last visit
        self.ksm = bytearray(n)  # 1: the page is a KSM page (merged)
        self.age = bytearray(n)
        self.skips = bytearray(n)
        self.extra_rss_kib = 0  # resident memory KSM never sees (QEMU's own heap, file pages)

    @property
    def pages(self) -> int:
        return len(self.content)

    @property
    def rss_kib(self) -> int:
        return self.pages * PAGE_KIB + self.extra_rss_kib


class Ksmd:
    def __init__(self, hz: int = 250, costs: Costs = Costs(), smart_scan: bool = True):
        self.hz = hz
        self.costs = costs
        self.smart_scan = smart_scan
        self.now_ns = 0.0
        self.run = 0
        self.pages_to_scan = 100
        self.sleep_millisecs = 20
        self.procs: List[Proc] = []  # the mm list, in scan order
        self.cursor_proc: Optional[Proc] = None  # None: at the list head (between passes)
        self.cursor_page = 0
        self.stable: dict = {}  # content -> number of pages mapping this KSM page
        self.unstable: dict = {}  # content -> (proc, index), this pass
        self.full_scans = 0
        self.pages_scanned = 0
        self.pages_skipped = 0
        self.cow_ksm = 0
        self.cpu_ns = 0.0
        self.wakeups = 0
        self._shared = self._sharing = self._tracked = 0  # kept as they change: read every tick
        self._left_in_batch = 0  # pages still to visit in the batch under way
        self._wake_at: Optional[float] = 0.0  # None: asleep until a write (run=0)
        self._slept_with: Optional[int] = None

    # --- the sysfs interface ----------------------------------------------------------------
    def write(self, name: str, value: int) -> None:
        value = int(value)
        if name == "pages_to_scan":
            self.pages_to_scan = value
        elif name == "sleep_millisecs":
            changed = value != self.sleep_millisecs
            self.sleep_millisecs = value
            if changed and self._left_in_batch == 0 and self._wake_at is not None:
                self._wake_at = min(self._wake_at, self.now_ns)  # the wait condition: woken now
        elif name == "run":
            if value == 2:
                self._unmerge_all()
                value = 0
            was = self.run
            self.run = value
            if value == 1 and was != 1:
                self._wake_at = self.now_ns
        else:
            raise KeyError(name)

    def read(self, name: str) -> int:
        return int(getattr(self, name) if name in ("run", "pages_to_scan", "sleep_millisecs") else self.counters()[name])

    def counters(self) -> dict:
        shared, sharing, tracked = self._shared, self._sharing, self._tracked
        unshared = len(self.unstable)
        return {
            "full_scans": self.full_scans, "pages_shared": shared, "pages_sharing": sharing,
            "pages_unshared": unshared, "pages_volatile": max(0, tracked - shared - sharing - unshared),
            "pages_scanned": self.pages_scanned, "pages_skipped": self.pages_skipped,
            "ksm_zero_pages": 0, "cow_ksm": self.cow_ksm,
        }

    def _unmerge_all(self) -> None:
        for p in self.procs:
            for i in range(p.pages):
                p.ksm[i] = 0
                p.rmap[i] = 0
                p.chk[i] = None
                p.age[i] = 0
                p.skips[i] = 0
        self.stable.clear()
        self.unstable.clear()
        self._shared = self._sharing = self._tracked = 0
        self.full_scans = 0
        self.cursor_proc, self.cursor_page = None, 0

    # --- processes --------------------------------------------------------------------------
    def add(self, proc: Proc) -> Proc:
        """madvise(MADV_MERGEABLE): inserted just behind the cursor (at the end between passes)."""
        if self.cursor_proc is None:
            self.procs.append(proc)
        else:
            self.procs.insert(self.procs.index(self.cursor_proc), proc)
        return proc

    def remove(self, proc: Proc) -> None:
        for i in range(proc.pages):
            if proc.ksm[i]:
                self._drop_ksm(proc.content[i])
        if self.cursor_proc is proc:
            k = self.procs.index(proc)
            nxt = self.procs[k + 1] if k + 1 < len(self.procs) else None
            self.cursor_proc, self.cursor_page = nxt, 0
        self.procs.remove(proc)
        self._tracked -= sum(proc.rmap)
        for c, (p, i) in list(self.unstable.items()):
            if p is proc:
                del self.unstable[c]

    def _drop_ksm(self, content: int) -> None:
        n = self.stable.get(content, 0) - 1
        if n <= 0:
            self.stable.pop(content, None)
            self._shared -= 1
        else:
            self.stable[content] = n
            self._sharing -= 1

    def age_unmerged(self, proc: Proc, seed: int = 3) -> None:
        """Leave ``proc``'s visited, unmerged pages as hours of scanning would: the oldest age, each
        somewhere in its 8-pass skip (a shortcut for thousands of simulated passes)."""
        rng = random.Random(seed)
        for i in range(proc.pages):
            if proc.rmap[i] and not proc.ksm[i]:
                proc.age[i] = 255
                proc.skips[i] = rng.randrange(skip_age(255) + 1)

    def rewrite(self, proc: Proc, index: int, content: int) -> None:
        """A write to a page: a merged page is copied first (cow_ksm)."""
        if proc.ksm[index]:
            proc.ksm[index] = 0
            self.cow_ksm += 1
            self._drop_ksm(proc.content[index])
        proc.content[index] = content

    # --- the thread -------------------------------------------------------------------------
    def _sleep_ns(self, at_ns: float) -> Optional[float]:
        ms = self.sleep_millisecs
        jiffy = 1e9 / self.hz
        n = math.ceil(ms * self.hz / 1000)
        if n == 0:
            return at_ns
        return (math.floor(at_ns / jiffy) + n + 1) * jiffy

    def advance(self, until_s: float) -> None:
        """Let ksmd run until ``until_s`` (simulated seconds)."""
        until = until_s * 1e9
        while self.now_ns < until:
            if self._left_in_batch == 0:
                if not self.run:
                    self.now_ns = until
                    return
                if self._wake_at is None or self._wake_at > until:
                    self.now_ns = until
                    return
                # a wake-up
                self.now_ns = max(self.now_ns, self._wake_at)
                self.wakeups += 1
                self._spend(self.costs.wakeup)
                self._left_in_batch = max(1, self.pages_to_scan)
                if not self.procs:
                    self._left_in_batch = 0
            if self._left_in_batch:
                self._batch(until)
            if self._left_in_batch == 0:
                self._wake_at = self._sleep_ns(self.now_ns)

    def _spend(self, ns: float) -> None:
        self.cpu_ns += ns
        self.now_ns += ns

    def _batch(self, until: float) -> None:
        """The batch under way, until it is done, its pass ends or ``until`` (ns), page by page:
        the next page smart scan does not skip, then its visit (the stable tree first, then the
        checksum, then the unstable tree).  The simulator's hot loop: its state is in locals."""
        costs = self.costs
        c_skip, c_rev, c_merge, c_chk, c_uniq = (costs.skip, costs.revisit_merged, costs.merge, costs.checksum,
                                                 costs.unique)
        smart = self.smart_scan
        stable, unstable, procs = self.stable, self.unstable, self.procs
        now, cpu, left = self.now_ns, self.cpu_ns, self._left_in_batch
        scanned, skipped, tracked = self.pages_scanned, self.pages_skipped, self._tracked
        shared, sharing = self._shared, self._sharing
        p, i = self.cursor_proc, self.cursor_page
        if p is not None:
            content, rmap, ksm, age_, skips, chk, n = p.content, p.rmap, p.ksm, p.age, p.skips, p.chk, len(p.content)
        while left and now < until:
            found = False
            while True:  # the next page that is not skipped (skips take no part of the batch)
                if p is None:  # the start of a pass
                    if not procs:
                        break
                    unstable.clear()
                    p, i = procs[0], 0
                    content, rmap, ksm, age_, skips, chk, n = (p.content, p.rmap, p.ksm, p.age, p.skips, p.chk,
                                                               len(p.content))
                if i >= n:
                    k = procs.index(p)
                    if k + 1 < len(procs):
                        p, i = procs[k + 1], 0
                        content, rmap, ksm, age_, skips, chk, n = (p.content, p.rmap, p.ksm, p.age, p.skips, p.chk,
                                                                   len(p.content))
                        continue
                    p, i = None, 0
                    self.full_scans += 1
                    break
                j = i
                i += 1
                if not rmap[j]:
                    rmap[j] = 1
                    tracked += 1
                merged = ksm[j]
                if smart and not merged:
                    age = age_[j]
                    if age < 255:
                        age_[j] = age + 1
                    if age >= 3:
                        if skips[j] == 0:
                            skips[j] = skip_age(age)
                        else:
                            skips[j] -= 1
                            skipped += 1
                            cpu += c_skip
                            now += c_skip
                            continue
                found = True
                break
            if not found:  # the pass ended: so does the batch
                left = 0
                break
            scanned += 1
            left -= 1
            # compare and merge
            if merged:
                cpu += c_rev
                now += c_rev
                continue
            c = content[j]
            if chk[j] != c:  # first visit, or changed since the last: only note the checksum
                chk[j] = c
                cpu += c_chk
                now += c_chk
                continue
            if stable.get(c, 0) > 0:  # then the stable tree, then the unstable one
                stable[c] += 1
                sharing += 1
                ksm[j] = 1
                cpu += c_merge
                now += c_merge
                continue
            other = unstable.get(c)
            if other is not None:
                q, m = other
                if q.content[m] == c and not q.ksm[m] and (q is not p or m != j):
                    del unstable[c]
                    stable[c] = 2
                    shared += 1
                    sharing += 1
                    ksm[j] = q.ksm[m] = 1
                    cpu += c_merge
                    now += c_merge
                    continue
            unstable[c] = (p, j)
            cpu += c_uniq
            now += c_uniq
        self.now_ns, self.cpu_ns, self._left_in_batch = now, cpu, left
        self.pages_scanned, self.pages_skipped, self._tracked = scanned, skipped, tracked
        self._shared, self._sharing = shared, sharing
        self.cursor_proc, self.cursor_page = p, i


# --- workloads ------------------------------------------------------------------------------

def guest_contents(pages: int, common: float, zero: float, pattern_seed: int = 1) -> List[int]:
    """A guest's RAM as a private copy of a pattern: ``common`` of its pages equal to the same
    page of every other guest built with the same seed, ``zero`` zero pages, the rest unique."""
    rng = random.Random(pattern_seed)
    out = []
    for k in range(pages):
        r = rng.random()
        if r < common:
            out.append((pattern_seed << 32) + k + 1)
        elif r < common + zero:
            out.append(ZERO)
        else:
            out.append(unique_id())
    return out


@dataclass
class Host:
    """ksmd plus a guest list, as the daemon would sample it."""

    ksmd: Ksmd
    guests: List[Proc] = field(default_factory=list)
    next_pid: int = 1000

    def start_guest(self, pages: int, common: float = 0.6, zero: float = 0.1, extra_kib: int = 0,
                    name: str = "") -> Proc:
        self.next_pid += 1
        p = Proc(guest_contents(pages, common, zero), name=name, pid=self.next_pid)
        p.extra_rss_kib = extra_kib
        self.guests.append(p)
        self.ksmd.add(p)
        return p

    def stop_guest(self, p: Proc) -> None:
        self.guests.remove(p)
        self.ksmd.remove(p)

    def mergeable_pages(self) -> int:
        """The most pages_sharing can reach: pages minus one per distinct content."""
        seen = set()
        total = 0
        for p in self.guests:
            for c in p.content:
                total += 1
                seen.add(c)
        return total - len(seen)


class Churner:
    """Rewrites ``per_s`` random pages of a process each second (of its first ``pool`` pages):
    with new unique data, or (``same=True``) with the data they held, so ksmd merges them
    again and they break again."""

    def __init__(self, host: Host, proc: Proc, per_s: float, seed: int = 7, same: bool = False,
                 pool: Optional[int] = None):
        self.host, self.proc, self.per_s, self.same = host, proc, per_s, same
        self.pool = proc.pages if pool is None else min(pool, proc.pages)  # the first `pool` pages
        self.rng = random.Random(seed)
        self._owed = 0.0

    def run_for(self, dt_s: float) -> None:
        self._owed += self.per_s * dt_s
        n = int(self._owed)
        self._owed -= n
        for _ in range(n):
            i = self.rng.randrange(self.pool)
            self.host.ksmd.rewrite(self.proc, i, self.proc.content[i] if self.same else unique_id())


Hook = Callable[[float], None]


# --- tuners driving the simulator -------------------------------------------------------------

class Run:
    """A scenario's time line: ksmd, the tuner's ticks, events at given times, and samples."""

    def __init__(self, host: Host, tuner: "Tuner", churners: Optional[List[Churner]] = None,
                 sample_every_s: float = 0.1):
        self.host, self.tuner = host, tuner
        self.churners = churners or []
        self.events: List[tuple] = []  # (time_s, fn)
        self.sample_every_s = sample_every_s
        self.series: List[tuple] = []  # (t, saved pages, ksmd cpu ns)
        self.t = 0.0

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self.events.append((t, fn))
        self.events.sort(key=lambda e: e[0])

    def until(self, end_s: float) -> "Run":
        k = self.host.ksmd
        next_sample = self.t
        next_churn = math.floor(self.t) + 1.0
        while self.t < end_s:
            nxt = min(end_s, next_sample, next_churn, self.tuner.next_tick_s,
                      self.events[0][0] if self.events else end_s)
            k.advance(nxt)
            self.t = nxt
            while self.events and self.events[0][0] <= self.t:
                _, fn = self.events.pop(0)
                fn()
            if self.t >= next_churn:
                for c in self.churners:
                    c.run_for(1.0)
                next_churn += 1.0
            if self.t >= self.tuner.next_tick_s:
                self.tuner.tick(self.t)
            if self.t >= next_sample:
                self.series.append((self.t, k._sharing, k.cpu_ns))
                next_sample += self.sample_every_s
        return self

    # --- what the benchmark reports --------------------------------------------------------
    def time_to(self, pages: float, since_s: float = 0.0) -> Optional[float]:
        for t, saved, _ in self.series:
            if t >= since_s and saved >= pages:
                return t - since_s
        return None

    def cpu_s(self, start_s: float, end_s: float) -> float:
        a = b = None
        for t, _, cpu in self.series:
            if a is None and t >= start_s:
                a = cpu
            if t <= end_s:
                b = cpu
        return ((b or 0) - (a or 0)) / 1e9

    def cpu_pct(self, start_s: float, end_s: float) -> float:
        return self.cpu_s(start_s, end_s) / (end_s - start_s) * 100.0

    def saved(self) -> int:
        return self.host.ksmd._sharing


class Tuner:
    next_tick_s = math.inf

    def tick(self, t: float) -> None:
        pass


class Fixed(Tuner):
    """Writes one setting at t=0 (flat out, classic max, kernel defaults)."""

    def __init__(self, ksmd: Ksmd, pages_to_scan: int, sleep_ms: int):
        ksmd.write("pages_to_scan", pages_to_scan)
        ksmd.write("sleep_millisecs", sleep_ms)
        ksmd.write("run", 1)


class Budget(Tuner):
    """The budget law as the daemon runs it: steady values at start, then a tick whenever the
    law asks (burst ticks, the steady watch), writing only what changed, in the daemon's order."""

    def __init__(self, host: Host, settings, interval_s: float = 60.0):
        from ksmtuned.core import budget
        self.b = budget
        self.host, self.settings, self.interval_s = host, settings, interval_s
        self.state = budget.BudgetState()
        self.decisions: List[tuple] = []  # (t, decision)
        self.writes: List[tuple] = []  # (t, name, value)
        self.retune_next = False
        pages, sleep_ms = budget.steady_start(settings)
        self._write("pages_to_scan", pages, 0.0)
        self._write("sleep_millisecs", sleep_ms, 0.0)
        self._write("run", 1, 0.0)
        self.next_tick_s = 0.0
        self._law_due = 0.0
        self._watch_due: Optional[float] = None
        self._armed: dict = {}
        self.watches = 0
        self._first = True

    def _write(self, name: str, value: int, t: float) -> None:
        k = self.host.ksmd
        if k.read(name) != value:
            k.write(name, value)
            self.writes.append((t, name, value))

    def sample(self, t: float):
        c = self.host.ksmd.counters()
        return self.b.KsmSample(
            time_s=t, running=True, full_scans=c["full_scans"], pages_shared=c["pages_shared"],
            pages_sharing=c["pages_sharing"], pages_unshared=c["pages_unshared"],
            pages_volatile=c["pages_volatile"], pages_scanned=c["pages_scanned"],
            pages_skipped=c["pages_skipped"], cow_ksm=c["cow_ksm"], ksmd_cpu_ns=int(self.host.ksmd.cpu_ns),
            guests=tuple(self.b.GuestMemory(p.pid, p.rss_kib, True) for p in self.host.guests),
            retune=self.retune_next, start=self._first, smart_scan=self.host.ksmd.smart_scan)

    def _guests_now(self) -> dict:
        return {p.pid: p.rss_kib for p in self.host.guests}

    def tick(self, t: float) -> None:
        if self._watch_due is not None and t < self._law_due and not self.retune_next:
            # the daemon's cheap watch between steady ticks: a new pid, a guest gone or grown
            now = self._guests_now()
            moved = set(now) != set(self._armed) or any(
                now[p] - self._armed[p] >= self.settings.growth_kib for p in now)
            if not moved:
                self._watch_due = t + self.settings.watch_s
                self.next_tick_s = min(self._law_due, self._watch_due)
                self.watches += 1
                return
        d, self.state = self.b.step(self.sample(t), self.state, self.settings)
        self.retune_next = self._first = False
        self.decisions.append((t, d))
        if d.pages_to_scan is not None:
            self._write("pages_to_scan", d.pages_to_scan, t)
            self._write("sleep_millisecs", d.sleep_ms, t)
        self._law_due = t + (d.next_tick_s if d.next_tick_s is not None else self.interval_s)
        self._watch_due = t + self.settings.watch_s if d.mode is self.b.Mode.STEADY else None
        self._armed = self._guests_now()
        self.next_tick_s = min(self._law_due, self._watch_due or math.inf)

    def retune(self, t: float) -> None:
        """SIGUSR1: a tick now, with retune set."""
        self.retune_next = True
        self.next_tick_s = t

    def modes(self) -> List[tuple]:
        """(t, mode) at each change of mode."""
        out, last = [], None
        for t, d in self.decisions:
            if d.mode is not last:
                out.append((t, d.mode))
                last = d.mode
        return out


def sleep_wall_s_measured(sleep_ms: int, hz: int, phases: int = 200) -> float:
    """The simulator's mean sleep for ``sleep_ms``, over batch ends spread across a jiffy."""
    k = Ksmd(hz=hz)
    k.sleep_millisecs = sleep_ms
    jiffy = 1e9 / hz
    total = 0.0
    for i in range(phases):
        at = 1e9 + jiffy * i / phases
        total += k._sleep_ns(at) - at
    return total / phases / 1e9
