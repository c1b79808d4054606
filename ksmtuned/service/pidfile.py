"""The pid file: an exclusive flock proves a live ksmtuned owns it.

A second instance cannot take the lock and is refused; a stale file left by a dead daemon
is not locked and is simply taken over.  The file is never followed through a symlink.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from ..errors import AlreadyRunningError, KsmtunedError, NotRunningError

PROCESS_NAME = "ksmtuned"


class PidFile:
    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            # O_CREAT|O_NOFOLLOW on another user's symlink in a sticky directory gets EACCES, not ELOOP
            if e.errno == errno.ELOOP or os.path.islink(self.path):
                raise KsmtunedError(f"{self.path}: refusing a pid file that is a symbolic link") from None
            raise KsmtunedError(f"{self.path}: cannot open pid file: {e.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            os.close(fd)
            raise KsmtunedError(
                f"{self.path}: refusing a pid file that is not a regular file owned by us with one link"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            other = read_pid(self.path)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                who = f" as pid {other}" if other else ""
                raise AlreadyRunningError(f"ksmtuned already runs{who} (it holds the lock on {self.path})") from None
            raise KsmtunedError(f"{self.path}: cannot lock pid file: {e.strerror}") from None
        self._fd = fd

    def write_pid(self, pid: int | None = None) -> None:
        assert self._fd is not None
        data = f"{pid or os.getpid()}\n".encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        """Remove the file (if it is still ours) and drop the lock."""
        if self._fd is None:
            return
        try:
            st_fd = os.fstat(self._fd)
            st_path = os.stat(self.path, follow_symlinks=False)
            if (st_fd.st_dev, st_fd.st_ino) == (st_path.st_dev, st_path.st_ino):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def read_pid(path: str | os.PathLike) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(fd, 64).decode(errors="replace").strip()
    finally:
        os.close(fd)
    return int(text) if text.isdigit() and int(text) > 0 else None


def lock_holders(path: str | os.PathLike, procfs: str | os.PathLike = "/proc") -> set[int]:
    """Pids holding a flock on the file, from /proc/locks."""
    try:
        st = os.stat(path, follow_symlinks=False)
        with open(os.path.join(procfs, "locks")) as f:
            text = f.read()
    except OSError:
        return set()
    return _flock_holders(text.splitlines(), st)


def _flock_holders(lines: list[str], st: os.stat_result) -> set[int]:
    """Pids of the FLOCK lines (/proc/locks' format) on the file that st describes."""
    wanted = f":{st.st_ino}"
    holders = set()
    for line in lines:
        parts = line.split()
        if "->" in parts:
            continue  # a waiter, not a holder
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].endswith(wanted):
            dev = parts[5].rsplit(":", 1)[0]
            major, minor = (int(x, 16) for x in dev.split(":"))
            if os.makedev(major, minor) == st.st_dev and parts[4].isdigit():
                holders.add(int(parts[4]))
    return holders


def holds_lock(pid: int, path: str | os.PathLike, procfs: str | os.PathLike = "/proc") -> bool:
    """Whether the process holds a flock on the file.

    Asked of the process itself first: /proc/PID/fdinfo/N lists, in /proc/locks' format, the
    locks held through descriptor N (Linux >= 4.1).  Reading /proc/locks takes the kernel's
    file-lock rwsem for writing, which waits for an RCU grace period: 8-14 ms measured on an
    idle 2-CPU VM, a third of an installed `retune`.  /proc/locks still decides when the
    descriptors show no such lock (a kernel before 4.1, a non-root caller that may not look into
    the daemon's /proc/PID/fd, a test's procfs without fd directories), so the answer is the same.
    """
    base = os.path.join(procfs, str(pid))
    try:
        st = os.stat(path, follow_symlinks=False)
        fds = os.listdir(os.path.join(base, "fd"))
    except OSError:
        fds = []
    for fd in fds:
        try:
            target = os.stat(os.path.join(base, "fd", fd))
            if (target.st_dev, target.st_ino) != (st.st_dev, st.st_ino):
                continue
            with open(os.path.join(base, "fdinfo", fd)) as f:
                lines = [line[len("lock:"):] for line in f.read().splitlines() if line.startswith("lock:")]
        except OSError:
            continue  # closed meanwhile
        if pid in _flock_holders(lines, st):
            return True
    return pid in lock_holders(path, procfs)


def running_daemon(path: str | os.PathLike, procfs: str | os.PathLike = "/proc") -> int:
    """The pid of the live ksmtuned that owns the pid file, verified, else NotRunningError.

    Never trust the file's number alone: the process must be named ksmtuned and hold the lock.
    Plain os.path, not pathlib: this is `retune`'s whole work, and pathlib costs it ~3 ms to import.
    """
    pid = read_pid(path)
    if pid is None:
        raise NotRunningError(f"ksmtuned is not running (no valid pid file at {path})")
    try:
        with open(os.path.join(procfs, str(pid), "comm")) as f:
            comm = f.read().strip()
    except OSError:
        raise NotRunningError(f"ksmtuned is not running (stale pid file {path} names pid {pid}, which is gone)") from None
    if comm != PROCESS_NAME or not holds_lock(pid, path, procfs):
        raise NotRunningError(
            f"ksmtuned is not running: pid file {path} names pid {pid} ({comm}), which is not a ksmtuned "
            "holding that pid file; not signalling it"
        )
    return pid


def set_process_name(name: str = PROCESS_NAME) -> None:
    """Set comm (what ps and pgrep show) so `retune` can recognise the daemon."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass
