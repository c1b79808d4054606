"""``ksmctl start|stop [--unmerge]``: what ksm.service runs, and unmerging on request."""

from __future__ import annotations

import mmap
import os
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, TextIO, Tuple

from ..core.config import parse_assignments
from ..errors import ConfigError, ExitCode, KsmtunedError
from ..files import CONFIG_LIMIT_BYTES, read_regular
from ..kernel.ksm import KsmSysfs
from ..kernel.meminfo import read_meminfo, require, total_kib


def read_default_ksm(path: Path) -> Optional[Dict[str, str]]:
    """KEY=VALUE pairs of /etc/default/ksm (or /etc/sysconfig/ksm), parsed (never sourced) like
    ksmtuned.conf; None when the file does not exist."""
    try:
        data = read_regular(path, CONFIG_LIMIT_BYTES, follow=True)  # a FIFO or /dev/zero: refused
    except FileNotFoundError:
        return None
    except OSError as e:
        raise KsmtunedError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8 text") from None
    return {a.key: a.value for a in parse_assignments(text, str(path))}


def unmerge_bytes(pages_sharing: int, ksm_zero_pages: int, page_size: int) -> int:
    """Memory that unmerging takes back: every page that shares a KSM page (pages_sharing, "how
    much saved" in the kernel's admin guide) and every zero page KSM mapped (ksm_zero_pages, with
    use_zero_pages) gets its own copy again."""
    return (pages_sharing + ksm_zero_pages) * page_size


def unmerge_warning(needed_bytes: int, available_kib: int) -> Optional[str]:
    """The warning to give before unmerging, or None when MemAvailable holds the copies."""
    if needed_bytes <= available_kib * 1024:
        return None
    return (f"unmerging needs {_size(needed_bytes)} for the pages KSM merged, but MemAvailable is only "
            f"{_size(available_kib * 1024)}: the host may swap, or the OOM killer may end a guest")


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def unmerge(ksm: KsmSysfs, procfs: Path, out: TextIO, page_size: int = mmap.PAGESIZE,
            interval_s: float = 0.5) -> int:
    """Write run=2 (stop ksmd and unmerge every merged page; the write returns when the kernel is
    done) and show pages_sharing/pages_shared falling meanwhile: a line updated in place on a
    terminal, else one line before and one after.  Warns first when MemAvailable looks short."""
    sharing, shared = ksm.read_int("pages_sharing"), ksm.read_int("pages_shared")
    zero = ksm.read_int("ksm_zero_pages") if ksm.has("ksm_zero_pages") else 0
    needed = unmerge_bytes(sharing, zero, page_size)
    meminfo = str(procfs / "meminfo")
    fields = read_meminfo(meminfo)
    if "MemAvailable" in fields:
        available_kib = fields["MemAvailable"]
    else:  # kernels before 3.14: what the kernel's own estimate started from
        available_kib = sum(require(fields, name, meminfo) for name in ("MemFree", "Buffers", "Cached"))
    warning = unmerge_warning(needed, available_kib)
    if warning:
        print(f"ksmctl: warning: {warning}", file=out, flush=True)
    tty = out.isatty()
    print(f"ksmctl: unmerging: pages_sharing {sharing}, pages_shared {shared} ({_size(needed)} to copy back)",
          file=out, flush=True)
    failure: list[BaseException] = []

    def write() -> None:
        try:
            ksm.write("run", "2")
        except BaseException as e:  # handed to the main thread, raised there
            failure.append(e)

    started = time.monotonic()
    writer = threading.Thread(target=write, name="ksmctl-unmerge", daemon=True)
    writer.start()
    while writer.is_alive():
        writer.join(interval_s)
        if tty and writer.is_alive():
            now_sharing = ksm.read_int("pages_sharing")
            done = 100 * (sharing - now_sharing) // sharing if sharing else 100
            print(f"\rksmctl: unmerging: pages_sharing {now_sharing}, pages_shared "
                  f"{ksm.read_int('pages_shared')} ({done}% done)\033[K", end="", file=out, flush=True)
    if tty:
        print("\r\033[K", end="", file=out, flush=True)
    if failure:
        raise failure[0]
    print(f"ksmctl: unmerged in {time.monotonic() - started:.1f} s: pages_sharing {ksm.read_int('pages_sharing')}, "
          f"pages_shared {ksm.read_int('pages_shared')}, run={ksm.read('run')}", file=out, flush=True)
    return ExitCode.OK


def first_defaults(paths: Sequence[str]) -> Tuple[str, Dict[str, str]]:
    """(the file, its values) of the first of ``paths`` that exists: Debian keeps
    KSM_MAX_KERNEL_PAGES in /etc/default/ksm, Red Hat in /etc/sysconfig/ksm.  ("", {}) if none."""
    for path in paths:
        values = read_default_ksm(Path(path))
        if values is not None:
            return str(path), values
    return "", {}


def main(action: str, sysfs: str, procfs: str, defaults: Sequence[str], unmerge_pages: bool = False) -> int:
    """start: max_kernel_pages (only on kernels that have it), then run=1.  stop: run=0 (merged
    pages stay merged); with unmerge_pages, run=2 (see :func:`unmerge`).

    ``defaults``: the files that may hold KSM_MAX_KERNEL_PAGES, the first existing one read
    (the environment, e.g. the unit's EnvironmentFile=, comes before any of them)."""
    ksm = KsmSysfs(Path(sysfs))
    ksm.preflight()
    if action == "stop":
        if unmerge_pages:
            return unmerge(ksm, Path(procfs), out=sys.stderr)
        ksm.write("run", "0")
        return ExitCode.OK
    if ksm.has("max_kernel_pages"):
        source, values = first_defaults(defaults)
        text = os.environ.get("KSM_MAX_KERNEL_PAGES")
        if text:
            source = "environment"
        else:
            text = values.get("KSM_MAX_KERNEL_PAGES", "")
        if text:
            if not text.isdigit():
                raise ConfigError(f"{source}: KSM_MAX_KERNEL_PAGES: expected an integer, got {text!r}")
            pages = int(text)
        else:
            pages = total_kib(read_meminfo(Path(procfs) / "meminfo")) // 4 // 2  # half of RAM, in 4 KiB pages
        ksm.write("max_kernel_pages", str(pages))
    ksm.write("run", "1")
    return ExitCode.OK
