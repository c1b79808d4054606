"""``ksmctl start|stop``: what ksm.service runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from ..core.config import parse_assignments
from ..errors import ConfigError, ExitCode, KsmtunedError
from ..kernel.ksm import KsmSysfs
from ..kernel.meminfo import read_meminfo, total_kib


def read_default_ksm(path: Path) -> Optional[Dict[str, str]]:
    """KEY=VALUE pairs of /etc/default/ksm (or /etc/sysconfig/ksm), parsed (never sourced) like
    ksmtuned.conf; None when the file does not exist."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise KsmtunedError(f"{path}: cannot read: {e.strerror}") from None
    return {a.key: a.value for a in parse_assignments(text, str(path))}


def first_defaults(paths: Sequence[str]) -> Tuple[str, Dict[str, str]]:
    """(the file, its values) of the first of ``paths`` that exists: Debian keeps
    KSM_MAX_KERNEL_PAGES in /etc/default/ksm, Red Hat in /etc/sysconfig/ksm.  ("", {}) if none."""
    for path in paths:
        values = read_default_ksm(Path(path))
        if values is not None:
            return str(path), values
    return "", {}


def main(action: str, sysfs: str, procfs: str, defaults: Sequence[str]) -> int:
    """start: max_kernel_pages (only on kernels that have it), then run=1.  stop: run=0.

    ``defaults``: the files that may hold KSM_MAX_KERNEL_PAGES, the first existing one read
    (the environment, e.g. the unit's EnvironmentFile=, comes before any of them)."""
    ksm = KsmSysfs(Path(sysfs))
    ksm.preflight()
    if action == "stop":
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
