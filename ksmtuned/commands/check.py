"""`ksmtuned check [--json]`: the host checks of the virtualization guide, each with a verdict.

The rules come from Red Hat's virtualization guide (RHEL 6 "Overcommitting with KVM",
RHEL 7 "Overcommitting Virtualized CPUs"), where ksmtuned comes from:

- the recommended host keeps the sum of the guests' memory plus 4 GiB for the host below
  the physical RAM; overcommitting beyond that needs swap for all guests and host processes;
- swap: (guests' memory + 4 GiB for the host + 4 GiB minimum swap) - RAM;
- an SMP guest should not have more vCPUs than the host has physical cores; up to five
  single-vCPU guests per physical core are safe under 100 % load; more than ten vCPUs in all
  per core is not recommended;

and from what this project measured (KSM.md section 1): guest RAM on transparent huge pages
is not merged, and the kernel's own advisor owns ``pages_to_scan`` while it scans.

Every path is a parameter: ``procfs`` (meminfo, cpuinfo, the processes), the KSM directory
and ``mm`` (its parent, for ``transparent_hugepage``), so tests describe a host by files.
Verdicts: pass, warn, fail, skip; the command exits 1 when any check fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the finder is imported only when guests are scanned
    from ..core.ticks import Guest

from ..core.text import printable
from ..core.documents import CheckDocument
from ..errors import ExitCode
from ..paths import DEFAULT_PIDFILE, DEFAULT_RUN_DIR, Paths

GIB = 1 << 30
MIB = 1 << 20
#: The guide's allowance for the host's own processes, and its minimum swap.
HOST_RESERVE_BYTES = 4 * GIB
MIN_SWAP_BYTES = 4 * GIB
#: QEMU's RAM when no -m is given (x86 default, also most other targets).
QEMU_DEFAULT_RAM_BYTES = 128 * MIB
SINGLE_VCPU_PER_CORE_WARN = 5
VCPU_PER_CORE_WARN = 10
VERDICTS = ("pass", "warn", "fail", "skip")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([bBkKmMgGtTpPeE]?)\s*$")
_SUFFIX = {"": MIB, "b": 1, "k": 1 << 10, "m": MIB, "g": GIB, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
_QEMU_EXE = re.compile(r"^(qemu(-system-.*|-kvm)?|kvm)$")


# --- QEMU command lines --------------------------------------------------------------------

def _option(argv: list[str] | tuple[str, ...], name: str) -> str | None:
    """The value of QEMU option -NAME (or --NAME); the last one wins, as in QEMU."""
    value = None
    for i, arg in enumerate(argv[:-1]):
        if arg in (f"-{name}", f"--{name}"):
            value = argv[i + 1]
    return value


def parse_size(text: str, default_unit: int = MIB) -> int | None:
    """QEMU's -m size: '512' (MiB), '512M', '2G', '1.5G', '262144k'; None if not a size."""
    m = _SIZE.match(text)
    if not m:
        return None
    number, suffix = m.groups()
    unit = default_unit if not suffix else _SUFFIX[suffix.lower()]
    return int(float(number) * unit)


def memory_from_argv(argv: list[str] | tuple[str, ...]) -> int | None:
    """Guest RAM in bytes from -m ('512', '2G', 'size=2G,slots=4,maxmem=8G', '2G,maxmem=4G')."""
    value = _option(argv, "m")
    if value is None:
        return None
    for part in value.split(","):
        key, eq, v = part.partition("=")
        if not eq:
            return parse_size(key)
        if key == "size":
            return parse_size(v)
    return None


def vcpus_from_argv(argv: list[str] | tuple[str, ...]) -> int:
    """vCPUs from -smp ('4', 'cpus=4,sockets=2', '4,sockets=2', 'sockets=2,cores=2'); 1 without."""
    value = _option(argv, "smp")
    if value is None:
        return 1
    topology: dict[str, int] = {}
    for part in value.split(","):
        key, eq, v = part.partition("=")
        if not eq:
            key, v = "cpus", key
        if v.isdigit():
            topology[key] = int(v)
    if topology.get("cpus"):
        return topology["cpus"]
    product = 1
    found = False
    for key in ("drawers", "books", "sockets", "dies", "clusters", "modules", "cores", "threads"):
        if key in topology:
            product *= max(1, topology[key])
            found = True
    return product if found else 1


# --- the host ------------------------------------------------------------------------------

@dataclass
class GuestSpec:
    pid: int
    name: str
    memory_bytes: int
    memory_source: str  # "-m", "default" (QEMU's 128 MiB) or "vsz"
    vcpus: int
    thp_bytes: int | None
    rss_bytes: int | None


@dataclass
class Untrusted:
    """A guest-looking process that KSM_GUEST_TRUST does not trust: shown, never counted."""

    pid: int
    name: str
    uid: int | None
    user: str | None


@dataclass
class Host:
    """What the checks read.  Build it with :func:`read_host` or by hand in a test."""

    ram_bytes: int | None
    swap_bytes: int | None
    cores: int
    cpus: int
    guests: list[GuestSpec]
    ksm_present: bool
    ksm: dict[str, Any]
    thp_mode: str | None
    daemon_pid: int | None
    daemon_message: str | None
    services: dict[str, str] | None  # systemd unit -> is-active, when systemd runs
    tuners: list[tuple[int, str]]
    errors: dict[str, str] = field(default_factory=dict)  # part -> why it could not be read
    untrusted: list[Untrusted] = field(default_factory=list)


def physical_cores(cpuinfo: Path) -> tuple[int, int]:
    """(physical cores, logical CPUs) from /proc/cpuinfo; psutil's cpu_count() when it says nothing."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return _psutil_cpus()
    cores: set[tuple[str, str]] = set()
    cpus = 0
    phys = core = None
    for line in text.splitlines() + [""]:
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "processor":
            cpus += 1
        elif key == "physical id":
            phys = value
        elif key == "core id":
            core = value
        elif not key:
            if phys is not None or core is not None:
                cores.add((phys or "0", core or str(len(cores))))
            phys = core = None
    if cpus == 0:
        return _psutil_cpus()
    return (len(cores) or cpus), cpus


def _psutil_cpus() -> tuple[int, int]:
    import psutil

    logical = psutil.cpu_count() or 1
    return psutil.cpu_count(logical=False) or logical, logical


def thp_mode(mm: Path) -> str | None:
    """The selected word of transparent_hugepage/enabled ('always [madvise] never')."""
    try:
        text = (Path(mm) / "transparent_hugepage" / "enabled").read_text()
    except OSError:
        return None
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else text.strip() or None


def guest_spec(guest: Guest) -> GuestSpec:
    """Configured memory and vCPUs of one guest, from what the finder read (scan(details=True))."""
    argv = guest.cmdline
    memory = memory_from_argv(argv)
    source = "-m"
    if memory is None:
        exe = os.path.basename(argv[0]) if argv else ""
        if argv and (_QEMU_EXE.match(exe) or _QEMU_EXE.match(guest.comm)):
            memory, source = QEMU_DEFAULT_RAM_BYTES, "default"
        else:
            memory, source = guest.vsz_kib * 1024, "vsz"
    thp_kib, rss_kib = guest.thp_kib, guest.rss_kib
    return GuestSpec(pid=guest.pid, name=guest.name or str(guest.pid), memory_bytes=memory,
                     memory_source=source, vcpus=vcpus_from_argv(argv),
                     thp_bytes=thp_kib * 1024 if thp_kib is not None else None,
                     rss_bytes=rss_kib * 1024 if rss_kib is not None else None)


def systemd_services(units=("ksm.service", "ksmtuned.service"),
                     systemd_dir: Path = Path("/run/systemd/system")) -> dict[str, str] | None:
    """{unit: is-active answer} when systemd is the init (sd_booted), else None."""
    systemctl = shutil.which("systemctl")
    if not Path(systemd_dir).is_dir() or systemctl is None:
        return None
    try:
        out = subprocess.run([systemctl, "is-active", *units], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    answers = out.stdout.split()
    return {unit: (answers[i] if i < len(answers) else "unknown") for i, unit in enumerate(units)}


def read_host(settings, procfs: Path = Path("/proc"), ksm_dir: Path = Path("/sys/kernel/mm/ksm"),
              mm: Path | None = None, pidfile: str = DEFAULT_PIDFILE, run_dir: Path = Path(DEFAULT_RUN_DIR),
              systemd_dir: Path = Path("/run/systemd/system")) -> Host:
    """Read everything the checks need; a part that cannot be read is noted in ``errors``."""
    import warnings

    import psutil

    from ..engine.guests import GuestFinder
    from ..errors import KsmtunedError, NotRunningError
    from ..kernel.ksm import KsmSysfs
    from ..kernel.meminfo import read_meminfo, total_kib
    from ..kernel.tuners import other_tuners
    from ..service.pidfile import running_daemon

    procfs, ksm_dir = Path(procfs), Path(ksm_dir)
    mm = Path(mm) if mm is not None else ksm_dir.parent
    errors: dict[str, str] = {}
    ram = swap = None
    try:
        # the strict parser first: a bad meminfo is a one-line error naming the line
        total_kib(read_meminfo(procfs / "meminfo"), str(procfs / "meminfo"))
        with warnings.catch_warnings():  # a stand-in procfs without vmstat: swap in/out unknown
            warnings.simplefilter("ignore", RuntimeWarning)
            ram, swap = psutil.virtual_memory().total, psutil.swap_memory().total
    except KsmtunedError as e:
        errors["meminfo"] = str(e)
    cores, cpus = physical_cores(procfs / "cpuinfo")
    guests: list[GuestSpec] = []
    untrusted: list[Untrusted] = []
    try:
        finder = GuestFinder.from_settings(settings, run_dir=str(run_dir))
        found = finder.scan(details=True)
        guests = [guest_spec(g) for g in found if g.trusted]
        untrusted = [Untrusted(g.pid, g.name, g.uid, g.user) for g in found if not g.trusted]
    except KsmtunedError as e:
        errors["guests"] = str(e)
    sysfs = KsmSysfs(ksm_dir)
    ksm_present = sysfs.has("run")
    try:
        daemon_pid, message = running_daemon(pidfile, procfs), None
    except NotRunningError as e:
        daemon_pid, message = None, str(e)
    return Host(
        ram_bytes=ram, swap_bytes=swap, cores=cores, cpus=cpus, guests=guests, ksm_present=ksm_present,
        ksm=sysfs.counters() if ksm_present else {}, thp_mode=thp_mode(mm), daemon_pid=daemon_pid,
        daemon_message=message, services=systemd_services(systemd_dir=systemd_dir),
        tuners=other_tuners(), errors=errors, untrusted=untrusted,
    )


# --- the checks ----------------------------------------------------------------------------

@dataclass
class Check:
    name: str
    verdict: str  # pass, warn, fail, skip
    reason: str  # one line
    details: dict[str, Any] = field(default_factory=dict)


def _gib(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / GIB:.1f} GiB"


def check_memory(host: Host) -> Check:
    if host.ram_bytes is None:
        return Check("memory_overcommit", "fail", f"cannot read RAM: {host.errors.get('meminfo')}")
    guests = sum(g.memory_bytes for g in host.guests)
    need = guests + HOST_RESERVE_BYTES
    ratio = guests / host.ram_bytes
    details = {"guests_bytes": guests, "host_reserve_bytes": HOST_RESERVE_BYTES, "ram_bytes": host.ram_bytes,
               "swap_bytes": host.swap_bytes, "ratio": round(ratio, 3),
               "sources": sorted({g.memory_source for g in host.guests})}
    what = f"{len(host.guests)} guest(s) configured with {_gib(guests)} + {_gib(HOST_RESERVE_BYTES)} for the host"
    if need <= host.ram_bytes:
        return Check("memory_overcommit", "pass", f"{what} fit in RAM {_gib(host.ram_bytes)}", details)
    if need <= host.ram_bytes + (host.swap_bytes or 0):
        return Check("memory_overcommit", "warn",
                     f"overcommitted: {what} exceed RAM {_gib(host.ram_bytes)} ({ratio:.2f}x RAM); "
                     "this relies on KSM and swap", details)
    return Check("memory_overcommit", "fail",
                 f"{what} exceed RAM {_gib(host.ram_bytes)} + swap {_gib(host.swap_bytes)}: "
                 "the host runs out of memory when the guests use theirs", details)


def check_swap(host: Host) -> Check:
    if host.ram_bytes is None or host.swap_bytes is None:
        return Check("swap_size", "fail", f"cannot read RAM and swap: {host.errors.get('meminfo')}")
    guests = sum(g.memory_bytes for g in host.guests)
    formula = guests + HOST_RESERVE_BYTES + MIN_SWAP_BYTES - host.ram_bytes
    needed = max(0, formula)
    details = {"guests_bytes": guests, "ram_bytes": host.ram_bytes, "swap_bytes": host.swap_bytes,
               "needed_bytes": needed}
    rule = (f"guests {_gib(guests)} + {_gib(HOST_RESERVE_BYTES)} host + {_gib(MIN_SWAP_BYTES)} minimum swap "
            f"- RAM {_gib(host.ram_bytes)} = {_gib(formula)}")
    if formula <= 0:
        return Check("swap_size", "pass", f"{rule}: no swap needed ({_gib(host.swap_bytes)} present)", details)
    if host.swap_bytes >= needed:
        return Check("swap_size", "pass", f"{rule} needed, {_gib(host.swap_bytes)} present", details)
    overcommitted = guests + HOST_RESERVE_BYTES > host.ram_bytes
    return Check("swap_size", "fail" if overcommitted else "warn",
                 f"{rule} needed, only {_gib(host.swap_bytes)} present", details)


def check_vcpus(host: Host) -> Check:
    details: dict[str, Any] = {"cores": host.cores, "cpus": host.cpus,
                               "vcpus": sum(g.vcpus for g in host.guests)}
    if not host.guests:
        return Check("vcpu_overcommit", "pass", f"no guests on {host.cores} physical core(s)", details)
    too_wide = [g for g in host.guests if g.vcpus > 1 and g.vcpus > host.cores]
    singles = sum(1 for g in host.guests if g.vcpus == 1)
    total = details["vcpus"]
    details.update(smp_over_cores=[{"pid": g.pid, "name": g.name, "vcpus": g.vcpus} for g in too_wide],
                   single_vcpu_guests=singles)
    if too_wide:
        names = ", ".join(f"{g.name} ({g.vcpus} vCPUs)" for g in too_wide)
        return Check("vcpu_overcommit", "fail",
                     f"SMP guest(s) with more vCPUs than the host's {host.cores} physical core(s): {names}", details)
    if singles > SINGLE_VCPU_PER_CORE_WARN * host.cores:
        return Check("vcpu_overcommit", "warn",
                     f"{singles} single-vCPU guests on {host.cores} physical core(s): more than "
                     f"{SINGLE_VCPU_PER_CORE_WARN} per core", details)
    if total > VCPU_PER_CORE_WARN * host.cores:
        return Check("vcpu_overcommit", "warn",
                     f"{total} vCPUs on {host.cores} physical core(s): more than {VCPU_PER_CORE_WARN} per core",
                     details)
    return Check("vcpu_overcommit", "pass",
                 f"{total} vCPU(s) in {len(host.guests)} guest(s) on {host.cores} physical core(s)", details)


def check_ksm(host: Host) -> Check:
    if not host.ksm_present:
        return Check("ksm", "fail", "this kernel has no KSM (CONFIG_KSM): nothing to tune")
    run = host.ksm.get("run")
    state = {0: "stopped", 1: "running", 2: "stopped, unmerging"}.get(run, f"run={run}")
    return Check("ksm", "pass", f"KSM present, ksmd {state}", {"run": run})


def check_services(host: Host) -> Check:
    details: dict[str, Any] = {"daemon_pid": host.daemon_pid, "services": host.services,
                               "tuners": [{"pid": p, "name": n} for p, n in host.tuners]}
    kinds = {n for _, n in host.tuners}
    if len(host.tuners) > 1:
        who = ", ".join(f"{n} (pid {p})" for p, n in host.tuners)
        return Check("services", "fail", f"more than one KSM tuner runs, they fight over KSM: {who}", details)
    if kinds & {"momd", "mom-vdsm"}:
        return Check("services", "pass", f"KSM is tuned by {host.tuners[0][1]} (pid {host.tuners[0][0]})", details)
    if host.services is not None:
        states = ", ".join(f"{u} {s}" for u, s in host.services.items())
        if host.services.get("ksmtuned.service") == "active":
            return Check("services", "pass", states, details)
        return Check("services", "warn", f"{states}: nothing tunes KSM", details)
    if host.daemon_pid is not None:
        return Check("services", "pass", f"ksmtuned runs (pid {host.daemon_pid})", details)
    if host.tuners:
        return Check("services", "pass", f"a ksmtuned runs (pid {host.tuners[0][0]}) under another pid file",
                     details)
    return Check("services", "warn", f"{host.daemon_message}: nothing tunes KSM", details)


def check_thp(host: Host) -> Check:
    mode = host.thp_mode
    if mode is None:
        return Check("thp_mode", "pass", "no transparent huge pages on this kernel", {"mode": None})
    if mode == "never":
        return Check("thp_mode", "pass", "transparent huge pages off: all guest RAM can be merged", {"mode": mode})
    if mode == "always":
        return Check("thp_mode", "warn", "transparent_hugepage=always: guest RAM on huge pages is not merged "
                                         "by KSM; prefer madvise or never on a KSM host", {"mode": mode})
    return Check("thp_mode", "pass", f"transparent_hugepage={mode}: only memory that asks for huge pages "
                                     "gets them (QEMU does: see thp_guests)", {"mode": mode})


def check_thp_guests(host: Host) -> Check:
    backed = [g for g in host.guests if g.thp_bytes]
    details = {"guests": [{"pid": g.pid, "name": g.name, "thp_bytes": g.thp_bytes} for g in backed]}
    if not host.guests:
        return Check("thp_guests", "skip", "no guests", details)
    if not backed:
        return Check("thp_guests", "pass", f"no guest memory on transparent huge pages ({len(host.guests)} guest(s))",
                     details)
    names = ", ".join(f"{g.name} ({g.thp_bytes / MIB:.0f} MiB)" for g in backed)
    return Check("thp_guests", "warn", f"guest RAM on transparent huge pages, which KSM does not merge: {names}",
                 details)


def check_advisor(host: Host) -> Check:
    mode = host.ksm.get("advisor_mode")
    if not host.ksm_present:
        return Check("advisor", "skip", "no KSM")
    if mode is None:
        return Check("advisor", "pass", "this kernel has no KSM advisor (before 6.8)", {"mode": None})
    if mode == "none":
        return Check("advisor", "pass", "kernel advisor off: ksmtuned sets pages_to_scan", {"mode": mode})
    return Check("advisor", "warn", f"kernel advisor_mode={mode} sets pages_to_scan itself: ksmtuned only "
                                    "switches KSM on and off", {"mode": mode})


def check_guest_owners(host: Host) -> Check:
    """Guest-looking processes KSM_GUEST_TRUST does not trust: any user can start them, so they
    count in no other check (they cannot make one fail) and are only listed here."""
    details = {"untrusted": [asdict(u) for u in host.untrusted]}
    if not host.untrusted:
        return Check("guest_owners", "pass", f"every guest is trusted ({len(host.guests)} guest(s))", details)
    who = ", ".join(f"{u.name} (pid {u.pid}, user {u.user if u.user is not None else '?'})"
                    for u in host.untrusted[:10])
    more = f" and {len(host.untrusted) - 10} more" if len(host.untrusted) > 10 else ""
    return Check("guest_owners", "warn",
                 f"{len(host.untrusted)} guest-looking process(es) of unprivileged users, not counted "
                 f"(KSM_GUEST_TRUST): {who}{more}", details)


CHECKS = (check_memory, check_swap, check_vcpus, check_ksm, check_services, check_thp, check_thp_guests,
          check_advisor, check_guest_owners)


def run_checks(host: Host) -> list[Check]:
    checks = [f(host) for f in CHECKS]
    if "guests" in host.errors:
        checks.append(Check("guests", "fail", f"cannot list the guests: {host.errors['guests']}"))
    return checks


def report(host: Host, checks: list[Check]) -> CheckDocument:
    """The documented `check --json` document (docs/schemas/check.json)."""
    summary = {v: sum(1 for c in checks if c.verdict == v) for v in VERDICTS}
    return CheckDocument.model_validate({
        "ok": summary["fail"] == 0,
        "summary": summary,
        "host": {"ram_bytes": host.ram_bytes, "swap_bytes": host.swap_bytes, "cores": host.cores,
                 "cpus": host.cpus, "thp_mode": host.thp_mode, "ksm_present": host.ksm_present,
                 "guests": [asdict(g) for g in host.guests],
                 "untrusted_guests": [asdict(u) for u in host.untrusted]},
        "checks": [asdict(c) for c in checks],
    })


def render_text(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    # a reason quotes guest names, chosen by tenants: every control character shown escaped
    lines = [f"{c.verdict.upper():<4}  {c.name:<{width}}  {printable(c.reason)}" for c in checks]
    summary = {v: sum(1 for c in checks if c.verdict == v) for v in VERDICTS}
    lines.append("summary: " + ", ".join(f"{summary[v]} {v}" for v in VERDICTS))
    return "\n".join(lines) + "\n"


def main(paths: Paths, as_json: bool = False) -> int:
    """Exit 0 when no check fails, 5 (CHECK_FAILED) when any does; a crash is 1, as anywhere."""
    from ..core.config import Settings
    from ..errors import ConfigError
    from ..service.config_file import load, pidfile_in_force

    config_check = None
    try:
        settings = load(paths).settings
    except ConfigError as e:
        settings = Settings()
        config_check = Check("config", "fail", f"{str(e).splitlines()[0]} (checked with the defaults)")
    host = read_host(settings, procfs=Path(paths.procfs), ksm_dir=Path(paths.sysfs), pidfile=pidfile_in_force(paths),
                     run_dir=Path(paths.run_dir))
    checks = run_checks(host)
    if config_check is not None:
        checks.insert(0, config_check)
    if as_json:
        print(json.dumps(report(host, checks).model_dump(mode="json", by_alias=True), indent=2))
    else:
        sys.stdout.write(render_text(checks))
    return ExitCode.CHECK_FAILED if any(c.verdict == "fail" for c in checks) else ExitCode.OK
