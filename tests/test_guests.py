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
from ksmtuned.engine.guests import YOUNG_S, Guest, GuestFinder, committed_kib, guest_name, make_matcher
from tests.fakes.guests import HOLD, FakeGuests
from tests.fakes.proc import FakeProc, meminfo_text, using_procfs

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
    finder = GuestFinder.from_settings(load_config(conf, env={}).settings)
    assert finder.matcher_names == ("proxmox", "regex:^/opt/vm")
    assert finder.metric == "pss"
    assert finder.trust == ("root", "hypervisor", "pidfile", "machine-slice")


# -------------------------------------------------------------------------------------------
# real fake guests

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
    assert p.pid not in _ours(finder.scan(details=True), [p])


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
    for name in ("stat", "uptime", "meminfo", str(a.pid)):
        (procfs / name).symlink_to(f"/proc/{name}")
    with using_procfs(procfs):
        found = GuestFinder(run_dir=tmp_path).scan()
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
    assert doc["committed_kib"] == sum(x["pss_kib"] for x in doc["guests"] if x["trusted"])  # untrusted: not counted
    r = subprocess.run([sys.executable, "-m", "ksmtuned", "guests", "--config", str(conf)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if line.split()[:1] == [str(p.pid)])
    assert line.split()[1:3] == ["cli1", "debian"]
    assert "committed (pss):" in r.stdout


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


def test_a_zombie_is_not_a_guest_and_not_looked_at_again(tmp_path):
    """A zombie's command line is empty, as a process's inside execve(); but a zombie never
    runs again, so it is not looked at again each scan as a maybe-exec'ing process is."""
    child = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never became a zombie"
            time.sleep(0.01)
        finder = GuestFinder(matchers=["debian"], run_dir=tmp_path)
        finder.scan()
        assert child.pid not in {g.pid for g in finder.scan()}
        assert child.pid not in finder.table.young()
    finally:
        child.wait()


# -------------------------------------------------------------------------------------------
# a fake /proc: pid reuse, a fork that has not exec'd, the THP warning, which the kernel
# cannot give on demand


@pytest.fixture
def fakeproc(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    with using_procfs(proc.root):
        yield proc


def test_a_reused_pid_is_never_the_old_guest(fakeproc, tmp_path):
    fakeproc.process(4242, "qemu-system-x86", ["qemu-system-x86_64", "-enable-kvm", "-name", "old"], 1000)
    finder = GuestFinder(matchers=["debian"], run_dir=tmp_path)
    [g] = finder.scan()
    assert (g.pid, g.name) == (4242, "old")
    # the guest exits and pid 4242 goes to a shell
    fakeproc.replace(4242, "bash", ["bash"], 9000000)
    assert finder.scan() == []
    # and the other way round: a guest gets the pid a non-guest had
    fakeproc.replace(4242, "qemu-system-x86", ["qemu-system-x86_64", "-enable-kvm", "-name", "new"], 9500000)
    [g] = finder.scan()
    assert g.name == "new"


def test_unchanged_process_table_reads_no_command_line(fakeproc, tmp_path):
    fakeproc.process(10, "qemu-system-x86", ["qemu-system-x86_64", "-enable-kvm"], 1000)
    fakeproc.process(11, "sleep", ["sleep", "100"], 1000)
    finder = GuestFinder(matchers=["debian"], run_dir=tmp_path)
    assert [g.pid for g in finder.scan()] == [10]
    # were the command lines read again, the sleep would now be a guest: /proc/11 is the same
    # directory, so the same process, whose verdict stands
    (fakeproc.root / "11" / "cmdline").write_bytes(b"qemu-system-x86_64\0-enable-kvm\0")
    assert [g.pid for g in finder.scan()] == [10]
    assert [g.pid for g in finder.scan()] == [10]


def _young_fork(fakeproc, now_s, comm="bash", argv=("bash", "/usr/lib/hook")):
    fakeproc.process(30, "bash", ["bash", "/usr/lib/hook"], 1000)
    fakeproc.process(31, comm, list(argv), fakeproc.started_ago_ticks(5, now_s), ppid=30)


@pytest.mark.parametrize("after_exec", [
    ("bash", ["qemu-system-x86_64", "-enable-kvm"]),  # a new command line, the same name
    ("qemu-kvm", ["bash", "/usr/lib/hook"]),  # a new name, the same command line
])
def test_a_young_fork_that_execs_is_seen_at_the_next_scan(fakeproc, tmp_path, after_exec):
    """A forked child still runs its parent's program and is looked at again each scan while
    young; an exec that changes its name or its command line alone is seen."""
    _young_fork(fakeproc, time.time())
    finder = GuestFinder(matchers=["redhat", "debian"], run_dir=tmp_path)
    assert finder.scan() == []
    assert finder.scan() == []  # looked at again: nothing changed
    comm, argv = after_exec
    # the same directory (no new pid, no new inode): only the look again sees it
    fakeproc.process(31, comm, argv, fakeproc.started_ago_ticks(5, time.time()), ppid=30)
    assert [g.pid for g in finder.scan()] == [31]


def test_a_young_fork_that_grows_old_without_exec_is_final(fakeproc, tmp_path):
    now = [time.time()]
    _young_fork(fakeproc, now[0])
    finder = GuestFinder(matchers=["debian"], run_dir=tmp_path, wall_clock=lambda: now[0])
    assert finder.scan() == []
    now[0] += YOUNG_S
    assert finder.scan() == []  # looked at once more: now old, and final
    (fakeproc.root / "31" / "cmdline").write_bytes(b"qemu-system-x86_64\0-enable-kvm\0")
    assert finder.scan() == []


def test_thp_warning_once_per_guest(fakeproc, tmp_path, caplog):
    fakeproc.process(20, "qemu-system-x86", ["qemu-system-x86_64", "-enable-kvm", "-name", "big"], 1000,
                     rss_pages=65536, thp_kib=200 * 1024)
    fakeproc.process(21, "qemu-system-x86", ["qemu-system-x86_64", "-enable-kvm", "-name", "small"], 1000,
                     rss_pages=65536, thp_kib=2048)
    finder = GuestFinder(matchers=["debian"], run_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="ksmtuned.engine.guests"):
        gs = {g.name: g for g in finder.scan(details=True)}
        finder.scan(details=True)
        finder.scan()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "big (pid 20): 200 MiB of its 256 MiB" in warnings[0] and "transparent huge pages" in warnings[0]
    assert gs["big"].thp_warning and not gs["small"].thp_warning
    assert gs["big"].ksm_merging_pages == 5 and gs["big"].ksm_profit_bytes == 100 and gs["big"].ksm_mergeable
    assert gs["big"].pss_kib == 65536 * 2 and gs["big"].rss_kib == 65536 * 4


def test_thp_check_takes_anonhugepages_from_the_callers_meminfo(fakeproc, tmp_path, caplog):
    """The daemon passes the /proc/meminfo it read for the tick; the finder reads it only without."""
    fakeproc.process(20, "qemu-system-x86", ["qemu-system-x86_64", "-enable-kvm", "-name", "big"], 1000,
                     rss_pages=65536, thp_kib=200 * 1024)
    fakeproc.meminfo("MemTotal: 1000000 kB\nAnonHugePages: 0 kB\n")
    with caplog.at_level(logging.WARNING, logger="ksmtuned.engine.guests"):
        # its own reading: no THP on the host, so no smaps_rollup walk and no warning
        [g] = GuestFinder(matchers=["debian"], run_dir=tmp_path).scan()
        assert g.thp_kib is None
        # the caller's reading wins over the file
        finder = GuestFinder(matchers=["debian"], run_dir=tmp_path)
        [g] = finder.scan(meminfo_fields={"MemTotal": 1000000, "AnonHugePages": 0})
        assert g.thp_kib is None
        assert not caplog.records
        [g] = finder.scan(meminfo_fields={"MemTotal": 1000000, "AnonHugePages": 4096})
        assert g.thp_kib == 200 * 1024 and g.thp_warning
    assert ["big (pid 20): 200 MiB" in r.getMessage() for r in caplog.records] == [True]


def test_the_daemons_thp_warning_follows_its_own_meminfo_reading(fakeproc, tmp_path, caplog):
    from ksmtuned.core.config import build_settings
    from ksmtuned.engine.daemon import Daemon
    from ksmtuned.kernel.ksm import KsmSysfs
    from tests.fakes.ksm import fake_ksm_dir

    fakeproc.process(20, "qemu-system-x86", ["qemu-system-x86_64", "-enable-kvm", "-name", "big"], 1000,
                     rss_pages=65536, thp_kib=200 * 1024)
    fakeproc.meminfo(meminfo_text(anon_huge_kib=0))
    loaded = build_settings([], {"KSM_GUEST_MATCH": "debian"}, "none")
    d = Daemon(loaded, KsmSysfs(fake_ksm_dir(tmp_path / "ksm")), procfs=fakeproc.root, run_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="ksmtuned.engine.guests"):
        report = d.adjust("interval")
        assert [g.thp_kib for g in report.guests] == [None] and report.error is None
        assert not caplog.records
        fakeproc.meminfo(meminfo_text(anon_huge_kib=4096))
        report = d.adjust("interval")
        assert [g.thp_kib for g in report.guests] == [200 * 1024]
    assert ["big (pid 20): 200 MiB" in r.getMessage() for r in caplog.records] == [True]


# -------------------------------------------------------------------------------------------
# trust (KSM_GUEST_TRUST): whose guest-looking processes count


def test_trust_by_owner_pid_file_and_cgroup(fakeproc, tmp_path):
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid
    argv = ["qemu-system-x86_64", "-enable-kvm", "-name"]
    fakeproc.process(40, "qemu-system-x86", argv + ["rootvm"], 1000)
    fakeproc.process(41, "qemu-system-x86", argv + ["fake"], 1000, uid=nobody)
    fakeproc.process(42, "qemu-system-x86", argv + ["sliced"], 1000, uid=nobody)
    (fakeproc.root / "42" / "cgroup").write_text("0::/machine.slice/machine-qemu\\x2d1\\x2dsliced.scope/libvirt\n")
    fakeproc.process(43, "qemu-system-x86", argv + ["userslice"], 1000, uid=nobody)
    (fakeproc.root / "43" / "cgroup").write_text("0::/user.slice/user-65534.slice/machine.slice/x.scope\n")
    run = tmp_path / "run"
    (run / "libvirt/qemu").mkdir(parents=True)
    fakeproc.process(44, "qemu-system-x86", argv + ["pidfiled"], 1000, uid=nobody)
    (run / "libvirt/qemu/pidfiled.pid").write_text("44\n")

    def counted(trust):
        gs = GuestFinder(matchers=["debian", "libvirt"], run_dir=run, trust=trust).scan()
        assert {g.pid for g in gs} == {40, 41, 42, 43, 44}  # all are found and shown ...
        return {g.pid for g in gs if g.trusted}  # ... these count

    assert counted(("root", "hypervisor", "pidfile", "machine-slice")) == {40, 42, 44}
    assert counted(("root",)) == {40}
    assert counted(("machine-slice",)) == {42}  # a user's own .../machine.slice/ is not it
    assert counted(("pidfile",)) == {44}
    assert counted(("any",)) == {40, 41, 42, 43, 44}
    assert counted(("user:nobody",)) == {41, 42, 43, 44}
    [g] = [g for g in GuestFinder(matchers=["debian"], run_dir=run).scan() if g.pid == 41]
    assert (g.uid, g.user, g.trusted) == (nobody, "nobody", False)
    # the daemon's scan leaves them out, and committed memory never counts them
    daemon_view = GuestFinder(matchers=["debian"], run_dir=run).scan(untrusted=False)
    assert {g.pid for g in daemon_view} == {40, 42}
    every = GuestFinder(matchers=["debian"], run_dir=run).scan()
    assert committed_kib(every) == committed_kib(daemon_view)


def test_a_pid_file_others_can_write_vouches_for_nothing(fakeproc, tmp_path):
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid
    run = tmp_path / "run"
    (run / "libvirt/qemu").mkdir(parents=True)
    os.chmod(run / "libvirt/qemu", 0o777)
    fakeproc.process(44, "qemu-system-x86", ["qemu-system-x86_64", "-name", "x"], 1000, uid=nobody)
    (run / "libvirt/qemu/x.pid").write_text("44\n")
    [g] = GuestFinder(matchers=["libvirt"], run_dir=run, trust=("pidfile",)).scan()
    assert (g.pid, g.pidfile is not None, g.trusted) == (44, True, False)


def test_the_kept_command_line_is_bounded(fakeproc, tmp_path):
    """A guest with a huge command line is found (its -enable-kvm is at the end), but only
    ARGV_KEEP_BYTES of it are kept (issue 11, class 3)."""
    from ksmtuned.core.matchers import ARGV_KEEP_BYTES

    argv = ["qemu-system-x86_64", "-name", "guest=huge"] + ["x" * 1000] * 2000 + ["-enable-kvm"]
    fakeproc.process(50, "qemu-system-x86", argv, 1000)
    [g] = GuestFinder(matchers=["debian"], run_dir=tmp_path).scan()
    assert g.name == "huge"
    assert sum(len(a) for a in g.cmdline) <= ARGV_KEEP_BYTES
    assert g.cmdline[:3] == ("qemu-system-x86_64", "-name", "guest=huge")


def test_untrusted_guests_are_logged_rarely(fakeproc, tmp_path, caplog):
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid
    for pid in (60, 61):
        fakeproc.process(pid, "qemu-system-x86", ["qemu-system-x86_64", "-enable-kvm", "-name", f"f{pid}"], 1000,
                         uid=nobody)
    finder = GuestFinder(matchers=["debian"], run_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="ksmtuned.engine.guests"):
        for _ in range(5):
            assert finder.scan(untrusted=False) == []
    [record] = caplog.records
    assert "2 guest-looking process(es)" in record.getMessage() and "user nobody" in record.getMessage()


def test_check_finds_pid_file_guests_under_run_dir(fakes, tmp_path):
    """`check --run-dir` reads libvirt's pid files there, as the daemon and `guests` do (issue 10:
    check ignored the option and looked under /run)."""
    run = tmp_path / "run"
    (run / "libvirt/qemu").mkdir(parents=True)
    # a TCG guest: no -enable-kvm, so only its pid file says it is a guest
    tcg = fakes.start("qemu-system-x86_64", "/usr/bin/qemu-system-x86_64", ["-name", "guest=tcg9", "-accel", "tcg"])
    (run / "libvirt/qemu/tcg9.pid").write_text(f"{tcg.pid}")
    conf = tmp_path / "ksmtuned.conf"
    conf.write_text("KSM_GUEST_MATCH=libvirt\n")
    found = {}
    for run_dir in (run, tmp_path / "elsewhere"):
        r = subprocess.run([sys.executable, "-m", "ksmtuned", "check", "--json", "--config", str(conf),
                            "--insecure-config", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=60)
        assert r.returncode in (0, 5), r.stderr  # 5: a host check failed (this VM has no swap)
        found[run_dir] = {g["pid"]: g["name"] for g in json.loads(r.stdout)["host"]["guests"]}
    assert found[run].get(tcg.pid) == "tcg9"
    assert tcg.pid not in found[tmp_path / "elsewhere"]
