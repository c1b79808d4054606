"""libvirt's and Proxmox's pid files: ``<run>/libvirt/qemu/<guest>.pid``, ``<run>/qemu-server/<vmid>.pid``.

Each is read again only when its inode or mtime changed.  A pid file whose directory and file
are owned by root and writable by no one else could only have been written by root: it vouches
for the process it names (``KSM_GUEST_TRUST=pidfile``).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ...files import read_pid_file


@dataclass(frozen=True)
class PidFile:
    matcher: str
    path: str
    pid: int
    mtime_s: float
    root_owned: bool


def _root_only(st: os.stat_result) -> bool:
    return st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


class PidFiles:
    def __init__(self, dirs: Sequence[Tuple[str, str]]):
        self.dirs = list(dirs)  # (matcher, directory)
        self._cache: Dict[str, Tuple[Tuple[int, int], Optional[int]]] = {}  # path -> ((ino, mtime), pid)

    def read(self) -> List[PidFile]:
        found = []
        for matcher, directory in self.dirs:
            try:
                dir_st = os.stat(directory, follow_symlinks=False)
                with os.scandir(directory) as it:
                    entries = [e for e in it if e.name.endswith(".pid") and e.is_file(follow_symlinks=False)]
            except OSError:
                continue  # no such directory: that manager is not installed or runs no guest
            dir_root = stat.S_ISDIR(dir_st.st_mode) and _root_only(dir_st)
            for e in entries:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                key = (st.st_ino, st.st_mtime_ns)
                cached = self._cache.get(e.path)
                if cached is not None and cached[0] == key:
                    pid = cached[1]
                else:
                    pid = _read_pid(e.path)
                    self._cache[e.path] = (key, pid)
                if pid is not None:
                    found.append(PidFile(matcher, e.path, pid, st.st_mtime, dir_root and _root_only(st)))
        if len(self._cache) > 1024:
            self._cache.clear()
        return found


def _read_pid(path: str) -> Optional[int]:
    """ASCII digits only, never blocking, never through a link, at most 64 bytes (ksmtuned.files)."""
    return read_pid_file(path)
