"""Prometheus metrics from the daemon's own loop data (prometheus_client, the `metrics` extra).

A custom collector yields the last :class:`ksmtuned.report.TickData`; prometheus_client's
``generate_latest`` renders it, for the endpoint and the textfile alike.  Nothing is read from
the kernel during a scrape, so a scrape costs only the formatting and can never slow or
block the adjust loop.  ``KSM_METRICS_LISTEN`` serves ``/metrics`` from the bounded server of
:mod:`ksmtuned.report.metrics_server` (its thread is started by the main thread after the
daemon blocked its signals, so it inherits the blocked mask and every signal still goes to the
loop's sigtimedwait); ``KSM_METRICS_TEXTFILE`` is replaced atomically after every tick for
node_exporter's textfile collector.  Every name starts with ``ksmtuned_``: node_exporter's own ksmd
collector owns ``node_ksmd_*``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric,
                                    SummaryMetricFamily)

from ..core.ticks import TickData
from .metrics_server import MetricsServer
from .state import atomic_write

log = logging.getLogger(__name__)

#: KSM sysfs file -> (metric name, type, help, scale).  Counters get ``_total`` appended.
KSM_METRICS: dict[str, tuple[str, str, str, float]] = {
    "full_scans": ("ksmtuned_ksm_full_scans", "counter", "Full scans of all mergeable memory by ksmd", 1),
    "pages_scanned": ("ksmtuned_ksm_pages_scanned", "counter", "Pages scanned by ksmd", 1),
    "pages_skipped": ("ksmtuned_ksm_pages_skipped", "counter", "Pages skipped by ksmd's smart scan", 1),
    "pages_shared": ("ksmtuned_ksm_pages_shared", "gauge", "KSM pages in use (each shared by several sites)", 1),
    "pages_sharing": ("ksmtuned_ksm_pages_sharing", "gauge", "Sites sharing KSM pages (pages saved)", 1),
    "pages_unshared": ("ksmtuned_ksm_pages_unshared", "gauge",
                       "Pages unique but repeatedly checked for merging (wasted effort)", 1),
    "pages_volatile": ("ksmtuned_ksm_pages_volatile", "gauge", "Pages changing too fast to be merged", 1),
    "ksm_zero_pages": ("ksmtuned_ksm_zero_pages", "gauge", "Empty pages merged with the kernel zero page", 1),
    "stable_node_chains": ("ksmtuned_ksm_stable_node_chains", "gauge", "KSM pages that hit max_page_sharing", 1),
    "stable_node_dups": ("ksmtuned_ksm_stable_node_dups", "gauge", "Duplicated KSM pages (stable_node_dups)", 1),
    "general_profit": ("ksmtuned_ksm_general_profit_bytes", "gauge",
                       "Net memory saved by KSM after its own metadata (may be negative)", 1),
    "run": ("ksmtuned_ksm_run", "gauge", "KSM run state: 0 stopped, 1 running, 2 unmerging", 1),
    "pages_to_scan": ("ksmtuned_ksm_pages_to_scan", "gauge", "Pages ksmd scans per wake-up", 1),
    "sleep_millisecs": ("ksmtuned_ksm_sleep_seconds", "gauge", "ksmd's sleep between wake-ups", 0.001),
    "max_page_sharing": ("ksmtuned_ksm_max_page_sharing", "gauge", "Maximum sites sharing one KSM page", 1),
    "merge_across_nodes": ("ksmtuned_ksm_merge_across_nodes", "gauge", "Whether pages merge across NUMA nodes", 1),
    "use_zero_pages": ("ksmtuned_ksm_use_zero_pages", "gauge", "Whether empty pages merge with the zero page", 1),
    "smart_scan": ("ksmtuned_ksm_smart_scan", "gauge", "Whether ksmd skips pages that did not merge before", 1),
    "advisor_max_cpu": ("ksmtuned_ksm_advisor_max_cpu_percent", "gauge", "The kernel advisor's CPU budget", 1),
    "advisor_target_scan_time": ("ksmtuned_ksm_advisor_target_scan_time_seconds", "gauge",
                                 "The kernel advisor's target time for a full scan", 1),
    "advisor_min_pages_to_scan": ("ksmtuned_ksm_advisor_min_pages_to_scan", "gauge",
                                  "The kernel advisor's lower bound for pages_to_scan", 1),
    "advisor_max_pages_to_scan": ("ksmtuned_ksm_advisor_max_pages_to_scan", "gauge",
                                  "The kernel advisor's upper bound for pages_to_scan", 1),
}


#: One metric family of one tick: (name, type, help, label names, [(label values, value)]),
#: turned into prometheus_client's metric families by :func:`families`.
#: Counters are named without ``_total``; a summary's value is (count, sum); an info's is 1.
Family = tuple[str, str, str, tuple[str, ...], list[tuple[tuple[str, ...], Any]]]


def rows(d: TickData, version: str) -> list[Family]:
    """Every metric of one tick, as plain tuples (no I/O)."""
    out: list[Family] = [
        ("ksmtuned", "info", "ksmtuned's version and the metrics it uses",
         ("free_metric", "guest_match", "ps_metric", "version"),
         [((d.free_metric, ",".join(d.guest_match), d.ps_metric, version), 1)]),
    ]
    add = out.append
    for name, (metric, kind, help_text, scale) in KSM_METRICS.items():
        value = d.ksm.get(name)
        if isinstance(value, int):
            add((metric, kind, help_text, (), [((), value * scale if scale != 1 else value)]))
    mode = d.ksm.get("advisor_mode")
    if isinstance(mode, str):
        add(("ksmtuned_ksm_advisor_mode", "gauge", "The kernel's KSM advisor mode in force (value 1)", ("mode",),
             [((mode,), 1)]))
    if d.saved_bytes is not None:
        add(("ksmtuned_ksm_saved_bytes", "gauge", "Memory saved by KSM: pages_sharing x page size", (),
             [((), d.saved_bytes)]))
    if d.ksmd_cpu_s is not None:
        add(("ksmtuned_ksmd_cpu_seconds", "counter", "CPU time used by the ksmd kernel thread", (),
             [((), d.ksmd_cpu_s)]))
    for metric, kib, help_text in (
        ("ksmtuned_memory_total_bytes", d.total_kib, "MemTotal, as the daemon read it at start"),
        ("ksmtuned_memory_free_bytes", d.free_kib, "Free memory by KSM_FREE_METRIC at the last adjust"),
        ("ksmtuned_memory_committed_bytes", d.committed_kib,
         "Memory held by the guests by KSM_PS_METRIC at the last adjust"),
        ("ksmtuned_memory_threshold_bytes", d.thres_kib, "Free-memory threshold below which KSM boosts"),
    ):
        if kib is not None:
            add((metric, "gauge", help_text, (), [((), kib * 1024)]))
    if d.npages is not None:
        add(("ksmtuned_npages", "gauge", "The daemon's pages_to_scan target (kept while KSM is off)", (),
             [((), d.npages)]))
    if d.sleep_ms is not None:
        add(("ksmtuned_sleep_seconds", "gauge", "The sleep_millisecs the daemon sets, in seconds", (),
             [((), d.sleep_ms / 1000)]))
    add(("ksmtuned_monitor_interval_seconds", "gauge", "KSM_MONITOR_INTERVAL", (), [((), d.interval_s)]))
    add(("ksmtuned_decisions", "counter", "Adjusts since the daemon started, by decision", ("decision",),
         [((kind,), count) for kind, count in d.decisions.items()]))
    add(("ksmtuned_running", "gauge", "1 when the last decision left ksmd running", (), [((), 1 if d.run else 0)]))
    add(("ksmtuned_adjust_duration_seconds", "summary", "Time each adjust took", (),
         [((), (d.adjusts, d.adjust_seconds_sum))]))
    add(("ksmtuned_last_adjust_duration_seconds", "gauge", "Time the last adjust took", (), [((), d.duration_s)]))
    add(("ksmtuned_last_adjust_timestamp_seconds", "gauge", "When the last adjust ran (Unix time)", (),
         [((), d.time_s)]))
    if d.last_success_s is not None:
        add(("ksmtuned_last_success_timestamp_seconds", "gauge", "When the last successful adjust ran (Unix time)",
             (), [((), d.last_success_s)]))
    add(("ksmtuned_guests", "gauge", "Processes counted as guests at the last adjust", (), [((), len(d.guests))]))
    b = d.budget
    if b:  # KSM_POLICY=budget (docs/budget.md)
        add(("ksmtuned_budget_mode", "gauge",
             "The budget policy's mode (value 1): burst, steady or off, and a burst's trigger kind",
             ("mode", "trigger"), [((b["mode"], b.get("trigger") or ""), 1)]))
        add(("ksmtuned_budget_churn_hold", "gauge",
             "Steady mode holding churning pages merged (value 1): hold, trial, or none",
             ("state",), [((b.get("churn_hold") or "none",), 1)]))
        for metric, key, help_text, scale in (
            ("ksmtuned_budget_ksmd_cpu_ratio", "ksmd_cpu_pct", "ksmd's CPU over the last budget tick, share of one core", 0.01),
            ("ksmtuned_budget_target_cpu_ratio", "target_cpu_pct", "The ksmd CPU the budget aims at, share of one core", 0.01),
            ("ksmtuned_budget_unmerged_bytes", "unmerged_kib", "Estimate of memory that may still merge", 1024),
            ("ksmtuned_budget_eta_seconds", "eta_s", "Estimated time until the burst is done", 1),
            ("ksmtuned_budget_churn_factor", "churn_factor", "Share of the steady budget left under churn", 1),
            ("ksmtuned_budget_cow_ksm_rate", "cow_ksm_per_s", "Merged pages broken by writes per second", 1),
            ("ksmtuned_budget_burst_bucket_cpu_seconds", "burst_bucket_cpu_s", "Burst CPU-seconds left in the bucket", 1),
        ):
            if isinstance(b.get(key), (int, float)):
                add((metric, "gauge", help_text, (), [((), b[key] * scale)]))
    memory, merging, profit = [], [], []
    for g in d.guests:
        labels = (g.name, str(g.pid))
        if g.memory_kib is not None:
            memory.append((labels, g.memory_kib * 1024))
        if g.ksm_merging_pages is not None:
            merging.append((labels, g.ksm_merging_pages * d.page_size))
        if g.ksm_profit_bytes is not None:
            profit.append((labels, g.ksm_profit_bytes))
    add(("ksmtuned_guest_memory_bytes", "gauge", "A guest's memory by KSM_PS_METRIC", ("guest", "pid"), memory))
    add(("ksmtuned_guest_ksm_merging_bytes", "gauge", "A guest's memory merged by KSM (ksm_merging_pages x page size)",
         ("guest", "pid"), merging))
    add(("ksmtuned_guest_ksm_profit_bytes", "gauge", "A guest's net KSM saving (ksm_process_profit)",
         ("guest", "pid"), profit))
    return out


def families(d: TickData, version: str) -> Iterator[Metric]:
    """The tick's metric families, as prometheus_client's custom-collector API wants them."""
    for name, kind, help_text, labelnames, samples in rows(d, version):
        if kind == "info":
            m: Metric = InfoMetricFamily(name, help_text, labels=())
            for values, _ in samples:
                m.add_metric((), dict(zip(labelnames, values)))
        elif kind == "summary":
            m = SummaryMetricFamily(name, help_text, labels=labelnames)
            for values, (count, total) in samples:
                m.add_metric(values, count_value=count, sum_value=total)
        else:
            m = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, help_text, labels=labelnames)
            for values, value in samples:
                m.add_metric(values, value)
        yield m


class LastTickCollector:
    """Renders whatever tick was stored last; the reference swap is atomic, so no lock."""

    def __init__(self, version: str):
        self.version = version
        self.data: TickData | None = None

    def describe(self) -> list:
        return []  # registering must not render; names are unique by construction

    def collect(self) -> Iterator[Metric]:
        data = self.data
        if data is not None:
            yield from families(data, self.version)


class Metrics:
    """The HTTP endpoint and the textfile, reconfigured from the settings in force each tick."""

    def __init__(self, version: str, on_error: Callable[[str, str], None] | None = None,
                 on_ok: Callable[[str, str], None] | None = None):
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = LastTickCollector(version)
        self.registry.register(self.collector)
        self.on_error = on_error or (lambda key, msg: log.warning("%s", msg))
        self.on_ok = on_ok or (lambda key, msg: None)
        self.listen: tuple[str, int] | None = None
        self.textfile: str | None = None
        self._server: MetricsServer | None = None
        self._failed_listen: tuple[str, int] | None = None

    def configure(self, listen: tuple[str, int] | None, textfile: str | None) -> None:
        self.textfile = textfile
        if listen == self.listen or (listen is not None and listen == self._failed_listen):
            return
        self.stop_server()
        if listen is None:
            return
        host, port = listen
        try:
            self._server = MetricsServer(host, port, self.render)
        except OSError as e:
            self._failed_listen = listen
            self.on_error("listen", f"cannot serve metrics on {host}:{port}: {e.strerror or e} "
                                    "(fix KSM_METRICS_LISTEN and reload)")
            return
        self.listen, self._failed_listen = listen, None
        log.info("serving metrics on http://%s/metrics", _hostport(host, port))

    def retry_listen(self) -> None:
        """Forget a failed address, so the next configure() tries it again (on reload)."""
        self._failed_listen = None

    def stop_server(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server: MetricsServer | None = None
        self.listen = None

    def render(self) -> bytes:
        """The text exposition (format 0.0.4) of the last tick; empty before the first."""
        return generate_latest(self.registry)

    def update(self, data: TickData) -> None:
        self.collector.data = data
        if self.textfile:
            # no fsync: the file is rewritten every tick and the rename alone keeps it whole
            try:
                atomic_write(Path(self.textfile), self.render(), fsync=False)
            except OSError as e:
                self.on_error("textfile", f"cannot write the metrics textfile {self.textfile}: {e.strerror or e}")
                return
            self.on_ok("textfile", f"metrics textfile {self.textfile} written again")


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
