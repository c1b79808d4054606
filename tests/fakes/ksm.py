"""A fake /sys/kernel/mm/ksm: one file per knob and counter."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

#: The knobs the daemon writes and the counters the old daemon's tests read: all zero.
KNOBS = {"run": "0", "pages_to_scan": "100", "sleep_millisecs": "20", "pages_sharing": "0",
         "pages_shared": "0", "full_scans": "0", "pages_unshared": "0", "pages_volatile": "0"}

#: Every file a recent kernel has, with distinct values, so a mix-up between counters shows.
FULL = {
    "run": "0", "pages_to_scan": "100", "sleep_millisecs": "20", "full_scans": "17", "pages_shared": "1234",
    "pages_sharing": "56789", "pages_unshared": "4321", "pages_volatile": "55", "pages_scanned": "987654",
    "pages_skipped": "321", "general_profit": "210987654", "ksm_zero_pages": "12", "stable_node_chains": "3",
    "stable_node_dups": "9", "max_page_sharing": "256", "merge_across_nodes": "1", "use_zero_pages": "0",
    "smart_scan": "1", "advisor_mode": "[none] scan-time", "advisor_max_cpu": "70",
    "advisor_target_scan_time": "200", "advisor_min_pages_to_scan": "500", "advisor_max_pages_to_scan": "30000",
}


def fake_ksm_dir(d: Path, values: Optional[Mapping[str, str]] = None) -> Path:
    """Create directory ``d`` (and its parents) holding ``values`` (default KNOBS), one file each."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    for name, value in (KNOBS if values is None else values).items():
        (d / name).write_text(f"{value}\n")
    return d
