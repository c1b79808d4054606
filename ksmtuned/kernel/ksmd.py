"""ksmd, the KSM kernel thread: found once by name and the kernel-thread flag, then its CPU time
(``/proc/PID/stat`` in clock ticks, and ``/proc/PID/schedstat`` in nanoseconds for the budget
policy's closed loop: stat's 10 ms ticks are +-33 % at 0.3 % over 10 s, TUNING.md section 2)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .procfs import read_record

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PF_KTHREAD = 0x00200000  # include/linux/sched.h: the task is a kernel thread


def read_proc_stat(procfs: Path | str, pid: int | str,
                   read: Callable[[str], bytes] = read_record) -> tuple[str, list[str]]:
    """(comm, fields from field 3 on) of /proc/PID/stat; field n (1-based) is ``rest[n - 3]``.

    comm may contain spaces and parentheses: it is everything between the first '(' and
    the last ')'.  Raises OSError or ValueError.
    """
    raw = read(f"{procfs}/{pid}/stat").decode()
    left, right = raw.index("("), raw.rindex(")")
    return raw[left + 1:right], raw[right + 2:].split()


def system_uptime_s(procfs: Path = Path("/proc")) -> float | None:
    try:
        return float(read_record(f"{procfs}/uptime").split()[0])
    except (OSError, ValueError, IndexError):
        return None


class Ksmd:
    """The ksmd kernel thread: found once by comm (and the kernel-thread flag), then its CPU time."""

    def __init__(self, procfs: Path = Path("/proc")):
        self.procfs = Path(procfs)
        self.pid: int | None = None
        self._searched = False

    def find(self) -> int | None:
        try:
            pids = sorted(int(e) for e in os.listdir(self.procfs) if e.isdigit())
        except OSError:
            return None
        for pid in pids:  # kernel threads have low pids: ksmd is found early
            try:
                comm, rest = read_proc_stat(self.procfs, pid)
                if comm == "ksmd" and int(rest[6]) & PF_KTHREAD:
                    return pid
            except (OSError, ValueError, IndexError):
                continue
        return None

    def schedstat(self) -> tuple[int, int, int] | None:
        """ksmd's /proc/PID/schedstat: (ns on a CPU, ns waiting for one, times it ran), or None
        without KSM or schedstats (CONFIG_SCHED_INFO).  What the kernel's own advisor reads."""
        if self.pid is None and not self._searched:
            self.pid, self._searched = self.find(), True
        for attempt in range(2):
            if self.pid is None:
                return None
            try:
                fields = read_record(f"{self.procfs}/{self.pid}/schedstat").split()
                return int(fields[0]), int(fields[1]), int(fields[2])
            except (OSError, ValueError, IndexError):
                if attempt == 0:  # a kernel thread does not go away; look once more anyway
                    self.pid = self.find()
        return None

    def cpu_ns(self) -> int | None:
        """ksmd's time on a CPU since boot, nanoseconds (schedstat field 1)."""
        stats = self.schedstat()
        return None if stats is None else stats[0]

    def _times(self, pid: int) -> tuple[float, float] | None:
        """(utime+stime seconds, seconds since ksmd started) or None if pid is not ksmd."""
        try:
            comm, rest = read_proc_stat(self.procfs, pid)
            if comm != "ksmd":
                return None
            return (int(rest[11]) + int(rest[12])) / CLOCK_TICKS, int(rest[19]) / CLOCK_TICKS
        except (OSError, ValueError, IndexError):
            return None

    def cpu_seconds(self) -> float | None:
        """ksmd's CPU time (user+system, seconds) since boot, or None without KSM."""
        if self.pid is None and not self._searched:
            self.pid, self._searched = self.find(), True
        if self.pid is None:
            return None
        times = self._times(self.pid)
        if times is None:  # a kernel thread does not go away; look once more anyway
            self.pid = self.find()
            times = self._times(self.pid) if self.pid else None
        return None if times is None else times[0]

    def average_percent(self) -> float | None:
        """ksmd's average CPU use since it started, in percent of one CPU."""
        if self.cpu_seconds() is None or self.pid is None:
            return None
        times = self._times(self.pid)
        up = system_uptime_s(self.procfs)
        if times is None or up is None or up - times[1] <= 0:
            return None
        return 100.0 * times[0] / (up - times[1])


