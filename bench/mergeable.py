"""A process holding N MiB of private anonymous memory opted in to KSM, every page identical
(huge pages refused: KSM merges only small ones).

Run as `python -m bench.mergeable MIB [plain | late | churn [FRACTION PERIOD_S] | rewrite]`; prints
"ready" once the memory is touched and marked.  The budget benchmark's churn scenario and the
real-KSM tests both run it.  With `plain` the memory is never opted in (ksm_stat:
ksm_mergeable: no): a process that only looks like a guest.  With `late` it prints "touched"
once the memory is touched, and opts in only after a line on stdin.  With `churn` it then keeps
rewriting it: every PERIOD_S (1 s) a new FRACTION (5 %) slice gets random data (merged pages
broken: cow_ksm) and the previous slice its old content back (mergeable again), so each page
is rewritten every 20 s and is otherwise left alone.  With `rewrite` it waits for a line on
stdin, then gives the first half of its pages random data and prints "rewritten".
Python's mmap.mmap(-1, n) is MAP_SHARED, which KSM never merges (KSM.md section 1): ask for
MAP_PRIVATE | MAP_ANONYMOUS explicitly.
"""

import mmap
import os
import signal
import sys
import time

PAGE = mmap.PAGESIZE


def main() -> None:
    size = int(sys.argv[1]) * 1024 * 1024
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    page = (b"ksmtuned-test-page" * (PAGE // 18 + 1))[:PAGE]
    for off in range(0, size, PAGE):
        m[off : off + PAGE] = page
    mode = sys.argv[2] if len(sys.argv) > 2 else ""
    if mode == "late":
        print("touched", flush=True)
        sys.stdin.readline()
    if mode != "plain":
        m.madvise(mmap.MADV_MERGEABLE)
    print("ready", flush=True)
    if mode == "churn":
        churn(m, size // PAGE, page, *map(float, sys.argv[3:5]))
    if mode == "rewrite":
        sys.stdin.readline()
        half = size // PAGE // 2
        m[: half * PAGE] = os.urandom(half * PAGE)
        print("rewritten", flush=True)
    signal.pause()


def churn(m: mmap.mmap, n: int, page: bytes, frac: float = 0.05, period_s: float = 1.0) -> None:
    k = max(1, int(n * frac))
    pos, prev = 0, []
    while True:
        t = time.monotonic()
        for i in prev:
            m[i * PAGE : (i + 1) * PAGE] = page
        prev = [(pos + j) % n for j in range(k)]
        junk = os.urandom(k * PAGE)
        for j, i in enumerate(prev):
            m[i * PAGE : (i + 1) * PAGE] = junk[j * PAGE : (j + 1) * PAGE]
        pos = (pos + k) % n
        time.sleep(max(0.0, period_s - (time.monotonic() - t)))


if __name__ == "__main__":
    main()
