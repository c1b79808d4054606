"""``ksmtuned check-config``: the effective settings and where each came from."""

from __future__ import annotations

import sys

from ..core.config import KEYS
from ..core.text import printable
from ..errors import ExitCode
from ..paths import Paths
from ..service.config_file import load


def main(paths: Paths) -> int:
    loaded = load(paths)
    for w in loaded.warnings:
        print(f"ksmtuned: warning: {printable(w)}", file=sys.stderr)
    if not loaded.file_found:
        print(f"# {printable(loaded.path)} not found: defaults and environment only")
    else:
        print(f"# effective settings from {printable(loaded.path)}")
    s = loaded.settings
    for alias, name in KEYS.items():
        value = getattr(s, name)
        if value is None:
            text = ""
        elif isinstance(value, bool):
            text = "1" if value else ""
        elif isinstance(value, tuple) and name == "metrics_listen":
            text = f"{value[0]}:{value[1]}"
        elif isinstance(value, tuple):
            text = ",".join(value)
        elif isinstance(value, float) and value.is_integer():
            text = str(int(value))
        else:
            text = str(value)
        # values and paths are data: a control character in them is shown escaped
        print(f"{alias + '=' + printable(text):<44} # {printable(loaded.sources[alias])}")
    return ExitCode.OK
