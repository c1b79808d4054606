"""Guest detection: the matchers, names, pid files, the (pid, start time) cache, and THP.

Real processes wherever the kernel can give them on demand (fake guests are Python started
under a QEMU name, as in tests/data/oracle/fakeguest.py); a fake /proc tree only where the
kernel cannot: a pid reused by another process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ksmtuned.service.config_file import load_config
from ksmtuned.errors import ConfigError
from ksmtuned.engine.guests import (CLK_TCK, PF_FORKNOEXEC, YOUNG_S, Guest, GuestFinder, committed_kib, guest_name,
                             make_matcher)

# -------------------------------------------------------------------------------------------
# the matchers, as tables

DEB = ["qemu-system-x86_64", "-enable-kvm", "-m", "256"]
LV = ["/usr/bin/qemu-system-x86_64", "-name", "guest=web,debug-threads=on", "-accel", "kvm", "-m", "256"]
LV_MACHINE = ["/usr/bin/qemu-system-x86_64", "-machine", "pc-q35-7.2,accel=kvm,usb=off", "-m", "256"]
LV_TCG_NAMED = ["/usr/bin/qemu-system-x86_64", "-name", "guest=web,process=qemu:web", "-accel", "tcg"]
RHEL = ["/usr/libexec/qemu-kvm", "-name", "guest=db", "-machine", "accel=kvm"]
PVE = ["/usr/bin/kvm", "-id", "100", "-name", "vm100,debug-threads=on", "-pidfile", "/var/run/qemu-server/100.pid"]


@pytest.mark.parametrize(
    "comm, argv, claims",
    [
        ("qemu-system-x86", DEB, {"redhat", "debian"}),
        # libvirt: absolute path + -accel kvm; Debian's pattern misses it (KSM.md section 2)
        ("qemu-system-x86", LV, {"redhat", "libvirt"}),
        ("qemu:web", LV, {"redhat", "libvirt"}),
        ("qemu-system-x86", LV_MACHINE, {"redhat", "libvirt"}),
        ("qemu:web", LV_TCG_NAMED, {"redhat", "libvirt"}),  # TCG, but named qemu:NAME
        ("qemu-system-x86", LV_TCG_NAMED, {"redhat"}),  # before QEMU renamed itself
        ("qemu-kvm", RHEL, {"redhat", "libvirt"}),
        ("kvm", PVE, {"proxmox"}),
        # not guests
        ("qemu-img", ["qemu-img", "convert", "-O", "qcow2", "a", "b"], set()),
        ("bash", ["bash", "-c", "qemu-system-x86_64 -enable-kvm"], set()),
        ("python3", ["python3", "/usr/bin/qemu-system-x86_64", "-accel", "kvm"], set()),
        ("qemu-system-x86", ["qemu-system-x86_64", "-accel", "tcg"], {"redhat"}),
        ("kvm-pit/1234", [], set()),  # a kernel thread
        ("qemu-ga", ["/usr/bin/qemu-ga", "--method", "virtio-serial"], set()),
    ],
)
def test_matcher_table(comm, argv, claims):
    got = {name for name in ("redhat", "debian", "libvirt", "proxmox")
           if argv and make_matcher(name).claims(comm, argv, " ".join(argv))}
    assert got == claims


@pytest.mark.parametrize(
    "pattern, argv, hit",
    [
        (r"regex:-name guest=web", LV, True),
        (r"regex:^/usr/bin/kvm ", PVE, True),
        (r"regex:^/usr/bin/kvm ", DEB, False),
        (r"regex:accel=kvm", LV_MACHINE, True),
    ],
)
def test_regex_matcher_searches_the_command_line(pattern, argv, hit):
    m = make_matcher(pattern)
    assert m.name == pattern
    assert m.claims("x", argv, " ".join(argv)) is hit


@pytest.mark.parametrize(
    "argv, comm, pidfile, name",
    [
        (LV, "qemu-system-x86", None, "web"),
        (["qemu", "-name", "plain"], "", None, "plain"),
        (["qemu", "-name", "vm100,debug-threads=on"], "kvm", "/run/qemu-server/100.pid", "vm100"),
        (["qemu", "-name", "a,,b,debug-threads=on"], "", None, "a,b"),
        (["kvm", "-id", "100"], "kvm", "/run/qemu-server/100.pid", "100"),
        (["qemu"], "qemu:shortname", None, "shortname"),
        (["qemu", "-accel", "kvm"], "qemu-system-x86", None, None),
    ],
)
def test_guest_name(argv, comm, pidfile, name):
    assert guest_name(argv, comm, pidfile) == name


def test_committed_by_metric():
    gs = [Guest(1, "a", "redhat", rss_kib=100, vsz_kib=1000, pss_kib=60),
          Guest(2, "b", "debian", rss_kib=200, vsz_kib=2000, pss_kib=None)]
    assert committed_kib(gs) == 300
    assert committed_kib(gs, "vsz") == 3000
    assert committed_kib(gs, "pss") == 60  # unknown PSS counts 0, never a guess


def test_invalid_regex_is_a_config_error_with_its_line(tmp_path):
    conf = tmp_path / "ksmtuned.conf"
    conf.write_text("KSM_MONITOR_INTERVAL=60\n# guests\nKSM_GUEST_MATCH='debian,regex:qemu('\n")
    with pytest.raises(ConfigError) as e:
        load_config(conf, env={})
    assert f"{conf}:3:" in str(e.value)
    assert "qemu(" in str(e.value)


def test_from_settings_takes_matchers_and_metric(tmp_path):
    conf = tmp_path / "ksmtuned.conf"
    conf.write_text("KSM_GUEST_MATCH=proxmox,regex:^/opt/vm\nKSM_PS_METRIC=pss\n")
    finder = GuestFinder.from_settings(load_config(conf, env={}).settings, procfs=Path("/proc"))
    assert finder.matcher_names == ("proxmox", "regex:^/opt/vm")
    assert finder.metric == "pss"


# -------------------------------------------------------------------------------------------
# real fake guests

HOLD = textwrap.dedent("""
    import signal, sys
    ram = bytearray(b"\\x5a") * (int(sys.argv[sys.argv.index("-m") + 1]) << 20)
    print("ready", flush=True)
    while True:
        signal.pause()
""")


class FakeGuests:
    """Python processes that look like QEMU (name and command line), holding known memory."""

    def __init__(self, tmp: Path):
        self.bindir = tmp / "bin"
        self.bindir.mkdir(exist_ok=True)
        self.procs: list[subprocess.Popen] = []

    def link(self, name: str) -> Path:
        link = self.bindir / name
        if not link.exists():
            link.symlink_to(sys.executable)
        return link

    def start(self, exe_name: str, argv0: str, args: list[str], mib: int = 8) -> subprocess.Popen:
        """exe_name: the file exec'd (sets comm); argv0: what the command line shows."""
        p = subprocess.Popen([argv0, "-I", "-S", "-c", HOLD, *args, "-m", str(mib)], executable=self.link(exe_name),
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.procs.append(p)
        assert p.stdout.readline() == b"ready\n"
        return p

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()


@pytest.fixture
def fakes(tmp_path):
    f = FakeGuests(tmp_path)
    try:
        yield f
    finally:
        f.stop()


def _ours(guests, procs):
    pids = {p.pid for p in procs}
    return {g.pid: g for g in guests if g.pid in pids}


def test_each_form_is_found_once_with_its_matcher(fakes, tmp_path):
    deb = fakes.start("qemu-system-x86_64", "qemu-system-x86_64", ["-enable-kvm", "-name", "deb"])
    lv = fakes.start("qemu-system-x86_64", str(fakes.bindir / "qemu-system-x86_64"),
                     ["-name", "guest=lv,debug-threads=on", "-accel", "kvm"])
    pve = fakes.start("kvm", str(fakes.bindir / "kvm"), ["-name", "vm100"])
    other = fakes.start("python3", "python3", ["-name", "notaguest"])
    found = _ours(GuestFinder(run_dir=tmp_path / "run").scan(), fakes.procs)
    assert set(found) == {deb.pid, lv.pid, pve.pid}
    assert other.pid not in found
    assert (found[deb.pid].matcher, found[deb.pid].matchers, found[deb.pid].name) == ("redhat", ("redhat", "debian"), "deb")
    assert (found[lv.pid].matcher, found[lv.pid].matchers, found[lv.pid].name) == ("redhat", ("redhat", "libvirt"), "lv")
    assert (found[pve.pid].matcher, found[pve.pid].name) == ("proxmox", "vm100")
    # each named matcher alone counts exactly its guests
    for matcher, expected in [("redhat", {deb.pid, lv.pid}), ("debian", {deb.pid}), ("libvirt", {lv.pid}),
                              ("proxmox", {pve.pid}), ("regex:-name guest=lv", {lv.pid})]:
        got = _ours(GuestFinder(matchers=[matcher], run_dir=tmp_path / "run").scan(), fakes.procs)
        assert set(got) == expected, matcher
        assert {g.matcher for g in got.values()} == {matcher}
    # the order of KSM_GUEST_MATCH decides the matcher reported
    got = _ours(GuestFinder(matchers=["libvirt", "debian", "redhat"], run_dir=tmp_path / "run").scan(), fakes.procs)
    assert (got[lv.pid].matcher, got[deb.pid].matcher) == ("libvirt", "debian")


def test_memory_figures_match_the_kernel(fakes, tmp_path):
    p = fakes.start("qemu-system-x86_64", "qemu-system-x86_64", ["-enable-kvm"], mib=64)
    finder = GuestFinder(matchers=["debian"], run_dir=tmp_path)
    [g] = _ours(finder.scan(details=True), [p]).values()
    status = dict(line.split(":", 1) for line in Path(f"/proc/{p.pid}/status").read_text().splitlines())
    assert g.rss_kib == pytest.approx(int(status["VmRSS"].split()[0]), rel=0.01)
    assert g.vsz_kib == int(status["VmSize"].split()[0])
    assert g.rss_kib >= 64 * 1024
    assert g.pss_kib is not None and 64 * 1024 <= g.pss_kib <= g.rss_kib
    assert g.thp_kib is not None
    # the cheap scan reads smaps_rollup only every rollup_interval_s (THP check) ...
    [g2] = _ours(finder.scan(), [p]).values()
    assert g2.pss_kib is None and g2.rss_kib >= 64 * 1024
    # ... and every scan with the PSS metric
    pss = GuestFinder(matchers=["debian"], metric="pss", run_dir=tmp_path)
    pss.scan()
    [g3] = _ours(pss.scan(), [p]).values()
    assert g3.pss_kib is not None and committed_kib([g3], "pss") == g3.pss_kib


def test_a_guest_that_exits_is_dropped(fakes, tmp_path):
    p = fakes.start("qemu-system-x86_64", "qemu-system-x86_64", ["-enable-kvm"])
    finder = GuestFinder(matchers=["debian"], run_dir=tmp_path)
    assert p.pid in _ours(finder.scan(), [p])
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.pid not in _ours(finder.scan(), [p])
    assert p.pid not in finder._cache


def test_a_process_that_execs_qemu_after_it_was_seen_is_found(tmp_path, fakes):
    """libvirt forks, runs its hooks, then execs QEMU: a scan in between must not cache 'no'."""
    link = fakes.link("qemu-system-x86_64")
    go = tmp_path / "go"
    code = textwrap.dedent(f"""
        import os, time
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        os.execv({str(link)!r}, ["qemu-system-x86_64", "-I", "-S", "-c", {HOLD!r}, "-enable-kvm", "-m", "4"])
    """)
    # the child runs its parent's command line until it execs (a fork without exec)
    child = subprocess.Popen([sys.executable, "-c", f"import os\nif os.fork() == 0:\n exec({code!r})\nos.wait()"],
                             stdout=subprocess.PIPE)
    fakes.procs.append(child)
    finder = GuestFinder(matchers=["debian"], run_dir=tmp_path)
    deadline = time.monotonic() + 5
    while True:  # the forked grandchild exists, and is no guest yet
        kids = [int(p) for p in Path(f"/proc/{child.pid}/task/{child.pid}/children").read_text().split()]
        if kids:
            break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    grandchild = kids[0]
    assert grandchild not in {g.pid for g in finder.scan()}
    go.write_text("")
    deadline = time.monotonic() + 10
    while grandchild not in {g.pid for g in finder.scan()}:
        assert time.monotonic() < deadline, "the exec'd guest was never found"
        time.sleep(0.05)
    os.kill(grandchild, signal.SIGKILL)


def test_procfs_is_honoured(fakes, tmp_path):
    """A container's view: only the processes under --procfs exist."""
    a = fakes.start("qemu-system-x86_64", "qemu-system-x86_64", ["-enable-kvm", "-name", "a"])
    b = fakes.start("qemu-system-x86_64", "qemu-system-x86_64", ["-enable-kvm", "-name", "b"])
    procfs = tmp_path / "proc"
    procfs.mkdir()
    for name in ("stat", "uptime", "loadavg", "meminfo", str(a.pid)):
        (procfs / name).symlink_to(f"/proc/{name}")
    found = GuestFinder(procfs=procfs, run_dir=tmp_path).scan()
    assert [(g.pid, g.name) for g in found] == [(a.pid, "a")]
    assert b.pid not in {g.pid for g in found}


def test_pid_files_name_guests_and_stale_ones_are_ignored(fakes, tmp_path):
    run = tmp_path / "run"
    (run / "libvirt/qemu").mkdir(parents=True)
    (run / "qemu-server").mkdir(parents=True)
    # a TCG guest of libvirt: only its pid file says it is libvirt's
    tcg = fakes.start("qemu-system-x86_64", "/usr/bin/qemu-system-x86_64", ["-name", "guest=tcg1", "-accel", "tcg"])
    (run / "libvirt/qemu/tcg1.pid").write_text(f"{tcg.pid}")
    # a Proxmox guest, named by its VMID
    pve = fakes.start("kvm", "/usr/bin/kvm", ["-id", "101"])
    (run / "qemu-server/101.pid").write_text(f"{pve.pid}\n")
    # a pid file naming a process that is no QEMU (e.g. a helper daemon's pid file)
    helper = fakes.start("python3", "python3", ["helper"])
    (run / "libvirt/qemu/tcg1-helper.pid").write_text(f"{helper.pid}")
    # a stale pid file: its pid now belongs to a process started after it was written
    later = fakes.start("qemu-system-x86_64", "/usr/bin/qemu-system-x86_64", ["-accel", "tcg", "-name", "late"])
    stale = run / "libvirt/qemu/old.pid"
    stale.write_text(f"{later.pid}")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    (run / "libvirt/qemu/garbage.pid").write_text("not a pid")

    finder = GuestFinder(matchers=["libvirt", "proxmox"], run_dir=run)
    found = _ours(finder.scan(), fakes.procs)
    assert set(found) == {tcg.pid, pve.pid}
    assert (found[tcg.pid].matcher, found[tcg.pid].name, found[tcg.pid].pidfile) == (
        "libvirt", "tcg1", str(run / "libvirt/qemu/tcg1.pid"))
    assert (found[pve.pid].matcher, found[pve.pid].name) == ("proxmox", "101")
    # without the pid file directory, the TCG guest is no libvirt guest
    assert tcg.pid not in _ours(GuestFinder(matchers=["libvirt"], run_dir=tmp_path / "none").scan(), fakes.procs)


def test_cli_guests_json(fakes, tmp_path):
    p = fakes.start("qemu-system-x86_64", "qemu-system-x86_64", ["-enable-kvm", "-name", "guest=cli1"], mib=16)
    conf = tmp_path / "ksmtuned.conf"
    conf.write_text("KSM_GUEST_MATCH=debian\nKSM_PS_METRIC=pss\n")
    r = subprocess.run([sys.executable, "-m", "ksmtuned", "guests", "--json", "--config", str(conf)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["matchers"] == ["debian"] and doc["metric"] == "pss"
    [g] = [g for g in doc["guests"] if g["pid"] == p.pid]
    assert g["name"] == "cli1" and g["matcher"] == "debian" and g["rss_kib"] >= 16 * 1024
    assert g["pss_kib"] > 0 and g["thp_kib"] is not None and g["ksm_merging_pages"] is not None
    assert doc["committed_kib"] == sum(x["pss_kib"] for x in doc["guests"])
    r = subprocess.run([sys.executable, "-m", "ksmtuned", "guests", "--config", str(conf)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if line.split()[:1] == [str(p.pid)])
    assert line.split()[1:3] == ["cli1", "debian"]
    assert "committed (pss):" in r.stdout


# -------------------------------------------------------------------------------------------
# a fake /proc: pid reuse and the THP warning, which the kernel cannot give on demand

BOOT = 1_700_000_000


def _fake_proc(procfs: Path, pid: int, comm: str, argv: list[str], start_ticks: int, rss_pages: int = 2560,
               thp_kib: int = 0, ppid: int = 1, flags: int = 0) -> None:
    d = procfs / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    stat = [str(pid), f"({comm})", "S", str(ppid)] + ["0"] * 17 + [str(start_ticks)] + ["0"] * 30
    stat[8] = str(flags)  # field 9
    (d / "stat").write_text(" ".join(stat) + "\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (d / "statm").write_text(f"{rss_pages * 2} {rss_pages} 0 0 0 0 0\n")
    (d / "status").write_text(f"Name:\t{comm}\nUid:\t0\t0\t0\t0\n")
    (d / "smaps_rollup").write_text(f"Rss: {rss_pages * 4} kB\nPss: {rss_pages * 2} kB\nAnonHugePages: {thp_kib} kB\n")
    (d / "ksm_stat").write_text("ksm_rmap_items 0\nksm_merging_pages 5\nksm_process_profit 100\nksm_mergeable: yes\n")


def _replace_proc(procfs: Path, pid: int, *args, **kw) -> None:
    """A new process under an old pid: a new directory (a new inode, as /proc gives)."""
    import shutil

    _fake_proc(procfs / "new", pid, *args, **kw)
    shutil.rmtree(procfs / str(pid))
    (procfs / "new" / str(pid)).rename(procfs / str(pid))
    (procfs / "new").rmdir()


@pytest.fixture
def fakeproc(tmp_path):
    procfs = tmp_path / "proc"
    procfs.mkdir()
    (procfs / "stat").write_text(f"cpu 0 0 0 0\nbtime {BOOT}\n")
    (procfs / "uptime").write_text("100000.00 1.00\n")
    (procfs / "loadavg").write_text("0.00 0.00 0.00 1/100 4242\n")
    return procfs


def test_a_reused_pid_is_never_the_old_guest(fakeproc, tmp_path, caplog):
    _fake_proc(fakeproc, 4242, "qemu-system-x86", ["qemu-system-x86_64", "-enable-kvm", "-name", "old"], 1000)
    finder = GuestFinder(procfs=fakeproc, matchers=["debian"], run_dir=tmp_path)
    [g] = finder.scan()
    assert (g.pid, g.name) == (4242, "old")
    # the guest exits and pid 4242 goes to a shell; the kernel's pid cursor moved
    _replace_proc(fakeproc, 4242, "bash", ["bash"], 9000000)
    (fakeproc / "loadavg").write_text("0.00 0.00 0.00 1/101 4242\n")
    assert finder.scan() == []
    # and the other way round: a guest gets the pid a non-guest had
    _replace_proc(fakeproc, 4242, "qemu-system-x86", ["qemu-system-x86_64", "-enable-kvm", "-name", "new"], 9500000)
    (fakeproc / "loadavg").write_text("0.00 0.00 0.00 1/102 4242\n")
    [g] = finder.scan()
    assert g.name == "new"


def test_unchanged_process_table_reads_no_command_line(fakeproc, tmp_path):
    _fake_proc(fakeproc, 10, "qemu-system-x86", ["qemu-system-x86_64", "-enable-kvm"], 1000)
    _fake_proc(fakeproc, 11, "sleep", ["sleep", "100"], 1000)
    finder = GuestFinder(procfs=fakeproc, matchers=["debian"], run_dir=tmp_path)
    assert [g.pid for g in finder.scan()] == [10]
    # were the command lines read again, the sleep would now be a guest
    (fakeproc / "11" / "cmdline").write_bytes(b"qemu-system-x86_64\0-enable-kvm\0")
    assert [g.pid for g in finder.scan()] == [10]
    (fakeproc / "loadavg").write_text("0.00 0.00 0.00 1/100 4243\n")  # a pid was allocated
    assert [g.pid for g in finder.scan()] == [10]  # ... but /proc/11 is the same directory


@pytest.mark.parametrize("after_exec", [
    ("bash", ["qemu-system-x86_64", "-enable-kvm"]),  # a new command line, the same name
    ("qemu-kvm", ["bash", "/usr/lib/hook"]),  # a new name, the same command line
])
def test_a_young_fork_that_execs_is_seen_at_the_next_scan(fakeproc, tmp_path, after_exec):
    """A forked child still runs its parent's program and is looked at again each scan while
    young; an exec that changes its name or its command line alone is seen."""
    young = 100000 * CLK_TCK - 5 * CLK_TCK  # started 5 s ago (uptime 100000 s)
    _fake_proc(fakeproc, 30, "bash", ["bash", "/usr/lib/hook"], 1000)
    _fake_proc(fakeproc, 31, "bash", ["bash", "/usr/lib/hook"], young, ppid=30)
    finder = GuestFinder(procfs=fakeproc, matchers=["redhat", "debian"], run_dir=tmp_path)
    assert finder.scan() == [] and 31 in finder._young
    assert finder.scan() == [] and 31 in finder._young  # looked at again: nothing changed
    comm, argv = after_exec
    _fake_proc(fakeproc, 31, comm, argv, young, ppid=30)  # no new pid: only the look again sees it
    assert [g.pid for g in finder.scan()] == [31]
    assert 31 not in finder._young


def test_a_young_fork_that_has_not_exec_d_is_looked_at_through_its_stat_alone(fakeproc, tmp_path):
    """The kernel sets PF_FORKNOEXEC at fork and clears it in execve: while it is set and the
    parent and name are the same, the command line is not read again; once it is clear, it is."""
    young = 100000 * CLK_TCK - 5 * CLK_TCK
    _fake_proc(fakeproc, 30, "bash", ["bash", "/usr/lib/hook"], 1000)
    _fake_proc(fakeproc, 31, "bash", ["bash", "/usr/lib/hook"], young, ppid=30, flags=PF_FORKNOEXEC | 0x400000)
    finder = GuestFinder(procfs=fakeproc, matchers=["redhat", "debian"], run_dir=tmp_path)
    assert finder.scan() == [] and 31 in finder._young
    reads = finder.argv_reads
    assert finder.scan() == [] and finder.argv_reads == reads and 31 in finder._young
    # the command line alone changed (no exec: the flag is still set): not looked at
    (fakeproc / "31" / "cmdline").write_bytes(b"qemu-system-x86_64\0-enable-kvm\0")
    assert finder.scan() == [] and finder.argv_reads == reads
    # a new parent (reparented: the -daemonize case) is looked at in full
    _fake_proc(fakeproc, 31, "bash", ["qemu-system-x86_64", "-enable-kvm"], young, ppid=1, flags=PF_FORKNOEXEC)
    assert [g.pid for g in finder.scan()] == [31] and finder.argv_reads > reads


def test_a_young_fork_that_grows_old_without_exec_is_final(fakeproc, tmp_path):
    young = 100000 * CLK_TCK - 5 * CLK_TCK
    _fake_proc(fakeproc, 30, "bash", ["bash"], 1000)
    _fake_proc(fakeproc, 31, "bash", ["bash"], young, ppid=30, flags=PF_FORKNOEXEC)
    finder = GuestFinder(procfs=fakeproc, matchers=["debian"], run_dir=tmp_path)
    finder.scan()
    assert 31 in finder._young
    (fakeproc / "uptime").write_text(f"{100000 + YOUNG_S:.2f} 1.00\n")
    finder.scan()
    assert 31 not in finder._young


def test_a_real_fork_is_read_once_until_it_execs(tmp_path):
    """Against the real kernel: a forked child that has not exec'd costs one stat read per scan;
    its exec (into a guest-looking program) is seen at the next scan."""
    go = tmp_path / "go"
    link = tmp_path / "qemu-system-x86_64"
    link.symlink_to(os.path.realpath(sys.executable))
    code = textwrap.dedent(f"""
        import os, sys, time
        pid = os.fork()
        if pid == 0:
            while not os.path.exists({str(go)!r}):
                time.sleep(0.01)
            os.execv({str(link)!r}, ["qemu-system-x86_64", "-I", "-S", "-c", {HOLD!r}, "-enable-kvm", "-m", "4"])
        print(pid, flush=True)
        os.wait()
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        finder = GuestFinder(matchers=["debian"], run_dir=tmp_path)
        assert child not in {g.pid for g in finder.scan()}
        assert child in finder._young
        flags = int(Path(f"/proc/{child}/stat").read_text().rpartition(")")[2].split()[6])
        assert flags & PF_FORKNOEXEC, "the kernel shows PF_FORKNOEXEC on a fork that has not exec'd"
        # the real /proc: a process started elsewhere on the machine meanwhile is read once too, so
        # a quiet pair of scans out of a few attempts; the fork, re-read, would spoil every one
        for _attempt in range(5):
            reads = finder.argv_reads
            finder.scan()
            finder.scan()
            if finder.argv_reads == reads:
                break
        assert finder.argv_reads == reads, "a fork that has not exec'd had its command line read again"
        go.write_text("")
        deadline = time.monotonic() + 10
        while child not in {g.pid for g in finder.scan()}:
            assert time.monotonic() < deadline, "the exec'd guest was never found"
            time.sleep(0.05)
    finally:
        os.kill(child, signal.SIGKILL)
        parent.wait(10)


def test_a_zombie_is_not_looked_at_again(tmp_path):
    """A zombie's command line is empty, as a process's inside execve(); but a zombie never
    runs again, so it is not read again each scan as a maybe-exec'ing process is."""
    child = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never became a zombie"
            time.sleep(0.01)
        finder = GuestFinder(matchers=["debian"], run_dir=tmp_path)
        finder.scan()
        assert child.pid in finder._cache and child.pid not in finder._young
        assert child.pid not in {g.pid for g in finder.scan()} and child.pid not in finder._young
    finally:
        child.wait()


def test_thp_warning_once_per_guest(fakeproc, tmp_path, caplog):
    _fake_proc(fakeproc, 20, "qemu-system-x86", ["qemu-system-x86_64", "-enable-kvm", "-name", "big"], 1000,
               rss_pages=65536, thp_kib=200 * 1024)
    _fake_proc(fakeproc, 21, "qemu-system-x86", ["qemu-system-x86_64", "-enable-kvm", "-name", "small"], 1000,
               rss_pages=65536, thp_kib=2048)
    finder = GuestFinder(procfs=fakeproc, matchers=["debian"], run_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="ksmtuned.engine.guests"):
        gs = {g.name: g for g in finder.scan(details=True)}
        finder.scan(details=True)
        finder.scan()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "big (pid 20): 200 MiB of its 256 MiB" in warnings[0] and "transparent huge pages" in warnings[0]
    assert gs["big"].thp_warning and not gs["small"].thp_warning
    assert gs["big"].ksm_merging_pages == 5 and gs["big"].ksm_profit_bytes == 100 and gs["big"].ksm_mergeable


def test_thp_check_takes_anonhugepages_from_the_callers_meminfo(fakeproc, tmp_path, caplog):
    """The daemon passes the /proc/meminfo it read for the tick; the finder reads it only without."""
    _fake_proc(fakeproc, 20, "qemu-system-x86", ["qemu-system-x86_64", "-enable-kvm", "-name", "big"], 1000,
               rss_pages=65536, thp_kib=200 * 1024)
    (fakeproc / "meminfo").write_text("MemTotal: 1000000 kB\nAnonHugePages: 0 kB\n")
    with caplog.at_level(logging.WARNING, logger="ksmtuned.engine.guests"):
        # its own reading: no THP on the host, so no smaps_rollup walk and no warning
        [g] = GuestFinder(procfs=fakeproc, matchers=["debian"], run_dir=tmp_path).scan()
        assert g.thp_kib is None
        # the caller's reading wins over the file
        finder = GuestFinder(procfs=fakeproc, matchers=["debian"], run_dir=tmp_path)
        [g] = finder.scan(meminfo={"MemTotal": 1000000, "AnonHugePages": 0})
        assert g.thp_kib is None
        assert not caplog.records
        [g] = finder.scan(meminfo={"MemTotal": 1000000, "AnonHugePages": 4096})
        assert g.thp_kib == 200 * 1024 and g.thp_warning
    assert ["big (pid 20): 200 MiB" in r.getMessage() for r in caplog.records] == [True]


def test_the_daemons_thp_warning_follows_its_own_meminfo_reading(fakeproc, tmp_path, caplog):
    from ksmtuned.core.config import build_settings
    from ksmtuned.engine.daemon import Daemon
    from ksmtuned.kernel.ksm import KsmSysfs
    from tests.daemon_support import fake_ksm_dir
    from tests.faultrig import meminfo_text

    _fake_proc(fakeproc, 20, "qemu-system-x86", ["qemu-system-x86_64", "-enable-kvm", "-name", "big"], 1000,
               rss_pages=65536, thp_kib=200 * 1024)
    (fakeproc / "meminfo").write_text(meminfo_text() + "AnonHugePages: 0 kB\n")
    loaded = build_settings([], {"KSM_GUEST_MATCH": "debian"}, "none")
    d = Daemon(loaded, KsmSysfs(fake_ksm_dir(tmp_path)), procfs=fakeproc, run_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="ksmtuned.engine.guests"):
        report = d.adjust("interval")
        assert [g.thp_kib for g in report.guests] == [None] and report.error is None
        assert not caplog.records
        (fakeproc / "meminfo").write_text(meminfo_text() + "AnonHugePages: 4096 kB\n")
        report = d.adjust("interval")
        assert [g.thp_kib for g in report.guests] == [200 * 1024]
    assert ["big (pid 20): 200 MiB" in r.getMessage() for r in caplog.records] == [True]


def test_a_fork_of_a_guest_is_not_a_second_guest(fakes, tmp_path):
    """QEMU forks to run helper scripts: before exec, the child looks exactly like its guest."""
    code = textwrap.dedent("""
        import os, signal, sys
        ram = bytearray(b"\\x5a") * (4 << 20)
        if os.fork() == 0:
            signal.pause()
        print("ready", flush=True)
        signal.pause()
    """)
    p = subprocess.Popen(["qemu-system-x86_64", "-I", "-S", "-c", code, "-enable-kvm"],
                         executable=fakes.link("qemu-system-x86_64"), stdout=subprocess.PIPE)
    fakes.procs.append(p)
    assert p.stdout.readline() == b"ready\n"
    kids = [int(x) for x in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()]
    assert len(kids) == 1
    try:
        found = {g.pid for g in GuestFinder(matchers=["debian"], run_dir=tmp_path).scan()}
        assert p.pid in found and kids[0] not in found
    finally:
        os.kill(kids[0], signal.SIGKILL)


def test_a_daemonized_guest_is_found_once_its_parent_exits(fakes, tmp_path):
    """QEMU -daemonize (Proxmox): the child with the same command line is the guest."""
    code = textwrap.dedent("""
        import os, signal, sys, time
        if os.fork() == 0:
            ram = bytearray(b"\\x5a") * (4 << 20)
            print(os.getpid(), flush=True)
            signal.pause()
        sys.stdin.readline()
    """)
    p = subprocess.Popen(["qemu-system-x86_64", "-I", "-S", "-c", code, "-enable-kvm"],
                         executable=fakes.link("qemu-system-x86_64"), stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    fakes.procs.append(p)
    child = int(p.stdout.readline())
    try:
        finder = GuestFinder(matchers=["debian"], run_dir=tmp_path)
        assert {p.pid, child} & {g.pid for g in finder.scan()} == {p.pid}
        p.stdin.write(b"go\n")
        p.stdin.flush()
        p.wait()
        assert {p.pid, child} & {g.pid for g in finder.scan()} == {child}
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_guest_s_files_stay_open_while_it_lives_and_close_when_it_exits(fakes, tmp_path):
    """On the real /proc the finder keeps each guest's statm and ksm_stat open (one pread per
    scan); a guest that exits takes its descriptors with it, and a new finder after reload
    closes the old one's."""
    g = fakes.start("qemu-system-x86_64", "qemu-system-x86_64", ["-enable-kvm", "-name", "kept"])
    finder = GuestFinder(matchers=["debian"], run_dir=tmp_path)
    assert g.pid in _ours(finder.scan(), [g])
    prefix = f"/proc/{g.pid}/"
    kept = sorted(p for p in finder._files._fds if p.startswith(prefix))
    assert kept == [prefix + "ksm_stat", prefix + "statm"]
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        assert g.pid in _ours(finder.scan(), [g])
    assert len(os.listdir("/proc/self/fd")) == fds  # read again, not opened again
    os.kill(g.pid, signal.SIGKILL)
    g.wait()
    assert g.pid not in _ours(finder.scan(), [g])
    assert not [p for p in finder._files._fds if p.startswith(prefix)]
    finder.close()
    assert len(finder._files) == 0
