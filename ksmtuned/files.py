"""The one bounded reader for every file a command or the daemon reads that is not a kernel
file: the config, the pid file, the state file, /etc/default/ksm, and the hypervisors' pid
files under /run/libvirt/qemu and /run/qemu-server.

A FIFO there would hang the reader (and a daemon stuck in read() on SIGHUP no longer sees
SIGTERM); ``/dev/zero`` would grow it without limit; a symlink planted in a shared directory
would make root read a file of the planter's choosing.  So the file is opened once with
O_NONBLOCK (opening a FIFO does not wait for a writer), O_NOFOLLOW and O_CLOEXEC, must be a
regular file by ``fstat`` of that descriptor, and is read from that descriptor with a size
limit.  Errors are OSError with a message that names what was wrong, so every caller's existing
``cannot read PATH: {e.strerror}`` line stays one line.

The lowest layer, with ``errors`` and ``paths``: every layer reads its files through it (the
report layer its state file, which it may not reach through ``kernel``).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

#: The config file and /etc/default/ksm: a real ksmtuned.conf is about 2 KiB.
CONFIG_LIMIT_BYTES = 1 << 20
#: A pid file holds one number.
PIDFILE_LIMIT_BYTES = 64
#: The state file: 300 ticks of history and a few hundred guests are well under 1 MiB.
STATE_LIMIT_BYTES = 16 << 20

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"))


def kind_of(mode: int) -> str:
    """'a FIFO', 'a directory', ... for a non-regular file's st_mode."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


class NotRegularFileError(OSError):
    """The path names something other than a regular file (or a symbolic link, refused)."""


class FileTooLargeError(OSError):
    """The file is larger than the reader's limit."""


def open_regular(path: str | os.PathLike[str], follow: bool = False,
                 dir_fd: int | None = None) -> tuple[int, os.stat_result]:
    """(descriptor, fstat) of a regular file opened read-only, non-blocking, close-on-exec.

    Without ``follow`` a symbolic link is refused (NotRegularFileError, errno ELOOP).  Raises
    OSError as os.open does (FileNotFoundError, PermissionError, ...) and NotRegularFileError
    (errno EINVAL) for a FIFO, device, socket or directory.  The caller closes the descriptor.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotRegularFileError(errno.ELOOP, "a symbolic link (refused: it is not followed)",
                                      os.fspath(path)) from None
        if e.errno == errno.ENXIO:  # a UNIX socket
            raise NotRegularFileError(errno.EINVAL, "a socket, not a regular file", os.fspath(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(errno.EINVAL, f"{kind_of(st.st_mode)}, not a regular file", os.fspath(path))
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_fd(fd: int, limit_bytes: int, path: str | os.PathLike[str] = "") -> bytes:
    """At most ``limit_bytes`` from the descriptor's current offset to the end of file;
    FileTooLargeError (errno EFBIG) if there is more."""
    chunks = []
    left = limit_bytes + 1
    while left > 0:
        data = os.read(fd, min(left, 65536))
        if not data:
            break
        chunks.append(data)
        left -= len(data)
    out = b"".join(chunks)
    if len(out) > limit_bytes:
        raise FileTooLargeError(errno.EFBIG, f"larger than the limit of {_size(limit_bytes)}", os.fspath(path))
    return out


def read_regular(path: str | os.PathLike[str], limit_bytes: int, follow: bool = False,
                 check: Callable[[os.stat_result], None] | None = None) -> bytes:
    """The content of a regular file, read through one descriptor, at most ``limit_bytes``.

    ``check(fstat)`` runs on the open file before anything is read (an owner or mode check that
    cannot be raced: it sees the file that is then read).  Raises OSError (see open_regular and
    read_fd); the message (``strerror``) says what was wrong, e.g. "a FIFO, not a regular file".
    """
    fd, st = open_regular(path, follow=follow)
    try:
        if check is not None:
            check(st)
        return read_fd(fd, limit_bytes, path)
    finally:
        os.close(fd)


def _size(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10} KiB"
    return f"{n} bytes"


def parse_pid(data: bytes) -> int | None:
    """The pid of a pid file's content: ASCII digits without a leading zero, optionally
    surrounded by whitespace, at most PID_MAX_LIMIT.

    Not int() of a str: it takes '١٢٣' (Arabic-Indic digits, read as 123) and '+1_2' as numbers,
    and str.isdigit() takes '²', which int() then refuses with a traceback.
    """
    text = data.strip(b" \t\r\n")
    if not text or len(text) > 10 or not all(0x30 <= c <= 0x39 for c in text) or text[:1] == b"0":
        return None
    pid = int(text)
    return pid if pid <= 2**22 else None  # PID_MAX_LIMIT: 4194304


def read_pid_file(path: str | os.PathLike[str]) -> int | None:
    """The pid a pid file names, or None when it is missing, not a regular file, too large or
    holds anything but a pid (see parse_pid).  Never blocks, never follows a symlink."""
    try:
        return parse_pid(read_regular(path, PIDFILE_LIMIT_BYTES))
    except OSError:
        return None
