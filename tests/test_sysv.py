"""The SysV init scripts (etc/init.d/ksm, etc/init.d/ksmtuned) under Debian's real `service`.

The guide's commands, verbatim: `service ksm start`, `service ksmtuned start`, `service ksmtuned
retune`, `service ksmtuned status`, `service ksmtuned stop`. They run in private mount and pid
namespaces that look like a host booted without systemd: a tmpfs over /run (no
/run/systemd/system, so `service` calls the init script instead of systemctl) and over /var/log,
overlays on /etc (our scripts in /etc/init.d, a test config) and on /usr/sbin (ksmtuned and
ksmctl as this checkout's commands), and a stand-in KSM directory bind-mounted over
/sys/kernel/mm/ksm. The namespace's pid 1 reaps orphans as init does. What is asserted is what
happened: the daemon's pid and name, the knobs written in the stand-in directory, the debug log's
lines after a retune, the LSB exit codes.

Debian has no chkconfig (RHEL's `chkconfig ksm on`); its counterpart, `update-rc.d`, is tested.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mount and pid namespaces, mounts"),
    pytest.mark.skipif(not Path("/usr/sbin/service").exists(), reason="no service(8) (Debian's init-system-helpers)"),
    pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("nsenter") is None,
                       reason="needs unshare and nsenter (util-linux)"),
]

INIT_D = REPO / "etc" / "init.d"
LEGACY_RETUNE = REPO / "etc" / "legacy-actions" / "ksmtuned" / "retune"

CONFIG = """\
# the test's /etc/ksmtuned.conf: always "start ksm, boost" (free < threshold), ticks only on demand
KSM_MONITOR_INTERVAL=3600
KSM_THRES_COEF=100
KSM_NPAGES_BOOST=100
KSM_NPAGES_MAX=100000
DEBUG=1
LOGFILE=/var/log/ksmtuned
"""

# pid 1 of the namespace: reap every orphan (the forking daemon's child is one), as init does;
# when it exits on SIGTERM, the kernel kills whatever is left in the namespace
REAPER = """\
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.05)
"""


def entry_point(name: str) -> str:
    """'module:function' of a console script, from pyproject.toml (a regex: no tomllib on 3.9)."""
    text = (REPO / "pyproject.toml").read_text()
    m = re.search(rf'^{name}\s*=\s*"([\w.]+):(\w+)"', text, re.M)
    assert m, f"pyproject.toml has no [project.scripts] {name}"
    return f"{m.group(1)}:{m.group(2)}"


def command_wrapper(name: str) -> str:
    module, func = entry_point(name).split(":")
    return (f"#!/bin/sh\n# this checkout's {name}, as an installed /usr/sbin/{name} would be\n"
            f"PYTHONPATH={REPO} exec {sys.executable} -c "
            f"'import sys; from {module} import {func}; sys.exit({func}())' \"$@\"\n")


class Host:
    """A host without systemd, in namespaces; `run` executes a command line inside it."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.ksm = tmp / "ksm"
        self.ksm.mkdir()
        for name, value in (("run", "0"), ("pages_to_scan", "64"), ("sleep_millisecs", "20"),
                            ("pages_shared", "0"), ("pages_sharing", "0"), ("pages_unshared", "0"),
                            ("pages_volatile", "0"), ("full_scans", "0")):
            (self.ksm / name).write_text(value + "\n")
        etc = tmp / "etc-up"
        (etc / "init.d").mkdir(parents=True)
        for script in ("ksm", "ksmtuned"):
            shutil.copy2(INIT_D / script, etc / "init.d" / script)
        (etc / "ksmtuned.conf").write_text(CONFIG)
        sbin = tmp / "sbin-up"
        sbin.mkdir()
        for name in ("ksmtuned", "ksmctl"):
            (sbin / name).write_text(command_wrapper(name))
            (sbin / name).chmod(0o755)
        for d in ("etc-wk", "sbin-wk"):
            (tmp / d).mkdir()
        setup = f"""set -e
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=0755 tmpfs /var/log
mount --bind {self.ksm} /sys/kernel/mm/ksm
mount -t overlay overlay -o lowerdir=/etc,upperdir={etc},workdir={tmp}/etc-wk /etc
mount -t overlay overlay -o lowerdir=/usr/sbin,upperdir={sbin},workdir={tmp}/sbin-wk /usr/sbin
touch {tmp}/ready
exec {sys.executable} -c '{REAPER}'
"""
        self.proc = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--mount-proc",
                                      "--propagation", "private", "bash", "-c", setup])
        self.init_pid = self._wait_for_init()

    def _wait_for_init(self) -> int:
        """The namespace's pid 1 (unshare's child), once it runs the reaper (mounts done)."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "the namespace's setup failed"
            try:
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
                if children and (self.tmp / "ready").exists():
                    return int(children[0])
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError("the namespace did not come up")

    def run(self, command: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "TERM": "dumb"}
        return subprocess.run(["nsenter", "-t", str(self.init_pid), "--mount", "--pid", "--", "sh", "-c", command],
                              capture_output=True, text=True, timeout=timeout_s, env=env, cwd="/")

    def read(self, path: str) -> str:
        r = self.run(f"cat {path} 2>/dev/null || true")
        return r.stdout

    def knob(self, name: str, wait_for: str | None = None) -> str:
        """A stand-in knob's value; with wait_for, once it has that value (or 20 s have passed)."""
        deadline = time.monotonic() + 20
        while True:
            value = (self.ksm / name).read_text().strip()
            if wait_for is None or value == wait_for or time.monotonic() > deadline:
                return value
            time.sleep(0.02)

    def daemon_pid(self) -> int | None:
        text = self.read("/run/ksmtune.pid").strip()
        return int(text) if text.isdigit() else None

    def comm(self, pid: int) -> str:
        return self.read(f"/proc/{pid}/comm").strip()

    def ticks(self) -> int:
        """Adjusts seen in the debug log (each starts with a `committed N free N` line)."""
        return self.read("/var/log/ksmtuned").count(": committed ")

    def wait_ticks(self, more_than: int) -> int:
        deadline = time.monotonic() + 20
        while (n := self.ticks()) <= more_than:
            assert time.monotonic() < deadline, f"no adjust after {more_than} in the debug log:\n" + self.read(
                "/var/log/ksmtuned")
            time.sleep(0.05)
        return n

    def close(self) -> None:
        try:
            os.kill(self.init_pid, 15)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def host(world_readable_tmp):
    if "overlay" not in Path("/proc/filesystems").read_text():
        pytest.skip("this kernel has no overlayfs")
    if not Path("/sys/kernel/mm/ksm").is_dir():
        pytest.skip("no /sys/kernel/mm/ksm to mount the stand-in over")
    h = Host(world_readable_tmp)
    try:
        yield h
    finally:
        h.close()


def ok(r: subprocess.CompletedProcess, code: int = 0) -> subprocess.CompletedProcess:
    assert r.returncode == code, f"exit {r.returncode}, wanted {code}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r


def test_the_guides_commands_verbatim(host):
    assert not host.run("test -d /run/systemd/system").returncode == 0  # `service` must not see systemd
    assert "stopped" in ok(host.run("service ksmtuned status"), 3).stdout
    assert "stopped (run=0)" in ok(host.run("service ksm status"), 3).stdout

    ok(host.run("service ksm start"))
    assert host.knob("run") == "1"
    assert "running" in ok(host.run("service ksm status")).stdout

    r = ok(host.run("service ksmtuned start"))
    pid = host.daemon_pid()
    assert pid and host.comm(pid) == "ksmtuned", r.stdout
    assert f"pid {pid}" in r.stdout
    first = host.wait_ticks(0)
    # the daemon's first adjust wrote the stand-in's knobs: free < threshold (KSM_THRES_COEF=100),
    # so start and boost by KSM_NPAGES_BOOST from 0; the sleep for this RAM is below 20 ms
    assert host.knob("pages_to_scan", wait_for="100") == "100" and host.knob("run") == "1"
    assert int(host.knob("sleep_millisecs")) < 20
    assert "cannot open" not in r.stderr, r.stderr
    assert f"running (pid {pid})" in ok(host.run("service ksmtuned status")).stdout
    assert "already running" in ok(host.run("service ksmtuned start")).stdout
    assert host.daemon_pid() == pid

    ok(host.run("service ksmtuned retune"))
    host.wait_ticks(first)  # a new `committed N free N` line: the daemon adjusted at once
    assert host.knob("pages_to_scan", wait_for="200") == "200"  # and boosted once more

    ok(host.run("service ksmtuned stop"))
    assert host.comm(pid) == ""  # gone (and reaped)
    assert host.read("/run/ksmtune.pid") == ""  # the daemon removed its pid file
    assert "stopped" in ok(host.run("service ksmtuned status"), 3).stdout
    assert "not running" in ok(host.run("service ksmtuned stop")).stdout  # stop when stopped: success

    ok(host.run("service ksm stop"))
    assert host.knob("run") == "0"
    ok(host.run("service ksm status"), 3)


def test_reload_restart_dead_daemon_and_not_running_codes(host):
    ok(host.run("service ksmtuned start"))
    pid = host.daemon_pid()
    n = host.wait_ticks(0)

    # reload: SIGHUP, the config is re-read (logged with what changed) and the daemon adjusts
    host.run("sed -i 's/^KSM_NPAGES_BOOST=100/KSM_NPAGES_BOOST=200/' /etc/ksmtuned.conf")
    ok(host.run("service ksmtuned reload"))
    n = host.wait_ticks(n)
    assert "reloaded /etc/ksmtuned.conf" in host.read("/var/log/ksmtuned.log")
    ok(host.run("service ksmtuned force-reload"))
    n = host.wait_ticks(n)
    assert host.daemon_pid() == pid

    # the legacy action (RHEL's service(8) on systemd hosts runs it): the same retune
    r = host.run(f"sh {LEGACY_RETUNE}")
    assert r.returncode == 0, r.stderr
    n = host.wait_ticks(n)

    ok(host.run("service ksmtuned restart"))
    new = host.daemon_pid()
    assert new and new != pid and host.comm(new) == "ksmtuned" and host.comm(pid) == ""
    ok(host.run("service ksmtuned try-restart"))
    assert host.daemon_pid() not in (None, new)

    # killed: the pid file stays, status says dead (1); stop cleans up; then stopped (3)
    killed = host.daemon_pid()
    host.run(f"kill -KILL {killed}")
    deadline = time.monotonic() + 10
    while host.comm(killed):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "dead" in ok(host.run("service ksmtuned status"), 1).stdout
    ok(host.run("service ksmtuned stop"))
    ok(host.run("service ksmtuned status"), 3)

    # not running: reload and retune say so with LSB's 7; try-restart does nothing
    r = ok(host.run("service ksmtuned retune"), 7)
    assert "not running" in r.stderr
    assert "not running" in ok(host.run("service ksmtuned reload"), 7).stderr
    ok(host.run("service ksmtuned try-restart"))
    ok(host.run("service ksmtuned status"), 3)
    assert "Usage:" in ok(host.run("service ksmtuned frobnicate"), 2).stderr


def test_a_start_that_fails_says_why_with_the_lsb_code(host):
    host.run("echo 'KSM_NPAGES_MAX=12OO' >> /etc/ksmtuned.conf")
    r = ok(host.run("service ksmtuned start"), 6)  # ksmtuned's 78 (config) is LSB's 6
    assert "/etc/ksmtuned.conf:" in r.stderr and "KSM_NPAGES_MAX" in r.stderr, r.stderr
    ok(host.run("service ksmtuned status"), 3)


def test_start_on_a_kernel_without_ksm_is_not_a_failure(host):
    """A host without KSM (a container, an old kernel): start succeeds doing nothing, so that the
    package's postinst (invoke-rc.d ksmtuned start) does not fail there; status says stopped."""
    host.run("echo 'KSMTUNED_OPTS=\"--sysfs /nonexistent/ksm\"' > /etc/default/ksmtuned")
    r = ok(host.run("service ksmtuned start"))
    assert "this kernel has no KSM" in r.stdout, r.stdout + r.stderr
    ok(host.run("service ksmtuned status"), 3)


def test_update_rc_d_enables_and_orders_the_scripts(host):
    """Debian's `update-rc.d` (RHEL's `chkconfig ksm on` has no Debian package): with insserv
    it reads the LSB headers, so ksm must come before ksmtuned (Should-Start: ksm)."""
    for name in ("ksm", "ksmtuned"):
        ok(host.run(f"update-rc.d {name} defaults"))
    links = host.run("ls /etc/rc2.d /etc/rc0.d").stdout.split()
    start = {m.group(2): int(m.group(1)) for m in (re.match(r"S(\d\d)(ksm\w*)$", x) for x in links) if m}
    kill = {m.group(2) for m in (re.match(r"K(\d\d)(ksm\w*)$", x) for x in links) if m}
    assert set(start) == {"ksm", "ksmtuned"} and kill == {"ksm", "ksmtuned"}, links
    if shutil.which("insserv") or Path("/sbin/insserv").exists():
        assert start["ksm"] < start["ksmtuned"], start
    ok(host.run("update-rc.d ksm disable"))
    links = host.run("ls /etc/rc2.d").stdout.split()
    assert not any(re.match(r"S\d\dksm$", x) for x in links) and any(re.match(r"K\d\dksm$", x) for x in links), links
    ok(host.run("update-rc.d ksm enable"))
    assert any(re.match(r"S\d\dksm$", x) for x in host.run("ls /etc/rc2.d").stdout.split())


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_pass_shellcheck():
    r = subprocess.run(["shellcheck", "-s", "sh", str(INIT_D / "ksm"), str(INIT_D / "ksmtuned"), str(LEGACY_RETUNE)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
