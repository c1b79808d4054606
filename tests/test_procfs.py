"""The bare-syscall readers of small kernel files: the same bytes and errors as open().read()."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from ksmtuned.kernel.procfs import CHUNK, OpenFiles, on_kernel_fs, read_bytes, read_record


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


# --- OpenFiles: kernel files kept open, read again from offset 0 ------------------------------

GROWER = ("import sys\nblocks = []\nprint('ready', flush=True)\n"
          "for line in sys.stdin:\n    blocks.append(bytearray(b'x') * (64 << 20))\n    print('grown', flush=True)\n")


def _rss_pages(data: bytes) -> int:
    return int(data.split()[1])


def test_a_kept_process_file_reads_the_current_value_and_esrch_once_it_is_gone():
    p = subprocess.Popen([sys.executable, "-c", GROWER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    files = OpenFiles("/proc")
    try:
        assert files.enabled and p.stdout.readline() == "ready\n"
        path = f"/proc/{p.pid}/statm"
        before = _rss_pages(files.read(path))
        fds = len(os.listdir("/proc/self/fd"))
        p.stdin.write("grow\n")
        p.stdin.flush()
        assert p.stdout.readline() == "grown\n"
        after = _rss_pages(files.read(path))
        assert after >= before + (60 << 20) // os.sysconf("SC_PAGE_SIZE"), (before, after)
        assert len(files) == 1 and len(os.listdir("/proc/self/fd")) == fds  # one descriptor, kept
    finally:
        p.kill()
        p.wait()
    with pytest.raises(ProcessLookupError):
        files.read(path)  # bound to the process that is gone, never to a new one with its pid
    assert len(files) == 0


def test_in_a_stand_in_directory_every_read_opens_the_file(tmp_path):
    """A test's stand-in file may be replaced by a rename, which a kept descriptor would miss."""
    files = OpenFiles(tmp_path)
    assert not files.enabled and not on_kernel_fs(tmp_path)
    f = tmp_path / "meminfo"
    f.write_text("MemTotal: 1 kB\n")
    assert files.read(str(f)) == b"MemTotal: 1 kB\n"
    (tmp_path / "new").write_text("MemTotal: 2 kB\n")
    (tmp_path / "new").rename(f)
    assert files.read(str(f)) == b"MemTotal: 2 kB\n" and len(files) == 0


def test_past_the_limit_files_are_read_without_being_kept():
    files = OpenFiles("/proc", limit=1)
    assert files.read("/proc/meminfo").startswith(b"MemTotal:")
    assert files.read("/proc/loadavg").count(b" ") == 4
    assert len(files) == 1
    files.close_under("/proc/")
    assert len(files) == 0


def test_a_kept_sysfs_file_reads_what_was_written_through_another_descriptor(real_ksm):
    files = OpenFiles(real_ksm)
    assert files.enabled
    path = f"{real_ksm}/pages_to_scan"
    for value in ("123", "4567", "89"):
        with open(path, "w") as f:
            f.write(value)
        assert files.read(path).strip() == value.encode()
    assert len(files) == 1
    files.close_all()
