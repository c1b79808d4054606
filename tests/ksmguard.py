"""Save and restore the machine-global KSM state around a test or a benchmark.

KSM knobs are global to the host.  Anything here that touches the real
/sys/kernel/mm/ksm takes an exclusive lock first (so concurrent test runs and
benchmarks on this machine never fight), saves every writable knob, and on exit
writes run=2 (unmerge what we caused), then restores each knob it saved.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path

KSM_ROOT = Path("/sys/kernel/mm/ksm")
LOCK_PATH = Path("/tmp/ksmtuned-real-ksm.lock")

# Restored in this order: the advisor first (pages_to_scan is EINVAL while it scans),
# merge_across_nodes only while nothing is merged (after run=2), run last.
RESTORE_ORDER = (
    "advisor_mode",
    "merge_across_nodes",
    "max_page_sharing",
    "use_zero_pages",
    "smart_scan",
    "stable_node_chains_prune_millisecs",
    "pages_to_scan",
    "sleep_millisecs",
    "advisor_max_cpu",
    "advisor_target_scan_time",
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
)


def ksm_available(root: Path = KSM_ROOT) -> bool:
    return (root / "run").exists()


def read_knob(root: Path, name: str) -> str:
    text = (root / name).read_text().strip()
    if name == "advisor_mode" and "[" in text:
        return text[text.index("[") + 1 : text.index("]")]
    return text


def write_knob(root: Path, name: str, value: str) -> None:
    with open(root / name, "w") as f:
        f.write(value)


def snapshot(root: Path = KSM_ROOT) -> dict[str, str]:
    knobs = {}
    for name in ("run",) + RESTORE_ORDER:
        if (root / name).exists():
            knobs[name] = read_knob(root, name)
    return knobs


def restore(saved: dict[str, str], root: Path = KSM_ROOT) -> None:
    """Unmerge everything (run=2), then put every saved knob back."""
    # Unmerge first: it is what our tests caused, and merge_across_nodes needs it.
    write_knob(root, "run", "2")
    if "advisor_mode" in saved and read_knob(root, "advisor_mode") != "none":
        write_knob(root, "advisor_mode", "none")
    for name in RESTORE_ORDER:
        if name not in saved or name == "advisor_mode":
            continue
        if read_knob(root, name) != saved[name]:
            with contextlib.suppress(OSError):
                write_knob(root, name, saved[name])
    if "advisor_mode" in saved and saved["advisor_mode"] != "none":
        write_knob(root, "advisor_mode", saved["advisor_mode"])
    write_knob(root, "run", saved["run"] if saved.get("run") in ("0", "1") else "0")


@contextlib.contextmanager
def machine_lock(path: Path = LOCK_PATH, timeout_s: float = 1800.0):
    """An exclusive flock on a machine-wide lock file, waited for up to timeout_s."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_ksm(root: Path = KSM_ROOT, timeout_s: float = 1800.0):
    """Hold the machine-wide KSM lock, with every knob saved, and restore on exit."""
    with machine_lock(LOCK_PATH, timeout_s):
        saved = snapshot(root)
        try:
            yield saved
        finally:
            restore(saved, root)
