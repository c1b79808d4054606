"""Who a process is, from its /proc entry: name, owner, start time (for the pid file check).

Three reads with bare system calls instead of psutil: this is all of `ksmtuned retune`'s
work (the libvirt hook runs it at every guest start), and importing psutil costs it ~20 ms.
"""

from __future__ import annotations

import os
from typing import NamedTuple

CLK_TCK = os.sysconf("SC_CLK_TCK")


class Identity(NamedTuple):
    comm: str
    uid: int  # the real uid (/proc/PID's owner is the effective one; they are equal for a daemon)
    start_s: float  # Unix time the process started, to 1/CLK_TCK s (plus boot time's 1 s)


def _read(path: str, limit: int = 4096) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def boot_time_s(procfs: str = "/proc") -> float:
    for line in _read(f"{procfs}/stat", 1 << 16).splitlines():
        if line.startswith(b"btime "):
            return float(line.split()[1])
    raise OSError(f"{procfs}/stat: no btime line")


def identity(pid: int, procfs: str = "/proc") -> Identity | None:
    """The process's name, real uid and start time; None when it is gone (or unreadable)."""
    try:
        stat = _read(f"{procfs}/{pid}/stat")
        status = _read(f"{procfs}/{pid}/status", 1 << 14)
        btime = boot_time_s(procfs)
    except OSError:
        return None
    try:
        comm = stat[stat.index(b"(") + 1:stat.rindex(b")")].decode(errors="replace")
        start_ticks = int(stat[stat.rindex(b")") + 2:].split()[19])  # field 22, starttime
        uid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith(b"Uid:"))
    except (ValueError, IndexError, StopIteration):
        return None
    return Identity(comm=comm, uid=uid, start_s=btime + start_ticks / CLK_TCK)
