"""`ksmtuned status [--json]`: the daemon's last decision and what KSM is doing.

The KSM counters are read live from the KSM directory; the daemon's last decision, its
inputs and the history (savings, ksmd CPU) come from the state file the daemon replaces after
every adjust, read through its model: a state file that is not one (truncated, planted, a
FIFO, NaN, nested 100k deep) is one line on stderr and exit 65, never a traceback.  Without a
running daemon it shows the counters only, and says so.  The JSON layout is an API, the model
:class:`ksmtuned.core.documents.StatusDocument` (docs/documents.md, docs/schemas/status.json);
keys are only ever added.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from ..core.text import printable
from ..core.documents import StatusDocument
from ..core.ticks import PAGE_SIZE
from ..errors import ExitCode, NotRunningError
from ..kernel.ksm import KsmSysfs
from ..kernel import processes
from ..kernel.ksmd import Ksmd
from ..paths import Paths
from ..report.state import read_state
from ..service.config_file import pidfile_in_force
from ..service.pidfile import running_daemon

#: ksmd's "recent" CPU use is measured over at most this many of the last ticks.
RECENT_TICKS = 10
SPARK_WIDTH = 60
SPARKS = " ▁▂▃▄▅▆▇█"
ASCII_SPARKS = " .:-=+*#%@"


def collect_status(sysfs_root: Path, procfs: Path, pidfile: str, state_path: Path,
                   now_s: float | None = None) -> StatusDocument:
    """Everything `status` shows, as the documented JSON document.  Raises StateFileError
    for a state file that is not one."""
    now_s = time.time() if now_s is None else now_s
    try:
        pid: int | None = running_daemon(pidfile, procfs)
        not_running = None
    except NotRunningError as e:
        pid, not_running = None, str(e)
    sysfs = KsmSysfs(sysfs_root)
    ksm_present = sysfs.has("run")
    counters = sysfs.counters() if ksm_present else {}
    document = read_state(state_path)
    state = document.model_dump(by_alias=True) if document is not None else None
    if state is not None and (pid is None or state["daemon"]["pid"] != pid):
        state = None  # a file left by a daemon that is gone is not this daemon's state
    ksmd = Ksmd(procfs)
    cpu_s = ksmd.cpu_seconds()
    history = (state or {}).get("history") or []
    saved = counters.get("pages_sharing")
    shared = counters.get("pages_shared")
    unshared = counters.get("pages_unshared")
    profit = counters.get("general_profit")
    daemon_info = (state or {}).get("daemon") or {}
    out: dict[str, Any] = {
        "time": round(now_s, 3),
        "daemon": {
            "running": pid is not None,
            "pid": pid,
            "uptime_s": _round(processes.age_s(pid)) if pid is not None else None,
            "config_file": daemon_info.get("config_file"),
            "version": daemon_info.get("version"),
            "pidfile": str(pidfile),
            "state_file": str(state_path),
            "state_found": state is not None,
            "message": not_running,
        },
        "last_adjust": _last_adjust(state, now_s),
        "ksm": {"present": ksm_present, "sysfs": str(sysfs_root), "counters": counters},
        "page_size": PAGE_SIZE,
        "saved_bytes": saved * PAGE_SIZE if isinstance(saved, int) else None,
        "profit_bytes": profit if isinstance(profit, int) else None,
        # ratios as the kernel's ksm.rst reads them: high sharing is good, high waste is not
        "sharing_ratio": _ratio(saved, shared),
        "waste_ratio": _ratio(unshared, saved),
        "ksmd": {
            "pid": ksmd.pid,
            "cpu_seconds": cpu_s,
            "cpu_percent_recent": None,
            "recent_window_s": None,
            "cpu_percent_since_boot": _round(ksmd.average_percent(), 3),
        },
        # KSM_POLICY=budget: the mode and why, ksmd's CPU, what is left to merge (docs/budget.md)
        "budget": (state or {}).get("budget"),
        "history": {
            "ticks": len(history),
            "saved_bytes": [h.get("saved_bytes") for h in history],
            "decisions": [h.get("decision") for h in history],
        },
    }
    recent = _recent_cpu(history)
    if recent is not None:
        out["ksmd"]["cpu_percent_recent"], out["ksmd"]["recent_window_s"] = recent
    return StatusDocument.model_validate(out)


def _last_adjust(state: dict | None, now_s: float) -> dict | None:
    if state is None:
        return None
    decision = state.get("decision") or {}
    return {
        "time": state.get("time"),
        "age_s": _round(now_s - state["time"]) if isinstance(state.get("time"), (int, float)) else None,
        "reason": state.get("reason"),
        "decision": decision.get("branch"),
        "explain": decision.get("explain") or (f"adjust failed: {state.get('error')}" if state.get("error") else None),
        "error": state.get("error"),
        "run": decision.get("run"),
        "npages": state.get("npages"),
        "sleep_ms": decision.get("sleep_ms"),
        "inputs": state.get("inputs"),
        "counts": state.get("counts"),
    }


def _recent_cpu(history: list[dict]) -> tuple[float, float] | None:
    """(ksmd CPU percent, window seconds) over the last RECENT_TICKS ticks of the history."""
    points = [(h["t"], h["ksmd_cpu_s"]) for h in history[-(RECENT_TICKS + 1):]
              if isinstance(h.get("t"), (int, float)) and isinstance(h.get("ksmd_cpu_s"), (int, float))]
    if len(points) < 2:
        return None
    (t0, c0), (t1, c1) = points[0], points[-1]
    if t1 <= t0 or c1 < c0:
        return None
    return round(100.0 * (c1 - c0) / (t1 - t0), 3), round(t1 - t0, 3)


def _ratio(a, b) -> float | None:
    if not isinstance(a, int) or not isinstance(b, int) or b <= 0:
        return None
    return round(a / b, 4)


def _round(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


# --- text ----------------------------------------------------------------------------------

def human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 10:
        return f"{s:.1f}s"
    s = int(s)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {s:02d}s"
    return f"{s}s"


def sparkline(values: list[float | None], width: int = SPARK_WIDTH, ramp: str = SPARKS) -> str:
    """One character per bucket of values (bucket mean), scaled from 0 to the maximum."""
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return ""
    if len(values) > width:
        size = len(values) / width
        buckets = [values[int(i * size):max(int(i * size) + 1, int((i + 1) * size))] for i in range(width)]
        values = [sum(b) / len(b) for b in buckets]
    top = max(values)
    if top <= 0:
        return ramp[0] * len(values)
    steps = len(ramp) - 1
    return "".join(ramp[max(0, min(steps, round(v / top * steps)))] for v in values)


def render_text(st: dict[str, Any]) -> str:
    lines = []
    d = st["daemon"]
    if d["running"]:
        lines.append(f"ksmtuned: running, pid {d['pid']}, up {human_duration(d['uptime_s'])}, "
                     f"config {d['config_file'] or 'unknown'}")
    else:
        lines.append("ksmtuned: not running: KSM counters only")
    last = st["last_adjust"]
    if last is not None:
        lines.append(f"last adjust: {human_duration(last['age_s'])} ago ({last['reason']}): {last['explain']}")
        inp = last.get("inputs") or {}
        if inp.get("total_kib") is not None:
            lines.append(
                f"  inputs: total {_kib(inp.get('total_kib'))}, free {_kib(inp.get('free_kib'))} "
                f"({inp.get('free_metric')}), committed {_kib(inp.get('committed_kib'))} "
                f"({inp.get('ps_metric')}, {inp.get('guests')} guest(s)), threshold {_kib(inp.get('thres_kib'))}")
    elif d["running"]:
        lines.append(f"last adjust: unknown (no state file at {d['state_file']})")
    k = st["ksm"]
    c = k["counters"]
    if not k["present"]:
        lines.append(f"KSM: not available ({k['sysfs']} missing: this kernel has no KSM)")
        return _text(lines)
    run = {0: "stopped", 1: "running", 2: "stopped and unmerging"}.get(c.get("run"), f"run={c.get('run')}")
    scan = f", {c['pages_to_scan']} pages every {c['sleep_millisecs']} ms" if "pages_to_scan" in c else ""
    advisor = f", advisor {c['advisor_mode']}" if "advisor_mode" in c else ""
    lines.append(f"KSM: {run} (run={c.get('run')}){scan}{advisor}")
    saved = st["saved_bytes"]
    profit = f", net profit {human_bytes(st['profit_bytes'])}" if st["profit_bytes"] is not None else ""
    lines.append(f"  saved {human_bytes(saved)} (pages_sharing {c.get('pages_sharing')} x "
                 f"{st['page_size']} B){profit}")
    lines.append(f"  sharing ratio {_fmt_ratio(st['sharing_ratio'])} (pages_sharing/pages_shared), "
                 f"waste ratio {_fmt_ratio(st['waste_ratio'])} (pages_unshared/pages_sharing)")
    kd = st["ksmd"]
    if kd["cpu_seconds"] is not None:
        recent = (f"{kd['cpu_percent_recent']:.1f} % over the last {human_duration(kd['recent_window_s'])}, "
                  if kd["cpu_percent_recent"] is not None else "")
        boot = (f"{kd['cpu_percent_since_boot']:.2f} % since boot, "
                if kd["cpu_percent_since_boot"] is not None else "")
        lines.append(f"  ksmd: pid {kd['pid']}, CPU {recent}{boot}{kd['cpu_seconds']:.2f} s in all")
    b = st.get("budget")
    if b:
        lines.append(f"  {b.get('explain')}")
    hist = st["history"]
    if hist["ticks"]:
        values = [v for v in hist["saved_bytes"] if isinstance(v, (int, float))]
        ramp = SPARKS if _can_encode(SPARKS) else ASCII_SPARKS
        if values:
            lines.append(f"  savings |{sparkline(values, ramp=ramp)}| last {hist['ticks']} ticks, "
                         f"{human_bytes(min(values))} .. {human_bytes(max(values))}")
    lines.append("counters:")
    width = max((len(name) for name in c), default=0)
    for name, value in c.items():
        lines.append(f"  {name:<{width}}  {value}")
    return _text(lines)


def _text(lines: list[str]) -> str:
    """The lines as printed: the state file's strings (explain, error, reason, config_file) are
    data, so every control character in them is shown escaped, never sent to the terminal."""
    return "".join(printable(line) + "\n" for line in lines)


def _kib(kib) -> str:
    return human_bytes(kib * 1024) if isinstance(kib, int) else "n/a"


def _fmt_ratio(r) -> str:
    return "n/a" if r is None else f"{r:.2f}"


def _can_encode(text: str) -> bool:
    try:
        text.encode(sys.stdout.encoding or "ascii")
        return True
    except (UnicodeEncodeError, LookupError):
        return False


def main(paths: Paths, as_json: bool = False) -> int:
    """Exit 0 (also when no daemon runs: the text says so); 69 when the kernel has no KSM; 65
    (StateFileError, raised) when the state file is not a ksmtuned state file."""
    doc = collect_status(Path(paths.sysfs), Path(paths.procfs), pidfile_in_force(paths), Path(paths.state_file))
    st = doc.model_dump(mode="json", by_alias=True)
    if as_json:
        print(json.dumps(st, indent=2))
    else:
        sys.stdout.write(render_text(st))
    return ExitCode.OK if st["ksm"]["present"] else ExitCode.UNAVAILABLE
