"""Shared helpers of the short commands, and ksmctl.  Each command returns an exit code."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ExitCode, KsmtunedError


def paths(args):
    from .cli import DEFAULT_PROCFS, DEFAULT_SYSFS, _opt

    return Path(_opt(args, "sysfs", DEFAULT_SYSFS)), Path(_opt(args, "procfs", DEFAULT_PROCFS))


def read_default_ksm(path: Path) -> dict[str, str]:
    """KEY=VALUE pairs of /etc/default/ksm, parsed (never sourced) like ksmtuned.conf."""
    from .config import parse_assignments

    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise KsmtunedError(f"{path}: cannot read: {e.strerror}") from None
    return {a.key: a.value for a in parse_assignments(text, str(path))}


def ksmctl(args) -> int:
    """start: max_kernel_pages (only on kernels that have it), then run=1.  stop: run=0."""
    from .errors import ConfigError
    from .ksm import KsmSysfs
    from .meminfo import read_meminfo, total_kib

    sysfs = KsmSysfs(Path(args.sysfs))
    sysfs.preflight()
    if args.action == "stop":
        sysfs.write("run", "0")
        return ExitCode.OK
    if sysfs.has("max_kernel_pages"):
        values = read_default_ksm(Path(args.defaults))
        text = os.environ.get("KSM_MAX_KERNEL_PAGES") or values.get("KSM_MAX_KERNEL_PAGES", "")
        if text:
            if not text.isdigit():
                raise ConfigError(f"{args.defaults}: KSM_MAX_KERNEL_PAGES: expected an integer, got {text!r}")
            pages = int(text)
        else:
            procfs = Path(args.procfs)
            pages = total_kib(read_meminfo(procfs / "meminfo")) // 4 // 2  # half of RAM, in 4 KiB pages
        sysfs.write("max_kernel_pages", str(pages))
    sysfs.write("run", "1")
    return ExitCode.OK
