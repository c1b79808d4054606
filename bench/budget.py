"""Measurement `budget` (issue 12): six tuners on six KSM workloads, on the real kernel with QEMU.

Scenarios (each from the same clean start: run=2 and wait until nothing is merged, kernel
defaults, THP `enabled=never` unless the scenario says otherwise, every knob restored after):
  zero       identical zero-filled paused guests (memory-backend-ram, prealloc);
  mixed      guests whose RAM is a private copy of a pattern file (memory-backend-file,
             share=off, prealloc=on): 60 % pages common to all guests, 10 % zero, 30 % unique;
  staggered  mixed guests started one after another (each measured from its own start);
  churn      zero guests plus a helper whose mergeable memory keeps being rewritten (each
             second a new slice of it gets random data, the previous slice the common content
             back: merged pages broken by writes, and re-mergeable);
  unique     guests of unique random content only: nothing to merge;
  thp        zero guests with THP left on (`enabled=always`, no PR_SET_THP_DISABLE).
Tuners: the old bash daemon, ours with the classic policy, ours with KSM_POLICY=budget (when
this checkout has it), flat out (10000 pages / 0 ms), kernel defaults (100 / 20 ms), the kernel
advisor (advisor_mode=scan-time).  The daemons run with their default settings plus a pressure
config (KSM_THRES_COEF=100: free memory is always under the threshold, the classic rules keep
KSM on).

Flat out runs first in each scenario: what it merges (the guests' and helper's
ksm_merging_pages, which no foreign process can inflate) is the 100 % the other tuners' times
to 50 % and 90 % are measured against.  Pages saved = the kernel's pages_sharing.  After 90 %
(or the merge timeout) and a settle, ksmd's CPU is measured over the steady window
(`--steady-s`; tuners with a fixed rate - flat out, kernel defaults, advisor - get at most
FIXED_STEADY_S of it: their rate does not change).  One (scenario, tuner) run holds the KSM
machine lock (tests/ksmguard.py); other helpers' tests can run in between.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import common, truecount
from .common import KSM_DIR, PAGE_SIZE, Skip
from .daemons import BrokenBenchmark, Old, Ours
from .outcome import _guard, _thp_off, foreign_mergeable, preconditions, wait_for_quiet

SCENARIOS = ("zero", "mixed", "staggered", "churn", "unique", "thp")
SCENARIO_LABELS = {
    "zero": "1 identical zero-filled guests",
    "mixed": "2 mixed content (60 % common, 10 % zero, 30 % unique)",
    "staggered": "3 mixed guests started one after another",
    "churn": "4 churn (zero guests + a helper rewriting its mergeable memory)",
    "unique": "5 nothing to merge (unique content only)",
    "thp": "6 THP left on (zero guests, enabled=always)",
}
TUNERS = ("flat", "old", "ours", "budget", "defaults", "advisor")
LABELS = {
    "flat": "flat out (10000 pages / 0 ms)",
    "old": "old daemon (classic)",
    "ours": "ours (classic)",
    "budget": "ours (budget)",
    "defaults": "kernel defaults (100 / 20 ms)",
    "advisor": "kernel advisor (scan-time)",
}
ADAPTIVE = ("old", "ours", "budget")
FIXED_STEADY_S = 20.0
#: a pause between two runs, outside the lock, so that other helpers' KSM tests slip in
LOCK_GAP_S = 1.0
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
VMSTAT = Path("/proc/vmstat")
#: the share of guest pages that are common / zero; the rest is unique (scenario mixed)
MIX = (0.6, 0.1)


def params_for(quick: bool, steady_s: float | None, interval_s: float | None) -> dict:
    if quick:
        p = {"guests": 2, "guest_mib": 32, "merge_timeout_s": 8, "settle_max_s": 2, "steady_s": 2.0,
             "sample_s": 0.1, "stagger_s": 2.0, "churn_mib": 16, "quiet_wait_s": 0, "flat_min_s": 1.5}
    else:
        p = {"guests": 3, "guest_mib": 256, "merge_timeout_s": 120, "settle_max_s": 15, "steady_s": 60.0,
             "sample_s": 0.2, "stagger_s": 20.0, "churn_mib": 128, "quiet_wait_s": 120, "flat_min_s": 4.0}
    if steady_s is not None:
        p["steady_s"] = steady_s
    p["interval_s"] = interval_s  # None: the daemons' default KSM_MONITOR_INTERVAL (60 s)
    p["churn_fraction"], p["churn_period_s"] = 0.05, 1.0
    p["mix_common"], p["mix_zero"] = MIX
    return p


def budget_support() -> str | None:
    """None when this checkout's daemon runs KSM_POLICY=budget (the setting, and the loop using
    it: the setting lands first on the `budget` branch), else why not."""
    pkg = common.REPO / "ksmtuned"
    has = lambda where, word: any(word in common.read_text(f) for f in where)  # noqa: E731
    if not has(pkg.rglob("*.py"), "KSM_POLICY"):
        return "this checkout has no KSM_POLICY setting yet (branch `budget` not merged)"
    if not has((pkg / "engine").rglob("*.py"), "budget"):
        return "this checkout's daemon loop (ksmtuned/engine) does not use the budget policy yet"
    return None


# --- workloads ------------------------------------------------------------------------------


def write_pattern(path: Path, mib: int, seed: int, common_pages: bytes | None, zero_frac: float,
                  common_frac: float) -> None:
    """A guest RAM image: page i is common (the same in every guest's image), zero, or unique
    (random, different in every image), interleaved in a fixed order of ten pages."""
    n = (mib << 20) // PAGE_SIZE
    rng = random.Random(seed)
    zero = bytes(PAGE_SIZE)
    n_common = round(10 * common_frac)
    n_zero = round(10 * zero_frac)
    ci = 0
    with open(path, "wb") as f:
        for i0 in range(0, n, 10):
            chunk = []
            for j in range(min(10, n - i0)):
                if j < n_common and common_pages is not None:
                    chunk.append(common_pages[ci * PAGE_SIZE:(ci + 1) * PAGE_SIZE])
                    ci += 1
                elif j < n_common + n_zero:
                    chunk.append(zero)
                else:
                    chunk.append(rng.randbytes(PAGE_SIZE))
            f.write(b"".join(chunk))


class Guest:
    def __init__(self, workdir: Path, i: int, mib: int, accel: str, image: Path | None, thp: bool):
        self.mib, self.name = mib, f"ksmbench{i}"
        out = open(workdir / f"guest{i}.log", "wb")
        argv = ["qemu-system-x86_64", "-machine", "pc"]
        argv += ["-enable-kvm"] if accel == "kvm" else ["-accel", "tcg"]
        backend = (f"memory-backend-file,id=m0,size={mib}M,mem-path={image},share=off,prealloc=on" if image
                   else f"memory-backend-ram,id=m0,size={mib}M,prealloc=on")
        argv += ["-m", f"{mib}M", "-object", backend, "-machine", "memory-backend=m0", "-S", "-nographic",
                 "-display", "none", "-monitor", "none", "-serial", "none", "-nodefaults", "-name", f"guest={self.name}"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     preexec_fn=None if thp else _thp_off)
        out.close()
        self.pid = self.proc.pid
        self.started = time.monotonic()
        self.ready_at: float | None = None
        self.pages = (mib << 20) // PAGE_SIZE

    def is_ready(self) -> bool:
        if self.ready_at is None:
            if self.proc.poll() is not None:
                raise BrokenBenchmark(f"QEMU guest exited ({self.proc.returncode}): {' '.join(self.proc.args)}")
            if (common.rss_kib(self.pid) or 0) >= self.mib * 1024 * 0.95:
                self.ready_at = time.monotonic()
        return self.ready_at is not None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Churn:
    def __init__(self, mib: int, fraction: float, period_s: float):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("mergeable.py")), str(mib), "churn",
                                      str(fraction), str(period_s)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        if self.proc.stdout.readline().strip() != b"ready":
            raise BrokenBenchmark("the churn helper did not start")
        self.pid = self.proc.pid
        self.pages = (mib << 20) // PAGE_SIZE

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def merging_pages(pid: int) -> int:
    text = common.read_text(f"/proc/{pid}/ksm_merging_pages").strip()
    return int(text) if text.isdigit() else 0


# --- knobs ----------------------------------------------------------------------------------


def _w(path_or_name, value) -> None:
    path = path_or_name if isinstance(path_or_name, Path) else KSM_DIR / path_or_name
    with open(path, "w") as f:
        f.write(str(value))


def _r(name: str) -> str:
    text = common.read_text(KSM_DIR / name).strip()
    if "[" in text:
        text = text[text.index("[") + 1: text.index("]")]
    return text


def _ri(name: str) -> int:
    t = _r(name)
    return int(t) if t.lstrip("-").isdigit() else 0


def thp_mode() -> str | None:
    text = common.read_text(THP).strip()
    return text[text.index("[") + 1: text.index("]")] if "[" in text else None


def cow_ksm() -> int:
    for line in common.read_text(VMSTAT).splitlines():
        if line.startswith("cow_ksm "):
            return int(line.split()[1])
    return 0


def clean_start() -> None:
    """run=2 until nothing is merged, then the kernel's defaults, ksmd stopped."""
    _w("run", 2)
    common.wait_for(lambda: _ri("pages_shared") == 0 and _ri("pages_sharing") == 0, 60, 0.05)
    if (KSM_DIR / "advisor_mode").exists() and _r("advisor_mode") != "none":
        _w("advisor_mode", "none")
    for name, value in (("smart_scan", 1), ("use_zero_pages", 0), ("max_page_sharing", 256)):
        if (KSM_DIR / name).exists() and _r(name) != str(value):
            _w(name, value)
    _w("pages_to_scan", 100)
    _w("sleep_millisecs", 20)
    _w("run", 0)


# --- one run --------------------------------------------------------------------------------


def run_one(scenario: str, tuner: str, p: dict, workdir: Path, ksmd: int, accel: str, oracle: Path | None,
            images: list[Path] | None, ref: dict | None, log) -> dict:
    """One tuner on one scenario, under the KSM machine lock; the samples and the summary."""
    workdir.mkdir(parents=True)
    ksmguard = _guard()
    wait_for_quiet(p["quiet_wait_s"], log)
    load0 = common.read_text("/proc/loadavg").split()[:3]
    with ksmguard.exclusive_ksm():
        t_lock = time.monotonic()
        thp_saved = thp_mode()
        guests: list[Guest] = []
        churn = None
        daemon = None
        try:
            want_thp = "always" if scenario == "thp" else "never"
            if thp_saved is not None and thp_saved != want_thp:
                _w(THP, want_thp)
            thp = scenario == "thp"
            if scenario != "staggered":
                guests = [Guest(workdir, i, p["guest_mib"], accel, images[i] if images else None, thp)
                          for i in range(p["guests"])]
                if not common.wait_for(lambda: all(g.is_ready() for g in guests), 90, 0.05):
                    raise BrokenBenchmark(f"guests did not preallocate {p['guest_mib']} MiB within 90 s")
            if scenario == "churn":
                churn = Churn(p["churn_mib"], p["churn_fraction"], p["churn_period_s"])
            mine = {os.getpid()} | {g.pid for g in guests} | ({churn.pid} if churn else set())
            foreign_start = foreign_mergeable(mine)
            clean_start()
            ns0 = common.runtime_ns(ksmd)
            cow0 = cow_ksm()
            t0 = time.monotonic()
            if tuner in ADAPTIVE:
                extra = {"KSM_THRES_COEF": 100}
                if p["interval_s"] is not None:
                    extra["KSM_MONITOR_INTERVAL"] = p["interval_s"]
                if tuner == "budget":
                    extra["KSM_POLICY"] = "budget"
                cls = Old if tuner == "old" else Ours
                kw = {"oracle": oracle} if tuner == "old" else {}
                daemon = cls(tuner, workdir, debug=True, extra_config=extra, ksm_dir=KSM_DIR,
                             interval_s=p["interval_s"] or 60, **kw)
                daemon.start()
            elif tuner == "advisor":
                _w("advisor_mode", "scan-time")
                _w("run", 1)
            elif tuner == "defaults":
                _w("run", 1)
            elif tuner == "flat":
                _w("pages_to_scan", 10000)
                _w("sleep_millisecs", 0)
                _w("run", 1)
            samples, events = _sample(scenario, tuner, p, workdir, accel, images, thp, guests, churn, ksmd, ns0,
                                      cow0, t0, ref, daemon)
            foreign_end = foreign_mergeable(mine | {g.pid for g in guests})
        finally:
            daemon_cpu_s = None
            daemon_log = ""
            if daemon is not None:
                try:
                    daemon_cpu_s = daemon.cgroup.usage_usec() / 1e6
                except Exception:
                    pass
                # the whole output: the THP warning comes at the start, a tail would lose it
                daemon.output.flush()
                daemon_log = common.read_text(daemon.logfile) + "\n" + common.read_text(daemon.dir / "output")
                daemon.stop()
            for g in guests:
                g.stop()
            if churn:
                churn.stop()
            if thp_saved is not None and thp_mode() != thp_saved:
                _w(THP, thp_saved)
        lock_s = time.monotonic() - t_lock
    # the lock is polled every 0.1 s by the others (tests.ksmguard): give them a chance to get it
    time.sleep(LOCK_GAP_S)
    load1 = common.read_text("/proc/loadavg").split()[:3]
    r = summarise(scenario, tuner, samples, events, guests, churn, p, ref)
    r.update({"daemon_cpu_s": daemon_cpu_s, "lock_held_s": round(lock_s, 1), "loadavg": [" ".join(load0), " ".join(load1)],
              "foreign_mergeable": foreign_start + foreign_end})
    if daemon is not None:
        # the warning about *our* guests (other people's processes get THP warnings too)
        thp_lines = [x for x in daemon_log.splitlines() if "transparent huge pages" in x.lower() and "ksmbench" in x]
        r["thp_warning"] = bool(thp_lines)
        r["thp_warning_lines"] = thp_lines[:3]
        r["daemon_log_tail"] = daemon_log[-1500:]
    return r


def _sample(scenario, tuner, p, workdir, accel, images, thp, guests, churn, ksmd, ns0, cow0, t0, ref, daemon):
    """Sample until merged (and settled) and the steady window is over; guests started on schedule."""
    samples: list[dict] = []
    events: list[dict] = []
    staggered = scenario == "staggered"
    to_start = list(range(p["guests"])) if staggered else []
    target = None
    if ref and ref.get("final_merged"):
        target = ref["final_merged"]
    steady_s = p["steady_s"] if tuner in ADAPTIVE else min(p["steady_s"], FIXED_STEADY_S)
    reached_at = settled_at = None
    next_t = t0
    deadline = t0 + p["merge_timeout_s"] + (p["stagger_s"] * (p["guests"] - 1) if staggered else 0)
    while True:
        now = time.monotonic()
        rel = now - t0
        while to_start and rel >= to_start[0] * p["stagger_s"]:
            i = to_start.pop(0)
            guests.append(Guest(workdir, i, p["guest_mib"], accel, images[i] if images else None, thp))
            events.append({"t": round(rel, 2), "event": f"guest {i} started"})
        for g in guests:
            if g.ready_at is None and g.is_ready():
                events.append({"t": round(g.ready_at - t0, 2), "event": f"guest {guests.index(g)} ready"})
        if daemon is not None and not daemon.alive():
            raise BrokenBenchmark(f"{daemon.name} died:\n{daemon.tail()}")
        per_guest = [merging_pages(g.pid) for g in guests]
        s = {"t": round(rel, 3), "merged": sum(per_guest) + (merging_pages(churn.pid) if churn else 0),
             "guest_merged": per_guest, "pages_sharing": _ri("pages_sharing"), "pages_shared": _ri("pages_shared"),
             "general_profit": _ri("general_profit"), "full_scans": _ri("full_scans"),
             "ksmd_cpu_s": round((common.runtime_ns(ksmd) - ns0) / 1e9, 5), "cow_ksm": cow_ksm() - cow0,
             "pages_to_scan": _ri("pages_to_scan"), "sleep_millisecs": _ri("sleep_millisecs"), "run": _ri("run")}
        if len(samples) % 25 == 0:  # every ~5 s: other people's guest-like processes (they can trigger bursts)
            s["foreign_guests"] = max(0, common.count_guest_like() - len(guests))
            # ...and what is truly merged (the counters lag: see bench/truecount.py), ~0.3 s of our CPU
            tc = truecount.true_merged([g.pid for g in guests] + ([churn.pid] if churn else []))
            if tc is not None:
                s["true_saved"], s["true_mapped"] = tc["saved"], tc["mapped"]
        samples.append(s)
        all_started = not to_start and all(g.ready_at is not None for g in guests)
        if reached_at is None and all_started:
            if target is not None:
                if s["merged"] >= 0.9 * target and (not staggered or _per_guest_reached(guests, per_guest, ref)):
                    reached_at = now
            else:  # flat out itself: merged what it can once a few passes gained next to nothing
                back = [x for x in samples if x["t"] >= rel - 2.0]
                if rel >= p["flat_min_s"] and rel - back[0]["t"] >= 1.8 and \
                        s["merged"] - back[0]["merged"] <= 0.002 * max(1, s["merged"]) and \
                        s["full_scans"] - back[0]["full_scans"] >= 2:
                    reached_at = now
        if reached_at is None and now >= deadline:
            reached_at = now
            events.append({"t": round(rel, 2), "event": "merge timeout"})
        if reached_at is not None and settled_at is None:
            back = [x for x in samples if x["t"] >= rel - 1.0]
            if ((rel - back[0]["t"] >= 0.9 and s["merged"] - back[0]["merged"] <= 0.002 * max(1, s["merged"])
                 and not _bursting(tuner, daemon)) or now - reached_at >= p["settle_max_s"]):
                settled_at = now
                s["steady_start"] = True
                events.append({"t": round(rel, 2), "event": "steady window starts"})
        if settled_at is not None and now - settled_at >= steady_s:
            break
        next_t += p["sample_s"]
        time.sleep(max(0.0, next_t - time.monotonic()))
    return samples, events


def _bursting(tuner: str, daemon) -> bool:
    """KSM_POLICY=budget still bursting (its state file): the burst runs a few passes past the
    point where merging levels off, and its tail belongs to the merge, not to the steady window
    (its CPU is in the report's total either way)."""
    if tuner != "budget" or daemon is None:
        return False
    try:
        return (json.loads(common.read_text(daemon.state_file)).get("budget") or {}).get("mode") == "burst"
    except ValueError:
        return False


def _per_guest_reached(guests, per_guest, ref) -> bool:
    want = ref.get("guest_targets") or ref.get("final_guest_merged") or []
    return all(m >= 0.9 * w for m, w in zip(per_guest, want))


def _ready_times(events: list[dict]) -> dict[int, float]:
    return {int(e["event"].split()[1]): e["t"] for e in events if e["event"].endswith(" ready")}


def staggered_targets(samples: list[dict], events: list[dict]) -> list[int]:
    """What guest i had merged (in the reference run) before guest i+1 was ready, the last guest
    at the end: guest 0's common pages have nothing to merge with until guest 1 is there, so
    "from its own start" means: the part of its memory it can merge while it is the newest."""
    ready = _ready_times(events)
    n = len(samples[-1].get("guest_merged") or [])
    out = []
    for i in range(n):
        until = ready.get(i + 1, float("inf"))
        vals = [x["guest_merged"][i] for x in samples if x["t"] < until and i < len(x.get("guest_merged") or [])]
        out.append(max(vals, default=0))
    return out


def staggered_times(samples: list[dict], events: list[dict], targets: list[int]) -> dict:
    """Per guest, from its own start (ready): t50 / t90 of its target; the slowest guest's."""
    ready = _ready_times(events)
    per = []
    for i, w in enumerate(targets):
        r = ready.get(i)
        row = {"guest": i, "ready_t": r, "target": w}
        for share in (50, 90):
            hit = None
            if w and r is not None:
                hit = next((x for x in samples if x["t"] >= r and i < len(x.get("guest_merged") or [])
                            and x["guest_merged"][i] >= share / 100 * w), None)
            row[f"t{share}_s"] = round(hit["t"] - r, 2) if hit else None
        per.append(row)
    t90s, t50s = [g["t90_s"] for g in per], [g["t50_s"] for g in per]
    return {"per_guest": per, "guest_targets": targets,
            "t90_s": None if not per or any(t is None for t in t90s) else max(t90s),
            "t50_s": None if not per or any(t is None for t in t50s) else max(t50s)}


def _cross(samples, key, value, index=None):
    for s in samples:
        v = s[key] if index is None else (s[key][index] if index < len(s[key]) else 0)
        if v >= value:
            return s
    return None


def summarise(scenario, tuner, samples, events, guests, churn, p, ref) -> dict:
    last = samples[-1]
    target = ref["final_merged"] if ref else last["merged"]
    out = {"scenario": scenario, "tuner": tuner, "target_merged": target}
    for share in (50, 90):
        s = _cross(samples, "merged", share / 100 * target) if target else None
        out[f"t{share}_s"] = s["t"] if s else None
        out[f"ksmd_cpu_s_to_{share}"] = s["ksmd_cpu_s"] if s else None
    if scenario == "staggered":
        targets = staggered_targets(ref["samples"], ref["events"]) if ref and ref.get("samples") else \
            staggered_targets(samples, events)
        out.update(staggered_times(samples, events, targets))
    start = next((i for i, s in enumerate(samples) if s.get("steady_start")), None)
    steady = None
    if start is not None and last["t"] > samples[start]["t"]:
        a, win = samples[start], samples[start:]
        dt = last["t"] - a["t"]
        cpu = last["ksmd_cpu_s"] - a["ksmd_cpu_s"]
        mean_saved = sum(x["pages_sharing"] for x in win) / len(win)
        true_win = [x["true_saved"] for x in win if "true_saved" in x]
        steady = {"window_s": round(dt, 1), "ksmd_cpu_pct": 100 * cpu / dt, "ksmd_cpu_s": cpu,
                  "mean_pages_sharing": mean_saved, "cow_ksm_per_s": (last["cow_ksm"] - a["cow_ksm"]) / dt,
                  "saved_per_cpu_s": (mean_saved * dt / cpu) if cpu > 0 else None,
                  "mean_true_saved": (sum(true_win) / len(true_win)) if true_win else None,
                  "true_samples": len(true_win)}
    out.update({
        "steady": steady,
        "final_merged": last["merged"], "final_guest_merged": last["guest_merged"],
        "final_pages_sharing": last["pages_sharing"], "final_general_profit": last["general_profit"],
        "final_true_saved": next((x["true_saved"] for x in reversed(samples) if "true_saved" in x), None),
        "final_pages_to_scan": last["pages_to_scan"], "final_sleep_millisecs": last["sleep_millisecs"],
        "total_s": last["t"], "total_ksmd_cpu_s": last["ksmd_cpu_s"],
        "events": events,
        "foreign_guests_max": max((x.get("foreign_guests", 0) for x in samples), default=0),
    })
    step = max(1, len(samples) // 600)
    # every step-th sample, and every one with a true count (the plot draws those as points)
    keep = [x for i, x in enumerate(samples) if i % step == 0 or "true_saved" in x or x is last]
    out["samples"] = [{k: v for k, v in s.items() if k != "guest_merged" or scenario == "staggered"} for s in keep]
    return out


# --- the whole measurement --------------------------------------------------------------------


def run(quick: bool, log, scenarios=None, tuners=None, steady_s=None, interval_s=None, repeats=1,
        previous: dict | None = None, save=None) -> dict:
    """Every (scenario, tuner) asked for; rows not re-run are kept from `previous` (same params).
    save(partial result) is called after each run (the JSON so far, for whoever watches)."""
    qemu, accel = preconditions()
    ksmd = common.find_kthread("ksmd")
    if ksmd is None:
        raise Skip("no ksmd kernel thread")
    p = params_for(quick, steady_s, interval_s)
    oracle = common.find_oracle()
    scenarios = list(scenarios or (("mixed", "churn") if quick else SCENARIOS))
    if tuners is None:
        tuners = ["flat", "ours", "budget"] if quick else list(TUNERS)
    skipped = {}
    why = budget_support()
    if "budget" in tuners and why:
        skipped["budget"] = why
    if "old" in tuners and oracle is None:
        skipped["old"] = f"old daemon not found (set {common.ORACLE_ENV})"
    if "advisor" in tuners and not (KSM_DIR / "advisor_mode").exists():
        skipped["advisor"] = "kernel without the KSM advisor (advisor_mode, >= 6.8)"
    if thp_mode() is None and "thp" in scenarios:
        scenarios.remove("thp")
    tuners = [t for t in TUNERS if t in tuners and t not in skipped]
    res = {"params": p, "scenarios": {}, "tuners_skipped": skipped, "accel": accel}
    if previous and previous.get("params", {}).get("guest_mib") == p["guest_mib"]:
        res["scenarios"] = previous.get("scenarios", {})
    workdir = common.tempdir("budget")
    imgdir = Path(tempfile.mkdtemp(prefix="ksmtuned-bench-img-", dir="/var/tmp"))
    try:
        for sc in scenarios:
            images = _images(sc, p, imgdir, log)
            runs = res["scenarios"].setdefault(sc, {}).setdefault("runs", {})
            ref = None
            if "flat" not in tuners and runs.get("flat"):
                ref = runs["flat"][0]
            for tuner in (["flat"] if "flat" in tuners else []) + [t for t in tuners if t != "flat"]:
                rs = []
                for k in range(repeats if tuner in ADAPTIVE or tuner == "flat" else 1):
                    log(f"budget: {sc} / {LABELS[tuner]} (run {k + 1}) ...")
                    r = run_one(sc, tuner, p, workdir / f"{sc}-{tuner}-{k}", ksmd, accel, oracle, images,
                                None if tuner == "flat" else ref, log)
                    log("   " + one_line(r))
                    rs.append(r)
                    runs[tuner] = rs
                    if save:
                        save(res)
                if tuner == "flat":
                    ref = _median_run(rs)
                    if sc == "staggered":
                        ref["guest_targets"] = staggered_targets(ref["samples"], ref["events"])
            res["scenarios"][sc]["label"] = SCENARIO_LABELS[sc]
            for f in images or []:
                f.unlink(missing_ok=True)
    finally:
        common.cleanup(workdir)
        shutil.rmtree(imgdir, ignore_errors=True)
    return res


def _median_run(rs: list[dict]) -> dict:
    rs = sorted(rs, key=lambda r: r["final_merged"])
    return rs[len(rs) // 2]


def _images(sc: str, p: dict, imgdir: Path, log) -> list[Path] | None:
    if sc not in ("mixed", "staggered", "unique"):
        return None
    t = time.monotonic()
    n_common = int(round(10 * p["mix_common"]))
    n = (p["guest_mib"] << 20) // PAGE_SIZE
    common_pages = os.urandom(PAGE_SIZE * ((n + 9) // 10) * n_common) if sc != "unique" else None
    paths = []
    for i in range(p["guests"]):
        path = imgdir / f"{sc}-{i}.img"
        if sc == "unique":
            write_pattern(path, p["guest_mib"], 1000 + i, None, 0.0, 0.0)
        else:
            write_pattern(path, p["guest_mib"], 1000 + i, common_pages, p["mix_zero"], p["mix_common"])
        paths.append(path)
    log(f"   images for {sc}: {len(paths)} x {p['guest_mib']} MiB in {time.monotonic() - t:.1f} s")
    return paths


def one_line(r: dict) -> str:
    st = r["steady"] or {}
    f = lambda x, n=2: "-" if x is None else f"{x:.{n}f}"  # noqa: E731
    return (f"t50 {f(r['t50_s'])} s, t90 {f(r['t90_s'])} s, ksmd CPU to 90 % {f(r['ksmd_cpu_s_to_90'])} s, "
            f"steady {f(st.get('ksmd_cpu_pct'), 3)} % over {st.get('window_s')} s, saved {r['final_pages_sharing']}, "
            f"merged {r['final_merged']}/{r['target_merged']}, daemon CPU {f(r.get('daemon_cpu_s'))} s, "
            f"load {r.get('loadavg')}" + (f", THP warning {r['thp_warning']}" if "thp_warning" in r else ""))
