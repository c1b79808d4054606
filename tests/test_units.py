"""The shipped packaging: systemd units, their sandbox, logrotate.

- both units pass `systemd-analyze verify` (with ExecStart pointing at this checkout's scripts)
  and carry the directives the daemon relies on;
- the unit's CapabilityBoundingSet is sufficient and each capability in it is necessary
  (measured with setpriv against processes owned by another user);
- the real daemon and ksmctl run under the units' real sandbox, started by a real systemd
  (a private `systemd --user` manager as root in its own mount namespace): READY=1, writes to
  the real /sys/kernel/mm/ksm, reload by ExecReload, retune by the libvirt hook, clean stop;
- logrotate's config is valid and a real rotation loses no line.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ksmtuned.errors import ExitCode
from tests.conftest import REPO, is_root
from tests.daemon_support import DaemonProc

UNITS = REPO / "systemd"
HOOK = REPO / "etc" / "libvirt" / "hooks" / "qemu.d" / "ksmtuned"
LOGROTATE_CONF = REPO / "etc" / "logrotate.d" / "ksmtuned"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


# --- helpers -------------------------------------------------------------------------------

def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as ordered (key, value) lists; repeated keys kept."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"directive outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= expected once, found {found}"
    return found[0]


def words(unit: dict, section: str, key: str) -> set[str]:
    """A list-valued directive: every assignment's words (an empty assignment resets)."""
    result: set[str] = set()
    for v in values(unit, section, key):
        result = set() if not v else result | set(v.split())
    return result


def load(name: str) -> dict:
    return parse_unit((UNITS / name).read_text())


def script(name: str) -> str:
    """This checkout's console script (the venv's), else one on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"console script {name} is not installed (pip install -e .)")
    return found


def installed_text(name: str) -> str:
    """The unit as the tests install it: Exec paths rewritten to what this machine has."""
    text = (UNITS / name).read_text()
    text = text.replace("/usr/sbin/ksmtuned", script("ksmtuned")).replace("/usr/sbin/ksmctl", script("ksmctl"))
    if not os.path.exists("/bin/kill"):
        text = text.replace("/bin/kill", shutil.which("kill") or "/usr/bin/kill")
    return text


def verify_problems(unit_dir: Path, names: list[str]) -> tuple[int, list[str]]:
    """Run systemd-analyze verify; its exit status and every output line about our units."""
    # verify runs `man` for each Documentation=man:...: the checkout's pages (man/man8, man/man5),
    # as the packages install them
    env = {**os.environ, "MANPATH": str(REPO / "man")}
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", *(str(unit_dir / n) for n in names)],
                       capture_output=True, text=True, timeout=60, cwd=unit_dir, env=env)
    ours = [line for line in (r.stdout + r.stderr).splitlines()
            if any(n in line for n in names) or str(unit_dir) in line]
    return r.returncode, ours


needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")


# --- systemd-analyze ------------------------------------------------------------------------

@needs_analyze
def test_units_pass_systemd_analyze_verify(tmp_path):
    names = ["ksm.service", "ksmtuned.service"]
    for n in names:
        (tmp_path / n).write_text(installed_text(n))
    rc, problems = verify_problems(tmp_path, names)
    assert rc == 0 and problems == [], "\n".join(problems)


@needs_analyze
@pytest.mark.parametrize("damage, expect", [
    ("ProtectSystm=strict", "Unknown key"),          # a typo: verify exits 0 but warns
    ("RestartPreventExitStatus=sixty-nine", "Failed to parse"),
])
def test_verify_check_catches_a_broken_unit(tmp_path, damage, expect):
    """The check above can fail: the same helper flags a damaged copy of the unit."""
    text = installed_text("ksmtuned.service") + f"\n[Service]\n{damage}\n"
    (tmp_path / "ksmtuned.service").write_text(text)
    (tmp_path / "ksm.service").write_text(installed_text("ksm.service"))
    rc, problems = verify_problems(tmp_path, ["ksmtuned.service"])
    assert any(expect in p for p in problems), problems


@needs_analyze
def test_verify_check_catches_a_missing_executable(tmp_path):
    (tmp_path / "ksm.service").write_text((UNITS / "ksm.service").read_text().replace(
        "/usr/sbin/ksmctl", str(tmp_path / "no-such-ksmctl")))
    rc, problems = verify_problems(tmp_path, ["ksm.service"])
    assert rc != 0 and any("not executable" in p for p in problems), problems


@needs_analyze
def test_security_exposure_is_reported(tmp_path):
    """Informational: systemd's own rating of the sandbox (2.9 "OK" with systemd 252)."""
    r0 = subprocess.run([SYSTEMD_ANALYZE, "security", "--help"], capture_output=True, text=True)
    if "--offline" not in r0.stdout:
        pytest.skip("this systemd-analyze has no `security --offline` (systemd < 250)")
    exposures = {}
    for n in ("ksm.service", "ksmtuned.service"):
        (tmp_path / n).write_text(installed_text(n))
        r = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(tmp_path / n)],
                           capture_output=True, text=True, timeout=60)
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
        assert m, r.stdout + r.stderr
        exposures[n] = float(m.group(1))
    print(f"systemd-analyze security exposure: {exposures}")
    # 0-10, lower is better; systemd calls < 5 "OK". Not a precise score: versions add checks.
    assert all(e < 5.0 for e in exposures.values()), exposures


# --- the directives the daemon relies on ----------------------------------------------------

def test_ksm_service_directives():
    u = load("ksm.service")
    assert one(u, "Unit", "ConditionPathExists") == "/sys/kernel/mm/ksm"
    assert one(u, "Service", "Type") == "oneshot"
    assert one(u, "Service", "RemainAfterExit") == "yes"
    assert one(u, "Service", "EnvironmentFile") == "-/etc/default/ksm"
    assert one(u, "Service", "ExecStart") == "/usr/sbin/ksmctl start"
    assert one(u, "Service", "ExecStop") == "/usr/sbin/ksmctl stop"
    assert one(u, "Install", "WantedBy") == "multi-user.target"


def test_ksmtuned_service_directives():
    u = load("ksmtuned.service")
    assert one(u, "Unit", "ConditionPathExists") == "/sys/kernel/mm/ksm"
    assert "ksm.service" in words(u, "Unit", "After")
    assert "ksm.service" in words(u, "Unit", "Wants")
    assert {"mom-vdsm.service", "momd.service"} <= words(u, "Unit", "Conflicts")
    assert values(u, "Unit", "Documentation")
    assert one(u, "Service", "Type") == "notify"
    assert one(u, "Service", "NotifyAccess") == "main"
    assert one(u, "Service", "ExecStart") == "/usr/sbin/ksmtuned --foreground"
    # SIGHUP reloads the config and retunes (SIGUSR1 would only retune).
    assert one(u, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(u, "Service", "Restart") == "on-failure"
    assert words(u, "Service", "RestartPreventExitStatus") == {
        str(int(c)) for c in (ExitCode.UNAVAILABLE, ExitCode.NO_PERMISSION, ExitCode.CONFIG)}
    watchdog = one(u, "Service", "WatchdogSec")
    m = re.fullmatch(r"(\d+)(s|min)?", watchdog)
    assert m and int(m.group(1)) > 0, watchdog
    assert one(u, "Install", "WantedBy") == "multi-user.target"


def test_ksmtuned_sandbox_keeps_what_the_daemon_needs():
    from ksmtuned.paths import DEFAULT_PIDFILE

    u = load("ksmtuned.service")
    assert one(u, "Service", "ProtectSystem") == "strict"
    rw = {p.lstrip("-") for p in words(u, "Service", "ReadWritePaths")}
    # The classic pid file (/var/run is /run) and LOGFILE's directory stay writable.
    pid_dir = os.path.dirname(DEFAULT_PIDFILE).replace("/var/run", "/run", 1)
    assert any(pid_dir == p or pid_dir.startswith(p + "/") for p in rw), (pid_dir, rw)
    assert "/var/log" in rw
    # /sys/kernel/mm/ksm must stay writable: ProtectKernelTunables=yes makes /sys read-only.
    assert values(u, "Service", "ProtectKernelTunables") in ([], ["no"]) or "/sys/kernel/mm/ksm" in rw
    # /proc of every process and /proc/meminfo are the daemon's inputs.
    assert values(u, "Service", "ProtectProc") in ([], ["default"])
    assert values(u, "Service", "ProcSubset") in ([], ["all"])
    assert values(u, "Service", "PrivateNetwork") in ([], ["no"])  # the metrics server
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= words(u, "Service", "RestrictAddressFamilies")
    assert one(u, "Service", "RuntimeDirectory") == "ksmtuned"
    assert one(u, "Service", "NoNewPrivileges") == "yes"
    assert words(u, "Service", "CapabilityBoundingSet") == {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"}
    assert values(u, "Service", "User") == []  # root: the sysfs knobs are uid 0's
    # ksm.service writes only sysfs: no capability at all.
    assert words(load("ksm.service"), "Service", "CapabilityBoundingSet") == set()


@pytest.mark.parametrize("name", ["ksm.service", "ksmtuned.service"])
def test_every_directive_is_explained(name):
    """Each directive sits in a paragraph that opens with a comment saying why."""
    paragraph_commented = False
    bare = []
    for line in (UNITS / name).read_text().splitlines():
        s = line.strip()
        if not s:
            paragraph_commented = False
        elif s.startswith("#"):
            paragraph_commented = True
        elif s.startswith("["):
            paragraph_commented = False
        elif not paragraph_commented and not s.startswith(("Description=", "Documentation=", "WantedBy=")):
            bare.append(s)
    assert bare == [], f"directives without a comment above them in {name}: {bare}"


# --- capabilities: sufficient and necessary -------------------------------------------------

CAP_PROBE = r"""
import os, sys
pid = sys.argv[1]
results = {}
for name in ("statm", "cmdline", "smaps_rollup", "ksm_stat", "exe"):
    path = f"/proc/{pid}/{name}"
    if name != "exe" and not os.path.exists(path):
        continue
    try:
        os.readlink(path) if name == "exe" else open(path, "rb").read()
        results[name] = "ok"
    except OSError as e:
        results[name] = f"errno {e.errno}"
for knob in ("run", "pages_to_scan", "sleep_millisecs"):
    try:
        os.close(os.open(f"/sys/kernel/mm/ksm/{knob}", os.O_WRONLY))  # permission only, nothing written
        results["write " + knob] = "ok"
    except OSError as e:
        results["write " + knob] = f"errno {e.errno}"
print(repr(results))
"""


def _probe(bounding: list[str], target_pid: int) -> dict[str, str]:
    caps = ",".join(["-all"] + [f"+{c.lower().removeprefix('cap_')}" for c in bounding])
    r = subprocess.run(["setpriv", f"--bounding-set={caps}", "--inh-caps=-all", sys.executable, "-c", CAP_PROBE,
                        str(target_pid)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return eval(r.stdout)  # noqa: S307 - our own probe's repr of a dict of str


@pytest.fixture
def foreign_guest():
    """A process owned by another user, like QEMU run by libvirt as libvirt-qemu."""
    if not is_root():
        pytest.skip("needs root to start a process as another user and to drop capabilities")
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is not installed")
    from tests.conftest import skip_unless_nobody_can_run_python

    skip_unless_nobody_can_run_python()
    proc = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if Path(f"/proc/{proc.pid}/status").read_text().count("\t65534\t") >= 1 and \
                    "python" in Path(f"/proc/{proc.pid}/comm").read_text():
                break
            time.sleep(0.01)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.root
def test_capability_bounding_set_is_sufficient(foreign_guest):
    caps = sorted(words(load("ksmtuned.service"), "Service", "CapabilityBoundingSet"))
    got = _probe(caps, foreign_guest)
    assert set(got.values()) == {"ok"}, got


@pytest.mark.root
def test_each_capability_is_necessary(foreign_guest):
    caps = sorted(words(load("ksmtuned.service"), "Service", "CapabilityBoundingSet"))
    if not Path(f"/proc/{foreign_guest}/ksm_stat").exists():
        pytest.skip("this kernel has no /proc/PID/ksm_stat (before 6.1): CAP_DAC_READ_SEARCH is then not needed")
    for cap in caps:
        got = _probe([c for c in caps if c != cap], foreign_guest)
        assert "errno 13" in got.values(), f"without {cap} everything still works: {got}"
    # ...while the sysfs knobs need none: ksm.service keeps no capability at all.
    got = _probe([], foreign_guest)
    if Path("/sys/kernel/mm/ksm/run").exists():
        assert got["write run"] == "ok", got


# --- the real sandbox, under a real systemd -------------------------------------------------

def _systemd_binary() -> str | None:
    for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd"):
        if os.access(p, os.X_OK):
            return p
    return None


MANAGER_SH = """set -e
# A private view: this manager believes it runs on a systemd-booted host, nothing else does.
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mkdir /run/systemd/system /run/systemd/inaccessible
cd /run/systemd/inaccessible
mkdir -m 0 dir; touch reg; chmod 0 reg; mknod -m 0 chr c 0 0; mknod -m 0 blk b 0 0; mkfifo -m 0 fifo
{python} -c "import socket; socket.socket(socket.AF_UNIX).bind('sock')"; chmod 0 sock
cd /
export XDG_RUNTIME_DIR={rt} XDG_CONFIG_HOME={cfg} HOME={home}
exec {systemd} --user
"""


class UserManager:
    """`systemd --user` run by root in a private mount namespace: real sandboxing, real sd_notify.

    Its files live under /run (not /tmp: the units' PrivateTmp= would hide them from the service).
    """

    def __init__(self, base: Path, systemd: str):
        self.base = base
        self.rt, self.cfg, self.home = base / "rt", base / "cfg", base / "home"
        self.unit_dir = self.cfg / "systemd" / "user"
        for d in (self.rt, self.unit_dir, self.home):
            d.mkdir(parents=True, mode=0o700)
        sh = base / "manager.sh"
        sh.write_text(MANAGER_SH.format(python=sys.executable, rt=self.rt, cfg=self.cfg, home=self.home,
                                        systemd=systemd))
        self.log = open(base / "manager.log", "w")
        self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", str(sh)],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout_s: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if (self.rt / "systemd" / "private").exists() and self.systemctl("is-system-running").stdout.strip() in (
                    "running", "degraded"):
                return True
            time.sleep(0.05)
        return False

    def systemctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", "env", f"XDG_RUNTIME_DIR={self.rt}",
                               "systemctl", "--user", "--no-pager", *args],
                              capture_output=True, text=True, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        r = self.systemctl("show", unit, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def install(self, name: str, text: str) -> None:
        (self.unit_dir / name).write_text(text)
        r = self.systemctl("daemon-reload")
        assert r.returncode == 0, r.stderr

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the manager stops its units, then exits
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def user_manager():
    if not is_root():
        pytest.skip("needs root: the manager must set up mount namespaces for its services")
    systemd = _systemd_binary()
    if not systemd:
        pytest.skip("systemd is not installed")
    for tool in ("unshare", "nsenter", "systemctl"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")
    base = Path(tempfile.mkdtemp(prefix="ksmtuned-unittest-", dir="/run"))
    mgr = UserManager(base, systemd)
    try:
        if not mgr.wait_ready():
            mgr.close()
            pytest.skip(f"could not start a private systemd manager here: {(base / 'manager.log').read_text()}")
        yield mgr
    finally:
        mgr.close()
        shutil.rmtree(base, ignore_errors=True)


def _test_unit(mgr: UserManager, name: str, exec_start: str | None = None, output: str | None = None) -> str:
    """The shipped unit, Exec paths made local, output captured, the checkout made visible."""
    text = installed_text(name)
    if exec_start is not None:
        text = re.sub(r"^ExecStart=.*$", f"ExecStart={exec_start}", text, count=1, flags=re.M)
    output = output or name
    text += f"\n[Service]\nStandardOutput=append:{mgr.base}/{output}.out\nStandardError=append:{mgr.base}/{output}.err\n"
    # PrivateTmp= gives the service its own /tmp: a checkout or venv living there must be bound in.
    for p in {REPO, Path(sys.prefix)}:
        if str(p).startswith(("/tmp/", "/var/tmp/")):
            text += f"BindReadOnlyPaths={p}\n"
    return text


def _wait_for(predicate, timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.root
@pytest.mark.ksm
@pytest.mark.slow
def test_units_run_under_their_sandbox(user_manager, real_ksm, foreign_guest):
    """ksm.service and ksmtuned.service as shipped (only paths changed) under a real systemd."""
    mgr = user_manager
    ksm = real_ksm
    log = Path(f"/var/log/ksmtuned-unittest-{os.getpid()}.log")  # /var/log: ReadWritePaths= is what is tested
    conf = mgr.base / "ksmtuned.conf"
    pidfile = mgr.base / "ksmtune.pid"
    state = mgr.base / "state.json"
    conf.write_text(f"DEBUG=1\nLOGFILE={log}\nKSM_MONITOR_INTERVAL=3600\nKSM_THRES_COEF=99\n")
    os.chmod(conf, 0o600)
    daemon = (f"{script('ksmtuned')} --foreground --config {conf} --pidfile {pidfile} --state-file {state}"
              " --force")  # --force: other test runs may have a ksmtuned running right now
    try:
        # ksm.service: ksmctl start/stop with no capability at all.
        (ksm / "run").write_text("0")
        mgr.install("ksm.service", _test_unit(mgr, "ksm.service"))
        r = mgr.systemctl("start", "ksm.service")
        assert r.returncode == 0, r.stderr + (mgr.base / "ksm.service.err").read_text()
        assert (ksm / "run").read_text().strip() == "1"
        r = mgr.systemctl("stop", "ksm.service")
        assert r.returncode == 0 and (ksm / "run").read_text().strip() == "0", r.stderr

        # ksmtuned.service: `systemctl start` returns only after READY=1 (Type=notify).
        (ksm / "pages_to_scan").write_text("100")
        mgr.install("ksmtuned.service", _test_unit(mgr, "ksmtuned.service", daemon))
        r = mgr.systemctl("start", "ksmtuned.service", timeout=60)
        err = mgr.base / "ksmtuned.service.err"
        assert r.returncode == 0, r.stderr + (err.read_text() if err.exists() else "")
        props = mgr.show("ksmtuned.service", "ActiveState", "MainPID", "StatusText", "NRestarts", "WatchdogUSec")
        assert props["ActiveState"] == "active", props
        assert props["StatusText"], props  # STATUS= from the loop reached systemd
        assert props["WatchdogUSec"] not in ("", "0", "infinity"), props
        main_pid = int(props["MainPID"])
        assert pidfile.read_text().strip() == str(main_pid)
        # The pressure config: KSM on, the classic 300 pages, written to the real sysfs.
        sleep_ms = (ksm / "sleep_millisecs").read_text().strip()
        assert f": KSMCTL start 300 {sleep_ms}" in log.read_text()
        assert (ksm / "run").read_text().strip() == "1"
        assert (ksm / "pages_to_scan").read_text().strip() == "300"
        _wait_for(state.exists, 5, f"the state file; stderr: {err.read_text()}")
        assert int(props["NRestarts"]) == 0

        # The libvirt hook, with the real `ksmtuned retune`: one more adjustment.
        ticks = log.read_text().count(": committed ")
        env = {"PATH": f"{Path(script('ksmtuned')).parent}:/usr/bin:/bin", "PIDFILE": str(pidfile)}
        h = subprocess.run([str(HOOK), "g0", "started", "begin", "-"], env=env, input="<domain/>",
                           capture_output=True, text=True, timeout=10)
        assert h.returncode == 0
        _wait_for(lambda: log.read_text().count(": committed ") > ticks, what="a retune by the hook")

        # Reload (ExecReload= sends SIGHUP): the new config relieves pressure, KSM stops.
        conf.write_text(f"DEBUG=1\nLOGFILE={log}\nKSM_MONITOR_INTERVAL=3600\nKSM_THRES_COEF=0\n")
        r = mgr.systemctl("reload", "ksmtuned.service")
        assert r.returncode == 0, r.stderr
        _wait_for(lambda: log.read_text().rstrip().endswith(", stop ksm"), what="the reload's adjustment")
        assert (ksm / "run").read_text().strip() == "0"

        # The sandbox itself lets the daemon's reads of another user's guest through.
        probe = mgr.base / "probe.py"
        probe.write_text(CAP_PROBE)
        probe_unit = re.sub(r"^(Type|Restart|RestartSec|WatchdogSec|ExecReload)=.*$", "", _test_unit(
            mgr, "ksmtuned.service", f"{sys.executable} {probe} {foreign_guest}", output="probe"), flags=re.M)
        mgr.install("probe.service", probe_unit.replace("[Service]", "[Service]\nType=oneshot", 1))
        r = mgr.systemctl("start", "probe.service")
        out = (mgr.base / "probe.out").read_text()
        assert r.returncode == 0, r.stderr + (mgr.base / "probe.err").read_text()
        got = eval(out.strip().splitlines()[-1])  # noqa: S307 - the probe's repr
        assert set(got.values()) == {"ok"}, got

        # Stop: SIGTERM, a clean exit, the pid file removed.
        r = mgr.systemctl("stop", "ksmtuned.service")
        assert r.returncode == 0, r.stderr
        props = mgr.show("ksmtuned.service", "ActiveState", "Result", "ExecMainStatus")
        assert props["ActiveState"] == "inactive" and props["Result"] == "success", props
        assert not pidfile.exists()
        assert not Path(f"/proc/{main_pid}").exists() or "ksmtuned" not in Path(f"/proc/{main_pid}/comm").read_text()
    finally:
        # Nothing may touch the real KSM after real_ksm restores it.
        mgr.systemctl("stop", "ksmtuned.service", "ksm.service", "probe.service")
        for p in log.parent.glob(log.name + "*"):
            p.unlink()


# --- logrotate ------------------------------------------------------------------------------

LOGROTATE = shutil.which("logrotate") or (os.access("/usr/sbin/logrotate", os.X_OK) and "/usr/sbin/logrotate")
needs_logrotate = pytest.mark.skipif(not LOGROTATE, reason="logrotate is not installed")


def _logrotate_conf(tmp: Path, log: Path) -> Path:
    text = LOGROTATE_CONF.read_text()
    assert "/var/log/ksmtuned {" in text
    conf = tmp / "logrotate.conf"
    conf.write_text(text.replace("/var/log/ksmtuned {", f"{log} {{")
                    .replace("/var/log/ksmtuned.log {", f"{log.parent / 'captured-stderr.log'} {{"))
    return conf


@needs_logrotate
def test_logrotate_config_is_valid(tmp_path):
    log = tmp_path / "ksmtuned"
    log.write_text("line\n")
    r = subprocess.run([LOGROTATE, "-d", "-s", str(tmp_path / "state"), str(_logrotate_conf(tmp_path, log))],
                       capture_output=True, text=True, timeout=30)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "error" not in out.lower(), out
    assert "weekly (4 rotations)" in out, out
    # the debug log is moved, never copied (the daemon reopens LOGFILE); only the init script's
    # captured standard error (/var/log/ksmtuned.log) needs copytruncate
    debug_stanza = LOGROTATE_CONF.read_text().split("/var/log/ksmtuned {", 1)[1].split("}", 1)[0]
    assert "copytruncate" not in debug_stanza.replace("no copytruncate", "")
    assert "rotating pattern: " + str(tmp_path / "captured-stderr.log") in out, out


@needs_logrotate
def test_logrotate_rotates_a_running_daemon_log_without_losing_lines(tmp_path):
    """A real rotation of a real daemon's log: the old file is kept whole, the daemon writes on."""
    with DaemonProc(tmp_path, "KSM_MONITOR_INTERVAL=3600\nKSM_THRES_COEF=99\n") as d:
        conf = _logrotate_conf(tmp_path, d.log)
        state = tmp_path / "state"

        def rotate():
            r = subprocess.run([LOGROTATE, "-f", "-s", str(state), str(conf)], capture_output=True, text=True,
                               timeout=30)
            assert r.returncode == 0, r.stdout + r.stderr

        rotate()
        first = tmp_path / "ksmtuned.log.1"
        assert first.exists() and not d.log.exists()   # moved, not copied (no copytruncate)
        d.signal(signal.SIGUSR1)
        d.wait_ticks(1)                                # the daemon made a new file by itself
        assert "KSMCTL start" in d.log.read_text()
        rotate()
        second = tmp_path / "ksmtuned.log.2.gz"         # delaycompress: compressed one rotation late
        assert second.exists() and first.exists()
        d.signal(signal.SIGUSR1)
        d.wait_ticks(1)
    import gzip
    lines = gzip.decompress(second.read_bytes()).decode() + first.read_text() + d.log.read_text()
    assert lines.count(": committed ") == 3         # start + 2 retunes, none lost
    assert lines.count(": total ") == 1


# --- the shipped configuration files ----------------------------------------------------------

SHIPPED_CONF = REPO / "etc" / "ksmtuned.conf"
EXAMPLE = re.compile(r"^# ([A-Z_]+)=(.*)$")


def _examples() -> dict[str, tuple[str, str]]:
    """KEY -> (example value, the comment block above it) for every '# KEY=VALUE' line."""
    found, block = {}, []
    for line in SHIPPED_CONF.read_text().splitlines():
        m = EXAMPLE.match(line)
        if m:
            found[m.group(1)] = (m.group(2), "\n".join(block))
        elif line.startswith("#"):
            block.append(line)
        else:
            block = []
    return found


def test_shipped_config_sets_nothing(tmp_path):
    """Like the original: every setting commented out, so the file means 'all defaults'."""
    from ksmtuned.core.config import KEYS, Settings
    from ksmtuned.service.config_file import load_config

    loaded = load_config(SHIPPED_CONF, env={})
    assert loaded.warnings == ()
    assert all(source == "default" for source in loaded.sources.values()), loaded.sources
    assert loaded.settings == Settings()
    assert set(KEYS) - {"PIDFILE"} == set(_examples()), "every key (PIDFILE is environment-only) is documented"


def test_shipped_config_comments_state_unit_default_and_range(tmp_path):
    """Each key's comment gives its unit, default and range; each example line is valid, and
    for the numeric keys it is exactly the default the code uses."""
    from ksmtuned.core.config import KEYS, Settings
    from ksmtuned.service.config_file import load_config

    examples = _examples()
    defaults = Settings()
    numeric = {k for k in examples if isinstance(getattr(defaults, KEYS[k]), (int, float))
               and not isinstance(getattr(defaults, KEYS[k]), bool)}
    assert len(numeric) == 13, numeric  # the classic KSM_* numbers and the budget policy's five
    for key, (_, comment) in examples.items():
        assert "Unit:" in comment and re.search(r"Defaults?:", comment), f"{key}: no unit or default in {comment!r}"
        if key in numeric:
            assert "Range:" in comment, f"{key}: no range in {comment!r}"
    conf = tmp_path / "ksmtuned.conf"
    conf.write_text("".join(f"{k}={v}\n" for k, (v, _) in examples.items()))
    loaded = load_config(conf, env={})  # raises ConfigError if any example is invalid
    assert loaded.warnings == ()
    for key in numeric:
        assert getattr(loaded.settings, KEYS[key]) == getattr(defaults, KEYS[key]), f"{key}: example is not the default"
    for key in ("KSM_GUEST_MATCH", "KSM_PS_METRIC", "KSM_FREE_METRIC"):
        assert getattr(loaded.settings, KEYS[key]) == getattr(defaults, KEYS[key]), f"{key}: example is not the default"


def test_shipped_default_ksm_sets_nothing():
    lines = [l for l in (REPO / "etc" / "default" / "ksm").read_text().splitlines() if l and not l.startswith("#")]
    assert lines == []
    assert "# KSM_MAX_KERNEL_PAGES=" in (REPO / "etc" / "default" / "ksm").read_text()
