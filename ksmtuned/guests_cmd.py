"""`ksmtuned guests`: what is counted as a guest, and how much memory it holds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import ExitCode
from .commands import paths as _paths


def cmd_guests(args) -> int:
    from .cli import load
    from .guests import GuestFinder

    loaded = load(args)
    _, procfs = _paths(args)
    finder = GuestFinder.from_settings(loaded.settings, procfs=procfs) if hasattr(
        GuestFinder, "from_settings") else GuestFinder(procfs=procfs)
    guests = finder.scan()
    if getattr(args, "json", False):
        print(json.dumps([g.__dict__ for g in guests], indent=2, default=str))
        return ExitCode.OK
    print(f"{'PID':>8}  {'MATCHER':<8}  {'RSS kB':>10}  NAME")
    for g in guests:
        print(f"{g.pid:>8}  {g.matcher:<8}  {g.rss_kib:>10}  {g.name}")
    print(f"{len(guests)} guest(s), {sum(g.rss_kib for g in guests)} kB resident")
    return ExitCode.OK
