"""Running the daemon: in the foreground (systemd's Type=notify), forked (the old way), or
``--once``/``--dry-run``.  The composition root: every collaborator is built here and passed in."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from ..core.config import LoadedConfig
from ..engine.daemon import Daemon
from ..errors import AlreadyRunningError, ExitCode, KsmtunedError
from ..kernel.ksm import KsmSysfs
from ..kernel.meminfo import read_meminfo, total_kib
from ..kernel.tuners import other_tuners
from ..paths import Paths
from ..report.reporter import make_observers
from ..service.config_file import load
from ..service.daemonize import daemonize, tell_parent
from ..service.notify import Notifier
from ..service.pidfile import PidFile, set_process_name
from ..service.signals import SignalEvents

log = logging.getLogger("ksmtuned")


def main(paths: Paths, foreground: bool = False, debug: bool = False, once: bool = False,
         dry_run: bool = False, force: bool = False) -> int:
    loaded = load(paths)
    for w in loaded.warnings:
        log.warning("%s", w)
    sysfs = KsmSysfs(Path(paths.sysfs))
    procfs = Path(paths.procfs)
    sysfs.preflight(need_write=not dry_run)
    total_kib(read_meminfo(procfs / "meminfo"), str(procfs / "meminfo"))  # fail early on a bad meminfo
    if not force and not dry_run and not once:
        others = other_tuners()
        if others:
            raise AlreadyRunningError(
                "another KSM tuner is running: " + ", ".join(f"{name} (pid {pid})" for pid, name in others)
                + "; stop it first, or pass --force")
    runner = _Runner(paths, loaded, sysfs, procfs, debug=debug, dry_run=dry_run)
    if once or dry_run:
        return runner.once()
    if foreground:
        return runner.serve(ready_fd=None)
    return daemonize(runner.serve)


class _Runner:
    def __init__(self, paths: Paths, loaded: LoadedConfig, sysfs: KsmSysfs, procfs: Path,
                 debug: bool, dry_run: bool):
        self.paths, self.loaded, self.sysfs, self.procfs = paths, loaded, sysfs, procfs
        self.debug, self.dry_run = debug, dry_run

    def daemon(self, notifier: Optional[Notifier] = None, observers=(), once: bool = False) -> Daemon:
        paths = self.paths

        def reload_config() -> LoadedConfig:
            return load(paths, reloading=True)

        return Daemon(self.loaded, self.sysfs, procfs=self.procfs, run_dir=Path(paths.run_dir),
                      dry_run=self.dry_run, debug_override=self.debug, reload_config=reload_config,
                      notifier=notifier, observers=observers, once=once)

    def once(self) -> int:
        report = self.daemon(once=True).adjust("once")
        if report.decision is None or report.error:
            return ExitCode.SOFTWARE
        if self.dry_run:  # the "would write" lines said what changes
            print(report.decision.explain())
        else:
            changes = ", ".join(f"{w.name} {w.old} -> {w.new}" for w in report.writes)
            print(f"{report.decision.explain()} ({changes or 'no write needed'})")
        if report.budget is not None:  # KSM_POLICY=budget (it left steady values behind)
            print(report.budget.explain())
        return ExitCode.OK

    def serve(self, ready_fd: Optional[int]) -> int:
        events = SignalEvents().block()
        # --pidfile, else PIDFILE from the config file, else from the environment, else the default
        pidfile = PidFile(self.loaded.settings.pidfile)
        try:
            pidfile.acquire()
            try:
                pidfile.write_pid()
            except KsmtunedError:
                pidfile.release()
                raise
        except KsmtunedError as e:
            tell_parent(ready_fd, f"{int(e.exit_code)} {e}")
            raise
        try:
            set_process_name()
            tell_parent(ready_fd, "0 ok")
            observers = make_observers(self.loaded.settings, state_path=Path(self.paths.state_file),
                                       sysfs=self.sysfs.root, procfs=self.procfs, config_path=self.loaded.path)
            self.daemon(notifier=Notifier(), observers=observers).run(events)
        finally:
            pidfile.release()
            events.unblock()
        return ExitCode.OK
