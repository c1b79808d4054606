"""A real ksmtuned daemon process against a temp KSM directory (tests/fakes), and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.fakes import ksm as _ksm
from tests.fakes.daemon import DaemonProc  # noqa: F401  (the one daemon wrapper, tests/fakes)

KNOB_DEFAULTS = _ksm.KNOBS


def fake_ksm_dir(root: Path) -> Path:
    """ROOT/ksm, the knobs the daemon writes (tests/fakes/ksm.py)."""
    return _ksm.fake_ksm_dir(Path(root) / "ksm")


def ksmtuned(*args: str, env=None, timeout=30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ksmtuned", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)
