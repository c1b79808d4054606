#!/usr/bin/env python3
"""Write docs/schemas/*.json, the JSON Schemas of ksmtuned's documents, from their pydantic
models (ksmtuned.core.documents.DOCUMENTS).  tests/test_documents.py fails when the committed
files differ from what this writes: run it after changing a model.

    python3 tools/gen-schemas.py [--check]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ksmtuned.core.documents import DOCUMENTS, json_schema  # noqa: E402

SCHEMAS = REPO / "docs" / "schemas"


def rendered() -> dict[str, str]:
    """file name -> the schema's text, as committed."""
    out = {}
    for name, model in DOCUMENTS.items():
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **json_schema(model)}
        out[name] = json.dumps(schema, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    return out


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    SCHEMAS.mkdir(parents=True, exist_ok=True)
    for name, text in rendered().items():
        path = SCHEMAS / name
        if path.exists() and path.read_text() == text:
            continue
        stale.append(name)
        if not check:
            path.write_text(text)
    if check and stale:
        print(f"stale: {', '.join(stale)}: run python3 tools/gen-schemas.py", file=sys.stderr)
        return 1
    if not check:
        print(f"wrote {', '.join(stale) or 'nothing (all current)'} in {SCHEMAS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
