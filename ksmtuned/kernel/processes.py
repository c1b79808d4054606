"""Every question about processes, asked through psutil; small hand-written readers only where
psutil has nothing (``ksm_stat``, ``AnonHugePages`` of ``smaps_rollup``, the cgroup).

The root: psutil reads ``psutil.PROCFS_PATH`` (its documented way to read a host /proc mounted
elsewhere).  It is process-global, so it is set once, by the composition root (the CLI's
``--procfs``) with :func:`set_procfs`; every reader here takes its root from :func:`procfs`, so
psutil and the hand-written readers never disagree.  A psutil ``Process`` keeps the root it was
created under.

Identity: a process is (pid, create time); psutil's ``Process`` compares so (``==``).
"""

from __future__ import annotations

import os
import pwd
import time
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import psutil

from ..errors import KernelInterfaceError

DEFAULT_PROCFS = "/proc"
#: What is read of a small per-process kernel file (ksm_stat, smaps_rollup, cgroup).
SMALL_FILE_BYTES = 16384

NoSuchProcess = psutil.NoSuchProcess
AccessDenied = psutil.AccessDenied
ZombieProcess = psutil.ZombieProcess
Process = psutil.Process


def set_procfs(root: "str | os.PathLike[str]") -> None:
    """Read processes under ``root`` from now on (``--procfs``; psutil.PROCFS_PATH)."""
    psutil.PROCFS_PATH = os.fspath(root).rstrip("/") or "/"


def procfs() -> str:
    """The proc filesystem every reader here reads."""
    return str(psutil.PROCFS_PATH)


def entries() -> Dict[str, int]:
    """name -> inode of every entry of the proc root (the pids, as psutil.pids(), and a few
    other names: the caller looks at the digits).

    As ``psutil.pids()`` (one listing of the root), with the inode the listing gives for free:
    the kernel gives the directory of a new process a new inode, so an unchanged inode is a
    process already seen and needs no read.  Raises KernelInterfaceError when the root cannot
    be listed.
    """
    root = procfs()
    try:
        with os.scandir(root) as it:
            return {e.name: e.inode() for e in it}
    except OSError as e:
        raise KernelInterfaceError(f"{root}: cannot list: {e.strerror}", root, e.errno) from None


@dataclass(frozen=True)
class Seen:
    """What one look at a process found.  ``argv`` is the whole command line: the caller keeps
    only what it needs (issue 11, class 3)."""

    proc: psutil.Process  # its identity: == compares pid and create time
    ppid: int
    comm: str
    argv: Tuple[str, ...]
    zombie: bool
    exec_raced: bool  # the name changed while the command line was read: look again


def look(pid: int) -> Optional[Seen]:
    """Name, parent and command line of one process; None if it is gone.

    Raises AccessDenied where the caller may not read it.  The name is read again after the
    command line: an execve() between the two reads pairs the old name with the new command
    line, and such a look is marked ``exec_raced``.
    """
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            comm, ppid = proc.name(), proc.ppid()
            zombie = proc.status() == psutil.STATUS_ZOMBIE
        try:
            argv = tuple(proc.cmdline()) if not zombie else ()
        except psutil.ZombieProcess:
            argv, zombie = (), True
        comm_after = proc.name() if argv else comm
    except (psutil.NoSuchProcess, ValueError):  # ZombieProcess is caught above
        return None
    return Seen(proc, ppid, comm_after, argv, zombie, comm_after != comm)


def started_s(proc: psutil.Process) -> float:
    """When the process started, in epoch seconds (psutil's create_time: it reads the boot time)."""
    return float(proc.create_time())


def same_process(proc: psutil.Process) -> bool:
    """Is ``proc`` still running, and not a new process under its pid?"""
    try:
        return proc == psutil.Process(proc.pid)
    except (psutil.NoSuchProcess, ValueError):
        return False


def real_uid(proc: psutil.Process) -> Optional[int]:
    try:
        return int(proc.uids().real)
    except (psutil.Error, ValueError):
        return None


def user_name(uid: Optional[int]) -> Optional[str]:
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return str(uid)


def uids_of(names: Iterable[str]) -> frozenset:
    """The uids of the users that exist among ``names``."""
    out = set()
    for name in names:
        try:
            out.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            continue
    return frozenset(out)


def memory_kib(proc: psutil.Process) -> Tuple[int, int]:
    """(RSS, VSZ) in kB, as ps shows them (psutil's memory_info: /proc/PID/statm)."""
    mem = proc.memory_info()
    return mem.rss // 1024, mem.vms // 1024


def pss_kib(proc: psutil.Process) -> Optional[int]:
    """PSS in kB (psutil's memory_full_info: smaps_rollup; the kernel walks the page tables)."""
    try:
        return int(proc.memory_full_info().pss) // 1024
    except psutil.AccessDenied:
        return None


def _small(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        return os.read(fd, SMALL_FILE_BYTES)
    finally:
        os.close(fd)


def keyed(pid: int, name: str) -> Optional[Dict[str, object]]:
    """'Key: N kB' (smaps_rollup) or 'key N' / 'key: yes' (ksm_stat) lines of /proc/PID/NAME;
    None if unreadable (no such file before Linux 6.1, or the process is gone)."""
    try:
        data = _small(f"{procfs()}/{pid}/{name}")
    except OSError:
        return None
    out: Dict[str, object] = {}
    for line in data.decode(errors="replace").splitlines():
        parts = line.replace(":", " ", 1).split()
        if len(parts) < 2:
            continue
        key, value = parts[0], parts[1]
        if value.lstrip("-").isdigit():
            out[key] = int(value)
        elif value in ("yes", "no"):
            out[key] = value == "yes"
    return out


def thp_kib(pid: int) -> Optional[int]:
    """AnonHugePages of /proc/PID/smaps_rollup in kB (psutil does not read it)."""
    rollup = keyed(pid, "smaps_rollup")
    value = rollup.get("AnonHugePages") if rollup else None
    return value if isinstance(value, int) else None


def cgroup(pid: int) -> Optional[str]:
    """The process's cgroup v2 path (the ``0::PATH`` line of /proc/PID/cgroup), or None."""
    try:
        data = _small(f"{procfs()}/{pid}/cgroup")
    except OSError:
        return None
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def boot_time_s() -> float:
    return float(psutil.boot_time())


def age_s(pid: int) -> Optional[float]:
    """Seconds since the process started, or None if it is gone."""
    try:
        return max(0.0, time.time() - psutil.Process(pid).create_time())
    except (psutil.Error, ValueError, OSError):
        return None


def iter_processes(attrs: List[str]) -> Iterator[psutil.Process]:
    """Every process, with ``attrs`` read into ``.info`` (psutil.process_iter); none where the
    root cannot be listed or lists no process (psutil.pids() fails on an empty one)."""
    try:
        if not any(name.isdigit() for name in os.listdir(procfs())):
            return iter(())
    except OSError:
        return iter(())
    return psutil.process_iter(attrs, ad_value=None)

