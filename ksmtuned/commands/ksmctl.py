"""``ksmctl start|stop``: what ksm.service runs."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.config import parse_assignments
from ..errors import ConfigError, ExitCode, KsmtunedError
from ..files import CONFIG_LIMIT_BYTES, read_regular
from ..kernel.ksm import KsmSysfs
from ..kernel.meminfo import read_meminfo, total_kib


def read_default_ksm(path: Path) -> dict[str, str]:
    """KEY=VALUE pairs of /etc/default/ksm, parsed (never sourced) like ksmtuned.conf."""
    try:
        data = read_regular(path, CONFIG_LIMIT_BYTES, follow=True)  # a FIFO or /dev/zero: refused
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise KsmtunedError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8 text") from None
    return {a.key: a.value for a in parse_assignments(text, str(path))}


def main(action: str, sysfs: str, procfs: str, defaults: str) -> int:
    """start: max_kernel_pages (only on kernels that have it), then run=1.  stop: run=0."""
    ksm = KsmSysfs(Path(sysfs))
    ksm.preflight()
    if action == "stop":
        ksm.write("run", "0")
        return ExitCode.OK
    if ksm.has("max_kernel_pages"):
        values = read_default_ksm(Path(defaults))
        text = os.environ.get("KSM_MAX_KERNEL_PAGES") or values.get("KSM_MAX_KERNEL_PAGES", "")
        if text:
            if not text.isdigit():
                raise ConfigError(f"{defaults}: KSM_MAX_KERNEL_PAGES: expected an integer, got {text!r}")
            pages = int(text)
        else:
            pages = total_kib(read_meminfo(Path(procfs) / "meminfo")) // 4 // 2  # half of RAM, in 4 KiB pages
        ksm.write("max_kernel_pages", str(pages))
    ksm.write("run", "1")
    return ExitCode.OK
