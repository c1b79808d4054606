"""What the packages are made of: man pages, completion, the Makefile, the sdist, the RPM, and
the Debian package built on this host (Debian 12) with its own tools.

Generated files (the man page's key table, the completion) are compared with their generators,
so they cannot drift from the settings model and the parsers. The packages are built for real
with dpkg-buildpackage, rpmbuild and python -m build; each test skips, saying why, when its
tool is missing (.ci/run installs them). The Debian 13 install tier is tests/test_package.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import REPO

DEBIAN_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"  # Debian's python3 and tools, not pyenv's shims
MAN_PAGES = ["man/man8/ksmtuned.8", "man/man5/ksmtuned.conf.5", "man/man8/ksmctl.8"]


def need(tool: str, package: str) -> str:
    path = shutil.which(tool, path=DEBIAN_PATH)
    if not path:
        pytest.skip(f"{tool} is not installed (apt-get install {package})")
    return path


def checkout_copy(dest: Path) -> Path:
    """The checkout as git sees it (committed or not, without what .gitignore leaves out)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / os.fsdecode(name)
        if not src.exists() and not src.is_symlink():
            continue
        target = dest / os.fsdecode(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            target.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, target)
    return dest


# --- man pages -------------------------------------------------------------------------------

@pytest.mark.parametrize("page", MAN_PAGES)
def test_man_page_renders_without_a_warning(page):
    groff = need("groff", "groff")
    r = subprocess.run([groff, "-man", "-ww", "-z", str(REPO / page)], capture_output=True, text=True,
                       env={"PATH": DEBIAN_PATH, "LC_ALL": "C.UTF-8"})
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_conf_page_key_table_is_the_settings_model():
    r = subprocess.run([sys.executable, str(REPO / "tools" / "gen-man.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    from ksmtuned.core.config import reference_rows

    page = (REPO / "man" / "man5" / "ksmtuned.conf.5").read_text()
    for key, *_ in reference_rows():
        assert f".B {key.replace('-', chr(92) + '-')}\n" in page


def test_gen_man_notices_a_stale_table(tmp_path):
    """The check can fail: a page whose table lacks a key differs from what the model gives."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import importlib

        gen = importlib.import_module("gen-man")
    finally:
        sys.path.remove(str(REPO / "tools"))
    page = (REPO / "man" / "man5" / "ksmtuned.conf.5").read_text()
    stale = page.replace(".B KSM_NPAGES_MAX\n", ".B KSM_NPAGES_MAXIMUM\n")
    assert gen.render(stale) == page != stale


def test_ksmtuned_8_lists_every_exit_code():
    """EXIT STATUS names each ExitCode (the API the unit's RestartPreventExitStatus= relies on)."""
    from ksmtuned.errors import ExitCode

    page = (REPO / "man" / "man8" / "ksmtuned.8").read_text()
    section = page.split(".SH EXIT STATUS", 1)[1].split("\n.SH ", 1)[0]
    listed = {int(line[3:]) for line in section.splitlines() if line.startswith(".B ") and line[3:].isdigit()}
    assert listed == {int(code) for code in ExitCode}, "man/man8/ksmtuned.8 EXIT STATUS differs from ExitCode"


def test_every_unit_documentation_is_installed():
    """Documentation= names the man pages the packages install (not a README nothing installs)."""
    for unit, page in (("ksmtuned.service", "man:ksmtuned(8)"), ("ksm.service", "man:ksmctl(8)")):
        text = (REPO / "systemd" / unit).read_text()
        assert f"Documentation={page}" in text, unit
        assert "README" not in "".join(line for line in text.splitlines() if line.startswith("Documentation="))


# --- bash completion -------------------------------------------------------------------------

def test_completion_is_generated_from_the_parsers():
    r = subprocess.run([sys.executable, str(REPO / "tools" / "gen-completion.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("prog", ["ksmtuned", "ksmctl"])
def test_completion_loads_in_plain_bash(prog):
    r = subprocess.run(["bash", "-c", f"source {REPO / 'completion' / prog}; complete -p {prog}"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"complete -F _{prog} {prog}", r.stdout + r.stderr


@pytest.mark.parametrize("words,expected", [
    (["ksmtuned", "sta"], {"status"}),
    (["ksmtuned", "--dry"], {"--dry-run"}),
    (["ksmtuned", "status", "--js"], {"--json"}),
    (["ksmtuned", "retune", "--q"], {"--quiet"}),
    (["ksmctl", "st"], {"start", "stop"}),
])
def test_completion_completes(words, expected):
    prog = words[0]
    script = (f"source {REPO / 'completion' / prog}; COMP_WORDS=({' '.join(words)}); "
              f"COMP_CWORD={len(words) - 1}; _{prog}; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert set(r.stdout.split()) == expected, r.stdout + r.stderr


# --- make install / uninstall ----------------------------------------------------------------

def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_make_install_then_uninstall_leaves_nothing(tmp_path):
    need("make", "make")
    dest = tmp_path / "stage"
    env = {**os.environ, "PATH": DEBIAN_PATH}
    r = subprocess.run(["make", "-s", "install", f"DESTDIR={dest}", "PREFIX=/usr"], cwd=REPO,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    files = _tree(dest)
    for path in ("usr/sbin/ksmtuned", "usr/sbin/ksmctl", "usr/lib/ksmtuned/ksmtuned/cli.py",
                 "usr/lib/systemd/system/ksmtuned.service", "usr/lib/systemd/system/ksm.service",
                 "etc/ksmtuned.conf", "etc/default/ksm", "etc/logrotate.d/ksmtuned",
                 "etc/libvirt/hooks/qemu.d/ksmtuned", "usr/share/man/man8/ksmtuned.8",
                 "usr/share/man/man5/ksmtuned.conf.5", "usr/share/man/man8/ksmctl.8",
                 "usr/share/bash-completion/completions/ksmtuned",
                 "usr/share/doc/ksmtuned/ksmtuned.rules.yml", "usr/share/doc/ksmtuned/LICENSE"):
        assert path in files, path
    for script in (REPO / "etc" / "init.d").glob("*"):
        assert f"etc/init.d/{script.name}" in files
        assert os.access(dest / "etc/init.d" / script.name, os.X_OK)
    if (REPO / "etc" / "legacy-actions").exists():
        assert os.access(dest / "usr/libexec/initscripts/legacy-actions/ksmtuned/retune", os.X_OK)
    assert os.access(dest / "usr/sbin/ksmtuned", os.X_OK)
    assert os.access(dest / "etc/libvirt/hooks/qemu.d/ksmtuned", os.X_OK)
    # the installed command runs from the staged tree (its private library directory)
    wrapper = (dest / "usr/sbin/ksmtuned").read_text().replace("/usr/lib/ksmtuned", str(dest / "usr/lib/ksmtuned"))
    r = subprocess.run([sys.executable, "-c", wrapper, "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "ksmtuned 0.1.0" in r.stdout, r.stdout + r.stderr

    r = subprocess.run(["make", "-s", "uninstall", f"DESTDIR={dest}", "PREFIX=/usr"], cwd=REPO,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _tree(dest) == []


def test_make_uninstall_keeps_a_changed_config(tmp_path):
    need("make", "make")
    dest = tmp_path / "stage"
    env = {**os.environ, "PATH": DEBIAN_PATH}
    subprocess.run(["make", "-s", "install", f"DESTDIR={dest}"], cwd=REPO, check=True, capture_output=True, env=env)
    conf = dest / "etc" / "ksmtuned.conf"
    conf.write_text(conf.read_text() + "KSM_NPAGES_MAX=2000\n")
    # a second install keeps the admin's file
    subprocess.run(["make", "-s", "install", f"DESTDIR={dest}"], cwd=REPO, check=True, capture_output=True, env=env)
    assert "KSM_NPAGES_MAX=2000" in conf.read_text()
    r = subprocess.run(["make", "-s", "uninstall", f"DESTDIR={dest}"], cwd=REPO, capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0 and "kept" in r.stdout
    assert _tree(dest) == ["etc", "etc/ksmtuned.conf"]


def test_make_install_points_the_units_at_its_sbindir(tmp_path):
    need("make", "make")
    dest = tmp_path / "stage"
    subprocess.run(["make", "-s", "install", f"DESTDIR={dest}", "PREFIX=/opt/k"], cwd=REPO, check=True,
                   capture_output=True, env={**os.environ, "PATH": DEBIAN_PATH})
    unit = (dest / "opt/k/lib/systemd/system/ksmtuned.service").read_text()
    assert "ExecStart=/opt/k/sbin/ksmtuned --foreground" in unit
    assert "/usr/sbin/" not in unit
    for script in [dest / "etc/init.d" / p.name for p in (REPO / "etc/init.d").glob("*")] + \
            [dest / "usr/libexec/initscripts/legacy-actions/ksmtuned/retune"] * (REPO / "etc/legacy-actions").exists():
        assert "/opt/k/sbin/" in script.read_text() and "/usr/sbin/ksm" not in script.read_text(), script
    assert 'sys.path.insert(0, "/opt/k/lib/ksmtuned")' in (dest / "opt/k/sbin/ksmctl").read_text()


# --- sdist and wheel -------------------------------------------------------------------------

DATA_FILES = ["LICENSE", "Makefile", "systemd/ksm.service", "systemd/ksmtuned.service", "etc/ksmtuned.conf",
              "etc/default/ksm", "etc/logrotate.d/ksmtuned", "etc/libvirt/hooks/qemu.d/ksmtuned",
              "contrib/prometheus/ksmtuned.rules.yml", "man/man8/ksmtuned.8", "man/man5/ksmtuned.conf.5", "man/man8/ksmctl.8",
              "completion/ksmtuned", "completion/ksmctl", "debian/control", "debian/rules",
              "packaging/rpm/ksmtuned.spec"]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    try:
        import build  # noqa: F401
    except ImportError:
        pytest.skip("python -m build is not installed (pip install build)")
    out = tmp_path_factory.mktemp("sdist")
    src = checkout_copy(out / "src")
    r = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return next(out.glob("ksmtuned-*.tar.gz"))


def test_sdist_holds_the_data_files(sdist):
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    missing = [f for f in DATA_FILES if f not in names]
    assert missing == []
    assert not [n for n in names if "__pycache__" in n or n.startswith((".venv", ".oracle"))]
    for script in (REPO / "etc" / "init.d").glob("*"):
        assert f"etc/init.d/{script.name}" in names


def test_wheel_carries_the_license_without_pep_639(tmp_path):
    """pyproject.toml has no `license = "MIT"` (setuptools >= 77 only, and Debian 12 has 66), yet
    the wheel carries LICENSE and names it (License-File), with this venv's newer setuptools."""
    try:
        import build  # noqa: F401
    except ImportError:
        pytest.skip("python -m build is not installed (pip install build)")
    import zipfile

    src = checkout_copy(tmp_path / "src")
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with zipfile.ZipFile(next(tmp_path.glob("ksmtuned-*.whl"))) as whl:
        names = whl.namelist()
        metadata = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.endswith("LICENSE") and ".dist-info/" in n for n in names), names
    assert "License-File: LICENSE" in metadata
    assert "ksmtuned/core/config.py" in names


# --- the RPM ---------------------------------------------------------------------------------

RPM_FILES = ["/usr/sbin/ksmtuned", "/usr/sbin/ksmctl", "/usr/lib/systemd/system/ksm.service",
             "/usr/lib/systemd/system/ksmtuned.service", "/etc/ksmtuned.conf", "/etc/sysconfig/ksm",
             "/etc/logrotate.d/ksmtuned", "/etc/libvirt/hooks/qemu.d/ksmtuned", "/usr/share/man/man8/ksmtuned.8",
             "/usr/share/man/man5/ksmtuned.conf.5", "/usr/share/man/man8/ksmctl.8",
             "/usr/share/bash-completion/completions/ksmtuned", "/usr/share/bash-completion/completions/ksmctl"]
RPM_CONFIG = ["/etc/ksmtuned.conf", "/etc/libvirt/hooks/qemu.d/ksmtuned", "/etc/logrotate.d/ksmtuned",
              "/etc/sysconfig/ksm"]


@pytest.fixture(scope="module")
def rpm(tmp_path_factory):
    need("rpmbuild", "rpm")
    need("make", "make")
    r = subprocess.run(["/usr/bin/python3", "-c", "import build, installer, setuptools"], capture_output=True)
    if r.returncode != 0:
        pytest.skip("the spec's build outside Fedora needs Debian's python3-build, python3-installer and "
                    "python3-setuptools (apt-get install them)")
    src = checkout_copy(tmp_path_factory.mktemp("rpm") / "src")
    subprocess.run(["git", "init", "-q"], cwd=src, check=True)
    subprocess.run(["git", "add", "-A"], cwd=src, check=True)
    r = subprocess.run(["make", "rpm", "PYTHON=/usr/bin/python3"], cwd=src, capture_output=True, text=True,
                       env={**os.environ, "PATH": DEBIAN_PATH})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rpms = list((src / "build/rpm/RPMS/noarch").glob("ksmtuned-*.noarch.rpm"))
    assert len(rpms) == 1
    return rpms[0]


def _rpm_query(rpm: Path, *flags: str) -> list[str]:
    return subprocess.run(["rpm", "-qp", *flags, str(rpm)], capture_output=True, text=True,
                          check=True).stdout.splitlines()


def test_rpm_is_noarch_with_the_files(rpm):
    # epoch 1: above Fedora's own ksmtuned package (0.1.0-N), as 1:0.1.0 is above Debian's
    assert _rpm_query(rpm, "--qf", "%{NAME} %{EPOCH}:%{VERSION} %{ARCH} %{LICENSE}\n") == ["ksmtuned 1:0.1.0 noarch MIT"]
    files = _rpm_query(rpm, "-l")
    assert [f for f in RPM_FILES if f not in files] == []
    assert any(f.endswith("/site-packages/ksmtuned/cli.py") for f in files)
    assert any(f.endswith("/ksmtuned.rules.yml") for f in files) and any(f.endswith("/LICENSE") for f in files)
    if (REPO / "etc" / "legacy-actions").exists():
        assert "/usr/libexec/initscripts/legacy-actions/ksmtuned/retune" in files


def test_rpm_config_files_are_noreplace(rpm):
    assert sorted(_rpm_query(rpm, "-c")) == RPM_CONFIG
    # %config(noreplace): flag bit 4 (RPMFILE_NOREPLACE) besides 1 (RPMFILE_CONFIG)
    flags = dict(line.split() for line in _rpm_query(rpm, "--qf", "[%{FILENAMES} %{FILEFLAGS}\n]"))
    assert all(int(flags[f]) & 0x11 == 0x11 for f in RPM_CONFIG), flags
    sysconfig = subprocess.run(f"rpm2archive - <{rpm} | tar -xzOf - ./etc/sysconfig/ksm", shell=True,
                               capture_output=True, text=True).stdout
    assert sysconfig.startswith("# /etc/sysconfig/ksm: read by ksmctl start") and "KSM_MAX_KERNEL_PAGES=" in sysconfig


def test_rpm_scriptlets_are_systemds(rpm):
    scripts = "\n".join(_rpm_query(rpm, "--scripts"))
    assert "systemd-update-helper install-system-units ksm.service ksmtuned.service" in scripts
    assert "systemd-update-helper remove-system-units ksm.service ksmtuned.service" in scripts
    assert "systemd-update-helper mark-restart-system-units ksmtuned.service" in scripts
    # ksm.service is never restarted by an upgrade (KSM would go off and on under the guests)
    assert "mark-restart-system-units ksm.service" not in scripts
    requires = _rpm_query(rpm, "-R")
    assert {"python3-sdnotify", "python3-pydantic >= 2", "python3-psutil"} <= set(requires)


def files_of(deb: Path) -> str:
    return subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout


# --- the Debian package, built on this Debian 12 host --------------------------------------------

@pytest.mark.package
def test_deb_builds_with_debian_12s_own_tools(tmp_path):
    """`dpkg-buildpackage -us -uc -b -d` with DEB_BUILD_OPTIONS=nocheck, as a site building
    locally on Debian 12 would (its setuptools is 66: no PEP 639 in pyproject.toml)."""
    need("dpkg-buildpackage", "dpkg-dev")
    need("dh", "debhelper")
    if not Path("/usr/share/perl5/Debian/Debhelper/Buildsystem/pybuild.pm").exists():
        pytest.skip("dh-python is not installed (apt-get install dh-python pybuild-plugin-pyproject)")
    src = checkout_copy(tmp_path / "ksmtuned-0.1.0")
    r = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b", "-d"], cwd=src, capture_output=True, text=True,
                       env={"PATH": DEBIAN_PATH, "HOME": str(tmp_path), "DEB_BUILD_OPTIONS": "nocheck",
                            "LC_ALL": "C.UTF-8"})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    deb = tmp_path / "ksmtuned_0.1.0_all.deb"
    fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Version", "Architecture", "Depends"],
                            capture_output=True, text=True, check=True).stdout
    assert "Version: 1:0.1.0" in fields and "Architecture: all" in fields
    for script in (REPO / "etc" / "init.d").glob("*"):
        assert f"./etc/init.d/{script.name}" in files_of(deb)
    assert "python3-pydantic (>= 2)" in fields and "python3-sdnotify" in fields
    files = files_of(deb)
    assert "./usr/sbin/ksmtuned" in files and "ksmtuned/cli.py" in files
    ctl = tmp_path / "ctl"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(ctl)], check=True)
    conffiles = (ctl / "conffiles").read_text().split()
    assert {"/etc/ksmtuned.conf", "/etc/default/ksm", "/etc/logrotate.d/ksmtuned",
            "/etc/libvirt/hooks/qemu.d/ksmtuned"} <= set(conffiles)
    lintian = shutil.which("lintian", path=DEBIAN_PATH)
    if lintian:
        r = subprocess.run([lintian, str(tmp_path / "ksmtuned_0.1.0_amd64.changes")], capture_output=True, text=True,
                           env={"PATH": DEBIAN_PATH, "LC_ALL": "C.UTF-8"})
        assert not [line for line in r.stdout.splitlines() if line.startswith("E:")], r.stdout


# --- the README --------------------------------------------------------------------------------

README = REPO / "README.md"


def test_readme_is_short_and_keeps_ci_s_test_command():
    text = README.read_text()
    assert len(text.splitlines()) <= 300, "the README is for users: move the rest to docs/"
    assert "\n.venv/bin/python -m pytest -q\n" in text  # .ci/run runs exactly this


def test_readme_lists_every_exit_code():
    from ksmtuned.errors import ExitCode

    text = README.read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    listed = {int(m) for m in re.findall(r"^\| (\d+) \|", text, re.M)}
    assert listed == {int(code) for code in ExitCode}


def test_readme_links_resolve():
    text = README.read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith(("http:", "https:")):
            assert (REPO / target).exists(), target
    for path in sorted((REPO / "docs").glob("*.md")):
        for target in re.findall(r"\]\(([^)#]+)\)", path.read_text()):
            if not target.startswith(("http:", "https:")):
                assert (path.parent / target).exists(), f"{path.name}: {target}"
