"""Which processes are guests, and how much memory they hold.  The only psutil user.

Issue 2 scope: a process is a guest when its name matches Red Hat's pattern, its command
line matches Debian's, or it is a QEMU started with ``-accel kvm`` / ``accel=kvm``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import psutil

#: Red Hat's ksmtuned: the process name (comm).
REDHAT_COMM = re.compile(r"^qemu(-(kvm|system-.+)|:.{1,11})$")
#: Debian's ksmtuned: the full command line (pgrep -f).
DEBIAN_CMDLINE = re.compile(r"^qemu-system.*-enable-kvm")
#: A QEMU binary (absolute or bare), started with KVM acceleration.
QEMU_EXE = re.compile(r"(^|/)qemu(-system-[^/\s]+|-kvm)?$")
ACCEL_KVM = re.compile(r"(^|\s)(-accel\s+kvm\b|-enable-kvm\b|-machine\s+\S*accel=kvm)|accel=kvm")


@dataclass(frozen=True)
class Guest:
    pid: int
    name: str  # the process name, or the guest's name where known
    matcher: str
    rss_kib: int


def match(comm: str, cmdline: list[str]) -> str | None:
    """The matcher that claims a process, or None."""
    if REDHAT_COMM.match(comm):
        return "redhat"
    joined = " ".join(cmdline)
    if DEBIAN_CMDLINE.match(joined):
        return "debian"
    if cmdline and QEMU_EXE.search(cmdline[0]) and ACCEL_KVM.search(joined):
        return "libvirt"
    return None


class GuestFinder:
    """Scans the process table (under ``procfs``) for guests."""

    def __init__(self, procfs: Path = Path("/proc")):
        self.procfs = procfs

    def scan(self) -> list[Guest]:
        psutil.PROCFS_PATH = str(self.procfs)
        guests = []
        for proc in psutil.process_iter(["name", "cmdline"]):
            try:
                matcher = match(proc.info["name"] or "", proc.info["cmdline"] or [])
                if matcher is None:
                    continue
                rss_kib = proc.memory_info().rss // 1024
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # exited mid-scan: skipped, not an error
            guests.append(Guest(pid=proc.pid, name=proc.info["name"] or "", matcher=matcher, rss_kib=rss_kib))
        return guests


def committed_kib(guests: list[Guest]) -> int:
    return sum(g.rss_kib for g in guests)
