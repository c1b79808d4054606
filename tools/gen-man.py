#!/usr/bin/env python3
"""The key table of man/man5/ksmtuned.conf.5, generated from the settings model.

    python3 tools/gen-man.py            # rewrite the table in man/man5/ksmtuned.conf.5
    python3 tools/gen-man.py --check    # exit 1 if the committed page differs (tests, CI)

The rows come from ksmtuned.core.config.reference_rows(): (key, unit, default, range, meaning)
for every setting, so a key added to the model, or a default or range changed there, cannot
be missing from or stale in the man page: tests/test_packaging.py runs --check.
Only the lines between the BEGIN/END KEY TABLE comments are generated; the rest of the page
is written by hand.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PAGE = REPO / "man" / "man5" / "ksmtuned.conf.5"
BEGIN = re.compile(r"^\.\\\" BEGIN KEY TABLE.*$", re.M)
END = re.compile(r"^\.\\\" END KEY TABLE.*$", re.M)

# What the model's text may hold beyond ASCII, in groff's portable names (groff -ww warns on
# raw non-ASCII input with some encodings, and the page must render the same everywhere).
_GLYPHS = {"≤": r"\(<=", "≥": r"\(>=", "–": r"\(en", "—": r"\(em", "×": r"\(mu", "→": r"\(->",
           "…": "...", "‘": "'", "’": "'", "“": r"\(lq", "”": r"\(rq", "·": r"\(pc"}


def roff(text: object) -> str:
    """Plain text as roff: backslashes and minus signs escaped, a leading dot or quote made
    harmless, and no character outside ASCII left raw."""
    s = str(text).replace("\\", r"\e").replace(" - ", " – ").replace("-", r"\-").replace("`", "'")
    for char, name in _GLYPHS.items():
        s = s.replace(char, name)
    bad = sorted({c for c in s if ord(c) > 126})
    if bad:
        raise SystemExit(f"gen-man.py: no roff name for {bad!r} in {text!r}: add it to _GLYPHS")
    if s[:1] in (".", "'"):
        s = r"\&" + s
    return s


def table() -> str:
    from ksmtuned.core.config import reference_rows

    lines = []
    for key, unit, default, value_range, meaning in reference_rows():
        lines.append(".TP")
        lines.append(f".B {roff(key)}")
        facts = [f"Unit: {roff(unit)}." if unit else "", f"Default: {roff(default)}." if default != "" else "",
                 f"Range: {roff(value_range)}." if value_range else ""]
        facts = [f for f in facts if f]
        if facts:
            lines.append(" ".join(facts))
            lines.append(".br")
        lines.append(roff(meaning) + ("" if meaning.endswith(".") else "."))
    return "\n".join(lines)


def render(page: str) -> str:
    b, e = BEGIN.search(page), END.search(page)
    if not b or not e or e.start() < b.end():
        raise SystemExit(f"gen-man.py: {PAGE}: no BEGIN/END KEY TABLE comments")
    return page[:b.end()] + "\n" + table() + "\n" + page[e.start():]


def main(argv: list[str]) -> int:
    page = PAGE.read_text()
    new = render(page)
    if "--check" in argv:
        if new != page:
            print(f"{PAGE.relative_to(REPO)}: key table differs from the settings model; "
                  "run python3 tools/gen-man.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
