"""A stand-in for a QEMU guest, for the differential test (tests/oracle.py).

Started as ``qemu-system-x86_64 -I -S fakeguest.py -enable-kvm -name guest=NAME -m MIB``
from a symlink named ``qemu-system-x86_64`` that points at a Python interpreter, so that both
guest patterns match it: Debian's command-line pattern ``^qemu-system.*-enable-kvm`` and Red
Hat's process-name pattern (comm is ``qemu-system-x86``).  It writes MIB MiB of private memory
(so the RSS is known and stable), says "ready" on stdout, and sleeps until killed.
"""

import signal
import sys

mib = int(sys.argv[sys.argv.index("-m") + 1])
# bytearray * n fills every page (a bare bytearray(n) may stay unbacked zero pages).
ram = bytearray(b"\x5a") * (mib << 20)
sys.stdout.write("ready\n")
sys.stdout.flush()
while True:
    signal.pause()
