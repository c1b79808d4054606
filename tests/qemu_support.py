"""Real QEMU guests for the tests, in each command-line form the guest matchers claim.

A guest here is cheap and real (KSM.md section 5): paused (``-S``), no devices, its RAM
preallocated (so its RSS is known at once) and opted in to KSM by QEMU itself.  THP is
disabled for it with ``prctl(PR_SET_THP_DISABLE)`` in the child before exec (QEMU inherits
it), because RAM on transparent huge pages is not merged in practice (KSM.md section 1) --
except for the guest whose THP is the point of the test.  ``PR_SET_PDEATHSIG`` kills a guest
whose test process died; the context managers kill each guest by pid in ``finally``.

Forms:

``debian``   ``qemu-system-x86_64 -enable-kvm ...`` (bare binary name, as Debian's pattern wants)
``libvirt``  ``/usr/bin/qemu-system-x86_64 -name guest=NAME,process=qemu:NAME -accel kvm ...``
``kvm``      a binary named ``kvm`` (Proxmox), so the process name is ``kvm``

``/dev/kvm`` is used when it works; otherwise each form keeps its KVM option (the pattern
needs it) and adds a TCG fallback that QEMU accepts beside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

QEMU_NAME = "qemu-system-x86_64"
PR_SET_PDEATHSIG = 1
PR_SET_THP_DISABLE = 41
KVM_GET_API_VERSION = 0xAE00
FORMS = ("debian", "libvirt", "kvm")
#: the matchers that claim each form (besides regex:)
CLAIMS = {
    "debian": {"redhat", "debian"},  # comm qemu-system-x86; ^qemu-system.*-enable-kvm
    "libvirt": {"redhat", "libvirt"},  # comm qemu:NAME; absolute path and -accel kvm
    "kvm": {"proxmox"},  # comm kvm
}


def qemu_path() -> str | None:
    return shutil.which(QEMU_NAME)


def kvm_works() -> bool:
    """/dev/kvm opens and answers KVM_GET_API_VERSION (12)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION) == 12
    except OSError:
        return False
    finally:
        os.close(fd)


def require_qemu() -> str:
    path = qemu_path()
    if path is None:
        pytest.skip(f"{QEMU_NAME} is not installed (apt-get install qemu-system-x86)")
    return path


def thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unsupported"
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else text.strip()


@dataclass
class QemuGuest:
    form: str
    name: str
    mem_mib: int
    argv: list[str]
    proc: subprocess.Popen
    pidfile: Path | None = None
    thp: bool = False
    claims: set[str] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ram_pages(self) -> int:
        return self.mem_mib * 1024 * 1024 // os.sysconf("SC_PAGE_SIZE")

    def status_kib(self, key: str) -> int:
        """VmRSS, VmSize ... from /proc/PID/status (read without psutil, as a second opinion)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def rollup_kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)


def _preexec(thp: bool):
    libc = ctypes.CDLL(None, use_errno=True)

    def setup():
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if not thp:
            libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)

    return setup


def guest_argv(form: str, name: str, mem_mib: int, bindir: Path, pidfile: Path | None = None,
               kvm: bool | None = None) -> list[str]:
    """The command line of one guest in ``form``; ``bindir`` receives the ``kvm`` symlink."""
    qemu = require_qemu()
    kvm = kvm_works() if kvm is None else kvm
    common = [
        "-machine", "pc", "-m", f"{mem_mib}M",
        "-object", f"memory-backend-ram,id=m0,size={mem_mib}M,prealloc=on", "-machine", "memory-backend=m0",
        "-S", "-nographic", "-display", "none", "-monitor", "none", "-serial", "none", "-nodefaults",
    ]
    if pidfile is not None:
        common += ["-pidfile", str(pidfile)]
    if form == "debian":
        accel = ["-enable-kvm"] if kvm else ["-enable-kvm", "-machine", "accel=kvm:tcg"]
        return [QEMU_NAME, *accel, "-name", name, *common]
    accel = ["-accel", "kvm"] if kvm else ["-accel", "kvm", "-accel", "tcg"]
    if form == "libvirt":
        return [qemu, "-name", f"guest={name},process=qemu:{name},debug-threads=on", *accel, *common]
    if form == "kvm":
        link = bindir / "kvm"
        if not link.exists():
            bindir.mkdir(parents=True, exist_ok=True)
            link.symlink_to(qemu)
        return [str(link), "-name", f"{name},debug-threads=on", *accel, *common]
    raise ValueError(form)


def start_guest(form: str, name: str, mem_mib: int, workdir: Path, thp: bool = False,
                pidfile: Path | None = None) -> QemuGuest:
    argv = guest_argv(form, name, mem_mib, workdir / "bin", pidfile)
    log = open(workdir / f"{name}.log", "wb")
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_preexec(thp), close_fds=True)
    finally:
        log.close()
    return QemuGuest(form, name, mem_mib, argv, proc, pidfile, thp, set(CLAIMS[form]))


def wait_resident(guests: list[QemuGuest], workdir: Path, timeout_s: float = 30.0) -> None:
    """Until each guest's RSS covers its preallocated RAM and stays still (or fail with its log)."""
    deadline = time.monotonic() + timeout_s
    for g in guests:
        last = -1
        while True:
            if g.proc.poll() is not None:
                log = (workdir / f"{g.name}.log").read_text(errors="replace")
                raise RuntimeError(f"guest {g.name} exited with {g.proc.returncode}: {log[-2000:]}")
            try:
                rss = g.status_kib("VmRSS")
            except (OSError, KeyError):
                rss = 0
            if rss >= g.mem_mib * 1024 and rss == last and (g.pidfile is None or g.pidfile.exists()):
                break
            last = rss
            if time.monotonic() > deadline:
                raise RuntimeError(f"guest {g.name} did not preallocate {g.mem_mib} MiB within {timeout_s} s")
            time.sleep(0.2)


def kill_guest(g: QemuGuest) -> None:
    if g.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(g.pid, signal.SIGKILL)
    g.proc.wait()


@contextlib.contextmanager
def running_guests(specs: list[tuple[str, str, int]], workdir: Path, thp: bool = False,
                   pidfiles: dict[str, Path] | None = None):
    """Start guests (form, name, MiB), wait until their RAM is resident, kill them on exit."""
    require_qemu()
    pidfiles = pidfiles or {}
    guests: list[QemuGuest] = []
    try:
        for form, name, mib in specs:
            pf = pidfiles.get(name)
            if pf is not None:
                pf.parent.mkdir(parents=True, exist_ok=True)
            guests.append(start_guest(form, name, mib, workdir, thp=thp, pidfile=pf))
        wait_resident(guests, workdir)
        yield guests
    finally:
        for g in guests:
            kill_guest(g)
