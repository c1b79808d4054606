"""ksmtuned runs as root on hosts that carry other people's guests: it must never become a way in.

Every test drives the real command line or a real daemon.  Links are planted by the user
``nobody`` (setpriv) in a sticky, world-writable directory, as an attacker on the host would.
"""

from __future__ import annotations

import os
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ksmtuned.core.config import parse_listen, Settings
from tests.conftest import REPO
from tests.faultrig import Daemon, make_procfs, make_sysfs, read_text, wait_until, write_atomic

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (file ownership, other users)")
KSMTUNED = [sys.executable, "-m", "ksmtuned"]
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]


def run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, **kw)


@pytest.fixture
def sticky_dir():
    """A directory like /tmp: mode 1777, root's; anyone may plant entries, only owners remove them."""
    path = Path(tempfile.mkdtemp(prefix="ksmtuned-sticky-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return run(AS_NOBODY + list(argv))


# --- the config is data, never code ----------------------------------------------------------

GOOD_HEAD = "# ksmtuned.conf\nKSM_MONITOR_INTERVAL=60\n"  # the payload is on line 3

CODE_LINES = {
    "command substitution": "KSM_NPAGES_MAX=$(touch {m})",
    "quoted substitution": 'KSM_NPAGES_MAX="$(touch {m})"',
    "backticks": "KSM_NPAGES_MAX=`touch {m}`",
    "separator": "KSM_NPAGES_MAX=1; touch {m}",
    "pipe": "KSM_NPAGES_MAX=1 | touch {m}",
    "and": "KSM_NPAGES_MAX=1 && touch {m}",
    "or": "KSM_NPAGES_MAX=$(false) || touch {m}",
    "background": "KSM_NPAGES_MAX=1 & touch {m}",
    "redirection": "KSM_NPAGES_MAX=1 > {m}",
    "append": "KSM_NPAGES_MAX=1 >>{m}",
    "stderr redirection": "KSM_NPAGES_MAX=1 2>{m}",
    "default expansion": "KSM_NPAGES_MAX=${{X:=$(touch {m})}}",
    "a bare command": "touch {m}",
    "a prefixed command": "KSM_NPAGES_MAX=1 touch {m}",
    "subshell": "(touch {m})",
    "source": ". {script}",
    "eval": "eval touch {m}",
    "export with code": "export KSM_NPAGES_MAX=$(touch {m})",
    "input redirection": "KSM_NPAGES_MAX=1 < /etc/passwd",
}


@pytest.mark.parametrize("case", list(CODE_LINES))
def test_config_code_is_refused_with_its_line_and_never_runs(tmp_path, case):
    marker = tmp_path / "marker"
    script = tmp_path / "script.sh"
    script.write_text(f"touch {marker}\n")
    line = CODE_LINES[case].format(m=marker, script=script)
    conf = tmp_path / "ksmtuned.conf"
    conf.write_text(GOOD_HEAD + line + "\nDEBUG=1\n")
    conf.chmod(0o644)
    sysfs = make_sysfs(tmp_path / "ksm")
    for argv in (["check-config"], ["--foreground", "--force", "--sysfs", str(sysfs),
                                     "--pidfile", str(tmp_path / "pid")]):
        r = run(KSMTUNED + argv + ["--config", str(conf)])
        assert r.returncode == 78, (argv, r.stderr)
        assert f"{conf}:3: " in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert not marker.exists(), "the config ran code"
    # the test can fail: the old daemon (bash `source`) runs the same file
    if "touch" in line or case == "source":
        subprocess.run(["bash", "-c", f"source {conf}"], capture_output=True, timeout=10)
        assert marker.exists(), "bash did not run it either: the payload proves nothing"


# --- a config others can write ------------------------------------------------------------


def _conf(dir_: Path, mode: int = 0o644, dir_mode: int = 0o755) -> Path:
    dir_.mkdir(exist_ok=True)
    conf = dir_ / "ksmtuned.conf"
    conf.write_text("KSM_MONITOR_INTERVAL=60\n")
    conf.chmod(mode)
    dir_.chmod(dir_mode)
    return conf


def _start_once(conf: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    sysfs = make_sysfs(tmp_path / "ksm")
    procfs = tmp_path / "proc"
    if not procfs.exists():
        make_procfs(procfs)
    return run(KSMTUNED + ["--once", "--force", "--config", str(conf), "--sysfs", str(sysfs),
                           "--procfs", str(procfs), "--pidfile", str(tmp_path / "pid"), *extra])


UNSAFE = {
    "world-writable file": (0o666, 0o755, None, None, "writable by group or others", "chmod go-w"),
    "group-writable file": (0o664, 0o755, None, None, "writable by group or others", "chmod go-w"),
    "world-writable directory": (0o644, 0o777, None, None, "directory is writable by group or others",
                                 "chmod go-w"),
    "group-writable directory": (0o644, 0o775, None, None, "directory is writable", "chmod go-w"),
    "file owned by nobody": (0o644, 0o755, "nobody", None, "owned by uid 65534, not root", "chown root"),
    "directory owned by nobody": (0o644, 0o755, None, "nobody", "owned by uid 65534, not root", "chown root"),
}


@root
@pytest.mark.parametrize("case", list(UNSAFE))
def test_config_others_can_write_is_refused_with_the_fix_unless_insecure_config(tmp_path, case):
    mode, dir_mode, file_owner, dir_owner, problem, fix = UNSAFE[case]
    conf = _conf(tmp_path / "etc", mode, dir_mode)
    if file_owner:
        shutil.chown(conf, file_owner)
    if dir_owner:
        shutil.chown(conf.parent, dir_owner)
    for argv in (["check-config", "--config", str(conf)],):
        r = run(KSMTUNED + argv)
        assert r.returncode == 78 and problem in r.stderr and fix in r.stderr, r.stderr
    r = _start_once(conf, tmp_path)
    assert r.returncode == 78 and problem in r.stderr and f"{fix}" in r.stderr and "--insecure-config" in r.stderr
    r = _start_once(conf, tmp_path, "--insecure-config")
    assert r.returncode == 0, r.stderr
    r = run(KSMTUNED + ["check-config", "--insecure-config", "--config", str(conf)])
    assert r.returncode == 0, r.stderr


@root
def test_config_in_a_sticky_directory_owned_by_root_is_accepted(tmp_path, sticky_dir):
    conf = sticky_dir / "ksmtuned.conf"
    conf.write_text("KSM_MONITOR_INTERVAL=60\n")
    conf.chmod(0o644)
    assert _start_once(conf, tmp_path).returncode == 0


@root
def test_config_symlink_planted_by_another_user_is_refused(tmp_path, sticky_dir):
    """nobody plants ksmtuned.conf -> a root-only file: ksmtuned must not read it (its error
    messages quote the offending line, which would print the secret)."""
    secret = tmp_path / "secret"
    secret.write_text("root:$6$not-a-real-hash$:19000:0:99999:7:::\n")
    secret.chmod(0o600)
    conf = sticky_dir / "ksmtuned.conf"
    assert as_nobody("ln", "-s", str(secret), str(conf)).returncode == 0
    r = run(KSMTUNED + ["check-config", "--config", str(conf)])
    assert r.returncode == 78, r.stderr
    assert "not-a-real-hash" not in r.stdout + r.stderr


@root
def test_reload_of_a_config_made_writable_keeps_the_settings(tmp_path):
    d = Daemon(tmp_path, interval_s=3600).start()
    with d:
        d.conf.chmod(0o666)
        d.signal(__import__("signal").SIGHUP)
        wait_until(lambda: "reload failed" in d.stderr_text(), what="the reload refused")
        assert "chmod go-w" in d.stderr_text()
        assert d.stop() == 0


# --- pid file, log file, state file: never through a planted link -------------------------------


def _target(tmp_path: Path) -> tuple[Path, bytes]:
    target = tmp_path / "precious"
    content = b"root's file: must stay as it is\n"
    target.write_bytes(content)
    target.chmod(0o644)
    return target, content


def _plant(kind: str, target: Path, link: Path) -> str:
    """Plant ``link`` as nobody; returns how it was planted."""
    if kind == "symlink":
        r = as_nobody("ln", "-s", str(target), str(link))
        assert r.returncode == 0, r.stderr
        return "by nobody"
    if kind == "hardlink":
        # fs.protected_hardlinks=1 forbids nobody to link a file of root's: the kernel already
        # stops this attack here.  Root makes the same link, the state an attacker reaches on a host
        # with protected_hardlinks=0, so that the daemon's own check is what is tested.
        r = as_nobody("ln", str(target), str(link))
        if r.returncode == 0:
            return "by nobody"
        os.link(target, link)
        return "by root (protected_hardlinks stopped nobody)"
    if kind == "nobody's file":
        r = as_nobody("sh", "-c", f"echo 1 > {link}")
        assert r.returncode == 0, r.stderr
        return "by nobody"
    raise ValueError(kind)


def _nobody_can_reach(path: Path) -> None:
    p = path
    while p != p.parent:
        p = p.parent
        if p.stat().st_mode & 0o001 == 0:
            p.chmod(p.stat().st_mode | 0o001)  # traversable, not listable


@root
@pytest.mark.parametrize("kind", ["symlink", "hardlink", "nobody's file"])
def test_pid_file_through_a_planted_link_is_refused(tmp_path, sticky_dir, kind):
    target, content = _target(tmp_path)
    _nobody_can_reach(target)
    pidfile = sticky_dir / "ksmtune.pid"
    _plant(kind, target, pidfile)
    planted = pidfile.read_bytes() if kind == "nobody's file" else None
    d = Daemon(tmp_path / "d", pidfile=pidfile)
    d.start(wait=False)
    code = d.proc.wait(15)
    err = d.stderr_text()
    assert code != 0 and "Traceback" not in err
    assert f"{pidfile}: refusing a pid file" in err, err
    assert target.read_bytes() == content and target.stat().st_nlink == (2 if kind == "hardlink" else 1)
    if planted is not None:
        assert pidfile.read_bytes() == planted
    assert d.ticks() == 0


@root
@pytest.mark.parametrize("kind", ["symlink", "hardlink", "nobody's file", "fifo"])
def test_log_file_through_a_planted_link_is_refused_and_the_daemon_carries_on(tmp_path, sticky_dir, kind):
    target, content = _target(tmp_path)
    _nobody_can_reach(target)
    log = sticky_dir / "ksmtuned.log"
    if kind == "fifo":
        assert as_nobody("mkfifo", str(log)).returncode == 0
    else:
        _plant(kind, target, log)
    d = Daemon(tmp_path / "d", interval_s=0.02, logfile=log)
    from tests.faultrig import BOOST

    d.start(wait=False)
    with d:
        wait_until(lambda: "cannot write debug log" in d.stderr_text(), what="the warning")
        # it carries on: a change of pressure still reaches sysfs
        write_atomic(d.meminfo, BOOST)
        wait_until(lambda: d.knob("run") == "1", what="a tick")
        assert d.alive()
        assert target.read_bytes() == content
        if kind == "nobody's file":
            assert log.read_text() == "1\n"
        err = d.stderr_text()
        assert err.count("cannot write debug log") == 1 and "Traceback" not in err
        assert d.stop() == 0


@root
@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_state_file_through_a_planted_link_leaves_the_target_alone(tmp_path, sticky_dir, kind):
    target, content = _target(tmp_path)
    _nobody_can_reach(target)
    state = sticky_dir / "state.json"
    _plant(kind, target, state)
    d = Daemon(tmp_path / "d", interval_s=0.02, extra_args=["--state-file", str(state)]).start()
    with d:
        d.wait_more(3)
        wait_until(lambda: not state.is_symlink() and state.stat().st_ino != target.stat().st_ino,
                   what="the link replaced by the daemon's own file")
        # one stat: the daemon replaces the file 50 times a second, so a stat can land on a file
        # just renamed over (nlink 0, seen in CI's 3.9 tier); never the target's 2 links
        st = state.stat()
        assert st.st_uid == 0 and st.st_nlink in (0, 1), st
        assert target.read_bytes() == content
        assert "Traceback" not in d.stderr_text()
        assert d.stop() == 0


@root
def test_state_temp_names_planted_by_another_user_are_not_written_through(tmp_path, sticky_dir):
    """The temp file's name is predictable (.state.json.PID.tmp): nobody plants a symlink there.
    The daemon removes what it finds under that name and creates its own with O_EXCL|O_NOFOLLOW."""
    target, content = _target(tmp_path)
    _nobody_can_reach(target)
    state = sticky_dir / "state.json"
    d = Daemon(tmp_path / "d", interval_s=0.02, extra_args=["--state-file", str(state)])
    d.start(wait=False)
    as_nobody("ln", "-s", str(target), str(sticky_dir / f".state.json.{d.pid}.tmp"))
    with d:
        wait_until(lambda: d.ticks() >= 3, what="ticks")
        wait_until(lambda: state.exists() and not state.is_symlink(), what="a state file")
        assert target.read_bytes() == content
        assert d.stop() == 0


# --- retune signals only a verified ksmtuned ---------------------------------------------------


def test_retune_refuses_a_pid_file_naming_an_unrelated_process(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        pidfile = tmp_path / "ksmtune.pid"
        pidfile.write_text(f"{sleeper.pid}\n")
        r = run(KSMTUNED + ["retune", "--pidfile", str(pidfile)])
        assert r.returncode == 3, r.stderr
        assert f"names pid {sleeper.pid} (sleep)" in r.stderr and "not signalling" in r.stderr
        time.sleep(0.2)
        assert sleeper.poll() is None, "the unrelated process was signalled"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_retune_refuses_a_process_named_ksmtuned_without_the_lock(tmp_path):
    """The name is not enough: the pid file's lock must be held by that process."""
    fake = tmp_path / "ksmtuned"
    fake.symlink_to(shutil.which("sleep"))
    sleeper = subprocess.Popen([str(fake), "60"])
    try:
        wait_until(lambda: read_text(Path(f"/proc/{sleeper.pid}/comm")).strip() == "ksmtuned", what="exec")
        pidfile = tmp_path / "ksmtune.pid"
        pidfile.write_text(f"{sleeper.pid}\n")
        r = run(KSMTUNED + ["retune", "--pidfile", str(pidfile)])
        assert r.returncode == 3 and "not signalling" in r.stderr, r.stderr
        time.sleep(0.2)
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_retune_refuses_a_lock_holder_that_is_not_ksmtuned(tmp_path):
    pidfile = tmp_path / "ksmtune.pid"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(pidfile)!r}, os.O_RDWR | os.O_CREAT)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, b'%d\\n' % os.getpid())\nprint('locked', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = run(KSMTUNED + ["retune", "--pidfile", str(pidfile)])
        assert r.returncode == 3 and "not signalling" in r.stderr, r.stderr
        time.sleep(0.2)
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()


def test_retune_signals_the_real_daemon(tmp_path):
    d = Daemon(tmp_path, interval_s=3600).start()
    with d:
        ticks = d.ticks()
        r = run(KSMTUNED + ["retune", "--pidfile", str(d.pidfile)])
        assert r.returncode == 0, r.stderr
        wait_until(lambda: d.ticks() > ticks, what="the retune")
        assert d.stop() == 0


# --- metrics bind loopback by default -------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("9100", ("127.0.0.1", 9100)),
    (":9100", ("127.0.0.1", 9100)),
    ("0.0.0.0:9100", ("0.0.0.0", 9100)),
    ("[::1]:9100", ("::1", 9100)),
    ("", None),
])
def test_parse_listen_defaults_to_loopback(text, expected):
    assert parse_listen(text) == expected


def test_metrics_are_off_by_default():
    assert Settings().metrics_listen is None


def _listening(pid: int) -> set[tuple[str, int]]:
    import psutil

    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("inet")
            if c.status == psutil.CONN_LISTEN}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_server_binds_loopback_only_for_a_bare_port(tmp_path):
    pytest.importorskip("prometheus_client")
    port = _free_port()
    d = Daemon(tmp_path, interval_s=0.05)
    write_atomic(d.conf, f"KSM_MONITOR_INTERVAL=0.05\nKSM_METRICS_LISTEN={port}\n")
    d.log = None
    d.start(wait=False)
    with d:
        listening = wait_until(lambda: _listening(d.pid), what="the metrics socket")
        assert listening == {("127.0.0.1", port)}, listening
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert b"200" in s.recv(100)
        assert d.stop() == 0


# --- another tuner owning KSM ---------------------------------------------------------------


def _tuner(tmp_path: Path, kind: str) -> subprocess.Popen:
    bindir = tmp_path / "usr" / "sbin"
    bindir.mkdir(parents=True, exist_ok=True)
    if kind == "bash ksmtuned":
        script = bindir / "ksmtuned"
        script.write_text("#!/bin/bash\nsleep 600\n")
        # its own process group, so that killing it takes the sleep child along
        return subprocess.Popen(["/bin/bash", str(script)], start_new_session=True)
    if kind in ("momd", "mom-vdsm", "virt-handler", "harvester-node-manager", "harvester-node-manager-amd64"):
        exe = bindir / kind
        exe.symlink_to(shutil.which("sleep"))
        return subprocess.Popen([str(exe), "600"])
    if kind == "python momd":
        script = bindir / "momd"
        script.write_text("import time\ntime.sleep(600)\n")
        return subprocess.Popen([sys.executable, str(script), "-c", "/etc/vdsm/mom.conf"])
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["bash ksmtuned", "momd", "python momd", "mom-vdsm",
                                  # a fleet's: KubeVirt's virt-handler, Harvester's node manager
                                  "virt-handler", "harvester-node-manager", "harvester-node-manager-amd64"])
def test_another_tuner_is_refused_by_name_unless_force(tmp_path, kind):
    other = _tuner(tmp_path, kind)
    name = "ksmtuned" if "ksmtuned" in kind else kind.split()[-1].replace("-amd64", "")
    try:
        time.sleep(0.1)  # exec'd
        d = Daemon(tmp_path / "d", force=False, procfs=None)  # the real process table
        d.start(wait=False)
        assert d.proc.wait(15) == 4
        assert f"{name} (pid {other.pid})" in d.stderr_text() and "--force" in d.stderr_text(), d.stderr_text()
        assert d.ticks() == 0 and d.knob("run") == "0"
        forced = Daemon(tmp_path / "f", force=True, procfs=None).start()
        with forced:
            assert forced.stop() == 0
    finally:
        _kill_group(other)


@root
def test_a_user_naming_a_process_momd_cannot_stop_ksmtuned_from_starting(tmp_path):
    """A process of an ordinary user (here nobody) cannot write KSM: its name must not block the
    root daemon's start, or any local user could keep ksmtuned from running (exit 4 at boot)."""
    bindir = Path(tempfile.mkdtemp(prefix="ksmtuned-user-", dir="/tmp"))
    bindir.chmod(0o755)
    try:
        (bindir / "momd").symlink_to(shutil.which("sleep"))
        (bindir / "virt-handler").symlink_to(shutil.which("sleep"))
        (bindir / "harvester-node-manager").symlink_to(shutil.which("sleep"))
        (bindir / "ksmtuned").write_text("#!/bin/bash\nsleep 600\n")
        (bindir / "ksmtuned").chmod(0o755)
        fakes = [subprocess.Popen(AS_NOBODY + [str(bindir / "momd"), "600"]),
                 subprocess.Popen(AS_NOBODY + [str(bindir / "virt-handler"), "600"]),
                 subprocess.Popen(AS_NOBODY + [str(bindir / "harvester-node-manager"), "600"]),
                 subprocess.Popen(AS_NOBODY + ["/bin/bash", str(bindir / "ksmtuned")], start_new_session=True)]
        try:
            time.sleep(0.2)
            d = Daemon(tmp_path / "d", force=False, procfs=None)
            d.start(wait=False)
            try:
                wait_until(lambda: d.ticks() >= 1 or d.proc.poll() is not None, 15, what="start or exit")
                named = [f"(pid {p.pid})" for p in fakes if f"(pid {p.pid})" in d.stderr_text()]
                assert not named, d.stderr_text()
            finally:
                d.kill()
        finally:
            for p in fakes:
                _kill_group(p)
    finally:
        shutil.rmtree(bindir, ignore_errors=True)


def _kill_group(p: subprocess.Popen) -> None:
    """Kill a fake tuner and, when it leads its own session, its children (bash's sleep)."""
    try:
        if os.getpgid(p.pid) == p.pid:
            os.killpg(p.pid, signal.SIGKILL)
        else:
            p.kill()
    except ProcessLookupError:
        pass
    p.wait()


def test_unit_conflicts_with_mom():
    unit = REPO / "systemd" / "ksmtuned.service"
    if not unit.exists():
        pytest.skip("systemd/ksmtuned.service not written yet")
    conflicts = " ".join(l.split("=", 1)[1] for l in unit.read_text().splitlines() if l.startswith("Conflicts="))
    assert "mom-vdsm.service" in conflicts.split() and "momd.service" in conflicts.split()


@root
@pytest.mark.parametrize("quiet", [False, True])
def test_retune_by_another_user_is_exit_77_not_a_traceback(world_readable_tmp, quiet):
    """A non-root user may read the pid file and find the daemon, but not signal root's process."""
    from tests.conftest import skip_unless_nobody_can_run_python

    skip_unless_nobody_can_run_python()
    tmp_path = world_readable_tmp  # pytest's own tmp_path is under /tmp/pytest-of-root, mode 0700
    from tests.daemon_support import DaemonProc

    with DaemonProc(tmp_path) as d:
        d.pidfile.chmod(0o644)
        ticks = d.ticks()
        r = as_nobody(*KSMTUNED, "retune", *(["--quiet"] if quiet else []), "--pidfile", str(d.pidfile))
        assert r.returncode == 77, r.stderr
        assert r.stderr.strip() == (f"ksmtuned: cannot signal the daemon (pid {d.pid}, from {d.pidfile}): "
                                    "permission denied; run as root")
        time.sleep(0.2)
        assert d.ticks() == ticks  # nothing was signalled
