"""Results -> Markdown table, PNG plots (matplotlib, Agg), README section."""

from __future__ import annotations

from pathlib import Path


def _f(x, digits: int = 1, unit: str = "") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}{unit}"
    return f"{x}{unit}"


def common_ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _x(r) -> str:
    return "–" if r is None else f"{r:.1f}×"


def markdown(res: dict, plots: dict[str, str]) -> str:
    out = [f"# ksmtuned benchmark, {res['date']}", ""]
    h = res["host"]
    commands = _commands_of(res)
    out += [("Command: " if len(commands) == 1 else "Commands (partial re-runs, see each section): ")
            + ", ".join(f"`{c}`" for c in commands) + "  ", f"Host: {h['kernel']}, {h['cpus']} CPUs, {h['mem_gib']:.1f} GiB RAM, "
            f"load average {h['loadavg_start']} at the start, {h['loadavg_end']} at the end (a shared machine: "
            "compare the side-by-side ratios, not the absolute times).", ""]
    m = res["measurements"]
    for name, v in m.items():
        if len(commands) > 1 and v.get("command"):
            out.append(f"- {name}: measured at {v.get('measured_at', '?')} by `{v['command']}`")
        if "skipped" in v:
            out.append(f"- **{name}: skipped** — {v['skipped']}")
        elif "error" in v:
            out.append(f"- **{name}: BROKEN** — {v['error'].splitlines()[0]}")
    out.append("")
    if "tick" in m and "phases" in m["tick"]:
        out += _tick(m["tick"], plots.get("tick"))
    if "commands" in m and "commands" in m["commands"]:
        out += _commands(m["commands"])
    if "outcome" in m and "tuners" in m["outcome"]:
        out += _outcome(m["outcome"], plots.get("outcome"))
    if "soak" in m and "ticks" in m["soak"]:
        out += _soak(m["soak"])
    return "\n".join(out) + "\n"


def _commands_of(res: dict) -> list[str]:
    """The commands that made these results (several after partial re-runs), each once, without
    the output-only option --readme PATH."""
    import re

    cmds = [re.sub(r" --readme(=| )\S+", "", c) for c in (res.get("commands") or [res["command"]])]
    return list(dict.fromkeys(cmds))


def _tick(t: dict, plot: str | None) -> list[str]:
    out = ["## Cost of one adjust, retune latency, memory", "",
           f"Per tick: CPU of the daemon's whole process tree (children included), and SIGUSR1 → `run` written. "
           f"Median of {t['ticks_per_phase']} ticks per daemon, all daemons ticked round-robin side by side. "
           f"Method: {t['method']}.", ""]
    out += ["| processes: median (range; guests) | daemon | CPU / tick median | CPU / tick p90 | retune p50 | retune p90 | RSS |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for count, ph in t["phases"].items():
        for name, d in ph["daemons"].items():
            out.append(f"| {ph['processes']} ({ph['processes_range'][0]}–{ph['processes_range'][1]}; {ph.get('guests_on_host', '?')}) | {name} | {_f(d['cpu_ms_median'], 2)} ms "
                       f"| {_f(d['cpu_ms_p90'], 2)} ms | {_f(d['latency_ms_p50'], 2)} ms | {_f(d['latency_ms_p90'], 2)} ms "
                       f"| {_f((d['rss_kib'] or 0) / 1024, 1)} MiB |")
    out.append("")
    for count, ph in t["phases"].items():
        if ph.get("ratios"):
            out.append(f"- {ph['processes']} processes: " + ", ".join(f"{k} {_x(v)}" for k, v in ph["ratios"].items()))
    if t.get("metrics_missing"):
        out.append(f"- metrics on/off: not measured ({t['metrics_missing']})")
    mem = t.get("memory", {})
    if mem:
        out += ["", f"Memory at {mem['processes']} processes: ours {_f((mem.get('ours_rss_kib') or 0) / 1024, 1)} MiB RSS "
                f"after {mem.get('ours_ticks')} ticks"]
        if mem.get("old_rss_kib"):
            helpers = t["phases"][max(t["phases"], key=int)].get("old_helpers_peak_rss_kib") or {}
            out[-1] += (f"; old: bash loop {_f(mem['old_rss_kib'] / 1024, 1)} MiB + largest helper "
                        f"({mem.get('old_largest_helper', '?')}, peak {_f((helpers.get(mem.get('old_largest_helper')) or 0) / 1024, 1)} MiB) = "
                        f"{_f((mem.get('old_loop_plus_largest_helper_kib') or 0) / 1024, 1)} MiB. Helpers' peak RSS: "
                        + ", ".join(f"{k} {_f((v or 0) / 1024, 1)} MiB" for k, v in helpers.items()) + ".")
    if plot:
        out += ["", f"![CPU per tick]({plot})"]
    out.append("")
    return out


def _commands(c: dict) -> list[str]:
    out = ["## Command latency", "", f"Wall time, median of {c['runs']} runs (`{c.get('invoked_as', c.get('command'))}`), {c['processes']} processes.", "",
           "| command | wall median | wall p90 | wall min | CPU median (user+sys) |", "|---|---:|---:|---:|---:|"]
    for name, v in c["commands"].items():
        out.append(f"| `{name}` | {_f(v['median_ms'])} ms | {_f(v['p90_ms'])} ms | {_f(v['min_ms'])} ms "
                   f"| {_f(v.get('cpu_ms_median'))} ms |")
    it, dev = c.get("retune_importtime", {}), c.get("dev_retune_importtime", {})
    if it:
        out += ["", f"`retune` imports as installed (python -X importtime, median of {it.get('runs', 1)}): "
                f"{it['modules']} modules; ksmtuned's own {_f(it['ksmtuned_us'] / 1000, 1)} ms "
                f"({', '.join(it['ksmtuned_modules'])}); heavy third-party modules on the path: "
                f"{', '.join(it['heavy_third_party']) or 'none'}."]
    if dev:
        out += ["", f"In the dev venv: {dev['modules']} modules; site {_f(dev['site_us'] / 1000, 1)} ms, of which the "
                f"editable install's finder {_f(dev['editable_finder_us'] / 1000, 1)} ms (which no installed copy loads)."]
    out.append("")
    return out


def _outcome(o: dict, plot: str | None) -> list[str]:
    p = o["params"]
    out = ["## Tuning outcome on the real kernel", "",
           f"{p['guests']} paused QEMU guests × {p['guest_mib']} MiB (-accel {p['accel']}, THP off, RAM preallocated), "
           f"each tuner from the same start (run=2, kernel defaults). Daemons: pressure config (KSM_THRES_COEF=99), "
           f"KSM_MONITOR_INTERVAL={p['interval_s']}. \"Merged\" = sum of the guests' /proc/PID/ksm_merging_pages over "
           f"their RAM pages. Steady state: ksmd CPU over {p['steady_window_s']} s after merging levelled off. "
           f"Sampled every {p['sample_s']} s (ksmd CPU from /proc/PID/schedstat). Medians over the runs "
           f"(the fast tuners are repeated {p.get('repeats', 1)}×, interleaved; each run restarts the guests).", "",
           "| tuner | runs | 50 % merged | 90 % merged | ksmd CPU to 50 % | ksmd CPU to 90 % | steady ksmd CPU | steady pages/sleep | merged at the end | tuner's own CPU |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    from .outcome import LABELS

    for name, r in o["tuners"].items():
        t90 = _f(r["t90_s"], 1, " s") if r["t90_s"] is not None else f"> {p['timeout_s']} s"
        out.append(f"| {LABELS[name]} | {r.get('runs', 1)} | {_f(r['t50_s'], 1, ' s')} | {t90} | {_f(r['ksmd_cpu_s_to_50'], 2, ' s')} "
                   f"| {_f(r['ksmd_cpu_s_to_90'], 2, ' s')} | {_f(r['steady_ksmd_cpu_pct'], 1, ' %')} "
                   f"| {r['steady_pages_to_scan']}/{r['steady_sleep_millisecs']} ms | {100 * r['final_merged_fraction']:.0f} % "
                   f"| {_f(r['tuner_process_cpu_s'], 2, ' s')} |")
    for name, why in o.get("tuners_skipped", {}).items():
        out.append(f"| {LABELS[name]} | 0 | skipped: {why} | | | | | | | |")
    foreign = {n: r["foreign_mergeable_mib"] for n, r in o["tuners"].items() if r.get("foreign_mergeable")}
    if foreign:
        out += ["", "Other people's processes with KSM-mergeable memory were alive during: "
                + ", ".join(f"{LABELS[n]} ({mib} MiB)" for n, mib in foreign.items())
                + " — ksmd scanned them too, so those rows are slower than on a quiet host."]
    else:
        out += ["", "No other process on the host had KSM-mergeable memory during the runs."]
    out += ["", "Merged can exceed 100 %: QEMU opts a little more than the guest RAM in (ROMs, video memory).", "",
            "KSM lock held per run: " + "; ".join(f"{k} {', '.join(str(x) for x in (v if isinstance(v, list) else [v]))} s"
                                                for k, v in o.get("lock_held_s", {}).items()) + "."]
    if plot:
        out += ["", f"![pages_sharing and ksmd CPU against time]({plot})"]
    out.append("")
    return out


def _soak(s: dict) -> list[str]:
    return ["## Soak (issue 6)", "",
            f"Our daemon at a {s['interval_s']} s interval for {s['seconds']:.0f} s (DEBUG log, state file"
            f"{', metrics text file' if s['metrics_textfile'] else ''}): {s['ticks']} ticks ({_f(s['ticks_per_s'])}/s), "
            f"daemon CPU {_f(s['daemon_cpu_pct'])} %. RSS {s['rss_kib_start']} KiB at start, {s['rss_kib_after_warmup']} KiB "
            f"after {s['warmup_s']:.0f} s, {s['rss_kib_end']} KiB at the end (growth after warm-up "
            f"{s['rss_growth_kib_after_warmup']} KiB, in the second half {_growth_half(s)}, max {s['rss_kib_max']} KiB); "
            f"open fds {s['fds_start']} → {s['fds_end']} (max {s['fds_max']}); {s['processes_range'][0]}–"
            f"{s['processes_range'][1]} processes on the host.", "",
            _rss_steps(s), ""]


def _growth_half(s: dict) -> str:
    if "rss_growth_kib_second_half" in s:
        return f"{s['rss_growth_kib_second_half']} KiB"
    samples = s["samples"]
    half = next((x for x in samples if x["t"] >= s["seconds"] / 2), samples[-1])
    return f"{(samples[-1]['rss_kib'] or 0) - (half['rss_kib'] or 0)} KiB"


def _rss_steps(s: dict) -> str:
    """Where RSS grew, and how many processes the host had then (a process-count spike grows the
    daemon's pid cache; Python keeps the freed memory for reuse)."""
    steps = []
    prev = None
    for x in s["samples"]:
        if prev is not None and (x["rss_kib"] or 0) > (prev["rss_kib"] or 0):
            steps.append(f"+{x['rss_kib'] - prev['rss_kib']} KiB at {x['t']:.0f} s "
                         f"({max(x['processes'], prev['processes'])} processes)")
        prev = x
    return "RSS steps: " + (", ".join(steps) if steps else "none") + "."


# --- plots -----------------------------------------------------------------------------------


def plots(res: dict, out_dir: Path, stem: str) -> tuple[dict[str, str], str | None]:
    """PNG files (names relative to out_dir), or why there are none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}, "matplotlib is not installed (pip install matplotlib, or the project's `bench` extra)"
    made = {}
    m = res["measurements"]
    if "outcome" in m and m["outcome"].get("tuners"):
        name = f"{stem}-outcome.png"
        _plot_outcome(plt, m["outcome"], out_dir / name)
        made["outcome"] = name
    if "tick" in m and m["tick"].get("phases"):
        name = f"{stem}-tick.png"
        _plot_tick(plt, m["tick"], out_dir / name)
        made["tick"] = name
    return made, None


def _plot_outcome(plt, o: dict, path: Path) -> None:
    from .outcome import LABELS

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    for name, r in o["tuners"].items():
        s = r["samples"]
        t = [x["t"] for x in s]
        ax1.plot(t, [x["pages_sharing"] for x in s], label=LABELS[name], linewidth=1.2)
        # ksmd CPU % over ~1 s windows
        pct_t, pct = [], []
        j = 0
        for i in range(1, len(s)):
            while s[i]["t"] - s[j]["t"] > 1.0:
                j += 1
            if i > j and s[i]["t"] > s[j]["t"]:
                pct_t.append(s[i]["t"])
                pct.append(100 * (s[i]["ksmd_cpu_s"] - s[j]["ksmd_cpu_s"]) / (s[i]["t"] - s[j]["t"]))
        ax2.plot(pct_t, pct, label=LABELS[name], linewidth=1.0)
    ax1.set_ylabel("pages_sharing")
    ax2.legend(fontsize=7, loc="upper right")  # empty there: flat out ends after seconds
    ax1.grid(alpha=0.3)
    ax2.set_ylabel("ksmd CPU % (1 s window)")
    ax2.set_xlabel("seconds since the tuner started (log scale above 1 s)")
    ax2.set_xscale("symlog", linthresh=1.0)
    ax2.set_xlim(left=0)
    ax2.grid(alpha=0.3)
    p = o["params"]
    fig.suptitle(f"{p['guests']} × {p['guest_mib']} MiB QEMU guests, real KSM", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_tick(plt, t: dict, path: Path) -> None:
    phases = list(t["phases"].items())
    names = list(phases[0][1]["daemons"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / max(1, len(phases))
    for k, (count, ph) in enumerate(phases):
        vals = [ph["daemons"][n]["cpu_ms_median"] or 0 for n in names]
        xs = [i + k * width for i in range(len(names))]
        ax.bar(xs, vals, width, label=f"{ph['processes']} processes")
    ax.set_xticks([i + width * (len(phases) - 1) / 2 for i in range(len(names))])
    ax.set_xticklabels(names, fontsize=7, rotation=15)
    ax.set_yscale("log")
    ax.set_ylabel("CPU ms per tick (median)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --- README section --------------------------------------------------------------------------


def readme_section(res: dict, md_name: str, plot_paths: dict[str, str]) -> str:
    """The README's "Performance" section: the latest numbers, the plot, the date, the command."""
    lines = ["## Performance", "",
             f"Measured on {res['date']} on a shared 2-CPU VM ({res['host']['kernel']}) with "
             + " and ".join(f"`{c}`" for c in _commands_of(res)) + "; "
             f"full tables in [`{md_name}`]({md_name}). The machine is noisy: read the ratios measured side by "
             "side, not single absolute times.", "",
             "To reproduce: `python -m bench` as root from the checkout, with the project installed in the running "
             "Python and the `bench` extra (matplotlib); QEMU for the tuning outcome; the old daemon from Debian's "
             "`ksmtuned` package (`apt-get download ksmtuned && dpkg -x ksmtuned_*.deb .oracle`, or "
             "`KSMTUNED_ORACLE=PATH`). A full run takes about 20 minutes (most of it the kernel advisor and the "
             "kernel defaults, which take minutes to merge) and writes `bench/results/<date>.{json,md,png}`; "
             "`--quick` is the 1–2 minute smoke test CI runs; `--soak` adds the 10-minute soak; "
             "`--only tick,commands,outcome` re-runs a part.", ""]
    m = res["measurements"]
    t = m.get("tick", {})
    if t.get("phases"):
        lines += ["| processes on the host | DEBUG | CPU per adjust, old daemon | ours | old/ours | "
                  "SIGUSR1 → `run` written (p50 / p90), old daemon | ours | old/ours (p50) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for count, ph in t["phases"].items():
            for debug in ("", "+debug"):
                old, ours = ph["daemons"].get("old" + debug), ph["daemons"].get("ours" + debug)
                if not ours:
                    continue
                old = old or {}
                lines.append(
                    f"| {ph['processes']} | {'on' if debug else 'off'} | {_f(old.get('cpu_ms_median'), 1, ' ms')} "
                    f"| {_f(ours['cpu_ms_median'], 2, ' ms')} | {_x(common_ratio(old.get('cpu_ms_median'), ours['cpu_ms_median']))} "
                    f"| {_f(old.get('latency_ms_p50'), 1)} / {_f(old.get('latency_ms_p90'), 1)} ms "
                    f"| {_f(ours['latency_ms_p50'], 1)} / {_f(ours['latency_ms_p90'], 1)} ms "
                    f"| {_x(common_ratio(old.get('latency_ms_p50'), ours['latency_ms_p50']))} |")
        metrics = [(ph["processes"], k, v) for ph in t["phases"].values() for k, v in ph.get("ratios", {}).items()
                   if k.startswith("ours+metrics")]
        if metrics:
            lines += ["", "Prometheus metrics on vs off (CPU per adjust): " + ", ".join(
                f"{k.split('/')[0].removeprefix('ours+metrics-')} {_x(v)} at {n} processes" for n, k, v in metrics) + "."]
        lines.append("")
        mem = t.get("memory", {})
        if mem.get("ours_rss_kib"):
            s = f"Memory: ours {_f(mem['ours_rss_kib'] / 1024, 1)} MiB resident after {mem['ours_ticks']} ticks"
            if mem.get("old_loop_plus_largest_helper_kib"):
                s += (f"; the old daemon's bash loop {_f(mem['old_rss_kib'] / 1024, 1)} MiB, "
                      f"{_f(mem['old_loop_plus_largest_helper_kib'] / 1024, 1)} MiB with its largest helper "
                      f"({mem['old_largest_helper']}) running")
            lines += [s + ".", ""]
    c = m.get("commands", {})
    if c.get("commands"):
        lines.append("Commands (wall time, median): " + ", ".join(
            f"`{k}` {_f(v['median_ms'], 0)} ms" for k, v in c["commands"].items()) + ".")
        lines.append("")
    o = m.get("outcome", {})
    if o.get("tuners"):
        from .outcome import LABELS

        p = o["params"]
        lines += [f"Tuning outcome, {p['guests']} QEMU guests × {p['guest_mib']} MiB on the real kernel, pressure config:", "",
                  "| tuner | 90 % of guest RAM merged after | ksmd CPU spent until then | ksmd CPU in the steady state |",
                  "|---|---:|---:|---:|"]
        for name, r in o["tuners"].items():
            t90 = (_f(r["t90_s"], 1, " s") if r["t90_s"] is not None
                   else f"> {p['timeout_s']} s ({100 * r['final_merged_fraction']:.0f} % by then)")
            lines.append(f"| {LABELS[name]} | {t90} | {_f(r['ksmd_cpu_s_to_90'], 2, ' s')} | {_f(r['steady_ksmd_cpu_pct'], 1, ' %')} |")
        lines.append("")
    for key in ("outcome", "tick"):
        if key in plot_paths:
            lines += [f"![{key}]({plot_paths[key]})", ""]
    s = m.get("soak", {})
    if s.get("ticks"):
        lines += [f"Soak: our daemon at a {s['interval_s']} s interval for {s['seconds']:.0f} s, {s['ticks']} ticks: "
                  f"resident memory grew {s['rss_growth_kib_after_warmup']} KiB after the first {s['warmup_s']:.0f} s "
                  f"({_growth_half(s)} in the second half; it grows in steps when the host's process count jumps: "
                  f"{s['processes_range'][0]}–{s['processes_range'][1]} processes during this run), open file "
                  f"descriptors {s['fds_start']} → {s['fds_end']}.", ""]
    return "\n".join(lines)
