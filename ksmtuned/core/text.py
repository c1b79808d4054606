"""Text that reaches an admin's terminal: escaped, and bounded.

Guest names are chosen by tenants and processes' command lines by any user; the state file
and the config are data.  Printed as they come, an escape sequence, a carriage return or a
newline in them rewrites what the admin sees (a fake "all is well" line, a hidden guest, a
terminal title).  Every text renderer (``guests``, ``check``, ``status``, ``check-config``
and the CLI's error line) passes such strings through :func:`printable`; JSON and the
Prometheus exposition escape on their own.  Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Unicode's explicit bidirectional formatting characters (UAX #9): they reorder what follows
#: them on the line ("Trojan Source", CVE-2021-42574), so a name could show another's text.
BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(cp: int) -> str:
    c = chr(cp)
    if c in _NAMED:
        return _NAMED[c]
    return f"\\x{cp:02x}" if cp < 0x100 else f"\\u{cp:04x}"


#: C0 controls, DEL, C1 controls (0x80-0x9f: 0x9b is a one-byte CSI on some terminals), the
#: line and paragraph separators and the bidi controls.  Not the backslash: escaping is then
#: idempotent (a message escaped where it was made, e.g. a state-file error, is not escaped
#: twice by the CLI); a backslash typed into a name shows as typed and moves no cursor.
_TABLE = {cp: _escape(cp) for cp in [*range(0x20), *range(0x7f, 0xa0), 0x2028, 0x2029, *map(ord, BIDI_CONTROLS)]}


def printable(text: object) -> str:
    """``text`` with every control character shown as an escape: ``\\x1b``, ``\\r``, ``\\n``,
    ``\\x9b``, ``\\u202e``.  Anything else is kept; printable(printable(x)) == printable(x)."""
    s = text if isinstance(text, str) else str(text)
    if s.isprintable():  # the common case: nothing to do
        return s
    # other format characters (Cf: zero-width joiners, ...) are kept: they neither move the
    # cursor nor reorder the line
    return s.translate(_TABLE)


def has_control(text: str) -> bool:
    """Whether ``text`` holds a character :func:`printable` escapes (for tests and checks)."""
    return any(ord(c) in _TABLE for c in text)


#: Longest value quoted in an error message; a longer one is cut, with its length said.
QUOTE_LIMIT = 80
#: Most problems listed in one error or warning; the rest are counted.
PROBLEM_LIMIT = 20


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters of it:
    ``'abc'``, or ``'aaaa…' (1048576 characters)`` for a longer one.  repr escapes every
    control character (and the bidi controls, which are not printable)."""
    s = value if isinstance(value, str) else str(value)
    if len(s) <= limit:
        return repr(value) if isinstance(value, str) else repr(s)
    return f"{repr(s[:limit])[:-1]}…{repr(s)[-1]} ({len(s)} characters)"


def first_of(items: Iterable[str], limit: int = PROBLEM_LIMIT) -> list[str]:
    """The first ``limit`` items, then one "... and N more" line for the rest."""
    out: list[str] = []
    more = 0
    for item in items:
        if len(out) < limit:
            out.append(item)
        else:
            more += 1
    if more:
        out.append(f"... and {more} more")
    return out

