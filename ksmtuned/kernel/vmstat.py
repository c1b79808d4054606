"""/proc/vmstat counters (root injected) and the kernel's CONFIG_HZ.

``cow_ksm`` counts KSM pages copied on a write (kernel >= 6.1): merged pages broken by
churn, which the budget policy backs off from.  CONFIG_HZ sets ksmd's sleep granularity
(``sleep_millisecs`` is rounded up to whole jiffies), and is not USER_HZ (``getconf CLK_TCK``).
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Optional

from .procfs import read_record

DEFAULT_VMSTAT = "/proc/vmstat"


def read_vmstat(names: Iterable[str], path: str = DEFAULT_VMSTAT,
                read: Callable[[str], bytes] = read_record) -> dict[str, int]:
    """The named counters of /proc/vmstat ('name value' lines); a missing or malformed one is
    left out (the caller treats it as absent).  Raises OSError.  Looks each name up in the
    text instead of splitting ~180 lines: read every budget tick."""
    data = b"\n" + read(path)
    out: dict[str, int] = {}
    for name in names:
        key = b"\n" + name.encode() + b" "
        at = data.find(key)
        if at < 0:
            continue
        end = data.find(b"\n", at + len(key))
        try:
            out[name] = int(data[at + len(key):end if end >= 0 else None])
        except ValueError:
            continue
    return out


_HZ = re.compile(rb"^CONFIG_HZ=(\d+)\s*$", re.M)


def kernel_hz(procfs: Path = Path("/proc"), boot: Path = Path("/boot"),
              release: Optional[str] = None) -> Optional[int]:
    """CONFIG_HZ from /proc/config.gz, else /boot/config-RELEASE; None if neither says."""
    release = release or os.uname().release
    for path, opener in ((procfs / "config.gz", gzip.open), (boot / f"config-{release}", open)):
        try:
            with opener(path, "rb") as f:
                m = _HZ.search(f.read())
        except (OSError, EOFError, ValueError):
            continue
        if m:
            return int(m.group(1))
    return None
