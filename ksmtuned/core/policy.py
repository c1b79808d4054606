"""The classic ksmtuned control law, as pure functions.

No I/O, no clock, no logging.  The rules are those of the bash ksmtuned that Red Hat
and Debian ship (KSM.md section 2), integer for integer, including bash's arithmetic
(division truncates toward zero) and its strict comparisons.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: KSM_SLEEP_MSEC is defined for a 16 GiB host (16 * 1024 * 1024 kB).
REFERENCE_TOTAL_KIB = 16 * 1024 * 1024
#: The old daemon never lets ksmd sleep less than this between scans.
SLEEP_FLOOR_MS = 10


def bash_div(numerator: int, denominator: int) -> int:
    """Integer division as bash's $[a / b] does it: truncate toward zero."""
    if denominator == 0:
        raise ZeroDivisionError("division by zero")
    quotient = abs(numerator) // abs(denominator)
    return quotient if (numerator >= 0) == (denominator >= 0) else -quotient


@dataclass(frozen=True)
class Tuning:
    """The KSM_* knobs of ksmtuned.conf that the control law uses."""

    npages_boost: int = 300
    npages_decay: int = -50
    npages_min: int = 64
    npages_max: int = 1250
    thres_coef_pct: int = 20
    thres_const_kib: int = 2048
    sleep_msec: int = 10


def sleep_ms_for(total_kib: int, sleep_msec: int) -> int:
    """ksmd's sleep between scans: KSM_SLEEP_MSEC scaled by 16 GiB / RAM, floored at 10 ms.

    The sleep scales with 1/RAM so a big host scans faster.  Computed once at start.
    """
    sleep_ms = bash_div(sleep_msec * REFERENCE_TOTAL_KIB, total_kib)
    if sleep_ms <= SLEEP_FLOOR_MS:
        sleep_ms = SLEEP_FLOOR_MS
    return sleep_ms


def thres_kib_for(total_kib: int, thres_coef_pct: int, thres_const_kib: int) -> int:
    """The free-memory threshold: KSM_THRES_COEF % of RAM, at least KSM_THRES_CONST kB."""
    thres_kib = bash_div(total_kib * thres_coef_pct, 100)
    if thres_const_kib > thres_kib:
        thres_kib = thres_const_kib
    return thres_kib


@dataclass(frozen=True)
class Limits:
    """What the daemon derives from the tuning and MemTotal at start (or reload)."""

    total_kib: int
    sleep_ms: int
    thres_kib: int


def limits_for(total_kib: int, tuning: Tuning) -> Limits:
    return Limits(
        total_kib=total_kib,
        sleep_ms=sleep_ms_for(total_kib, tuning.sleep_msec),
        thres_kib=thres_kib_for(total_kib, tuning.thres_coef_pct, tuning.thres_const_kib),
    )


@dataclass(frozen=True)
class Sample:
    """One tick's inputs, in kB."""

    free_kib: int
    committed_kib: int


class Branch(enum.Enum):
    STOP = "stop"  # no pressure: run=0
    BOOST = "boost"  # free below threshold: scan harder
    DECAY = "decay"  # pressure from committed memory, but free is not below threshold


@dataclass(frozen=True)
class Decision:
    """What to write to /sys/kernel/mm/ksm, and why."""

    branch: Branch
    run: bool
    npages: int  # the daemon's npages after this tick (unchanged on STOP)
    sleep_ms: int
    committed_plus_thres_kib: int
    free_kib: int
    committed_kib: int
    thres_kib: int
    total_kib: int

    @property
    def pages_to_scan(self) -> int | None:
        return self.npages if self.run else None

    def explain(self) -> str:
        """A one-line reason in words, with units, for logs and `status`."""
        if self.branch is Branch.STOP:
            return (
                f"KSM off: committed+threshold {_gib(self.committed_plus_thres_kib)} < "
                f"total {_gib(self.total_kib)} and free {_gib(self.free_kib)} > "
                f"threshold {_gib(self.thres_kib)}"
            )
        if self.branch is Branch.BOOST:
            return (
                f"KSM on, boosting to {self.npages} pages/{self.sleep_ms} ms: "
                f"free {_gib(self.free_kib)} < threshold {_gib(self.thres_kib)}"
            )
        return (
            f"KSM on, decaying to {self.npages} pages/{self.sleep_ms} ms: "
            f"free {_gib(self.free_kib)} >= threshold {_gib(self.thres_kib)}, "
            f"committed+threshold {_gib(self.committed_plus_thres_kib)} >= total {_gib(self.total_kib)}"
        )


def _gib(kib: int) -> str:
    return f"{kib / (1024 * 1024):.1f} GiB"


def clamp_npages(npages: int, npages_min: int, npages_max: int) -> int:
    """Clamp as the old increase_npages does: MIN is checked first, then MAX."""
    if npages < npages_min:
        return npages_min
    if npages > npages_max:
        return npages_max
    return npages


def decide(sample: Sample, npages: int, limits: Limits, tuning: Tuning) -> Decision:
    """One tick of the classic law.

    KSM stops when committed + threshold < total and free > threshold (both strict);
    otherwise npages is boosted when free < threshold (strict) and decayed otherwise,
    clamped to [MIN, MAX], and KSM runs at npages pages per sleep_ms.
    """
    committed_plus_thres_kib = sample.committed_kib + limits.thres_kib
    common = dict(
        sleep_ms=limits.sleep_ms,
        committed_plus_thres_kib=committed_plus_thres_kib,
        free_kib=sample.free_kib,
        committed_kib=sample.committed_kib,
        thres_kib=limits.thres_kib,
        total_kib=limits.total_kib,
    )
    if committed_plus_thres_kib < limits.total_kib and sample.free_kib > limits.thres_kib:
        return Decision(branch=Branch.STOP, run=False, npages=npages, **common)
    if sample.free_kib < limits.thres_kib:
        branch, delta = Branch.BOOST, tuning.npages_boost
    else:
        branch, delta = Branch.DECAY, tuning.npages_decay
    new_npages = clamp_npages(npages + delta, tuning.npages_min, tuning.npages_max)
    return Decision(branch=branch, run=True, npages=new_npages, **common)


def start_lines(limits: Limits) -> list[str]:
    """The old daemon's debug lines at start, without the date prefix."""
    return [f"total {limits.total_kib}", f"sleep {limits.sleep_ms}", f"thres {limits.thres_kib}"]


def tick_lines(decision: Decision) -> list[str]:
    """The old daemon's debug lines for one tick, character for character after the date.

    Note the old daemon prints '>' on the start and decay lines even when the values are equal.
    """
    d = decision
    lines = [f"committed {d.committed_kib} free {d.free_kib}"]
    if d.branch is Branch.STOP:
        lines.append(f"{d.committed_plus_thres_kib} < {d.total_kib} and free > {d.thres_kib}, stop ksm")
        return lines
    lines.append(f"{d.committed_plus_thres_kib} > {d.total_kib}, start ksm")
    if d.branch is Branch.BOOST:
        lines.append(f"{d.free_kib} < {d.thres_kib}, boost")
    else:
        lines.append(f"{d.free_kib} > {d.thres_kib}, decay")
    lines.append(f"KSMCTL start {d.npages} {d.sleep_ms}")
    return lines
