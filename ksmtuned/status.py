"""`ksmtuned status`: the daemon's last decision and what KSM is doing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import ExitCode
from .commands import paths as _paths


def cmd_status(args) -> int:
    from .ksm import KsmSysfs
    from .pidfile import running_daemon
    from .cli import pidfile_path
    from .errors import NotRunningError

    sysfs_root, procfs = _paths(args)
    try:
        pid = running_daemon(pidfile_path(args), procfs)
    except NotRunningError:
        pid = None
    counters = KsmSysfs(sysfs_root).counters()
    if getattr(args, "json", False):
        print(json.dumps({"daemon": {"running": pid is not None, "pid": pid}, "ksm": counters}, indent=2))
    else:
        print(f"daemon: {'running, pid %d' % pid if pid else 'not running'}")
        for k, v in counters.items():
            print(f"{k:<28} {v}")
    return ExitCode.OK
