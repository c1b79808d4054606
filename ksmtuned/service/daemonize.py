"""Forking into the background the way the old daemon did, with one improvement: the parent
returns only once the child holds the pid file, with the child's exit code and message."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Optional

from ..core.text import printable
from ..errors import ExitCode, KsmtunedError

log = logging.getLogger("ksmtuned")


_answered: dict = {}  # ready fd -> whether the answer the parent got through it was "0 ok"


def tell_parent(fd: Optional[int], message: str) -> bool:
    """Send "CODE message" to the waiting parent, once: True if this call sent it, False when
    not forked (fd None) or when the parent already had its answer."""
    if fd is None or fd in _answered:
        return False
    _answered[fd] = message.startswith("0 ")
    try:
        os.write(fd, (message + "\n").encode())
        os.close(fd)
    except OSError:
        pass
    return True


def daemonize(serve: Callable[[Optional[int]], int]) -> int:
    """Fork twice (new session, no terminal ever), then ``serve(ready_fd)`` in the grandchild.

    Returns, in the parent, the code the child sent through ``ready_fd`` ("0 ok" once it holds
    the pid file), printing the child's message for a non-zero code.  Never returns in the child.
    """
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid > 0:
        os.close(write_fd)
        with os.fdopen(read_fd) as r:
            answer = r.readline().strip()
        os.waitpid(pid, 0)
        code, _, message = answer.partition(" ")
        if not code.isdigit():
            print("ksmtuned: the daemon failed to start (see the log)", file=sys.stderr)
            return ExitCode.SOFTWARE
        if int(code) != 0:
            print(f"ksmtuned: {printable(message)}", file=sys.stderr)
        return int(code)
    os.close(read_fd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    os.umask(0o022)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    code = int(ExitCode.SOFTWARE)
    try:
        code = int(serve(write_fd))
    except KsmtunedError as e:
        code = int(e.exit_code)
        # before the parent had its answer, the error is its answer: the parent prints it (once);
        # after ("0 ok"), the parent is gone and only the log can tell it
        if not tell_parent(write_fd, f"{code} {e}") and _answered.get(write_fd):
            log.error("%s", e)
    except BaseException:
        log.exception("daemon crashed")
    finally:
        logging.shutdown()
        os._exit(code)
