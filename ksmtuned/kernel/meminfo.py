"""Parse /proc/meminfo (path injected).  Strict: impossible data is an error, not a guess."""

from __future__ import annotations

from pathlib import Path

from ..errors import MeminfoError
from .procfs import read_record

DEFAULT_MEMINFO = Path("/proc/meminfo")
CLASSIC_FREE_FIELDS = ("MemFree", "Buffers", "Cached")


def parse_meminfo(text: str, filename: str = str(DEFAULT_MEMINFO)) -> dict[str, int]:
    """'Key:   123 kB' lines -> {Key: 123} in kB (HugePages_* counts are unitless).

    Raises MeminfoError naming the file and line for a malformed line.
    """
    fields: dict[str, int] = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not key or " " in key or not parts or len(parts) > 2 or (
            len(parts) == 2 and parts[1] != "kB"
        ):
            raise MeminfoError(f"{filename}:{line_no}: expected 'Field: N kB', got {line[:80]!r}", path=filename)
        try:
            value = int(parts[0])
        except ValueError:
            raise MeminfoError(
                f"{filename}:{line_no}: {key}: expected an integer, got {parts[0][:40]!r}", path=filename
            ) from None
        if value < 0:
            raise MeminfoError(f"{filename}:{line_no}: {key}: negative value {value}", path=filename)
        fields[key] = value
    return fields


def read_meminfo(path: Path | str = DEFAULT_MEMINFO) -> dict[str, int]:
    """Parsed /proc/meminfo."""
    try:
        text = read_record(path).decode(errors="replace")
    except OSError as e:
        raise MeminfoError(f"{path}: cannot read: {e.strerror}", path=str(path), errno=e.errno) from None
    return parse_meminfo(text, str(path))


def require(fields: dict[str, int], name: str, filename: str = str(DEFAULT_MEMINFO)) -> int:
    try:
        return fields[name]
    except KeyError:
        raise MeminfoError(f"{filename}: missing field {name}", path=filename) from None


def total_kib(fields: dict[str, int], filename: str = str(DEFAULT_MEMINFO)) -> int:
    total = require(fields, "MemTotal", filename)
    if total <= 0:
        raise MeminfoError(f"{filename}: MemTotal: expected a positive size, got {total}", path=filename)
    return total


def free_kib(fields: dict[str, int], metric: str = "classic", filename: str = str(DEFAULT_MEMINFO)) -> int:
    """Free memory by the chosen metric: classic = MemFree+Buffers+Cached, available = MemAvailable.

    Free above MemTotal is impossible and raises MeminfoError.
    """
    if metric == "available":
        free = require(fields, "MemAvailable", filename)
    else:
        free = sum(require(fields, name, filename) for name in CLASSIC_FREE_FIELDS)
    total = total_kib(fields, filename)
    if free > total:
        raise MeminfoError(f"{filename}: impossible values: free memory {free} kB above MemTotal {total} kB",
                           path=filename)
    return free
