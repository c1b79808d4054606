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


def _time(argv: list[str], n: int) -> tuple[list[float], list[int]]:
    times, codes = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           cwd=common.REPO)
        times.append((time.perf_counter() - t0) * 1000)
        codes.append(p.returncode)
    return times, codes


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


def run(quick: bool, log) -> dict:
    common.require_root("the command benchmark (a daemon of ours on a fake KSM directory)")
    n = 5 if quick else 20
    prefix, how = command_prefix()
    workdir = common.tempdir("cmd")
    daemon = Ours("cmd-daemon", workdir, debug=False)
    result: dict = {"runs": n, "command": how, "processes": common.count_processes(), "commands": {}}
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
            times, codes = _time(argv, n)
            bad = [c for c in codes if c != 0]
            result["commands"][name] = {
                "median_ms": common.median(times), "p90_ms": common.percentile(times, 90),
                "min_ms": min(times), "exit_codes": sorted(set(codes)),
            }
            log(f"  {name:<28} median {common.median(times):7.1f} ms  (min {min(times):.1f}, exit {sorted(set(codes))})")
            if bad and name != "ksmtuned status":
                raise RuntimeError(f"{name} failed with exit {bad[0]}: {' '.join(argv)}")
        result["retune_importtime"] = importtime(["retune", "--pidfile", str(daemon.pidfile)])
        result["floor_importtime"] = importtime(["-c", "pass"], module=False)
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
