"""Other KSM tuners that would fight us for /sys/kernel/mm/ksm (KSM.md section 3, fault 9)."""

from __future__ import annotations

import os
from .processes import iter_processes

#: process names / script names of tuners that write KSM knobs: oVirt's MOM (momd, mom-vdsm),
#: the old or another ksmtuned, KubeVirt's virt-handler (its KSM handler writes run,
#: pages_to_scan and sleep_millisecs on the nodes the KubeVirt CR's ksmConfiguration selects)
#: and Harvester's node manager (its ksmtuned controller, per node by the KSMtuned CRD; the
#: image runs /usr/bin/harvester-node-manager, built as harvester-node-manager-ARCH)
OTHER_TUNERS = ("momd", "mom-vdsm", "ksmtuned", "virt-handler", "harvester-node-manager", "node-manager")
#: Go release binaries carry their architecture: harvester-node-manager-amd64
_ARCH_SUFFIXES = ("-amd64", "-arm64", "-s390x", "-ppc64le", "-riscv64")
#: login.defs' UID_MIN: processes of ordinary users (and nobody) cannot write KSM knobs, and
#: their names must not let any local user keep ksmtuned from starting
USER_UID_MIN = 1000


def other_tuners(self_pid: int | None = None) -> list[tuple[int, str]]:
    """(pid, name) of every other process that is a KSM tuner: momd, mom-vdsm, a bash or python
    ksmtuned.  Processes under psutil's root (``kernel.processes.set_procfs``)."""
    me = {self_pid or os.getpid(), os.getppid()}
    found = []
    for proc in iter_processes(["pid", "name", "cmdline", "uids"]):
        info = proc.info
        if info["pid"] in me or info["uids"] is None or info["uids"].effective >= USER_UID_MIN:
            continue
        args = [a for a in (info["cmdline"] or []) if a]
        comm = info["name"] or ""
        if not args:
            continue  # kernel thread or zombie
        base = os.path.basename(args[0])
        names = {comm, base}
        for suffix in _ARCH_SUFFIXES:
            if base.endswith(suffix):
                names.add(base[: -len(suffix)])
        # interpreters: the script (bash /usr/sbin/ksmtuned, python3 /usr/bin/momd, python -m ksmtuned)
        for i, a in enumerate(args[1:3], start=1):
            if a == "-m" and i + 1 < len(args):
                names.add(args[i + 1])
            elif not a.startswith("-"):
                names.add(os.path.basename(a))
                break
        if names & {"ksmtuned"} and not _is_daemon_ksmtuned(args, comm):
            continue  # `ksmtuned status`, `retune` ... are not tuners
        for name in OTHER_TUNERS:
            if name in names:
                found.append((info["pid"], name))
                break
    return sorted(found)


def _is_daemon_ksmtuned(args: list[str], comm: str) -> bool:
    """A ksmtuned that tunes: the old bash loop or our daemon (not our short commands)."""
    if comm == "ksmtuned":
        return True  # our daemon names itself so (pidfile.set_process_name)
    base = os.path.basename(args[0])
    if base in ("bash", "sh", "dash"):
        return True  # the old daemon: /bin/bash /usr/sbin/ksmtuned
    commands = {"retune", "check-config", "guests", "status", "check"}
    flags = {"--once", "--dry-run", "--help", "-h", "--version"}
    return not (commands & set(args) or flags & set(args))
