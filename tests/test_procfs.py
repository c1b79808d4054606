"""The bare-syscall readers of small kernel files: the same bytes and errors as open().read()."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from ksmtuned.procfs import CHUNK, read_bytes, read_record


def _python_read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("name", ["stat", "statm", "status", "cmdline"])
def test_a_process_file_reads_as_open_reads_it(name):
    # a process asleep in read(): its files do not change between the two reads
    p = subprocess.Popen([sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()",
                          "x" * 5000], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ready\n"
        path = f"/proc/{p.pid}/{name}"
        reader = read_bytes if name == "cmdline" else read_record
        for _ in range(100):  # until the file held still around our read (the child may still run)
            before, got, after = _python_read(path), reader(path), _python_read(path)
            if before == after:
                break
        assert got == before == after
    finally:
        p.communicate(b"")


def test_a_file_of_many_records_is_read_to_its_end():
    """seq_file gives a file of many records about a page per read: a short read is no EOF."""
    path = f"/proc/{os.getpid()}/smaps"  # one record per mapping, many pages long
    data = read_bytes(path)
    assert len(data) > 2 * 4096
    assert data.count(b"\nRss:") == _python_read(path).count(b"\nRss:")


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7])
def test_regular_files_of_any_size(tmp_path, size):
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    assert read_record(path) == read_bytes(path) == path.read_bytes()
    assert read_bytes(path, limit=10) == path.read_bytes()[:10]


@pytest.mark.parametrize("reader", [read_record, read_bytes])
def test_errors_are_those_of_open(tmp_path, reader):
    with pytest.raises(FileNotFoundError):
        reader(tmp_path / "missing")
    with pytest.raises(IsADirectoryError) as e:
        reader(tmp_path)
    assert e.value.errno == errno.EISDIR


def test_nonblock_does_not_hang_on_a_fifo(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert read_bytes(fifo, limit=4096, nonblock=True) == b""  # no writer: empty, at once


def test_no_descriptor_is_left_open(tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        read_record("/proc/self/stat")
        read_bytes("/proc/self/cmdline")
        with pytest.raises(OSError):
            read_record(tmp_path)
    assert len(os.listdir("/proc/self/fd")) == before
