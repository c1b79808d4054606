"""``ksmtuned retune``: SIGUSR1 to the verified running daemon (what the libvirt hook runs)."""

from __future__ import annotations

import os
import signal
import sys

from ..core.text import printable
from ..errors import ExitCode, NotRunningError
from ..paths import Paths
from ..service.config_file import pidfile_in_force
from ..service.pidfile import running_daemon


def main(paths: Paths, quiet: bool = False) -> int:
    path = pidfile_in_force(paths)
    try:
        pid = running_daemon(path, paths.procfs)
    except NotRunningError as e:
        if quiet:
            return ExitCode.OK
        print(f"ksmtuned: {printable(e)}", file=sys.stderr)  # names the process's comm, anyone's choice
        return e.exit_code
    try:
        os.kill(pid, signal.SIGUSR1)
    except PermissionError:
        # the daemon runs as root; --quiet does not hide this: a hook that cannot retune must say so
        print(f"ksmtuned: cannot signal the daemon (pid {pid}, from {path}): permission denied; "
              "run as root", file=sys.stderr)
        return ExitCode.NO_PERMISSION
    return ExitCode.OK
