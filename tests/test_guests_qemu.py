"""Real QEMU guests (KSM.md section 5): found once each, counted exactly, merged by real KSM.

Three small paused guests, one per command-line form the matchers claim (tests/qemu_support.py),
started once for the module and killed by pid at its end.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ksmtuned.engine.guests import GuestFinder
from tests import qemu_support as qs
from tests.daemon_support import DaemonProc, fake_ksm_dir

pytestmark = [pytest.mark.qemu]

MIB = 128
SPECS = [("debian", "kt-deb", MIB), ("libvirt", "kt-lv", MIB), ("kvm", "kt-pve", MIB)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("qemu")


@pytest.fixture(scope="module")
def guests(workdir):
    qs.require_qemu()
    run = workdir / "run"
    with qs.running_guests(SPECS, workdir, pidfiles={"kt-pve": run / "qemu-server" / "100.pid"}) as gs:
        yield {g.form: g for g in gs}


def _ours(found, guests):
    pids = {g.pid: g for g in guests.values()}
    return {f.pid: f for f in found if f.pid in pids}


def test_each_real_guest_is_found_once_with_its_matcher(guests, workdir):
    run = workdir / "run"
    found = GuestFinder(run_dir=run).scan(details=True)
    assert len({g.pid for g in found}) == len(found)  # each once
    ours = _ours(found, guests)
    assert set(ours) == {g.pid for g in guests.values()}
    for g in guests.values():
        f = ours[g.pid]
        assert f.name == g.name and f.name_known
        assert set(f.matchers) == g.claims, g.form
        assert f.rss_kib >= MIB * 1024 and f.ksm_mergeable is True
        assert f.thp_kib == 0  # THP disabled for them (prctl), so KSM can merge them
    assert ours[guests["kvm"].pid].pidfile == str(run / "qemu-server" / "100.pid")
    assert ours[guests["libvirt"].pid].comm == "qemu:kt-lv"
    # each named matcher alone claims exactly its guests; Debian's misses the libvirt form
    for matcher in ("redhat", "debian", "libvirt", "proxmox"):
        got = set(_ours(GuestFinder(matchers=[matcher], run_dir=run).scan(), guests))
        assert got == {g.pid for g in guests.values() if matcher in g.claims}, matcher
    got = set(_ours(GuestFinder(matchers=["regex:-name guest=kt-"], run_dir=run).scan(), guests))
    assert got == {guests["libvirt"].pid}


def _isolated_procfs(root: Path, pids) -> Path:
    """A /proc that shows only these processes (as a container's would), for exact sums."""
    procfs = root / "proc"
    procfs.mkdir()
    for name in ("meminfo", "stat", "uptime", "loadavg", *map(str, pids)):
        (procfs / name).symlink_to(f"/proc/{name}")
    return procfs


def _committed_by_daemon(tmp: Path, procfs: Path, config: str) -> int:
    conf = tmp / "ksmtuned.conf"
    conf.write_text(config)
    sysfs = tmp / "ksm" if (tmp / "ksm").exists() else fake_ksm_dir(tmp)
    r = subprocess.run([sys.executable, "-m", "ksmtuned", "--once", "--dry-run", "--debug", "--config", str(conf),
                        "--procfs", str(procfs), "--sysfs", str(sysfs), "--pidfile", str(tmp / "p.pid")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    m = re.search(r": committed (\d+) free (\d+)$", r.stdout, re.M)
    assert m, r.stdout
    return int(m.group(1))


def test_committed_memory_equals_the_guests_memory(guests, tmp_path):
    """The daemon's 'committed' (its debug line) is the guests' RSS, PSS or VSZ, within 1 %."""
    helper = subprocess.Popen(["sleep", "60"])  # a process that is no guest
    try:
        procfs = _isolated_procfs(tmp_path, [g.pid for g in guests.values()] + [helper.pid, os.getpid()])
        rss = {g.form: g.status_kib("VmRSS") for g in guests.values()}
        vsz = {g.form: g.status_kib("VmSize") for g in guests.values()}
        pss = {g.form: g.rollup_kib("Pss") for g in guests.values()}
        assert _committed_by_daemon(tmp_path, procfs, "") == pytest.approx(sum(rss.values()), rel=0.01)
        for matcher in ("redhat", "debian", "libvirt", "proxmox"):
            want = sum(rss[g.form] for g in guests.values() if matcher in g.claims)
            got = _committed_by_daemon(tmp_path, procfs, f"KSM_GUEST_MATCH={matcher}\n")
            assert got == pytest.approx(want, rel=0.01), matcher
        assert _committed_by_daemon(tmp_path, procfs, "KSM_PS_METRIC=vsz\n") == pytest.approx(
            sum(vsz.values()), rel=0.01)
        assert _committed_by_daemon(tmp_path, procfs, "KSM_PS_METRIC=pss\n") == pytest.approx(
            sum(pss.values()), rel=0.01)
        assert _committed_by_daemon(tmp_path, procfs, "KSM_GUEST_MATCH=regex:^nothing-matches\n") == 0
    finally:
        helper.kill()
        helper.wait()


def _guests_json(*args) -> dict:
    r = subprocess.run([sys.executable, "-m", "ksmtuned", "guests", "--json", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.ksm
@pytest.mark.root
@pytest.mark.slow
def test_pressure_daemon_turns_ksm_on_and_the_guests_merge(guests, tmp_path, real_ksm):
    """KSM_THRES_COEF=99: free memory is always 'low', so the daemon starts KSM and boosts."""
    ksm = real_ksm
    if (ksm / "use_zero_pages").exists():
        (ksm / "use_zero_pages").write_text("0")  # count zero-page merges in pages_sharing
    pages = sum(g.ram_pages for g in guests.values())
    config = "KSM_MONITOR_INTERVAL=0.2\nKSM_THRES_COEF=99\nKSM_NPAGES_BOOST=2500\nKSM_NPAGES_MAX=5000\n"
    with DaemonProc(tmp_path, config, sysfs=ksm) as daemon:
        daemon.wait_ticks(1)
        assert "start ksm" in daemon.log.read_text() or "boost" in daemon.log.read_text()
        assert (ksm / "run").read_text().strip() == "1"
        deadline = time.monotonic() + 60
        while int((ksm / "pages_sharing").read_text()) < 0.9 * pages:
            assert time.monotonic() < deadline, (
                f"pages_sharing {(ksm / 'pages_sharing').read_text().strip()} < 90 % of {pages} guest pages")
            time.sleep(0.2)
        doc = _guests_json()
    assert daemon.proc.returncode == 0
    by_pid = {g["pid"]: g for g in doc["guests"]}
    for g in guests.values():
        row = by_pid[g.pid]
        assert row["ksm_merging_pages"] >= 0.9 * g.ram_pages, row
        assert row["ksm_saved_kib"] >= 0.9 * MIB * 1024
        assert row["pss_kib"] < row["rss_kib"]  # merged pages are shared, so PSS falls; RSS does not


@pytest.mark.slow
def test_a_thp_backed_guest_triggers_the_warning(tmp_path, caplog):
    if qs.thp_mode() not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {qs.thp_mode()!r} here: no guest RAM can be on THP")
    with qs.running_guests([("debian", "kt-thp", MIB)], tmp_path, thp=True) as [g]:
        thp = g.rollup_kib("AnonHugePages")
        if thp < MIB * 1024 // 2:
            pytest.skip(f"the kernel backed only {thp} kB of the guest with huge pages (fragmented memory?)")
        finder = GuestFinder(matchers=["debian"], run_dir=tmp_path)
        with caplog.at_level(logging.WARNING, logger="ksmtuned.engine.guests"):
            [f] = [x for x in finder.scan() if x.pid == g.pid]
            finder.scan(details=True)
        warnings = [r.getMessage() for r in caplog.records if f"(pid {g.pid})" in r.getMessage()]
        assert len(warnings) == 1, warnings
        m = re.search(rf"kt-thp \(pid {g.pid}\): (\d+) MiB of its (\d+) MiB", warnings[0])
        assert m and int(m.group(1)) == pytest.approx(f.thp_kib / 1024, abs=1), warnings[0]
        assert f.thp_kib >= MIB * 1024 // 2 and f.thp_warning
        r = subprocess.run([sys.executable, "-m", "ksmtuned", "guests"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert f"kt-thp (pid {g.pid})" in r.stderr and "transparent huge pages" in r.stderr
        row = next(line for line in r.stdout.splitlines() if line.split()[:1] == [str(g.pid)])
        assert row.endswith("!") or " ! " in row
