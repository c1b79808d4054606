"""core.text: what every text renderer shows of names and strings it did not choose."""

from __future__ import annotations

import pytest

from ksmtuned.core.text import first_of, printable, quoted


@pytest.mark.parametrize("raw, shown", [
    ("vm-01", "vm-01"),
    ("tab\there", "tab\\there"),
    ("a\x1b[2Jb", "a\\x1b[2Jb"),
    ("line\r\nnext", "line\\r\\nnext"),
    ("c1\x9bcsi\x85nel", "c1\\x9bcsi\\x85nel"),
    ("del\x7f", "del\\x7f"),
    ("nul\x00", "nul\\x00"),
    ("bidi\u202eevil\u2066x\u2069", "bidi\\u202eevil\\u2066x\\u2069"),
    ("sep\u2028par\u2029", "sep\\u2028par\\u2029"),
    ("back\\slash", "back\\slash"),
    ("ümlaut ✓ 日本", "ümlaut ✓ 日本"),
])
def test_printable_escapes_every_control_character(raw, shown):
    assert printable(raw) == shown
    assert all(c.isprintable() for c in printable(raw))
    assert printable(printable(raw)) == printable(raw)  # idempotent: layers may each escape


def test_quoted_cuts_long_values_and_says_how_long():
    assert quoted("abc") == "'abc'"
    q = quoted("x" * 1000)
    assert q == "'" + "x" * 80 + "…' (1000 characters)"
    assert quoted("a\x1b" * 100).startswith("'a\\x1b")


def test_first_of_counts_the_rest():
    assert first_of(["a", "b"], 3) == ["a", "b"]
    assert first_of([str(i) for i in range(25)], 20)[-1] == "... and 5 more"
    assert len(first_of([str(i) for i in range(25)], 20)) == 21
