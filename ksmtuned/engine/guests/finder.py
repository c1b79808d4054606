"""The guest finder: the process table's claimed processes, the pid files, trust, and memory.

Memory is read only for guests: RSS and VSZ each scan (psutil ``memory_info``), ``ksm_stat``
each scan, PSS (psutil ``memory_full_info``) only when the PSS metric or the ``guests``
command needs it; ``AnonHugePages`` of ``smaps_rollup`` (the kernel walks every page table for
it, about 20 ms of CPU per GiB of guest RAM) only for the ``guests`` command, or for the THP
warning once per guest every ``rollup_interval_s`` until it warned, and only while
``/proc/meminfo`` shows any ``AnonHugePages`` at all.

Guests that ``KSM_GUEST_TRUST`` does not trust (an unprivileged user's look-alikes) are found
but never measured by the daemon (``scan(untrusted=False)``): the commands show them.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from ...core.matchers import (DEFAULT_TRUST, MATCHER_NAMES, make_matcher, trusted, trusted_user_names,
                              guest_name)
from ...core.ticks import Guest
from ...errors import KsmtunedError
from ...kernel import meminfo, processes
from .pidfiles import PidFile, PidFiles
from .table import Entry, ProcessTable, self_pid

log = logging.getLogger("ksmtuned.engine.guests")

#: A process that started this long after its pid file was written is not the one it names.
PIDFILE_SLACK_S = 2.0


class GuestFinder:
    """Scans the process table (``kernel.processes``' root) and the pid files under ``run_dir``.

    ``metric`` (KSM_PS_METRIC) decides whether PSS is read each scan; ``trust``
    (KSM_GUEST_TRUST) which guests count.  Keep one finder for the daemon's lifetime: its table
    is what makes a scan cheap.
    """

    def __init__(
        self,
        matchers: Sequence[str] = MATCHER_NAMES,
        run_dir: str = "/run",
        metric: str = "rss",
        trust: Sequence[str] = DEFAULT_TRUST,
        rollup_interval_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.matchers = [make_matcher(m) for m in matchers]
        self.matcher_names = tuple(m.name for m in self.matchers)
        self.run_dir = str(run_dir)
        self.metric = metric
        self.trust = tuple(trust)
        self.trusted_uids = processes.uids_of(trusted_user_names(self.trust))
        self.rollup_interval_s = rollup_interval_s
        self.clock = clock
        self.table = ProcessTable(self.matchers, want_cgroup="machine-slice" in self.trust, clock=wall_clock)
        self.pidfiles = PidFiles([(m.name, f"{self.run_dir}/{m.pidfile_dir}") for m in self.matchers
                                  if m.pidfile_dir])
        self._thp_any: Optional[bool] = None

    @classmethod
    def from_settings(cls, settings, run_dir: str = "/run", **kw) -> "GuestFinder":
        """The finder the daemon uses: KSM_GUEST_MATCH, KSM_PS_METRIC, KSM_GUEST_TRUST."""
        return cls(matchers=settings.guest_match, run_dir=str(run_dir), metric=settings.ps_metric,
                   trust=settings.guest_trust, **kw)

    def scan(self, details: bool = False, meminfo_fields: Optional[Mapping[str, int]] = None,
             untrusted: bool = True) -> List[Guest]:
        """The guests now, sorted by pid.  ``details``: read PSS and THP for every guest.
        ``untrusted``: also the guests KSM_GUEST_TRUST does not trust (measured, flagged).

        ``meminfo_fields``: the host's /proc/meminfo, when the caller has just read it (the
        daemon, each tick): the THP check takes AnonHugePages from it instead of a second read.
        """
        self.table.refresh()
        self._thp_any = None
        by_pidfile = self._pidfile_claims()
        me = self_pid()
        now = self.clock()
        guests = []
        candidates = {e.pid for e in self.table.claimed()} | by_pidfile.keys()
        for pid in sorted(candidates):
            entry = self.table.get(pid)
            if entry is None or pid == me or not entry.candidate:
                continue
            files = by_pidfile.get(pid, [])
            names = set(entry.claims) | {f.matcher for f in files}
            ordered = tuple(m for m in self.matcher_names if m in names)
            is_trusted = trusted(self.trust, entry.uid, self.trusted_uids,
                                 any(f.root_owned for f in files), entry.cgroup)
            if not is_trusted and not untrusted:
                continue
            guest = self._measure(entry, ordered, files[0].path if files else None, details, now,
                                  meminfo_fields, is_trusted)
            if guest is not None:
                guests.append(guest)
        return guests

    def close(self) -> None:
        """Nothing is kept open; kept for the daemon's reload."""

    def _pidfile_claims(self) -> Dict[int, List[PidFile]]:
        """pid -> its pid files, for live QEMU/KVM processes that a pid file names.

        A stale pid file whose pid now belongs to another process is ignored: that process
        started after the pid file was written, or is no QEMU.
        """
        out: Dict[int, List[PidFile]] = {}
        for f in self.pidfiles.read():
            entry = self.table.get(f.pid)
            if entry is None or not entry.candidate:
                continue  # no such process, or no QEMU
            if entry.started_s > f.mtime_s + PIDFILE_SLACK_S:
                continue  # started after the pid file was written: a reused pid
            out.setdefault(f.pid, []).append(f)
        return out

    def _thp_in_use(self, fields: Optional[Mapping[str, int]]) -> bool:
        """Any anonymous memory on THP on the host (cheap: /proc/meminfo), once per scan."""
        if self._thp_any is None:
            if fields is None:
                try:
                    fields = meminfo.read_meminfo(f"{processes.procfs()}/meminfo")
                except KsmtunedError:
                    fields = None
            self._thp_any = fields is None or fields.get("AnonHugePages", 1) > 0
        return self._thp_any

    def _measure(self, entry: Entry, matchers: tuple, pidfile: Optional[str], details: bool, now: float,
                 fields: Optional[Mapping[str, int]], is_trusted: bool) -> Optional[Guest]:
        proc = entry.proc
        assert proc is not None
        try:
            rss_kib, vsz_kib = processes.memory_kib(proc)
            pss_kib = processes.pss_kib(proc) if details or self.metric == "pss" else None
        except processes.NoSuchProcess:
            self.table.forget(entry.pid)  # exited: skipped, not an error
            return None
        except processes.AccessDenied:
            return None
        thp_kib = None
        if details or (not entry.thp_warned and now >= entry.next_rollup and self._thp_in_use(fields)):
            thp_kib = processes.thp_kib(entry.pid)
            entry.next_rollup = now + self.rollup_interval_s
        ksm = processes.keyed(entry.pid, "ksm_stat") or {}
        known = entry.name or guest_name((), entry.comm, pidfile)
        guest = Guest(
            pid=entry.pid,
            name=known or entry.comm,
            matcher=matchers[0],
            rss_kib=rss_kib,
            vsz_kib=vsz_kib,
            pss_kib=pss_kib,
            thp_kib=thp_kib,
            ksm_merging_pages=_int(ksm.get("ksm_merging_pages")),
            ksm_zero_pages=_int(ksm.get("ksm_zero_pages")),
            ksm_profit_bytes=_int(ksm.get("ksm_process_profit")),
            ksm_mergeable=ksm.get("ksm_mergeable") if isinstance(ksm.get("ksm_mergeable"), bool) else None,
            matchers=matchers,
            comm=entry.comm,
            cmdline=entry.argv,
            start_time_s=entry.started_s,
            pidfile=pidfile,
            name_known=known is not None,
            uid=entry.uid,
            user=entry.user,
            trusted=is_trusted,
        )
        if is_trusted and not entry.thp_warned and guest.thp_warning:
            entry.thp_warned = True
            log.warning(
                "guest %s (pid %d): %d MiB of its %d MiB resident memory is on transparent huge pages, "
                "which KSM does not merge in practice; to let KSM work, keep guest RAM off THP "
                "(transparent_hugepage=never, or prctl(PR_SET_THP_DISABLE) for QEMU)",
                guest.name, guest.pid, (thp_kib or 0) // 1024, rss_kib // 1024,
            )
        return guest


def _int(value: object) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
