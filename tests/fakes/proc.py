"""A fake /proc: what the kernel cannot be made to show on demand (a crafted meminfo or
cpuinfo, a pid reused by another process, a guest on transparent huge pages), and a view of
chosen real processes only.

The daemon and the commands read processes through psutil, whose root (``psutil.PROCFS_PATH``)
is process-global: a test that scans a fake /proc in-process uses :func:`using_procfs`; a
daemon or command started as a process gets ``--procfs``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional, Sequence

GIB_KIB = 1024 * 1024
TOTAL_KIB = 16 * GIB_KIB  # threshold at the default KSM_THRES_COEF=20: 3,355,443 kB
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: The fake boot time (epoch seconds) of a FakeProc.
BOOT_S = 1_700_000_000


def meminfo_text(total_kib: int = TOTAL_KIB, free_kib: int = 8 * GIB_KIB, buffers_kib: int = 0,
                 cached_kib: int = 0, available_kib: Optional[int] = None, swap_kib: Optional[int] = None,
                 anon_huge_kib: Optional[int] = None) -> str:
    available_kib = free_kib if available_kib is None else available_kib
    text = (
        f"MemTotal:       {total_kib} kB\n"
        f"MemFree:        {free_kib} kB\n"
        f"MemAvailable:   {available_kib} kB\n"
        f"Buffers:        {buffers_kib} kB\n"
        f"Cached:         {cached_kib} kB\n"
        f"SwapCached:            0 kB\n"
    )
    if swap_kib is not None:
        text += f"SwapTotal:      {swap_kib} kB\nSwapFree:       {swap_kib} kB\n"
    if anon_huge_kib is not None:
        text += f"AnonHugePages:  {anon_huge_kib} kB\n"
    return text + "HugePages_Total:       0\n"


def cpuinfo(cores: int, threads_per_core: int = 1) -> str:
    blocks = []
    n = 0
    for core in range(cores):
        for _ in range(threads_per_core):
            blocks.append(f"processor\t: {n}\nphysical id\t: 0\nsiblings\t: {cores * threads_per_core}\n"
                          f"core id\t\t: {core}\ncpu cores\t: {cores}\n")
            n += 1
    return "\n".join(blocks) + "\n"


def write_atomic(path: Path, text, mode: int = 0o644) -> None:
    """Replace a file in one rename, so a reader sees the old or the new content, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    data = text.encode() if isinstance(text, str) else text
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def view_of(d: Path, pids: Sequence[int] = (), meminfo: Optional[str] = None, cpu: Optional[str] = None,
            links: Sequence[str] = ("stat", "uptime", "locks")) -> Path:
    """A procfs that shows only ``pids`` (links to the real /proc/PID), with its own meminfo and
    cpuinfo where given, and the real system-wide files named in ``links``."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    if meminfo is not None:
        write_atomic(d / "meminfo", meminfo)
    if cpu is not None:
        (d / "cpuinfo").write_text(cpu)
    for name in links:
        (d / name).symlink_to(f"/proc/{name}")
    for pid in pids:
        (d / str(pid)).symlink_to(f"/proc/{pid}")
    return d


class FakeProc:
    """A /proc of made-up processes: stat, cmdline, statm, status, smaps_rollup, ksm_stat."""

    def __init__(self, d: Path, uptime_s: float = 100000.0):
        self.root = Path(d)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "stat").write_text(f"cpu 0 0 0 0\nbtime {BOOT_S}\n")
        (self.root / "uptime").write_text(f"{uptime_s:.2f} 1.00\n")

    def started_ago_ticks(self, seconds: float, now_s: float) -> int:
        """The start time (clock ticks since the fake boot) of a process started ``seconds`` before ``now_s``."""
        return int((now_s - BOOT_S - seconds) * CLK_TCK)

    def process(self, pid: int, comm: str, argv: Sequence[str], start_ticks: int = 1000, rss_pages: int = 2560,
                thp_kib: int = 0, ppid: int = 1, uid: int = 0, state: str = "S", where: Optional[Path] = None) -> Path:
        d = (where or self.root) / str(pid)
        d.mkdir(parents=True, exist_ok=True)
        stat = [str(pid), f"({comm})", state, str(ppid)] + ["0"] * 17 + [str(start_ticks)] + ["0"] * 30
        (d / "stat").write_text(" ".join(stat) + "\n")
        (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
        (d / "statm").write_text(f"{rss_pages * 2} {rss_pages} 0 0 0 0 0\n")
        (d / "status").write_text(f"Name:\t{comm}\nState:\t{state}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
        (d / "smaps_rollup").write_text(
            f"Rss: {rss_pages * 4} kB\nPss: {rss_pages * 2} kB\nAnonHugePages: {thp_kib} kB\n")
        (d / "ksm_stat").write_text("ksm_rmap_items 0\nksm_merging_pages 5\nksm_process_profit 100\n"
                                    "ksm_mergeable: yes\n")
        return d

    def replace(self, pid: int, *args, **kw) -> None:
        """A new process under an old pid: a new directory (a new inode, as /proc gives)."""
        staging = self.root / ".new"
        self.process(pid, *args, where=staging, **kw)
        shutil.rmtree(self.root / str(pid))
        (staging / str(pid)).rename(self.root / str(pid))
        staging.rmdir()

    def meminfo(self, text: str) -> None:
        write_atomic(self.root / "meminfo", text)


@contextlib.contextmanager
def using_procfs(root: Path) -> Iterator[Path]:
    """Scan ``root`` in this process (psutil's root, as ``--procfs`` sets it), then the old root again."""
    from ksmtuned.kernel import processes

    before = processes.procfs()
    processes.set_procfs(root)
    try:
        yield Path(root)
    finally:
        processes.set_procfs(before)
