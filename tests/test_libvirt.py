"""A real libvirt: the project's hook retunes the running daemon on `started` and `stopped`,
ignores every other event, never delays a guest's start, and libvirt's guests are counted.

One libvirtd for the module (tests/libvirt_support.py); the daemon under test writes a temp
KSM directory (only its reaction time matters here), and owns the default pid file
/run/ksmtune.pid, which is where the hook looks (libvirt gives hooks no environment of ours).
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ksmtuned.engine.guests import GuestFinder
from tests import libvirt_support as lv
from tests.daemon_support import DaemonProc

pytestmark = [pytest.mark.libvirt, pytest.mark.root, pytest.mark.qemu, pytest.mark.slow]

DEFAULT_PIDFILE = Path("/run/ksmtune.pid")
HOOK = lv.HOOK_SRC


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("libvirt")
    with lv.libvirt_host(tmp, path_prefix=Path(sys.executable).parent) as h:
        yield h


def _pidfile_free() -> bool:
    """No one holds the default pid file's lock (another ksmtuned would)."""
    try:
        fd = os.open(DEFAULT_PIDFILE, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@pytest.fixture
def daemon(tmp_path):
    if os.geteuid() != 0:
        pytest.skip(f"needs root to own {DEFAULT_PIDFILE}, where the libvirt hook looks")
    if not HOOK.exists():
        pytest.skip(f"{HOOK} is missing")
    if not _pidfile_free():
        pytest.skip(f"another ksmtuned holds {DEFAULT_PIDFILE}, where the libvirt hook looks")
    # counting only this module's guests keeps other tests' guests out of its numbers
    d = DaemonProc(tmp_path, "KSM_MONITOR_INTERVAL=3600\nKSM_GUEST_MATCH='regex:guest=ksmt-'\n")
    d.pidfile = DEFAULT_PIDFILE
    d.start(wait_ticks=1)
    try:
        yield d
    finally:
        d.stop()
        assert not DEFAULT_PIDFILE.exists() or _pidfile_free()


def _committed(d: DaemonProc) -> list[int]:
    return [int(x) for x in re.findall(r": committed (\d+) free", d.log.read_text())]


def _wait_ticks(d: DaemonProc, n: int, within_s: float) -> float:
    start = time.monotonic()
    while len(_committed(d)) < n:
        assert time.monotonic() - start < within_s, (
            f"no adjust {n} within {within_s} s of the event; log:\n{d.log.read_text()}")
        time.sleep(0.01)
    return time.monotonic() - start


def _run_hook(*args: str, stdin: str = "<domain/>") -> float:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin"}
    start = time.monotonic()
    r = subprocess.run(["/bin/sh", str(HOOK), *args], input=stdin, capture_output=True, text=True, env=env,
                       timeout=10)
    took = time.monotonic() - start
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r
    return took


def test_started_and_stopped_retune_the_running_daemon(host, daemon):
    assert _committed(daemon) == [0]
    # virsh create: prepare, start, started, ... events; only `started begin` retunes
    qemu_pid = host.create("ksmt-lv1", mem_mib=128, kvm=lv_kvm())
    _wait_ticks(daemon, 2, within_s=1.0)  # of virsh create's return (the hook runs before it)
    time.sleep(1.0)
    assert len(_committed(daemon)) == 2, daemon.log.read_text()  # prepare/start: nothing
    # that adjust counted the guest (its RSS at that moment; a libvirt guest is not preallocated)
    assert _committed(daemon)[1] > 0

    # the libvirt guest: counted by default and by `libvirt` (via its pid file), not by `debian`
    default = {g.pid: g for g in GuestFinder().scan()}
    assert qemu_pid in default and default[qemu_pid].name == "ksmt-lv1"
    [g] = [g for g in GuestFinder(matchers=["libvirt"]).scan() if g.pid == qemu_pid]
    assert g.pidfile == "/run/libvirt/qemu/ksmt-lv1.pid" and g.matcher == "libvirt"
    assert qemu_pid not in {g.pid for g in GuestFinder(matchers=["debian"]).scan()}
    assert qemu_pid in {g.pid for g in GuestFinder(matchers=["redhat"]).scan()}

    # virsh destroy: stopped end retunes, release end does not
    host.destroy("ksmt-lv1")
    _wait_ticks(daemon, 3, within_s=1.0)
    time.sleep(1.0)
    assert len(_committed(daemon)) == 3, daemon.log.read_text()
    assert _committed(daemon)[2] == 0


def test_a_tcg_guest_is_found_by_its_pid_file(host):
    """type='qemu' (TCG): no -accel kvm on its command line; libvirt's pid file names it."""
    qemu_pid = host.create("ksmt-tcg1", mem_mib=64, kvm=False)
    try:
        cmdline = Path(f"/proc/{qemu_pid}/cmdline").read_bytes().split(b"\0")
        assert b"kvm" not in b" ".join(cmdline[cmdline.index(b"-accel"):cmdline.index(b"-accel") + 2])
        [g] = [g for g in GuestFinder(matchers=["libvirt"]).scan() if g.pid == qemu_pid]
        assert g.pidfile == "/run/libvirt/qemu/ksmt-tcg1.pid" and g.name == "ksmt-tcg1"
        assert qemu_pid not in {g.pid for g in GuestFinder(matchers=["libvirt"], run_dir=Path("/nonexistent")).scan()}
    finally:
        host.destroy("ksmt-tcg1")


def test_unknown_events_are_ignored(daemon):
    for args in (["g", "prepare", "begin", "-"], ["g", "start", "begin", "-"], ["g", "release", "end", "-"],
                 ["g", "reconnect", "begin", "-"], ["g", "migrate", "begin", "-"], ["g", "restore", "begin", "-"],
                 ["g", "attach", "begin", "-"], ["g", "frobnicate", "sideways", "-"], []):
        _run_hook(*args)
    time.sleep(0.5)
    assert len(_committed(daemon)) == 1, daemon.log.read_text()
    _run_hook("g", "started", "begin", "-")  # and the hook does work with this daemon
    _wait_ticks(daemon, 2, within_s=1.0)


def test_without_a_daemon_the_hook_is_fast_and_the_guest_starts(host, tmp_path):
    if not _pidfile_free():
        pytest.skip(f"another ksmtuned holds {DEFAULT_PIDFILE}")
    # no pid file, a stale pid file, garbage in it: always exit 0, under 100 ms
    stale = DEFAULT_PIDFILE.exists()
    cases = []
    if not stale:
        cases.append(("no pid file", None))
    dead = subprocess.Popen(["true"])
    dead.wait()
    cases += [("a dead pid", f"{dead.pid}\n"), ("garbage", "ksmtuned\n")]
    try:
        for what, content in cases:
            if content is not None:
                DEFAULT_PIDFILE.write_text(content)
            for event in (("g", "started", "begin", "-"), ("g", "stopped", "end", "-")):
                took = min(_run_hook(*event) for _ in range(3))
                assert took < 0.1, f"{what}: the hook took {took * 1000:.0f} ms"
    finally:
        if not stale:
            DEFAULT_PIDFILE.unlink(missing_ok=True)
    # and through libvirt: the guest starts and runs
    qemu_pid = host.create("ksmt-nod", mem_mib=64, kvm=lv_kvm())
    assert Path(f"/proc/{qemu_pid}").exists()
    assert "ksmt-nod" in host.virsh("list", "--name").stdout
    host.destroy("ksmt-nod")


def lv_kvm() -> bool:
    from tests.qemu_support import kvm_works

    return kvm_works()
