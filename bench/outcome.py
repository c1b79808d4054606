"""Measurement 5: what each tuner buys with ksmd's CPU, on the real kernel with real QEMU guests.

For each tuner, inside tests.ksmguard.exclusive_ksm() (the machine-wide KSM lock; every knob
saved, and restored with run=2 first on the way out, whatever happens), held for one tuner at
a time so that other engineers' tests are not kept waiting for the whole benchmark:
  1. start identical paused QEMU guests with preallocated RAM (THP disabled for them with
     prctl(PR_SET_THP_DISABLE): KSM does not merge THP-backed RAM in practice, KSM.md section 1),
     started with -enable-kvm so that both the old daemon (Debian's pattern) and ours count them;
  2. write run=2 (nothing merged) and the kernel's defaults, run=0: the same start for all;
  3. start the tuner and sample every SAMPLE_S: the guests' merged pages (sum of
     /proc/PID/ksm_merging_pages, which no other process on the host can inflate), the global
     pages_sharing, the knobs, and ksmd's CPU time (/proc/PID/schedstat, ns);
  4. after 90 % of the guests' RAM pages are merged and merging has levelled off, measure
     ksmd's CPU over a short steady-state window: what the tuner keeps paying while memory
     stays tight.
The daemons (old and ours) run against the real /sys/kernel/mm/ksm and the real meminfo with a
pressure config (KSM_THRES_COEF=99: free < threshold, so they start KSM and boost); the old one
sees its config as /etc/ksmtuned.conf through a private mount namespace (the real /etc is never
written).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import common
from .common import KSM_DIR, PAGE_SIZE, Skip
from .daemons import BrokenBenchmark, Old, Ours

TUNERS = ("old", "ours", "advisor", "defaults", "flat")
LABELS = {
    "old": "old daemon (classic rules)",
    "ours": "ours (classic rules)",
    "advisor": "kernel advisor (scan-time)",
    "defaults": "kernel defaults (100 pages/20 ms)",
    "flat": "flat out (10000 pages/0 ms)",
}
SAMPLE_S = 0.1
#: Tuners quick enough to repeat in a full run (the advisor and the kernel defaults take minutes).
FAST = ("old", "ours", "flat")
PR_SET_THP_DISABLE = 41


def _thp_off() -> None:
    """preexec_fn: no transparent huge pages for the guest (inherited by QEMU across exec)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_THP_DISABLE)")


def _guard():
    """tests.ksmguard, imported with the repo root on sys.path."""
    if str(common.REPO) not in sys.path:
        sys.path.insert(0, str(common.REPO))
    from tests import ksmguard

    return ksmguard


def _write(name: str, value) -> None:
    with open(KSM_DIR / name, "w") as f:
        f.write(str(value))


def _read(name: str) -> str:
    text = common.read_text(KSM_DIR / name).strip()
    if "[" in text:
        text = text[text.index("[") + 1: text.index("]")]
    return text


class Guests:
    def __init__(self, workdir: Path, count: int, mib: int, accel: str):
        self.mib = mib
        self.procs = []
        for i in range(count):
            out = open(workdir / f"guest{i}.log", "wb")
            argv = ["qemu-system-x86_64", "-machine", "pc"]
            argv += ["-enable-kvm"] if accel == "kvm" else ["-accel", "tcg"]
            argv += ["-m", f"{mib}M", "-object", f"memory-backend-ram,id=m0,size={mib}M,prealloc=on",
                     "-machine", "memory-backend=m0", "-S", "-nographic", "-display", "none",
                     "-monitor", "none", "-serial", "none", "-nodefaults", "-name", f"guest=ksmbench{i}"]
            self.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                               preexec_fn=_thp_off))
            out.close()
        self.pages = count * mib * 1024 * 1024 // PAGE_SIZE

    def wait_ready(self, timeout_s: float) -> None:
        want = self.mib * 1024 * 0.95

        def ready():
            for p in self.procs:
                if p.poll() is not None:
                    raise BrokenBenchmark(f"QEMU guest exited ({p.returncode}): {' '.join(p.args)}")
            return all((common.rss_kib(p.pid) or 0) >= want for p in self.procs)

        if not common.wait_for(ready, timeout_s, 0.05):
            raise BrokenBenchmark(f"QEMU guests did not preallocate {self.mib} MiB within {timeout_s} s")

    def merged_pages(self) -> int:
        total = 0
        for p in self.procs:
            text = common.read_text(f"/proc/{p.pid}/ksm_merging_pages").strip()
            total += int(text) if text.isdigit() else 0
        return total

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()


def foreign_mergeable(exclude: set[int] = frozenset()) -> list[dict]:
    """Other people's processes with memory opted in to KSM: ksmd scans them too, and slows
    down (or speeds up the global pages_sharing of) whatever tuner is measured."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
            continue
        text = common.read_text(f"/proc/{name}/ksm_stat")
        if "ksm_mergeable yes" in text or "ksm_merge_any yes" in text:
            out.append({"pid": int(name), "comm": common.comm(int(name)), "rss_kib": common.rss_kib(int(name))})
    return out


def wait_for_quiet(timeout_s: float, log) -> list[dict]:
    """Wait (holding no lock) until no foreign process has mergeable memory; what remains."""
    deadline = time.monotonic() + timeout_s
    told = False
    while True:
        foreign = foreign_mergeable({os.getpid()})
        if not foreign or time.monotonic() >= deadline:
            return foreign
        if not told:
            log(f"  waiting up to {timeout_s:.0f} s for other processes with KSM-mergeable memory to exit: "
                + ", ".join(f"{f['comm']} ({f['pid']})" for f in foreign))
            told = True
        time.sleep(5)


def preconditions() -> tuple[str, str]:
    """(qemu path, accel) or Skip."""
    common.require_root("the tuning-outcome benchmark (real KSM knobs)")
    if not (KSM_DIR / "run").exists():
        raise Skip("this kernel has no KSM (/sys/kernel/mm/ksm/run missing)")
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise Skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    if not Path("/proc/self/ksm_merging_pages").exists():
        raise Skip("kernel without /proc/PID/ksm_merging_pages (needs >= 5.19)")
    errors = []
    for accel in (["kvm"] if os.access("/dev/kvm", os.R_OK | os.W_OK) else []) + ["tcg"]:
        why = _probe(accel)
        if why is None:
            return qemu, accel
        errors.append(f"-accel {accel}: {why}")
    raise Skip("QEMU cannot start a guest here: " + "; ".join(errors))


def _probe(accel: str) -> str | None:
    """Start a tiny guest (16 MiB, killed at once); None if it runs, else QEMU's complaint."""
    workdir = common.tempdir("probe")
    try:
        g = Guests(workdir, 1, 16, accel)
        try:
            g.wait_ready(20)
            return None
        except BrokenBenchmark as e:
            text = common.read_text(workdir / "guest0.log").strip()
            return (text.splitlines()[-1] if text else str(e))[:200]
        finally:
            g.stop()
    finally:
        common.cleanup(workdir)


def run(quick: bool, log) -> dict:
    qemu, accel = preconditions()
    ksmguard = _guard()
    ksmd = common.find_kthread("ksmd")
    if ksmd is None:
        raise Skip("no ksmd kernel thread")
    oracle = common.find_oracle()
    has_advisor = (KSM_DIR / "advisor_mode").exists()
    params = {
        "guests": 2 if quick else 3, "guest_mib": 64 if quick else 256, "accel": accel,
        "interval_s": 1 if quick else 2, "timeout_s": 15 if quick else 300,
        "settle_max_s": 3 if quick else 20, "steady_window_s": 2 if quick else 10, "sample_s": SAMPLE_S,
        "quiet_wait_s": 0 if quick else 180, "repeats": 1 if quick else 3,
    }
    result: dict = {"params": params, "tuners": {}, "tuners_skipped": {}, "lock_held_s": {}}
    workdir = common.tempdir("outcome")
    try:
        _all(result, params, workdir, ksmguard, ksmd, oracle, has_advisor, log)
    finally:
        common.cleanup(workdir)
    return result


def _all(result, params, workdir, ksmguard, ksmd, oracle, has_advisor, log) -> None:
    available = []
    for tuner in TUNERS:
        if tuner == "old" and oracle is None:
            result["tuners_skipped"][tuner] = f"old daemon not found (set {common.ORACLE_ENV})"
        elif tuner == "advisor" and not has_advisor:
            result["tuners_skipped"][tuner] = "kernel without the KSM advisor (advisor_mode, >= 6.8)"
        else:
            available.append(tuner)
    # Round 1 runs every tuner; further rounds repeat the fast ones (the slow kernel tuners take
    # minutes each), interleaved so that the machine's noise hits them alike.
    plan = [t for i in range(params["repeats"]) for t in available if i == 0 or t in FAST]
    runs: dict[str, list[dict]] = {t: [] for t in available}
    for tuner in plan:
        n = len(runs[tuner])
        log(f"outcome: {LABELS[tuner]} (run {n + 1}) ...")
        wait_for_quiet(params["quiet_wait_s"], log)
        with ksmguard.exclusive_ksm():
            t_lock = time.monotonic()
            try:
                r = _one(tuner, params, workdir / f"{tuner}-{n}", ksmd, oracle)
            finally:
                result["lock_held_s"].setdefault(tuner, []).append(round(time.monotonic() - t_lock, 1))
        runs[tuner].append(r)
        log(f"  t50 {_fmt(r['t50_s'])} s, t90 {_fmt(r['t90_s'])} s, ksmd CPU to 90 % {_fmt(r['ksmd_cpu_s_to_90'])} s, "
            f"steady ksmd {_fmt(r['steady_ksmd_cpu_pct'])} %, merged {r['final_merged_fraction']:.2f}"
            + (f"; other mergeable processes: {r['foreign_mergeable_mib']} MiB" if r["foreign_mergeable"] else ""))
    for tuner, rs in runs.items():
        result["tuners"][tuner] = _combine(rs)


MEDIAN_KEYS = ("t50_s", "t90_s", "ksmd_cpu_s_to_50", "ksmd_cpu_s_to_90", "steady_ksmd_cpu_pct",
               "final_merged_fraction", "tuner_process_cpu_s")


def _combine(rs: list[dict]) -> dict:
    """Medians over the runs of one tuner; the samples (for the plot) of the run nearest the median t90."""
    out = {k: common.median([r[k] for r in rs]) for k in MEDIAN_KEYS}
    for k in ("t90_s", "t50_s"):
        if any(r[k] is None for r in rs) and sum(r[k] is None for r in rs) * 2 >= len(rs):
            out[k] = None  # most runs never got there
    t90 = out["t90_s"]
    pick = min(rs, key=lambda r: abs((r["t90_s"] or 1e9) - (t90 or 1e9)))
    foreign = {f["pid"]: f for r in rs for f in r["foreign_mergeable"]}
    out.update({
        "runs": len(rs),
        "runs_timed_out": sum(r["timed_out"] for r in rs),
        "timed_out": out["t90_s"] is None,
        "guest_pages": rs[0]["guest_pages"],
        "steady_pages_to_scan": pick["steady_pages_to_scan"], "steady_sleep_millisecs": pick["steady_sleep_millisecs"],
        "final_pages_sharing": pick["final_pages_sharing"],
        "foreign_mergeable": list(foreign.values()),
        "foreign_mergeable_mib": round(sum((f["rss_kib"] or 0) for f in foreign.values()) / 1024, 1),
        "each_run": [{k: r[k] for k in MEDIAN_KEYS + ("timed_out", "foreign_mergeable_mib")} for r in rs],
        "samples": pick["samples"],
    })
    return out


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _one(tuner: str, params: dict, workdir: Path, ksmd: int, oracle: Path | None) -> dict:
    tdir = workdir
    tdir.mkdir()
    guests = Guests(tdir, params["guests"], params["guest_mib"], params["accel"])
    daemon = None
    try:
        guests.wait_ready(60)
        mine = {os.getpid()} | {p.pid for p in guests.procs}
        foreign_start = foreign_mergeable(mine)
        # the same start for every tuner: nothing merged, kernel defaults, ksmd stopped
        _write("run", 2)
        if (KSM_DIR / "advisor_mode").exists() and _read("advisor_mode") != "none":
            _write("advisor_mode", "none")
        _write("pages_to_scan", 100)
        _write("sleep_millisecs", 20)
        _write("run", 0)
        ns0 = common.runtime_ns(ksmd)
        t0 = time.monotonic()
        if tuner in ("old", "ours"):
            cls = Old if tuner == "old" else Ours
            kw = {"oracle": oracle} if tuner == "old" else {}
            daemon = cls(tuner, tdir, debug=True, interval_s=params["interval_s"], ksm_dir=KSM_DIR, **kw)
            daemon.start()
        elif tuner == "advisor":
            _write("advisor_mode", "scan-time")
            _write("run", 1)
        elif tuner == "defaults":
            _write("run", 1)
        elif tuner == "flat":
            _write("pages_to_scan", 10000)
            _write("sleep_millisecs", 0)
            _write("run", 1)
        samples = _sample(guests, ksmd, ns0, t0, params, daemon)
        foreign_end = foreign_mergeable(mine)
    finally:
        tuner_cpu_s = None
        if daemon is not None:
            try:
                tuner_cpu_s = daemon.cgroup.usage_usec() / 1e6
            except Exception:
                pass
            daemon.stop()
        guests.stop()
    r = _summarise(samples, guests.pages, params, tuner_cpu_s)
    foreign = {f["pid"]: f for f in foreign_start + foreign_end}
    r["foreign_mergeable"] = list(foreign.values())
    r["foreign_mergeable_mib"] = round(sum((f["rss_kib"] or 0) for f in foreign.values()) / 1024, 1)
    return r


def _sample(guests: Guests, ksmd: int, ns0: int, t0: float, params: dict, daemon) -> list[dict]:
    samples = []
    t90 = None
    settled_at = None
    steady_end = None
    deadline = t0 + params["timeout_s"]
    next_t = t0
    while True:
        now = time.monotonic()
        if daemon is not None and not daemon.alive():
            raise BrokenBenchmark(f"{daemon.name} died during the outcome run:\n{daemon.tail()}")
        s = {
            "t": now - t0,
            "merged": guests.merged_pages(),
            "pages_sharing": int(_read("pages_sharing") or 0),
            "ksmd_cpu_s": (common.runtime_ns(ksmd) - ns0) / 1e9,
            "pages_to_scan": int(_read("pages_to_scan") or 0),
            "sleep_millisecs": int(_read("sleep_millisecs") or 0),
            "run": int(_read("run") or 0),
        }
        samples.append(s)
        if t90 is None and s["merged"] >= 0.9 * guests.pages:
            t90 = now
        if t90 is not None and settled_at is None:
            # merging has levelled off: under 0.2 % of the guests' pages more in the last second
            back = [x for x in samples if x["t"] >= s["t"] - 1.0]
            if (s["t"] - back[0]["t"] >= 0.9 and s["merged"] - back[0]["merged"] < 0.002 * guests.pages) \
                    or now - t90 > params["settle_max_s"]:
                settled_at = now
                steady_end = now + params["steady_window_s"]
                s["steady_start"] = True
        if steady_end is not None and now >= steady_end:
            break
        if t90 is None and now >= deadline:
            break
        next_t += params["sample_s"]
        time.sleep(max(0.0, next_t - time.monotonic()))
    return samples


def _cross(samples: list[dict], pages: int, share: float):
    for s in samples:
        if s["merged"] >= share * pages:
            return s
    return None


def _summarise(samples: list[dict], pages: int, params: dict, tuner_cpu_s) -> dict:
    s50, s90 = _cross(samples, pages, 0.5), _cross(samples, pages, 0.9)
    steady_pct = None
    start = next((i for i, s in enumerate(samples) if s.get("steady_start")), None)
    if start is not None and samples[-1]["t"] > samples[start]["t"]:
        a, b = samples[start], samples[-1]
        steady_pct = 100.0 * (b["ksmd_cpu_s"] - a["ksmd_cpu_s"]) / (b["t"] - a["t"])
    last = samples[-1]
    step = max(1, len(samples) // 400)  # keep the JSON small
    return {
        "guest_pages": pages,
        "t50_s": s50["t"] if s50 else None,
        "t90_s": s90["t"] if s90 else None,
        "ksmd_cpu_s_to_50": s50["ksmd_cpu_s"] if s50 else None,
        "ksmd_cpu_s_to_90": s90["ksmd_cpu_s"] if s90 else None,
        "steady_ksmd_cpu_pct": steady_pct,
        "steady_pages_to_scan": last["pages_to_scan"], "steady_sleep_millisecs": last["sleep_millisecs"],
        "final_merged_fraction": last["merged"] / pages,
        "final_pages_sharing": last["pages_sharing"],
        "tuner_process_cpu_s": tuner_cpu_s,
        "timed_out": s90 is None,
        "samples": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}
                    for s in samples[::step]],
    }
