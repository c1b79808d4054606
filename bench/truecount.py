"""What is really merged, page by page: each process's mergeable mappings (smaps `mg`) looked up
in its pagemap (the PFN of each present page; root only) and then in /proc/kpageflags (bit 21,
KPF_KSM).  The kernel's counters (pages_sharing, ksm_merging_pages) drop only when ksmd next
visits a merged page that has been written since; this count drops at the write.

`saved` = mappings of KSM pages minus the distinct KSM pages among them: pages_sharing's
meaning, counted over the given processes only (a KSM page shared with a process not given
counts as saved by one mapping less).
"""

from __future__ import annotations

import os

from .common import PAGE_SIZE

KPF_KSM = 1 << 21
PAGEMAP_PRESENT = 1 << 63
PAGEMAP_PFN_MASK = (1 << 55) - 1
#: PFNs per read of /proc/kpageflags (8 bytes each): one read per 32 KiB block a process maps
BLOCK_PFNS = 4096


def mergeable_ranges(pid: int) -> list[tuple[int, int]]:
    """[start, end) addresses of the process's VMAs marked mergeable (VmFlags `mg`)."""
    out: list[tuple[int, int]] = []
    cur = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and not head.endswith(":"):
                a, b = head.split("-")
                cur = (int(a, 16), int(b, 16))
            elif line.startswith("VmFlags:") and cur is not None and " mg" in line:
                out.append(cur)
    return out


def _pfns(pid: int, np):
    parts = []
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        for a, b in mergeable_ranges(pid):
            n = (b - a) // PAGE_SIZE
            e = np.frombuffer(os.pread(fd, n * 8, (a // PAGE_SIZE) * 8), dtype=np.uint64)
            e = e[(e & np.uint64(PAGEMAP_PRESENT)) != 0]
            parts.append(e & np.uint64(PAGEMAP_PFN_MASK))
    finally:
        os.close(fd)
    return parts


def true_merged(pids) -> dict | None:
    """{"mapped": mappings of KSM pages, "ksm_pages": distinct KSM pages, "saved": the
    difference} over the given processes' mergeable memory; None without numpy, without root
    (the PFNs read 0) or when a process is gone."""
    try:
        import numpy as np
    except ImportError:
        return None
    try:
        parts = [p for pid in pids for p in _pfns(pid, np)]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    pfns = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    if pfns.size and not pfns.any():
        return None  # not root: pagemap hides the PFNs
    ksm = []
    fd = os.open("/proc/kpageflags", os.O_RDONLY)
    try:
        for blk in np.unique(pfns // np.uint64(BLOCK_PFNS)).tolist():
            flags = np.frombuffer(os.pread(fd, BLOCK_PFNS * 8, blk * BLOCK_PFNS * 8), dtype=np.uint64)
            ksm.append(np.nonzero(flags & np.uint64(KPF_KSM))[0].astype(np.uint64) + np.uint64(blk * BLOCK_PFNS))
    finally:
        os.close(fd)
    is_ksm = np.isin(pfns, np.concatenate(ksm)) if ksm else np.zeros(pfns.size, bool)
    mapped = int(is_ksm.sum())
    distinct = int(np.unique(pfns[is_ksm]).size)
    return {"mapped": mapped, "ksm_pages": distinct, "saved": mapped - distinct}
