"""The daemon's state file: atomic replacement, and reading it back for `status`.

The file (default ``/run/ksmtuned/state.json``) is replaced after every adjust by writing a
temporary file in the same directory (``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0644), fsync, then
rename over the old one: a reader sees the old file or the new one, never a mix, and a crash
(even ``kill -9``) at any moment leaves a complete file behind.  It is read back through its
pydantic model (ksmtuned.core.documents.StateDocument).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from pydantic import ValidationError

from ..core.text import printable
from ..core.documents import STATE_SCHEMA, HistoryEntry, StateDocument, StateHistory  # noqa: F401 (STATE_SCHEMA: re-exported)
from ..errors import StateFileError
from ..files import STATE_LIMIT_BYTES, read_regular

log = logging.getLogger(__name__)

DEFAULT_STATE_PATH = Path("/run/ksmtuned/state.json")
#: A state file is about 60 kB (300 ticks of history, some guests); a larger one is not ours.
STATE_MAX_BYTES = STATE_LIMIT_BYTES
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


def read_bounded(path: Path | str, limit_bytes: int) -> bytes | None:
    """The bytes of the regular file ``path``, or None when it does not exist.

    Through :func:`ksmtuned.files.read_regular`: opened without following a symlink and without
    blocking (a FIFO planted at the path does not hang the reader), checked to be a regular
    file, read up to ``limit_bytes``.  Raises StateFileError with one line naming the file
    otherwise.
    """
    try:
        return read_regular(path, limit_bytes)
    except FileNotFoundError:
        return None
    except OSError as e:  # a FIFO, a device, a symbolic link, too large: the reader's one line
        what = "a symbolic link (ksmtuned never writes one)" if e.errno == errno.ELOOP else e.strerror
        raise StateFileError(f"{path}: cannot read the state file: {what}") from None


def _bounded(text: str, limit: int) -> str:
    """A hostile file's key or text, at most ``limit`` characters.  Not escaped here: the CLI
    shows every error line through printable(), the daemon's log line below does the same."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _problem(path: Path | str, error: ValidationError) -> StateFileError:
    errors = error.errors()
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return StateFileError(_bounded(f"{path}: not a ksmtuned state file: {where + ': ' if where else ''}"
                                     f"{first['msg'].replace('Value error, ', '')}{more}", 300))


def read_state(path: Path | str) -> StateDocument | None:
    """The state file through its model, or None when there is none.

    Never follows a symlink, never blocks, reads at most STATE_MAX_BYTES.  A file that is not
    a state document of this schema (truncated, planted, NaN, 1e400, nested 100k deep, of
    another version) raises StateFileError: one line, exit 65 from the CLI.
    """
    data = read_bounded(path, STATE_MAX_BYTES)
    if data is None:
        return None
    try:
        return StateDocument.model_validate_json(data)
    except ValidationError as e:
        raise _problem(path, e) from None


def read_history(path: Path | str) -> list[HistoryEntry]:
    """The history of a previous daemon's state file (to carry it across a restart).

    Only from a file we own: a file planted by another user (a --state-file in a sticky
    directory) is not adopted.  A file that cannot be read as one is logged and ignored: the
    daemon starts with an empty history.
    """
    try:
        if os.stat(path, follow_symlinks=False).st_uid != os.geteuid():
            return []
    except OSError:
        return []
    try:
        data = read_bounded(path, STATE_MAX_BYTES)
        if data is None:
            return []
        try:
            state = StateHistory.model_validate_json(data)
        except ValidationError as e:
            raise _problem(path, e) from None
    except StateFileError as e:
        log.warning("%s; starting with an empty history", printable(e))
        return []
    return state.history[-HISTORY_LEN:]
