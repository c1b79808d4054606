"""Soak (issue 6): our daemon at a 0.05 s interval for 10 minutes; resident memory and open fds.

The daemon runs as in production but against a fake KSM directory: pressure config (every
tick takes the start+boost branch), DEBUG log to a file, its state file, and the metrics text
file when that feature exists.  It reads the real /proc, where other people's processes come
and go, and three fake guests of ours.  Every SAMPLE_S: VmRSS, open fds, ticks so far (the
"KSMCTL start" lines of its debug log).  Growth is measured from the end of the first minute
(imports, caches, allocator warm-up) to the end.
"""

from __future__ import annotations

import time

from . import common
from .common import FakeGuests
from .daemons import BrokenBenchmark, Ours, metrics_support

SAMPLE_S = 5.0
WARM_S = 60.0


def run(seconds: float, log) -> dict:
    common.require_root("the soak (fake KSM directory owned by root, real /proc)")
    workdir = common.tempdir("soak")
    extra = {}
    if metrics_support() is None:
        extra["KSM_METRICS_TEXTFILE"] = workdir / "ksm.prom"
    daemon = Ours("soak", workdir, debug=True, interval_s=0.05, extra_config=extra)
    guests = FakeGuests(workdir, 3)
    samples = []
    ticks_so_far = _TickCounter(daemon.logfile)
    try:
        daemon.start()
        t0 = time.monotonic()
        cpu0 = daemon.cgroup.usage_usec()
        while True:
            if not daemon.alive():
                raise BrokenBenchmark(f"the soak daemon died:\n{daemon.tail()}")
            t = time.monotonic() - t0
            samples.append({"t": round(t, 1), "rss_kib": daemon.rss_kib(), "fds": common.fd_count(daemon.pid),
                            "ticks": ticks_so_far(), "processes": common.count_processes()})
            if t >= seconds:
                break
            time.sleep(min(SAMPLE_S, max(0.0, seconds - t)))
        cpu_s = (daemon.cgroup.usage_usec() - cpu0) / 1e6
    finally:
        daemon.stop()
        guests.stop()
        common.cleanup(workdir)
    warm = next((s for s in samples if s["t"] >= min(WARM_S, seconds / 4)), samples[0])
    half = next((s for s in samples if s["t"] >= seconds / 2), samples[-1])
    last = samples[-1]
    ticks = last["ticks"] - samples[0]["ticks"]
    out = {
        "seconds": seconds, "interval_s": 0.05, "metrics_textfile": bool(extra),
        "ticks": ticks, "ticks_per_s": ticks / max(last["t"], 1e-9),
        "daemon_cpu_pct": 100.0 * cpu_s / max(last["t"], 1e-9),
        "rss_kib_start": samples[0]["rss_kib"], "rss_kib_after_warmup": warm["rss_kib"],
        "rss_kib_end": last["rss_kib"], "rss_kib_max": max(s["rss_kib"] or 0 for s in samples),
        "rss_growth_kib_after_warmup": (last["rss_kib"] or 0) - (warm["rss_kib"] or 0),
        "rss_growth_kib_second_half": (last["rss_kib"] or 0) - (half["rss_kib"] or 0),
        "fds_start": samples[0]["fds"], "fds_end": last["fds"], "fds_max": max(s["fds"] or 0 for s in samples),
        "warmup_s": warm["t"],
        "processes_range": [min(s["processes"] for s in samples), max(s["processes"] for s in samples)],
        "samples": samples,
    }
    log(f"soak: {ticks} ticks in {last['t']:.0f} s, RSS {out['rss_kib_after_warmup']} -> {out['rss_kib_end']} KiB "
        f"(growth {out['rss_growth_kib_after_warmup']} KiB after {warm['t']:.0f} s), fds {out['fds_start']} -> "
        f"{out['fds_end']} (max {out['fds_max']}), daemon CPU {out['daemon_cpu_pct']:.1f} %")
    return out


class _TickCounter:
    """Counts the last line of each tick in the daemon's debug log, reading only what is new."""

    def __init__(self, path):
        self.path, self.offset, self.count, self.partial = path, 0, 0, b""

    def __call__(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = self.partial + f.read()
                self.offset = f.tell()
        except FileNotFoundError:
            return self.count
        lines = data.split(b"\n")
        self.partial = lines.pop()
        self.count += sum(1 for line in lines if b": KSMCTL start " in line or line.endswith(b"stop ksm"))
        return self.count
