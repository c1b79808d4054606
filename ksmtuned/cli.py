"""Argument parsing and exit codes: argparse -> one command's ``main()``.

The only module that reads the argparse namespace and the only one that exits: each command
returns an :class:`~ksmtuned.errors.ExitCode`, and a :class:`~ksmtuned.errors.KsmtunedError`
that reaches this module becomes its one-line message and its exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from . import __version__
from .core.text import printable
from .errors import ExitCode, KsmtunedError
from .paths import (DEFAULT_CONFIG, DEFAULT_PIDFILE, DEFAULT_PROCFS, DEFAULT_RUN_DIR,
                    DEFAULT_STATE_FILE, DEFAULT_SYSFS, KSM_DEFAULTS_FILES, Paths)


def _common(p: argparse.ArgumentParser, suppress: bool) -> None:
    """Options every command takes (given after the command, they override those before it)."""
    d = argparse.SUPPRESS if suppress else None
    p.add_argument("--config", metavar="PATH", default=d, help=f"config file (default {DEFAULT_CONFIG})")
    p.add_argument("--pidfile", metavar="PATH", default=d,
                   help=f"pid file (default PIDFILE from the config or the environment, else {DEFAULT_PIDFILE})")
    p.add_argument("--sysfs", metavar="DIR", default=d, help=f"KSM directory (default {DEFAULT_SYSFS})")
    p.add_argument("--procfs", metavar="DIR", default=d, help=f"proc filesystem (default {DEFAULT_PROCFS})")
    p.add_argument("--run-dir", metavar="DIR", default=d,
                   help=f"where libvirt's qemu/*.pid and Proxmox's qemu-server/*.pid are (default {DEFAULT_RUN_DIR})")
    p.add_argument("--insecure-config", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="accept a config file that others than root can write")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ksmtuned",
        description="Tune the kernel's KSM (Kernel Samepage Merging) from memory pressure. "
                    "Without a command: run the daemon (forks into the background unless --foreground).",
    )
    _common(p, suppress=False)
    p.add_argument("--foreground", action="store_true", help="stay attached (for systemd)")
    p.add_argument("--debug", action="store_true", help="write the debug log (as DEBUG=1)")
    p.add_argument("--once", action="store_true", help="one adjust, print the decision, then exit")
    p.add_argument("--dry-run", action="store_true",
                   help="with --once: print what would be written, write nothing (works without root)")
    p.add_argument("--force", action="store_true",
                   help="start even when another KSM tuner (momd, mom-vdsm, KubeVirt's virt-handler, "
                        "harvester-node-manager, another ksmtuned) runs")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--state-file", metavar="PATH", default=None,
                   help=f"state file the daemon writes and `status` reads (default {DEFAULT_STATE_FILE})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    r = sub.add_parser("retune", help="make the running daemon adjust now (SIGUSR1)",
                       description="Make the running daemon adjust now: SIGUSR1 to the process the pid file "
                                   "names, once it is verified to be ksmtuned holding that file's lock. "
                                   "Exit 3 when no daemon runs (0 with --quiet), 77 when not allowed to signal it.")
    _common(r, suppress=True)
    r.add_argument("--quiet", action="store_true", help="no message and exit 0 when no daemon runs (for hooks)")
    c = sub.add_parser("check-config", help="print the effective settings and where each came from",
                       description="Read the config file (and the environment) as the daemon would and print "
                                   "every setting in force, with where it came from (file:line, environment, "
                                   "default). Exit 78 when the config is invalid or unsafe.")
    _common(c, suppress=True)
    c.add_argument("--json", action="store_true", help="machine-readable output")
    g = sub.add_parser("guests", help="list the processes counted as guests",
                       description="List the processes KSM_GUEST_MATCH counts as guests, with the memory the "
                                   "daemon counts for each as committed.")
    _common(g, suppress=True)
    g.add_argument("--json", action="store_true", help="machine-readable output")
    s = sub.add_parser("status", help="what the daemon decided and what KSM is doing",
                       description="Show the daemon's last decision (from its state file) and KSM's counters "
                                   "and knobs. Exits 0 whether or not the daemon runs, and says which.")
    _common(s, suppress=True)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--state-file", metavar="PATH", default=argparse.SUPPRESS)
    k = sub.add_parser("check", help="host checks from the virtualization guide",
                       description="Run the virtualization guide's host checks (memory and vCPU overcommit, "
                                   "swap size, KSM, services, transparent huge pages, advisor), each pass, "
                                   "warn, fail or skip. Exit 0 when none fails, 5 when one fails, "
                                   "1 when the checks could not run.")
    _common(k, suppress=True)
    k.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def paths_from(args: argparse.Namespace) -> Paths:
    """The namespace's paths, the defaults where the command line gave none.

    Every path is made absolute here, against the directory the command was started in: the
    forking daemon changes to / before it opens anything, and a relative --procfs would then
    silently be the real /proc, a relative --pidfile land in /, a SIGHUP read another config.
    """
    def opt(name: str, default: str) -> str:
        v = getattr(args, name, None)
        return os.path.abspath(default if v is None else v)

    pidfile = getattr(args, "pidfile", None) or None
    return Paths(config=opt("config", DEFAULT_CONFIG), sysfs=opt("sysfs", DEFAULT_SYSFS),
                 procfs=opt("procfs", DEFAULT_PROCFS), run_dir=opt("run_dir", DEFAULT_RUN_DIR),
                 pidfile=os.path.abspath(pidfile) if pidfile else None,
                 state_file=opt("state_file", DEFAULT_STATE_FILE),
                 insecure_config=bool(getattr(args, "insecure_config", False)))


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)  # exits 2 on a usage error
    if args.version:
        print(f"ksmtuned {__version__}")
        return ExitCode.OK
    if args.dry_run and not args.once and args.command is None:
        # a dry run is one adjust; say so instead of silently not starting the daemon
        build_parser().error("--dry-run needs --once (ksmtuned --dry-run --once: one adjust that writes nothing)")
    paths = paths_from(args)
    try:
        if args.command == "retune":
            from .commands import retune

            return retune.main(paths, quiet=args.quiet)
        from .kernel.processes import procfs, set_procfs
        from .service.logs import setup_logging

        setup_logging()
        # psutil's root is process-global: set here, once, for every command and the daemon,
        # and given back when main() returns (it is also called in-process, by tests)
        before = procfs()
        set_procfs(os.path.abspath(paths.procfs))
        try:
            return _command(args, paths)
        finally:
            set_procfs(before)
    except KsmtunedError as e:
        # one problem a line (a ConfigError lists several); a path or name in it is shown escaped
        print("ksmtuned: " + "\n".join(printable(line) for line in str(e).split("\n")),
              file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return ExitCode.OK
    except BrokenPipeError:
        # `ksmtuned status | head`: the reader left; say nothing more, as other tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.OK


def build_ksmctl_parser() -> argparse.ArgumentParser:
    """ksmctl's command line (also the source of its bash completion: tools/gen-completion.py)."""
    p = argparse.ArgumentParser(
        prog="ksmctl", description="Start or stop the kernel's KSM (what ksm.service runs). "
        "start: max_kernel_pages (old kernels only), then run=1. stop: run=0, merged pages stay merged; "
        "stop --unmerge: run=2, every merged page is unmerged (progress on standard error).")
    p.add_argument("--version", action="version", version=f"ksmctl (ksmtuned) {__version__}")
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--unmerge", action="store_true",
                   help="with stop: unmerge every merged page (run=2); warns first when MemAvailable "
                        "would not hold them")
    p.add_argument("--sysfs", metavar="DIR", default=DEFAULT_SYSFS)
    p.add_argument("--procfs", metavar="DIR", default=DEFAULT_PROCFS)
    p.add_argument("--defaults", metavar="PATH", default=None,
                   help="file with KSM_MAX_KERNEL_PAGES (default: the first of "
                        f"{' and '.join(KSM_DEFAULTS_FILES)} that exists)")
    return p



def _command(args: argparse.Namespace, paths: Paths) -> int:
    """Run the one command the namespace names (not retune: main() runs it before any import)."""
    if args.command == "check-config":
        from .commands import check_config

        return check_config.main(paths, as_json=args.json)
    if args.command == "guests":
        from .commands import guests

        return guests.main(paths, as_json=args.json)
    if args.command == "status":
        from .commands import status

        return status.main(paths, as_json=args.json)
    if args.command == "check":
        from .commands import check

        return check.main(paths, as_json=args.json)
    from .commands import run

    return run.main(paths, foreground=args.foreground, debug=args.debug, once=args.once,
                    dry_run=args.dry_run, force=args.force)


def ksmctl_main(argv: Optional[List[str]] = None) -> int:
    """ksmctl start|stop [--unmerge]: what ksm.service runs."""
    p = build_ksmctl_parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.unmerge and args.action != "stop":
        p.error("--unmerge goes with stop")  # exits 2
    defaults = (args.defaults,) if args.defaults else KSM_DEFAULTS_FILES
    from .commands import ksmctl

    try:
        return ksmctl.main(args.action, sysfs=args.sysfs, procfs=args.procfs, defaults=defaults,
                           unmerge_pages=args.unmerge)
    except KsmtunedError as e:
        print(f"ksmctl: {printable(e)}", file=sys.stderr)
        return e.exit_code
