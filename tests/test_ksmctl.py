"""ksmctl start|stop, what ksm.service runs."""

import os
import subprocess
import sys

import pytest

from tests.daemon_support import fake_ksm_dir


def ksmctl(*args, env=None):
    return subprocess.run([sys.executable, "-c", "import sys; from ksmtuned.cli import ksmctl_main; "
                           "sys.exit(ksmctl_main())", *args], capture_output=True, text=True, timeout=30,
                          env=env)


def test_start_and_stop(tmp_path):
    ksm = fake_ksm_dir(tmp_path)
    r = ksmctl("start", "--sysfs", str(ksm), "--defaults", str(tmp_path / "none"))
    assert r.returncode == 0, r.stderr
    assert (ksm / "run").read_text() == "1"
    assert not (ksm / "max_kernel_pages").exists()  # modern kernels have no such file: not created
    assert ksmctl("stop", "--sysfs", str(ksm)).returncode == 0
    assert (ksm / "run").read_text() == "0"


@pytest.mark.parametrize("defaults,env,expected", [
    ("KSM_MAX_KERNEL_PAGES=1000\n", {}, "1000"),
    ("# KSM_MAX_KERNEL_PAGES=\n", {}, None),  # unset: half of RAM in pages
    ("KSM_MAX_KERNEL_PAGES=1000\n", {"KSM_MAX_KERNEL_PAGES": "77"}, "77"),  # EnvironmentFile= of the unit
])
def test_max_kernel_pages_on_old_kernels(tmp_path, defaults, env, expected):
    ksm = fake_ksm_dir(tmp_path)
    (ksm / "max_kernel_pages").write_text("0\n")
    d = tmp_path / "ksm.default"
    d.write_text(defaults)
    environ = {k: v for k, v in os.environ.items() if k != "KSM_MAX_KERNEL_PAGES"} | env
    r = ksmctl("start", "--sysfs", str(ksm), "--defaults", str(d), env=environ)
    assert r.returncode == 0, r.stderr
    if expected is None:
        total_kib = int(open("/proc/meminfo").readline().split()[1])
        expected = str(total_kib // 4 // 2)
    assert (ksm / "max_kernel_pages").read_text() == expected
    assert (ksm / "run").read_text() == "1"


def test_bad_defaults_value_names_the_file(tmp_path):
    ksm = fake_ksm_dir(tmp_path)
    (ksm / "max_kernel_pages").write_text("0\n")
    d = tmp_path / "ksm.default"
    d.write_text("KSM_MAX_KERNEL_PAGES=lots\n")
    env = {k: v for k, v in os.environ.items() if k != "KSM_MAX_KERNEL_PAGES"}
    r = ksmctl("start", "--sysfs", str(ksm), "--defaults", str(d), env=env)
    assert r.returncode == 78 and f"{d}: KSM_MAX_KERNEL_PAGES: expected an integer, got 'lots'" in r.stderr
    assert (ksm / "run").read_text().strip() == "0"


def test_no_ksm_is_69(tmp_path):
    r = ksmctl("start", "--sysfs", str(tmp_path / "missing"))
    assert r.returncode == 69 and "this kernel has no KSM" in r.stderr


def test_usage_is_2():
    assert ksmctl("restart").returncode == 2


# --- where KSM_MAX_KERNEL_PAGES lives: /etc/default/ksm (Debian), /etc/sysconfig/ksm (Red Hat) ---

def test_the_default_files_are_debians_then_red_hats():
    from ksmtuned.cli import build_ksmctl_parser
    from ksmtuned.paths import KSM_DEFAULTS_FILES

    assert KSM_DEFAULTS_FILES == ("/etc/default/ksm", "/etc/sysconfig/ksm")
    assert build_ksmctl_parser().parse_args(["start"]).defaults is None  # None: both, in that order


@pytest.mark.parametrize("debian,redhat,expected", [
    (None, "KSM_MAX_KERNEL_PAGES=3000\n", "3000"),  # a RHEL host: only /etc/sysconfig/ksm
    ("KSM_MAX_KERNEL_PAGES=2000\n", "KSM_MAX_KERNEL_PAGES=3000\n", "2000"),  # the first that exists
    ("# nothing set\n", "KSM_MAX_KERNEL_PAGES=3000\n", None),  # it exists: not merged with the other
    (None, None, None),  # neither: half of RAM
])
def test_start_reads_the_first_defaults_file_that_exists(tmp_path, monkeypatch, debian, redhat, expected):
    from ksmtuned.commands import ksmctl as command

    monkeypatch.delenv("KSM_MAX_KERNEL_PAGES", raising=False)
    ksm = fake_ksm_dir(tmp_path)
    (ksm / "max_kernel_pages").write_text("0\n")
    files = []
    for name, text in (("default-ksm", debian), ("sysconfig-ksm", redhat)):
        files.append(str(tmp_path / name))
        if text is not None:
            (tmp_path / name).write_text(text)
    assert command.main("start", sysfs=str(ksm), procfs="/proc", defaults=files) == 0
    if expected is None:
        expected = str(int(open("/proc/meminfo").readline().split()[1]) // 4 // 2)
    assert (ksm / "max_kernel_pages").read_text() == expected
    assert (ksm / "run").read_text() == "1"


def test_a_bad_value_in_sysconfig_names_that_file(tmp_path, monkeypatch):
    from ksmtuned.commands import ksmctl as command
    from ksmtuned.errors import ConfigError

    monkeypatch.delenv("KSM_MAX_KERNEL_PAGES", raising=False)
    ksm = fake_ksm_dir(tmp_path)
    (ksm / "max_kernel_pages").write_text("0\n")
    (tmp_path / "sysconfig-ksm").write_text("KSM_MAX_KERNEL_PAGES=lots\n")
    with pytest.raises(ConfigError, match=f"^{tmp_path}/sysconfig-ksm: KSM_MAX_KERNEL_PAGES: expected an integer"):
        command.main("start", sysfs=str(ksm), procfs="/proc",
                     defaults=[str(tmp_path / "default-ksm"), str(tmp_path / "sysconfig-ksm")])
    assert (ksm / "run").read_text().strip() == "0"


# --- stop --unmerge ----------------------------------------------------------------------------

def fake_meminfo(tmp_path, available_kib: int):
    from pathlib import Path

    text = (Path(__file__).parent / "data" / "meminfo-small-vm-6.18").read_text()
    lines = [f"MemAvailable:   {available_kib} kB" if line.startswith("MemAvailable:") else line
             for line in text.splitlines()]
    procfs = tmp_path / "proc"
    procfs.mkdir()
    (procfs / "meminfo").write_text("\n".join(lines) + "\n")
    return procfs


@pytest.mark.parametrize("available_kib, warned", [(1024 * 1024, True), (8 * 1024 * 1024, False)])
def test_unmerge_warns_before_writing_when_memavailable_is_short(tmp_path, available_kib, warned):
    ksm = fake_ksm_dir(tmp_path)
    (ksm / "run").write_text("1\n")
    (ksm / "pages_sharing").write_text("1000000\n")  # 3.8 GiB to copy back at 4 KiB a page
    (ksm / "pages_shared").write_text("2000\n")
    procfs = fake_meminfo(tmp_path, available_kib)
    r = ksmctl("stop", "--unmerge", "--sysfs", str(ksm), "--procfs", str(procfs))
    assert r.returncode == 0, r.stderr
    assert (ksm / "run").read_text() == "2"
    lines = r.stderr.splitlines()
    assert lines[-2 if warned else 0].startswith(
        "ksmctl: unmerging: pages_sharing 1000000, pages_shared 2000 (3.8 GiB to copy back)"), r.stderr
    if warned:
        assert lines[0] == ("ksmctl: warning: unmerging needs 3.8 GiB for the pages KSM merged, but MemAvailable "
                            "is only 1.0 GiB: the host may swap, or the OOM killer may end a guest"), r.stderr
    else:
        assert "warning" not in r.stderr
    assert lines[-1].startswith("ksmctl: unmerged in ") and lines[-1].endswith("run=2"), r.stderr
    assert "\r" not in r.stderr  # not a terminal: no progress line redrawn in place
    assert r.stdout == ""


def test_unmerge_goes_with_stop_only(tmp_path):
    ksm = fake_ksm_dir(tmp_path)
    r = ksmctl("start", "--unmerge", "--sysfs", str(ksm))
    assert r.returncode == 2 and "--unmerge goes with stop" in r.stderr
    assert (ksm / "run").read_text().strip() == "0"


def test_plain_stop_leaves_merged_pages_merged(tmp_path):
    ksm = fake_ksm_dir(tmp_path)
    (ksm / "run").write_text("1\n")
    r = ksmctl("stop", "--sysfs", str(ksm))
    assert r.returncode == 0 and r.stderr == "" and (ksm / "run").read_text() == "0"


def test_version_and_help():
    from ksmtuned import __version__

    r = ksmctl("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"ksmctl (ksmtuned) {__version__}", r.stdout + r.stderr
    r = ksmctl("--help")
    assert r.returncode == 0 and "--unmerge" in r.stdout and "run=2" in r.stdout


@pytest.mark.root
@pytest.mark.ksm
def test_unmerge_on_the_real_ksm(real_ksm, tmp_path):
    """Real mergeable memory, merged by the real ksmd, then `ksmctl stop --unmerge`: the kernel
    unmerges everything (pages_sharing 0) and leaves run=2."""
    import time
    from contextlib import ExitStack

    from tests.daemon_support import start_mergeable

    pages_each = 16 * 1024 * 1024 // 4096
    with ExitStack() as stack:
        for _ in range(2):
            start_mergeable(stack, 16)
        for name, value in (("pages_to_scan", "5000"), ("sleep_millisecs", "10"), ("run", "1")):
            (real_ksm / name).write_text(value)
        deadline = time.monotonic() + 60
        while int((real_ksm / "pages_sharing").read_text()) < 0.9 * 2 * pages_each:
            assert time.monotonic() < deadline, f"not merged: pages_sharing {(real_ksm / 'pages_sharing').read_text()}"
            time.sleep(0.1)
        r = ksmctl("stop", "--unmerge")
        assert r.returncode == 0, r.stderr
        import re

        m = re.match(r"ksmctl: unmerging: pages_sharing (\d+), pages_shared (\d+) ", r.stderr)
        assert m and int(m.group(1)) >= 0.9 * 2 * pages_each and int(m.group(2)) >= 1, r.stderr
        assert r.stderr.splitlines()[-1].endswith("pages_sharing 0, pages_shared 0, run=2"), r.stderr
        assert (real_ksm / "pages_sharing").read_text().strip() == "0"
        assert (real_ksm / "pages_shared").read_text().strip() == "0"
        assert (real_ksm / "run").read_text().strip() == "2"


def test_unmerge_on_a_terminal_clears_its_progress_line(tmp_path):
    """On a terminal the progress line is redrawn in place ("\\r", erase to the end of line) and
    cleared before the last line; the stand-in's write returns at once, so no redraw is due."""
    import pty

    ksm = fake_ksm_dir(tmp_path)
    (ksm / "run").write_text("1\n")
    (ksm / "pages_sharing").write_text("10\n")
    procfs = fake_meminfo(tmp_path, 8 * 1024 * 1024)
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([sys.executable, "-c", "import sys; from ksmtuned.cli import ksmctl_main; "
                              "sys.exit(ksmctl_main())", "stop", "--unmerge", "--sysfs", str(ksm),
                              "--procfs", str(procfs)], stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        slave = -1
        out = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            out += chunk
        assert p.wait(timeout=30) == 0
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    text = out.decode()
    assert text.startswith("ksmctl: unmerging: pages_sharing 10, pages_shared 0"), text
    assert "\r\x1b[K" in text and text.rstrip().endswith("run=2"), repr(text)
    assert (ksm / "run").read_text() == "2"
