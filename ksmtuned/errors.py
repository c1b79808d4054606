"""The one exception taxonomy and the exit codes that are ksmtuned's API.

Every error a user can meet derives from :class:`KsmtunedError` and carries the
exit code the CLI turns it into.  Only ``cli`` exits; everything else raises.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Documented in README.md ("Exit codes"); used by ksmtuned.service's RestartPreventExitStatus."""

    OK = 0
    SOFTWARE = 1  # an unexpected failure (a bug, a crash); `--once` when the adjust failed
    USAGE = 2  # bad command line
    NOT_RUNNING = 3  # `retune`: no verified ksmtuned daemon runs (`status` still exits 0 and says so)
    ALREADY_RUNNING = 4  # another ksmtuned holds the pid file lock
    CHECK_FAILED = 5  # `check` ran and a host check failed (a crash of `check` is 1)
    DATA = 65  # EX_DATAERR: `status`: the state file is not a ksmtuned state file (truncated, planted, foreign)
    UNAVAILABLE = 69  # EX_UNAVAILABLE: this kernel has no KSM
    NO_PERMISSION = 77  # EX_NOPERM: must run as root
    CONFIG = 78  # EX_CONFIG: the configuration is invalid or unsafe


class KsmtunedError(Exception):
    """Base of every error ksmtuned reports to a user."""

    exit_code: ExitCode = ExitCode.SOFTWARE


class ConfigError(KsmtunedError):
    """The config file (or environment) is invalid; the message names file:line."""

    exit_code = ExitCode.CONFIG


class KernelInterfaceError(KsmtunedError):
    """An I/O failure on a kernel file (/proc or /sys), naming the path and the errno."""

    def __init__(self, message: str, path: str | None = None, errno: int | None = None):
        super().__init__(message)
        self.path = path
        self.errno = errno


class MeminfoError(KernelInterfaceError):
    """/proc/meminfo is missing, unreadable or holds impossible data."""


class KsmUnavailableError(KernelInterfaceError):
    exit_code = ExitCode.UNAVAILABLE


class KsmPermissionError(KernelInterfaceError):
    exit_code = ExitCode.NO_PERMISSION


class StateFileError(KsmtunedError):
    """The state file exists but is not one ksmtuned wrote: not a regular file, too large, not
    JSON, or not the documented layout.  The message is one line naming the file."""

    exit_code = ExitCode.DATA


class NotRunningError(KsmtunedError):
    exit_code = ExitCode.NOT_RUNNING


class AlreadyRunningError(KsmtunedError):
    exit_code = ExitCode.ALREADY_RUNNING
