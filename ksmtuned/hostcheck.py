"""`ksmtuned check`: host checks from the virtualization guide."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import ExitCode
from .commands import paths as _paths


def cmd_check(args) -> int:
    print("ksmtuned check: not implemented yet", file=sys.stderr)
    return ExitCode.SOFTWARE
