"""``ksmtuned check-config [--json]``: the effective settings and where each came from.

``--json`` prints a CheckConfigDocument (docs/schemas/check-config.json): the settings by their
ksmtuned.conf keys, the source of each, and the warnings.  An invalid config is the same one
line per bad value on stderr and exit 78 either way.
"""

from __future__ import annotations

import json
import sys

from ..core.config import KEYS, LoadedConfig
from ..core.documents import CheckConfigDocument
from ..core.text import printable
from ..errors import ExitCode
from ..paths import Paths
from ..service.config_file import load


def document(loaded: LoadedConfig) -> CheckConfigDocument:
    return CheckConfigDocument(config_file=loaded.path, file_found=loaded.file_found, settings=loaded.settings,
                               sources=dict(loaded.sources), warnings=list(loaded.warnings))


def main(paths: Paths, as_json: bool = False) -> int:
    loaded = load(paths)
    for w in loaded.warnings:
        print(f"ksmtuned: warning: {printable(w)}", file=sys.stderr)
    if as_json:
        print(json.dumps(document(loaded).model_dump(mode="json", by_alias=True), indent=2))
        return ExitCode.OK
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
