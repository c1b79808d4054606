"""Measurement 4: wall time of the short commands, and where `retune` spends its imports.

`retune` runs against a live daemon of ours (fake KSM directory); `status` and
`--once --dry-run` read that fake directory too.  The command is the console script a user
types (`ksmtuned` next to the interpreter), or `python -m ksmtuned` where there is none; the
bare interpreter's start (`python -c pass`) is measured alongside as the floor.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from . import common
from .daemons import Ours, has_option

RETUNE_TARGET_MS = 60.0


def command_prefix() -> tuple[list[str], str]:
    script = Path(common.python()).parent / "ksmtuned"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)], str(script)
    return common.ours_argv(), "python -m ksmtuned"


def _time(argv: list[str], n: int) -> tuple[list[float], list[float], list[int]]:
    """Wall times and CPU times (user+sys of the command, from wait4) in ms, and exit codes."""
    times, cpus, codes = [], [], []
    for _ in range(n):
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             cwd=common.REPO)
        _, status, usage = os.wait4(p.pid, 0)
        times.append((time.perf_counter() - t0) * 1000)
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        cpus.append((usage.ru_utime + usage.ru_stime) * 1000)
        codes.append(p.returncode)
    return times, cpus, codes


def importtime(argv_tail: list[str], module: bool = True) -> dict:
    """`python -X importtime` of a command: total, and the heaviest imports (cumulative us)."""
    argv = [common.python(), "-X", "importtime"] + (["-m", "ksmtuned"] if module else []) + argv_tail
    p = subprocess.run(argv, capture_output=True, text=True, cwd=common.REPO)
    rows = []
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line or "self [us]" in line:
            continue
        self_us, cum_us, name_raw = line[len("import time:"):].split("|")
        depth = (len(name_raw) - len(name_raw.lstrip(" ")) - 1) // 2
        rows.append({"module": name_raw.strip(), "self_us": int(self_us), "cumulative_us": int(cum_us),
                     "depth": depth})
    top_level = [r for r in rows if r["depth"] == 0]
    def cum(prefix: str) -> int:
        return sum(r["cumulative_us"] for r in rows if r["module"].startswith(prefix) and r["depth"] <= 1)

    return {
        "modules": len(rows),
        "site_us": cum("site"),
        "editable_finder_us": cum("__editable__"),
        "ksmtuned_us": sum(r["cumulative_us"] for r in top_level if r["module"].startswith("ksmtuned")),
        "total_us": sum(r["cumulative_us"] for r in top_level),
        "heaviest_top_level": sorted(top_level, key=lambda r: -r["cumulative_us"])[:8],
        "ksmtuned_modules": [r["module"] for r in rows if r["module"].startswith("ksmtuned")],
        "heavy_third_party": sorted({r["module"].split(".")[0] for r in rows
                                     if r["module"].split(".")[0] in ("pydantic", "psutil", "prometheus_client",
                                                                     "sdnotify", "typing_extensions", "annotated_types",
                                                                     "pydantic_core", "logging", "json")}),
    }


def _median_importtime(runs: list[dict]) -> dict:
    """Per-field medians of several importtime runs (one run is at the mercy of the machine's load)."""
    out = dict(runs[0])
    for key in ("site_us", "editable_finder_us", "ksmtuned_us", "total_us"):
        out[key] = common.median([r[key] for r in runs])
    by_module: dict[str, list[int]] = {}
    for r in runs:
        for row in r["heaviest_top_level"]:
            by_module.setdefault(row["module"], []).append(row["cumulative_us"])
    out["heaviest_top_level"] = sorted(({"module": m, "cumulative_us": common.median(v)} for m, v in by_module.items()),
                                       key=lambda row: -row["cumulative_us"])[:8]
    out["runs"] = len(runs)
    return out


def run(quick: bool, log) -> dict:
    common.require_root("the command benchmark (a daemon of ours on a fake KSM directory)")
    n = 5 if quick else 20
    prefix, how = command_prefix()
    workdir = common.tempdir("cmd")
    daemon = Ours("cmd-daemon", workdir, debug=False)
    result: dict = {"runs": n, "invoked_as": how, "processes": common.count_processes(), "commands": {}}
    try:
        daemon.start()
        cmds = {
            "python -c pass (floor)": [common.python(), "-c", "pass"],
            "ksmtuned retune": prefix + ["retune", "--pidfile", str(daemon.pidfile)],
            # no site (no .pth files: the editable install's import finder is dev-only cost);
            # -m finds ksmtuned in the checkout (cwd); retune needs nothing from site-packages
            "python -S -m ksmtuned retune": [common.python(), "-S", "-m", "ksmtuned", "retune", "--pidfile",
                                             str(daemon.pidfile)],
            "ksmtuned status": prefix + ["status", "--pidfile", str(daemon.pidfile), "--sysfs", str(daemon.ksm_dir)]
            + (["--state-file", str(daemon.state_file)] if has_option("--state-file") else []),
            "ksmtuned --once --dry-run": prefix + ["--once", "--dry-run", "--config", str(daemon.conf),
                                                  "--sysfs", str(daemon.ksm_dir)],
        }
        for name, argv in cmds.items():
            times, cpus, codes = _time(argv, n)
            bad = [c for c in codes if c != 0]
            result["commands"][name] = {
                "median_ms": common.median(times), "p90_ms": common.percentile(times, 90),
                "min_ms": min(times), "cpu_ms_median": common.median(cpus), "exit_codes": sorted(set(codes)),
            }
            log(f"  {name:<28} median {common.median(times):7.1f} ms  (min {min(times):.1f}, CPU "
                f"{common.median(cpus):.1f} ms, exit {sorted(set(codes))})")
            if bad and name != "ksmtuned status":
                raise RuntimeError(f"{name} failed with exit {bad[0]}: {' '.join(argv)}")
        k = 3 if quick else 9
        result["retune_importtime"] = _median_importtime([importtime(["retune", "--pidfile", str(daemon.pidfile)])
                                                          for _ in range(k)])
        result["floor_importtime"] = _median_importtime([importtime(["-c", "pass"], module=False) for _ in range(k)])
        # the daemon got one retune per run: let it finish before it is stopped
        time.sleep(0.2)
    finally:
        daemon.stop()
        common.cleanup(workdir)
    retune = result["commands"]["ksmtuned retune"]["median_ms"]
    floor = result["commands"]["python -c pass (floor)"]["median_ms"]
    result["retune_target_ms"] = RETUNE_TARGET_MS
    result["retune_over_floor_ms"] = retune - floor
    return result
