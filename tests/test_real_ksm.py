"""The daemon against the real /sys/kernel/mm/ksm: it turns KSM on, and the kernel merges."""

import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.daemon_support import DaemonProc, start_mergeable

pytestmark = [pytest.mark.root, pytest.mark.ksm]

MIB_EACH = 32
PAGES_EACH = MIB_EACH * 1024 * 1024 // 4096
REPO = Path(__file__).resolve().parent.parent


def read(root: Path, name: str) -> int:
    return int((root / name).read_text())


def test_pressure_turns_ksm_on_and_memory_merges(real_ksm, tmp_path):
    with ExitStack() as stack:
        start_mergeable(stack, MIB_EACH)
        start_mergeable(stack, MIB_EACH)
        d = DaemonProc(tmp_path, "KSM_THRES_COEF=100\nKSM_MONITOR_INTERVAL=0.5\nKSM_NPAGES_MAX=5000\n"
                                 "KSM_NPAGES_BOOST=2500\n", sysfs=real_ksm)
        stack.callback(d.stop)
        d.start()
        assert read(real_ksm, "run") == 1
        assert read(real_ksm, "pages_to_scan") == 2500
        assert read(real_ksm, "sleep_millisecs") == 10
        deadline = time.monotonic() + 60
        while read(real_ksm, "pages_sharing") < 0.9 * 2 * PAGES_EACH and time.monotonic() < deadline:
            time.sleep(0.2)
        sharing = read(real_ksm, "pages_sharing")
        assert sharing >= 0.9 * 2 * PAGES_EACH, f"pages_sharing {sharing} of {2 * PAGES_EACH}"
        d.wait_ticks(2)
        assert read(real_ksm, "pages_to_scan") == 5000  # boosted again, to the max


def test_relief_writes_run_0(real_ksm, tmp_path):
    (real_ksm / "run").write_text("1")
    with DaemonProc(tmp_path, "KSM_THRES_COEF=0\nKSM_THRES_CONST=0\nKSM_MONITOR_INTERVAL=3600\n",
                    sysfs=real_ksm) as d:
        assert read(real_ksm, "run") == 0
        assert d.log.read_text().rstrip().endswith("stop ksm")
