"""The data one tick produces, as plain frozen types (no I/O): a guest, a knob write, the
daemon's TickReport and the observers' TickData."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from .budget import BudgetDecision
from .config import Settings
from .policy import Decision, Limits

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PAGE_KIB = PAGE_SIZE // 1024
#: The THP warning: at least this share of the guest's RSS on transparent huge pages.
THP_WARN_SHARE = 0.10
DECISION_KINDS = ("stop", "boost", "decay", "error")


@dataclass(frozen=True)
class Write:
    """One knob change, for logging old -> new."""

    name: str
    old: str | None
    new: str


@dataclass(frozen=True)
class Guest:
    """One guest process and what it holds.  Sizes in kB (KiB), as ``ps`` and meminfo.

    ``pss_kib`` and ``thp_kib`` are None where ``smaps_rollup`` was not read in this scan
    (it is expensive) or could not be; the ``ksm_*`` fields are None where the kernel has no
    ``/proc/PID/ksm_stat`` (before 6.1) or it could not be read.
    """

    pid: int
    name: str  # the guest's name where known (-name, pid file, qemu:NAME), else the process name
    matcher: str  # the first configured matcher that claims it
    rss_kib: int
    vsz_kib: int = 0
    pss_kib: int | None = None
    thp_kib: int | None = None  # AnonHugePages: RAM on transparent huge pages, which KSM does not merge
    ksm_merging_pages: int | None = None  # this guest's pages merged by KSM
    ksm_zero_pages: int | None = None  # merged with the kernel's zero page (use_zero_pages=1)
    ksm_profit_bytes: int | None = None  # ksm_process_profit: saved minus KSM's own metadata
    ksm_mergeable: bool | None = None  # has memory opted in to KSM
    matchers: tuple[str, ...] = ()  # every configured matcher that claims it
    comm: str = ""
    cmdline: tuple[str, ...] = ()
    start_time_s: float = 0.0  # wall clock (epoch seconds)
    pidfile: str | None = None  # the pid file that names it, if one does
    name_known: bool = False  # name came from the guest's configuration, not the process name
    uid: Optional[int] = None  # the process's real owner
    user: Optional[str] = None  # its name
    trusted: bool = True  # counted: KSM_GUEST_TRUST trusts its owner, pid file or cgroup

    @property
    def ksm_saved_kib(self) -> int | None:
        """Memory KSM saves in this guest: its merged pages (plus zero-page merges)."""
        if self.ksm_merging_pages is None:
            return None
        return (self.ksm_merging_pages + (self.ksm_zero_pages or 0)) * PAGE_KIB

    @property
    def thp_warning(self) -> bool:
        return _thp_warning(self.thp_kib, self.rss_kib)

    def metric_kib(self, metric: str) -> int:
        """The size counted by KSM_PS_METRIC (rss, pss or vsz); 0 where unknown."""
        return getattr(self, f"{metric}_kib") or 0


def _thp_warning(thp_kib: int | None, rss_kib: int) -> bool:
    return thp_kib is not None and thp_kib > 0 and thp_kib >= THP_WARN_SHARE * max(rss_kib, 1)


def committed_kib(guests: Iterable[Guest], metric: str = "rss") -> int:
    """The trusted guests' committed memory by KSM_PS_METRIC, in kB."""
    return sum(g.metric_kib(metric) for g in guests if g.trusted)


@dataclass
class TickReport:
    """Everything one adjust saw and did, for observers (state file, metrics)."""

    time_s: float  # wall clock
    duration_s: float
    reason: str  # "start", "interval", "retune", "reload", "once"
    settings: Settings
    limits: Limits | None
    decision: Decision | None
    writes: list[Write] = field(default_factory=list)
    guests: list[Guest] = field(default_factory=list)
    meminfo: dict[str, int] = field(default_factory=dict)
    free_kib: int | None = None
    committed_kib: int | None = None
    error: str | None = None
    #: every KSM counter and knob after the writes (KsmSysfs.counters()), read by the engine
    ksm: dict[str, Any] = field(default_factory=dict)
    ksmd_pid: Optional[int] = None
    ksmd_cpu_s: Optional[float] = None  # ksmd's CPU time since boot
    #: KSM_POLICY=budget: the budget law's decision this tick (mode, trigger, CPU, estimates)
    budget: Optional[BudgetDecision] = None


# --- one tick's data -----------------------------------------------------------------------

@dataclass(frozen=True)
class GuestData:
    pid: int
    name: str
    matcher: str
    memory_kib: int | None  # by KSM_PS_METRIC
    ksm_merging_pages: int | None
    ksm_profit_bytes: int | None


@dataclass(frozen=True)
class TickData:
    """Everything the state file and the metrics show for one tick.  Never mutated."""

    time_s: float
    duration_s: float
    reason: str
    error: str | None
    decision: str  # stop, boost, decay, or error
    explain: str
    run: bool | None
    npages: int | None
    sleep_ms: int | None
    total_kib: int | None
    free_kib: int | None
    committed_kib: int | None
    thres_kib: int | None
    free_metric: str
    ps_metric: str
    interval_s: float
    guest_match: tuple[str, ...]
    ksm: dict[str, int | str]
    ksmd_pid: int | None
    ksmd_cpu_s: float | None
    guests: tuple[GuestData, ...]
    decisions: dict[str, int]  # since the daemon started
    adjusts: int
    adjust_seconds_sum: float
    last_success_s: float | None
    page_size: int = PAGE_SIZE
    writes: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    budget: Optional[dict[str, Any]] = None  # KSM_POLICY=budget: mode, trigger, ksmd CPU, estimates

    @property
    def saved_bytes(self) -> int | None:
        sharing = self.ksm.get("pages_sharing")
        return sharing * self.page_size if isinstance(sharing, int) else None

    @property
    def profit_bytes(self) -> int | None:
        profit = self.ksm.get("general_profit")
        return profit if isinstance(profit, int) else None

    def history_entry(self) -> dict[str, Any]:
        return {"t": round(self.time_s, 3), "saved_bytes": self.saved_bytes, "profit_bytes": self.profit_bytes,
                "ksmd_cpu_s": self.ksmd_cpu_s, "decision": self.decision, "npages": self.npages}


