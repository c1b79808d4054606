"""The pid file, and the lock that proves a live ksmtuned owns it.

The pid file keeps the old daemon's path and content (``/var/run/ksmtune.pid``, "PID\\n",
mode 0644, readable by scripts and the libvirt hook).  The lock is *not* on it: any user may
open a 0644 file, and a flock (or POSIX lock) needs only a read-only descriptor, so another
user waiting on the pid file's lock got it the moment the daemon died uncleanly and then
refused every restart ("already runs", exit 4).  The lock is a POSIX record lock on
``PIDFILE.lock``, created mode 0600 by root: no other user can open it, so none can hold or
wait on its lock.  The kernel answers who holds it (``F_GETLK`` names the pid), which is how
``retune``, ``status`` and ``check`` verify the pid file's pid, with no scan of /proc/locks.
A caller that may not open the lock file (not root) checks the process instead: named
ksmtuned, owned by the pid file's owner, started before the pid file was written.  The daemon
also takes an flock on the pid file, best effort, for scripts that test that (the sysv init
script); it decides nothing.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct

from ..core.text import quoted
from ..errors import AlreadyRunningError, KsmtunedError, NotRunningError
from ..files import (
    PIDFILE_LIMIT_BYTES,
    open_regular,
    parse_pid,
    read_fd,
    read_pid_file,
)
from ..kernel.identity import identity

log = logging.getLogger(__name__)

PROCESS_NAME = "ksmtuned"
LOCK_SUFFIX = ".lock"
#: struct flock on 64-bit Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid, padding
_FLOCK = "hhqqi4x"
#: How much later than the pid file's mtime a process may seem to have started (the boot time
#: in /proc/stat is whole seconds; start times are in clock ticks).
START_SLACK_S = 1.5


def lock_path_for(pidfile: str | os.PathLike) -> str:
    return os.fspath(pidfile) + LOCK_SUFFIX


def _open_lock(path: str) -> int:
    """The lock file, created 0600 (root's alone), refused when anyone else could open it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP or os.path.islink(path):
            raise KsmtunedError(f"{path}: refusing a lock file that is a symbolic link") from None
        raise KsmtunedError(f"{path}: cannot open the pid file's lock file: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1 or st.st_mode & 0o077:
        os.close(fd)
        raise KsmtunedError(
            f"{path}: refusing a lock file that is not a regular file of ours, mode 0600, with one link "
            f"(another user may hold it open); remove it")
    return fd


def _holder(fd: int) -> int:
    """The pid holding a conflicting POSIX lock on the whole file, 0 when none does."""
    answer = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    l_type, _, _, _, l_pid = struct.unpack(_FLOCK, answer)
    return 0 if l_type == fcntl.F_UNLCK else l_pid


class PidFile:
    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.lock_path = lock_path_for(self.path)
        self._lock_fd: int | None = None
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (AlreadyRunningError if a live ksmtuned holds it), then open the pid file."""
        for _ in range(3):
            fd = _open_lock(self.lock_path)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _holder(fd) if e.errno in (errno.EACCES, errno.EAGAIN) else 0
                os.close(fd)
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    who = f" as pid {holder}" if holder else ""
                    raise AlreadyRunningError(f"ksmtuned already runs{who} (it holds the lock {self.lock_path})") \
                        from None
                raise KsmtunedError(f"{self.lock_path}: cannot lock: {e.strerror}") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # removed by the daemon that held it while we waited: lock the new one
        else:
            raise KsmtunedError(f"{self.lock_path}: the lock file keeps being replaced")
        self._lock_fd = fd
        try:
            self._fd = self._open_pidfile()
        except BaseException:
            self._unlock()
            raise

    def _open_pidfile(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            # O_CREAT|O_NOFOLLOW on another user's symlink in a sticky directory gets EACCES, not ELOOP
            if e.errno == errno.ELOOP or os.path.islink(self.path):
                raise KsmtunedError(f"{self.path}: refusing a pid file that is a symbolic link") from None
            raise KsmtunedError(f"{self.path}: cannot open pid file: {e.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            os.close(fd)
            raise KsmtunedError(
                f"{self.path}: refusing a pid file that is not a regular file owned by us with one link")
        os.fchmod(fd, 0o644)
        # For scripts only (the sysv init script tests it with flock(1)): an flock on the pid file
        # too, best effort.  Never what decides: another user may hold it (see above), and then
        # this daemon still starts; only such scripts are misled.
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.warning("%s: another process holds a lock on the pid file; scripts that test it with "
                        "flock(1) will be misled (the daemon's own lock is %s)", self.path, self.lock_path)
        return fd

    def write_pid(self, pid: int | None = None) -> None:
        """Write "PID\\n"; a full file system is a KsmtunedError (exit 1), never a traceback."""
        assert self._fd is not None
        data = f"{pid or os.getpid()}\n".encode()
        try:
            os.ftruncate(self._fd, 0)
            if os.pwrite(self._fd, data, 0) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            raise KsmtunedError(f"{self.path}: cannot write the pid file: {e.strerror}") from None

    def release(self) -> None:
        """Remove the pid file and the lock file (if still ours) and drop the lock."""
        if self._fd is not None:
            _unlink_if_same(self.path, self._fd)
            os.close(self._fd)
            self._fd = None
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            # removed while still locked: a starter waiting on this file sees it gone and retries
            _unlink_if_same(self.lock_path, self._lock_fd)
            os.close(self._lock_fd)
            self._lock_fd = None


def _unlink_if_same(path: str, fd: int) -> None:
    try:
        if os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False)):
            os.unlink(path)
    except OSError:
        pass


def read_pid(path: str | os.PathLike) -> int | None:
    """The pid a pid file names (ASCII digits only), None if missing, not a regular file or garbage."""
    return read_pid_file(path)


def lock_holder(pidfile: str | os.PathLike) -> int | None:
    """The pid holding the pid file's lock, 0 when no one does (or there is no lock file),
    None when this caller may not open it (the lock file is root's alone)."""
    path = lock_path_for(pidfile)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    except OSError as e:
        return None if e.errno in (errno.EACCES, errno.EPERM) else 0
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
            return 0  # not what a daemon creates: its lock proves nothing
        return _holder(fd)
    except OSError:
        return 0
    finally:
        os.close(fd)


def running_daemon(path: str | os.PathLike, procfs: str | os.PathLike = "/proc") -> int:
    """The pid of the live ksmtuned that owns the pid file, verified, else NotRunningError.

    Never trust the file's number alone.  The process must be named ksmtuned and run as the pid
    file's owner; where the lock file can be opened (root) it must be the one holding the lock,
    elsewhere it must have started before the pid file was written (a reused pid started after).
    Plain os.path, not pathlib: this is `retune`'s whole work.
    """
    path = os.fspath(path)
    procfs = os.fspath(procfs)
    none = f"ksmtuned is not running (no valid pid file at {path}"
    try:
        fd, st = open_regular(path)  # a FIFO planted there must not hang `retune` or the hook
        try:
            data = read_fd(fd, PIDFILE_LIMIT_BYTES, path)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise NotRunningError(none + ")") from None
    except OSError as e:
        raise NotRunningError(f"{none}: {e.strerror})") from None
    pid = parse_pid(data)
    if pid is None:
        raise NotRunningError(f"{none}: expected a process id, got {quoted(data.decode(errors='replace'))})")
    who = identity(pid, procfs)
    if who is None:
        raise NotRunningError(f"ksmtuned is not running (stale pid file {path} names pid {pid}, which is gone)")
    refuse = (f"ksmtuned is not running: pid file {path} names pid {pid} ({who.comm}), which is not a ksmtuned "
              "holding that pid file; not signalling it")
    if who.comm != PROCESS_NAME:
        raise NotRunningError(refuse)
    if who.uid != st.st_uid:
        raise NotRunningError(f"{refuse} (it runs as uid {who.uid}, the pid file is uid {st.st_uid}'s)")
    holder = lock_holder(path)
    if holder is not None:
        # the kernel's answer decides: only root can hold the 0600 lock file's lock, and it dies
        # with its process, so a reused pid never holds it
        if holder != pid:
            raise NotRunningError(refuse + (f" (pid {holder} holds the lock)" if holder else " (no one holds the lock)"))
        return pid
    # not root: the lock file is out of reach, so the start time tells a reused pid (one that
    # started after the pid file was written).  Wall-clock times both: a clock stepped forward
    # since the daemon started makes this say "not running" (only here, never for root's retune).
    if who.start_s > st.st_mtime + START_SLACK_S:
        raise NotRunningError(f"{refuse} (it started after the pid file was written: a reused pid)")
    return pid


def set_process_name(name: str = PROCESS_NAME) -> None:
    """Set comm (what ps and pgrep show) so `retune` can recognise the daemon."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass
