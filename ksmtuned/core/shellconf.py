"""ksmtuned.conf text -> assignments (KEY, VALUE, LINE), in file order; no settings model.

The old daemon *sources* the file with bash, as root.  We parse it instead, as the subset
of shell that real files use (KEY=VALUE, quotes, ``export``, comments, inline comments,
repeated keys where the last wins, a last line without newline, CRLF line ends, a UTF-8
byte-order mark), and refuse anything that would run code, naming file:line.  Kept apart
from :mod:`ksmtuned.core.config` (pydantic) so that ``retune``, the libvirt hook's command,
finds PIDFILE without building the settings model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..paths import DEFAULT_CONFIG
from .text import quoted

DEFAULT_CONFIG_PATH = Path(DEFAULT_CONFIG)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Unquoted characters that are shell syntax (commands, pipes, redirections, expansions).
_CODE_CHARS = {
    "$": "expansion or command substitution ('$')",
    "`": "command substitution ('`')",
    ";": "a command separator (';')",
    "|": "a pipe ('|')",
    "&": "'&' (background or '&&')",
    "<": "a redirection ('<')",
    ">": "a redirection ('>')",
    "(": "a subshell or function ('(')",
    ")": "a subshell or function (')')",
}


@dataclass(frozen=True)
class Assignment:
    key: str
    value: str
    line_no: int


def _error(filename: str, line_no: int, message: str) -> ConfigError:
    return ConfigError(f"{filename}:{line_no}: {message}")


def _parse_value(text: str, filename: str, line_no: int) -> str:
    """Parse the word after '=' as bash would for an assignment; refuse code."""
    out: list[str] = []
    i, n = 0, len(text)
    tilde_expands = True  # bash expands an unquoted ~ right after the '=' or an unquoted ':'
    while i < n:
        c = text[i]
        if c == "~" and tilde_expands:
            raise _error(filename, line_no, "refusing '~': the shell would expand it to a home directory; "
                                            "write the full path (or quote it)")
        tilde_expands = c == ":"
        if c in " \t":
            rest = text[i:].strip()
            if rest and not rest.startswith("#"):
                raise _error(
                    filename, line_no,
                    f"unexpected text after the value: {quoted(rest)} (the shell would run it as a command); "
                    "quote values that contain spaces",
                )
            break
        if c == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise _error(filename, line_no, "unterminated single quote (values must fit on one line)")
            out.append(text[i + 1 : end])
            i = end + 1
            continue
        if c == '"':
            i += 1
            while True:
                if i >= n:
                    raise _error(filename, line_no, "unterminated double quote (values must fit on one line)")
                c = text[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n and text[i + 1] in '"\\$`':
                    out.append(text[i + 1])
                    i += 2
                    continue
                if c in "$`":
                    raise _error(
                        filename, line_no,
                        f"refusing {_CODE_CHARS[c]} inside double quotes: the config is data, not code",
                    )
                out.append(c)
                i += 1
            continue
        if c == "\\":
            if i + 1 >= n:
                # bash would join the next line to this value ("A=\\" + "B=1" is A='B=1')
                raise _error(filename, line_no, "a backslash at the end of a line continues it in the shell; "
                                                "join the lines")
            out.append(text[i + 1])
            i += 2
            continue
        if c in _CODE_CHARS:
            raise _error(filename, line_no, f"refusing {_CODE_CHARS[c]}: the config is data, not code")
        out.append(c)
        i += 1
    return "".join(out)


def parse_assignments(text: str, filename: str = str(DEFAULT_CONFIG_PATH)) -> list[Assignment]:
    """Parse shell-subset config text into assignments, in file order.

    Raises ConfigError naming file:line for anything that is not a plain assignment.
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    assignments = []
    for line_no, raw in enumerate(text.split("\n"), start=1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if "\0" in line:
            raise _error(filename, line_no, "NUL byte in line (is this a text file?)")
        stripped = line.lstrip(" \t")  # not rstrip: a value may end in an escaped space (KEY=a\<space>)
        if not stripped or stripped.startswith("#"):
            continue
        body = stripped
        if re.match(r"export[ \t]", body):
            body = body[len("export"):].lstrip(" \t")
            m = _NAME.fullmatch(body.split("#", 1)[0].strip(" \t"))
            if m and "=" not in body:
                continue  # `export KEY` alone: nothing to assign
        m = _NAME.match(body)
        if not m or body[m.end() : m.end() + 1] != "=":
            shown = stripped if len(stripped) <= 60 else stripped[:57] + "..."
            raise _error(
                filename, line_no,
                f"expected KEY=VALUE (a comment, a blank line or an assignment), got {shown!r}; "
                "the config is data, commands are never run",
            )
        key = m.group(0)
        value = _parse_value(body[m.end() + 1 :], filename, line_no)
        assignments.append(Assignment(key=key, value=value, line_no=line_no))
    return assignments
