"""Argument parsing, wiring and exit codes.  The only module that exits.

Imports (even argparse and pathlib) stay off the `retune` path so
that a libvirt hook that calls it costs little: see `_retune_args`.
"""

from __future__ import annotations

import os
import signal
import sys

from .errors import ExitCode, KsmtunedError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    import argparse


def _log():
    import logging  # not at module level: `retune` (run by hooks) stays light

    return logging.getLogger("ksmtuned")

DEFAULT_CONFIG = "/etc/ksmtuned.conf"
DEFAULT_SYSFS = "/sys/kernel/mm/ksm"
DEFAULT_PROCFS = "/proc"
DEFAULT_PIDFILE = "/var/run/ksmtune.pid"
DEFAULT_STATE_FILE = "/run/ksmtuned/state.json"


def _common(p: argparse.ArgumentParser, suppress: bool) -> None:
    import argparse

    d = argparse.SUPPRESS if suppress else None
    p.add_argument("--config", metavar="PATH", default=d,
                   help=f"config file (default {DEFAULT_CONFIG})")
    p.add_argument("--pidfile", metavar="PATH", default=d,
                   help=f"pid file (default $PIDFILE, else {DEFAULT_PIDFILE})")
    p.add_argument("--sysfs", metavar="DIR", default=d, help=f"KSM directory (default {DEFAULT_SYSFS})")
    p.add_argument("--procfs", metavar="DIR", default=d, help=f"proc filesystem (default {DEFAULT_PROCFS})")
    p.add_argument("--run-dir", metavar="DIR", default=d,
                   help="where libvirt's qemu/*.pid and Proxmox's qemu-server/*.pid are (default /run)")
    p.add_argument("--insecure-config", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="accept a config file that others than root can write")


def build_parser() -> argparse.ArgumentParser:
    import argparse  # not at module level: `retune` goes without it

    p = argparse.ArgumentParser(
        prog="ksmtuned",
        description="Tune the kernel's KSM (Kernel Samepage Merging) from memory pressure. "
                    "Without a command: run the daemon (forks into the background unless --foreground).",
    )
    _common(p, suppress=False)
    p.add_argument("--foreground", action="store_true", help="stay attached (for systemd)")
    p.add_argument("--debug", action="store_true", help="write the debug log (as DEBUG=1)")
    p.add_argument("--once", action="store_true", help="one adjust, then exit")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be written, write nothing (works without root)")
    p.add_argument("--force", action="store_true",
                   help="start even when another KSM tuner (momd, mom-vdsm, KubeVirt's virt-handler, "
                        "harvester-node-manager, another ksmtuned) runs")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--state-file", metavar="PATH", default=None,
                   help=f"state file the daemon writes and `status` reads (default {DEFAULT_STATE_FILE})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    r = sub.add_parser("retune", help="make the running daemon adjust now (SIGUSR1)")
    _common(r, suppress=True)
    r.add_argument("--quiet", action="store_true", help="no message and exit 0 when no daemon runs (for hooks)")
    c = sub.add_parser("check-config", help="print the effective settings and where each came from")
    _common(c, suppress=True)
    g = sub.add_parser("guests", help="list the processes counted as guests")
    _common(g, suppress=True)
    g.add_argument("--json", action="store_true", help="machine-readable output")
    s = sub.add_parser("status", help="what the daemon decided and what KSM is doing")
    _common(s, suppress=True)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--state-file", metavar="PATH", default=argparse.SUPPRESS)
    k = sub.add_parser("check", help="host checks from the virtualization guide")
    _common(k, suppress=True)
    k.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _opt(args, name, default):
    v = getattr(args, name, None)
    return default if v is None else v


def pidfile_path(args, env=os.environ) -> str:
    return _opt(args, "pidfile", None) or env.get("PIDFILE") or DEFAULT_PIDFILE


def _retune_args(argv: list[str]):
    """`retune [--quiet] [--pidfile PATH] [--procfs DIR]` (any order, `--opt=VALUE` too, the last
    value wins) as the namespace argparse would make of it, or None for anything else.

    What the libvirt hook and admins type skips building the parser (argparse, its import and
    the ~4 ms it takes to build: a third of what `retune` costs over the interpreter's start).
    Anything else goes to the full parser: --help, abbreviations, other options, values that
    start with "-", usage errors (exit 2), so the two can never disagree.
    """
    if not argv or argv[0] != "retune":
        return None
    from types import SimpleNamespace

    args = SimpleNamespace(command="retune", version=False, quiet=False, pidfile=None, procfs=None)
    rest = iter(argv[1:])
    for arg in rest:
        if arg == "--quiet":
            args.quiet = True
            continue
        option, eq, value = arg.partition("=")
        if option not in ("--pidfile", "--procfs"):
            return None
        if not eq:
            value = next(rest, None)
            if value is None or value.startswith("-"):
                return None
        setattr(args, option[2:], value)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _retune_args(argv)
    if args is None:
        args = build_parser().parse_args(argv)  # exits 2 on a usage error
    if args.version:
        from . import __version__

        print(f"ksmtuned {__version__}")
        return ExitCode.OK
    try:
        if args.command == "retune":
            return cmd_retune(args)
        from .logs import setup_logging

        setup_logging()
        if args.command == "check-config":
            return cmd_check_config(args)
        if args.command == "guests":
            from .guests_cmd import cmd_guests

            return cmd_guests(args)
        if args.command == "status":
            from .status import cmd_status

            return cmd_status(args)
        if args.command == "check":
            from .hostcheck import cmd_check

            return cmd_check(args)
        return cmd_run(args)
    except KsmtunedError as e:
        print(f"ksmtuned: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return ExitCode.OK
    except BrokenPipeError:
        # `ksmtuned status | head`: the reader left; say nothing more, as other tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.OK


def cmd_retune(args) -> int:
    from .pidfile import running_daemon
    from .errors import NotRunningError

    path = pidfile_path(args)
    try:
        pid = running_daemon(path, _opt(args, "procfs", DEFAULT_PROCFS))
    except NotRunningError as e:
        if args.quiet:
            return ExitCode.OK
        print(f"ksmtuned: {e}", file=sys.stderr)
        return e.exit_code
    try:
        os.kill(pid, signal.SIGUSR1)
    except PermissionError:
        # the daemon runs as root; --quiet does not hide this: a hook that cannot retune must say so
        print(f"ksmtuned: cannot signal the daemon (pid {pid}, from {path}): permission denied; "
              "run as root", file=sys.stderr)
        return ExitCode.NO_PERMISSION
    return ExitCode.OK


def load(args, check_safety: bool = True, reloading: bool = False):
    """The config in force.  At start a missing or empty file means the defaults (as the old
    daemon); on reload it is refused, so a file deleted or being rewritten keeps the settings."""
    from pathlib import Path

    from .config import check_file_safety, load_config

    path = Path(_opt(args, "config", DEFAULT_CONFIG))
    overrides = {}
    if getattr(args, "pidfile", None):
        overrides["PIDFILE"] = args.pidfile
    if check_safety and os.geteuid() == 0 and not getattr(args, "insecure_config", False):
        check_file_safety(path)
    loaded = load_config(path, overrides=overrides, missing_ok=not reloading)
    return loaded


def cmd_check_config(args) -> int:
    from .config import KEYS

    loaded = load(args)
    for w in loaded.warnings:
        print(f"ksmtuned: warning: {w}", file=sys.stderr)
    if not loaded.file_found:
        print(f"# {loaded.path} not found: defaults and environment only")
    else:
        print(f"# effective settings from {loaded.path}")
    s = loaded.settings
    for alias, name in KEYS.items():
        value = getattr(s, name)
        if value is None:
            text = ""
        elif isinstance(value, bool):
            text = "1" if value else ""
        elif isinstance(value, tuple) and name == "metrics_listen":
            text = f"{value[0]}:{value[1]}"
        elif isinstance(value, tuple):
            text = ",".join(value)
        elif isinstance(value, float) and value.is_integer():
            text = str(int(value))
        else:
            text = str(value)
        print(f"{alias + '=' + text:<44} # {loaded.sources[alias]}")
    return ExitCode.OK


def cmd_run(args) -> int:
    from pathlib import Path

    from .ksm import KsmSysfs
    from .meminfo import read_meminfo, total_kib

    loaded = load(args)
    for w in loaded.warnings:
        _log().warning("%s", w)
    sysfs = KsmSysfs(Path(_opt(args, "sysfs", DEFAULT_SYSFS)))
    procfs = Path(_opt(args, "procfs", DEFAULT_PROCFS))
    sysfs.preflight(need_write=not args.dry_run)
    total_kib(read_meminfo(procfs / "meminfo"), str(procfs / "meminfo"))  # fail early on a bad meminfo
    if not args.force and not args.dry_run and not args.once:
        from .conflicts import other_tuners

        others = other_tuners(procfs)
        if others:
            raise _conflict_error(others)
    if args.once or args.dry_run:
        return _run_once(args, loaded, sysfs, procfs)
    if args.foreground:
        return _serve(args, loaded, sysfs, procfs, ready_fd=None)
    return _daemonize(args, loaded, sysfs, procfs)


def _conflict_error(others):
    from .errors import AlreadyRunningError

    return AlreadyRunningError(
        "another KSM tuner is running: " + ", ".join(f"{name} (pid {pid})" for pid, name in others)
        + "; stop it first, or pass --force"
    )


def _make_daemon(args, loaded, sysfs, procfs, notifier=None, observers=(), once=False):
    from pathlib import Path

    from .daemon import Daemon

    def reload_config():
        return load(args, reloading=True)

    return Daemon(loaded, sysfs, procfs=procfs, run_dir=Path(_opt(args, "run_dir", "/run")),
                  dry_run=args.dry_run, debug_override=args.debug,
                  reload_config=reload_config, notifier=notifier, observers=observers, once=once)


def _observers(args, loaded, sysfs, procfs):
    """Reporters that want every tick: the state file and the metrics."""
    from pathlib import Path

    from .report import make_observers

    return make_observers(loaded.settings, state_path=Path(_opt(args, "state_file", DEFAULT_STATE_FILE)),
                          sysfs=sysfs.root, procfs=procfs, config_path=loaded.path)


def _run_once(args, loaded, sysfs, procfs) -> int:
    daemon = _make_daemon(args, loaded, sysfs, procfs, once=True)
    report = daemon.adjust("once")
    if report.decision is None or report.error:
        return ExitCode.SOFTWARE
    print(report.decision.explain())
    return ExitCode.OK


def _serve(args, loaded, sysfs, procfs, ready_fd: int | None) -> int:
    from .events import SignalEvents
    from .notify import Notifier
    from .pidfile import PidFile, set_process_name

    events = SignalEvents().block()
    # --pidfile, else PIDFILE from the config file, else from the environment, else the default
    pidfile = PidFile(loaded.settings.pidfile)
    try:
        pidfile.acquire()
    except KsmtunedError as e:
        _tell_parent(ready_fd, f"{int(e.exit_code)} {e}")
        raise
    try:
        pidfile.write_pid()
        set_process_name()
        _tell_parent(ready_fd, "0 ok")
        daemon = _make_daemon(args, loaded, sysfs, procfs, notifier=Notifier(), observers=_observers(args, loaded, sysfs, procfs))
        daemon.run(events)
    finally:
        pidfile.release()
        events.unblock()
    return ExitCode.OK


def _tell_parent(fd: int | None, message: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, (message + "\n").encode())
        os.close(fd)
    except OSError:
        pass


def _daemonize(args, loaded, sysfs, procfs) -> int:
    """Fork into the background like the old daemon; the parent returns once the child holds the pid file."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid > 0:
        os.close(write_fd)
        with os.fdopen(read_fd) as r:
            answer = r.readline().strip()
        os.waitpid(pid, 0)
        code, _, message = answer.partition(" ")
        if not code.isdigit():
            print("ksmtuned: the daemon failed to start (see the log)", file=sys.stderr)
            return ExitCode.SOFTWARE
        if int(code) != 0:
            print(f"ksmtuned: {message}", file=sys.stderr)
        return int(code)
    # first child: new session, then fork again so the daemon can never regain a terminal
    os.close(read_fd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    os.umask(0o022)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    code = ExitCode.SOFTWARE
    try:
        code = _serve(args, loaded, sysfs, procfs, ready_fd=write_fd)
    except KsmtunedError as e:
        _log().error("%s", e)
        code = e.exit_code
    except BaseException:
        _log().exception("daemon crashed")
    finally:
        import logging

        logging.shutdown()
        os._exit(int(code))


def ksmctl_main(argv: list[str] | None = None) -> int:
    """ksmctl start|stop: what ksm.service runs."""
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="ksmctl", description="Start or stop the kernel's KSM (for ksm.service)")
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--sysfs", metavar="DIR", default=DEFAULT_SYSFS)
    p.add_argument("--procfs", metavar="DIR", default=DEFAULT_PROCFS)
    p.add_argument("--defaults", metavar="PATH", default="/etc/default/ksm",
                   help="file with KSM_MAX_KERNEL_PAGES (default /etc/default/ksm)")
    args = p.parse_args(argv)
    from .commands import ksmctl

    try:
        return ksmctl(args)
    except KsmtunedError as e:
        print(f"ksmctl: {e}", file=sys.stderr)
        return e.exit_code
