"""Small kernel files (/proc, /sys) read with bare system calls: open, read, close.

Python's ``open()`` costs about nine system calls per file (two fstat, an isatty ioctl, two
lseek, two reads, close) and a buffered reader object; each tick reads a dozen or more small
files (meminfo, loadavg, each new process's stat and cmdline, each guest's statm and ksm_stat,
ksmd's stat, the KSM counters), so the per-tick readers use these instead: three system calls.
"""

from __future__ import annotations

import os

#: The first read's size: larger than any small kernel file read per tick (meminfo ~1.5 KiB).
CHUNK = 16384


def read_record(path: str | os.PathLike) -> bytes:
    """A file the kernel renders whole on the first read: /proc files of one record (stat,
    statm, status, loadavg, uptime, meminfo, ksm_stat, smaps_rollup; seq_file's single_open)
    and regular files.  One read, unless it filled the buffer: then on to the end of file.

    Raises OSError as ``open()`` and ``read()`` do (FileNotFoundError, ProcessLookupError for
    a process that exited, IsADirectoryError, ...).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, CHUNK)
        return data if len(data) < CHUNK else _to_eof(fd, data)
    finally:
        os.close(fd)


def read_bytes(path: str | os.PathLike, limit: int | None = None, nonblock: bool = False) -> bytes:
    """Any file's content, read to the end of file (a short read does not mean the end: seq_file
    hands out about a page per read of a file of many records, /proc/PID/cmdline what it
    could copy); or with ``limit``, what one read of at most ``limit`` bytes returns (a sysfs
    attribute, the head of a file).

    ``nonblock`` opens with O_NONBLOCK: a FIFO planted in a stand-in directory then fails or
    reads empty instead of hanging the loop.  Raises OSError as :func:`read_record`.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_NONBLOCK if nonblock else 0))
    try:
        if limit is not None:
            return os.read(fd, limit)
        data = os.read(fd, CHUNK)
        return _to_eof(fd, data) if data else data
    finally:
        os.close(fd)


def _to_eof(fd: int, data: bytes) -> bytes:
    chunks = [data]
    while True:
        more = os.read(fd, CHUNK)
        if not more:
            return b"".join(chunks)
        chunks.append(more)


def on_kernel_fs(directory: str | os.PathLike) -> bool:
    """Is ``directory`` on this system's /proc or /sys (the same device), not a stand-in?"""
    try:
        dev = os.stat(directory).st_dev
        return dev in (os.stat("/proc").st_dev, os.stat("/sys").st_dev)
    except OSError:
        return False


class OpenFiles:
    """Kernel files kept open and read again from offset 0: one ``pread`` per read instead of
    open, read and close (the open's path walk is most of the cost).

    procfs and sysfs render a file anew on each read that starts at offset 0, so a descriptor
    kept open reads the current value; a /proc/PID file stays bound to its process, and reads
    ESRCH once that process is gone (a reused pid is never read through it).  Only for a root
    on the kernel's own /proc or /sys (``on_kernel_fs``): a stand-in directory's file may be
    replaced by a rename, which an open descriptor would never see, so there every read opens
    the file.  At most ``limit`` descriptors; past that, files are opened per read.
    """

    def __init__(self, root: str | os.PathLike, limit: int = 256):
        self.enabled = on_kernel_fs(root)
        self.limit = limit
        self._fds: dict[str, int] = {}

    def read(self, path: str) -> bytes:
        """The file's content (as :func:`read_record`).  Raises OSError; a descriptor whose read
        failed is closed, so the next read opens the file again."""
        fd = self._fds.get(path)
        if fd is None:
            if not self.enabled or len(self._fds) >= self.limit:
                return read_record(path)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self._fds[path] = fd
        try:
            data = os.pread(fd, CHUNK, 0)
            if len(data) == CHUNK:
                chunks = [data]
                while more := os.pread(fd, CHUNK, CHUNK * len(chunks)):
                    chunks.append(more)
                data = b"".join(chunks)
            return data
        except OSError:
            self.close(path)
            raise

    def close(self, path: str) -> None:
        fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)

    def close_under(self, prefix: str) -> None:
        """Close every file whose path starts with ``prefix`` (a process's /proc/PID/)."""
        for path in [p for p in self._fds if p.startswith(prefix)]:
            self.close(path)

    def close_all(self) -> None:
        for path in list(self._fds):
            self.close(path)

    def __len__(self) -> int:
        return len(self._fds)
