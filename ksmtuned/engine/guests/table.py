"""The process table as the guest finder knows it: one small verdict per (pid, create time).

Each scan lists the proc root once (pid -> inode of /proc/PID); only a pid that is new, or
whose directory has a new inode (a new process under a reused pid, or a dentry rebuilt), is
looked at (psutil: name, parent, create time, command line).  A process whose create time did
not change keeps its verdict.  Nothing is forked, and nothing is read for a process already
seen.

What is kept of a process is bounded whatever its command line (issue 11, class 3): a
verdict, a digest of its command line (to tell a fork that has not exec'd from its parent),
and, for a process a matcher claims or a pid file may name, its owner and at most
``ARGV_KEEP_BYTES`` of its command line.

A forked child runs its parent's program until it calls exec() (libvirt holds QEMU's child
before exec while its hooks run), and a process caught inside execve() shows an empty
command line: such a process is looked at again each scan until it is ``YOUNG_S`` old.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from ...core.matchers import Matcher, bounded_argv, claims, guest_name, qemu_like
from ...kernel import processes

log = logging.getLogger(__name__)

#: A forked process that has not exec'd yet is looked at again each scan until this old.
YOUNG_S = 60.0


class Entry:
    """What the table keeps of one process."""

    __slots__ = ("pid", "ino", "started_s", "ppid", "comm", "digest", "claims", "young", "proc", "argv",
                 "name", "uid", "user", "cgroup", "thp_warned", "next_rollup")

    def __init__(self, pid: int, ino: int, started_s: float, ppid: int, comm: str, digest: int,
                 claims: Tuple[str, ...], young: bool):
        self.pid, self.ino, self.started_s, self.ppid, self.comm = pid, ino, started_s, ppid, comm
        self.digest, self.claims, self.young = digest, claims, young
        self.proc: Optional[processes.Process] = None  # kept for candidates only
        self.argv: Tuple[str, ...] = ()  # bounded; candidates only
        self.name: Optional[str] = None  # from -name or qemu:NAME
        self.uid: Optional[int] = None
        self.user: Optional[str] = None
        self.cgroup: Optional[str] = None
        self.thp_warned = False
        self.next_rollup = 0.0

    @property
    def candidate(self) -> bool:
        """Claimed by a matcher, or a QEMU a pid file may name: measured, so kept in full."""
        return self.proc is not None


class ProcessTable:
    """The cache of verdicts; :meth:`refresh` brings it up to date with the host."""

    def __init__(self, matchers: Sequence[Matcher], want_cgroup: bool = False,
                 clock: Callable[[], float] = time.time):
        self.matchers = list(matchers)
        self.want_cgroup = want_cgroup
        self.clock = clock  # wall clock: ages are against psutil's create_time (epoch seconds)
        self._seen: Dict[int, int] = {}  # pid -> inode, as of the last listing
        self.entries: Dict[int, Entry] = {}
        self._young: Set[int] = set()
        #: work done (what keeps a scan cheap; the tests count it): processes looked at
        self.looks = 0

    def get(self, pid: int) -> Optional[Entry]:
        return self.entries.get(pid)

    def claimed(self) -> List[Entry]:
        return [e for e in self.entries.values() if e.claims]

    def young(self) -> Set[int]:
        return set(self._young)

    def refresh(self) -> None:
        current = processes.entries()
        changed = dict(current.items() - self._seen.items())  # new pids, or a new /proc/PID inode
        for pid in self.entries.keys() - current.keys():
            self.forget(pid)
        self._seen = current
        for pid in sorted(changed):
            self._classify(pid, changed[pid], recheck=False)
        for pid in sorted(self._young - changed.keys()):
            entry = self.entries.get(pid)
            if entry is None:
                self._young.discard(pid)
            else:
                self._classify(pid, entry.ino, recheck=True)

    def forget(self, pid: int) -> None:
        self.entries.pop(pid, None)
        self._young.discard(pid)

    def _classify(self, pid: int, ino: int, recheck: bool) -> None:
        old = self.entries.get(pid)
        if old is not None and not recheck:
            # a new inode for a pid we know: the same process (its dentry was rebuilt) keeps
            # its verdict; a new one under the same pid is looked at
            proc = _open(pid)
            if proc is None:
                self.forget(pid)
                return
            try:
                if proc.create_time() == old.started_s:
                    old.ino = ino
                    return
            except processes.NoSuchProcess:
                self.forget(pid)
                return
        self.looks += 1
        try:
            seen = processes.look(pid)
        except processes.AccessDenied:
            if old is None:  # unreadable now: looked at again when its entry changes
                self.entries[pid] = Entry(pid, ino, 0.0, 0, "", 0, (), False)
            return
        if seen is None:
            self.forget(pid)
            return
        argv, comm = seen.argv, seen.comm
        found = claims(self.matchers, comm, argv)
        digest = hash(argv) if argv else 0
        forked = bool(argv) and digest == self._digest_of(seen.ppid)
        if forked and found and self._claimed(seen.ppid):
            # A guest's child before exec (QEMU running a network script), not a second guest;
            # or QEMU's -daemonize child, which is the guest once its parent has exited (the
            # look again sees it reparented).
            found = ()
        # An empty command line is a kernel thread (a child of kthreadd, pid 2), a zombie, or a
        # process caught inside execve(): only the last must be looked at again.
        mid_exec = (not argv and seen.ppid not in (0, 2) and not seen.zombie) or seen.exec_raced
        age_s = self.clock() - seen.started_s
        young = bool((forked and not found) or mid_exec) and age_s < YOUNG_S
        entry = Entry(pid, ino, seen.started_s, seen.ppid, comm, digest, found, young)
        if old is not None and old.started_s == seen.started_s:
            entry.thp_warned, entry.next_rollup = old.thp_warned, old.next_rollup
        if found or qemu_like(comm, argv):
            entry.proc = seen.proc
            entry.argv = bounded_argv(argv)
            entry.name = guest_name(argv)  # the pid file's name and qemu:NAME come after it
            entry.uid = processes.real_uid(seen.proc)
            entry.user = processes.user_name(entry.uid)
            if self.want_cgroup:
                entry.cgroup = processes.cgroup(pid)
        self.entries[pid] = entry
        if young:
            self._young.add(pid)
        else:
            self._young.discard(pid)

    def _digest_of(self, pid: int) -> Optional[int]:
        entry = self.entries.get(pid)
        if entry is not None:
            return entry.digest
        try:
            seen = processes.look(pid)
        except processes.AccessDenied:
            return None
        return hash(seen.argv) if seen is not None and seen.argv else None

    def _claimed(self, pid: int) -> bool:
        """Does a matcher claim this (parent) process by its name or command line?"""
        entry = self.entries.get(pid)
        if entry is not None:
            return bool(entry.claims)
        try:
            seen = processes.look(pid)
        except processes.AccessDenied:
            return False
        return seen is not None and bool(claims(self.matchers, seen.comm, seen.argv))


def _open(pid: int) -> Optional[processes.Process]:
    try:
        return processes.Process(pid)
    except (processes.NoSuchProcess, ValueError):
        return None


def self_pid() -> Optional[int]:
    """This process's pid where the table is this system's own /proc (else it is not ours)."""
    return os.getpid() if processes.procfs() == processes.DEFAULT_PROCFS else None
