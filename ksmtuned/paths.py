"""Every default path, in one place.

Precedence, resolved once by the CLI (:func:`ksmtuned.cli`): command line > config file >
environment > default.  Only ``PIDFILE`` can come from the config file or the environment
(as in the old daemon); the others are command-line options or these defaults.
"""

from __future__ import annotations

DEFAULT_CONFIG = "/etc/ksmtuned.conf"
DEFAULT_SYSFS = "/sys/kernel/mm/ksm"
DEFAULT_PROCFS = "/proc"
DEFAULT_RUN_DIR = "/run"  # libvirt's qemu/*.pid and Proxmox's qemu-server/*.pid live below it
#: the old daemon's name ("ksmtune"), kept for drop-in compatibility
DEFAULT_PIDFILE = "/var/run/ksmtune.pid"
DEFAULT_STATE_FILE = "/run/ksmtuned/state.json"
#: where ksm.service's KSM_MAX_KERNEL_PAGES is kept: Debian's file, then Red Hat's (its own
#: ksm.service reads /etc/sysconfig/ksm); `ksmctl start` reads the first of them that exists
DEFAULT_KSM_DEFAULTS = "/etc/default/ksm"
KSM_DEFAULTS_FILES = (DEFAULT_KSM_DEFAULTS, "/etc/sysconfig/ksm")
DEFAULT_THP_DIR = "/sys/kernel/mm/transparent_hugepage"
#: Where no log or metrics file may go: writing there is tuning the kernel
#: (/proc/sysrq-trigger, /proc/sys/vm/drop_caches, /sys/kernel/mm/ksm/run are regular files).
KERNEL_DIRS = ("/proc", "/sys")


class Paths:
    """The paths one command works with, as the command line gave them (else the defaults).

    ``pidfile`` is only the command line's ``--pidfile``: the pid file in force also depends
    on the config file (``PIDFILE=``) and the environment, so it is
    ``Settings.pidfile`` of the loaded config (see :func:`ksmtuned.service.config_file.load`),
    for the daemon and every command alike.
    """

    __slots__ = ("config", "sysfs", "procfs", "run_dir", "pidfile", "state_file", "insecure_config")

    def __init__(self, config: str = DEFAULT_CONFIG, sysfs: str = DEFAULT_SYSFS, procfs: str = DEFAULT_PROCFS,
                 run_dir: str = DEFAULT_RUN_DIR, pidfile: "str | None" = None,
                 state_file: str = DEFAULT_STATE_FILE, insecure_config: bool = False):
        self.config = config
        self.sysfs = sysfs
        self.procfs = procfs
        self.run_dir = run_dir
        self.pidfile = pidfile
        self.state_file = state_file
        self.insecure_config = insecure_config

    def __repr__(self) -> str:
        return "Paths(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"
