"""A real Prometheus (Debian's `prometheus` binary, run directly) and node_exporter on loopback,
scraping real ksmtuned daemons that run on stand-in hosts: a fake KSM directory, a fake /proc
with its own meminfo, a fake ksmd whose CPU time grows at a chosen rate, and fake guests.

Everything listens on 127.0.0.1 on free ports; every wait is bounded; every process is ended by
its pid.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

from tests.report_support import FAKE_KSM, REPO, Daemon, FakeGuests, fake_ksm_dir, fake_procfs, free_port

RULES = REPO / "contrib" / "prometheus" / "ksmtuned.rules.yml"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
NODE_EXPORTER = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FAKE_KSMD_PID = 2  # kthreadd's pid on a real host; free in a fake procfs
PF_KTHREAD = 0x00200000


def wait_until(what: str, check: Callable[[], Any], timeout_s: float, poll_s: float = 0.5) -> Any:
    """Poll ``check`` until it returns something true; that value.  AssertionError after the
    timeout, naming ``what`` and the last value seen."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s (last: {last!r})")
        time.sleep(poll_s)


def http_get(url: str, timeout_s: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return r.read()


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            http_get(url, timeout_s=2)
            return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{url}: the server exited {proc.returncode}: "
                                 f"{log.read_text()[-3000:] if log else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{url}: no answer within {timeout_s} s")
        time.sleep(0.2)


def end(proc: subprocess.Popen | None, timeout_s: float = 10) -> None:
    """SIGTERM, then SIGKILL: the process by its pid (Popen), never by name."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)


# --- stand-in hosts ----------------------------------------------------------------------------

def ksmd_stat(cpu_s: float) -> str:
    """A /proc/PID/stat line of a ksmd kernel thread with cpu_s seconds of system time."""
    ticks = int(cpu_s * CLOCK_TICKS)
    # fields 3.. : state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    #              cutime cstime priority nice threads itrealvalue starttime ...
    return (f"{FAKE_KSMD_PID} (ksmd) S 2 0 0 0 -1 {PF_KTHREAD} 0 0 0 0 0 {ticks} 0 0 25 5 1 0 100 "
            "0 0 18446744073709551615 0 0 0 0 0 0 0 2147483647 0 0 0 0 17 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n")


class FakeHost:
    """One KVM host of the fleet, and our real daemon on it (``python -m ksmtuned --foreground``
    with ``--sysfs`` and ``--procfs`` pointing at its stand-ins)."""

    def __init__(self, root: Path, name: str, config: str, ksm: dict[str, str], guests: int = 0,
                 ksmd_cpu_per_s: float = 0.0, ram_gib: float = 16, ksmd_history_s: float = 0.0):
        self.name = name
        self.root = root / name
        self.root.mkdir()
        self.ksm = fake_ksm_dir(self.root, {**FAKE_KSM, **ksm})
        self.fake_guests = FakeGuests(self.root)
        self.guest_pids = [self.fake_guests.start(f"{name}-vm{i}", "-m", "64M") for i in range(guests)]
        self.procfs = fake_procfs(self.root, self.guest_pids, ram_gib)
        ksmd = self.procfs / str(FAKE_KSMD_PID)
        ksmd.mkdir()
        # what a kernel thread's directory holds, as far as the guest finder (psutil) reads it:
        # no command line, root's uids
        (ksmd / "cmdline").write_text("")
        (ksmd / "comm").write_text("ksmd\n")
        (ksmd / "status").write_text(f"Name:\tksmd\nState:\tS (sleeping)\nTgid:\t{FAKE_KSMD_PID}\n"
                                     f"Pid:\t{FAKE_KSMD_PID}\nPPid:\t2\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n"
                                     "Threads:\t1\n")
        self.ksmd_cpu_per_s = ksmd_cpu_per_s
        self.ksmd_cpu_s = ksmd_cpu_per_s * ksmd_history_s  # ksmd ran before the daemon started
        self.write_ksmd(0.0)
        self.daemon = Daemon(self.root, config, sysfs=self.ksm)

    def write_ksmd(self, dt_s: float) -> None:
        self.ksmd_cpu_s += self.ksmd_cpu_per_s * dt_s
        stat = self.procfs / str(FAKE_KSMD_PID) / "stat"
        tmp = stat.with_suffix(".tmp")
        tmp.write_text(ksmd_stat(self.ksmd_cpu_s))
        os.replace(tmp, stat)  # the daemon opens a stand-in's file per read: it sees the new one

    def set(self, name: str, value: int | str) -> None:
        path = self.ksm / name
        tmp = self.ksm / f".{name}.tmp"
        tmp.write_text(f"{value}\n")
        os.replace(tmp, path)

    def start(self) -> "FakeHost":
        self.daemon.procfs = self.procfs
        self.daemon.start()  # and its first adjust in the state file
        return self

    def stop(self) -> None:
        self.daemon.stop()
        self.fake_guests.stop()


class KsmdClock(threading.Thread):
    """Advances every host's fake ksmd CPU time at its rate, 5 times a second."""

    def __init__(self, hosts: list[FakeHost]):
        super().__init__(daemon=True)
        self.hosts = hosts
        self.halt = threading.Event()

    def run(self) -> None:
        last = time.monotonic()
        while not self.halt.wait(0.2):
            now = time.monotonic()
            for h in self.hosts:
                h.write_ksmd(now - last)
            last = now


# --- Prometheus and node_exporter -----------------------------------------------------------------

class NodeExporter:
    """node_exporter with only the textfile collector, as a host that exports by KSM_METRICS_TEXTFILE."""

    def __init__(self, root: Path, textfile_dir: Path):
        self.port = free_port()
        self.log = root / "node_exporter.log"
        self.textfile_dir = textfile_dir
        self.proc: subprocess.Popen | None = None

    def start(self) -> "NodeExporter":
        assert NODE_EXPORTER
        self.proc = subprocess.Popen(
            [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{self.port}", "--collector.disable-defaults",
             "--collector.textfile", f"--collector.textfile.directory={self.textfile_dir}"],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        wait_http(f"http://127.0.0.1:{self.port}/metrics", 30, self.proc, self.log)
        return self

    def stop(self) -> None:
        end(self.proc)


def backfill(storage: Path, series: list[tuple[str, dict[str, str], list[tuple[float, float]]]]) -> None:
    """Write history into a TSDB before Prometheus starts (`promtool tsdb create-blocks-from
    openmetrics`): [(counter family, labels, [(unix time, value)])]."""
    assert PROMTOOL
    lines = []
    for family, labels, points in series:
        lines.append(f"# TYPE {family} counter")
        lab = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        lines += [f"{family}_total{{{lab}}} {v} {t:.3f}" for t, v in points]
    lines.append("# EOF")
    src = storage.parent / "backfill.om"
    src.write_text("\n".join(lines) + "\n")
    storage.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([PROMTOOL, "tsdb", "create-blocks-from", "openmetrics", "-q", str(src), str(storage)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


class Prometheus:
    """`prometheus` on 127.0.0.1:PORT with a temp config and TSDB, scraping and evaluating every
    second, and its HTTP API."""

    def __init__(self, root: Path, scrape_configs: list[dict], rule_files: list[Path]):
        self.root = root / "prometheus"
        self.root.mkdir()
        self.port = free_port()
        self.config = self.root / "prometheus.yml"
        self.log = self.root / "prometheus.log"
        self.storage = self.root / "data"
        self.config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": scrape_configs,
        }, indent=1))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Prometheus":
        assert PROMETHEUS
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={self.storage}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), cwd=self.root)
        wait_http(f"{self.url}/-/ready", 60, self.proc, self.log)
        return self

    def stop(self) -> None:
        end(self.proc)

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        doc = json.loads(http_get(f"{self.url}/api/v1/{path}{query}"))
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query's vector: [{"metric": {...}, "value": [t, "v"]}]."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def values(self, expr: str, by: str) -> dict[str, float]:
        """{label value: sample value} of an instant query."""
        return {r["metric"].get(by, ""): float(r["value"][1]) for r in self.query(expr)}

    def rules(self) -> list[dict]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def alerts(self, state: str | None = None) -> list[dict]:
        return [a for a in self.api("alerts")["alerts"] if state is None or a["state"] == state]

    def targets_up(self) -> int:
        return sum(1 for t in self.api("targets")["activeTargets"] if t["health"] == "up")
