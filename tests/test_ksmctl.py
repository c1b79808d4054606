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
