"""The process table as the guest finder knows it: one small verdict per (pid, create time).

Each scan lists the proc root once (pid -> inode of /proc/PID); only a pid that is new, or
whose directory has a new inode (a new process under a reused pid, or a dentry rebuilt), is
looked at (psutil: name, parent, create time, command line).  A process whose create time did
not change keeps its verdict.  Nothing is forked, and nothing is read for a process already
seen.

What is kept of a process is bounded whatever its command line (issue 11, class 3): its
psutil ``Process`` (its identity: pid and create time, about 500 bytes), a verdict, a digest
of its command line (to tell a fork that has not exec'd from its parent), and, for a process a
matcher claims or a pid file may name, its owner and at most ``ARGV_KEEP_BYTES`` of its
command line.

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

    __slots__ = ("pid", "ino", "proc", "started_s", "ppid", "comm", "digest", "claims", "young", "proc", "argv",
                 "name", "uid", "user", "cgroup", "candidate", "thp_warned", "next_rollup")

    def __init__(self, pid: int, ino: int, proc: Optional[processes.Process], ppid: int, comm: str, digest: int,
                 claims: Tuple[str, ...], young: bool):
        self.pid, self.ino, self.proc, self.ppid, self.comm = pid, ino, proc, ppid, comm
        self.digest, self.claims, self.young = digest, claims, young
        self.candidate = False  # claimed by a matcher, or a QEMU a pid file may name: measured
        self.started_s = 0.0  # epoch seconds; candidates only
        self.argv: Tuple[str, ...] = ()  # bounded; candidates only
        self.name: Optional[str] = None  # from -name or qemu:NAME
        self.uid: Optional[int] = None
        self.user: Optional[str] = None
        self.cgroup: Optional[str] = None
        self.thp_warned = False
        self.next_rollup = 0.0


class ProcessTable:
    """The cache of verdicts; :meth:`refresh` brings it up to date with the host."""

    def __init__(self, matchers: Sequence[Matcher], want_cgroup: bool = False,
                 clock: Callable[[], float] = time.time):
        self.matchers = list(matchers)
        self.want_cgroup = want_cgroup
        self.clock = clock  # wall clock: ages are against psutil's create_time (epoch seconds)
        self._seen: Dict[str, int] = {}  # /proc entry -> inode, as of the last listing
        self.entries: Dict[int, Entry] = {}
        self._young: Set[int] = set()
        self._claimed: Set[int] = set()
        #: work done (what keeps a scan cheap; the tests count it): processes looked at
        self.looks = 0

    def get(self, pid: int) -> Optional[Entry]:
        return self.entries.get(pid)

    def claimed(self) -> List[Entry]:
        """The processes a matcher claims by name or command line."""
        return [self.entries[pid] for pid in self._claimed]

    def young(self) -> Set[int]:
        return set(self._young)

    def refresh(self) -> None:
        current = processes.entries()
        # new pids, or a new /proc/PID inode; and the pids gone
        changed = {int(name): ino for name, ino in current.items() - self._seen.items() if name.isdigit()}
        for name in self._seen.keys() - current.keys():
            if name.isdigit():
                self.forget(int(name))
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
        self._claimed.discard(pid)

    def _classify(self, pid: int, ino: int, recheck: bool) -> None:
        old = self.entries.get(pid)
        if old is not None and not recheck and old.proc is not None and processes.same_process(old.proc):
            # a new inode for a pid we know, and the same process (its dentry was rebuilt):
            # its verdict stands
            old.ino = ino
            return
        self.looks += 1
        try:
            seen = processes.look(pid)
        except processes.AccessDenied:
            if old is None:  # unreadable now: looked at again when its entry changes
                self.entries[pid] = Entry(pid, ino, None, 0, "", 0, (), False)
            elif old.ino != ino:
                self.forget(pid)
                self.entries[pid] = Entry(pid, ino, None, 0, "", 0, (), False)
            return
        if seen is None:
            self.forget(pid)
            return
        argv, comm = seen.argv, seen.comm
        found = claims(self.matchers, comm, argv)
        digest = hash(argv) if argv else 0
        forked = bool(argv) and digest == self._digest_of(seen.ppid)
        if forked and found and self._is_claimed(seen.ppid):
            # A guest's child before exec (QEMU running a network script), not a second guest;
            # or QEMU's -daemonize child, which is the guest once its parent has exited (the
            # look again sees it reparented).
            found = ()
        # An empty command line is a kernel thread (a child of kthreadd, pid 2), a zombie, or a
        # process caught inside execve(): only the last must be looked at again.
        mid_exec = (not argv and seen.ppid not in (0, 2) and not seen.zombie) or seen.exec_raced
        try:
            young = bool((forked and not found) or mid_exec) and (
                self.clock() - processes.started_s(seen.proc) < YOUNG_S)
            entry = Entry(pid, ino, seen.proc, seen.ppid, comm, digest, found, young)
            if found or qemu_like(comm, argv):
                entry.candidate = True
                entry.started_s = processes.started_s(seen.proc)
        except processes.NoSuchProcess:
            self.forget(pid)
            return
        if old is not None and old.proc == seen.proc:
            entry.thp_warned, entry.next_rollup = old.thp_warned, old.next_rollup
        if entry.candidate:
            entry.argv = bounded_argv(argv)
            entry.name = guest_name(argv)  # the pid file's name and qemu:NAME come after it
            entry.uid = processes.real_uid(seen.proc)
            entry.user = processes.user_name(entry.uid)
            if self.want_cgroup:
                entry.cgroup = processes.cgroup(pid)
        self.entries[pid] = entry
        if found:
            self._claimed.add(pid)
        else:
            self._claimed.discard(pid)
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

    def _is_claimed(self, pid: int) -> bool:
        """Does a matcher claim this (parent) process by its name or command line?"""
        entry = self.entries.get(pid)
        if entry is not None:
            return bool(entry.claims)
        try:
            seen = processes.look(pid)
        except processes.AccessDenied:
            return False
        return seen is not None and bool(claims(self.matchers, seen.comm, seen.argv))


def self_pid() -> Optional[int]:
    """This process's pid where the table is this system's own /proc (else it is not ours)."""
    return os.getpid() if processes.procfs() == processes.DEFAULT_PROCFS else None
