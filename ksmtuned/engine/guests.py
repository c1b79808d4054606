"""Which processes are guests, and how much memory they hold.

A guest is a process that one of the configured matchers (``KSM_GUEST_MATCH``) claims:

``redhat``
    the process name (comm) matches Red Hat's ksmtuned pattern
    ``^qemu(-(kvm|system-.+)|:.{1,11})$``;
``debian``
    the command line matches Debian's ``^qemu-system.*-enable-kvm`` (as ``pgrep -f``);
``libvirt``
    a QEMU started the way libvirt starts it: an absolute path to a ``qemu*`` binary with
    ``-accel kvm`` / ``accel=kvm`` or a process name ``qemu:<guest>``; and every QEMU named by a
    pid file ``<run>/libvirt/qemu/<guest>.pid``;
``proxmox``
    processes named ``kvm``, and every QEMU/KVM named by ``<run>/qemu-server/<vmid>.pid``;
``regex:<pattern>``
    the admin's own pattern, searched (``re.search``) in the command line joined by spaces.

Each guest is counted once, under the first configured matcher that claims it.

Cost: the daemon scans every tick, so a scan must stay cheap on a host with thousands of
processes.  One ``os.scandir(/proc)`` gives every pid with the inode of its ``/proc/PID``
directory; the kernel gives a new inode to the directory of a new process, so only new or
changed entries are read (``stat`` for the start time, ``cmdline``).  The verdict is cached
under (pid, start time): a pid reused by a new process never inherits the old verdict.  A
young process that still runs its parent's command line may not have called exec() yet
(libvirt holds QEMU's child before exec while its hooks run): it is read again each scan
until it is YOUNG_S old.
Memory is read only for guests: RSS and VSZ each scan (``statm``), ``ksm_stat`` each scan,
``smaps_rollup`` (PSS, THP; the kernel walks every page table for it) only when the PSS metric
or the ``guests`` command needs it; else, for the THP warning, once per guest every
``rollup_interval_s`` until it warned, and only while ``/proc/meminfo`` shows any
``AnonHugePages`` at all (the walk costs about 20 ms of CPU per GiB of guest RAM).
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from ..core.ticks import PAGE_KIB, Guest, _thp_warning, committed_kib  # noqa: F401 (committed_kib: re-exported)
from ..files import read_pid_file
from ..kernel.procfs import OpenFiles, read_bytes, read_record

log = logging.getLogger(__name__)

#: Red Hat's ksmtuned: the process name (comm, at most 15 characters).
REDHAT_COMM = re.compile(r"^qemu(-(kvm|system-.+)|:.{1,11})$")
#: Debian's ksmtuned: the full command line, as pgrep -f sees it (POSIX '.' matches a newline too).
DEBIAN_CMDLINE = re.compile(r"^qemu-system.*-enable-kvm", re.DOTALL)
#: libvirt: an absolute path to a QEMU binary ...
LIBVIRT_EXE = re.compile(r"^/\S*/qemu(-system-[^/\s]+|-kvm)?$")
#: ... with KVM acceleration (``-accel kvm``, ``-machine ...,accel=kvm``) ...
ACCEL_KVM = re.compile(r"(^|\s)-accel\s+(accel=)?kvm\b|accel=kvm\b")
#: ... or a process name set with ``-name ...,process=qemu:NAME``.
LIBVIRT_COMM = re.compile(r"^qemu:.+$")
#: A process that may stand behind a libvirt or Proxmox pid file.
QEMU_LIKE = re.compile(r"^(qemu(-system-.*|-kvm|:.*)?|kvm)$")

MATCHER_NAMES = ("redhat", "debian", "libvirt", "proxmox")
#: pid file directories under the run directory (``/run``)
PIDFILE_DIRS = {"libvirt": "libvirt/qemu", "proxmox": "qemu-server"}

#: A forked process that has not exec'd yet is classified again each scan until this old.
YOUNG_S = 60.0
#: /proc/PID/stat's flags (field 9): set by fork, cleared by execve (include/linux/sched.h).
PF_FORKNOEXEC = 0x00000040
#: When more pids than this were allocated since the last scan, list /proc instead of
#: looking at each new pid (a listing costs about as much as this many reads).
MAX_NEW_PIDS = 256
#: List /proc in full at least every this many scans, to drop exited processes from the cache.
FULL_LISTING_EVERY = 100
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- matchers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Matcher:
    """One KSM_GUEST_MATCH item: claims processes by comm/command line and/or by pid files."""

    name: str
    claims: Callable[[str, Sequence[str], str], bool]  # (comm, argv, joined argv) -> bool
    pidfile_dir: str | None = None  # relative to the run directory


def _redhat(comm: str, argv: Sequence[str], joined: str) -> bool:
    return REDHAT_COMM.match(comm) is not None


def _debian(comm: str, argv: Sequence[str], joined: str) -> bool:
    return DEBIAN_CMDLINE.match(joined) is not None


def _libvirt(comm: str, argv: Sequence[str], joined: str) -> bool:
    if not argv or LIBVIRT_EXE.match(argv[0]) is None:
        return False
    return ACCEL_KVM.search(joined) is not None or LIBVIRT_COMM.match(comm) is not None


def _proxmox(comm: str, argv: Sequence[str], joined: str) -> bool:
    return comm == "kvm"


_NAMED = {"redhat": _redhat, "debian": _debian, "libvirt": _libvirt, "proxmox": _proxmox}


def make_matcher(spec: str) -> Matcher:
    """A matcher from one KSM_GUEST_MATCH item (already validated by the config)."""
    if spec.startswith("regex:"):
        pattern = re.compile(spec[len("regex:"):], re.DOTALL)  # as pgrep -f
        return Matcher(spec, lambda comm, argv, joined: pattern.search(joined) is not None)
    try:
        return Matcher(spec, _NAMED[spec], PIDFILE_DIRS.get(spec))
    except KeyError:
        raise ValueError(f"unknown guest matcher {spec!r}") from None


# --- what the command line says ------------------------------------------------------------


def guest_name(argv: Sequence[str], comm: str = "", pidfile: str | None = None) -> str | None:
    """The guest's name: ``-name guest=NAME,...`` or ``-name NAME[,...]``, the pid file's name,
    or ``qemu:NAME`` (the process name QEMU sets; truncated to 11 characters by the kernel)."""
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-name", "--name"):
            value = argv[i + 1]
            parts = _split_opts(value)
            for part in parts:
                if part.startswith("guest="):
                    return part[len("guest="):] or None
            if parts and "=" not in parts[0] and parts[0]:
                return parts[0]
    if pidfile:
        return Path(pidfile).name.removesuffix(".pid") or None
    if comm.startswith("qemu:") and len(comm) > 5:
        return comm[5:]
    return None


def _split_opts(value: str) -> list[str]:
    """QEMU's option syntax: comma-separated, ',,' is a literal comma."""
    return [p.replace("\0", ",") for p in value.replace(",,", "\0").split(",")]


# --- the scanner ---------------------------------------------------------------------------


@dataclass
class _Proc:
    """What the cache knows about one process, keyed by (pid, start_ticks)."""

    pid: int
    start_ticks: int
    ino: int
    comm: str
    argv: tuple[str, ...]
    claims: tuple[str, ...]  # matchers claiming it by comm/command line
    young: bool  # classified before it could be sure exec() was done
    ppid: int = 0
    thp_warned: bool = False
    next_rollup: float = 0.0


class GuestFinder:
    """Scans the process table under ``procfs`` (and pid files under ``run_dir``) for guests.

    ``metric`` (KSM_PS_METRIC) decides whether PSS must be read each scan.  Keep one finder
    for the daemon's lifetime: its cache is what makes a scan cheap.
    """

    def __init__(
        self,
        procfs: Path = Path("/proc"),
        matchers: Sequence[str] = MATCHER_NAMES,
        run_dir: Path = Path("/run"),
        metric: str = "rss",
        rollup_interval_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.procfs = Path(procfs)
        self._proc = str(self.procfs)
        self.run_dir = Path(run_dir)
        self.matchers = [make_matcher(m) for m in matchers]
        self._matcher_names = tuple(m.name for m in self.matchers)
        self._pidfile_dirs = [(m.name, str(self.run_dir / m.pidfile_dir)) for m in self.matchers if m.pidfile_dir]
        self.metric = metric
        self.rollup_interval_s = rollup_interval_s
        self.clock = clock
        self._seen: dict[str, int] = {}  # /proc entry name -> inode, as of the last scan
        self._cache: dict[int, _Proc] = {}
        self._young: set[int] = set()  # forked, maybe not exec'd yet: classified again each scan
        self._claimed: set[int] = set()  # pids claimed by comm or command line
        self._cursor: tuple[bytes, bytes] | None = None
        self._scans = 0
        self._last_listing_scan = 0
        self._pid_max: int | None = None
        # /proc/loadavg's last pid is the reader's pid namespace's: it says which pids are new
        # only when this /proc is of our own namespace (not a host /proc seen from a container).
        try:
            self._pid_range_ok = os.readlink(f"{self._proc}/self") == str(os.getpid())
        except OSError:
            self._pid_range_ok = False
        #: work counters (what keeps a scan cheap): /proc listings, and processes read and classified
        self.listings = 0
        self.classified = 0
        self.argv_reads = 0  # command lines read (tests count work with it)
        self._thp_checked_scan = -1
        self._thp_any = True
        self._meminfo: Mapping[str, int] | None = None  # the caller's reading for this scan
        # read every scan: loadavg, and each guest's statm, ksm_stat (and smaps_rollup for PSS)
        self._files = OpenFiles(self._proc)
        self._now_ticks: float | None = None  # clock ticks since boot, as of this scan
        self._pidfiles: dict[str, tuple[tuple[int, int], int | None]] = {}  # path -> ((ino, mtime), pid)
        self._btime_s: float | None = None
        self._self_pid = os.getpid() if self.procfs == Path("/proc") else None

    @classmethod
    def from_settings(cls, settings, procfs: Path = Path("/proc"), run_dir: Path = Path("/run"), **kw):
        """The finder the daemon uses: KSM_GUEST_MATCH and KSM_PS_METRIC from the settings."""
        return cls(procfs=procfs, matchers=settings.guest_match, run_dir=run_dir,
                   metric=settings.ps_metric, **kw)

    @property
    def matcher_names(self) -> tuple[str, ...]:
        return self._matcher_names

    # --- the scan ------------------------------------------------------------------------
    def scan(self, details: bool = False, meminfo: Mapping[str, int] | None = None) -> list[Guest]:
        """The guests now, sorted by pid.  ``details``: read PSS and THP for every guest.

        ``meminfo``: the host's /proc/meminfo fields, when the caller has just read them (the
        daemon, each tick): the THP check then takes AnonHugePages from them instead of
        reading the file a second time.
        """
        self._scans += 1
        self._meminfo = meminfo
        self._refresh()
        by_pidfile = self._pidfile_claims()
        now = self.clock()
        guests = []
        for pid in sorted(self._claimed | by_pidfile.keys()):
            entry = self._cache.get(pid)
            if entry is None or pid == self._self_pid:
                continue
            pidfile = None
            if pid in by_pidfile:
                claims = set(entry.claims)
                for matcher_name, path in by_pidfile[pid]:
                    claims.add(matcher_name)
                    pidfile = pidfile or path
                ordered = tuple(m for m in self._matcher_names if m in claims)
            else:
                ordered = entry.claims  # already in the configured order
            if ordered:
                guest = self._measure(entry, ordered, pidfile, details, now)
                if guest is not None:
                    guests.append(guest)
        return guests

    def _refresh(self) -> None:
        """Bring the cache up to date with the process table: classify new processes only."""
        # /proc/loadavg ends with the last pid the kernel allocated and the number of threads:
        # when neither moved, no process was created, so no pid was reused either, and the
        # listing of /proc (the main cost of a scan) can be skipped.  Exits are seen when a
        # guest's memory can no longer be read.
        key = self._pid_cursor()
        self._now_ticks = None  # read when first needed in this scan
        changed_names: set[str] = set()
        new_pids = None
        if self._pid_range_ok and key is not None and self._cursor is not None and self._seen and key != self._cursor and (
                self._scans - self._last_listing_scan < FULL_LISTING_EVERY):
            new_pids = self._allocated_since(self._cursor[1], key[1])
        if new_pids is not None:
            # Only pids allocated since the last scan can be new processes (or reused pids):
            # look at those instead of listing /proc, whose readdir is the main cost of a scan.
            for pid in new_pids:
                name = str(pid)
                try:
                    ino = os.stat(f"{self._proc}/{name}").st_ino
                except OSError:
                    continue  # already gone
                if not self._classify(pid, ino):
                    continue  # a thread (it has a /proc/TID but is no process of its own), or gone
                self._seen[name] = ino
                changed_names.add(name)
            self._cursor = key
        elif key is None or key != self._cursor or not self._seen:
            self.listings += 1
            self._last_listing_scan = self._scans
            try:
                with os.scandir(self._proc) as it:
                    current = {e.name: e.inode() for e in it}
            except OSError as e:
                from .errors import KernelInterfaceError

                raise KernelInterfaceError(f"{self._proc}: cannot list: {e.strerror}", self._proc,
                                           e.errno) from None
            seen = self._seen.get
            changed = [(name, ino) for name, ino in current.items() if seen(name) != ino]  # new or reused
            for name, ino in changed:
                if not name.isdigit():
                    continue
                changed_names.add(name)
                self._classify(int(name), ino)
            for pid in [pid for pid in self._claimed if str(pid) not in current]:
                self._forget(pid)
            self._seen = current
            self._cursor = key
            if len(self._cache) > 2 * len(current) + 64:
                for pid in [pid for pid in self._cache if str(pid) not in current]:
                    self._forget(pid)
        for pid in list(self._young):
            if str(pid) in changed_names:
                continue  # just classified
            entry = self._cache.get(pid)
            if entry is None:
                self._young.discard(pid)
                continue
            self._classify(pid, entry.ino, recheck=True)

    def _allocated_since(self, last_text: bytes, now_text: bytes) -> list[int] | None:
        """The pids the kernel allocated after ``last_text`` up to ``now_text`` (the last pid in
        /proc/loadavg at two scans), or None when they are too many or cannot be known."""
        try:
            last, now = int(last_text), int(now_text)
        except ValueError:
            return None
        if now >= last:
            return list(range(last + 1, now + 1)) if now - last <= MAX_NEW_PIDS else None
        if self._pid_max is None:  # wrapped around pid_max
            try:
                self._pid_max = int(read_record(f"{self._proc}/sys/kernel/pid_max"))
            except (OSError, ValueError):
                return None
        # the kernel restarts above 300 after a wrap (RESERVED_PIDS); count from 1 to be safe
        if (self._pid_max - 1 - last) + now > MAX_NEW_PIDS:
            return None
        return list(range(last + 1, self._pid_max)) + list(range(1, now + 1))

    def _pid_cursor(self) -> tuple[bytes, bytes] | None:
        try:
            fields = self._files.read(f"{self._proc}/loadavg").split()
            return fields[3].partition(b"/")[2], fields[4]
        except (OSError, IndexError):
            return None  # no such file (a fake procfs): list /proc every scan

    def _forget(self, pid: int) -> None:
        if self._cache.pop(pid, None) is not None and self._files:
            self._files.close_under(f"{self._proc}/{pid}/")
        self._claimed.discard(pid)
        self._young.discard(pid)

    def close(self) -> None:
        """Close the files kept open (a finder replaced on reload)."""
        self._files.close_all()

    def _scan_ticks(self) -> float:
        """Now, in clock ticks since boot: /proc/uptime, read at most once per scan."""
        if self._now_ticks is None:
            self._now_ticks = self._uptime_s() * CLK_TCK
        return self._now_ticks

    def _classify(self, pid: int, ino: int, recheck: bool = False) -> bool:
        """Read and classify one process (or keep the cached verdict while it is the same one).

        False when ``pid`` is no process: a thread of another process (threads take pids from
        the same counter, and each has a /proc/TID), or gone before it could be read.
        """
        self.classified += 1
        try:
            start_ticks, ppid, comm, state, leader, flags = self._read_stat(pid)
            if not leader:
                self._forget(pid)  # a process that had this pid has exited
                return False
            old = self._cache.get(pid)
            if old is not None and old.start_ticks == start_ticks:
                if not recheck:
                    old.ino = ino  # the same process; its /proc dentry was only rebuilt
                    return True
                if flags & PF_FORKNOEXEC and old.argv and ppid == old.ppid and comm == old.comm:
                    # A young fork that has still not exec'd (the kernel clears the flag in
                    # execve), has the same parent and name: its verdict stands without
                    # reading its command line again.  It stops being young with age.
                    if self._scan_ticks() - start_ticks >= YOUNG_S * CLK_TCK:
                        old.young = False
                        self._young.discard(pid)
                    return True
            argv = self._read_argv(pid)
            # stat and cmdline are two reads: an execve() between them pairs the old name with
            # the new command line.  A name that changed meanwhile means: look again next scan.
            comm_after = self._read_stat(pid)[2]
        except (FileNotFoundError, ProcessLookupError):
            self._forget(pid)
            return False
        except OSError:
            return True  # unreadable now (permissions, a race); tried again when its entry changes
        exec_raced = comm_after != comm
        comm = comm_after
        if not argv:  # kernel thread or zombie
            claims: tuple[str, ...] = ()
        else:
            joined = " ".join(argv)
            claims = tuple(m.name for m in self.matchers if m.claims(comm, argv, joined))
        # Forked but maybe not exec'd yet (it still runs its parent's program): look again
        # next scan while it is young.  A process that exec'd another program is final.
        forked = bool(argv) and argv == self._argv_of(ppid)
        if forked and claims and self._is_claimed(ppid):
            # A guest's child before exec (QEMU running a network script), not a second guest;
            # or QEMU's -daemonize child, which is the guest once its parent has exited (the
            # look again below sees it reparented).
            claims = ()
        # An empty command line is a kernel thread (a child of kthreadd, pid 2), a zombie (state
        # Z, or X on its way out), or a process caught inside execve() (comm already the new
        # program's, cmdline not yet): the last must be looked at again, or a guest caught so is
        # never counted.  A zombie never runs again: looking at it again each scan is waste.
        mid_exec = (not argv and ppid not in (0, 2) and state not in ("Z", "X")) or exec_raced
        young = (forked and not claims or mid_exec) and (self._scan_ticks() - start_ticks) < YOUNG_S * CLK_TCK
        if old is not None and old.start_ticks == start_ticks:
            old.ino, old.comm, old.argv, old.claims, old.young, old.ppid = ino, comm, argv, claims, young, ppid
        else:
            if old is not None and self._files:  # a reused pid: the files open are the old process's
                self._files.close_under(f"{self._proc}/{pid}/")
            self._cache[pid] = _Proc(pid, start_ticks, ino, comm, argv, claims, young, ppid)
        if young:
            self._young.add(pid)
        else:
            self._young.discard(pid)
        if claims:
            self._claimed.add(pid)
        else:
            self._claimed.discard(pid)
        return True

    def _is_claimed(self, pid: int) -> bool:
        """Does a matcher claim this (parent) process by its name or command line?"""
        if pid in self._cache:
            return pid in self._claimed
        try:
            comm = self._read_stat(pid)[2]
            argv = self._read_argv(pid)
        except (OSError, ValueError, IndexError):
            return False
        joined = " ".join(argv)
        return bool(argv) and any(m.claims(comm, argv, joined) for m in self.matchers)

    def _argv_of(self, pid: int) -> tuple[str, ...] | None:
        entry = self._cache.get(pid)
        if entry is not None:
            return entry.argv
        try:
            return self._read_argv(pid)
        except OSError:
            return None

    def _read_stat(self, pid: int) -> tuple[int, int, str, str, bool, int]:
        """(start time in clock ticks since boot, parent pid, comm, state letter, thread group
        leader?, the kernel's task flags)."""
        data = read_record(f"{self._proc}/{pid}/stat")
        # comm may hold spaces and parentheses: it ends at the last ')'
        head, _, tail = data.rpartition(b")")
        comm = head.partition(b"(")[2].decode(errors="replace")
        fields = tail.split()  # from field 3 (state): ppid is field 4, starttime field 22
        # exit_signal (field 38) is -1 for every thread but the group leader (the kernel's
        # copy_process() for CLONE_THREAD; de_thread() gives the leader's SIGCHLD to a thread
        # that execs): the process/thread test without reading /proc/PID/status.
        leader = len(fields) < 36 or fields[35] != b"-1"
        return (int(fields[19]), int(fields[1]), comm, fields[0].decode(errors="replace"), leader,
                int(fields[6]) if len(fields) > 6 else 0)

    def _read_argv(self, pid: int) -> tuple[str, ...]:
        self.argv_reads += 1
        raw = read_bytes(f"{self._proc}/{pid}/cmdline")
        if raw.endswith(b"\0"):
            raw = raw[:-1]
        return tuple(a.decode(errors="replace") for a in raw.split(b"\0")) if raw else ()

    def _uptime_s(self) -> float:
        try:
            return float(read_record(f"{self._proc}/uptime").split()[0])
        except (OSError, ValueError, IndexError):
            return float("inf")  # unknown: treat every process as old

    def _boot_time_s(self) -> float:
        if self._btime_s is None:
            try:
                with open(f"{self._proc}/stat", "rb") as f:
                    for line in f:
                        if line.startswith(b"btime "):
                            self._btime_s = float(line.split()[1])
                            break
            except (OSError, ValueError):
                pass
            if self._btime_s is None:
                self._btime_s = time.time() - self._uptime_s() if self._uptime_s() != float("inf") else 0.0
        return self._btime_s

    # --- pid files -------------------------------------------------------------------------
    def _pidfile_claims(self) -> dict[int, list[tuple[str, str]]]:
        """pid -> [(matcher, pid file)] for live QEMU/KVM processes that a pid file names.

        A stale pid file whose pid now belongs to another process is ignored: that process
        started after the pid file was written, or is no QEMU.
        """
        claims: dict[int, list[tuple[str, str]]] = {}
        for matcher_name, directory in self._pidfile_dirs:
            try:
                with os.scandir(directory) as it:
                    entries = [e for e in it if e.name.endswith(".pid") and e.is_file(follow_symlinks=False)]
            except OSError:
                continue  # no such directory: that manager is not installed or runs no guest
            for e in entries:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                key = (st.st_ino, st.st_mtime_ns)
                cached = self._pidfiles.get(e.path)
                if cached is not None and cached[0] == key:
                    pid = cached[1]
                else:
                    pid = _read_pid(e.path)
                    self._pidfiles[e.path] = (key, pid)
                entry = self._cache.get(pid) if pid is not None else None
                if entry is None or not entry.argv:
                    continue
                exe = os.path.basename(entry.argv[0])
                if not (QEMU_LIKE.match(entry.comm) or QEMU_LIKE.match(exe)):
                    continue
                started_s = self._boot_time_s() + entry.start_ticks / CLK_TCK
                if started_s > st.st_mtime + 2.0:  # started after the pid file was written: a reused pid
                    continue
                claims.setdefault(pid, []).append((matcher_name, e.path))
        if len(self._pidfiles) > 1024:
            self._pidfiles.clear()
        return claims

    # --- memory --------------------------------------------------------------------------
    def _thp_in_use(self) -> bool:
        """Any anonymous memory on THP on the host (cheap: /proc/meminfo), checked once per scan."""
        if self._thp_checked_scan != self._scans:
            self._thp_checked_scan = self._scans
            fields = self._meminfo if self._meminfo is not None else _read_keyed(f"{self._proc}/meminfo")
            self._thp_any = fields is None or fields.get("AnonHugePages", 1) > 0
        return self._thp_any

    def _measure(self, entry: _Proc, matchers: tuple[str, ...], pidfile: str | None, details: bool,
                 now: float) -> Guest | None:
        try:
            # statm: size (VSZ) and resident (RSS) in pages, what ps and psutil report
            vsz_pages, rss_pages = self._files.read(f"{self._proc}/{entry.pid}/statm").split()[:2]
        except (FileNotFoundError, ProcessLookupError):
            self._forget(entry.pid)  # exited: skipped, not an error
            return None
        except OSError:
            return None
        rss_kib, vsz_kib = int(rss_pages) * PAGE_KIB, int(vsz_pages) * PAGE_KIB
        pss_kib = thp_kib = None
        if details or self.metric == "pss" or (
                not entry.thp_warned and now >= entry.next_rollup and self._thp_in_use()):
            rollup = _read_keyed(f"{self._proc}/{entry.pid}/smaps_rollup", self._files.read)
            if rollup is not None:
                pss_kib, thp_kib = rollup.get("Pss"), rollup.get("AnonHugePages")
            entry.next_rollup = now + self.rollup_interval_s
        ksm = _read_keyed(f"{self._proc}/{entry.pid}/ksm_stat", self._files.read) or {}
        known = guest_name(entry.argv, entry.comm, pidfile)
        guest = Guest(
            pid=entry.pid,
            name=known or entry.comm,
            matcher=matchers[0],
            rss_kib=rss_kib,
            vsz_kib=vsz_kib,
            pss_kib=pss_kib,
            thp_kib=thp_kib,
            ksm_merging_pages=ksm.get("ksm_merging_pages"),
            ksm_zero_pages=ksm.get("ksm_zero_pages"),
            ksm_profit_bytes=ksm.get("ksm_process_profit"),
            ksm_mergeable=ksm.get("ksm_mergeable"),
            matchers=matchers,
            comm=entry.comm,
            cmdline=entry.argv,
            start_time_s=self._boot_time_s() + entry.start_ticks / CLK_TCK,
            pidfile=pidfile,
            name_known=known is not None,
        )
        if not entry.thp_warned and guest.thp_warning:
            entry.thp_warned = True
            log.warning(
                "guest %s (pid %d): %d MiB of its %d MiB resident memory is on transparent huge pages, "
                "which KSM does not merge in practice; to let KSM work, keep guest RAM off THP "
                "(transparent_hugepage=never, or prctl(PR_SET_THP_DISABLE) for QEMU)",
                guest.name, guest.pid, thp_kib // 1024, rss_kib // 1024,
            )
        return guest


def _read_pid(path: str) -> int | None:
    return read_pid_file(path)  # never blocks on a FIFO, never follows a link, at most 64 bytes


def _read_keyed(path: str, read: Callable[[str], bytes] = read_record) -> dict | None:
    """'Key: N kB' (smaps_rollup) or 'key N' / 'key: yes' (ksm_stat) lines; None if unreadable."""
    try:
        data = read(path)
    except OSError:
        return None
    out: dict = {}
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
