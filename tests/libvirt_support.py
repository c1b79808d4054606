"""A real libvirtd for the tests, without systemd (KSM.md section 5), and everything it leaves removed.

``libvirt_host(...)`` does by hand what libvirt-daemon-system would: the ``libvirt-qemu`` user
and group, the state and log folders, ``/etc/libvirt/qemu.conf`` lines (``user``/``group`` root,
``stdio_handler = "file"`` so that virtlogd is not needed); installs the project's hook as
``/etc/libvirt/hooks/qemu.d/ksmtuned`` before libvirtd starts (it looks for hooks only then);
starts ``libvirtd -f CONF -p PIDFILE`` under a child subreaper that reaps (this machine's init
reaps late, and libvirt waits for it), with the venv's ``bin`` first on its PATH so that the
hook finds this checkout's ``ksmtuned``.  On exit: the domains it created destroyed, libvirtd
stopped by pid, the hook, qemu.conf, pid files and the new ``machine`` cgroup folders removed
or restored.  A machine-wide flock keeps two test runs from sharing one libvirtd.

Run as ``python -m tests.libvirt_support reaper -- CMD...`` it is the subreaper itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.ksmguard import machine_lock

REPO = Path(__file__).resolve().parent.parent
HOOK_SRC = REPO / "etc/libvirt/hooks/qemu.d/ksmtuned"
HOOK_DIR = Path("/etc/libvirt/hooks/qemu.d")
HOOK_DST = HOOK_DIR / "ksmtuned"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
QEMU_CONF_LINES = ('user = "root"', 'group = "root"', 'stdio_handler = "file"')
RUN_QEMU = Path("/run/libvirt/qemu")
SOCKET = Path("/run/libvirt/libvirt-sock")
LOCK_PATH = Path("/tmp/ksmtuned-libvirt.lock")
CGROUP = Path("/sys/fs/cgroup")
URI = "qemu:///system"
PR_SET_CHILD_SUBREAPER = 36


def require_libvirt() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run libvirtd")
    for tool in ("libvirtd", "virsh", "qemu-system-x86_64"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            pytest.skip(f"{tool} is not installed (apt-get install --no-install-recommends libvirt-daemon "
                        "libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86)")
    if not HOOK_SRC.exists():
        pytest.skip(f"{HOOK_SRC} is missing")


def _libvirtd() -> str:
    return shutil.which("libvirtd") or "/usr/sbin/libvirtd"


def domain_xml(name: str, mem_mib: int = 128, kvm: bool = True) -> str:
    return f"""<domain type='{"kvm" if kvm else "qemu"}'>
  <name>{name}</name>
  <memory unit='MiB'>{mem_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='pty'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@dataclass
class LibvirtHost:
    tmp: Path
    reaper: subprocess.Popen | None = None
    pidfile: Path | None = None
    domains: list[str] = field(default_factory=list)

    def virsh(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)}: {r.returncode}: {r.stderr}{self.log_tail()}")
        return r

    def log_tail(self) -> str:
        try:
            return "\nlibvirtd log:\n" + (self.tmp / "libvirtd.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def create(self, name: str, mem_mib: int = 128, kvm: bool = True, paused: bool = True) -> int:
        """virsh create; the QEMU pid (from libvirt's pid file)."""
        xml = self.tmp / f"{name}.xml"
        xml.write_text(domain_xml(name, mem_mib, kvm))
        self.domains.append(name)
        self.virsh("create", str(xml), *(["--paused"] if paused else []))
        return int((RUN_QEMU / f"{name}.pid").read_text().strip())

    def destroy(self, name: str) -> None:
        self.virsh("destroy", name)
        self.domains.remove(name)

    @property
    def libvirtd_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError, AttributeError):
            return None


def _cgroup_dirs() -> set[Path]:
    out: set[Path] = set()
    if not CGROUP.exists():
        return out
    # cgroup v2 (one tree) or v1 (one tree per controller folder)
    tops = [CGROUP] + [p for p in CGROUP.iterdir() if p.is_dir() and not (CGROUP / "cgroup.procs").exists()]
    for top in tops:
        for name in ("machine", "machine.slice"):
            root = top / name
            if root.is_dir():
                out.add(root)
                out.update(p for p in root.rglob("*") if p.is_dir())
    return out


def _ensure_user() -> None:
    try:
        grp.getgrnam("libvirt-qemu")
    except KeyError:
        subprocess.run(["groupadd", "--system", "libvirt-qemu"], check=True)
    try:
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        subprocess.run(["useradd", "--system", "-g", "libvirt-qemu", "-d", "/var/lib/libvirt", "-s",
                        "/usr/sbin/nologin", "libvirt-qemu"], check=True)


def _lock(timeout_s: float = 300):
    return machine_lock(LOCK_PATH, timeout_s)


@contextlib.contextmanager
def libvirt_host(tmp: Path, path_prefix: Path, hook: Path = HOOK_SRC, start_timeout_s: float = 90):
    """A running libvirtd with the hook installed; everything undone on exit."""
    require_libvirt()
    with _lock():
        if subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, timeout=10).returncode == 0:
            pytest.skip("a libvirtd already runs on this machine; the test needs its own")
        host = LibvirtHost(tmp)
        created: list[Path] = []
        qemu_conf_before = QEMU_CONF.read_text() if QEMU_CONF.exists() else None
        hook_before = HOOK_DST.read_bytes() if HOOK_DST.exists() else None
        cgroups_before = _cgroup_dirs()
        run_libvirt = RUN_QEMU.parent
        run_libvirt_before = run_libvirt.exists()
        try:
            _ensure_user()
            for d in (Path("/var/log/libvirt/qemu"), Path("/var/lib/libvirt/qemu"), HOOK_DIR):
                if not d.exists():
                    d.mkdir(parents=True)
                    created.append(d)
            text = qemu_conf_before or ""
            missing = [line for line in QEMU_CONF_LINES if line not in text.splitlines()]
            if missing:
                QEMU_CONF.write_text(text + ("" if text.endswith("\n") or not text else "\n")
                                     + "\n".join(missing) + "\n")
            shutil.copyfile(hook, HOOK_DST)
            os.chmod(HOOK_DST, 0o755)
            conf = tmp / "libvirtd.conf"
            conf.write_text(f'log_outputs = "3:file:{tmp}/libvirtd.log"\n')
            host.pidfile = tmp / "libvirtd.pid"
            env = dict(os.environ)
            env["PATH"] = f"{path_prefix}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
            env.pop("PIDFILE", None)
            with open(tmp / "libvirtd.out", "wb") as out:
                host.reaper = subprocess.Popen(
                    [sys.executable, "-m", "tests.libvirt_support", "reaper", "--",
                     _libvirtd(), "-f", str(conf), "-p", str(host.pidfile)],
                    cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + start_timeout_s
            while subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, timeout=30).returncode != 0:
                if host.reaper.poll() is not None:
                    raise AssertionError("libvirtd exited: " + (tmp / "libvirtd.out").read_text(errors="replace")
                                         + host.log_tail())
                if time.monotonic() > deadline:
                    raise AssertionError(f"libvirtd did not answer within {start_timeout_s} s" + host.log_tail())
                time.sleep(0.1)
            yield host
        finally:
            for name in list(host.domains):
                with contextlib.suppress(Exception):
                    host.virsh("destroy", name, check=False, timeout=30)
            _stop(host)
            if hook_before is None:
                HOOK_DST.unlink(missing_ok=True)
            else:
                HOOK_DST.write_bytes(hook_before)
            for d in reversed(created):
                with contextlib.suppress(OSError):
                    d.rmdir()
            if qemu_conf_before is None:
                QEMU_CONF.unlink(missing_ok=True)
            elif QEMU_CONF.read_text() != qemu_conf_before:
                QEMU_CONF.write_text(qemu_conf_before)
            for name in host.domains + [Path(x).stem for x in map(str, tmp.glob("*.xml"))]:
                for leftover in (RUN_QEMU / f"{name}.pid", RUN_QEMU / f"{name}.xml"):
                    leftover.unlink(missing_ok=True)
            for d in sorted(_cgroup_dirs() - cgroups_before, key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    d.rmdir()
            if not run_libvirt_before:
                shutil.rmtree(run_libvirt, ignore_errors=True)  # libvirtd's runtime state


def _stop(host: LibvirtHost) -> None:
    if host.reaper is None:
        return
    pid = host.libvirtd_pid
    if pid is not None and host.reaper.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        host.reaper.wait(20)
    except subprocess.TimeoutExpired:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        host.reaper.kill()
        host.reaper.wait()
    if host.pidfile is not None:
        host.pidfile.unlink(missing_ok=True)


def _reaper(argv: list[str]) -> int:
    """Be a child subreaper, run argv, reap every orphan until argv's process exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    child = subprocess.Popen(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: os.kill(child.pid, s))
    code = 1
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return code
        if pid == child.pid:
            code = os.waitstatus_to_exitcode(status)
            # reap what is left (QEMUs reparented to us), without waiting for the living
            while True:
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return code
                if pid == 0:
                    return code


if __name__ == "__main__":
    if sys.argv[1:2] == ["reaper"] and sys.argv[2:3] == ["--"]:
        sys.exit(_reaper(sys.argv[3:]))
    sys.exit("usage: python -m tests.libvirt_support reaper -- CMD...")
