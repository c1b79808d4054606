"""The old daemon's debug log, and logging setup.

With DEBUG on, each line is ``date``'s output (C locale), ": ", then the text, appended to
LOGFILE when set, else written to standard output.  The file is reopened when logrotate moves
or removes it, never followed through a symlink, and a full disk never stops the loop.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
import time
from typing import Callable, Mapping, TextIO

from ..paths import KERNEL_DIRS

log = logging.getLogger(__name__)

#: What `date` prints in the C locale, e.g. "Sun Nov 29 05:09:43 UTC 2026" (day space-padded).
DATE_FORMAT = "%a %b %e %H:%M:%S %Z %Y"


def date_prefix(now_s: float) -> str:
    return time.strftime(DATE_FORMAT, time.localtime(now_s))


def format_lines(lines: list[str], now_s: float) -> str:
    prefix = date_prefix(now_s)
    return "".join(f"{prefix}: {line}\n" for line in lines)


class DebugLog:
    """Appends old-format debug lines to a file (reopened on rotation) or to a stream."""

    def __init__(self, path: str | None, enabled: bool, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.time):
        self.path = path
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout  # None when started with fd 1 closed
        # debug lines on standard output that is the journal: at debug priority, not info
        self._line_prefix = "<7>" if not path and is_journal(self.stream) else ""
        self.clock = clock
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None
        self._failing = False

    def write(self, lines: list[str]) -> None:
        if not self.enabled or not lines:
            return
        data = format_lines(lines, self.clock())
        if not self.path:
            if self._line_prefix:
                data = "".join(self._line_prefix + line + "\n" for line in data.splitlines())
            try:
                self.stream.write(data)
                self.stream.flush()
            except Exception as e:  # noqa: BLE001 - a closed stdout (None, EBADF, EPIPE) must not stop adjusting
                if not self._failing:
                    log.warning("cannot write the debug log to standard output: %s (debug lines are dropped "
                                "until it works again; set LOGFILE)", getattr(e, "strerror", None) or e)
                self._failing = True
                return
            if self._failing:
                log.info("debug log to standard output works again")
                self._failing = False
            return
        try:
            fd = self._file()
            os.write(fd, data.encode())
        except OSError as e:
            self._close()
            if not self._failing:
                log.warning("cannot write debug log %s: %s (will retry each tick)", self.path,
                            e.strerror or e)
            self._failing = True
            return
        if self._failing:
            log.info("debug log %s writable again", self.path)
            self._failing = False

    def _file(self) -> int:
        if self._fd is not None:
            try:
                st = os.stat(self.path)  # type: ignore[arg-type]
                if (st.st_dev, st.st_ino) == self._ident:
                    return self._fd
            except FileNotFoundError:
                pass
            self._close()  # rotated or removed: reopen
        fd = open_private_append(self.path)  # type: ignore[arg-type]
        st = os.fstat(fd)
        self._fd, self._ident = fd, (st.st_dev, st.st_ino)
        return fd

    def _close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = self._ident = None

    def close(self) -> None:
        self._close()


def open_private_append(path: str, mode: int = 0o644) -> int:
    """Open a log file for appending without following a planted symlink or hard link.

    O_NOFOLLOW refuses a symlink; a regular file must be owned by us and have one link.
    """
    real_dir = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    if any(real_dir == d or real_dir.startswith(d + "/") for d in KERNEL_DIRS):
        # a directory linked into /proc or /sys: appending there would write kernel tunables
        raise OSError(errno.EPERM, f"refusing {path}: it is in {real_dir}, under /proc or /sys")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                 mode)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        os.close(fd)
        raise OSError(errno.EPERM, f"refusing {path}: not a regular file owned by us with a single link")
    return fd


def is_journal(stream: TextIO, env: Mapping[str, str] = os.environ) -> bool:
    """Whether the stream is the journal: systemd sets JOURNAL_STREAM to "DEVICE:INODE" (decimal)
    of the socket it connects a service's stdout/stderr to (systemd.exec(5)).  Comparing with
    the stream's own fstat keeps a child that inherited the variable, but writes elsewhere (a
    hook's `ksmtuned retune` run by libvirtd, a terminal), from getting the prefixes."""
    dev, _, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or not a file (pytest's capture)
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


#: sd-daemon(3)'s "<N>" prefixes: the journal stores each line at that syslog priority.
SYSLOG_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def syslog_priority(levelno: int) -> int:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return SYSLOG_PRIORITY[level]
    return SYSLOG_PRIORITY[logging.DEBUG]


class JournalFormatter(logging.Formatter):
    """Each line of a record (a traceback's too: the journal splits at newlines) gets the
    record's "<N>" prefix, so `journalctl -p err` shows the whole error."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def setup_logging(verbose: bool = False) -> None:
    """State changes at INFO to standard error (the journal adds time and unit; when standard
    error is the journal, each line carries its syslog priority)."""
    handler = logging.StreamHandler(sys.stderr)
    journal = is_journal(sys.stderr)
    handler.setFormatter((JournalFormatter if journal else logging.Formatter)("%(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Records carry only level and message: skip what the format never shows (the logging
    # HOWTO's "Optimization": the caller's file and line is a walk up the stack per record).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
