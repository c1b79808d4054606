"""`ksmtuned check`: verdicts for crafted hosts.

A host is a fake procfs (meminfo, cpuinfo, and symlinks to the real /proc/PID of chosen
processes only, so other guests on this machine never count), a fake KSM directory with a
transparent_hugepage file beside it, and fake guests: real processes that look like QEMU
(comm qemu-system-x86, ``-enable-kvm -m ... -smp ...``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ksmtuned.commands.check import (GIB, MIB, GuestSpec, Host, check_memory, check_swap, check_vcpus, memory_from_argv,
                                parse_size, physical_cores, vcpus_from_argv)
from tests.report_support import FAKE_KSM, Daemon, FakeGuests, cpuinfo, fake_ksm_dir, fake_procfs

SYSTEMD_BOOTED = Path("/run/systemd/system").is_dir()


# --- command-line parsing ------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("512", 512 * MIB), ("512M", 512 * MIB), ("512m", 512 * MIB), ("2G", 2 * GIB), ("1.5G", 3 * GIB // 2),
    ("262144k", 256 * MIB), ("1T", 1 << 40), ("4096B", 4096), ("", None), ("2X", None), ("-1", None),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("argv, expected", [
    (["qemu", "-m", "512"], 512 * MIB),
    (["qemu", "-m", "2G"], 2 * GIB),
    (["qemu", "-m", "size=2G,slots=4,maxmem=8G"], 2 * GIB),  # maxmem is hotplug room, not RAM
    (["qemu", "-m", "2G,slots=4,maxmem=8G"], 2 * GIB),
    (["qemu", "-m", "slots=4,maxmem=8G,size=1G"], GIB),
    (["qemu", "--m", "1G"], GIB),
    (["qemu", "-m", "1G", "-m", "3G"], 3 * GIB),  # the last one wins, as in QEMU
    (["qemu", "-smp", "2"], None),
    (["qemu", "-m"], None),
])
def test_memory_from_argv(argv, expected):
    assert memory_from_argv(argv) == expected


@pytest.mark.parametrize("argv, expected", [
    (["qemu"], 1),
    (["qemu", "-smp", "4"], 4),
    (["qemu", "-smp", "cpus=4,sockets=2,cores=2"], 4),
    (["qemu", "-smp", "4,sockets=1,cores=4,threads=1"], 4),
    (["qemu", "-smp", "sockets=2,cores=2,threads=2"], 8),
    (["qemu", "-smp", "cores=3"], 3),
    (["qemu", "-smp", "4,maxcpus=8"], 4),  # maxcpus is hotplug room
    (["qemu", "-smp", "1", "-smp", "2"], 2),
])
def test_vcpus_from_argv(argv, expected):
    assert vcpus_from_argv(argv) == expected


def test_physical_cores_not_threads(tmp_path):
    p = tmp_path / "cpuinfo"
    p.write_text(cpuinfo(cores=2, threads_per_core=2))
    assert physical_cores(p) == (2, 4)
    p.write_text("processor\t: 0\nBogoMIPS\t: 50\n\nprocessor\t: 1\nBogoMIPS\t: 50\n")  # no topology (arm64)
    assert physical_cores(p) == (2, 2)


# --- the rules at their boundaries (pure) ---------------------------------------------------------

def host(ram_gib: float, swap_gib: float, guests_gib: list[float], cores: int = 2, vcpus: list[int] | None = None):
    vcpus = vcpus or [1] * len(guests_gib)
    gs = [GuestSpec(pid=i, name=f"g{i}", memory_bytes=int(g * GIB), memory_source="-m", vcpus=v, thp_bytes=0,
                    rss_bytes=0) for i, (g, v) in enumerate(zip(guests_gib, vcpus))]
    return Host(ram_bytes=int(ram_gib * GIB), swap_bytes=int(swap_gib * GIB), cores=cores, cpus=cores, guests=gs,
                ksm_present=True, ksm={}, thp_mode="never", daemon_pid=None, daemon_message="",
                services=None, tuners=[])


@pytest.mark.parametrize("ram, swap, guests, verdict", [
    (16, 0, [12], "pass"),  # 12 + 4 == 16: the guide's recommended limit, reached
    (16, 0, [12.001], "fail"),  # beyond RAM, no swap
    (16, 1, [12.5], "warn"),  # beyond RAM, within RAM + swap
    (16, 1, [13.5], "fail"),
    (16, 0, [], "pass"),
])
def test_memory_boundaries(ram, swap, guests, verdict):
    assert check_memory(host(ram, swap, guests)).verdict == verdict


@pytest.mark.parametrize("ram, swap, guests, verdict, needed_gib", [
    (32, 26, [50], "pass", 26),  # the guide's example: 50 x 1 GB guests, 32 GB RAM -> 26 GB swap
    (32, 25, [50], "fail", 26),
    (16, 0, [8], "pass", 0),  # 8 + 4 + 4 - 16 = 0
    (16, 0, [10], "warn", 2),  # not overcommitted, but below the guide's minimum swap
    (16, 2, [10], "pass", 2),
])
def test_swap_rule(ram, swap, guests, verdict, needed_gib):
    c = check_swap(host(ram, swap, guests))
    assert (c.verdict, c.details["needed_bytes"]) == (verdict, needed_gib * GIB)


@pytest.mark.parametrize("cores, vcpus, verdict", [
    (2, [2], "pass"), (2, [3], "fail"), (4, [4, 4, 4], "pass"),
    (2, [1] * 10, "pass"), (2, [1] * 11, "warn"),  # five single-vCPU guests per core
    (2, [2] * 10, "pass"), (2, [2] * 11, "warn"),  # more than ten vCPUs per core
])
def test_vcpu_rule(cores, vcpus, verdict):
    assert check_vcpus(host(64, 0, [0.1] * len(vcpus), cores=cores, vcpus=vcpus)).verdict == verdict


# --- crafted hosts, end to end -------------------------------------------------------------------

class Host_:
    """A crafted host: fake procfs, KSM dir and THP file; run `ksmtuned check` on it."""

    def __init__(self, tmp: Path, ksm: dict[str, str] | None = None, thp: str = "always madvise [never]"):
        self.tmp = tmp
        self.ksm = fake_ksm_dir(tmp, ksm)
        thp_dir = tmp / "mm" / "transparent_hugepage"
        thp_dir.mkdir()
        (thp_dir / "enabled").write_text(thp + "\n")
        self.conf = tmp / "ksmtuned.conf"
        self.conf.write_text("")
        os.chmod(self.conf, 0o644)
        self.pidfile = tmp / "ksmtune.pid"
        self.guests = FakeGuests(tmp)
        self.pids: list[int] = []

    def guest(self, name: str, *args: str) -> int:
        pid = self.guests.start(name, *args)
        self.pids.append(pid)
        return pid

    def check(self, ram_gib: float, swap_gib: float = 0, cores: int = 2, threads: int = 1, sysfs: Path | None = None,
              text: bool = False) -> tuple[int, dict | str]:
        procfs = self.tmp / "proc"
        if procfs.exists():
            for p in procfs.iterdir():
                p.unlink()
            procfs.rmdir()
        fake_procfs(self.tmp, self.pids, ram_gib, swap_gib, cores, threads)
        argv = [sys.executable, "-m", "ksmtuned", "check", "--procfs", str(procfs), "--sysfs", str(sysfs or self.ksm),
                "--config", str(self.conf), "--pidfile", str(self.pidfile)]
        r = subprocess.run(argv + ([] if text else ["--json"]), capture_output=True, text=True, timeout=60)
        assert r.returncode in (0, 5), r.stderr  # 5: a check failed (1 would be a crash)
        return r.returncode, (r.stdout if text else json.loads(r.stdout))


@pytest.fixture
def crafted(tmp_path):
    h = Host_(tmp_path)
    yield h
    h.guests.stop()


def verdicts(report: dict) -> dict[str, str]:
    return {c["name"]: c["verdict"] for c in report["checks"]}


def test_a_host_within_the_guide(crafted):
    crafted.guest("small", "-m", "1G")
    crafted.guest("tiny", "-m", "512", "-smp", "2")
    rc, rep = crafted.check(ram_gib=16)
    v = verdicts(rep)
    assert v["memory_overcommit"] == "pass" and v["swap_size"] == "pass" and v["vcpu_overcommit"] == "pass"
    assert v["ksm"] == "pass" and v["thp_mode"] == "pass" and v["thp_guests"] == "pass" and v["advisor"] == "pass"
    if not SYSTEMD_BOOTED:
        assert v["services"] == "warn"  # no ksmtuned runs on this crafted host
    else:  # systemd answers for this machine's units: whatever they are, nothing fails
        assert v["services"] in ("pass", "warn")
    assert rc == 0 and rep["ok"] is True
    assert rep["summary"]["fail"] == 0 and sum(rep["summary"].values()) == len(rep["checks"])
    guests = {g["name"]: g for g in rep["host"]["guests"]}
    assert set(guests) == {"small", "tiny"}
    assert guests["small"]["memory_bytes"] == GIB and guests["small"]["memory_source"] == "-m"
    assert guests["tiny"]["memory_bytes"] == 512 * MIB and guests["tiny"]["vcpus"] == 2
    assert rep["host"]["ram_bytes"] == 16 * GIB and rep["host"]["cores"] == 2 and rep["host"]["swap_bytes"] == 0


def test_memory_overcommitted_without_swap_fails(crafted):
    crafted.guest("big", "-m", "12G")
    crafted.guest("hotplug", "-m", "size=8G,slots=2,maxmem=16G")
    rc, rep = crafted.check(ram_gib=16, swap_gib=2)
    v = verdicts(rep)
    assert v["memory_overcommit"] == "fail" and v["swap_size"] == "fail"
    assert rc == 5 and rep["ok"] is False
    swap = next(c for c in rep["checks"] if c["name"] == "swap_size")
    assert swap["details"]["needed_bytes"] == (20 + 4 + 4 - 16) * GIB
    assert "12.0 GiB" in swap["reason"]
    # the same guests with the swap the guide asks for: overcommitted, but a warning only
    rc, rep = crafted.check(ram_gib=16, swap_gib=12)
    v = verdicts(rep)
    assert v["memory_overcommit"] == "warn" and v["swap_size"] == "pass"
    assert rc == 0


def test_text_output_and_exit_status(crafted):
    crafted.guest("big", "-m", "40G")
    rc, text = crafted.check(ram_gib=16, text=True)
    assert rc == 5
    lines = text.splitlines()
    assert any(line.startswith("FAIL  memory_overcommit") and "exceed RAM 16.0 GiB" in line for line in lines)
    assert lines[-1].startswith("summary: ") and "fail" in lines[-1]


def test_smp_guest_wider_than_the_cores_fails(crafted):
    crafted.guest("wide", "-m", "256M", "-smp", "sockets=2,cores=2,threads=1")
    rc, rep = crafted.check(ram_gib=16, cores=2, threads=2)  # 4 CPUs, but 2 physical cores
    assert verdicts(rep)["vcpu_overcommit"] == "fail" and rc == 5
    c = next(c for c in rep["checks"] if c["name"] == "vcpu_overcommit")
    assert c["details"]["smp_over_cores"] == [{"pid": crafted.pids[0], "name": "wide", "vcpus": 4}]
    rc, rep = crafted.check(ram_gib=16, cores=4)
    assert verdicts(rep)["vcpu_overcommit"] == "pass"


def test_many_single_vcpu_guests_warn(crafted):
    for i in range(11):
        crafted.guest(f"s{i}", "-m", "64M")
    rc, rep = crafted.check(ram_gib=16, cores=2)
    assert verdicts(rep)["vcpu_overcommit"] == "warn" and rc == 0
    rc, rep = crafted.check(ram_gib=16, cores=3)
    assert verdicts(rep)["vcpu_overcommit"] == "pass"


def test_guest_without_m_counts_qemus_default(crafted):
    crafted.guest("nom")
    rc, rep = crafted.check(ram_gib=16)
    (g,) = rep["host"]["guests"]
    assert (g["memory_bytes"], g["memory_source"], g["vcpus"]) == (128 * MIB, "default", 1)


def test_thp_mode_and_thp_backed_guests(tmp_path):
    h = Host_(tmp_path, thp="[always] madvise never")
    try:
        pid = h.guest("huge", "-m", "256M", "-thp-mib", "16")
        rc, rep = h.check(ram_gib=16)
    finally:
        h.guests.stop()
    v = verdicts(rep)
    assert v["thp_mode"] == "warn"
    assert rep["host"]["thp_mode"] == "always"
    (g,) = rep["host"]["guests"]
    if not g["thp_bytes"]:
        pytest.skip("the kernel gave the fake guest no transparent huge page (fragmented memory?)")
    assert g["thp_bytes"] >= 2 * MIB
    assert v["thp_guests"] == "warn"
    c = next(c for c in rep["checks"] if c["name"] == "thp_guests")
    assert c["details"]["guests"] == [{"pid": pid, "name": "huge", "thp_bytes": g["thp_bytes"]}]


def test_kernel_advisor_scanning_warns(tmp_path):
    h = Host_(tmp_path, ksm={**FAKE_KSM, "advisor_mode": "none [scan-time]"})
    rc, rep = h.check(ram_gib=16)
    assert verdicts(rep)["advisor"] == "warn"
    h2 = Host_(tmp_path / "old", ksm={k: v for k, v in FAKE_KSM.items() if not k.startswith("advisor")})
    rc, rep = h2.check(ram_gib=16)
    c = next(c for c in rep["checks"] if c["name"] == "advisor")
    assert c["verdict"] == "pass" and "no KSM advisor" in c["reason"]


def test_no_ksm_fails(crafted):
    rc, rep = crafted.check(ram_gib=16, sysfs=crafted.tmp / "mm" / "nonexistent")
    assert verdicts(rep)["ksm"] == "fail" and verdicts(rep)["advisor"] == "skip" and rc == 5


@pytest.mark.skipif(SYSTEMD_BOOTED, reason="under systemd the services check asks systemctl")
def test_services_running_daemon_and_a_second_tuner(tmp_path):
    h = Host_(tmp_path)
    d = Daemon(tmp_path / "daemon", "KSM_MONITOR_INTERVAL=3600\n", state=tmp_path / "state.json")
    d.pidfile = h.pidfile
    momd = None
    try:
        d.start()
        h.pids.append(d.proc.pid)
        rc, rep = h.check(ram_gib=16)
        c = next(c for c in rep["checks"] if c["name"] == "services")
        assert c["verdict"] == "pass" and f"pid {d.proc.pid}" in c["reason"], c
        # oVirt's MOM on the same host: two tuners fight over the knobs
        exe = tmp_path / "momd"
        exe.symlink_to(os.path.realpath(sys.executable))
        momd = subprocess.Popen(["momd", "-S", "-c", "import signal; print(1, flush=True); signal.pause()"],
                                executable=str(exe), stdout=subprocess.PIPE)
        momd.stdout.readline()
        h.pids.append(momd.pid)
        rc, rep = h.check(ram_gib=16)
        c = next(c for c in rep["checks"] if c["name"] == "services")
        assert c["verdict"] == "fail" and "momd" in c["reason"] and rc == 5
    finally:
        d.stop()
        if momd is not None:
            momd.kill()
            momd.wait()
            momd.stdout.close()
