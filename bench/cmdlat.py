"""Measurement 4: wall time of the short commands, and where `retune` spends its imports.

`retune` runs against a live daemon of ours (fake KSM directory); `status` and
`--once --dry-run` read that fake directory too.

Each command is measured twice.  Installed: the console script a user types, from a throwaway
venv with this checkout installed by pip from a wheel (not editable), on the same interpreter;
that is what users pay.  Dev venv: `python -m ksmtuned` in the checkout with the project's own
venv, whose editable install puts setuptools' import finder (pathlib, re, importlib.util...)
into every start of that interpreter, a cost no installed copy has.  Each interpreter's bare
start (`python -c pass`) is measured alongside as its floor.
"""

from __future__ import annotations

import os
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

from . import common
from .daemons import Ours

RETUNE_TARGET_MS = 60.0
DEV = "dev venv: "  # prefix of the rows measured in the project's editable venv


def install_copy(workdir: Path) -> Path:
    """A throwaway venv on this interpreter with the checkout installed (not editable); its bin dir.

    `pip wheel` builds the checkout with the running Python's setuptools (no build isolation:
    offline; .ci/run installs the setuptools the pyproject asks for), and pip installs that wheel
    with `--python` into a venv created without pip (a few seconds).  The dependencies (sdnotify) come
    from the project's venv through a .pth line: a plain path entry, so none of that venv's own .pth
    files (the editable finder) runs.  Raises RuntimeError when it cannot be built.
    """
    venv = workdir / "venv"
    try:
        subprocess.run([common.python(), "-m", "venv", "--without-pip", str(venv)], check=True,
                       capture_output=True, text=True, timeout=120)
        pip = [common.python(), "-m", "pip", "--disable-pip-version-check", "-q"]
        subprocess.run([*pip, "wheel", "--no-deps", "--no-index", "--no-build-isolation", "--no-cache-dir",
                        "-w", str(workdir), str(common.REPO)],
                       check=True, capture_output=True, text=True, timeout=300, cwd=workdir)
        wheel = next(workdir.glob("ksmtuned-*.whl"))
        subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index",
                        "--no-cache-dir", str(wheel)],
                       check=True, capture_output=True, text=True, timeout=300, cwd=workdir)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{' '.join(e.cmd)} failed (exit {e.returncode}): {e.stderr.strip()[-2000:]}") from None
    py = str(venv / "bin" / "python")
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(purelib, "_ksmtuned_bench_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    # the copy, not the checkout, and no editable finder: else the rows would measure the dev venv again
    check = subprocess.run([py, "-c", "import sys, ksmtuned; print(ksmtuned.__file__); "
                            "print(sorted(m for m in sys.modules if m.startswith('__editable__')))"],
                           capture_output=True, text=True, cwd=workdir)
    where, finders = (check.stdout.splitlines() + ["", ""])[:2]
    if check.returncode != 0 or not where.startswith(purelib) or finders != "[]":
        raise RuntimeError(f"the installed copy imports ksmtuned from {where!r} with finders {finders}: {check.stderr}")
    return venv / "bin"


def _env() -> dict[str, str]:
    """The environment of the measured commands: ours, but free to write bytecode, as users' are
    (a PYTHONDONTWRITEBYTECODE=1 here would recompile the checkout's changed modules every run)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _time(argv: list[str], n: int, cwd: Path) -> tuple[list[float], list[float], list[int]]:
    """Wall times and CPU times (user+sys of the command, from wait4) in ms, and exit codes."""
    times, cpus, codes = [], [], []
    for _ in range(n):
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             cwd=cwd, env=_env())
        _, status, usage = os.wait4(p.pid, 0)
        times.append((time.perf_counter() - t0) * 1000)
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        cpus.append((usage.ru_utime + usage.ru_stime) * 1000)
        codes.append(p.returncode)
    return times, cpus, codes


WATCHED = ("pydantic", "psutil", "prometheus_client", "sdnotify", "typing_extensions", "annotated_types",
           "pydantic_core", "logging", "json", "argparse", "pathlib")


def importtime(argv: list[str], cwd: Path) -> dict:
    """`python -X importtime` of a command (argv[0] the interpreter): total, and the heaviest imports (cumulative us)."""
    p = subprocess.run([argv[0], "-X", "importtime"] + argv[1:], capture_output=True, text=True, cwd=cwd, env=_env())
    rows = []
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line or "self [us]" in line:
            continue
        self_us, cum_us, name_raw = line[len("import time:"):].split("|")
        depth = (len(name_raw) - len(name_raw.lstrip(" ")) - 1) // 2
        rows.append({"module": name_raw.strip(), "self_us": int(self_us), "cumulative_us": int(cum_us),
                     "depth": depth})
    top_level = [r for r in rows if r["depth"] == 0]
    return {
        "modules": len(rows),
        "site_us": sum(r["cumulative_us"] for r in top_level if r["module"] == "site"),
        "editable_finder_us": sum(r["cumulative_us"] for r in rows
                                  if r["module"].startswith("__editable__") and r["depth"] <= 1),
        "ksmtuned_us": sum(r["cumulative_us"] for r in top_level if r["module"].startswith("ksmtuned")),
        "total_us": sum(r["cumulative_us"] for r in top_level),
        "heaviest_top_level": sorted(top_level, key=lambda r: -r["cumulative_us"])[:8],
        "ksmtuned_modules": [r["module"] for r in rows if r["module"].startswith("ksmtuned")],
        "heavy_third_party": sorted({r["module"].split(".")[0] for r in rows if r["module"].split(".")[0] in WATCHED}),
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
    workdir = common.tempdir("cmd")
    installdir = Path(tempfile.mkdtemp(prefix="ksmtuned-bench-install-"))  # on disk, as a user's install
    daemon = Ours("cmd-daemon", workdir, debug=False)
    result: dict = {"runs": n, "processes": common.count_processes(), "commands": {}}
    try:
        t0 = time.monotonic()
        try:
            bindir: Path | None = install_copy(installdir)
            result["install_s"] = round(time.monotonic() - t0, 1)
            log(f"  installed this checkout (wheel, pip, no editable finder) in {result['install_s']} s: {bindir}")
        except RuntimeError as e:  # e.g. a pip without --python: the dev venv rows still tell something
            bindir = None
            result["installed_skipped"] = str(e)
            log(f"  no installed copy, dev venv rows only: {e}")
        result["invoked_as"] = (("ksmtuned = the console script of this checkout installed by pip from a wheel "
                                 "into a throwaway venv (what users run); " if bindir else "")
                                + "dev venv = python -m ksmtuned in the checkout, in the project's editable venv")
        daemon.start()
        pidfile = ["--pidfile", str(daemon.pidfile)]
        tails = {
            "retune": ["retune"] + pidfile,
            "status": ["status"] + pidfile + ["--sysfs", str(daemon.ksm_dir)]
            + ["--state-file", str(daemon.state_file)],
            "--once --dry-run": ["--once", "--dry-run", "--config", str(daemon.conf), "--sysfs", str(daemon.ksm_dir)],
        }
        cmds: dict[str, tuple[list[str], Path]] = {}
        if bindir:
            cmds["python -c pass (floor)"] = ([str(bindir / "python"), "-c", "pass"], installdir)
            cmds.update({f"ksmtuned {t}": ([str(bindir / "ksmtuned")] + argv, installdir) for t, argv in tails.items()})
        cmds[f"{DEV}python -c pass (floor)"] = ([common.python(), "-c", "pass"], common.REPO)
        cmds.update({f"{DEV}python -m ksmtuned {t}": (common.ours_argv(*argv), common.REPO) for t, argv in tails.items()})
        for argv, cwd in cmds.values():  # warm up: page cache, and the checkout's bytecode written
            _time(argv, 1, cwd)
        # round-robin, one run of each command per round: a load that comes and goes hits every row alike
        samples: dict[str, list[tuple[list[float], list[float], list[int]]]] = {name: [] for name in cmds}
        for _ in range(n):
            for name, (argv, cwd) in cmds.items():
                samples[name].append(_time(argv, 1, cwd))
        for name, (argv, _cwd) in cmds.items():
            times, cpus, codes = ([x for s in samples[name] for x in s[i]] for i in range(3))
            bad = [c for c in codes if c != 0]
            result["commands"][name] = {
                "median_ms": common.median(times), "p90_ms": common.percentile(times, 90),
                "min_ms": min(times), "cpu_ms_median": common.median(cpus), "exit_codes": sorted(set(codes)),
            }
            log(f"  {name:<46} median {common.median(times):7.1f} ms  (p90 {common.percentile(times, 90):.1f}, "
                f"min {min(times):.1f}, CPU {common.median(cpus):.1f} ms, exit {sorted(set(codes))})")
            if bad and not name.endswith(" status"):
                raise RuntimeError(f"{name} failed with exit {bad[0]}: {' '.join(argv)}")
        k = 3 if quick else 9
        if bindir:
            result["retune_importtime"] = _median_importtime(
                [importtime([str(bindir / "python"), str(bindir / "ksmtuned")] + tails["retune"], installdir)
                 for _ in range(k)])
            result["floor_importtime"] = _median_importtime(
                [importtime([str(bindir / "python"), "-c", "pass"], installdir) for _ in range(k)])
        result["dev_retune_importtime"] = _median_importtime(
            [importtime(common.ours_argv(*tails["retune"]), common.REPO) for _ in range(k)])
        result["dev_floor_importtime"] = _median_importtime(
            [importtime([common.python(), "-c", "pass"], common.REPO) for _ in range(k)])
        # the daemon got one retune per run: let it finish before it is stopped
        time.sleep(0.2)
    finally:
        daemon.stop()
        common.cleanup(workdir)
        common.cleanup(installdir)
    rows = result["commands"]
    key = "" if "ksmtuned retune" in rows else DEV
    retune = rows["ksmtuned retune" if not key else f"{DEV}python -m ksmtuned retune"]["median_ms"]
    floor = rows[f"{key}python -c pass (floor)"]["median_ms"]
    result["retune_target_ms"] = RETUNE_TARGET_MS
    result["retune_over_floor_ms"] = retune - floor
    return result
