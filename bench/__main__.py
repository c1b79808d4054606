"""python -m bench [--quick] [--out DIR] [--only tick,commands,outcome,budget] [--soak [--soak-seconds N]]

Measures (issue 5): 1-3 CPU per adjust, retune latency and memory, old daemon vs ours, with 200
and 2,000 processes (`tick`); 4 command latency (`commands`); 5 tuning outcome on the real
kernel with real QEMU guests (`outcome`); and, only when asked, the issue-6 soak (`soak`) and
the issue-12 budget benchmark (`budget`: six tuners on six workloads; [--steady-s S]
[--scenarios LIST] [--tuners LIST] [--repeats N] [--interval-s S]), which writes
<out>/<date>-budget.{json,md,png} of its own.
Writes <out>/<date>.json, <date>.md and PNG plots.  A full run writes to bench/results/; a
--quick run (CI smoke test) to a temporary directory unless --out is given.

Exit status: 0 when every measurement ran or was skipped for a missing precondition (not
root, no KSM, no QEMU, no old daemon: each is reported with the reason); 1 when a benchmark
is broken (an unexpected error); 2 on a usage error.  No number is ever compared with a target
here: the numbers are reported, not asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import common, report
from .common import Skip

MEASUREMENTS = ("tick", "commands", "outcome", "soak", "budget")
RESULTS = Path(__file__).resolve().parent / "results"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _host() -> dict:
    mem_kib = 0
    for line in common.read_text("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {"kernel": f"Linux {platform.release()}", "cpus": os.cpu_count(), "mem_gib": mem_kib / 1024 / 1024,
            "python": platform.python_version(), "loadavg_start": _loadavg(), "processes_start": common.count_processes()}


def _loadavg() -> str:
    return " ".join(common.read_text("/proc/loadavg").split()[:3])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="each measurement briefly (CI smoke test)")
    p.add_argument("--out", metavar="DIR", help="results directory (default bench/results, or a temp dir with --quick)")
    p.add_argument("--only", metavar="LIST", help=f"comma-separated subset of {','.join(MEASUREMENTS)}")
    p.add_argument("--soak", action="store_true", help="also run the 10-minute soak (issue 6)")
    p.add_argument("--soak-seconds", type=float, default=600.0, metavar="S", help="soak duration (default 600)")
    p.add_argument("--readme", metavar="PATH", help="also write the README 'Performance' section there")
    p.add_argument("--render", metavar="JSON", help="measure nothing: redo the Markdown, plots (and --readme) "
                                                  "from a results file, next to it")
    p.add_argument("--steady-s", type=float, metavar="S",
                   help="budget: the steady window of the daemons (default 60, 2 with --quick; the issue asks 600)")
    p.add_argument("--scenarios", metavar="LIST", help="budget: a subset of zero,mixed,staggered,churn,unique,thp")
    p.add_argument("--tuners", metavar="LIST", help="budget: a subset of flat,old,ours,budget,defaults,advisor; "
                   "rows not re-run are kept from today's <date>-budget.json")
    p.add_argument("--repeats", type=int, default=1, metavar="N", help="budget: runs of each daemon and flat out")
    p.add_argument("--doc", metavar="PATH", help="budget: also write the 'Measured' section of PATH (docs/budget.md)")
    p.add_argument("--interval-s", type=float, metavar="S", help="budget: KSM_MONITOR_INTERVAL of the daemons "
                   "(default: theirs, 60)")
    args = p.parse_args(argv)
    if args.render:
        path = Path(args.render)
        res = json.loads(path.read_text())
        if "scenarios" in res:  # a budget results file
            return _budget_write(res, path.parent, path.stem, args.doc, [res["command"]])
        return _write(res, path.parent, path.stem, args.readme, broken=False)
    wanted = list(MEASUREMENTS[:3]) + (["soak"] if args.soak else [])
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        bad = [w for w in wanted if w not in MEASUREMENTS]
        if bad:
            p.error(f"unknown measurement(s) {', '.join(bad)}; choose from {', '.join(MEASUREMENTS)}")
    out_dir = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="ksmtuned-bench-")) if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m bench" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    date = datetime.date.today().isoformat()
    res: dict = {"date": date, "command": command, "quick": args.quick, "host": _host(), "measurements": {}}
    previous = out_dir / f"{date}.json"
    if args.only and previous.exists():
        # a partial re-run: keep today's other measurements, say which command made which
        old = json.loads(previous.read_text())
        if old.get("quick") == args.quick:
            res["measurements"] = old.get("measurements", {})
            res["commands"] = list(dict.fromkeys([c for c in old.get("commands", [old.get("command")]) if c] + [command]))
            res["host"]["loadavg_start"] = old.get("host", {}).get("loadavg_start", res["host"]["loadavg_start"])
    broken = False
    if "budget" in wanted:
        wanted.remove("budget")
        broken = _budget(args, out_dir, date, command) != 0
        if not wanted:
            return 1 if broken else 0
    started = time.monotonic()
    for name in wanted:
        _log(f"== {name}")
        t0 = time.monotonic()
        try:
            if name == "tick":
                from . import tickcost
                value = tickcost.run(args.quick, _log)
            elif name == "commands":
                from . import cmdlat
                value = cmdlat.run(args.quick, _log)
            elif name == "outcome":
                from . import outcome
                value = outcome.run(args.quick, _log)
            else:
                from . import soak
                value = soak.run(args.soak_seconds, _log)
        except Skip as e:
            value = {"skipped": str(e)}
            _log(f"   skipped: {e}")
        except Exception as e:  # a broken benchmark: report it, run the others, exit 1
            value = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            broken = True
            _log(f"   BROKEN: {type(e).__name__}: {e}")
            _log(traceback.format_exc())
        value["elapsed_s"] = round(time.monotonic() - t0, 1)
        value["command"] = command
        value["measured_at"] = datetime.datetime.now().isoformat(timespec="seconds")
        res["measurements"][name] = value
    res["host"]["loadavg_end"] = _loadavg()
    res["elapsed_s"] = round(time.monotonic() - started, 1)
    return _write(res, out_dir, date, args.readme, broken)


def _budget(args, out_dir: Path, date: str, command: str) -> int:
    """The issue-12 benchmark: <out>/<date>-budget.{json,md,png}; rows not re-run are kept."""
    from . import budget

    stem = f"{date}-budget"
    path = out_dir / f"{stem}.json"
    previous = None
    if path.exists() and (args.tuners or args.scenarios):
        previous = json.loads(path.read_text())
        if previous.get("quick") != args.quick:
            previous = None
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    res = {"date": date, "command": command, "quick": args.quick, "host": _host()}
    if previous:
        res["commands"] = list(dict.fromkeys(previous.get("commands", [previous.get("command")]) + [command]))
    t0 = time.monotonic()
    _log("== budget")
    rc = 0
    try:
        res.update(budget.run(args.quick, _log, split(args.scenarios), split(args.tuners), args.steady_s,
                              args.interval_s, args.repeats, previous,
                              save=lambda partial: path.with_suffix(".partial.json").write_text(
                                  json.dumps(dict(res, **partial), default=str))))
    except Skip as e:
        _log(f"   skipped: {e}")
        res["skipped"] = str(e)
    except Exception as e:
        _log(f"   BROKEN: {type(e).__name__}: {e}")
        _log(traceback.format_exc())
        res["error"] = f"{type(e).__name__}: {e}"
        rc = 1
    if "scenarios" not in res and path.exists():  # skipped or broken before a row: keep what was measured
        path.with_suffix(".partial.json").unlink(missing_ok=True)
        _log(f"results: {path} kept as it was; this run measured nothing")
        return rc
    if previous and previous.get("notes") and not res.get("notes"):  # a subset re-run keeps the notes
        res["notes"] = previous["notes"]
    res["host"]["loadavg_end"] = _loadavg()
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    _budget_write(res, out_dir, stem, args.doc, [command])
    path.with_suffix(".partial.json").unlink(missing_ok=True)
    _log(f"results: {path}, {stem}.md, {stem}.png ({res['elapsed_s']} s)")
    return rc


def _budget_write(res: dict, out_dir: Path, stem: str, doc_path: str | None, command: list[str]) -> int:
    """<stem>.md, <stem>.png (and the 'Measured' section of doc_path) from a budget result."""
    from . import budget_report

    png = None
    if "scenarios" in res:
        why = budget_report.plot(res, out_dir / f"{stem}.png")
        png = None if why else f"{stem}.png"
        if why:
            _log(f"   no plot: {why}")
        cmds = " and ".join(f"`{c}`" for c in res.get("commands", command)).strip("`")
        (out_dir / f"{stem}.md").write_text(budget_report.markdown(res, png, cmds))
        if doc_path:
            doc = Path(doc_path)
            rel = os.path.relpath(out_dir.resolve(), doc.resolve().parent)
            text = doc.read_text() if doc.exists() else "# The budget policy\n"
            doc.write_text(budget_report.splice_section(text, budget_report.doc_section(
                res, f"{rel}/{stem}.md", f"{rel}/{png}" if png else None, cmds)))
    (out_dir / f"{stem}.json").write_text(json.dumps(res, separators=(",", ":"), default=str) + "\n")
    return 0


def _write(res: dict, out_dir: Path, stem: str, readme: str | None, broken: bool) -> int:
    made, why_no_plots = {}, None
    try:
        made, why_no_plots = report.plots(res, out_dir, stem)
    except Exception as e:
        broken = True
        why_no_plots = f"plotting failed: {type(e).__name__}: {e}"
        _log(traceback.format_exc())
    if why_no_plots:
        res["plots_missing"] = why_no_plots
        _log(f"   no plots: {why_no_plots}")
    res["plots"] = made
    # compact: the samples (for the plots) are most of it; the Markdown is the human-readable part
    (out_dir / f"{stem}.json").write_text(json.dumps(res, separators=(",", ":"), default=str) + "\n")
    (out_dir / f"{stem}.md").write_text(report.markdown(res, made))
    if readme:
        rel = os.path.relpath(out_dir, common.REPO)
        section = report.readme_section(res, f"{rel}/{stem}.md", {k: f"{rel}/{v}" for k, v in made.items()})
        Path(readme).write_text(section + "\n")
    _log(f"results: {out_dir}/{stem}.json, {stem}.md" + "".join(f", {v}" for v in made.values())
         + f" ({res.get('elapsed_s')} s)")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
