"""`ksmtuned status [--json]` against a real daemon: text and JSON agree with sysfs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ksmtuned.kernel.ksmd import Ksmd, read_proc_stat
from ksmtuned.commands.status import _recent_cpu, human_bytes, sparkline
from tests import ksmguard
from tests.report_support import Daemon, ksm_read_lock, read_sysfs, running

PAGE = os.sysconf("SC_PAGE_SIZE")
BOOST = "KSM_THRES_COEF=100\nKSM_MONITOR_INTERVAL=3600\n"


def status(d: Daemon, *more: str) -> subprocess.CompletedProcess:
    return subprocess.run(d.cli("status", "--state-file", str(d.state), *more), capture_output=True, text=True,
                          timeout=30)


def text_counters(text: str) -> dict[str, int | str]:
    """The 'counters:' section of the text output."""
    lines = text.split("counters:\n", 1)[1].splitlines()
    out: dict[str, int | str] = {}
    for line in lines:
        name, value = line.split()
        out[name] = int(value) if value.lstrip("-").isdigit() else value
    return out


def test_status_text_and_json_agree_with_sysfs(tmp_path):
    with running(tmp_path, BOOST) as d:
        st = d.wait_adjusts(1)
        sysfs = read_sysfs(d.sysfs)  # stable: a fake directory, and the daemon waits an hour
        j = status(d, "--json")
        t = status(d)
        assert j.returncode == 0 and t.returncode == 0, j.stderr + t.stderr
        js = json.loads(j.stdout)
        text = t.stdout
        # JSON
        assert js["schema"] == 1
        assert js["daemon"]["running"] is True and js["daemon"]["pid"] == d.proc.pid
        assert js["daemon"]["config_file"] == str(d.conf)
        assert 0 <= js["daemon"]["uptime_s"] < 60
        assert js["ksm"]["counters"] == sysfs
        assert st["ksm"] == sysfs  # the knobs the tick wrote (not read again) are what the files hold
        assert js["saved_bytes"] == sysfs["pages_sharing"] * PAGE
        assert js["profit_bytes"] == sysfs["general_profit"]
        assert js["sharing_ratio"] == round(sysfs["pages_sharing"] / sysfs["pages_shared"], 4)
        assert js["waste_ratio"] == round(sysfs["pages_unshared"] / sysfs["pages_sharing"], 4)
        last = js["last_adjust"]
        assert last["decision"] == "boost" and last["npages"] == 300 and last["reason"] == "start"
        assert last["explain"] == st["decision"]["explain"]
        assert last["inputs"] == st["inputs"]
        assert js["history"]["ticks"] == 1 and js["history"]["saved_bytes"] == [sysfs["pages_sharing"] * PAGE]
        # text: the same numbers
        assert text_counters(text) == sysfs
        assert f"ksmtuned: running, pid {d.proc.pid}," in text
        assert f"config {d.conf}" in text
        assert st["decision"]["explain"] in text
        assert "KSM: running (run=1), 300 pages every 10 ms, advisor none" in text
        assert f"saved {human_bytes(sysfs['pages_sharing'] * PAGE)} (pages_sharing {sysfs['pages_sharing']}" in text
        assert f"net profit {human_bytes(sysfs['general_profit'])}" in text
        assert f"sharing ratio {sysfs['pages_sharing'] / sysfs['pages_shared']:.2f}" in text
        assert f"waste ratio {sysfs['pages_unshared'] / sysfs['pages_sharing']:.2f}" in text
        assert "savings |" in text


def test_status_without_daemon_shows_counters_and_says_so(tmp_path):
    d = Daemon(tmp_path)  # never started
    j = status(d, "--json")
    t = status(d)
    assert j.returncode == 0 and t.returncode == 0
    js = json.loads(j.stdout)
    assert js["daemon"]["running"] is False and js["daemon"]["pid"] is None
    assert "not running" in js["daemon"]["message"]
    assert js["last_adjust"] is None
    assert js["ksm"]["counters"] == read_sysfs(d.sysfs)
    assert t.stdout.startswith("ksmtuned: not running: KSM counters only\n")
    assert text_counters(t.stdout) == read_sysfs(d.sysfs)
    assert "last adjust" not in t.stdout


def test_status_ignores_the_state_of_a_dead_daemon(tmp_path):
    with running(tmp_path, BOOST) as d:
        d.wait_adjusts(1)
    assert d.state.exists()  # left behind by design: /run is emptied at boot
    js = json.loads(status(d, "--json").stdout)
    assert js["daemon"]["running"] is False and js["last_adjust"] is None
    assert js["daemon"]["state_found"] is False


def test_status_follows_the_daemon_through_ticks(tmp_path):
    with running(tmp_path, BOOST) as d:
        d.wait_adjusts(1)
        for n in (2, 3):
            os.kill(d.proc.pid, signal.SIGUSR1)
            d.wait_adjusts(n)
        js = json.loads(status(d, "--json").stdout)
        assert js["last_adjust"]["reason"] == "retune" and js["last_adjust"]["npages"] == 900
        assert js["last_adjust"]["counts"]["decisions"]["boost"] == 3
        assert js["ksm"]["counters"]["pages_to_scan"] == 900 == int((d.sysfs / "pages_to_scan").read_text())
        assert js["history"]["decisions"] == ["boost"] * 3


def test_status_without_ksm_exits_69(tmp_path):
    d = Daemon(tmp_path, sysfs=tmp_path / "nonexistent")
    r = status(d)
    assert r.returncode == 69
    assert "KSM: not available" in r.stdout


@pytest.mark.ksm
def test_status_on_the_real_ksm_directory(tmp_path):
    """Read-only: the real counters, bracketed by reads before and after (ksmd may be scanning)."""
    if not ksmguard.ksm_available():
        pytest.skip("this kernel has no KSM (/sys/kernel/mm/ksm/run missing)")
    argv = [sys.executable, "-m", "ksmtuned", "status", "--json", "--pidfile", str(tmp_path / "none.pid"),
            "--state-file", str(tmp_path / "none.json")]
    with ksm_read_lock():  # nobody changes a knob meanwhile
        before = read_sysfs(ksmguard.KSM_ROOT)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        after = read_sysfs(ksmguard.KSM_ROOT)
    assert r.returncode == 0, r.stderr
    counters = json.loads(r.stdout)["ksm"]["counters"]
    for name, value in counters.items():
        lo, hi = before[name], after[name]
        if isinstance(value, int):
            assert min(lo, hi) <= value <= max(lo, hi), (name, lo, value, hi)
        else:
            assert value == lo == hi, name
    for name in ("full_scans", "pages_shared", "pages_sharing", "pages_to_scan", "pages_unshared",
                 "pages_volatile", "run", "sleep_millisecs"):
        assert name in counters
    ksmd = json.loads(r.stdout)["ksmd"]
    assert ksmd["pid"] is not None and ksmd["cpu_seconds"] >= 0


@pytest.mark.ksm
def test_ksmd_is_found_and_its_cpu_time_read():
    if not ksmguard.ksm_available():
        pytest.skip("this kernel has no KSM")
    k = Ksmd()
    cpu = k.cpu_seconds()
    assert k.pid is not None
    comm, rest = read_proc_stat(Path("/proc"), k.pid)
    assert comm == "ksmd"
    assert Path(f"/proc/{k.pid}/cmdline").read_bytes() == b""  # a kernel thread
    assert abs(cpu - (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")) < 1.0
    assert 0 <= k.average_percent() <= 100


def test_a_process_named_ksmd_is_not_taken_for_ksmd(tmp_path):
    """A user process can call itself ksmd (prctl); only the kernel thread counts."""
    procfs = tmp_path / "proc"
    procfs.mkdir()
    p = subprocess.Popen([sys.executable, "-c", "import ctypes,signal,sys; "
                          "ctypes.CDLL(None).prctl(15, b'ksmd', 0, 0, 0); print(1, flush=True); signal.pause()"],
                         stdout=subprocess.PIPE)
    try:
        p.stdout.readline()
        (procfs / str(p.pid)).symlink_to(f"/proc/{p.pid}")
        assert (procfs / str(p.pid) / "comm").read_text().strip() == "ksmd"
        assert Ksmd(procfs).cpu_seconds() is None
    finally:
        p.kill()
        p.wait()


# --- pure helpers ------------------------------------------------------------------------------

@pytest.mark.parametrize("values, expected", [
    ([], ""),
    ([0, 0], "  "),
    ([0, 4, 8], " ▄█"),
    ([None, 8, "x", 8], "██"),
    (list(range(120)), None),  # squeezed to the width
])
def test_sparkline(values, expected):
    line = sparkline(values, width=60)
    if expected is None:
        assert len(line) == 60 and line[0] == " " and line[-1] == "█"
        assert list(line) == sorted(line, key=" ▁▂▃▄▅▆▇█".index)
    else:
        assert line == expected


def test_recent_ksmd_cpu_from_history():
    history = [{"t": float(t), "ksmd_cpu_s": t * 0.05} for t in range(0, 30)]
    # the last 11 points: 10 ticks, 10 s, 0.5 s of CPU -> 5 %
    assert _recent_cpu(history) == (5.0, 10.0)
    assert _recent_cpu(history[:1]) is None
    assert _recent_cpu([{"t": 1.0, "ksmd_cpu_s": None}, {"t": 2.0, "ksmd_cpu_s": 1.0}]) is None


@pytest.mark.parametrize("n, text", [(None, "n/a"), (0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                     (-3 * 2**30, "-3.0 GiB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


def test_counter_reader_drops_and_refinds_files(tmp_path):
    """KsmSysfs.counters() (status, and every tick for the state file and metrics) remembers
    which files exist; one that goes away is dropped, the rest still read, and found again."""
    from ksmtuned.kernel.ksm import KsmSysfs
    from tests.report_support import fake_ksm_dir

    d = fake_ksm_dir(tmp_path)
    (d / "general_profit").write_text("-8192\n")
    reader = KsmSysfs(d)
    assert reader.counters() == read_sysfs(d)
    assert reader.counters()["advisor_mode"] == "none" and reader.counters()["general_profit"] == -8192
    (d / "pages_volatile").unlink()  # a file that goes away is dropped, the rest still read
    assert reader.counters() == read_sysfs(d)
    (d / "pages_volatile").write_text("5\n")  # and found again after the re-probe
    assert reader.counters()["pages_volatile"] == 5


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run status as nobody")
def test_status_on_a_ksm_directory_it_may_not_look_into_is_one_line_and_77(tmp_path):
    """Path.exists() raises on EACCES: it was a traceback."""
    from tests.conftest import skip_unless_nobody_can_run_python
    from tests.report_support import fake_ksm_dir

    skip_unless_nobody_can_run_python()

    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)  # tmp_path itself is 0700 too: nobody cannot look into either
    sysfs = fake_ksm_dir(hidden)
    r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", sys.executable,
                        "-m", "ksmtuned", "status", "--sysfs", str(sysfs), "--pidfile", "/nonexistent/ksmtune.pid",
                        "--state-file", "/nonexistent/state.json"], capture_output=True, text=True, timeout=30,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 77 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert r.stderr.splitlines() == [f"ksmtuned: {sysfs}/run: permission denied while trying to look up: "
                                     "must run as root"]
