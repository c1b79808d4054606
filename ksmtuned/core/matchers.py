"""Which processes are guests, and which guests are trusted: pure rules, no I/O.

A guest is a process that one of the configured matchers (``KSM_GUEST_MATCH``) claims:

``redhat``
    the process name (comm) matches Red Hat's ksmtuned pattern
    ``^qemu(-(kvm|system-.+)|:.{1,11})$``;
``debian``
    the command line matches Debian's ``^qemu-system.*-enable-kvm`` (as ``pgrep -f``);
``libvirt``
    a QEMU started the way libvirt starts it: an absolute path to a ``qemu*`` binary with
    ``-accel kvm`` / ``accel=kvm`` or a process name ``qemu:<guest>``; and every QEMU named by a
    pid file ``<run>/libvirt/qemu/<guest>.pid``;
``proxmox``
    processes named ``kvm``, and every QEMU/KVM named by ``<run>/qemu-server/<vmid>.pid``;
``regex:<pattern>``
    the admin's own pattern, searched (``re.search``) in the command line joined by spaces.

Any local user can start a process that any of these claim.  ``KSM_GUEST_TRUST`` says whose
guests count (docs/security.md): :func:`trusted` decides from facts the kernel layer read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Collection, Optional, Sequence

#: Red Hat's ksmtuned: the process name (comm, at most 15 characters).
REDHAT_COMM = re.compile(r"^qemu(-(kvm|system-.+)|:.{1,11})$")
#: Debian's ksmtuned: the full command line, as pgrep -f sees it (POSIX '.' matches a newline too).
DEBIAN_CMDLINE = re.compile(r"^qemu-system.*-enable-kvm", re.DOTALL)
#: libvirt: an absolute path to a QEMU binary ...
LIBVIRT_EXE = re.compile(r"^/\S*/qemu(-system-[^/\s]+|-kvm)?$")
#: ... with KVM acceleration (``-accel kvm``, ``-machine ...,accel=kvm``) ...
ACCEL_KVM = re.compile(r"(^|\s)-accel\s+(accel=)?kvm\b|accel=kvm\b")
#: ... or a process name set with ``-name ...,process=qemu:NAME``.
LIBVIRT_COMM = re.compile(r"^qemu:.+$")
#: A process that may stand behind a libvirt or Proxmox pid file (name or argv[0]'s base name).
QEMU_LIKE = re.compile(r"^(qemu(-system-.*|-kvm|:.*)?|kvm)$")

MATCHER_NAMES = ("redhat", "debian", "libvirt", "proxmox")
#: pid file directories under the run directory (``/run``)
PIDFILE_DIRS = {"libvirt": "libvirt/qemu", "proxmox": "qemu-server"}

#: What a guest's command line is kept to (bytes of its arguments, in order): enough for
#: ``-name``, ``-m`` and ``-smp`` of any real QEMU, and a bound on what a process with a
#: huge command line can make the daemon hold (issue 11, class 3).
ARGV_KEEP_BYTES = 8192
#: A guest's name is kept to this many characters.
NAME_KEEP_CHARS = 256

# --- trust (KSM_GUEST_TRUST) ----------------------------------------------------------------

#: The users the hypervisors run guests as: libvirt on Debian/Ubuntu (libvirt-qemu), on
#: Fedora/RHEL/SUSE (qemu), and kvm where a distribution names it so.  Proxmox runs them as root.
HYPERVISOR_USERS = ("libvirt-qemu", "qemu", "kvm")
TRUST_WORDS = ("root", "hypervisor", "pidfile", "machine-slice", "any")
#: The default: what only root (or the hypervisor root starts) can make.
DEFAULT_TRUST = ("root", "hypervisor", "pidfile", "machine-slice")
#: systemd-machined's slice: libvirt and systemd-nspawn put guests there; only root can.
MACHINE_SLICE = "/machine.slice/"


def parse_trust(items: Sequence[str]) -> tuple[str, ...]:
    """KSM_GUEST_TRUST items, checked: the words above or ``user:NAME``.  Raises ValueError."""
    out = []
    for item in items:
        if item.startswith("user:") and len(item) > 5:
            out.append(item)
        elif item in TRUST_WORDS:
            out.append(item)
        else:
            raise ValueError(f"unknown trust {item!r}: expected root, hypervisor, pidfile, machine-slice, "
                             "user:NAME or any")
    if not out:
        raise ValueError("expected a comma list of root, hypervisor, pidfile, machine-slice, user:NAME or any")
    return tuple(out)


def trusted_user_names(trust: Sequence[str]) -> tuple[str, ...]:
    """The user names whose processes the rules trust by owner (to be resolved to uids)."""
    names = list(HYPERVISOR_USERS) if "hypervisor" in trust else []
    names += [t[5:] for t in trust if t.startswith("user:")]
    return tuple(names)


def trusted(trust: Sequence[str], uid: Optional[int], trusted_uids: Collection[int],
            by_root_pidfile: bool, cgroup: Optional[str]) -> bool:
    """Does a claimed process count as a guest?  ``uid``: its real owner (None: unknown);
    ``trusted_uids``: the uids of :func:`trusted_user_names`; ``by_root_pidfile``: a pid file
    in a root-owned directory names it; ``cgroup``: its cgroup v2 path (None: unknown)."""
    if "any" in trust:
        return True
    if uid is not None and (("root" in trust and uid == 0) or uid in trusted_uids):
        return True
    if "pidfile" in trust and by_root_pidfile:
        return True
    return "machine-slice" in trust and cgroup is not None and cgroup.startswith(MACHINE_SLICE)


# --- matchers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Matcher:
    """One KSM_GUEST_MATCH item: claims processes by comm/command line and/or by pid files."""

    name: str
    claims: Callable[[str, Sequence[str], str], bool]  # (comm, argv, joined argv) -> bool
    pidfile_dir: Optional[str] = None  # relative to the run directory


def _redhat(comm: str, argv: Sequence[str], joined: str) -> bool:
    return REDHAT_COMM.match(comm) is not None


def _debian(comm: str, argv: Sequence[str], joined: str) -> bool:
    return DEBIAN_CMDLINE.match(joined) is not None


def _libvirt(comm: str, argv: Sequence[str], joined: str) -> bool:
    if not argv or LIBVIRT_EXE.match(argv[0]) is None:
        return False
    return ACCEL_KVM.search(joined) is not None or LIBVIRT_COMM.match(comm) is not None


def _proxmox(comm: str, argv: Sequence[str], joined: str) -> bool:
    return comm == "kvm"


_NAMED = {"redhat": _redhat, "debian": _debian, "libvirt": _libvirt, "proxmox": _proxmox}


def make_matcher(spec: str) -> Matcher:
    """A matcher from one KSM_GUEST_MATCH item (already validated by the config)."""
    if spec.startswith("regex:"):
        pattern = re.compile(spec[len("regex:"):], re.DOTALL)  # as pgrep -f
        return Matcher(spec, lambda comm, argv, joined: pattern.search(joined) is not None)
    try:
        return Matcher(spec, _NAMED[spec], PIDFILE_DIRS.get(spec))
    except KeyError:
        raise ValueError(f"unknown guest matcher {spec!r}") from None


def claims(matchers: Sequence[Matcher], comm: str, argv: Sequence[str]) -> tuple[str, ...]:
    """The names of the matchers that claim a process by its name and command line, in order."""
    if not argv:  # a kernel thread or a zombie
        return ()
    joined = " ".join(argv)
    return tuple(m.name for m in matchers if m.claims(comm, argv, joined))


def qemu_like(comm: str, argv: Sequence[str]) -> bool:
    """Could this process be the QEMU/KVM a pid file names?"""
    if not argv:
        return False
    exe = argv[0].rpartition("/")[2]
    return QEMU_LIKE.match(comm) is not None or QEMU_LIKE.match(exe) is not None


def bounded_argv(argv: Sequence[str], limit: int = ARGV_KEEP_BYTES) -> tuple[str, ...]:
    """The first arguments of a command line, ``limit`` characters in all at most."""
    kept: list[str] = []
    used = 0
    for arg in argv:
        if used + len(arg) > limit:
            if limit - used > 0:
                kept.append(arg[: limit - used])
            break
        kept.append(arg)
        used += len(arg) + 1
    return tuple(kept)


# --- what the command line says --------------------------------------------------------------


def guest_name(argv: Sequence[str], comm: str = "", pidfile: Optional[str] = None) -> Optional[str]:
    """The guest's name: ``-name guest=NAME,...`` or ``-name NAME[,...]``, the pid file's name,
    or ``qemu:NAME`` (the process name QEMU sets; truncated to 11 characters by the kernel)."""
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-name", "--name"):
            value = argv[i + 1]
            parts = _split_opts(value)
            for part in parts:
                if part.startswith("guest="):
                    return part[len("guest="):][:NAME_KEEP_CHARS] or None
            if parts and "=" not in parts[0] and parts[0]:
                return parts[0][:NAME_KEEP_CHARS]
    if pidfile:
        base = pidfile.rpartition("/")[2]
        base = base[: -len(".pid")] if base.endswith(".pid") else base
        return base or None
    if comm.startswith("qemu:") and len(comm) > 5:
        return comm[5:]
    return None


def _split_opts(value: str) -> list[str]:
    """QEMU's option syntax: comma-separated, ',,' is a literal comma."""
    return [p.replace("\0", ",") for p in value.replace(",,", "\0").split(",")]
