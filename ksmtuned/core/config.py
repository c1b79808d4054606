"""ksmtuned.conf text -> one frozen, validated Settings object.

The old daemon *sources* the file with bash, as root.  We parse it instead, as the subset
of shell that real files use (KEY=VALUE, quotes, ``export``, comments, inline comments,
repeated keys where the last wins, a last line without newline, CRLF line ends, a UTF-8
byte-order mark), and refuse anything that would run code, naming file:line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import ConfigError
from ..paths import DEFAULT_CONFIG, DEFAULT_PIDFILE, KERNEL_DIRS
from .policy import Tuning
from .text import PROBLEM_LIMIT, first_of, quoted

#: The shortest KSM_MONITOR_INTERVAL (the fault tests run at 0.01 s; the old daemon's `sleep` took any).
MIN_INTERVAL_S = 0.01

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
_FALSE_WORDS = {"0", "no", "false", "off"}
MATCHER_NAMES = ("redhat", "debian", "libvirt", "proxmox")


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


def parse_bool(text: str) -> bool:
    """DEBUG: the old daemon enables debug for any non-empty value; 0/no/false/off disable it here."""
    return bool(text) and text.strip().lower() not in _FALSE_WORDS


def parse_listen(text: str) -> tuple[str, int] | None:
    """KSM_METRICS_LISTEN: 'host:port', '[v6]:port' or a bare port (loopback)."""
    text = text.strip()
    if not text:
        return None
    host = "127.0.0.1"
    port_text = text
    if text.startswith("["):
        end = text.find("]:")
        if end < 0:
            raise ValueError(f"expected [ADDRESS]:PORT, got {text!r}")
        host, port_text = text[1:end], text[end + 2 :]
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"expected a port number 1-65535, got {port_text!r}")
    return host or "127.0.0.1", int(port_text)


# --- one frozen settings model -------------------------------------------------------------
#
# A hand-written model rather than pydantic: importing pydantic and building one model costs
# the resident daemon about 15 MB (measured: 33 MB RSS with it, 18 MB without), more than half
# its memory, to check 16 scalar keys (issue 5's target is < 25 MB).  The shape is the one
# STYLE.md asks for: ranges beside the fields, a cross-field check, the KSM_* names as aliases.

_INTEGER = re.compile(r"[ \t]*[+-]?(0|[1-9][0-9]*)[ \t]*", re.ASCII)
_NUMBER = re.compile(r"[ \t]*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?[ \t]*", re.ASCII)


def to_integer(value: object) -> int:
    """A decimal integer as bash's arithmetic reads it; '012' is refused (bash: octal 10)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"[ \t]*[+-]?0[0-9]+[ \t]*", value):
        raise ValueError("expected a decimal integer without leading zeros (the old daemon's bash reads "
                         "them as octal)")
    raise ValueError("expected an integer")


def to_number(value: object) -> float:
    """A decimal number such as 60, 0.05 or 1e1 (as sleep(1) reads it)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        return float(value)
    raise ValueError("expected a number")


def to_flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return parse_bool(value)
    raise ValueError("expected 1 or 0")


def to_text(value: object) -> str:
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    raise ValueError("expected a text value")


def to_optional_text(value: object) -> str | None:
    return to_text(value) if value else None


def to_path(value: object) -> str:
    """An absolute path: the daemon runs from / (forked) or wherever systemd starts it, so a
    relative one would name a file nobody meant (the command line's are made absolute first)."""
    path = to_text(value)
    if not path.startswith("/"):
        raise ValueError("expected an absolute path")
    return path


def to_output_path(value: object) -> str | None:
    """LOGFILE, KSM_METRICS_TEXTFILE: unset, or an absolute path outside /proc and /sys."""
    if not value:
        return None
    path = to_path(value)
    normal = os.path.normpath(path)
    if any(normal == d or normal.startswith(d + "/") for d in KERNEL_DIRS) or normal.startswith("//"):
        raise ValueError("expected a path outside /proc and /sys (writing there tunes the kernel)")
    return path


def choice(*words: str, also: Mapping[str, str] | None = None) -> Callable[[object], str]:
    """One of `words`, case-insensitive; `also` maps other spellings to one of them."""
    listed = ", ".join(f"'{w}'" for w in words[:-1]) + f" or '{words[-1]}'"

    def convert(value: object) -> str:
        word = value.strip().lower() if isinstance(value, str) else value
        word = (also or {}).get(word, word)
        if word not in words:
            raise ValueError(f"expected {listed}")
        return word

    return convert


def to_guest_match(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        items = tuple(item.strip() for item in value.split(",") if item.strip())
    elif isinstance(value, (tuple, list)) and all(isinstance(item, str) for item in value):
        items = tuple(value)
    else:
        items = ()
    if not items:
        raise ValueError("expected a comma list of redhat, debian, libvirt, proxmox or regex:PATTERN")
    for item in items:
        if item.startswith("regex:"):
            try:
                re.compile(item[len("regex:"):])
            except re.error as e:
                raise ValueError(f"invalid regular expression {item[6:]!r}: {e}") from None
        elif item not in MATCHER_NAMES:
            raise ValueError(
                f"unknown guest matcher {item!r}: expected redhat, debian, libvirt, proxmox or regex:PATTERN"
            )
    return items


def to_listen(value: object) -> tuple[str, int] | None:
    if isinstance(value, str):
        return parse_listen(value)
    if value is None:
        return None
    if (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and 0 < value[1] < 65536):
        return value
    raise ValueError("expected HOST:PORT")


def bounded(convert: Callable[[object], Any], ge=None, gt=None, le=None) -> Callable[[object], Any]:
    """`convert`, then the range check (messages as "expected a value greater than 0")."""

    def check(value: object):
        v = convert(value)
        if (gt is not None and not v > gt) or (ge is not None and not v >= ge):
            raise ValueError(f"expected a value greater than {gt}" if gt is not None
                             else f"expected a value greater than or equal to {ge}")
        if le is not None and not v <= le:  # `not <=`: NaN fails too
            raise ValueError(f"expected a value less than or equal to {le}")
        return v

    return check


def setting(alias: str, default: object, convert: Callable[[object], Any], **bounds) -> Any:
    """A Settings field: its ksmtuned.conf key, its default, and how a value is read and checked."""
    return field(default=default, metadata={"alias": alias, "convert": bounded(convert, **bounds)})


class SettingsError(ValueError):
    """Invalid values: ``problems`` lists (alias, message), alias None for the cross-field check."""

    def __init__(self, problems: list[tuple[str | None, str]]):
        super().__init__("; ".join(f"{a or 'settings'}: {m}" for a, m in problems))
        self.problems = problems


@dataclass(frozen=True)
class Settings:
    """Every setting in force, each field with its historical ksmtuned.conf key (the alias),
    its default and its range.  Construction checks every value; frozen."""

    # >= 0.01 s: a shorter interval is a busy loop (1e-300 spun a CPU), not a tuning
    monitor_interval_s: float = setting("KSM_MONITOR_INTERVAL", 60.0, to_number, ge=MIN_INTERVAL_S, le=86400)
    sleep_msec: int = setting("KSM_SLEEP_MSEC", 10, to_integer, ge=0, le=10_000_000)
    npages_boost: int = setting("KSM_NPAGES_BOOST", 300, to_integer, ge=0, le=2**31 - 1)
    npages_decay: int = setting("KSM_NPAGES_DECAY", -50, to_integer, ge=-(2**31), le=0)
    npages_min: int = setting("KSM_NPAGES_MIN", 64, to_integer, ge=0, le=2**32 - 1)
    npages_max: int = setting("KSM_NPAGES_MAX", 1250, to_integer, ge=0, le=2**32 - 1)
    thres_coef_pct: int = setting("KSM_THRES_COEF", 20, to_integer, ge=0, le=100)
    thres_const_kib: int = setting("KSM_THRES_CONST", 2048, to_integer, ge=0, le=2**50)
    logfile: str | None = setting("LOGFILE", None, to_output_path)
    debug: bool = setting("DEBUG", False, to_flag)
    pidfile: str = setting("PIDFILE", DEFAULT_PIDFILE, to_path)
    guest_match: tuple[str, ...] = setting("KSM_GUEST_MATCH", MATCHER_NAMES, to_guest_match)
    ps_metric: str = setting("KSM_PS_METRIC", "rss", choice("rss", "pss", "vsz", also={"rsz": "rss"}))  # rsz: Proxmox
    free_metric: str = setting("KSM_FREE_METRIC", "classic", choice("classic", "available"))
    metrics_listen: tuple[str, int] | None = setting("KSM_METRICS_LISTEN", None, to_listen)
    metrics_textfile: str | None = setting("KSM_METRICS_TEXTFILE", None, to_output_path)

    def __post_init__(self):
        problems = []
        for f in fields(self):
            try:
                object.__setattr__(self, f.name, f.metadata["convert"](getattr(self, f.name)))
            except ValueError as e:
                problems.append((f.metadata["alias"], str(e)))
        if not problems and self.npages_max < self.npages_min:
            problems.append((None, f"KSM_NPAGES_MAX ({self.npages_max}) must be >= KSM_NPAGES_MIN "
                                   f"({self.npages_min})"))
        if problems:
            raise SettingsError(problems)

    @classmethod
    def from_aliases(cls, values: Mapping[str, object]) -> Settings:
        """Settings from {KSM_* key: value}; every bad value is reported (SettingsError), not just
        the first."""
        unknown = set(values) - set(KEYS)
        if unknown:
            raise SettingsError([(None, f"unknown keys {', '.join(first_of(sorted(unknown)))}")])
        try:
            return cls(**{KEYS[alias]: value for alias, value in values.items()})
        except SettingsError as e:  # __post_init__ found them, in field order: report in the caller's
            order = list(values)
            e.problems.sort(key=lambda p: order.index(p[0]) if p[0] in order else len(order))
            raise

    @staticmethod
    def default(alias: str) -> object:
        return _FIELDS[KEYS[alias]].default

    def by_alias(self) -> dict[str, Any]:
        """{KSM_* key: value}, JSON-ready (tuples as lists)."""
        return {f.metadata["alias"]: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in fields(self)}

    def tuning(self) -> Tuning:
        return Tuning(
            npages_boost=self.npages_boost,
            npages_decay=self.npages_decay,
            npages_min=self.npages_min,
            npages_max=self.npages_max,
            thres_coef_pct=self.thres_coef_pct,
            thres_const_kib=self.thres_const_kib,
            sleep_msec=self.sleep_msec,
        )


_FIELDS = {f.name: f for f in fields(Settings)}
#: alias -> field name
KEYS: dict[str, str] = {f.metadata["alias"]: f.name for f in fields(Settings)}


@dataclass(frozen=True)
class LoadedConfig:
    """The settings plus where each value came from ("FILE:LINE", "environment", "default")."""

    settings: Settings
    sources: Mapping[str, str]
    warnings: tuple[str, ...] = ()
    path: str = str(DEFAULT_CONFIG_PATH)
    file_found: bool = True


def build_settings(
    assignments: list[Assignment],
    env: Mapping[str, str],
    filename: str,
    overrides: Mapping[str, object] | None = None,
) -> LoadedConfig:
    """Combine file assignments (last wins), the environment and the defaults into Settings."""
    warnings = []
    unknown = 0
    values: dict[str, object] = {}
    sources: dict[str, str] = {alias: "default" for alias in KEYS}
    for a in assignments:
        if a.key not in KEYS:
            unknown += 1
            if unknown <= PROBLEM_LIMIT:  # a million of them must not be a million log lines
                warnings.append(f"{filename}:{a.line_no}: unknown key {quoted(a.key)[1:-1]} (ignored)")
            continue
        where = f"{filename}:{a.line_no}"
        if a.value == "":
            # ${KEY:-default} in the old daemon: an empty value means the default.
            values.pop(a.key, None)
            sources[a.key] = f"{where} (empty: default)"
        else:
            values[a.key] = a.value
            sources[a.key] = where
    if unknown > PROBLEM_LIMIT:
        warnings.append(f"{filename}: ... and {unknown - PROBLEM_LIMIT} more unknown keys (ignored)")
    for alias in KEYS:
        if alias not in values and sources[alias] == "default" and env.get(alias):
            values[alias] = env[alias]
            sources[alias] = "environment"
    for alias, value in (overrides or {}).items():
        values[alias] = value
        sources[alias] = "command line"
    try:
        settings = Settings.from_aliases(values)
    except SettingsError as e:
        problems = []
        for alias, message in e.problems:
            if alias is None:  # the cross-field check: MAX >= MIN
                alias = "KSM_NPAGES_MAX"
                message = f"expected a value >= KSM_NPAGES_MIN ({values.get('KSM_NPAGES_MIN', 64)})"
            where = sources.get(alias, filename)
            where = where.split(" ")[0] if where.startswith(filename) else f"{filename}: {where}"
            problems.append(f"{where}: {alias}: {message}, got {quoted(values.get(alias, Settings.default(alias)))}")
        raise ConfigError("\n".join(first_of(problems))) from None
    return LoadedConfig(settings=settings, sources=sources, warnings=tuple(warnings), path=filename)


#: The documentation of each key: (unit, range in words, meaning).  The man page ksmtuned.conf(5)
#: and the README's table are generated from this and the fields (defaults) by reference_rows().
REFERENCE: dict[str, tuple[str, str, str]] = {
    "KSM_MONITOR_INTERVAL": ("seconds (decimals allowed)", ">= 0.01, <= 86400", "time between adjusts"),
    "KSM_SLEEP_MSEC": ("ms, for a 16 GiB host", "0 - 10,000,000",
                       "ksmd's sleep between scans, scaled by 16 GiB / RAM, floored at 10 ms"),
    "KSM_NPAGES_BOOST": ("pages", ">= 0", "added to npages when free < threshold"),
    "KSM_NPAGES_DECAY": ("pages", "<= 0", "added to npages otherwise, while KSM runs"),
    "KSM_NPAGES_MIN": ("pages", ">= 0", "lower clamp of pages_to_scan"),
    "KSM_NPAGES_MAX": ("pages", ">= KSM_NPAGES_MIN", "upper clamp of pages_to_scan"),
    "KSM_THRES_COEF": ("% of RAM", "0 - 100", "free-memory threshold"),
    "KSM_THRES_CONST": ("kB", ">= 0", "the threshold is at least this"),
    "LOGFILE": ("absolute path", "not under /proc or /sys", "where the debug lines go (else standard output)"),
    "DEBUG": ("flag", "", "any non-empty value turns the debug log on, except 0, no, false, off"),
    "PIDFILE": ("absolute path", "", "the pid file (usually from the environment, as in the old daemon)"),
    "KSM_GUEST_MATCH": ("list", "redhat, debian, libvirt, proxmox, regex:PATTERN", "which processes are guests"),
    "KSM_PS_METRIC": ("rss | pss | vsz", "rsz = rss", "how a guest's memory is counted"),
    "KSM_FREE_METRIC": ("classic | available", "", "MemFree+Buffers+Cached, or MemAvailable"),
    "KSM_METRICS_LISTEN": ("host:port or port", "", "Prometheus /metrics; a bare port binds 127.0.0.1; off when empty"),
    "KSM_METRICS_TEXTFILE": ("absolute path", "not under /proc or /sys", "node_exporter textfile, written atomically each tick; off when empty"),
}


def _default_text(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "1" if value else "unset"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def reference_rows() -> list[tuple[str, str, str, str, str]]:
    """(key, unit, default, range, meaning) for every setting, in the model's order: the source
    of the documentation tables, so they cannot drift from the model."""
    rows = []
    for alias in KEYS:
        unit, range_, meaning = REFERENCE.get(alias, ("", "", ""))
        rows.append((alias, unit, _default_text(Settings.default(alias)), range_, meaning))
    return rows
