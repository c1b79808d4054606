"""Churn under smart scan: the churn helper alone (bench/mergeable.py 128 MiB churn: each page
rewritten every 20 s, then left with its old content), ksmd at one fixed rate (200 pages per
100 ms), smart scan on, then off; the truly merged pages (bench/truecount.py) every 15 s.

Why: a smart-scan age (mm/ksm.c, the rmap item's ``age``) grows with each visit to a page
that is not a KSM page and is never reset by a merge, so a page merged, broken and merged
again keeps aging until it is visited only every 9th pass.  Run as root:
``python -m bench.churn_aging [SECONDS_EACH] [--out FILE]`` (300 s each by default).  Takes the
machine's KSM lock (tests/ksmguard.py), restores every knob after.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import truecount
from tests import ksmguard

KSM = Path("/sys/kernel/mm/ksm")
REPO = Path(__file__).resolve().parent.parent


def _w(name: str, value: object) -> None:
    (KSM / name).write_text(str(value))


def _r(name: str) -> int:
    return int((KSM / name).read_text())


def one(smart: int, seconds: float, log) -> list[dict]:
    _w("run", 2)
    _w("smart_scan", smart)
    p = subprocess.Popen([sys.executable, "-m", "bench.mergeable", "128", "churn"], cwd=REPO,
                         stdout=subprocess.PIPE, text=True)
    rows = []
    try:
        assert p.stdout.readline().strip() == "ready"
        _w("pages_to_scan", 200)
        _w("sleep_millisecs", 100)
        _w("run", 1)
        t0, fs0, sk0, sc0 = time.monotonic(), _r("full_scans"), _r("pages_skipped"), _r("pages_scanned")
        while time.monotonic() - t0 < seconds:
            time.sleep(15)
            tc = truecount.true_merged([p.pid]) or {}
            row = {"smart_scan": smart, "t_s": round(time.monotonic() - t0), "true_saved": tc.get("saved"),
                   "passes": _r("full_scans") - fs0, "skipped": _r("pages_skipped") - sk0,
                   "scanned": _r("pages_scanned") - sc0}
            rows.append(row)
            log(json.dumps(row))
    finally:
        p.kill()
        p.wait()
    return rows


def main(argv=None) -> int:
    a = argparse.ArgumentParser(prog="python -m bench.churn_aging", description=__doc__.split("\n\n")[0])
    a.add_argument("seconds", nargs="?", type=float, default=300.0, help="each phase (default 300)")
    a.add_argument("--out", help="write the samples and a summary here (JSON)")
    args = a.parse_args(argv)
    rows: list[dict] = []
    with ksmguard.exclusive_ksm():
        saved = ksmguard.snapshot()
        try:
            for smart in (1, 0):
                rows += one(smart, args.seconds, lambda s: print(s, flush=True))
        finally:
            _w("run", 2)
            ksmguard.restore(saved)
    summary = {}
    for smart in (1, 0):
        late = [r for r in rows if r["smart_scan"] == smart and r["t_s"] >= 120 and r["true_saved"] is not None]
        last = [r for r in rows if r["smart_scan"] == smart][-1]
        summary[f"smart_scan={smart}"] = {
            "mean_true_saved_after_120_s": round(sum(r["true_saved"] for r in late) / len(late)) if late else None,
            "seconds_per_pass": round(last["t_s"] / last["passes"], 1) if last["passes"] else None}
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(["python -m bench.churn_aging", *(argv or sys.argv[1:])]),
                                              "date": time.strftime("%Y-%m-%d"), "summary": summary,
                                              "samples": rows}, separators=(",", ":")) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
