"""The KSM sysfs directory (root injected): read counters and knobs, apply a decision.

Writes go in a fixed order (pages_to_scan, sleep_millisecs, then run) and only where the
kernel's value differs, so an admin's manual change is corrected and nothing is rewritten
needlessly.  Every OSError becomes a KernelInterfaceError naming the path and errno.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..core.ticks import Write
from ..errors import KernelInterfaceError, KsmPermissionError, KsmUnavailableError
from .procfs import read_bytes

DEFAULT_SYSFS = Path("/sys/kernel/mm/ksm")

#: Counters ``status`` and the metrics report when the kernel has them.
COUNTERS = (
    "full_scans", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
    "pages_scanned", "pages_skipped", "general_profit", "ksm_zero_pages", "stable_node_chains",
    "stable_node_dups",
)
KNOBS = (
    "run", "pages_to_scan", "sleep_millisecs", "max_page_sharing", "merge_across_nodes",
    "use_zero_pages", "smart_scan", "advisor_mode", "advisor_max_cpu", "advisor_target_scan_time",
    "advisor_min_pages_to_scan", "advisor_max_pages_to_scan",
)


def _wrap(e: OSError, path: Path | str, action: str) -> KernelInterfaceError:
    path = Path(path)
    if e.errno in (errno.EACCES, errno.EPERM):
        return KsmPermissionError(
            f"{path}: permission denied while trying to {action}: must run as root", str(path), e.errno
        )
    if e.errno == errno.EROFS:
        # a container's read-only /sys: a restart cannot fix it, so 77 (no restart by the unit)
        return KsmPermissionError(
            f"{path}: read-only file system while trying to {action} (is /sys mounted read-only, "
            "as in a container?)", str(path), e.errno
        )
    if e.errno == errno.ENOENT and not path.parent.exists():
        return KsmUnavailableError(
            f"{path.parent}: no such directory: this kernel has no KSM (CONFIG_KSM)", str(path), e.errno
        )
    return KernelInterfaceError(f"{path}: cannot {action}: {os.strerror(e.errno or 0)}", str(path), e.errno)


def _selected(text: str) -> str:
    """The selected word of a choice attribute ('[none] scan-time' -> 'none'); else the text."""
    if "[" in text and "]" in text:
        return text[text.index("[") + 1 : text.index("]")]
    return text


class KsmSysfs:
    def __init__(self, root: Path = DEFAULT_SYSFS):
        self.root = Path(root)
        self._prefix = str(self.root).rstrip("/") + "/"
        self._present: tuple[str, ...] | None = None  # counters() files found last time

    def _read(self, path: str) -> str:
        # one read: a sysfs attribute is at most a page.  O_NONBLOCK: a FIFO planted in a
        # stand-in directory must not hang the loop
        data = read_bytes(path, limit=4096, nonblock=True)
        return data.decode(errors="replace").strip()

    def path(self, name: str) -> Path:
        return self.root / name

    def file(self, name: str) -> str:
        """The path of a KSM file as a string (what :meth:`counters` takes in ``known``)."""
        return self._prefix + name

    def preflight(self, need_write: bool = True) -> None:
        """Clear errors before the first tick: no KSM -> 69, not root -> 77."""
        run = self.path("run")
        if not self.root.is_dir() or not run.exists():
            raise KsmUnavailableError(
                f"{self.root}: no such directory: this kernel has no KSM (CONFIG_KSM)", str(self.root),
                errno.ENOENT,
            )
        if need_write:
            try:
                fd = os.open(run, os.O_WRONLY)
            except OSError as e:
                raise _wrap(e, run, "open for writing") from None
            os.close(fd)

    def has(self, name: str) -> bool:
        try:
            return self.path(name).exists()
        except OSError as e:  # EACCES on a directory above: one line (exit 77), not a traceback
            raise _wrap(e, self.path(name), "look up") from None

    def read(self, name: str) -> str:
        """A knob's current value; for advisor_mode, the selected word of '[none] scan-time'."""
        path = self._prefix + name
        try:
            text = self._read(path)
        except OSError as e:
            raise _wrap(e, path, "read") from None
        return _selected(text)

    def read_int(self, name: str) -> int:
        """A counter as an integer (``ksmctl stop --unmerge`` follows pages_sharing with it)."""
        text = self.read(name)
        try:
            return int(text)
        except ValueError:
            raise KernelInterfaceError(f"{self.path(name)}: expected an integer, got {text!r}",
                                       str(self.path(name))) from None

    def write(self, name: str, value: str) -> None:
        path = self._prefix + name
        try:
            # O_TRUNC as the shell's `>`: harmless on sysfs, and in a regular-file stand-in
            # (--sysfs DIR) "300" over "1250" must not leave "3000".
            # O_NONBLOCK: opening a FIFO for writing would otherwise wait for a reader forever.
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise _wrap(e, path, f"write {value}") from None
        try:
            os.write(fd, value.encode())
        except OSError as e:
            raise _wrap(e, path, f"write {value}") from None
        finally:
            os.close(fd)

    def write_if_changed(self, name: str, value: str) -> Write | None:
        try:
            old = self.read(name)
        except KernelInterfaceError:
            old = None
        if old == value:
            return None
        self.write(name, value)
        return Write(name, old, value)

    def advisor_scanning(self) -> bool:
        """True while the kernel's own scan-rate advisor owns pages_to_scan (kernel >= 6.8)."""
        if not self.has("advisor_mode"):
            return False
        try:
            return self.read("advisor_mode") == "scan-time"
        except KernelInterfaceError:
            return False

    def counters(self) -> dict[str, int | str]:
        """Every counter and knob the kernel offers, as ints where they are numbers
        (advisor_mode: its selected word).

        Read every tick (the engine's collect stage, for the state file and metrics): only the
        files found present last time are read (all are probed again after a failure).
        """
        out: dict[str, int | str] = {}
        failed = False
        prefix = self._prefix
        for name in self._present if self._present is not None else COUNTERS + KNOBS:
            try:
                text = _selected(self._read(prefix + name))
            except OSError:
                failed = True
                continue
            try:
                out[name] = int(text)
            except ValueError:
                out[name] = text
        self._present = None if failed and self._present is not None else tuple(out)
        return out
