"""The one set of fakes the tests and the benchmarks share (issue 10): a fake KSM sysfs
directory (``ksm``), a fake /proc (``proc``: meminfo, cpuinfo, processes the kernel cannot make
on demand), real processes that look like QEMU (``guests``) and a daemon process (``daemon``).

Fakes only for what the kernel cannot be made to do on demand; everything else is real.
"""
