"""The `budget` measurement's Markdown (tables and issue 12's goals, met or not) and its plot."""

from __future__ import annotations

from pathlib import Path

from .budget import FIXED_STEADY_S as FIXED_S, LABELS, SCENARIO_LABELS, SCENARIOS, TUNERS, staggered_targets, staggered_times

#: pages saved may differ by this share between runs that merged the same memory
SAVED_TOLERANCE = 0.01


def _f(x, n=1, unit=""):
    return "–" if x is None else f"{x:,.{n}f}{unit}"


def combined(runs: list[dict]) -> dict:
    """The run of median t90 (repeats), with every run's key numbers beside it."""
    def key(r):
        return (r["t90_s"] if r["t90_s"] is not None else 1e9, (r["steady"] or {}).get("ksmd_cpu_pct") or 0)
    rs = sorted(runs, key=key)
    r = dict(rs[len(rs) // 2])
    r["repeats"] = [{"t90_s": x["t90_s"], "steady_pct": (x["steady"] or {}).get("ksmd_cpu_pct"),
                     "loadavg": x.get("loadavg")} for x in runs]
    return r


SLICE_S = 10.0


def slices(r: dict, slice_s: float = SLICE_S) -> list[float]:
    """ksmd CPU % in consecutive slice_s slices of the steady window (from the samples)."""
    s = r.get("samples") or []
    st = r.get("steady") or {}
    i0 = next((i for i, x in enumerate(s) if x.get("steady_start")), None)
    if i0 is None:
        if not st:
            return []
        t_start = s[-1]["t"] - st["window_s"]
        i0 = next((i for i, x in enumerate(s) if x["t"] >= t_start), len(s) - 1)
    out, a = [], s[i0]
    for x in s[i0 + 1:]:
        if x["t"] - a["t"] >= slice_s:
            out.append(100 * (x["ksmd_cpu_s"] - a["ksmd_cpu_s"]) / (x["t"] - a["t"]))
            a = x
    return out


def _slice_text(r: dict) -> str:
    sl = sorted(slices(r))
    if len(sl) < 2:
        return "–"
    return f"{sl[len(sl) // 2]:.3f} / {sl[0]:.3f} %"


def _true_text(r: dict) -> str:
    """The true count (bench/truecount.py): mean over the steady window (end); – before it was measured."""
    mean = (r.get("steady") or {}).get("mean_true_saved")
    end = r.get("final_true_saved")
    if mean is None and end is None:
        return "–"
    return f"{_f(mean, 0)} ({_f(end, 0)})"


def _daemon_cpu(r: dict) -> str:
    c = r.get("daemon_cpu_s")
    if c is None:
        return "–"
    return f"{c:.2f} ({100 * c / r['total_s']:.2f} %)" if r.get("total_s") else f"{c:.2f}"


def flat_for(res: dict, sc: str, r: dict) -> dict | None:
    """The flat-out reference of a run: flat out measured by the same invocation, else all of them."""
    flats = res["scenarios"].get(sc, {}).get("runs", {}).get("flat") or []
    same = [f for f in flats if f.get("command") and f.get("command") == r.get("command")]
    return combined(same or flats) if flats else None


def rows(res: dict) -> dict[str, dict[str, dict]]:
    out = {}
    for sc in SCENARIOS:
        runs = res["scenarios"].get(sc, {}).get("runs", {})
        if runs:
            out[sc] = {t: combined(runs[t]) for t in TUNERS if runs.get(t)}
    st = out.get("staggered", {})
    if st.get("flat") and "guest_merged" in st["flat"]["samples"][-1]:
        # per guest from its own start, against flat out's merges while that guest was the newest
        targets = staggered_targets(st["flat"]["samples"], st["flat"]["events"])
        for r in st.values():
            r.update(staggered_times(r["samples"], r["events"], targets))
    return out


def goals(res: dict) -> list[dict]:
    """Issue 12's goals for the budget tuner: what, where, the measurement, met (True/False/None)."""
    R = rows(res)
    g = []

    def get(sc, t):
        return R.get(sc, {}).get(t)

    for sc in ("zero", "mixed", "staggered"):
        b = get(sc, "budget")
        f = flat_for(res, sc, b) if b else None
        if f is not None and sc == "staggered" and "guest_merged" in f["samples"][-1]:
            f.update(staggered_times(f["samples"], f["events"], staggered_targets(f["samples"], f["events"])))
        if b is None or f is None:
            g.append({"goal": "time to 90 % ≤ 2 × flat out's", "scenario": sc, "measured": "not measured", "met": None})
            continue
        bt, ft = b["t90_s"], f["t90_s"]
        met = None if ft is None else (bt is not None and bt <= 2 * ft)
        g.append({"goal": "time to 90 % ≤ 2 × flat out's" + (" (per guest, from its start)" if sc == "staggered" else ""),
                  "scenario": sc, "measured": f"{_f(bt, 1, ' s')} vs flat out {_f(ft, 1, ' s')} "
                  f"({_f(bt / ft if bt and ft else None, 1, '×')})", "met": met})
    for sc, limit in (("zero", 0.3), ("mixed", 0.3), ("unique", 0.3), ("churn", 1.0)):
        b = get(sc, "budget")
        st = (b or {}).get("steady")
        if not st:
            g.append({"goal": f"steady ksmd CPU ≤ {limit} % of one core", "scenario": sc, "measured": "not measured", "met": None})
            continue
        rep = ", ".join(_f(x["steady_pct"], 2, " %") for x in b["repeats"]) if len(b["repeats"]) > 1 else None
        g.append({"goal": f"steady ksmd CPU ≤ {limit} % of one core", "scenario": sc,
                  "measured": f"{_f(st['ksmd_cpu_pct'], 3, ' %')} over {st['window_s']:.0f} s"
                  + (f" (runs: {rep})" if rep else "")
                  + (f"; quietest 10-s slice {min(slices(b)):.3f} %" if slices(b) else ""), "met": st["ksmd_cpu_pct"] <= limit})
    b, c = get("churn", "budget"), get("churn", "ours")
    if b and c and b.get("steady") and c.get("steady"):
        bs, cs = b["steady"]["saved_per_cpu_s"], c["steady"]["saved_per_cpu_s"]
        g.append({"goal": "under churn, pages saved per ksmd CPU-second ≥ classic's", "scenario": "churn",
                  "measured": f"{_f(bs, 0)} vs classic {_f(cs, 0)}", "met": bs is not None and cs is not None and bs >= cs})
    for sc in SCENARIOS:
        b, c = get(sc, "budget"), get(sc, "ours")
        if not (b and c):
            continue
        bs, cs = b["final_pages_sharing"], c["final_pages_sharing"]
        g.append({"goal": "never ends with less merged than classic (pages_sharing at the end, 1 % tolerance)",
                  "scenario": sc, "measured": f"{bs:,} vs classic {cs:,}", "met": bs >= cs * (1 - SAVED_TOLERANCE)})
        bt, ct = ((r.get("steady") or {}).get("mean_true_saved") for r in (b, c))
        if bt is not None and ct is not None:
            g.append({"goal": "never less merged than classic (truly merged, pagemap + KPF_KSM: mean over the steady "
                              "window, 1 % tolerance)", "scenario": sc, "measured": f"{bt:,.0f} vs classic {ct:,.0f}",
                      "met": bt >= ct * (1 - SAVED_TOLERANCE)})
    return g


def markdown(res: dict, plot: str | None, command: str) -> str:
    p = res["params"]
    L = ["# Budget policy benchmark (issue 12)", "",
         f"{res['date']}, `{command}`; host {res['host']['kernel']}, {res['host']['cpus']} CPUs (shared with other "
         f"work: load average per run below), QEMU `-accel {res['accel']}`.",
         f"Guests: {p['guests']} × {p['guest_mib']} MiB paused QEMU guests with preallocated RAM; mixed content "
         f"{100 * p['mix_common']:.0f} % common / {100 * p['mix_zero']:.0f} % zero / "
         f"{100 - 100 * (p['mix_common'] + p['mix_zero']):.0f} % unique pages; staggered: one guest every "
         f"{p['stagger_s']:.0f} s; churn: {p['churn_mib']} MiB helper, {100 * p['churn_fraction']:.0f} % of it "
         f"rewritten every {p['churn_period_s']:.0f} s. Daemons: default settings, KSM_THRES_COEF=100, "
         f"KSM_MONITOR_INTERVAL={p['interval_s'] or '60 (default)'}.",
         f"Merged = the workload's own `ksm_merging_pages`; 50 % / 90 % are of what flat out merged in the same "
         f"scenario (measured by the same invocation). Pages saved = `pages_sharing`. Steady ksmd CPU = `/proc/<ksmd>/schedstat` over the steady "
         f"window, which starts once merging levelled off (or the {p['merge_timeout_s']} s merge timeout): "
         f"{p['steady_s']:.0f} s for the daemons, at most {min(p['steady_s'], 20):.0f} s for the fixed-rate tuners. "
         f"Saved per CPU-s = mean pages saved in the window × window ÷ ksmd CPU-seconds in it.", ""]
    if res.get("tuners_skipped"):
        L += ["Not run: " + "; ".join(f"{LABELS[k]}: {v}" for k, v in res["tuners_skipped"].items()) + ".", ""]
    gs = goals(res)
    if gs:
        L += ["## Goals of issue 12 (budget tuner, default settings)", "", "| goal | scenario | measured | met |",
              "|---|---|---|---|"]
        for x in gs:
            L.append(f"| {x['goal']} | {x['scenario']} | {x['measured']} | "
                     f"{'yes' if x['met'] else ('no' if x['met'] is False else '–')} |")
        L.append("")
    for sc, tr in rows(res).items():
        L += [f"## {SCENARIO_LABELS[sc]}", "",
              "| tuner | t50 | t90 | t90 / flat | ksmd CPU-s to 90 % | steady ksmd CPU | window | 10-s slices: median / min | pages saved (end) | truly saved: mean (end) "
              "| saved per ksmd CPU-s (steady) | cow_ksm/s | daemon CPU-s (% of the run) | final pages / sleep | load (start → end) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for t, r in tr.items():
            fr = flat_for(res, sc, r) or {}
            if sc == "staggered" and fr.get("samples") and "guest_merged" in fr["samples"][-1]:
                fr.update(staggered_times(fr["samples"], fr["events"], staggered_targets(fr["samples"], fr["events"])))
            ft = fr.get("t90_s")
            st = r["steady"] or {}
            t90 = r["t90_s"]
            t90s = _f(t90, 1, " s") if t90 is not None else f"> {r['total_s']:.0f} s ({100 * r['final_merged'] / max(1, r['target_merged']):.0f} %)" if r["target_merged"] else "–"
            rep = r.get("repeats", [])
            steady = _f(st.get("ksmd_cpu_pct"), 3, " %")
            if len(rep) > 1:
                steady += " (" + " / ".join(_f(x["steady_pct"], 3) for x in rep) + ")"
            load = r.get("loadavg") or ["?", "?"]
            L.append(f"| {LABELS[t]} | {_f(r['t50_s'], 1, ' s')} | {t90s} | {_f(t90 / ft if t90 and ft else None, 1, '×')} "
                     f"| {_f(r['ksmd_cpu_s_to_90'], 2)} | {steady} | {_f(st.get('window_s'), 0, ' s')} | {_slice_text(r)} "
                     f"| {r['final_pages_sharing']:,} | {_true_text(r)} | {_f(st.get('saved_per_cpu_s'), 0)} | {_f(st.get('cow_ksm_per_s'), 0)} "
                     f"| {_daemon_cpu(r)} | {r['final_pages_to_scan']} / {r['final_sleep_millisecs']} ms "
                     f"| {load[0].split()[0]} → {load[1].split()[0]} |")
        fg = {t: r.get("foreign_guests_max") for t, r in tr.items() if r.get("foreign_guests_max")}
        if fg:
            L.append("\nOther people's guest-like processes seen during the run (at most, sampled every 5 s): "
                     + ", ".join(f"{LABELS[t]} {n}" for t, n in fg.items()) + ".")
        if sc == "staggered":
            for t, r in tr.items():
                if r.get("per_guest"):
                    L.append(f"\n{LABELS[t]}, per guest (t50 / t90 from its own start, of what flat out merged of it "
                             "before the next guest came): " + ", ".join(
                        f"guest {g['guest']} {_f(g['t50_s'], 1)} / {_f(g['t90_s'], 1)} s" for g in r["per_guest"]))
        if sc == "thp":
            for t, r in tr.items():
                if "thp_warning_lines" in r:  # (older results counted other processes' THP warnings too)
                    L.append(f"\n{LABELS[t]}: THP warning naming our guests in its log: "
                             f"{'yes' if r['thp_warning'] else 'NO'}.")
        L.append("")
    if res.get("notes"):
        L += ["## Notes", "", res["notes"], ""]
    if plot:
        L += [f"![pages saved and ksmd CPU against time]({plot})", ""]
    return "\n".join(L)


def plot(res: dict, path: Path) -> str | None:
    """One row per scenario: pages saved, and ksmd CPU % (windows of 2 s or more), against time; None or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (the project's `bench` extra)"
    R = res["scenarios"]
    scs = [sc for sc in SCENARIOS if R.get(sc, {}).get("runs")]
    if not scs:
        return "nothing measured"
    fig, axes = plt.subplots(len(scs), 2, figsize=(11, 2.6 * len(scs)), squeeze=False)
    for row, sc in enumerate(scs):
        a1, a2 = axes[row]
        for t in TUNERS:
            rs = R[sc]["runs"].get(t)
            if not rs:
                continue
            s = combined(rs)["samples"]
            ts = [x["t"] for x in s]
            line = a1.plot(ts, [x["pages_sharing"] for x in s], label=LABELS[t], linewidth=1.1)[0]
            tr = [(x["t"], x["true_saved"]) for x in s if "true_saved" in x]
            if tr:  # truly merged (pagemap + KPF_KSM), every ~5 s: dots in the line's colour
                a1.plot([x for x, _ in tr], [y for _, y in tr], ".", color=line.get_color(), markersize=2.5)
            # over the shortest window of at least 2 s that ends at each sample (a results file
            # combined from several runs keeps fewer samples: then from one sample to the next)
            pt, pc = [], []
            j = 0
            for i in range(1, len(s)):
                while j + 1 < i and s[i]["t"] - s[j + 1]["t"] >= 2.0:
                    j += 1
                if s[i]["t"] > s[j]["t"]:
                    pt.append(s[i]["t"])
                    pc.append(max(1e-3, 100 * (s[i]["ksmd_cpu_s"] - s[j]["ksmd_cpu_s"]) / (s[i]["t"] - s[j]["t"])))
            a2.plot(pt, pc, label=LABELS[t], linewidth=1.0)
        a1.set_title(SCENARIO_LABELS[sc], fontsize=9)
        a1.set_ylabel("pages saved", fontsize=8)
        a2.set_ylabel("ksmd CPU % (≥ 2 s)", fontsize=8)
        a2.set_yscale("log")
        a2.axhline(0.3, color="grey", linestyle=":", linewidth=0.8)
        tmax = max((x["t"] for t in TUNERS for r in R[sc]["runs"].get(t, [])[:1] for x in r["samples"][-1:]), default=1)
        for a in (a1, a2):
            if tmax > 60:
                a.set_xscale("symlog", linthresh=10.0)
            a.set_xlim(left=0)
            a.grid(alpha=0.3)
            a.tick_params(labelsize=7)
        if row == 0:
            a2.legend(fontsize=6, loc="upper right")
    axes[-1][0].set_xlabel("s since the tuner started (log above 10 s); dots: truly merged", fontsize=8)
    axes[-1][1].set_xlabel("s since the tuner started (log above 10 s); dotted: 0.3 %", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return None


def doc_section(res: dict, md_rel: str, png_rel: str | None, command: str) -> str:
    """docs/budget.md's "Measured" section: the goals, a compact table per scenario, the plot."""
    p = res["params"]
    loads = [r.get("loadavg", ["?"])[0].split()[0] for sc in rows(res).values() for r in sc.values() if r.get("loadavg")]
    L = ["## Measured", "",
         f"Measured on {res['date']} on the shared 2-CPU development VM ({res['host']['kernel']}, load average "
         f"{min(loads, default='?')}–{max(loads, default='?')} at the runs' starts) with `{command}`; every number, "
         f"the samples and the settings in [`{md_rel}`]({md_rel}) and its JSON. {p['guests']} paused QEMU guests × "
         f"{p['guest_mib']} MiB; the daemons at their default settings with KSM_THRES_COEF=100 (pressure: KSM on); "
         f"steady windows {p['steady_s']:.0f} s for the daemons (the issue asks ≥ 600 s: `--steady-s 600` runs "
         f"that, 6 h for everything), ≤ {min(p['steady_s'], FIXED_S):.0f} s for the fixed-rate tuners.", ""]
    gs = goals(res)
    if gs:
        L += ["| goal | scenario | measured | met |", "|---|---|---|---|"]
        for x in gs:
            L.append(f"| {x['goal']} | {x['scenario']} | {x['measured']} | "
                     f"{'yes' if x['met'] else ('no' if x['met'] is False else '–')} |")
        L.append("")
    L += ["| scenario | tuner | t90 (× flat out) | steady ksmd CPU | pages saved (end) | truly saved: mean (end) "
          "| saved per ksmd CPU-s |", "|---|---|---:|---:|---:|---:|---:|"]
    for sc, tr in rows(res).items():
        for t, r in tr.items():
            fr = flat_for(res, sc, r) or {}
            if sc == "staggered" and fr.get("samples") and "guest_merged" in fr["samples"][-1]:
                fr.update(staggered_times(fr["samples"], fr["events"], staggered_targets(fr["samples"], fr["events"])))
            ft = fr.get("t90_s")
            st = r["steady"] or {}
            t90 = r["t90_s"]
            t90s = (f"{t90:.1f} s" + (f" ({t90 / ft:.1f}×)" if ft and t != "flat" else "")) if t90 is not None else \
                ("never" if not r["target_merged"] else f"> {r['total_s']:.0f} s")
            L.append(f"| {SCENARIO_LABELS[sc]} | {LABELS[t]} | {t90s} | {_f(st.get('ksmd_cpu_pct'), 3, ' %')} "
                     f"| {r['final_pages_sharing']:,} | {_true_text(r)} | {_f(st.get('saved_per_cpu_s'), 0)} |")
    L.append("")
    fg = {sc: tr["budget"].get("foreign_guests_max") for sc, tr in rows(res).items()
          if tr.get("budget", {}).get("foreign_guests_max")}
    if fg:
        L += ["The machine was shared: during the budget runs other people's guest-like processes (test "
              "stand-ins named qemu-system-x86_64, each a burst trigger for the policy) came and went, at most "
              + ", ".join(f"{n} in {sc}" for sc, n in fg.items()) + " at a time (sampled every 5 s).", ""]
    if res.get("notes"):
        L += [res["notes"], ""]
    if png_rel:
        L += [f"![pages saved and ksmd CPU against time, per scenario]({png_rel})", ""]
    return "\n".join(L)



def splice_section(doc: str, section: str) -> str:
    """doc with its "## Measured" section (up to the next "## " heading) replaced, or appended."""
    lines = doc.splitlines()
    try:
        start = next(i for i, x in enumerate(lines) if x.strip() == "## Measured")
    except StopIteration:
        return doc.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[:start] + section.rstrip("\n").splitlines() + ([""] if end < len(lines) else [])
                     + lines[end:]) + "\n"
