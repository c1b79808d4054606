"""Combine budget results measured by separate invocations into one results file.

    python -m bench.budget_combine OUT.json IN.json [IN.json ...]

For each scenario, a tuner's runs come from the last input that has them, except flat out,
whose runs are pooled (each input measured its own flat-out reference, which its other rows'
50 % / 90 % are relative to; pooled, they are the repeats of flat out).  The commands of all
inputs are kept.  Render the Markdown and the plot after with `python -m bench --render OUT.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


#: samples kept per run (the plots and the 10-s slices need no more; staggered 3x: per-guest times)
MAX_SAMPLES = 150


KEEP = ("t", "merged", "guest_merged", "pages_sharing", "ksmd_cpu_s", "cow_ksm", "pages_to_scan", "sleep_millisecs",
        "steady_start", "true_saved")


def _thin(run: dict, staggered: bool) -> None:
    s = run["samples"] = [{k: x[k] for k in KEEP if k in x} for x in run.get("samples") or []]
    most = 3 * MAX_SAMPLES if staggered else MAX_SAMPLES
    if len(s) <= most:
        return
    step = -(-len(s) // most)
    run["samples"] = [x for i, x in enumerate(s) if i % step == 0 or x.get("steady_start") or i == len(s) - 1]


def combine(inputs: list[dict]) -> dict:
    inputs = json.loads(json.dumps(inputs))
    for res in inputs:  # which invocation measured a run: its flat-out reference is that one's
        for sc, body in res.get("scenarios", {}).items():
            for runs in body.get("runs", {}).values():
                for r in runs:
                    r.setdefault("command", res.get("command"))
                    _thin(r, sc == "staggered")
    out = inputs[0]
    cmds = []
    for res in inputs:
        cmds += res.get("commands", [res.get("command")])
    for res in inputs[1:]:
        for sc, body in res.get("scenarios", {}).items():
            dst = out.setdefault("scenarios", {}).setdefault(sc, {"label": body.get("label"), "runs": {}})
            for tuner, runs in body.get("runs", {}).items():
                if tuner == "flat" and dst["runs"].get("flat"):
                    dst["runs"]["flat"] = dst["runs"]["flat"] + runs
                else:
                    dst["runs"][tuner] = runs
        for k, v in res.get("tuners_skipped", {}).items():
            if not any(t == k for body in out["scenarios"].values() for t in body["runs"]):
                out.setdefault("tuners_skipped", {})[k] = v
    for body in out["scenarios"].values():
        for t in list(out.get("tuners_skipped", {})):
            if t in body["runs"]:
                del out["tuners_skipped"][t]
    out["commands"] = list(dict.fromkeys(c for c in cmds if c))
    out["command"] = out["commands"][0]
    out["host"]["loadavg_end"] = inputs[-1]["host"].get("loadavg_end")
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    res = combine([json.loads(Path(p).read_text()) for p in argv[1:]])
    Path(argv[0]).write_text(json.dumps(res, separators=(",", ":"), default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
