"""The Ansible role (contrib/ansible/roles/ksmtuned) run for real with ansible-core against two
Debian 13 hosts: chroots of the cached debootstrap base (tools/debian-chroot.sh), reached with
Ansible's chroot connection (community.general.chroot), the role installing the Debian package
built from this checkout.

* ``fresh``: a bare Debian 13;
* ``old``: Debian's own bash ksmtuned installed first, its config edited by an admin, its debug
  log /var/log/ksmtuned left behind.

Each host is an overlay of the base, mounted (with its own /proc, /dev, /tmp, /run) in a mount
and PID namespace that a holder process keeps; every ansible-playbook runs inside it (nsenter),
and ending the holder ends every process the role started there.  The hosts have no running
systemd, so the role's service handling goes through the package's SysV scripts (service(8),
update-rc.d): the services really start, and the daemon really runs, on a stand-in KSM
directory mounted where the kernel's would be (/sys is a tmpfs in there: the machine's KSM is
never touched).  What systemd hosts do instead (systemctl enable, start, reload through the
unit's ExecReload=kill -HUP) is the same ansible.builtin.service task; the unit's reload is
tested in tests/test_units.py.

Asserted: the config file written from the role's variables (every key the daemon knows),
check-config refusing a bad value and an unknown key (the run fails, the old file stays), the
services enabled and running, a config change reloading the daemon (SIGHUP: same pid, the
new value in force), the old package replaced and its leftovers gone, and a second run with
the same variables changing nothing (changed=0 on both hosts).
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
import urllib.request
from pathlib import Path

import pytest

from tests import test_package as pkg
from tests.conftest import REPO, is_root
from tests.test_package import trixie  # noqa: F401  (the fixture: the .deb built in the chroot)

pytestmark = [pytest.mark.ansible, pytest.mark.slow]

ROLE_DIR = REPO / "contrib" / "ansible"
PLAYBOOK = ROLE_DIR / "site.yml"
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
COLLECTIONS = Path(sys.prefix)  # .ci/run unpacks community.general into <venv>/ansible_collections
HOSTS = ("fresh", "old")
#: the stand-in KSM directory each host gets at /sys/kernel/mm/ksm
KSM_FILES = {"run": "0", "pages_to_scan": "100", "sleep_millisecs": "20", "pages_sharing": "0",
             "pages_shared": "0", "full_scans": "0", "pages_unshared": "0", "pages_volatile": "0"}


def _why_not() -> str | None:
    if not is_root():
        return "needs root (chroot, overlay mounts, namespaces)"
    if not ANSIBLE_PLAYBOOK.exists():
        return f"ansible-core is not installed in this venv ({ANSIBLE_PLAYBOOK}): pip install ansible-core"
    if not (COLLECTIONS / "ansible_collections" / "community" / "general").is_dir():
        return f"the community.general collection is not in {COLLECTIONS}/ansible_collections (see .ci/run)"
    for tool in ("nsenter", "unshare", "chroot"):
        if not shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin"):
            return f"{tool} is not installed"
    return None


def _require():
    why = _why_not()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Ansible tier: {why}")
        pytest.skip(why)


class Fleet:
    """Two chroot hosts mounted in a namespace held by one process; ansible-playbook runs in it."""

    def __init__(self, work: Path, base: Path, hostvars: dict[str, dict]):
        self.work = work
        self.base = base
        self.hostvars = hostvars
        self.hosts = tuple(hostvars)
        self.holder: subprocess.Popen | None = None
        self.log = work / "runs.log"
        self.runs = 0
        from tests.report_support import free_port

        # the hosts share this machine's network: each daemon's endpoint on its own loopback port
        self.ports = {h: free_port() for h in self.hosts}

    def root(self, host: str) -> Path:
        return self.work / host / "root"

    def start(self) -> "Fleet":
        """One holder: a mount and PID namespace with both hosts mounted in it; in it, one more
        PID namespace per host (a host sees its own processes only, as two machines would), whose
        procfs is that host's /proc."""
        lines = ["set -eu"]
        for host in self.hosts:
            s = self.work / host
            r = self.root(host)
            lines += [
                f"mkdir -p {s}/upper {s}/work {r}",
                f"mount -t overlay overlay -o lowerdir={self.base},upperdir={s}/upper,workdir={s}/work {r}",
                f"mount -t tmpfs -o mode=755,size=16m dev {r}/dev",
                f"for d in null zero full random urandom tty; do touch {r}/dev/$d; mount --bind /dev/$d {r}/dev/$d; done",
                f"mkdir -p {r}/dev/pts {r}/dev/shm; ln -s /proc/self/fd {r}/dev/fd",
                f"mount -t tmpfs -o mode=1777 tmp {r}/tmp",
                f"mount -t tmpfs -o mode=755 run {r}/run",
                # a stand-in KSM directory where the kernel's is: the daemon tunes it, not ours
                f"mount -t tmpfs -o mode=755 sys {r}/sys",
                f"mkdir -p {r}/sys/kernel/mm/ksm",
                *[f"echo {v} > {r}/sys/kernel/mm/ksm/{k}" for k, v in KSM_FILES.items()],
                # the host's own PID namespace; its first process mounts the host's /proc
                f"unshare --pid --fork --kill-child sh -c 'mount -t proc proc {r}/proc && exec sleep 3600' &",
                f"echo $! > {s}/pidns-holder",
                f"for i in $(seq 100); do [ -e {r}/proc/1 ] && break; sleep 0.1; done; [ -e {r}/proc/1 ]",
            ]
            # the chroot connection's chroot: into the host's PID namespace, then its root
            exe = s / "chroot"
            exe.write_text("#!/bin/sh\n"
                           f"h=$(cat {s}/pidns-holder)\n"
                           "read -r kid _ < /proc/$h/task/$h/children\n"
                           'exec nsenter --target "$kid" --pid -- /usr/sbin/chroot "$@"\n')
            exe.chmod(0o755)
        lines.append("echo ready; exec sleep 3600")
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc",
             "bash", "-c", "\n".join(lines)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != "ready":
            self.holder.wait(30)
            raise AssertionError(f"mounting the hosts failed: {self.holder.stderr.read()}")
        return self

    def ns_pid(self) -> int:
        """The pid (in our namespace) of the namespace's first process: the bash under unshare."""
        assert self.holder
        kids = Path(f"/proc/{self.holder.pid}/task/{self.holder.pid}/children").read_text().split()
        assert len(kids) == 1, kids
        return int(kids[0])

    def inside(self, *argv: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a command in the hosts' mount and PID namespaces (on the host side of the chroots)."""
        return subprocess.run(["nsenter", f"--target={self.ns_pid()}", "--mount", "--pid", "--", *argv],
                              capture_output=True, text=True, timeout=timeout, env=env)

    def sh(self, host: str, script: str) -> subprocess.CompletedProcess:
        """A shell command inside one host (chroot), as root."""
        return self.inside(str(self.work / host / "chroot"), str(self.root(host)), "/bin/sh", "-c", script,
                           timeout=120)

    def playbook(self, **extra_vars) -> subprocess.CompletedProcess:
        """The shipped site.yml with the shipped role, on every host."""
        self.runs += 1
        home = self.work / "controller"
        home.mkdir(exist_ok=True)
        inventory = self.work / "inventory.yml"
        inventory.write_text(json.dumps({"kvm_hosts": {
            "hosts": {h: {"ansible_host": str(self.root(h)), "ansible_chroot_exe": str(self.work / h / "chroot"),
                          "ksmtuned_metrics_listen": f"127.0.0.1:{self.ports[h]}", **v}
                      for h, v in self.hostvars.items()},
            "vars": {"ansible_connection": "community.general.chroot", "ansible_python_interpreter": "/usr/bin/python3",
                     "ansible_become": False},  # root already; a chroot has no sudo
        }}))
        varsfile = self.work / f"vars-{self.runs}.json"
        varsfile.write_text(json.dumps({"ksmtuned_serial": "100%", **extra_vars}))  # every host in one batch
        env = {"PATH": f"{ANSIBLE_PLAYBOOK.parent}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home),
               "LC_ALL": "C.UTF-8", "ANSIBLE_HOME": str(home / ".ansible"),
               "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS), "ANSIBLE_ROLES_PATH": str(ROLE_DIR / "roles"),
               "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_RETRY_FILES_ENABLED": "0",
               "ANSIBLE_LOCAL_TEMP": str(home / "tmp"), "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3"}
        r = self.inside(str(ANSIBLE_PLAYBOOK), "-i", str(inventory), str(PLAYBOOK), "-e", f"@{varsfile}", env=env)
        with open(self.log, "a") as f:
            f.write(f"=== run {self.runs} {extra_vars}\n{r.stdout}\n{r.stderr}\n")
        return r

    def stop(self) -> None:
        """The holder's end is the namespace's: every daemon the role started there is killed."""
        if self.holder and self.holder.poll() is None:
            # pid 1 of the namespace first, found while unshare still runs: when it dies the kernel
            # kills every process of the namespace, the hosts' nested namespaces and daemons too
            # (killing unshare alone leaves its child running: they outlived the test by an hour)
            try:
                os.kill(self.ns_pid(), signal.SIGKILL)
            except (OSError, AssertionError):
                pass
            self.holder.send_signal(signal.SIGKILL)
            self.holder.wait(30)


def base_chroot() -> Path:
    """The package tier's cached Debian 13 base (built once by tools/debian-chroot.sh)."""
    return Path(subprocess.run([str(pkg.SCRIPT), "path", *pkg.CHROOT_OPTS], capture_output=True, text=True,
                               check=True, timeout=1800).stdout.strip())


def recap(out: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP: {host: {ok, changed, unreachable, failed, ...}}."""
    found = {}
    for m in re.finditer(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", out, re.M):
        found[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return found


def all_settings() -> dict[str, str]:
    """Every key the daemon knows, with its default (`ksmtuned check-config` on an empty file)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        conf = Path(d) / "empty.conf"
        conf.write_text("")
        out = subprocess.run([sys.executable, "-m", "ksmtuned", "check-config", "--config", str(conf)],
                             capture_output=True, text=True, check=True, cwd=REPO).stdout
    keys = {}
    for line in out.splitlines():
        m = re.match(r"^([A-Z][A-Z0-9_]*)=(\S*)\s+#", line)
        if m:
            keys[m.group(1)] = m.group(2)
    assert "KSM_MONITOR_INTERVAL" in keys and "KSM_METRICS_LISTEN" in keys, out
    return keys


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, request):
    _require()
    # the package tier's .deb (built from this checkout in the chroot); KSMTUNED_TEST_DEB names
    # one built before, to develop the role without building it again
    deb = Path(os.environ.get("KSMTUNED_TEST_DEB") or request.getfixturevalue("trixie")[0] / "ksmtuned_0.1.0_all.deb")
    assert deb.exists(), deb
    files = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    if "./etc/init.d/ksmtuned" not in files:
        why = (f"{deb.name} has no /etc/init.d/ksmtuned: on a host without systemd (these chroots) the role "
               "has no service to start")
        if (REPO / "etc" / "init.d" / "ksmtuned").exists():
            pytest.fail(why + " (debian/ksmtuned.install must ship etc/init.d/ksm and etc/init.d/ksmtuned)")
        pytest.skip(why + " (the SysV scripts, issue 13, are not in this tree yet)")
    base = base_chroot()
    work = tmp_path_factory.mktemp("ansible")
    # the old host: Debian's bash ksmtuned (from the base's apt cache), an admin's edit, its log
    old = pkg.Chroot(work / "old", {})
    old.run(f"""
        apt-get install {pkg.APT_OPTS} ksmtuned >/dev/null
        dpkg-query -W -f '${{Version}}' ksmtuned > /root/old-version
        sed -i 's/^# *KSM_NPAGES_MAX=.*/KSM_NPAGES_MAX=4000/' /etc/ksmtuned.conf
        echo 'Mon Dec  1 00:00:00 UTC 2026: total 16777216' > /var/log/ksmtuned
    """)
    (work / "fresh").mkdir()
    f = Fleet(work, base, {h: {"ksmtuned_install": "deb", "ksmtuned_deb": str(deb)} for h in HOSTS}).start()
    try:
        yield f
    finally:
        f.stop()


def read(fleet: Fleet, host: str, path: str) -> str | None:
    """A file of a host (mounted only inside the namespace), or None if it is not there."""
    r = fleet.sh(host, f"cat {path}")
    return r.stdout if r.returncode == 0 else None


def conf_text(fleet: Fleet, host: str) -> str:
    text = read(fleet, host, "/etc/ksmtuned.conf")
    assert text is not None
    return text


def wait_for_text(fleet: Fleet, host: str, path: str, needle: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        text = read(fleet, host, path) or ""
        if needle in text:
            return text
        assert time.monotonic() < deadline, f"{host}:{path}: no {needle!r} within {timeout_s} s:\n{text}"
        time.sleep(0.2)


def daemon_pid(fleet: Fleet, host: str) -> int:
    r = fleet.sh(host, "cat /var/run/ksmtune.pid")
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def settings_for_test() -> dict[str, object]:
    """A value for every key: the defaults, a few changed, metrics to a textfile."""
    s: dict[str, object] = {k: v for k, v in all_settings().items() if v != ""}
    s.update({"KSM_MONITOR_INTERVAL": 2, "KSM_NPAGES_MAX": 2000, "KSM_THRES_COEF": 25, "DEBUG": True,
              "LOGFILE": "/var/log/ksmtuned.debug"})
    return s


TEXTFILE = "/var/lib/prometheus/node-exporter/ksmtuned.prom"


def expected_conf(fleet: Fleet, host: str, settings: dict[str, object]) -> list[str]:
    full = {**settings, "KSM_METRICS_TEXTFILE": TEXTFILE, "KSM_METRICS_LISTEN": f"127.0.0.1:{fleet.ports[host]}"}
    out = []
    for k in sorted(full):
        v = full[k]
        out.append(f"{k}=1" if v is True else f"{k}=" if v is False or v is None else f"{k}={v}")
    return out


def test_first_run_installs_configures_and_starts(fleet):
    settings = settings_for_test()
    r = fleet.playbook(ksmtuned_settings=settings, ksmtuned_metrics_textfile=TEXTFILE)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    rc = recap(r.stdout)
    assert set(rc) == set(HOSTS) and all(v["failed"] == 0 and v["changed"] > 0 for v in rc.values()), rc
    for host in HOSTS:
        text = conf_text(fleet, host)
        lines = [l for l in text.splitlines() if l and not l.startswith("#")]
        assert lines == expected_conf(fleet, host, settings), text
        assert {l.split("=", 1)[0] for l in lines} == set(all_settings())  # every key the daemon knows
        assert "Ansible managed" in text
        # the package is ours (the old host's bash ksmtuned upgraded in place)
        v = fleet.sh(host, "dpkg-query -W -f '${Version}' ksmtuned; echo; /usr/sbin/ksmtuned --version")
        assert v.stdout.splitlines()[0] == "1:0.1.0", v.stdout + v.stderr
        # both services enabled at boot (update-rc.d's links) and running
        links = fleet.sh(host, "ls /etc/rc2.d/")
        assert re.search(r"^S\d\dksm$", links.stdout, re.M) and re.search(r"^S\d\dksmtuned$", links.stdout, re.M), \
            links.stdout
        st = fleet.sh(host, "service ksmtuned status")
        assert st.returncode == 0, st.stdout + st.stderr
        pid = daemon_pid(fleet, host)
        assert fleet.sh(host, f"cat /proc/{pid}/comm").stdout.strip() == "ksmtuned"
        # the daemon reads the file the role wrote: the metrics textfile appears, at its interval
        wait_for_text(fleet, host, TEXTFILE, "ksmtuned_monitor_interval_seconds 2.0")
        with urllib.request.urlopen(f"http://127.0.0.1:{fleet.ports[host]}/metrics", timeout=10) as resp:
            assert b"ksmtuned_monitor_interval_seconds 2.0" in resp.read()
    assert read(fleet, "old", "/root/old-version") != "1:0.1.0"
    assert read(fleet, "old", "/var/log/ksmtuned") is None  # the old daemon's log: gone
    assert read(fleet, "fresh", "/var/log/ksmtuned.debug")  # LOGFILE, DEBUG=1: the debug lines


def test_second_run_changes_nothing(fleet):
    before = {h: (conf_text(fleet, h), daemon_pid(fleet, h)) for h in HOSTS}
    r = fleet.playbook(ksmtuned_settings=settings_for_test(), ksmtuned_metrics_textfile=TEXTFILE)
    assert r.returncode == 0, r.stdout[-6000:]
    rc = recap(r.stdout)
    assert all(v["changed"] == 0 and v["failed"] == 0 for v in rc.values()), (rc, r.stdout[-6000:])
    assert {h: (conf_text(fleet, h), daemon_pid(fleet, h)) for h in HOSTS} == before


def test_a_changed_setting_reloads_the_daemon_not_restarts(fleet):
    pids = {h: daemon_pid(fleet, h) for h in HOSTS}
    settings = {**settings_for_test(), "KSM_MONITOR_INTERVAL": 3}
    r = fleet.playbook(ksmtuned_settings=settings, ksmtuned_metrics_textfile=TEXTFILE)
    assert r.returncode == 0, r.stdout[-6000:]
    assert "RUNNING HANDLER [ksmtuned : Reload ksmtuned]" in r.stdout
    for host in HOSTS:
        assert "KSM_MONITOR_INTERVAL=3" in conf_text(fleet, host).splitlines()
        assert daemon_pid(fleet, host) == pids[host]  # SIGHUP, not a restart
        wait_for_text(fleet, host, TEXTFILE, "ksmtuned_monitor_interval_seconds 3.0")


@pytest.mark.parametrize("bad, why", [
    ({"KSM_THRES_COEF": 150}, "KSM_THRES_COEF: expected a value less than or equal to 100"),
    ({"KSM_NO_SUCH_KEY": 1}, "unknown key KSM_NO_SUCH_KEY"),
])
def test_check_config_rejects_a_bad_variable_and_the_old_file_stays(fleet, bad, why):
    before = {h: (conf_text(fleet, h), daemon_pid(fleet, h)) for h in HOSTS}
    r = fleet.playbook(ksmtuned_settings={**settings_for_test(), "KSM_MONITOR_INTERVAL": 3, **bad},
                       ksmtuned_metrics_textfile=TEXTFILE)
    assert r.returncode != 0
    rc = recap(r.stdout)
    assert set(rc) == set(HOSTS) and all(v["failed"] == 1 for v in rc.values()), rc
    assert why in r.stdout, r.stdout[-6000:]
    assert {h: (conf_text(fleet, h), daemon_pid(fleet, h)) for h in HOSTS} == before


# --- the wheel route ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wheel_host(tmp_path_factory):
    """One more Debian 13 host, for `ksmtuned_install: wheel` with a wheel of this checkout."""
    _require()
    if not pkg.SCRIPT.exists():
        pytest.skip(f"{pkg.SCRIPT} is missing")
    work = tmp_path_factory.mktemp("ansible-wheel")
    dist = work / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                        str(REPO)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = dist.glob("ksmtuned-*.whl")
    # the host reaches no index here (as many fleet hosts): its dependencies as wheels for the
    # chroot's Python, fetched on this side, installed there with --no-index
    base = base_chroot()
    pyver = sorted(base.glob("usr/lib/python3.*/"))[-1].name.removeprefix("python")
    house = work / "wheelhouse"
    # pure-Python dependencies published only as sdists (sdnotify) built into wheels here; then
    # every binary one as the chroot's Python wants it
    for argv in (["wheel", "-q", "-w", str(house)],
                 ["download", "-q", "--only-binary=:all:", "--python-version", pyver, "--implementation", "cp",
                  "--platform", "manylinux2014_x86_64", "--find-links", str(house), "-d", str(house)]):
        r = subprocess.run([sys.executable, "-m", "pip", *argv, f"{wheel}[metrics]"], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
    (work / "wheel").mkdir()
    f = Fleet(work, base, {"wheel": {"ksmtuned_install": "wheel", "ksmtuned_wheel": str(wheel),
                                     "ksmtuned_wheelhouse": str(house), "ksmtuned_manage_services": False}}).start()
    try:
        yield f
    finally:
        f.stop()


def test_wheel_route_installs_into_a_venv_and_is_idempotent(wheel_host):
    """The commands from the wheel (pip, from PyPI for its dependencies), linked into /usr/sbin,
    checking the config they are given; no services (a wheel has no units)."""
    settings = {"KSM_MONITOR_INTERVAL": 30, "KSM_NPAGES_MAX": 800}
    r = wheel_host.playbook(ksmtuned_settings=settings)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    v = wheel_host.sh("wheel", "readlink /usr/sbin/ksmtuned; /usr/sbin/ksmtuned --version; "
                               "/usr/sbin/ksmtuned check-config")
    assert v.returncode == 0, v.stdout + v.stderr
    assert v.stdout.splitlines()[0] == "/opt/ksmtuned/bin/ksmtuned"
    assert re.search(r"^KSM_NPAGES_MAX=800 +# /etc/ksmtuned.conf", v.stdout, re.M), v.stdout
    again = wheel_host.playbook(ksmtuned_settings=settings)
    assert again.returncode == 0 and recap(again.stdout)["wheel"]["changed"] == 0, again.stdout[-6000:]
