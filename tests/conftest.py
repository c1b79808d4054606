"""Shared fixtures and the tier markers (root, ksm, qemu, libvirt, oracle, slow)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from tests import ksmguard

REPO = Path(__file__).resolve().parent.parent


def is_root() -> bool:
    return os.geteuid() == 0


def pytest_collection_modifyitems(config, items):
    """A test that takes the real KSM directory is in the ksm and root tiers, marked or not."""
    for item in items:
        if "real_ksm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ksm)
            item.add_marker(pytest.mark.root)


_NOBODY_PYTHON: list[str] = []


def nobody_can_run_python() -> bool:
    """Whether nobody can run this interpreter (see skip_unless_nobody_can_run_python)."""
    try:
        skip_unless_nobody_can_run_python()
    except pytest.skip.Exception:
        return False
    return True


def skip_unless_nobody_can_run_python() -> None:
    """Skip a test that runs this interpreter as nobody when nobody cannot run it.

    pyenv's interpreters (the 3.9 tier) live under /root, mode 0700, and load their
    libpython through a RUNPATH there: nobody gets "cannot open shared object file".
    """
    if not _NOBODY_PYTHON:
        import subprocess

        r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
                            "-c", "pass"], capture_output=True, text=True, timeout=30)
        _NOBODY_PYTHON.append("" if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1])
    if _NOBODY_PYTHON[0]:
        pytest.skip(f"nobody cannot run {sys.executable}: {_NOBODY_PYTHON[0]}")


@pytest.fixture
def real_ksm():
    """The real /sys/kernel/mm/ksm, exclusively ours, restored (run=2 first) afterwards."""
    if not is_root():
        pytest.skip("needs root to write /sys/kernel/mm/ksm")
    if not ksmguard.ksm_available():
        pytest.skip("this kernel has no KSM (/sys/kernel/mm/ksm/run missing)")
    with ksmguard.exclusive_ksm():
        yield ksmguard.KSM_ROOT


@pytest.fixture
def world_readable_tmp():
    """A temp dir an unprivileged user can traverse (pytest's own are 0700 under root)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="ksmtuned-test-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def ksmtuned_cmd():
    """argv prefix that runs this checkout's ksmtuned with the test interpreter."""
    return [sys.executable, "-m", "ksmtuned"]


def _child_daemons() -> set[int]:
    """Our direct children that are ksmtuned daemons (they name themselves so)."""
    me = str(os.getpid())
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        if comm == "ksmtuned" and stat[stat.rindex(")") + 2 :].split()[1] == me:
            found.add(int(entry))
    return found


@pytest.fixture(autouse=True)
def _no_leaked_daemons():
    """A test that fails before stopping its daemon must not leave it running for the next ones."""
    before = _child_daemons()
    yield
    for pid in _child_daemons() - before:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
