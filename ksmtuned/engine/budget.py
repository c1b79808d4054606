"""The budget policy in the loop (KSM_POLICY=budget, docs/budget.md).

Collects the law's sample (the KSM counters, ksmd's schedstat, ``cow_ksm`` from
/proc/vmstat, the guests' memory), steps the pure law (:mod:`ksmtuned.core.budget`) and
returns the values to write.  It also owns what the policy must leave right on the machine:

- **crash safety**: :meth:`BudgetDriver.start` writes steady values before the first
  decision, so a daemon killed mid-burst and started again (systemd: Restart=on-failure)
  puts ksmd back to a small cost at once; :meth:`BudgetDriver.stop` (SIGTERM, --once)
  leaves steady values behind.  A burst never writes ``sleep_millisecs=0``: a dead daemon
  leaves ksmd at most at the burst share of a core, never spinning.
- **the kernel advisor** (``advisor_mode=scan-time``, kernel >= 6.8, owns ``pages_to_scan``:
  writes fail with EINVAL): with KSM_BUDGET_ADVISOR=take (default) the driver switches it to
  ``none`` at start and back to ``scan-time`` on exit; with ``leave`` (or when someone turns
  it on while we run) the driver writes neither knob and says so once.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional

from ..core.budget import BudgetDecision, BudgetSettings, BudgetState, GuestMemory, KsmSample, Mode, steady_start, step
from ..core.ticks import Guest
from ..errors import KernelInterfaceError
from ..kernel.ksm import KsmSysfs
from ..kernel.ksmd import Ksmd
from ..kernel.procfs import read_record
from ..kernel.vmstat import read_vmstat

log = logging.getLogger(__name__)

_COUNTERS = ("full_scans", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
             "ksm_zero_pages", "pages_scanned", "pages_skipped")


class BudgetDriver:
    def __init__(self, sysfs: KsmSysfs, ksmd: Ksmd, settings: BudgetSettings, advisor: str = "take",
                 vmstat_path: str = "/proc/vmstat", clock: Optional[Callable[[], float]] = None):
        self.sysfs = sysfs
        self.ksmd = ksmd
        self.settings = settings
        self.advisor = advisor
        self.vmstat_path = vmstat_path
        self.clock = clock
        self.state = BudgetState()
        self.last: Optional[BudgetDecision] = None
        self.started = False
        self.took_advisor = False
        self._advisor_said = False
        self._first = True
        self._present = _COUNTERS

    # --- start and stop ---------------------------------------------------------------------
    def steady_values(self) -> tuple[int, int]:
        """What to leave ksmd at: the law's last steady batch, else one at the prior cost."""
        st = self.state
        if st.mode is Mode.STEADY and st.pages_to_scan and st.sleep_ms:
            return st.pages_to_scan, st.sleep_ms
        return steady_start(self.settings)

    def start(self, write: Callable[[str, str], None]) -> None:
        """Take the advisor over (if so configured), then write steady values at once."""
        self.started = True
        if self.advisor == "take" and self.sysfs.advisor_scanning():
            write("advisor_mode", "none")  # resets pages_to_scan to 100 (TUNING.md section 4)
            self.took_advisor = True
            log.info("budget: took the scan rate over from the kernel's advisor (advisor_mode scan-time -> none); "
                     "it is given back on exit")
        if not self.sysfs.advisor_scanning():
            pages, sleep_ms = steady_start(self.settings)
            write("pages_to_scan", str(pages))
            write("sleep_millisecs", str(sleep_ms))

    def stop(self, write: Callable[[str, str], None]) -> None:
        """Leave steady values behind, and give the advisor back if we took it."""
        if not self.started:
            return
        if not self.sysfs.advisor_scanning():
            pages, sleep_ms = self.steady_values()
            write("pages_to_scan", str(pages))
            write("sleep_millisecs", str(sleep_ms))
        if self.took_advisor:
            write("advisor_mode", "scan-time")
            self.took_advisor = False
            log.info("budget: gave the scan rate back to the kernel's advisor (advisor_mode none -> scan-time)")
        self.started = False

    # --- one tick -----------------------------------------------------------------------------
    def _counters(self) -> dict[str, int]:
        """Only the counters the law reads (a kernel without one leaves it out)."""
        out = {}
        for name in self._present:
            try:
                out[name] = int(self.sysfs.read(name))
            except (KernelInterfaceError, ValueError):
                continue
        if len(out) < len(self._present):
            self._present = tuple(out) or _COUNTERS  # probed again if all failed
        return out

    def _smart_scan(self) -> Optional[bool]:
        """Whether ksmd skips pages that never merged (kernel 6.7+; None: no such knob)."""
        try:
            return self.sysfs.read("smart_scan").strip() == "1"
        except KernelInterfaceError:
            return None

    def sample(self, now_s: float, running: bool, guests: Iterable[Guest], retune: bool) -> KsmSample:
        c = self._counters()
        cow = None
        try:
            cow = read_vmstat(("cow_ksm",), self.vmstat_path).get("cow_ksm")
        except OSError:
            pass

        def num(name: str) -> Optional[int]:
            v = c.get(name)
            return v if isinstance(v, int) else None

        sample = KsmSample(
            time_s=now_s, running=running, full_scans=num("full_scans") or 0,
            pages_shared=num("pages_shared") or 0, pages_sharing=num("pages_sharing") or 0,
            pages_unshared=num("pages_unshared") or 0, pages_volatile=num("pages_volatile") or 0,
            ksm_zero_pages=num("ksm_zero_pages") or 0, pages_scanned=num("pages_scanned"),
            pages_skipped=num("pages_skipped"), cow_ksm=cow, ksmd_cpu_ns=self.ksmd.cpu_ns(),
            guests=tuple(GuestMemory(g.pid, g.rss_kib, g.ksm_mergeable) for g in guests), retune=retune,
            start=self._first, smart_scan=self._smart_scan())
        self._first = False
        return sample

    def decide(self, now_s: float, running: bool, guests: Iterable[Guest], retune: bool = False) -> BudgetDecision:
        """Step the law; the decision says what pages_to_scan/sleep_millisecs should be (None: leave)."""
        decision, self.state = step(self.sample(now_s, running, guests, retune), self.state, self.settings)
        self.last = decision
        return decision

    def wanted(self, decision: BudgetDecision) -> list[tuple[str, str]]:
        """The knobs to write for ``decision``, in the daemon's order (pages_to_scan, then
        sleep_millisecs); none while the kernel's advisor owns the scan rate."""
        if decision.pages_to_scan is None or decision.sleep_ms is None:
            return []
        if self.sysfs.advisor_scanning():
            if not self._advisor_said:
                why = ("KSM_BUDGET_ADVISOR=leave" if self.advisor == "leave" and not self.took_advisor
                       else "it was switched on while ksmtuned runs")
                log.warning("budget: the kernel's KSM advisor (advisor_mode=scan-time) owns the scan rate (%s): "
                            "leaving pages_to_scan and sleep_millisecs to it", why)
                self._advisor_said = True
            return []
        if self._advisor_said:
            log.info("budget: the kernel's KSM advisor is off again: budget sets the scan rate")
            self._advisor_said = False
        return [("pages_to_scan", str(decision.pages_to_scan)), ("sleep_millisecs", str(decision.sleep_ms))]

    def next_tick_s(self) -> Optional[float]:
        """Seconds until the law wants to look again (None: at the monitor interval)."""
        return None if self.last is None else self.last.next_tick_s


class Watch:
    """The cheap look between steady ticks (every KSM_BUDGET_WATCH): did a known guest go or
    grow (its statm), did a known guest with nothing opted in opt in (its ksm_stat: a process
    that touches its memory first and calls madvise(MADV_MERGEABLE) after, seen in between, has
    nothing left to grow), or did the host's anonymous memory grow (AnonPages in /proc/meminfo: a
    new guest's RAM)?  One small read per file.  New processes alone are
    no news: a busy host starts dozens a second, and classifying them all each second would
    cost the daemon more than ksmd's whole budget (measured here: 1-4 ms a scan)."""

    def __init__(self, procfs: str = "/proc", page_kib: int = 4):
        self.procfs = procfs
        self.page_kib = page_kib
        self._anon_kib: Optional[int] = None
        self._rss: dict[int, int] = {}
        self._unopted: tuple[int, ...] = ()
        self.probes = 0

    def _anon(self) -> Optional[int]:
        try:
            data = read_record(f"{self.procfs}/meminfo")
            at = data.index(b"\nAnonPages:")
            return int(data[at + 11:data.index(b"\n", at + 1)].split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def arm(self, guests: Iterable[Guest]) -> None:
        """Remember what the last full tick saw."""
        guests = list(guests)
        self._rss = {g.pid: g.rss_kib for g in guests}
        self._unopted = tuple(g.pid for g in guests if g.ksm_mergeable is False)
        self._anon_kib = self._anon()

    def _opted_in(self, pid: int) -> bool:
        try:
            return b"\nksm_mergeable: yes" in read_record(f"{self.procfs}/{pid}/ksm_stat")
        except OSError:
            return False  # gone: its statm says so

    def changed(self, growth_kib: int) -> Optional[str]:
        """None if nothing moved; "guest" if a known guest went, grew or opted in (a budget tick is due);
        "memory" if the host's anonymous memory grew (the caller asks the guest finder)."""
        self.probes += 1
        for pid, rss in self._rss.items():
            try:
                resident = int(read_record(f"{self.procfs}/{pid}/statm").split()[1]) * self.page_kib
            except (OSError, ValueError, IndexError):
                return "guest"  # gone
            if resident - rss >= growth_kib:
                return "guest"
        if any(self._opted_in(pid) for pid in self._unopted):
            return "guest"
        anon = self._anon()
        if anon is None or self._anon_kib is None:
            return "memory"
        if anon - self._anon_kib >= growth_kib:
            return "memory"
        self._anon_kib = min(self._anon_kib, anon)  # shrinking re-arms
        return None

    def same_guests(self, guests: Iterable[Guest], growth_kib: int) -> bool:
        """The guest finder's answer after "memory": the same guests, none grown."""
        now = {g.pid: g.rss_kib for g in guests}
        return set(now) == set(self._rss) and all(now[p] - self._rss[p] < growth_kib for p in now)


def write_knob(sysfs: KsmSysfs) -> Callable[[str, str], None]:
    """A writer for start/stop that logs what changed and never raises (exit paths)."""

    def write(name: str, value: str) -> None:
        try:
            w = sysfs.write_if_changed(name, value)
        except KernelInterfaceError as e:
            log.warning("budget: %s", e)
            return
        if w is not None:
            log.info("budget: %s %s -> %s", name, w.old, w.new)

    return write
