"""A stand-in for a QEMU guest, for the differential test (tests/oracle.py).

Started as ``qemu-system-x86_64 -I -S fakeguest.py -enable-kvm -name guest=NAME -m MIB``
from a symlink named ``qemu-system-x86_64`` that points at a Python interpreter, so that both
guest patterns match it: Debian's command-line pattern ``^qemu-system.*-enable-kvm`` and Red
Hat's process-name pattern (comm is ``qemu-system-x86``).  It writes MIB MiB of private memory
(so the RSS is known), says "ready" on stdout, and sleeps until killed.

The RSS must not move while the daemons read it (the equality-edge scenarios are exact to the
kB): transparent huge pages are disabled for the process (khugepaged could otherwise collapse
a partly used range and add pages), and everything mapped is locked in memory (so reclaim
cannot drop file pages of the interpreter), best effort.
"""

import ctypes
import signal
import sys

PR_SET_THP_DISABLE = 41
MCL_CURRENT = 1

libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
mib = int(sys.argv[sys.argv.index("-m") + 1])
# bytearray * n fills every page (a bare bytearray(n) may stay unbacked zero pages).
ram = bytearray(b"\x5a") * (mib << 20)
libc.mlockall(MCL_CURRENT)  # failure (no CAP_IPC_LOCK) only makes reclaim possible again
sys.stdout.write("ready\n")
sys.stdout.flush()
while True:
    signal.pause()
