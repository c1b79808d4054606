"""journald priorities: when standard error is the journal, every line carries its "<N>" prefix.

systemd names the journal's socket in JOURNAL_STREAM ("DEVICE:INODE" of the stream it connected
to stdout/stderr). The daemon compares that with its own stderr's fstat: here, stderr (and
stdout) is a real file and JOURNAL_STREAM names that file, or another one. Then, where this
machine lets us start a real systemd-journald (in private namespaces), the same through the
journal itself, read back with journalctl's PRIORITY field.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.daemon_support import fake_ksm_dir

CONFIG = """\
KSM_MONITOR_INTERVAL=3600
KSM_THRES_COEF=100
KSM_NOT_A_KEY=1
"""


def _wait(pred, what: str, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def run_daemon(tmp: Path, journal_of: Path | None, out: Path) -> str:
    """Start the daemon with stdout+stderr on `out`, JOURNAL_STREAM naming `journal_of`'s
    dev:ino; make it log at every level (a warning at start, info, the debug lines, an error
    from a failed adjust), stop it; return what it wrote."""
    ksm = fake_ksm_dir(tmp)
    conf = tmp / "ksmtuned.conf"
    conf.write_text(CONFIG)
    conf.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "PIDFILE", "DEBUG", "LOGFILE")}
    env["PYTHONPATH"] = str(REPO)
    with open(out, "w") as f:
        if journal_of is not None:
            st = os.stat(journal_of)
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.Popen([sys.executable, "-m", "ksmtuned", "--foreground", "--force", "--debug",
                                 "--config", str(conf), "--sysfs", str(ksm), "--pidfile", str(tmp / "pid"),
                                 "--state-file", str(tmp / "state.json"), "--run-dir", str(tmp)],
                                stdout=f, stderr=f, env=env, cwd=tmp)
    try:
        _wait(lambda: "KSMCTL start" in out.read_text(), "the first adjust")
        # an adjust that fails: pages_to_scan (boosted every tick) cannot be read or written
        (ksm / "pages_to_scan").unlink()
        (ksm / "pages_to_scan").mkdir()
        proc.send_signal(signal.SIGUSR1)
        _wait(lambda: "adjust failed" in out.read_text(), "the failed adjust")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out.read_text()


def test_lines_carry_their_priority_when_stderr_is_the_journal(tmp_path):
    out = tmp_path / "journal"
    text = run_daemon(tmp_path, journal_of=out, out=out)
    lines = text.splitlines()
    assert lines and all(re.match(r"<[2-7]>", line) for line in lines), text
    assert re.search(r"^<4>WARNING: .*unknown key KSM_NOT_A_KEY", text, re.M), text
    assert re.search(r"^<6>INFO: started: ", text, re.M), text
    assert re.search(r"^<7>\w{3} \w{3} [ \d]\d .*: committed \d+ free \d+$", text, re.M), text  # the debug log
    assert re.search(r"^<3>ERROR: adjust failed", text, re.M), text
    assert re.search(r"^<6>INFO: stopping on signal", text, re.M), text


def test_no_prefix_when_journal_stream_names_another_file(tmp_path):
    other = tmp_path / "elsewhere"
    other.write_text("")
    text = run_daemon(tmp_path, journal_of=other, out=tmp_path / "stderr")
    assert "ERROR: adjust failed" in text and "INFO: started" in text and ": committed " in text, text
    assert not [line for line in text.splitlines() if line.startswith("<")], text


@pytest.mark.parametrize("value", ["", "garbage", "12:", ":34", "1:2:3"])
def test_a_malformed_journal_stream_adds_nothing(tmp_path, value):
    conf = tmp_path / "c.conf"
    conf.write_text("KSM_NOT_A_KEY=1\n")
    conf.chmod(0o644)
    env = dict(os.environ, JOURNAL_STREAM=value, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "ksmtuned", "check-config", "--config", str(conf)],
                       capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0 and "unknown key KSM_NOT_A_KEY" in r.stderr and not r.stderr.startswith("<"), r.stderr


JOURNALD = next((p for p in ("/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald") if os.access(p, os.X_OK)),
                None)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a private systemd-journald in mount namespaces")
@pytest.mark.skipif(JOURNALD is None or not shutil.which("systemd-cat") or not shutil.which("journalctl"),
                    reason="systemd-journald, systemd-cat or journalctl is not installed")
def test_through_a_real_journald(world_readable_tmp):
    """A real systemd-journald (its own, in a private /run and /var/log/journal), the daemon's
    output connected to it by systemd-cat (JOURNAL_STREAM set from that socket, as systemd
    does for a unit), read back with journalctl: each message is stored at its priority."""
    tmp = world_readable_tmp
    ksm = fake_ksm_dir(tmp)
    conf = tmp / "ksmtuned.conf"
    conf.write_text(CONFIG)
    conf.chmod(0o644)
    daemon = (f"PYTHONPATH={REPO} JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec {sys.executable} -m ksmtuned "
              f"--foreground --force --debug --config {conf} --sysfs {ksm} --pidfile {tmp}/pid "
              f"--state-file {tmp}/state.json --run-dir {tmp}")
    script = f"""set -e
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/journal {tmp}/journal
mount --bind {tmp}/journal /var/log/journal 2>/dev/null || {{ mkdir -p /var/log/journal && mount --bind {tmp}/journal /var/log/journal; }}
{JOURNALD} & jpid=$!
for i in $(seq 200); do [ -S /run/systemd/journal/stdout ] && break; sleep 0.05; done
[ -S /run/systemd/journal/stdout ] || {{ echo "journald did not start" >&2; exit 90; }}
systemd-cat -t ksmtuned-test sh -c '{daemon}' & cat_pid=$!
for i in $(seq 400); do grep -q . {ksm}/run && [ "$(cat {ksm}/run)" = 1 ] && break; sleep 0.05; done
sleep 0.5
rm {ksm}/pages_to_scan; mkdir {ksm}/pages_to_scan
kill -USR1 $(cat {tmp}/pid)
for i in $(seq 200); do journalctl -t ksmtuned-test 2>/dev/null | grep -q 'adjust failed' && break; sleep 0.05; done
kill -TERM $(cat {tmp}/pid); wait $cat_pid || true
journalctl -t ksmtuned-test -o json --no-pager > {tmp}/out.json
kill $jpid; wait $jpid || true
"""
    # a pid namespace too: when its pid 1 (this bash) exits, however, journald and the daemon go with it
    r = subprocess.run(["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private",
                        "bash", "-c", script],
                       capture_output=True, text=True, timeout=120)
    if r.returncode == 90:
        pytest.skip(f"systemd-journald does not run outside systemd here: {r.stderr.strip()[-300:]}")
    assert r.returncode == 0, r.stderr
    entries = [json.loads(line) for line in (tmp / "out.json").read_text().splitlines() if line.strip()]
    by_text = {e["MESSAGE"]: int(e["PRIORITY"]) for e in entries if isinstance(e.get("MESSAGE"), str)}
    assert by_text, (tmp / "out.json").read_text()

    def priority_of(pattern: str) -> int:
        found = [p for m, p in by_text.items() if re.search(pattern, m)]
        assert found, f"no journal entry matches {pattern!r}: {sorted(by_text)}"
        return found[0]

    assert priority_of(r"^WARNING: .*unknown key") == 4
    assert priority_of(r"^INFO: started: ") == 6
    assert priority_of(r": committed \d+ free \d+$") == 7
    assert priority_of(r"^ERROR: adjust failed") == 3
    assert not [m for m in by_text if m.startswith("<")]  # journald took the prefixes off
