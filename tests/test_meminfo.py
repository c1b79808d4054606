"""The /proc/meminfo parser: real captures and malformed variants."""

from pathlib import Path

import pytest

from ksmtuned.errors import KsmtunedError, MeminfoError
from ksmtuned.kernel.meminfo import free_kib, parse_meminfo, read_meminfo, total_kib

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name,total,classic,available", [
    ("meminfo-old-kernel-2.6.32", 16331200, 5234120 + 302112 + 6102344, None),
    ("meminfo-large-host-1.5T", 1584463872, 102345216 + 1234567 + 301234567, 412345678),
])
def test_captured_files(name, total, classic, available):
    fields = read_meminfo(DATA / name)
    assert total_kib(fields) == total
    assert free_kib(fields, "classic") == classic
    if available is None:
        with pytest.raises(MeminfoError, match="missing field MemAvailable"):
            free_kib(fields, "available")
    else:
        assert free_kib(fields, "available") == available


def test_small_vm_capture_and_unitless_hugepage_counts():
    fields = read_meminfo(DATA / "meminfo-small-vm-6.18")
    assert fields["HugePages_Total"] == 0
    assert 0 < free_kib(fields) <= total_kib(fields)


def test_the_real_proc_meminfo():
    fields = read_meminfo()
    assert total_kib(fields) > 0 and free_kib(fields, "available") <= total_kib(fields)


GOOD = "MemTotal: 1000 kB\nMemFree: 100 kB\nMemAvailable: 300 kB\nBuffers: 10 kB\nCached: 20 kB\n"


@pytest.mark.parametrize("text,match", [
    ("MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 10 kB\n", "missing field Cached"),
    ("MemFree: 100 kB\nBuffers: 10 kB\nCached: 1 kB\n", "missing field MemTotal"),
    ("", "missing field MemFree"),
    (GOOD + "garbage\n", r":6: expected 'Field: N kB'"),
    (GOOD + "Foo: 12x kB\n", r":6: Foo: expected an integer, got '12x'"),
    (GOOD + "Foo: 1 MB\n", r":6: expected 'Field: N kB'"),
    (GOOD + "Foo: -1 kB\n", "Foo: negative value"),
    (GOOD.replace("MemTotal: 1000", "MemTotal: 0"), "MemTotal: expected a positive size"),
    (GOOD.replace("MemFree: 100", "MemFree: 2000"), "free memory 2030 kB above MemTotal 1000 kB"),
])
def test_malformed(text, match):
    with pytest.raises(MeminfoError, match=match):
        free_kib(parse_meminfo(text, "/fake/meminfo"), "classic", "/fake/meminfo")


def test_available_above_total_is_impossible():
    with pytest.raises(MeminfoError, match="above MemTotal"):
        free_kib(parse_meminfo(GOOD.replace("MemAvailable: 300", "MemAvailable: 5000")), "available")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(MeminfoError, match=f"{tmp_path}/nope: cannot read") as e:
        read_meminfo(tmp_path / "nope")
    assert isinstance(e.value, KsmtunedError)
