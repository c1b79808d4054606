"""Measurements 1-3: CPU per adjust, retune latency, memory; old daemon and ours side by side.

All daemons run at the same time, each in its own cgroup with its own fake KSM directory, and
are ticked round-robin in a shuffled order, so that the machine's noise hits them all alike.
The host's process count is topped up with idle `sleep` processes (200, then 2,000), and three
fake guests (both guest patterns count them) give both daemons a guest to measure.
"""

from __future__ import annotations

import random
import time

from . import common
from .common import FakeGuests, IdleProcesses, Skip
from .daemons import Old, Ours, free_port, metrics_support

WARMUP_TICKS = 3


def variants(oracle, metrics_reason: str | None):
    """(name, class, debug, extra config, needs_oracle)"""
    out = []
    if oracle is not None:
        out += [("old", Old, False, None), ("old+debug", Old, True, None)]
    out += [("ours", Ours, False, None), ("ours+debug", Ours, True, None)]
    if metrics_reason is None:
        out += [("ours+metrics-textfile", Ours, False, "textfile"),
                ("ours+metrics-listen", Ours, False, "listen")]
    return out


def run(quick: bool, log) -> dict:
    common.require_root("the tick-cost benchmark (private mount namespaces, cgroups)")
    if common.cgroup2_root() is None:
        raise Skip("no writable cgroup2 mount (per-daemon CPU accounting with children)")
    oracle = common.find_oracle()
    metrics_reason = metrics_support()
    ticks = 15 if quick else 100
    counts = (200, 2000)
    workdir = common.tempdir("tick")
    daemons = []
    idle = IdleProcesses()
    guests = None
    result: dict = {
        "ticks_per_phase": ticks, "warmup_ticks": WARMUP_TICKS,
        "oracle": str(oracle) if oracle else None,
        "old_missing": None if oracle else f"old daemon not found (set {common.ORACLE_ENV})",
        "metrics_missing": metrics_reason,
        "method": ("CPU: cgroup v2 cpu.stat usage_usec of each daemon's own cgroup (the process and every "
                   "child it forks), per SIGUSR1-driven tick; latency: SIGUSR1 -> IN_CLOSE_WRITE on the fake "
                   "`run` (inotify; wake-up resolution ~0.05 ms); daemons ticked round-robin, shuffled, "
                   f"{WARMUP_TICKS} warm-up ticks dropped; pressure config (KSM_THRES_COEF=99: start+boost "
                   "branch every tick), 3 fake guests"),
        "phases": {},
    }
    try:
        guests = FakeGuests(workdir, 3)
        for name, cls, debug, metrics in variants(oracle, metrics_reason):
            extra = {}
            if metrics == "textfile":
                extra["KSM_METRICS_TEXTFILE"] = workdir / f"{name}.prom"
            elif metrics == "listen":
                extra["KSM_METRICS_LISTEN"] = f"127.0.0.1:{free_port()}"
            kw = {"oracle": oracle} if cls is Old else {}
            d = cls(name, workdir, debug, extra_config=extra, **kw)
            daemons.append(d)
            d.start()
        for target in counts:
            spawned = idle.top_up(target)
            time.sleep(0.5)  # let the new processes settle (exec, page faults) before measuring
            log(f"tick cost: {common.count_processes()} processes on the host ({spawned} idle ones spawned), {ticks} ticks each")
            samples = {d.name: {"cpu_ms": [], "latency_ms": []} for d in daemons}
            counts_seen = []
            guests0 = common.count_guest_like()
            for i in range(WARMUP_TICKS + ticks):
                counts_seen.append(common.count_processes())  # others' tests come and go
                order = list(daemons)
                random.shuffle(order)
                for d in order:
                    cpu_ms, lat_ms = d.tick()
                    if i >= WARMUP_TICKS:
                        samples[d.name]["cpu_ms"].append(cpu_ms)
                        samples[d.name]["latency_ms"].append(lat_ms)
            guests1 = common.count_guest_like()
            phase = {"processes": round(common.median(counts_seen)), "processes_range": [min(counts_seen), max(counts_seen)],
                     "guests_on_host": max(guests0, guests1), "daemons": {}}
            for d in daemons:
                s = samples[d.name]
                phase["daemons"][d.name] = {
                    "kind": d.kind, "debug": d.debug,
                    "cpu_ms_median": common.median(s["cpu_ms"]),
                    "cpu_ms_mean": sum(s["cpu_ms"]) / len(s["cpu_ms"]),
                    "cpu_ms_p90": common.percentile(s["cpu_ms"], 90),
                    "latency_ms_p50": common.percentile(s["latency_ms"], 50),
                    "latency_ms_p90": common.percentile(s["latency_ms"], 90),
                    "rss_kib": d.rss_kib(),
                    "ticks_so_far": d.ticks,
                    "cpu_ms": [round(x, 3) for x in s["cpu_ms"]],
                    "latency_ms": [round(x, 3) for x in s["latency_ms"]],
                }
            _ratios(phase)
            if oracle is not None:
                phase["old_helpers_peak_rss_kib"] = next(d for d in daemons if d.kind == "old").helpers_peak_rss(workdir)
            result["phases"][str(target)] = phase
            for name, v in phase["daemons"].items():
                log(f"  {name:<24} cpu/tick median {v['cpu_ms_median']:8.3f} ms   retune p50 "
                    f"{v['latency_ms_p50']:8.3f} ms p90 {v['latency_ms_p90']:8.3f} ms   rss {v['rss_kib']} KiB")
        result["memory"] = _memory(result, daemons)
    finally:
        for d in daemons:
            try:
                d.stop()
            except Exception as e:  # keep cleaning up the others
                log(f"stopping {d.name}: {e}")
        idle.stop()
        if guests:
            guests.stop()
        common.cleanup(workdir)
    return result


def _ratios(phase: dict) -> None:
    d = phase["daemons"]
    out = {}
    for debug in ("", "+debug"):
        old, ours = d.get("old" + debug), d.get("ours" + debug)
        if old and ours:
            out["old/ours cpu" + debug] = common.ratio(old["cpu_ms_median"], ours["cpu_ms_median"])
            out["old/ours latency p50" + debug] = common.ratio(old["latency_ms_p50"], ours["latency_ms_p50"])
    base = d.get("ours")
    for name, v in d.items():
        if name.startswith("ours+metrics") and base:
            out[f"{name}/ours cpu"] = common.ratio(v["cpu_ms_median"], base["cpu_ms_median"])
    phase["ratios"] = out


def _memory(result: dict, daemons) -> dict:
    """RSS after all ticks (>= 100 in a full run) at the largest process count."""
    last = result["phases"][max(result["phases"], key=int)]
    mem = {"processes": last["processes"]}
    for d in daemons:
        mem[d.name + "_rss_kib"] = d.rss_kib()
        mem[d.name + "_ticks"] = d.ticks
    helpers = last.get("old_helpers_peak_rss_kib")
    if helpers and mem.get("old_rss_kib") and any(helpers.values()):
        biggest = max((k for k in helpers if helpers[k]), key=helpers.get)
        mem["old_largest_helper"] = biggest
        mem["old_loop_plus_largest_helper_kib"] = mem["old_rss_kib"] + helpers[biggest]
        mem["note"] = ("old: VmRSS of the bash loop + peak RSS (ru_maxrss) of its largest per-tick helper; the "
                       "subshells it forks for $(...) are copies of the loop (about the loop's RSS, mostly shared)")
    return mem
