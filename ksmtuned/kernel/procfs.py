"""Small kernel files (/proc, /sys) read with bare system calls: open, read, close.

For the files psutil does not read (meminfo, ksmd's stat, the KSM sysfs attributes): one
read of a file the kernel renders whole, without a buffered reader object.
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
