"""ksmd's CPU cost on this machine, per page visit and per wake-up (issue 12's simulator constants).

    python -m bench.calibrate [--mib 128] [--window-s 4] [--json FILE]

As root, with KSM.  For each content kind (zero pages, identical non-zero pages, unique random
pages) a helper process holds MIB MiB of private anonymous memory with that content, opted in
with MADV_MERGEABLE (MADV_NOHUGEPAGE too: KSM does not merge THP-backed pages in practice).
Under the machine's KSM lock (tests/ksmguard.py), held for one kind at a time:

  1. merge: run=2, pages_to_scan=10000, sleep_millisecs=0, run=1; until full_scans reaches 2
     (every page has had its two visits) the ksmd CPU (/proc/<ksmd>/schedstat field 1, ns) per
     page visit (pages_scanned delta): what merging costs;
  2. steady: after merging, windows at several (pages_to_scan, sleep_millisecs): ns of ksmd per
     second, visits per second (pages_scanned), wake-ups per second (schedstat field 3, times
     ksmd was scheduled in); a least-squares fit  ns = a * wake-ups + b * visits  gives the cost
     per wake-up (a) and per re-visit of a page of this content (b).  Unique pages are measured
     with smart_scan on (the default: skipped pages are not visited) and off.

Then the sleep: with pages_to_scan=1, the real period between wake-ups for sleep_millisecs in
1, 2, 4, 5, 10, 20, 50 (msecs_to_jiffies rounds up to whole jiffies; HZ from /proc/config.gz).

Other processes with mergeable memory are reported (they add visits and CPU); nothing is
compared with a target.  Numbers go to stdout as Markdown and to --json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import common
from .common import KSM_DIR

HELPER = r"""
import mmap, os, signal, sys
kind, mib = sys.argv[1], int(sys.argv[2])
PAGE = mmap.PAGESIZE
size = mib << 20
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(15)  # MADV_NOHUGEPAGE (14 is MADV_HUGEPAGE)
if kind == "zero":
    z = bytes(PAGE)
    for off in range(0, size, PAGE):
        m[off:off + PAGE] = z          # a real (written) page full of zeros, not the zero page
elif kind == "identical":
    page = (b"ksmtuned-calibration" * (PAGE // 20 + 1))[:PAGE]
    for off in range(0, size, PAGE):
        m[off:off + PAGE] = page
else:
    chunk = 16 << 20
    for off in range(0, size, chunk):
        m[off:off + chunk] = os.urandom(min(chunk, size - off))
m.madvise(mmap.MADV_MERGEABLE)
print("ready", flush=True)
signal.pause()
"""

STEADY = ((1, 20), (1, 10), (100, 20), (1000, 20), (1000, 5), (4000, 10))
SLEEPS_MS = (1, 2, 4, 5, 10, 20, 50)


def _w(name: str, value) -> None:
    with open(KSM_DIR / name, "w") as f:
        f.write(str(value))


def _r(name: str) -> int:
    return int(common.read_text(KSM_DIR / name).strip() or 0)


def _sched(ksmd: int) -> tuple[int, int]:
    f = common.read_text(f"/proc/{ksmd}/schedstat").split()
    return int(f[0]), int(f[2])


def _snap(ksmd: int) -> dict:
    ns, n = _sched(ksmd)
    return {"t": time.monotonic(), "ns": ns, "wakeups": n, "scanned": _r("pages_scanned"),
            "skipped": _r("pages_skipped") if (KSM_DIR / "pages_skipped").exists() else 0,
            "full_scans": _r("full_scans")}


def _delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in a}


def hz() -> int | None:
    try:
        for line in gzip.open("/proc/config.gz", "rt"):
            if line.startswith("CONFIG_HZ="):
                return int(line.split("=")[1])
    except OSError:
        pass
    return None


class Helper:
    def __init__(self, kind: str, mib: int):
        self.proc = subprocess.Popen([sys.executable, "-c", HELPER, kind, str(mib)], stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"helper {kind} did not start")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _window(ksmd: int, pages: int, sleep_ms: int, window_s: float) -> dict:
    _w("pages_to_scan", pages)
    _w("sleep_millisecs", sleep_ms)
    time.sleep(0.3)
    a = _snap(ksmd)
    time.sleep(window_s)
    d = _delta(a, _snap(ksmd))
    dt = d["t"]
    return {"pages_to_scan": pages, "sleep_ms": sleep_ms, "window_s": round(dt, 2),
            "cpu_pct": round(100 * d["ns"] / 1e9 / dt, 3), "visits_per_s": round(d["scanned"] / dt, 1),
            "skipped_per_s": round(d["skipped"] / dt, 1), "wakeups_per_s": round(d["wakeups"] / dt, 1),
            "ns_per_visit": round(d["ns"] / d["scanned"], 1) if d["scanned"] else None,
            "ns_per_wakeup": round(d["ns"] / d["wakeups"], 0) if d["wakeups"] else None,
            "period_ms": round(1000 * dt / d["wakeups"], 2) if d["wakeups"] else None,
            "_ns": d["ns"], "_visits": d["scanned"], "_wakeups": d["wakeups"]}


def _fit(windows: list[dict]) -> tuple[float | None, float | None]:
    """Least squares ns = a*wakeups + b*visits (no intercept): (a ns/wake-up, b ns/visit)."""
    sww = sum(w["_wakeups"] ** 2 for w in windows)
    svv = sum(w["_visits"] ** 2 for w in windows)
    swv = sum(w["_wakeups"] * w["_visits"] for w in windows)
    swn = sum(w["_wakeups"] * w["_ns"] for w in windows)
    svn = sum(w["_visits"] * w["_ns"] for w in windows)
    det = sww * svv - swv * swv
    if det == 0:
        return None, None
    return (swn * svv - svn * swv) / det, (svn * sww - swn * swv) / det


def measure_kind(kind: str, mib: int, window_s: float, ksmd: int, log) -> dict:
    ksmguard = _guard()
    with ksmguard.exclusive_ksm():
        helper = Helper(kind, mib)
        try:
            foreign = _foreign({os.getpid(), helper.proc.pid})
            _w("run", 2)
            if (KSM_DIR / "advisor_mode").exists() and "[none]" not in common.read_text(KSM_DIR / "advisor_mode"):
                _w("advisor_mode", "none")
            _w("use_zero_pages", 0)
            _w("smart_scan", 1)
            _w("pages_to_scan", 10000)
            _w("sleep_millisecs", 0)
            a = _snap(ksmd)
            _w("run", 1)
            common.wait_for(lambda: _r("full_scans") >= a["full_scans"] + 2, 60, 0.001)
            d = _delta(a, _snap(ksmd))
            merge = {"seconds": round(d["t"], 3), "visits": d["scanned"], "ksmd_cpu_s": round(d["ns"] / 1e9, 4),
                     "ns_per_visit": round(d["ns"] / d["scanned"], 1) if d["scanned"] else None,
                     "cpu_s_per_gib": round(d["ns"] / 1e9 / (mib / 1024), 3),
                     "pages_sharing": _r("pages_sharing"), "pages_shared": _r("pages_shared"),
                     "pages_unshared": _r("pages_unshared")}
            log(f"  {kind}: merge {merge}")
            out = {"merge": merge, "foreign_mergeable": foreign}
            for smart in ((1, 0) if kind == "unique" else (1,)):
                _w("smart_scan", smart)
                if smart == 0:
                    _w("pages_to_scan", 10000)
                    _w("sleep_millisecs", 0)
                    time.sleep(1.0)  # let the skip counters of every page be forgotten in use
                ws = []
                for pages, sleep_ms in STEADY:
                    w = _window(ksmd, pages, sleep_ms, window_s)
                    ws.append(w)
                    log(f"  {kind} smart_scan={smart} {pages}/{sleep_ms} ms: {w['cpu_pct']} % CPU, "
                        f"{w['visits_per_s']} visits/s, {w['wakeups_per_s']} wake-ups/s, {w['ns_per_visit']} ns/visit")
                a_ns, b_ns = _fit(ws)
                out[f"steady_smart_scan_{smart}"] = {
                    "windows": [{k: v for k, v in w.items() if not k.startswith("_")} for w in ws],
                    "fit_ns_per_wakeup": round(a_ns, 0) if a_ns is not None else None,
                    "fit_ns_per_visit": round(b_ns, 1) if b_ns is not None else None}
            return out
        finally:
            helper.stop()


def measure_sleep(window_s: float, ksmd: int, log) -> list[dict]:
    ksmguard = _guard()
    with ksmguard.exclusive_ksm():
        helper = Helper("identical", 16)
        try:
            _w("run", 2)
            _w("pages_to_scan", 1)
            _w("sleep_millisecs", 20)
            _w("run", 1)
            out = []
            for ms in SLEEPS_MS:
                w = _window(ksmd, 1, ms, window_s)
                out.append({"sleep_millisecs": ms, "period_ms": w["period_ms"], "ns_per_wakeup": w["ns_per_wakeup"],
                            "wakeups_per_s": w["wakeups_per_s"]})
                log(f"  sleep {ms} ms: period {w['period_ms']} ms, {w['ns_per_wakeup']} ns per wake-up")
            return out
        finally:
            helper.stop()


def _foreign(exclude: set[int]) -> list[dict]:
    from .outcome import foreign_mergeable

    return foreign_mergeable(exclude)


def _guard():
    from .outcome import _guard

    return _guard()


def markdown(res: dict) -> str:
    L = [f"Measured {res['date']} on {res['kernel']}, HZ={res['hz']}, {res['cpus']} CPUs, "
         f"loadavg {res['loadavg_start']} → {res['loadavg_end']}; `{res['command']}` "
         f"({res['mib']} MiB helper per kind, {res['window_s']} s windows).", "",
         "| content | merge: ksmd CPU per visit | merge: CPU-s per GiB | steady fit: ns per wake-up | "
         "steady fit: ns per re-visit |", "|---|---:|---:|---:|---:|"]
    for kind, k in res["kinds"].items():
        for key, s in k.items():
            if not key.startswith("steady"):
                continue
            label = kind + (" (smart_scan=0)" if key.endswith("_0") else "")
            L.append(f"| {label} | {k['merge']['ns_per_visit']} ns | {k['merge']['cpu_s_per_gib']} | "
                     f"{s['fit_ns_per_wakeup']} | {s['fit_ns_per_visit']} |")
    L += ["", "Steady windows (after merging):", "",
          "| content | smart_scan | pages_to_scan / sleep | ksmd CPU % | visits/s | skipped/s | wake-ups/s | "
          "ns per visit | ns per wake-up | period |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, k in res["kinds"].items():
        for key, s in k.items():
            if key.startswith("steady"):
                for w in s["windows"]:
                    L.append(f"| {kind} | {key[-1]} | {w['pages_to_scan']} / {w['sleep_ms']} ms | {w['cpu_pct']} | "
                             f"{w['visits_per_s']} | {w['skipped_per_s']} | {w['wakeups_per_s']} | {w['ns_per_visit']} | "
                             f"{w['ns_per_wakeup']} | {w['period_ms']} ms |")
    L += ["", "Sleep rounding (pages_to_scan=1):", "", "| sleep_millisecs | real period | ns per wake-up |",
          "|---:|---:|---:|"]
    for s in res["sleep"]:
        L.append(f"| {s['sleep_millisecs']} | {s['period_ms']} ms | {s['ns_per_wakeup']} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=128)
    p.add_argument("--window-s", type=float, default=4.0)
    p.add_argument("--kinds", default="zero,identical,unique")
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    common.require_root("calibration")
    ksmd = common.find_kthread("ksmd")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    import datetime
    import platform

    res = {"date": datetime.datetime.now().isoformat(timespec="minutes"), "kernel": platform.release(), "hz": hz(),
           "cpus": os.cpu_count(), "mib": a.mib, "window_s": a.window_s,
           "command": "python -m bench.calibrate" + "".join(f" {x}" for x in (argv if argv is not None else sys.argv[1:])),
           "loadavg_start": " ".join(common.read_text("/proc/loadavg").split()[:3]), "kinds": {}}
    for kind in a.kinds.split(","):
        res["kinds"][kind] = measure_kind(kind, a.mib, a.window_s, ksmd, log)
    res["sleep"] = measure_sleep(min(a.window_s, 3.0), ksmd, log)
    res["loadavg_end"] = " ".join(common.read_text("/proc/loadavg").split()[:3])
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
