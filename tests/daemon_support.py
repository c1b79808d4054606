"""A real ksmtuned daemon process against a temp KSM directory (tests/fakes), and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.fakes import ksm as _ksm
from tests.fakes.daemon import DaemonProc  # noqa: F401  (the one daemon wrapper, tests/fakes)

KNOB_DEFAULTS = _ksm.KNOBS
REPO = Path(__file__).resolve().parent.parent


def start_mergeable(stack, mib: int, *mode: str, first: str = "ready") -> subprocess.Popen:
    """bench/mergeable.py holding ``mib`` MiB (``mode``: plain, late, churn, rewrite ...), killed
    when ``stack`` closes; returns once it says ``first`` ("ready"; "touched" for late).  Its
    stdin is a pipe (late and rewrite wait for a line)."""
    p = subprocess.Popen([sys.executable, "-m", "bench.mergeable", str(mib), *mode], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd=REPO)
    stack.callback(lambda: (p.kill(), p.wait()))
    assert p.stdout.readline().strip() == first
    return p


def fake_ksm_dir(root: Path) -> Path:
    """ROOT/ksm, the knobs the daemon writes (tests/fakes/ksm.py)."""
    return _ksm.fake_ksm_dir(Path(root) / "ksm")


def ksmtuned(*args: str, env=None, timeout=30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ksmtuned", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)
