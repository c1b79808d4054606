"""The libvirt hook etc/libvirt/hooks/qemu.d/ksmtuned, run for real with /bin/sh.

A stub `ksmtuned` on PATH records its arguments: that is the CLI boundary, used only to see
which libvirt events call `retune`. The other tests use the real `ksmtuned` from this checkout
(no daemon, a foreign process, a real daemon). A real libvirtd calling the hook is tested
elsewhere (the libvirt tests).
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.daemon_support import DaemonProc

HOOK = REPO / "etc" / "libvirt" / "hooks" / "qemu.d" / "ksmtuned"
DOMAIN_XML = "<domain type='kvm'><name>g0</name>" + "<!-- padding -->" * 20000 + "</domain>\n"  # ~300 kB

# Every call libvirt makes to a qemu hook (libvirt's docs, "Hooks for specific system management").
EVENTS = [
    ("prepare", "begin"), ("start", "begin"), ("started", "begin"), ("stopped", "end"),
    ("release", "end"), ("reconnect", "begin"), ("migrate", "begin"), ("restore", "begin"),
    ("attach", "begin"), ("reconnect", "end"), ("started", "end"), ("stopped", "begin"), ("", ""),
]
RETUNE_EVENTS = {("started", "begin"), ("stopped", "end")}


@pytest.fixture
def live_pid():
    """A live process for the pid file to name (the stub stands in for the daemon's CLI)."""
    proc = subprocess.Popen(["sleep", "300"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def stub_bin(tmp: Path, body: str = "") -> tuple[Path, Path]:
    """A directory with a stub ksmtuned that appends its argv to a record file."""
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    record = tmp / "record"
    stub = bindir / "ksmtuned"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {record}\n{body}\n')
    stub.chmod(0o755)
    return bindir, record


def run_hook(args, env, stdin=DOMAIN_XML, timeout=20) -> subprocess.CompletedProcess:
    return subprocess.run([str(HOOK), *args], input=stdin, env=env, capture_output=True, text=True,
                          timeout=timeout)


def base_env(path: str, pidfile: Path) -> dict[str, str]:
    # libvirtd runs hooks with a small environment: PATH and a few locale variables.
    return {"PATH": path, "PIDFILE": str(pidfile), "LC_ALL": "C"}


def test_hook_is_an_executable_posix_sh_script():
    assert HOOK.read_text().startswith("#!/bin/sh\n")
    assert os.access(HOOK, os.X_OK), "the hook must be executable (libvirt skips it otherwise)"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="no shellcheck (Debian: shellcheck)")
def test_hook_passes_shellcheck():
    r = subprocess.run(["shellcheck", "-s", "sh", str(HOOK)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.skipif(shutil.which("dash") is None, reason="no dash (Debian's /bin/sh)")
def test_hook_parses_in_dash_no_bashisms():
    r = subprocess.run(["dash", "-n", str(HOOK)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_hook_default_pid_file_is_the_daemons():
    from ksmtuned.paths import DEFAULT_PIDFILE

    assert "pidfile=${PIDFILE:-%s}" % DEFAULT_PIDFILE.replace("/var/run/", "/run/", 1) in HOOK.read_text()


@pytest.mark.parametrize("operation, subop", EVENTS)
def test_only_started_and_stopped_call_retune(tmp_path, live_pid, operation, subop):
    bindir, record = stub_bin(tmp_path)
    pidfile = tmp_path / "ksmtune.pid"
    pidfile.write_text(f"{live_pid}\n")
    r = run_hook(["g0", operation, subop, "-"], base_env(f"{bindir}:/usr/bin:/bin", pidfile))
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    calls = record.read_text().splitlines() if record.exists() else []
    if (operation, subop) in RETUNE_EVENTS:
        assert calls == ["retune --quiet"]
    else:
        assert calls == []


@pytest.mark.parametrize("content", ["", "\n", "garbage\n", "12ab\n", "-1\n", "0\n", "007\n", "dead"])
def test_no_daemon_means_no_call(tmp_path, content):
    """Missing, empty, garbage or stale pid file: nothing is started, exit 0."""
    bindir, record = stub_bin(tmp_path)
    pidfile = tmp_path / "ksmtune.pid"
    if content == "dead":
        p = subprocess.Popen(["true"])
        p.wait()
        content = f"{p.pid}\n"
    pidfile.write_text(content)
    env = base_env(f"{bindir}:/usr/bin:/bin", pidfile)
    assert run_hook(["g0", "started", "begin", "-"], env).returncode == 0
    pidfile.unlink()
    assert run_hook(["g0", "stopped", "end", "-"], env).returncode == 0
    assert not record.exists()


def test_pid_file_without_final_newline(tmp_path, live_pid):
    bindir, record = stub_bin(tmp_path)
    pidfile = tmp_path / "ksmtune.pid"
    pidfile.write_text(str(live_pid))
    assert run_hook(["g0", "started", "begin", "-"], base_env(f"{bindir}:/usr/bin:/bin", pidfile)).returncode == 0
    assert record.read_text().splitlines() == ["retune --quiet"]


@pytest.mark.parametrize("body", ["exit 1", "exit 3", "echo oops >&2; exit 77", "kill -SEGV $$"])
def test_a_failing_ksmtuned_never_fails_the_guest_start(tmp_path, live_pid, body):
    bindir, record = stub_bin(tmp_path, body)
    pidfile = tmp_path / "ksmtune.pid"
    pidfile.write_text(f"{live_pid}\n")
    r = run_hook(["g0", "started", "begin", "-"], base_env(f"{bindir}:/usr/bin:/bin", pidfile))
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    assert record.exists()


@pytest.mark.slow
def test_a_hanging_ksmtuned_is_cut_off(tmp_path, live_pid):
    """A stuck retune (here: one that even ignores SIGTERM) cannot hold the guest's start."""
    bindir, record = stub_bin(tmp_path, "trap '' TERM; sleep 30; sleep 30")
    pidfile = tmp_path / "ksmtune.pid"
    pidfile.write_text(f"{live_pid}\n")
    start = time.monotonic()
    r = run_hook(["g0", "stopped", "end", "-"], base_env(f"{bindir}:/usr/bin:/bin", pidfile), timeout=40)
    elapsed = time.monotonic() - start
    assert r.returncode == 0
    assert elapsed < 4.5, f"the hook held libvirt for {elapsed:.1f}s"


def test_hook_never_waits_for_stdin(tmp_path, live_pid):
    """libvirt writes the domain XML to the hook's stdin; the hook must not wait for EOF."""
    bindir, record = stub_bin(tmp_path)
    pidfile = tmp_path / "ksmtune.pid"
    pidfile.write_text(f"{live_pid}\n")
    for args in (["g0", "started", "begin", "-"], ["g0", "prepare", "begin", "-"]):
        proc = subprocess.Popen([str(HOOK), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=base_env(f"{bindir}:/usr/bin:/bin", pidfile))
        try:
            assert proc.wait(timeout=10) == 0  # stdin left open, never written, never closed
        finally:
            proc.kill()
            proc.stdin.close()
            proc.stdout.close()
            proc.stderr.close()
    assert record.read_text().splitlines() == ["retune --quiet"]


def test_hook_finds_ksmtuned_outside_path(tmp_path, live_pid):
    """libvirtd's PATH may lack /usr/local/bin: the hook also looks where pip and packages put it."""
    pidfile = tmp_path / "ksmtune.pid"
    pidfile.write_text(f"{live_pid}\n")
    text = HOOK.read_text()
    for d in ("/usr/local/bin/ksmtuned", "/usr/bin/ksmtuned", "/usr/sbin/ksmtuned"):
        assert d in text
    empty = tmp_path / "empty"
    empty.mkdir()
    # Nothing on PATH (not even coreutils): still exit 0, whatever is installed on this host.
    r = run_hook(["g0", "started", "begin", "-"], base_env(str(empty), pidfile))
    assert r.returncode == 0


# --- with the real ksmtuned ------------------------------------------------------------------

def real_bin() -> str:
    venv = Path(sys.executable).parent
    if not (venv / "ksmtuned").exists():
        pytest.skip("the ksmtuned console script is not installed next to this interpreter (pip install -e .)")
    return str(venv)


def test_no_daemon_costs_almost_nothing(tmp_path):
    """No daemon: the hook answers without starting Python. Median of 7 runs under 100 ms."""
    env = base_env(f"{real_bin()}:/usr/bin:/bin", tmp_path / "ksmtune.pid")
    times = []
    for _ in range(7):
        start = time.perf_counter()
        r = run_hook(["g0", "started", "begin", "-"], env)
        times.append(time.perf_counter() - start)
        assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    median_ms = statistics.median(times) * 1000
    print(f"hook with no daemon: median {median_ms:.1f} ms over 7 runs")
    assert median_ms < 100


def test_real_retune_quiet_with_no_daemon_says_nothing(tmp_path):
    """The CLI half of the contract the hook relies on."""
    r = subprocess.run([str(Path(real_bin()) / "ksmtuned"), "retune", "--quiet",
                        "--pidfile", str(tmp_path / "none.pid")], capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_pid_file_naming_another_process_is_not_signalled(tmp_path):
    """A stale pid file whose pid was reused: the real retune refuses, the process lives on."""
    victim = subprocess.Popen(["sleep", "300"])  # SIGUSR1 would kill it
    try:
        pidfile = tmp_path / "ksmtune.pid"
        pidfile.write_text(f"{victim.pid}\n")
        r = run_hook(["g0", "started", "begin", "-"], base_env(f"{real_bin()}:/usr/bin:/bin", pidfile))
        assert r.returncode == 0
        time.sleep(0.1)
        assert victim.poll() is None, "the hook's retune signalled a process that is not ksmtuned"
    finally:
        victim.kill()
        victim.wait()


def test_hook_makes_a_real_daemon_adjust_now(tmp_path):
    """A real daemon with a one-hour interval adjusts within a second of a guest start or stop."""
    env_path = f"{real_bin()}:/usr/bin:/bin"
    with DaemonProc(tmp_path, "KSM_MONITOR_INTERVAL=3600\n") as d:
        for n, event in enumerate((["started", "begin"], ["prepare", "begin"], ["stopped", "end"]), start=1):
            before = d.ticks()
            start = time.monotonic()
            r = run_hook(["g0", *event, "-"], base_env(env_path, d.pidfile))
            assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
            if event[0] == "prepare":
                time.sleep(0.3)
                assert d.ticks() == before, "an ignored event made the daemon adjust"
            else:
                d.wait_ticks(before + 1, timeout_s=5)
                assert time.monotonic() - start < 1.0
        assert d.proc.poll() is None
        d.signal(signal.SIGTERM)
