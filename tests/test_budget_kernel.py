"""The budget policy's kernel readers, each against its real file and against a stand-in that
forces what the kernel cannot be made to show on demand."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from ksmtuned.kernel.ksmd import Ksmd
from ksmtuned.kernel.vmstat import kernel_hz, read_vmstat


def fake_ksmd(proc: Path, pid: int, schedstat: str) -> None:
    d = proc / str(pid)
    d.mkdir(parents=True)
    fields = ["S"] + ["0"] * 50
    fields[6] = str(0x00200000)  # PF_KTHREAD (field 9)
    (d / "stat").write_text(f"{pid} (ksmd) " + " ".join(fields) + "\n")
    (d / "schedstat").write_text(schedstat)


def test_schedstat_of_a_stand_in_ksmd(tmp_path):
    fake_ksmd(tmp_path, 37, "4883 1071841 2\n")
    k = Ksmd(tmp_path)
    assert k.schedstat() == (4883, 1071841, 2)
    assert k.cpu_ns() == 4883 and k.pid == 37


@pytest.mark.parametrize("text", ["", "abc def ghi\n", "12\n"])
def test_malformed_schedstat_reads_as_unknown(tmp_path, text):
    fake_ksmd(tmp_path, 37, text)
    assert Ksmd(tmp_path).cpu_ns() is None


def test_no_ksmd_reads_as_unknown(tmp_path):
    assert Ksmd(tmp_path).schedstat() is None


@pytest.mark.skipif(not Path("/sys/kernel/mm/ksm/run").exists(), reason="this kernel has no KSM")
def test_real_ksmd_schedstat_counts_nanoseconds():
    k = Ksmd()
    first = k.cpu_ns()
    assert first is not None and first >= 0
    assert k.cpu_ns() >= first


def test_vmstat_counters(tmp_path):
    p = tmp_path / "vmstat"
    p.write_text("nr_free_pages 100\ncow_ksm 42\nksm_swpin_copy 3\nbroken x\n")
    assert read_vmstat(["cow_ksm", "broken", "missing"], str(p)) == {"cow_ksm": 42}


def test_real_vmstat_has_cow_ksm_on_a_ksm_kernel():
    got = read_vmstat(["cow_ksm", "nr_free_pages"])
    assert "nr_free_pages" in got
    if Path("/sys/kernel/mm/ksm/run").exists() and os.uname().release >= "6.1":
        assert "cow_ksm" in got


def test_kernel_hz_from_config_gz_then_boot(tmp_path):
    proc, boot = tmp_path / "proc", tmp_path / "boot"
    proc.mkdir()
    boot.mkdir()
    assert kernel_hz(proc, boot, release="x") is None
    (boot / "config-x").write_text("CONFIG_HZ_300=y\nCONFIG_HZ=300\n")
    assert kernel_hz(proc, boot, release="x") == 300
    with gzip.open(proc / "config.gz", "wb") as f:
        f.write(b"# CONFIG_HZ_PERIODIC is not set\nCONFIG_HZ=1000\n")
    assert kernel_hz(proc, boot, release="x") == 1000
    (proc / "config.gz").write_bytes(b"not gzip")
    assert kernel_hz(proc, boot, release="x") == 300


def test_real_kernel_hz_is_a_known_value():
    hz = kernel_hz()
    if hz is None:
        pytest.skip("no /proc/config.gz and no /boot/config-$(uname -r)")
    assert hz in (100, 250, 300, 1000)
