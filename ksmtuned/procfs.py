"""Small kernel files (/proc, /sys) read with bare system calls: open, read, close.

Python's ``open()`` costs about nine system calls per file (two fstat, an isatty ioctl, two
lseek, two reads, close) and a buffered reader object; each tick reads a dozen or more small
files (meminfo, loadavg, uptime, each new process's stat and cmdline, each guest's ksm_stat,
ksmd's stat), so the per-tick readers use :func:`read_bytes` instead: four system calls.
"""

from __future__ import annotations

import os

#: The first read's size: larger than any small kernel file read per tick (meminfo ~1.5 KiB).
CHUNK = 16384


def read_bytes(path: str | os.PathLike, limit: int | None = None, nonblock: bool = False) -> bytes:
    """The file's content, read to the end of file; or with ``limit``, what one read of at most
    ``limit`` bytes returns (a sysfs attribute, a head of a file).

    ``nonblock`` opens with O_NONBLOCK: a FIFO planted in a stand-in directory then fails or
    reads empty instead of hanging the loop.  Raises OSError as ``open()`` and ``read()`` do
    (FileNotFoundError, ProcessLookupError for a process that exited, IsADirectoryError, ...).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_NONBLOCK if nonblock else 0))
    try:
        if limit is not None:
            return os.read(fd, limit)
        data = os.read(fd, CHUNK)
        if not data:
            return data
        # Read on to EOF: a short read does not mean the end (seq_file hands out at most about
        # a page per read of a file of many records).
        chunks = [data]
        while True:
            more = os.read(fd, CHUNK)
            if not more:
                return b"".join(chunks) if len(chunks) > 1 else data
            chunks.append(more)
    finally:
        os.close(fd)
