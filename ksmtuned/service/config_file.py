"""Reading the config file: the safety check (a root daemon trusts no file others can write)
and the file -> :class:`ksmtuned.core.config.LoadedConfig` step."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from ..core.shellconf import Assignment, parse_assignments
from ..errors import ConfigError
from ..files import CONFIG_LIMIT_BYTES, NotRegularFileError, read_regular
from ..paths import DEFAULT_CONFIG, DEFAULT_PIDFILE, Paths

if TYPE_CHECKING:
    from ..core.config import LoadedConfig

log = logging.getLogger("ksmtuned")


def load_config(
    path: Path = Path(DEFAULT_CONFIG),
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
    missing_ok: bool = True,
    check_owner: bool = False,
) -> LoadedConfig:
    """Read and validate the config file.

    With missing_ok, a missing or empty file means all defaults (as the old daemon at start);
    without it (reload) either is a ConfigError, so the settings in force stay.  With
    check_owner (root, without --insecure-config) the file and every directory above it must
    be root's and writable by no one else (see :func:`read_config_file`).
    """
    # the settings model (pydantic) only here: `retune` reads the assignments alone
    from ..core.config import LoadedConfig, build_settings

    env = os.environ if env is None else env
    filename = str(path)
    assignments = read_assignments(path, missing_ok, check_owner=check_owner)
    if assignments is None:
        loaded = build_settings([], env, filename, overrides)
        return LoadedConfig(loaded.settings, loaded.sources, loaded.warnings, filename, file_found=False)
    return build_settings(assignments, env, filename, overrides)


def read_assignments(path: Path, missing_ok: bool = True, check_owner: bool = False) -> list[Assignment] | None:
    """The file's assignments, or None when it does not exist (and ``missing_ok``); read by
    :func:`read_config_file` (one open, checked, bounded)."""
    filename = str(path)
    data = read_config_file(path, check_owner=check_owner)
    if data is None:
        if not missing_ok:
            raise ConfigError(f"{filename}: no such file")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{filename}:{line_no}: not valid UTF-8 text") from None
    if not missing_ok and not text.strip(" \t\r\n\ufeff"):
        raise ConfigError(f"{filename}: the file is empty")
    return parse_assignments(text, filename)


_FIX = " (or pass --insecure-config)"


def _check_entry(target: str, st: os.stat_result, kind: str, expected_uid: int) -> None:
    """One entry of the config's path: owned by root, and (a directory) writable by no one else
    unless sticky (/tmp: others may add names there but cannot replace root's)."""
    if st.st_uid != expected_uid:
        raise ConfigError(f"{target}: config {kind} is owned by uid {st.st_uid}, not root; "
                          f"fix with: chown root {target}{_FIX}")
    if kind == "directory" and st.st_mode & stat.S_ISVTX:
        return
    if kind != "symbolic link" and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{target}: config {kind} is writable by group or others (mode "
                          f"{stat.S_IMODE(st.st_mode):o}); fix with: chmod go-w {target}{_FIX}")


def _check_directories(path: str, expected_uid: int) -> None:
    """Every directory above ``path`` (and every symbolic link on the way) from / down: root's,
    and not writable by others unless sticky.  One that does not exist ends the walk (nothing
    below it exists either)."""
    parts = path.split("/")[1:-1]
    current = "/"
    for part in [""] + parts:
        current = os.path.join(current, part) if part else current
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return
        except OSError as e:
            raise ConfigError(f"{current}: cannot check the config's directory: {e.strerror}") from None
        kind = "symbolic link" if stat.S_ISLNK(st.st_mode) else "directory"
        _check_entry(current, st, kind, expected_uid)


def read_config_file(path: str | os.PathLike, check_owner: bool, expected_uid: int = 0) -> bytes | None:
    """The config file's bytes (None when it does not exist), read with no window for a race.

    The file is opened once (no symlink followed, non-blocking: a FIFO cannot hang us), the
    open file is checked (a regular file; with check_owner: root's, writable by no one else),
    then read from that descriptor, at most CONFIG_LIMIT_BYTES.  With check_owner, every
    directory above it is checked first, also for a file that does not exist yet: a root
    daemon must not trust data others can write (sshd's StrictModes does the same).  A symbolic
    link is followed only when it is root's (its directories checked too) or without
    check_owner.  --insecure-config turns check_owner off, never the regular-file and size
    checks.
    """
    where = os.path.abspath(os.fspath(path))
    if check_owner:
        _check_directories(where, expected_uid)
        directory, name = os.path.split(where)
        real_dir = os.path.realpath(directory)
        if real_dir != directory:  # a link on the way (/var/run -> /run): its target's directories too
            _check_directories(os.path.join(real_dir, name), expected_uid)

    def check(st: os.stat_result) -> None:
        if check_owner:
            _check_entry(where, st, "file", expected_uid)

    try:
        try:
            return read_regular(where, CONFIG_LIMIT_BYTES, check=check)
        except NotRegularFileError as e:
            if e.errno != errno.ELOOP:
                raise
            if check_owner:
                lst = os.lstat(where)
                if lst.st_uid != expected_uid:
                    # planted in a sticky directory, it could point at any root-only file, whose
                    # lines the parse errors would then quote
                    raise ConfigError(
                        f"{where}: config file is a symbolic link owned by uid {lst.st_uid}, not root; "
                        f"fix with: rm {where}, and put the config file there{_FIX}") from None
            real = os.path.realpath(where)
            if check_owner:
                _check_directories(real, expected_uid)
            where = real
            return read_regular(real, CONFIG_LIMIT_BYTES, check=check)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"{where}: cannot read the config file: {e.strerror}") from None


def check_file_safety(path: Path, expected_uid: int = 0) -> None:
    """Refuse a config file, or a directory above it, that someone other than root could change
    (the checks of :func:`read_config_file`)."""
    read_config_file(path, check_owner=True, expected_uid=expected_uid)


def load(paths: Paths, reloading: bool = False, env: Mapping[str, str] | None = None) -> LoadedConfig:
    """The config in force for ``paths``: the file's safety checked (as root, unless
    ``--insecure-config``), ``--pidfile`` over ``PIDFILE=``.

    At start a missing or empty file means the defaults (as the old daemon); on reload it is
    refused, so a file deleted or being rewritten keeps the settings in force.
    """
    path = Path(paths.config)
    overrides = {"PIDFILE": paths.pidfile} if paths.pidfile else {}
    return load_config(path, env=env, overrides=overrides, missing_ok=not reloading,
                       check_owner=os.geteuid() == 0 and not paths.insecure_config)


def pidfile_in_force(paths: Paths, env: Mapping[str, str] | None = None) -> str:
    """--pidfile, else PIDFILE from the config file, else from the environment, else the default:
    the same file the daemon uses (as build_settings resolves it: the last assignment wins, an
    empty one means the default).  Only the file's assignments are read, not the settings model:
    `retune` is the libvirt hook's command, and a bad value of another key must not stop a hook
    from reaching the daemon.  A file that cannot be parsed is warned about, and the environment
    and the default decide."""
    if paths.pidfile:
        return paths.pidfile
    env = os.environ if env is None else env
    path = Path(paths.config)
    try:
        assignments = read_assignments(path, check_owner=os.geteuid() == 0 and not paths.insecure_config) or []
    except ConfigError as e:
        log.warning("%s (pid file from the environment or the default)", str(e).splitlines()[0])
        assignments = []
    values = [a.value for a in assignments if a.key == "PIDFILE"]
    if values:
        return values[-1] or DEFAULT_PIDFILE
    return env.get("PIDFILE") or DEFAULT_PIDFILE
