"""Reading the config file: the safety check (a root daemon trusts no file others can write)
and the file -> :class:`ksmtuned.core.config.LoadedConfig` step."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from ..core.shellconf import Assignment, parse_assignments
from ..errors import ConfigError
from ..paths import DEFAULT_CONFIG, DEFAULT_PIDFILE, Paths

if TYPE_CHECKING:
    from ..core.config import LoadedConfig

log = logging.getLogger("ksmtuned")


def load_config(
    path: Path = Path(DEFAULT_CONFIG),
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
    missing_ok: bool = True,
) -> LoadedConfig:
    """Read and validate the config file.

    With missing_ok, a missing or empty file means all defaults (as the old daemon at start);
    without it (reload) either is a ConfigError, so the settings in force stay.
    """
    # the settings model (pydantic) only here: `retune` reads the assignments alone
    from ..core.config import LoadedConfig, build_settings

    env = os.environ if env is None else env
    filename = str(path)
    assignments = read_assignments(path, missing_ok)
    if assignments is None:
        loaded = build_settings([], env, filename, overrides)
        return LoadedConfig(loaded.settings, loaded.sources, loaded.warnings, filename, file_found=False)
    return build_settings(assignments, env, filename, overrides)


def read_assignments(path: Path, missing_ok: bool = True) -> list[Assignment] | None:
    """The file's assignments, or None when it does not exist (and ``missing_ok``)."""
    filename = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        if not missing_ok:
            raise ConfigError(f"{filename}: no such file") from None
        return None
    except OSError as e:
        raise ConfigError(f"{filename}: cannot read: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{filename}:{line_no}: not valid UTF-8 text") from None
    if not missing_ok and not text.strip(" \t\r\n\ufeff"):
        raise ConfigError(f"{filename}: the file is empty")
    return parse_assignments(text, filename)


def check_file_safety(path: Path, expected_uid: int = 0) -> None:
    """Refuse a config file, or its directory, that someone other than root could change.

    A root daemon must not trust data others can write (sshd's StrictModes does the same).
    """
    path = Path(path)
    try:
        lst = os.lstat(path)
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError(f"{path}: cannot stat: {e.strerror}") from None
    if stat.S_ISLNK(lst.st_mode) and lst.st_uid != expected_uid:
        # planted in a sticky directory, it could point at any root-only file, whose lines the
        # parse errors would then quote
        raise ConfigError(
            f"{path}: config file is a symbolic link owned by uid {lst.st_uid}, not root; "
            f"fix with: rm {path}, and put the config file there (or pass --insecure-config)"
        )
    for target, st_ in ((path, st), (path.parent, os.stat(path.parent))):
        kind = "file" if target == path else "directory"
        if st_.st_uid != expected_uid:
            raise ConfigError(
                f"{target}: config {kind} is owned by uid {st_.st_uid}, not root; "
                f"fix with: chown root {target} (or pass --insecure-config)"
            )
        writable_by_others = st_.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if kind == "directory" and st_.st_mode & stat.S_ISVTX:
            writable_by_others = 0 if st.st_uid == expected_uid else writable_by_others
        if writable_by_others:
            raise ConfigError(
                f"{target}: config {kind} is writable by group or others (mode {stat.S_IMODE(st_.st_mode):o}); "
                f"fix with: chmod go-w {target} (or pass --insecure-config)"
            )


def load(paths: Paths, reloading: bool = False, env: Mapping[str, str] | None = None) -> LoadedConfig:
    """The config in force for ``paths``: the file's safety checked (as root, unless
    ``--insecure-config``), ``--pidfile`` over ``PIDFILE=``.

    At start a missing or empty file means the defaults (as the old daemon); on reload it is
    refused, so a file deleted or being rewritten keeps the settings in force.
    """
    path = Path(paths.config)
    overrides = {"PIDFILE": paths.pidfile} if paths.pidfile else {}
    if os.geteuid() == 0 and not paths.insecure_config:
        check_file_safety(path)
    return load_config(path, env=env, overrides=overrides, missing_ok=not reloading)


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
        if os.geteuid() == 0 and not paths.insecure_config:
            check_file_safety(path)
        assignments = read_assignments(path) or []
    except ConfigError as e:
        log.warning("%s (pid file from the environment or the default)", str(e).splitlines()[0])
        assignments = []
    values = [a.value for a in assignments if a.key == "PIDFILE"]
    if values:
        return values[-1] or DEFAULT_PIDFILE
    return env.get("PIDFILE") or DEFAULT_PIDFILE
