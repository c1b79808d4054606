"""Real processes that look like QEMU guests: a Python interpreter exec'd through a symlink
named like QEMU (so comm is ``qemu-system-x86`` or ``kvm``), with a QEMU-like command line,
holding ``-m`` MiB of private memory (and ``-thp-mib`` MiB on transparent huge pages).

``user="nobody"`` starts them as an unprivileged user (setpriv, with the system's
/usr/bin/python3, which that user can run): the attacker of issue 11.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

#: The guest: fills -m MiB (0 without), optionally -thp-mib MiB on THP, says ready, sleeps.
HOLD = """
import mmap, signal, sys
a = sys.argv
ram = bytearray(b"\\x5a") * (int(a[a.index("-m") + 1]) << 20) if "-m" in a and a[a.index("-m") + 1].isdigit() else b""
thp = int(a[a.index("-thp-mib") + 1]) if "-thp-mib" in a else 0
# -vsz-mib: address space nobody uses (the vsz metric counts it)
vsz = mmap.mmap(-1, int(a[a.index("-vsz-mib") + 1]) << 20) if "-vsz-mib" in a else None
if thp:
    m = mmap.mmap(-1, thp << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    for i in range(0, len(m), 4096):
        m[i] = 1
sys.stdout.write("ready\\n")
sys.stdout.flush()
while True:
    signal.pause()
"""

SYSTEM_PYTHON = "/usr/bin/python3"


def as_user(user: str) -> List[str]:
    return ["setpriv", f"--reuid={user}", f"--regid={'nogroup' if user == 'nobody' else user}", "--clear-groups"]


class FakeGuests:
    def __init__(self, tmp: Path, user: Optional[str] = None):
        self.bindir = Path(tmp) / ("bin-" + user if user else "bin")
        self.bindir.mkdir(exist_ok=True)
        os.chmod(self.bindir, 0o755)
        self.user = user
        self.procs: List[subprocess.Popen] = []

    @property
    def python(self) -> str:
        return SYSTEM_PYTHON if self.user else os.path.realpath(sys.executable)

    def link(self, name: str) -> Path:
        link = self.bindir / name
        if not link.exists():
            link.symlink_to(os.path.realpath(self.python))
        return link

    def spawn(self, exe_name: str, argv0: str, args: Sequence[str], wait: bool = True) -> subprocess.Popen:
        """exe_name: the file exec'd (sets comm); argv0: what the command line shows."""
        link = self.link(exe_name)
        argv = [argv0, "-I", "-S", "-c", HOLD, *args]
        if self.user:
            # setpriv cannot set argv[0]: a first interpreter execs the link with it
            argv = as_user(self.user) + [SYSTEM_PYTHON, "-I", "-S", "-c", "import os, sys; os.execv(sys.argv[1], sys.argv[2:])",
                                         str(link), *argv]
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        else:
            p = subprocess.Popen(argv, executable=str(link), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.procs.append(p)
        if wait:
            self.ready(p)
        return p

    @staticmethod
    def ready(p: subprocess.Popen) -> None:
        assert p.stdout is not None
        if p.stdout.readline() != b"ready\n":
            raise AssertionError(f"fake guest {p.args!r} did not start")

    def start(self, exe_name: str, argv0: str, args: Sequence[str], mib: int = 8) -> subprocess.Popen:
        return self.spawn(exe_name, argv0, [*args, "-m", str(mib)])

    def guest(self, name: str, *qemu_args: str) -> int:
        """A guest as both Debian's and Red Hat's patterns see one: -enable-kvm -name guest=NAME."""
        return self.spawn("qemu-system-x86_64", "qemu-system-x86_64",
                          ["-enable-kvm", "-name", f"guest={name}", *qemu_args]).pid

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
            if p.stdout:
                p.stdout.close()
        self.procs.clear()
