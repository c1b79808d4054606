"""The fault, security and soak tests' sandbox: the one daemon wrapper with their defaults.

The daemon runs as its own process (``python -m ksmtuned --foreground --force ...``) against
a temp directory standing in for /sys/kernel/mm/ksm (or the real one, under ``real_ksm``) and
a temp procfs whose ``meminfo`` the test writes.  The temp procfs also drives the process
scan, so it links the real ``/proc/stat`` (the boot time) and ``/proc/1`` (a process table
with a pid in it): the scan is real but sees no guest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tests.fakes import ksm as _ksm
from tests.fakes import proc as _proc
from tests.fakes.daemon import DaemonProc, read_text, wait_until  # noqa: F401  (re-exported for the fault tests)

GIB_KIB = _proc.GIB_KIB
TOTAL_KIB = _proc.TOTAL_KIB  # threshold at the default KSM_THRES_COEF=20: 3,355,443 kB


meminfo_text = _proc.meminfo_text
write_atomic = _proc.write_atomic


#: free 8 GiB of 16: no pressure, KSM off (run=0)
STOP = meminfo_text(free_kib=8 * GIB_KIB)
#: free 1 GiB of 16, below the 3.2 GiB threshold: boost (run=1, pages_to_scan += 300)
BOOST = meminfo_text(free_kib=1 * GIB_KIB)


def make_sysfs(root: Path, run: str = "0", pages_to_scan: str = "100", sleep_millisecs: str = "20") -> Path:
    return _ksm.fake_ksm_dir(root, {"run": run, "pages_to_scan": pages_to_scan, "sleep_millisecs": sleep_millisecs})


def make_procfs(root: Path, meminfo: str = STOP) -> Path:
    return _proc.view_of(root, [1], meminfo=meminfo, links=("stat",))


def Daemon(base: Path, conf: str | None = None, interval_s: float = 3600, sysfs: Path | None = None,
           procfs: Path | None | str = "fake", meminfo: str = STOP, pidfile: Path | None = None,
           logfile: Path | None | str = "default", extra_args: Sequence[str] = (), prefix: Sequence[str] = (),
           force: bool = True) -> DaemonProc:
    """The one daemon wrapper (tests/fakes/daemon.DaemonProc) with the fault rig's defaults: a
    KSM_MONITOR_INTERVAL of an hour (ticks by SIGUSR1), a fake procfs with a writable meminfo
    (``procfs="fake"``; None: the real /proc), the debug log in ``base/debug.log`` (None: to
    stdout), and a tick counted as soon as its "committed" line is written."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    log = base / "debug.log" if logfile == "default" else (Path(logfile) if logfile else base / "stdout")
    if conf is None:
        conf = f"KSM_MONITOR_INTERVAL={interval_s}\nDEBUG=1\n" + (f"LOGFILE={log}\n" if logfile else "")
    fake = procfs == "fake"
    return DaemonProc(base, conf, sysfs=Path(sysfs) if sysfs else make_sysfs(base / "ksm"), extra=extra_args,
                      debug_log=False, procfs=None if fake or not procfs else Path(procfs),
                      meminfo=meminfo if fake else None, log=log, pidfile=pidfile or base / "ksmtuned.pid",
                      prefix=prefix, force=force, count_only=True)
