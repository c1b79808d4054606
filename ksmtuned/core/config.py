"""ksmtuned.conf text -> one frozen, validated Settings object.

The text is parsed by :mod:`ksmtuned.core.shellconf` (the shell subset real files use, code
refused); this module turns the assignments, the environment and the defaults into the
pydantic settings model, each bad value reported as FILE:LINE: KEY: expected ..., got '...'.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Dict, List, Literal, Mapping, Optional, Tuple

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from ..errors import ConfigError
from ..paths import DEFAULT_PIDFILE, KERNEL_DIRS
from .budget import BudgetSettings
from .matchers import DEFAULT_TRUST
from .policy import Tuning
from .shellconf import DEFAULT_CONFIG_PATH, Assignment, parse_assignments
from .text import PROBLEM_LIMIT, first_of, quoted

#: The shortest KSM_MONITOR_INTERVAL: a shorter one is a busy loop (1e-300 spun a CPU), not a
#: tuning (the fault tests run at 0.01 s; the old daemon's `sleep` took anything).
MIN_INTERVAL_S = 0.01

__all__ = ["Assignment", "parse_assignments", "Settings", "SettingsError", "KEYS", "LoadedConfig", "build_settings",
           "parse_bool", "parse_listen", "reference_rows", "DEFAULT_CONFIG_PATH", "MATCHER_NAMES"]

_FALSE_WORDS = {"0", "no", "false", "off"}
MATCHER_NAMES = ("redhat", "debian", "libvirt", "proxmox")


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
# pydantic (v2): the ranges stand beside the fields (Field(ge=, le=, gt=)), the cross-field check
# is a model validator, the historical KSM_* names are the aliases, and the way bash reads
# numbers is a before-validator, so a value means what it meant to the old daemon or is refused.
# Only API present since pydantic 2.0 is used (Debian 13 ships 2.10; RHEL 9 runs Python 3.9, so
# the annotations below use Optional/Tuple: pydantic evaluates them at runtime).

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


def to_optional_text(value: object) -> Optional[str]:
    return to_text(value) if value else None


def to_path(value: object) -> str:
    """An absolute path: the daemon runs from / (forked) or wherever systemd starts it, so a
    relative one would name a file nobody meant (the command line's are made absolute first)."""
    path = to_text(value)
    if not path.startswith("/"):
        raise ValueError("expected an absolute path")
    return path


def to_output_path(value: object) -> Optional[str]:
    """LOGFILE, KSM_METRICS_TEXTFILE: unset, or an absolute path outside /proc and /sys (where a
    "log line" would tune the kernel: /proc/sysrq-trigger, /proc/sys/vm/drop_caches)."""
    if not value:
        return None
    path = to_path(value)
    normal = os.path.normpath(path)
    if normal.startswith("//") or any(normal == d or normal.startswith(d + "/") for d in KERNEL_DIRS):
        raise ValueError("expected a path outside /proc and /sys (writing there tunes the kernel)")
    return path


def choice(*words: str, also: Optional[Mapping[str, str]] = None) -> Callable[[object], str]:
    """One of `words`, case-insensitive; `also` maps other spellings to one of them."""
    listed = ", ".join(f"'{w}'" for w in words[:-1]) + f" or '{words[-1]}'"

    def convert(value: object) -> str:
        word = value.strip().lower() if isinstance(value, str) else ""
        word = (also or {}).get(word, word)
        if word not in words:
            raise ValueError(f"expected {listed}")
        return word

    return convert


def _comma_list(value: object) -> Tuple[str, ...]:
    """A KSM_* list: "a, b,c" from the file, or a tuple/list of strings from code; () otherwise."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if isinstance(value, (tuple, list)) and all(isinstance(item, str) for item in value):
        return tuple(value)
    return ()


def to_guest_match(value: object) -> Tuple[str, ...]:
    items = _comma_list(value)
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


def to_guest_trust(value: object) -> Tuple[str, ...]:
    """KSM_GUEST_TRUST: whose guest-looking processes count (core/matchers.py, docs/security.md)."""
    from .matchers import parse_trust

    return parse_trust(_comma_list(value))


def to_listen(value: object) -> Optional[Tuple[str, int]]:
    if isinstance(value, str):
        return parse_listen(value)
    if value is None:
        return None
    if (isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and 0 < value[1] < 65536):
        return (value[0], value[1])
    raise ValueError("expected HOST:PORT")


#: The value types of ksmtuned.conf: pydantic's type, read first as the old daemon read it.
BashInt = Annotated[int, BeforeValidator(to_integer)]
BashNumber = Annotated[float, BeforeValidator(to_number)]
Flag = Annotated[bool, BeforeValidator(to_flag)]
Text = Annotated[str, BeforeValidator(to_text)]
OptionalText = Annotated[Optional[str], BeforeValidator(to_optional_text)]
AbsolutePath = Annotated[str, BeforeValidator(to_path)]
OutputPath = Annotated[Optional[str], BeforeValidator(to_output_path)]
GuestMatch = Annotated[Tuple[str, ...], BeforeValidator(to_guest_match)]
GuestTrust = Annotated[Tuple[str, ...], BeforeValidator(to_guest_trust)]
Listen = Annotated[Optional[Tuple[str, int]], BeforeValidator(to_listen)]
PsMetric = Annotated[Literal["rss", "pss", "vsz"], BeforeValidator(choice("rss", "pss", "vsz", also={"rsz": "rss"}))]
FreeMetric = Annotated[Literal["classic", "available"], BeforeValidator(choice("classic", "available"))]
Policy = Annotated[Literal["classic", "budget"], BeforeValidator(choice("classic", "budget"))]
AdvisorChoice = Annotated[Literal["take", "leave"], BeforeValidator(choice("take", "leave"))]


def setting(alias: str, default: Any, *, unit: str, range_text: str = "", meaning: str, **bounds: Any) -> Any:
    """A Settings field: its ksmtuned.conf key, its default, its bounds (ge=, gt=, le=) and its
    documentation (unit, range in words, meaning: the man page's and README's key table)."""
    return Field(default, alias=alias, description=meaning, json_schema_extra={"unit": unit, "range": range_text},
                 **bounds)


class SettingsError(ValueError):
    """Invalid values: ``problems`` lists (alias, message), alias None for the cross-field check."""

    def __init__(self, problems: List[Tuple[Optional[str], str]]):
        super().__init__("; ".join(f"{a or 'settings'}: {m}" for a, m in problems))
        self.problems = problems


def _message(error: Mapping[str, Any]) -> str:
    """One pydantic error in the words ksmtuned has always used ("expected ...")."""
    kind = error["type"]
    # a float field's bound comes back as 0.0: say 0, as the range is written
    ctx = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in (error.get("ctx") or {}).items()}
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    if kind == "greater_than":
        return f"expected a value greater than {ctx['gt']}"
    if kind == "greater_than_equal":
        return f"expected a value greater than or equal to {ctx['ge']}"
    if kind == "less_than_equal":
        return f"expected a value less than or equal to {ctx['le']}"
    if kind == "less_than":
        return f"expected a value less than {ctx['lt']}"
    if kind == "extra_forbidden":
        return "unknown key"
    return "expected " + str(error["msg"]).replace("Input should be ", "")


class Settings(BaseModel):
    """Every setting in force, each field with its historical ksmtuned.conf key (the alias),
    its default and its range.  Construction checks every value (SettingsError); frozen."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="forbid")

    monitor_interval_s: BashNumber = setting(
        "KSM_MONITOR_INTERVAL", 60.0, ge=MIN_INTERVAL_S, le=86400,
        unit="seconds (decimals allowed)", range_text=">= 0.01, <= 86400", meaning="time between adjusts")
    sleep_msec: BashInt = setting(
        "KSM_SLEEP_MSEC", 10, ge=0, le=10_000_000, unit="ms, for a 16 GiB host", range_text="0 - 10,000,000",
        meaning="ksmd's sleep between scans, scaled by 16 GiB / RAM, floored at 10 ms")
    npages_boost: BashInt = setting(
        "KSM_NPAGES_BOOST", 300, ge=0, le=2**31 - 1,
        unit="pages", range_text=">= 0", meaning="added to npages when free < threshold")
    npages_decay: BashInt = setting(
        "KSM_NPAGES_DECAY", -50, ge=-(2**31), le=0,
        unit="pages", range_text="<= 0", meaning="added to npages otherwise, while KSM runs")
    npages_min: BashInt = setting(
        "KSM_NPAGES_MIN", 64, ge=0, le=2**32 - 1, unit="pages", range_text=">= 0", meaning="lower clamp of pages_to_scan")
    npages_max: BashInt = setting(
        "KSM_NPAGES_MAX", 1250, ge=0, le=2**32 - 1,
        unit="pages", range_text=">= KSM_NPAGES_MIN", meaning="upper clamp of pages_to_scan")
    thres_coef_pct: BashInt = setting(
        "KSM_THRES_COEF", 20, ge=0, le=100, unit="% of RAM", range_text="0 - 100", meaning="free-memory threshold")
    thres_const_kib: BashInt = setting(
        "KSM_THRES_CONST", 2048, ge=0, le=2**50, unit="kB", range_text=">= 0", meaning="the threshold is at least this")
    logfile: OutputPath = setting(
        "LOGFILE", None, unit="absolute path", range_text="not under /proc or /sys",
        meaning="where the debug lines go (else standard output)")
    debug: Flag = setting(
        "DEBUG", False, unit="flag", meaning="any non-empty value turns the debug log on, except 0, no, false, off")
    pidfile: AbsolutePath = setting(
        "PIDFILE", DEFAULT_PIDFILE, unit="absolute path",
        meaning="the pid file (usually from the environment, as in the old daemon)")
    guest_match: GuestMatch = setting(
        "KSM_GUEST_MATCH", MATCHER_NAMES, unit="list", range_text="redhat, debian, libvirt, proxmox, regex:PATTERN",
        meaning="which processes are guests")
    guest_trust: GuestTrust = setting(
        "KSM_GUEST_TRUST", DEFAULT_TRUST, unit="list", range_text="root, hypervisor, pidfile, machine-slice, user:NAME, any",
        meaning="whose guest-looking processes count (docs/security.md)")
    ps_metric: PsMetric = setting(  # rsz: Proxmox's spelling
        "KSM_PS_METRIC", "rss", unit="rss | pss | vsz", range_text="rsz = rss", meaning="how a guest's memory is counted")
    free_metric: FreeMetric = setting(
        "KSM_FREE_METRIC", "classic", unit="classic | available", meaning="MemFree+Buffers+Cached, or MemAvailable")
    metrics_listen: Listen = setting(
        "KSM_METRICS_LISTEN", None, unit="host:port or port",
        meaning="Prometheus /metrics; a bare port binds 127.0.0.1; off when empty")
    metrics_textfile: OutputPath = setting(
        "KSM_METRICS_TEXTFILE", None, unit="absolute path", range_text="not under /proc or /sys",
        meaning="node_exporter textfile, written atomically each tick; off when empty")
    # --- the budget policy (docs/budget.md): classic decides whether KSM runs, budget how hard ---
    policy: Policy = setting(
        "KSM_POLICY", "classic", unit="classic | budget",
        meaning="how hard ksmd scans: the old ramp, or bursts then a CPU budget (docs/budget.md)")
    budget_burst_pct: BashNumber = setting(
        "KSM_BUDGET_BURST_PCT", 80.0, gt=0, le=100, unit="% of one core", range_text="> 0, <= 100",
        meaning="budget: ksmd's CPU while new memory is merged")
    budget_steady_pct: BashNumber = setting(
        "KSM_BUDGET_STEADY_PCT", 0.25, gt=0, le=100, unit="% of one core", range_text="> 0, <= 100",
        meaning="budget: ksmd's CPU ceiling otherwise")
    budget_min_pass_s: BashNumber = setting(
        "KSM_BUDGET_MIN_PASS", 200.0, gt=0, le=86400, unit="seconds", range_text="> 0, <= 86400",
        meaning="budget: merged memory is re-scanned at most once per this")
    budget_churn_pct: BashNumber = setting(
        "KSM_BUDGET_CHURN_PCT", 1.0, ge=0, le=100, unit="% of one core", range_text=">= 0, <= 100",
        meaning="budget: ksmd's CPU ceiling while it holds churning pages merged that merge again and stay merged; "
                "0: never hold them")
    budget_watch_s: BashNumber = setting(
        "KSM_BUDGET_WATCH", 0.5, ge=0.1, le=3600, unit="seconds", range_text="0.1 - 3600",
        meaning="budget: how often new guests and grown ones are looked for")
    budget_advisor: AdvisorChoice = setting(
        "KSM_BUDGET_ADVISOR", "take", unit="take | leave",
        meaning="budget: switch the kernel's advisor off while running (and back on exit), or leave it the scan rate")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise SettingsError([(None if not err["loc"] else _alias(err["loc"][0]), _message(err))
                                 for err in e.errors()]) from None

    @model_validator(mode="after")
    def _min_not_above_max(self) -> "Settings":
        if self.npages_max < self.npages_min:
            raise ValueError(f"KSM_NPAGES_MAX ({self.npages_max}) must be >= KSM_NPAGES_MIN ({self.npages_min})")
        return self

    @classmethod
    def from_aliases(cls, values: Mapping[str, object]) -> "Settings":
        """Settings from {KSM_* key: value}; every bad value is reported (SettingsError), not just
        the first, in the order of ``values``."""
        unknown = set(values) - set(KEYS)
        if unknown:
            raise SettingsError([(None, f"unknown keys {', '.join(first_of(sorted(unknown)))}")])
        try:
            return cls(**values)
        except SettingsError as e:  # pydantic reports in field order: report in the caller's
            order = list(values)
            e.problems.sort(key=lambda p: order.index(p[0]) if p[0] in order else len(order))
            raise

    @classmethod
    def default(cls, alias: str) -> Any:
        return cls.model_fields[KEYS[alias]].default

    def by_alias(self) -> Dict[str, Any]:
        """{KSM_* key: value}, JSON-ready (tuples as lists)."""
        return self.model_dump(mode="json", by_alias=True)

    def budget(self, hz: Optional[int] = None) -> BudgetSettings:
        """The budget law's knobs (hz: the kernel's CONFIG_HZ, where known)."""
        return BudgetSettings(burst_pct=self.budget_burst_pct, steady_pct=self.budget_steady_pct,
                              min_pass_s=self.budget_min_pass_s, churn_pct=self.budget_churn_pct,
                              watch_s=self.budget_watch_s,
                              **({"hz": hz} if hz else {}))

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


#: alias -> field name, in the model's order
KEYS: Dict[str, str] = {f.alias or name: name for name, f in Settings.model_fields.items()}
_ALIASES = {name: alias for alias, name in KEYS.items()}


def _alias(loc: object) -> str:
    return _ALIASES.get(str(loc), str(loc))


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
                key = a.key if len(a.key) <= 80 else a.key[:80] + "…"
                warnings.append(f"{filename}:{a.line_no}: unknown key {key} (ignored)")
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
        for problem_key, message in e.problems:
            name = problem_key or "KSM_NPAGES_MAX"
            if problem_key is None:  # the cross-field check: MAX >= MIN
                message = f"expected a value >= KSM_NPAGES_MIN ({values.get('KSM_NPAGES_MIN', 64)})"
            where = sources.get(name, filename)
            where = where.split(" ")[0] if where.startswith(filename) else f"{filename}: {where}"
            problems.append(f"{where}: {name}: {message}, got {quoted(values.get(name, Settings.default(name)))}")
        raise ConfigError("\n".join(first_of(problems))) from None
    return LoadedConfig(settings=settings, sources=sources, warnings=tuple(warnings), path=filename)


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
    for alias, name in KEYS.items():
        f = Settings.model_fields[name]
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        rows.append((alias, str(extra.get("unit", "")), _default_text(f.default), str(extra.get("range", "")),
                     f.description or ""))
    return rows
