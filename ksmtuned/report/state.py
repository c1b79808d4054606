"""The daemon's state file: atomic replacement, and reading it back for `status`.

The file (default ``/run/ksmtuned/state.json``) is replaced after every adjust by writing a
temporary file in the same directory (``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0644), fsync, then
rename over the old one: a reader sees the old file or the new one, never a mix, and a crash
(even ``kill -9``) at any moment leaves a complete file behind.  Only the standard library is
used here, so `status` stays cheap.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..files import STATE_LIMIT_BYTES, read_regular

DEFAULT_STATE_PATH = Path("/run/ksmtuned/state.json")
#: Version of the state file's layout (README "State file").  Bumped on incompatible change.
STATE_SCHEMA = 1
#: Ticks kept in the state file's history (300 ticks = 5 hours at the default 60 s interval).
HISTORY_LEN = 300


def atomic_write(path: Path, data: bytes, mode: int = 0o644, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (temp file in the same directory, rename).

    The temp file is created with O_EXCL|O_NOFOLLOW, so a planted file or symlink of the
    same name is never written through; its mode is set with fchmod, independent of the
    umask.  Raises OSError; the temp file is removed on any failure.
    """
    path = os.fspath(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    # One temp name per process, built as a plain string: a new name every tick (pathlib, a
    # counter) grew the interpreter's string tables by ~1-3 MB per 100k ticks in the soak test.
    # (os.path, not pathlib, also on the way: this runs every tick.)
    directory, name = os.path.split(path)
    tmp = f"{directory or '.'}/.{name}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, flags, mode)
    except FileExistsError:
        # Left by a dead process that had our pid, or planted: remove it (never write through
        # it) and create ours; a name planted again in between fails this tick, not the next.
        os.unlink(tmp)
        fd = os.open(tmp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def remove_stale_temps(path: Path, procfs: Path = Path("/proc")) -> int:
    """Remove temp files of ``path`` left by processes that died mid-write (kill -9).

    Only names of the form ``.NAME.PID.tmp`` whose PID no longer exists are removed.
    Returns how many were removed.
    """
    path = Path(path)
    prefix = f".{path.name}."
    removed = 0
    try:
        entries = os.listdir(path.parent)
    except OSError:
        return 0
    for entry in entries:
        if not (entry.startswith(prefix) and entry.endswith(".tmp")):
            continue
        pid_text = entry[len(prefix):-len(".tmp")].split(".", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or (procfs / pid_text).exists():
            continue
        try:
            os.unlink(path.parent / entry)
            removed += 1
        except OSError:
            pass
    return removed


def read_state(path: Path) -> dict[str, Any] | None:
    """The state file as a dict, or None when it is missing, unreadable or not ours.

    Never follows a symlink.  A file of another schema version is treated as missing.
    """
    try:
        data = json.loads(read_regular(path, STATE_LIMIT_BYTES))  # never a FIFO: it would hang `status`
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("schema") != STATE_SCHEMA:
        return None
    return data


def read_history(path: Path) -> list[dict[str, Any]]:
    """The history of a previous daemon's state file (to carry it across a restart).

    Only from a file we own: a file planted by another user (a --state-file in a sticky
    directory) is not adopted.
    """
    try:
        if os.stat(path, follow_symlinks=False).st_uid != os.geteuid():
            return []
    except OSError:
        return []
    state = read_state(path)
    history = state.get("history") if state else None
    if not isinstance(history, list):
        return []
    return [h for h in history[-HISTORY_LEN:] if isinstance(h, dict) and isinstance(h.get("t"), (int, float))]
