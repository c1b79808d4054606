"""After every adjust: the state file, and the Prometheus metrics when configured.

``make_observers(settings, ...)`` returns the daemon's observers (``daemon.TickReport`` ->
None).  No kernel access here: the engine's tick collected everything (the KSM counters,
ksmd's CPU time, each guest's KSM savings) into the TickReport; one :class:`Reporter` turns it
into an immutable :class:`TickData` with the daemon's running counts, and the state file and the
metrics are both rendered from that, so an HTTP scrape does nothing but
format the last tick's numbers.  prometheus_client is imported only when
``KSM_METRICS_LISTEN`` or ``KSM_METRICS_TEXTFILE`` is set.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from .. import __version__
from ..core.documents import Counts, HistoryEntry, Inputs, KnobWrite, StateDaemon, StateDecision, StateDocument
from ..core.documents import StateBudget, StateGuest, StateKsmd
from ..core.ticks import DECISION_KINDS, Guest, GuestData, TickData
from ..paths import DEFAULT_SYSFS
from .state import DEFAULT_STATE_PATH, HISTORY_LEN, atomic_write, read_history, remove_stale_temps

log = logging.getLogger(__name__)


def _guest_data(guest: Guest, ps_metric: str) -> GuestData:
    """What the state file and metrics keep of a guest (the finder already read ksm_stat)."""
    memory = getattr(guest, f"{ps_metric}_kib")
    return GuestData(pid=guest.pid, name=guest.name, matcher=guest.matcher,
                     memory_kib=guest.rss_kib if memory is None else memory,
                     ksm_merging_pages=guest.ksm_merging_pages, ksm_profit_bytes=guest.ksm_profit_bytes)


def budget_dict(decision) -> Optional[Dict[str, Any]]:
    """KSM_POLICY=budget's decision as the state file shows it (StateBudget); None: classic."""
    if decision is None:
        return None
    return {
        "mode": decision.mode.value, "trigger": decision.trigger, "reason": decision.reason,
        "explain": decision.explain(),
        "pages_to_scan": decision.pages_to_scan, "sleep_ms": decision.sleep_ms,
        "ksmd_cpu_pct": _round(decision.cpu_pct, 4), "target_cpu_pct": round(decision.target_pct, 4),
        "unmerged_kib": decision.to_merge_kib, "eta_s": _round(decision.eta_s, 1),
        "churn_factor": round(decision.churn_factor, 3), "burst_bucket_cpu_s": round(decision.bucket_cpu_s, 3),
        "cost_ns_per_page": round(decision.cost_ns_per_page, 1),
        "churn_hold": decision.churn_hold, "cow_ksm_per_s": _round(decision.cow_ksm_per_s, 1),
    }


def _round(x: Optional[float], digits: int) -> Optional[float]:
    return None if x is None else round(x, digits)


# --- the observer --------------------------------------------------------------------------

class Reporter:
    """The daemon observer: collects a TickData per tick, writes the state file, feeds metrics."""

    def __init__(self, settings, state_path: Path | None = DEFAULT_STATE_PATH, sysfs: Path = DEFAULT_SYSFS,
                 procfs: Path = Path("/proc"), config_path: str | None = None,
                 clock: Callable[[], float] = time.time):
        self.state_path = Path(state_path) if state_path is not None else None
        self.procfs = Path(procfs)
        self._sysfs_dir, self._procfs_dir = str(sysfs), str(self.procfs)
        self._state_file = os.fspath(self.state_path) if self.state_path is not None else None
        self.config_path = str(config_path) if config_path is not None else None
        self.started_s = clock()
        self.decisions = dict.fromkeys(DECISION_KINDS, 0)
        self.adjusts = 0
        self.adjust_seconds_sum = 0.0
        self.last_success_s: float | None = None
        self.last: TickData | None = None
        # each entry as its JSON text, serialized once: dumping 300 models every tick cost 0.5 ms
        self.history: deque[str] = deque(maxlen=HISTORY_LEN)
        self._failing: dict[str, str] = {}
        self.metrics = None  # ksmtuned.metrics.Metrics, created when first configured
        self._metrics_settings = None
        if self.state_path is not None:
            self.history.extend(entry.model_dump_json() for entry in read_history(self.state_path))
            try:
                self.state_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            except OSError as e:
                self._fail("state", f"cannot create {self.state_path.parent}: {e.strerror}")
            remove_stale_temps(self.state_path, self.procfs)
        self._configure_metrics(settings)

    # -- collection --
    def collect(self, report) -> TickData:
        """The tick's TickData: the report plus KSM counters, ksmd CPU and guests' KSM savings."""
        settings = report.settings
        decision = report.decision
        kind = "error" if report.error is not None or decision is None else decision.branch.value
        if report.reason != "budget":  # a budget tick between adjusts (docs/budget.md) is no adjust
            self.decisions[kind] += 1
            self.adjusts += 1
            self.adjust_seconds_sum += report.duration_s
        if kind != "error":
            self.last_success_s = report.time_s
        ksm = report.ksm
        limits = report.limits
        guests = tuple(_guest_data(g, settings.ps_metric) for g in report.guests)
        ksmd_cpu_s = report.ksmd_cpu_s
        return TickData(
            time_s=report.time_s, duration_s=report.duration_s, reason=report.reason, error=report.error,
            decision=kind, explain=decision.explain() if decision is not None else f"adjust failed: {report.error}",
            run=decision.run if decision is not None else None,
            npages=decision.npages if decision is not None else None,
            sleep_ms=decision.sleep_ms if decision is not None else (limits.sleep_ms if limits else None),
            total_kib=limits.total_kib if limits else None, free_kib=report.free_kib,
            committed_kib=report.committed_kib, thres_kib=limits.thres_kib if limits else None,
            free_metric=settings.free_metric, ps_metric=settings.ps_metric,
            interval_s=float(settings.monitor_interval_s), guest_match=tuple(settings.guest_match),
            ksm=ksm, ksmd_pid=report.ksmd_pid, ksmd_cpu_s=ksmd_cpu_s, guests=guests,
            decisions=dict(self.decisions), adjusts=self.adjusts, adjust_seconds_sum=self.adjust_seconds_sum,
            last_success_s=self.last_success_s,
            writes=tuple({"name": w.name, "old": w.old, "new": w.new} for w in (report.writes or ())),
            budget=budget_dict(getattr(report, "budget", None)),
        )

    def __call__(self, report) -> None:
        data = self.collect(report)
        self.last = data
        self.history.append(HistoryEntry(**data.history_entry()).model_dump_json())
        # metrics first: once the state file shows a tick, the metrics show it too
        self._configure_metrics(report.settings)
        if self.metrics is not None:
            self.metrics.update(data)
        if self.state_path is not None:
            self._write_state(report.settings, data)

    # -- the state file --
    def state_document(self, settings, data: TickData) -> str:
        """The state file's JSON text: a StateDocument (docs/documents.md documents every key)."""
        doc = StateDocument(
            daemon=StateDaemon(pid=os.getpid(), version=__version__, started=round(self.started_s, 3),
                               config_file=self.config_path, sysfs=self._sysfs_dir, procfs=self._procfs_dir),
            time=round(data.time_s, 3),
            reason=data.reason,
            duration_s=round(data.duration_s, 6),
            error=data.error,
            inputs=Inputs(total_kib=data.total_kib, free_kib=data.free_kib, committed_kib=data.committed_kib,
                          thres_kib=data.thres_kib, free_metric=data.free_metric, ps_metric=data.ps_metric,
                          guests=len(data.guests)),
            decision=None if data.decision == "error" else StateDecision(
                branch=data.decision, run=data.run, npages=data.npages, sleep_ms=data.sleep_ms,
                explain=data.explain, writes=[KnobWrite(**w) for w in data.writes]),
            npages=data.npages,
            last_success=data.last_success_s,
            counts=Counts(adjusts=data.adjusts, decisions=data.decisions),
            ksm=data.ksm,
            page_size=data.page_size,
            ksmd=StateKsmd(pid=data.ksmd_pid, cpu_seconds=data.ksmd_cpu_s),
            guests=[StateGuest(**g.__dict__) for g in data.guests],
            settings=settings,
            budget=StateBudget(**data.budget) if data.budget else None,
            history=[],  # last key: filled in below, pre-serialized
        )
        text = doc.model_dump_json(by_alias=True)
        # history is the document's last key: its entries go in as serialized when they were new
        return text[:-len('[]}')] + "[" + ",".join(self.history) + "]}\n"

    def _write_state(self, settings, data: TickData) -> None:
        assert self.state_path is not None
        payload = self.state_document(settings, data).encode()
        try:
            try:
                atomic_write(self._state_file, payload)
            except FileNotFoundError:  # the directory went away (tmpfs cleaned): recreate it once
                self.state_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                atomic_write(self._state_file, payload)
        except OSError as e:
            self._fail("state", f"cannot write the state file {self.state_path}: {e.strerror or e}")
            return
        self._ok("state", f"state file {self.state_path} written again")

    # -- metrics --
    def _configure_metrics(self, settings) -> None:
        listen, textfile = settings.metrics_listen, settings.metrics_textfile
        if self.metrics is None:
            if listen is None and textfile is None:
                return
            try:
                from .metrics import Metrics
            except ImportError as e:
                self._fail("metrics", f"KSM_METRICS_LISTEN/KSM_METRICS_TEXTFILE need prometheus_client "
                                      f"(pip install 'ksmtuned[metrics]'): {e}")
                return
            self.metrics = Metrics(version=__version__, on_error=self._fail, on_ok=self._ok)
        if settings is not self._metrics_settings:  # started, or reloaded: a failed listen is tried again
            self._metrics_settings = settings
            self.metrics.retry_listen()
        self.metrics.configure(listen=listen, textfile=textfile)

    # -- errors, logged once until they go away --
    def _fail(self, key: str, message: str) -> None:
        if self._failing.get(key) != message:
            log.warning("%s", message)
            self._failing[key] = message

    def _ok(self, key: str, message: str) -> None:
        if self._failing.pop(key, None) is not None:
            log.info("%s", message)


def make_observers(settings, state_path: Path | str | None = DEFAULT_STATE_PATH, sysfs: Path | str = DEFAULT_SYSFS,
                   procfs: Path | str = Path("/proc"), config_path: str | None = None) -> list[Callable]:
    """The daemon's per-tick observers: the state file and, when configured, the metrics.

    ``state_path=None`` writes no state file.
    """
    return [Reporter(settings, state_path=Path(state_path) if state_path is not None else None,
                     sysfs=Path(sysfs), procfs=Path(procfs), config_path=config_path)]
