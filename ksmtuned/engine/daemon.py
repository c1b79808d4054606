"""The loop: wait -> collect -> decide -> apply -> report.

All decisions are made by :func:`ksmtuned.policy.decide`; this module only collects the
sample (meminfo, guests), applies the decision to the KSM directory and reports it (debug
log, INFO log on change, systemd status, observers such as the state file and metrics).
"""

from __future__ import annotations

import errno
import logging
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable

from ..core.budget import BudgetDecision, Mode
from ..core.config import LoadedConfig, Settings
from ..core.policy import Decision, Limits, Sample, decide, limits_for, start_lines, tick_lines
from ..core.ticks import Guest, TickReport, Write, committed_kib
from ..errors import ConfigError, KernelInterfaceError, KsmtunedError
from ..kernel import meminfo
from ..kernel.ksm import KsmSysfs
from ..kernel.ksmd import Ksmd
from ..kernel.vmstat import kernel_hz
from ..service.logs import DebugLog
from ..service.notify import Notifier
from ..service.signals import Event, SignalEvents
from .budget import BudgetDriver, Watch, write_knob
from .guests import GuestFinder

log = logging.getLogger(__name__)


Observer = Callable[[TickReport], None]


class Daemon:
    def __init__(
        self,
        config: LoadedConfig,
        sysfs: KsmSysfs,
        procfs: Path = Path("/proc"),
        run_dir: Path = Path("/run"),
        debug_log: DebugLog | None = None,
        notifier: Notifier | None = None,
        guest_finder: GuestFinder | None = None,
        dry_run: bool = False,
        once: bool = False,
        debug_override: bool = False,
        reload_config: Callable[[], LoadedConfig] | None = None,
        observers: Iterable[Observer] = (),
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        out: Callable[[str], None] = print,
    ):
        self.config = config
        self.sysfs = sysfs
        self.procfs = Path(procfs)
        self.run_dir = Path(run_dir)
        self.meminfo_path = self.procfs / "meminfo"
        self.debug_override = debug_override
        self.debug_log = debug_log or self._make_debug_log(config.settings)
        self.notifier = notifier or Notifier({})
        self.guest_finder = guest_finder or self._make_guest_finder(config.settings)
        self.ksmd = Ksmd(self.procfs)
        self.dry_run = dry_run
        self.reload_config = reload_config
        self.observers = list(observers)
        self.clock = clock
        self.wall_clock = wall_clock
        self.out = out
        self.npages = 0  # kept here, never read back from sysfs (as the old daemon)
        self.limits: Limits | None = None
        self.last_decision: Decision | None = None
        self.ready_sent = False
        self._advisor_warned = False
        self._failing_since: float | None = None
        self._logged: dict[str, float] = {}  # error key -> when it was last logged, while failing
        self.once = once  # --once: nothing will be retried
        self._hz: int | None = None
        self.budget: BudgetDriver | None = self._make_budget(config.settings)
        self._budget_due: float | None = None  # clock time of the next budget tick
        self._watch = Watch(str(self.procfs))
        self._watch_due: float | None = None  # ...and of the next cheap look between steady ticks

    # --- construction helpers -------------------------------------------------------
    def _make_debug_log(self, settings: Settings) -> DebugLog:
        return DebugLog(settings.logfile, settings.debug or self.debug_override)

    def _make_guest_finder(self, settings: Settings) -> GuestFinder:
        return GuestFinder.from_settings(settings, run_dir=str(self.run_dir))

    def _make_budget(self, settings: Settings) -> BudgetDriver | None:
        """The budget policy's driver when KSM_POLICY=budget (docs/budget.md), else None."""
        if settings.policy != "budget":
            return None
        if self._hz is None:
            self._hz = kernel_hz(self.procfs) or 250
        return BudgetDriver(self.sysfs, Ksmd(self.procfs), settings.budget(self._hz),
                            advisor=settings.budget_advisor, vmstat_path=f"{self.procfs}/vmstat")

    def _budget_writer(self):
        if not self.dry_run:
            return write_knob(self.sysfs)

        def would(name: str, value: str) -> None:
            try:
                old = self.sysfs.read(name)
            except KernelInterfaceError:
                old = None
            if old != value:
                self.out(f"would write {self.sysfs.path(name)}: {old} -> {value}")
        return would

    def stop_budget(self) -> None:
        """Leave ksmd at steady values and give the advisor back (exit, --once, a reload to classic)."""
        if self.budget is not None:
            self.budget.stop(self._budget_writer())

    @property
    def settings(self) -> Settings:
        return self.config.settings

    # --- start and reload -----------------------------------------------------------
    def start(self) -> None:
        """Compute the limits from MemTotal once, and print the start lines."""
        path = str(self.meminfo_path)
        total = meminfo.total_kib(meminfo.read_meminfo(path), path)
        self.limits = limits_for(total, self.settings.tuning())
        self.debug_log.write(start_lines(self.limits))
        log.info(
            "started: total %d kB, sleep %d ms, threshold %d kB, interval %s s, guests by %s, %s metric, %s free",
            total, self.limits.sleep_ms, self.limits.thres_kib, _num(self.settings.monitor_interval_s),
            ",".join(self.settings.guest_match), self.settings.ps_metric, self.settings.free_metric,
        )

    def reload(self) -> bool:
        """Re-read the config; on any error keep the settings in force.  True if reloaded."""
        if self.reload_config is None:
            return False
        self.notifier.reloading()
        try:
            new = self.reload_config()
        except ConfigError as e:
            log.error("reload failed, keeping the previous settings: %s", e)
            self.notifier.reloaded()
            self.notifier.status(f"reload failed: {str(e).splitlines()[0]}")
            return False
        for w in new.warnings:
            log.warning("%s", w)
        old_settings = self.settings
        self.config = new
        self.debug_log.close()
        self.debug_log = self._make_debug_log(new.settings)
        if (new.settings.guest_match, new.settings.ps_metric, new.settings.guest_trust) != (
                old_settings.guest_match, old_settings.ps_metric, old_settings.guest_trust):
            self.guest_finder.close()
            self.guest_finder = self._make_guest_finder(new.settings)
        if (new.settings.policy, new.settings.budget_advisor) != (old_settings.policy, old_settings.budget_advisor):
            self.stop_budget()
            self.budget = self._make_budget(new.settings)
        elif self.budget is not None:
            self.budget.settings = new.settings.budget(self._hz)
        try:
            self.start()
        except KernelInterfaceError as e:
            log.error("reload: %s", e)
        before = old_settings.by_alias()
        changed = [f"{alias}: {before[alias]!r} -> {value!r}"
                   for alias, value in new.settings.by_alias().items() if before[alias] != value]
        log.info("reloaded %s%s", new.path, (": " + "; ".join(changed)) if changed else " (no change)")
        self.notifier.reloaded()
        return True

    # --- one tick ----------------------------------------------------------------------
    def collect(self) -> tuple[Sample, dict[str, int], list[Guest]]:
        path = str(self.meminfo_path)
        fields = meminfo.read_meminfo(path)
        free = meminfo.free_kib(fields, self.settings.free_metric, path)
        # only trusted guests (KSM_GUEST_TRUST) are measured and counted; the THP check takes
        # AnonHugePages from this tick's meminfo
        guests = self.guest_finder.scan(meminfo_fields=fields, untrusted=False)
        committed = committed_kib(guests, self.settings.ps_metric)
        return Sample(free_kib=free, committed_kib=committed), fields, guests

    def adjust(self, reason: str = "interval") -> TickReport:
        started = self.clock()
        report = TickReport(time_s=self.wall_clock(), duration_s=0.0, reason=reason,
                            settings=self.settings, limits=self.limits, decision=None)
        try:
            if self.limits is None:
                self.start()
                report.limits = self.limits
            sample, fields, guests = self.collect()
            report.meminfo, report.guests = fields, guests
            report.free_kib, report.committed_kib = sample.free_kib, sample.committed_kib
            decision = decide(sample, self.npages, self.limits, self.settings.tuning())
            report.decision = decision
            # The law's state moves on even if a write fails (as the old daemon's npages does);
            # the next tick writes again whatever still differs.
            self.npages = decision.npages
            budget_knobs = None
            if self.budget is not None:
                if not self.budget.started:  # crash safety: steady values before any decision
                    self.budget.start(self._budget_writer())
                report.budget = self.budget.decide(self.clock(), decision.run, guests, retune=reason == "retune")
                budget_knobs = self.budget.wanted(report.budget)
                self._budget_due = self._next_budget_tick(report.budget, guests)
            try:
                report.writes = self.apply(decision, budget_knobs=budget_knobs)
            finally:
                self.debug_log.write(self._tick_lines(decision, report.budget))
            self._log_change(decision, report.writes, report.budget)
            if self.once:
                self.stop_budget()
            self.last_decision = decision
            if self._failing_since is not None:
                log.info("adjusting works again (after %.0f s of failures)", self.clock() - self._failing_since)
                self._failing_since = None
                self._logged.clear()
        except KsmtunedError as e:
            report.error = str(e)
            # the same failing system call on the same file is the same error, whatever value it
            # refused; without an errno (meminfo's "missing field", "impossible value") the text is
            key = (f"{type(e).__name__}:{e.path}:{e.errno}"
                   if isinstance(e, KernelInterfaceError) and e.path and e.errno is not None else str(e))
            self._log_failure(reason, str(e), key=key)
        except Exception as e:  # the tick boundary: log with a traceback and keep running
            report.error = f"{type(e).__name__}: {e}"
            self._log_failure(reason, f"unexpected error:\n{traceback.format_exc().rstrip()}", key=report.error)
        report.duration_s = self.clock() - started
        self._publish(report)
        return report

    def _publish(self, report: TickReport) -> None:
        """The tick's last steps: what KSM and ksmd did, systemd's status, then every observer
        (one that fails is logged with its traceback; the others still run)."""
        self._observe_ksm(report)
        self._notify(report)
        for observer in self.observers:
            try:
                observer(report)
            except Exception:
                log.error("observer %r failed:\n%s", observer, traceback.format_exc().rstrip())

    def _observe_ksm(self, report: TickReport) -> None:
        """What KSM and ksmd did (counters, ksmd's CPU time), for the observers; never fails the tick."""
        try:
            report.ksm = self.sysfs.counters()
        except KsmtunedError as e:
            log.debug("KSM counters: %s", e)
        report.ksmd_cpu_s = self.ksmd.cpu_seconds()
        report.ksmd_pid = self.ksmd.pid

    #: The same error, failing tick after tick, is logged again at most this often.
    REPEAT_ERROR_S = 600.0
    #: Distinct errors remembered for that (each is rate-limited on its own).
    ERROR_KEYS = 64

    def _log_failure(self, reason: str, text: str, key: str | None = None) -> None:
        """ERROR for a new failure; the same one again only every REPEAT_ERROR_S (a short interval
        with a lasting fault must not flood the journal).  Per distinct error: one meminfo fault
        must not hide a different one for ten minutes, nor two alternating ones log every tick."""
        now = self.clock()
        key = key or text
        then = "" if self.once else ", will retry"
        last = self._logged.get(key)
        if last is None or now - last >= self.REPEAT_ERROR_S:
            repeated = self._failing_since is not None and last is not None
            log.error("adjust failed (%s)%s%s: %s", reason, then, " again, still" if repeated else "", text)
            self._logged[key] = now
            if len(self._logged) > self.ERROR_KEYS:  # bounded: forget the one logged longest ago
                del self._logged[min(self._logged, key=self._logged.__getitem__)]
        else:
            log.debug("adjust failed (%s) again: %s", reason, text)
        self._failing_since = self._failing_since or now

    def apply(self, decision: Decision, budget_knobs: list[tuple[str, str]] | None = None) -> list[Write]:
        """Write pages_to_scan, sleep_millisecs, then run=1; or run=0.  Only what differs.

        ``budget_knobs``: KSM_POLICY=budget's pages_to_scan and sleep_millisecs instead of the
        classic ones (none while the kernel's advisor owns the scan rate).
        """
        if decision.run:
            if budget_knobs is not None:
                wanted = list(budget_knobs) + [("run", "1")]
            else:
                wanted = [("pages_to_scan", str(decision.npages)), ("sleep_millisecs", str(decision.sleep_ms)),
                          ("run", "1")]
        else:
            wanted = [("run", "0")]
        if self.dry_run:
            writes = []
            for name, value in wanted:
                try:
                    old = self.sysfs.read(name)
                except KernelInterfaceError:
                    old = None
                if old != value:
                    writes.append(Write(name, old, value))
                    self.out(f"would write {self.sysfs.path(name)}: {old} -> {value}")
            return writes
        writes = []
        errors = []
        for name, value in wanted:
            try:
                w = self.sysfs.write_if_changed(name, value)
            except KernelInterfaceError as e:
                if name == "pages_to_scan" and e.errno == errno.EINVAL and self.sysfs.advisor_scanning():
                    if not self._advisor_warned:
                        log.warning(
                            "the kernel's KSM advisor (advisor_mode=scan-time) owns pages_to_scan: "
                            "leaving the scan rate to it, still switching run")
                        self._advisor_warned = True
                    continue
                errors.append(e)
                continue
            if w is not None:
                writes.append(w)
        if self._advisor_warned and not self.sysfs.advisor_scanning():
            log.info("the kernel's KSM advisor is off again: ksmtuned sets pages_to_scan")
            self._advisor_warned = False
        if errors:
            raise errors[0]
        return writes

    def _log_change(self, decision: Decision, writes: list[Write], budget: BudgetDecision | None = None) -> None:
        if self.once:
            return  # `--once` prints the decision itself, on standard output: once, not also here
        previous = self.last_decision
        if writes or previous is None or previous.branch is not decision.branch:
            changes = ", ".join(f"{w.name} {w.old} -> {w.new}" for w in writes) or "no write needed"
            text = decision.explain() if budget is None else f"{decision.explain()}; {budget.explain()}"
            log.info("%s (%s)", text, changes)

    def _tick_lines(self, decision: Decision, budget: BudgetDecision | None) -> list[str]:
        """The classic debug lines; under KSM_POLICY=budget one more line before the last says
        the budget's mode and why, and the KSMCTL line shows the budget's values."""
        lines = tick_lines(decision)
        if budget is not None and decision.run:
            lines[-1:] = [budget.explain(), f"KSMCTL start {budget.pages_to_scan} {budget.sleep_ms}"]
        return lines

    def _next_budget_tick(self, budget: BudgetDecision, guests: list[Guest] | None = None) -> float | None:
        """When the law wants its next tick; in steady mode also arm the cheap watch between."""
        now = self.clock()
        self._watch_due = None
        if budget.mode is Mode.STEADY and self.budget is not None:
            self._watch.arm(guests or ())
            self._watch_due = now + self.settings.budget_watch_s
        return None if budget.next_tick_s is None else now + budget.next_tick_s

    def budget_watch(self) -> None:
        """The cheap look between steady ticks: a full budget tick only if something moved."""
        assert self.budget is not None
        growth = self.budget.settings.growth_kib
        moved = self._watch.changed(growth)
        if moved == "memory":  # the host's anonymous memory grew: is it a (new) guest's?
            try:
                guests = self.guest_finder.scan(untrusted=False)  # as the adjust counts them
            except Exception:
                guests = None
            if guests is not None and self._watch.same_guests(guests, growth):
                self._watch.arm(guests)
                moved = None
        if moved:
            self.budget_tick()
        else:
            self._watch_due = self.clock() + self.settings.budget_watch_s

    def budget_tick(self) -> TickReport | None:
        """A tick of the budget law alone, between two adjusts (bursts, the watch for new guests):
        the classic decision stays; pages_to_scan and sleep_millisecs follow the budget.  Observers
        hear of it when the mode or the churn hold changes, when it wrote a knob, and each second
        of a burst (counts are the adjusts')."""
        assert self.budget is not None
        started = self.clock()
        self._budget_due = None
        previous = self.budget.last
        try:
            guests = self.guest_finder.scan(untrusted=False)  # as the adjust counts them
            running = self.last_decision is not None and self.last_decision.run
            bd = self.budget.decide(self.clock(), running, guests)
            self._budget_due = self._next_budget_tick(bd, guests)
            report = TickReport(time_s=self.wall_clock(), duration_s=0.0, reason="budget", settings=self.settings,
                                limits=self.limits, decision=self.last_decision, guests=guests,
                                committed_kib=committed_kib(guests, self.settings.ps_metric), budget=bd)
            if running:
                report.writes = self._write_knobs(self.budget.wanted(bd))
        except KsmtunedError as e:
            key = f"{type(e).__name__}:{e.path}:{e.errno}" if isinstance(e, KernelInterfaceError) and e.path else str(e)
            self._log_failure("budget", str(e), key=key)
            self._budget_due = self.clock() + self.settings.budget_watch_s
            self._watch_due = None
            return None
        except Exception as e:  # the tick boundary
            self._log_failure("budget", f"unexpected error:\n{traceback.format_exc().rstrip()}",
                              key=f"{type(e).__name__}: {e}")
            self._budget_due = self.clock() + self.settings.budget_watch_s
            self._watch_due = None
            return None
        changed = previous is None or previous.mode is not bd.mode
        if report.writes or changed:
            changes = ", ".join(f"{w.name} {w.old} -> {w.new}" for w in report.writes) or "no write needed"
            (log.info if changed else log.debug)("%s (%s)", bd.explain(), changes)
            if running:
                self.debug_log.write([bd.explain(), f"KSMCTL start {bd.pages_to_scan} {bd.sleep_ms}"])
        report.duration_s = self.clock() - started
        # a burst's progress shows in the state file each second; a steady tick's when it wrote a
        # knob or the churn hold moved: the state file and metrics never lag what sysfs says
        if (changed or bd.mode is Mode.BURST or report.writes
                or (previous is not None and previous.churn_hold != bd.churn_hold)):
            self._publish(report)
        return report

    def _write_knobs(self, wanted: list[tuple[str, str]]) -> list[Write]:
        if self.dry_run:
            writer = self._budget_writer()
            for name, value in wanted:
                writer(name, value)
            return []
        writes = []
        for name, value in wanted:
            w = self.sysfs.write_if_changed(name, value)
            if w is not None:
                writes.append(w)
        return writes

    def _notify(self, report: TickReport) -> None:
        if report.decision is not None:
            status = report.decision.explain()
            if report.budget is not None:
                status = f"{status}; {report.budget.explain()}"
        else:
            status = f"adjust failed: {report.error}"
        if not self.ready_sent and report.decision is not None:
            self.notifier.ready(status)
            self.ready_sent = True
        else:
            self.notifier.status(status)

    # --- the loop ----------------------------------------------------------------------
    def run(self, events: SignalEvents) -> None:
        """Adjust at once, then every interval and on each retune; return on SIGTERM/SIGINT."""
        self.adjust("start")
        deadline = self.clock() + self.settings.monitor_interval_s
        try:
            while True:
                timeout = deadline - self.clock()
                # KSM_POLICY=budget looks more often than the interval: every second or so while
                # bursting (a burst's values are never left alone long), and at KSM_BUDGET_WATCH
                # for new guests and growth otherwise (docs/budget.md, "How the loop wakes")
                budget_due = self._budget_due if self.budget is not None else None
                watch_due = self._watch_due if self.budget is not None else None
                if budget_due is not None:
                    timeout = min(timeout, budget_due - self.clock())
                if watch_due is not None:
                    timeout = min(timeout, watch_due - self.clock())
                if self.notifier.watchdog_s:
                    self.notifier.watchdog()
                    timeout = min(timeout, self.notifier.watchdog_s / 2)
                got = events.wait(max(0.0, timeout))
                if Event.STOP in got:
                    log.info("stopping on signal")
                    return
                if Event.RELOAD in got:
                    self.reload()
                    reason = "reload"
                elif Event.RETUNE in got:
                    reason = "retune"
                elif self.clock() >= deadline:
                    reason = "interval"
                elif budget_due is not None and self.clock() >= budget_due:
                    self.budget_tick()
                    continue
                elif watch_due is not None and self.clock() >= watch_due:
                    self.budget_watch()
                    continue
                else:
                    continue  # a watchdog wake-up
                tick_start = self.clock()
                self.adjust(reason)
                deadline = tick_start + self.settings.monitor_interval_s
        finally:
            self.notifier.stopping()
            self.stop_budget()  # SIGTERM mid-burst: ksmd is left at steady values
            self.debug_log.close()


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
