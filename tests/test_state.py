"""The daemon's state file: always whole (every tick, and under kill -9), content, safety."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import stat
import time
from pathlib import Path

import pytest

from ksmtuned.errors import StateFileError
from ksmtuned.report.state import HISTORY_LEN, STATE_SCHEMA, atomic_write, read_history, read_state, remove_stale_temps
from tests.report_support import Daemon, FAKE_KSM, read_sysfs, running

# free < threshold for sure (threshold = 100 % of RAM): every tick boosts, deterministically
BOOST = "KSM_THRES_COEF=100\n"


def _meminfo_total_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    raise AssertionError("no MemTotal")


# --- atomic_write ----------------------------------------------------------------------------

def test_atomic_write_mode_ignores_umask_and_leaves_no_temp(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "f.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f.json").st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["f.json"]


def test_atomic_write_replaces_a_symlink_never_writes_through_it(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "f.json").symlink_to(victim)
    atomic_write(tmp_path / "f.json", b"new")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "f.json").is_symlink()
    assert (tmp_path / "f.json").read_text() == "new"


def test_atomic_write_failure_removes_its_temp(tmp_path):
    (tmp_path / "f.json").mkdir()  # rename of a file over a directory fails
    with pytest.raises(IsADirectoryError):
        atomic_write(tmp_path / "f.json", b"x")
    assert os.listdir(tmp_path) == ["f.json"]


def test_stale_temps_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    target = tmp_path / "state.json"
    dead = 2**22 + 12345  # above pid_max's default range: never a live pid
    (tmp_path / f".state.json.{dead}.0.tmp").write_text("{")
    (tmp_path / f".state.json.{os.getppid()}.0.tmp").write_text("{")  # a live process's
    (tmp_path / ".other.json.1.0.tmp").write_text("{")
    assert remove_stale_temps(target) == 1
    assert sorted(os.listdir(tmp_path)) == [".other.json.1.0.tmp", f".state.json.{os.getppid()}.0.tmp"]


def test_read_state_refuses_other_schema_and_garbage_with_one_line(tmp_path):
    p = tmp_path / "s.json"
    assert read_state(p) is None  # no file: no state
    for text, why in [('{"schema": 999}', "schema: Input should be 1"),
                      ('{"schema": 1, "history": [', "Invalid JSON: EOF"),
                      ("[]", "Input should be an object")]:
        p.write_text(text)
        with pytest.raises(StateFileError, match=re.escape(why)) as e:
            read_state(p)
        assert str(e.value).startswith(f"{p}: ") and "\n" not in str(e.value)
        assert e.value.exit_code == 65
        assert read_history(p) == []  # the daemon's start: logged, ignored
    # the history alone is what the start reads of a previous file; one bad entry refuses it all
    p.write_text(json.dumps({"schema": STATE_SCHEMA, "history": [{"t": 1.0}, {"t": 2.0, "npages": 5}]}))
    assert [h.t for h in read_history(p)] == [1.0, 2.0] and read_history(p)[1].npages == 5
    p.write_text(json.dumps({"schema": STATE_SCHEMA, "history": [{"t": 1.0}, "junk", {"x": 1}]}))
    assert read_history(p) == []


# --- a real daemon ---------------------------------------------------------------------------

def test_state_file_content_after_a_tick(tmp_path):
    with running(tmp_path, BOOST + "KSM_MONITOR_INTERVAL=3600\n") as d:
        st = d.wait_adjusts(1)
        assert stat.S_IMODE(os.stat(d.state).st_mode) == 0o644
        assert st["schema"] == STATE_SCHEMA
        assert st["daemon"]["pid"] == d.proc.pid
        assert st["daemon"]["config_file"] == str(d.conf)
        assert st["reason"] == "start" and st["error"] is None
        assert st["decision"]["branch"] == "boost" and st["decision"]["run"] is True
        assert st["npages"] == st["decision"]["npages"] == 300
        # the writes of this tick, old -> new, and the counters read after them
        assert {"name": "pages_to_scan", "old": "100", "new": "300"} in st["decision"]["writes"]
        assert st["ksm"] == read_sysfs(d.sysfs)
        assert st["ksm"]["pages_to_scan"] == 300 and st["ksm"]["run"] == 1
        total = _meminfo_total_kib()
        assert st["inputs"]["total_kib"] == total
        assert st["inputs"]["thres_kib"] == total  # KSM_THRES_COEF=100
        assert st["inputs"]["free_metric"] == "classic" and st["inputs"]["ps_metric"] == "rss"
        assert st["settings"]["KSM_THRES_COEF"] == 100
        assert st["counts"] == {"adjusts": 1, "decisions": {"stop": 0, "boost": 1, "decay": 0, "error": 0}}
        (h,) = st["history"]
        assert h["decision"] == "boost" and h["npages"] == 300
        assert h["saved_bytes"] == int(FAKE_KSM["pages_sharing"]) * os.sysconf("SC_PAGE_SIZE")
        assert h["profit_bytes"] == int(FAKE_KSM["general_profit"])
        if st["ksmd"]["pid"] is not None:  # a kernel with KSM: ksmd's CPU time is tracked
            assert isinstance(h["ksmd_cpu_s"], float)
        else:  # no ksmd thread only on a kernel without KSM
            assert not Path("/sys/kernel/mm/ksm").exists() and h["ksmd_cpu_s"] is None
        # SIGUSR1: one more tick, recorded as a retune
        os.kill(d.proc.pid, signal.SIGUSR1)
        st = d.wait_adjusts(2)
        assert st["reason"] == "retune" and st["npages"] == 600 and len(st["history"]) == 2


def test_state_file_is_valid_json_after_every_tick(tmp_path):
    """A reader polling hard while the daemon rewrites the file every 20 ms never sees a partial file."""
    d = Daemon(tmp_path, BOOST + "KSM_MONITOR_INTERVAL=0.02\n")
    seen: set[int] = set()
    reads = 0
    bad: list[bytes] = []
    d.start()
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            data = d.state.read_bytes()
            reads += 1
            try:
                st = json.loads(data)
            except ValueError:
                bad.append(data)
                continue
            seen.add(st["counts"]["adjusts"])
            assert len(st["history"]) == min(st["counts"]["adjusts"], HISTORY_LEN)
    finally:
        assert d.stop() == 0
    assert not bad, f"{len(bad)} of {reads} reads were not JSON, e.g. {bad[0][:200]!r}"
    assert len(seen) >= 20, f"only {len(seen)} distinct ticks seen in {reads} reads"
    assert [n for n in os.listdir(d.state.parent) if n.endswith(".tmp")] == []


@pytest.mark.slow  # 14 s
def test_state_file_survives_kill_9_at_random_moments(tmp_path):
    """kill -9 the daemon at random moments while it writes every 20 ms: the file is always whole."""
    rng = random.Random(4)
    state = tmp_path / "run" / "state.json"
    last_adjusts = 0
    for i in range(24):
        d = Daemon(tmp_path / f"d{i}", BOOST + "KSM_MONITOR_INTERVAL=0.02\n", state=state)
        d.start(wait_state=False)
        try:
            d.wait_adjusts(1)
            time.sleep(rng.uniform(0.0, 0.15))
        finally:
            d.proc.kill()
            d.proc.wait(10)
        st = json.loads(state.read_bytes())  # must parse, whatever moment the kill hit
        assert st["schema"] == STATE_SCHEMA and st["daemon"]["pid"] == d.proc.pid
        # the history is carried across restarts, bounded
        assert last_adjusts < len(st["history"]) <= HISTORY_LEN
        last_adjusts = min(len(st["history"]), HISTORY_LEN - 1)
    # temp files of killed daemons are removed by the next daemon's start: at most the last one's remains
    temps = [n for n in os.listdir(state.parent) if n.endswith(".tmp")]
    assert len(temps) <= 1, temps


def test_history_is_carried_over_and_bounded(tmp_path):
    state = tmp_path / "run" / "state.json"
    state.parent.mkdir()
    old = [{"t": float(i), "saved_bytes": i, "profit_bytes": None, "ksmd_cpu_s": None, "decision": "stop",
            "npages": 0} for i in range(HISTORY_LEN + 50)]
    state.write_text(json.dumps({"schema": STATE_SCHEMA, "history": old}))
    with running(tmp_path, BOOST + "KSM_MONITOR_INTERVAL=3600\n", state=state) as d:
        st = d.wait_adjusts(1)
    assert len(st["history"]) == HISTORY_LEN
    assert st["history"][0] == old[51]  # the oldest dropped first
    assert st["history"][-1]["decision"] == "boost"


def test_state_file_planted_as_symlink_is_replaced_not_followed(tmp_path):
    state = tmp_path / "run" / "state.json"
    state.parent.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    state.symlink_to(victim)
    with running(tmp_path, BOOST + "KSM_MONITOR_INTERVAL=3600\n", state=state) as d:
        d.wait_adjusts(1)
    assert victim.read_text() == "precious"
    assert not state.is_symlink() and read_state(state) is not None


def test_state_directory_is_created(tmp_path):
    state = tmp_path / "a" / "b" / "state.json"
    with running(tmp_path, BOOST + "KSM_MONITOR_INTERVAL=3600\n", state=state) as d:
        d.wait_adjusts(1)
    assert stat.S_IMODE(os.stat(state.parent).st_mode) == 0o755
