"""A process holding N MiB of private anonymous memory opted in to KSM, every page identical.

Run as `python -m tests.mergeable MIB [plain]`; prints "ready" once the memory is touched and
marked.  With `plain` the memory is never opted in (ksm_stat: ksm_mergeable: no): a process
that only looks like a guest.
Python's mmap.mmap(-1, n) is MAP_SHARED, which KSM never merges (KSM.md section 1): ask for
MAP_PRIVATE | MAP_ANONYMOUS explicitly.
"""

import mmap
import signal
import sys

PAGE = mmap.PAGESIZE


def main() -> None:
    size = int(sys.argv[1]) * 1024 * 1024
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    page = (b"ksmtuned-test-page" * (PAGE // 18 + 1))[:PAGE]
    for off in range(0, size, PAGE):
        m[off : off + PAGE] = page
    if sys.argv[2:] != ["plain"]:
        m.madvise(mmap.MADV_MERGEABLE)
    print("ready", flush=True)
    signal.pause()


if __name__ == "__main__":
    main()
