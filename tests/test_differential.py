"""Differential test: the old bash ksmtuned (Debian's package) against ours, same inputs.

Each scenario starts both daemons in one pid namespace (same fake guests, same fake
/proc/meminfo), each with its own fake /sys/kernel/mm/ksm and /etc/ksmtuned.conf (see
tests/oracle.py), drives ticks with SIGUSR1 and, after every tick, requires:

- the same debug lines after the "<date>: " prefix (the header total/sleep/thres included),
- the same values in run, pages_to_scan, sleep_millisecs (and no other KSM file touched),
- a date prefix in `date`'s C-locale format on every line,
- the tick landing within RETUNE_DEADLINE_S of the SIGUSR1, on both sides.

The old daemon is the reference.  Each step also states which branch of the classic law it
is meant to exercise (stop / boost / decay, and the expected pages_to_scan where that is the
point), checked against the OLD daemon's output: this keeps the scenarios honest (an input
that misses its edge fails loudly instead of silently testing something else).
"""

from __future__ import annotations

import dataclasses
import difflib
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.oracle import Harness, Meminfo, find_oracle, skip_reason

pytestmark = [pytest.mark.oracle, pytest.mark.root]

RETUNE_DEADLINE_S = 1.0
GIB_KIB = 1 << 20


@pytest.fixture(scope="module")
def oracle() -> Path:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    path = find_oracle()
    assert path is not None
    return path


# ---------------------------------------------------------------------------------------------
# Scenario description
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The effective settings a scenario's config is meant to produce (defaults = old ones)."""

    sleep_msec: int = 10
    boost: int = 300
    decay: int = -50
    npages_min: int = 64
    npages_max: int = 1250
    coef: int = 20
    const: int = 2048

    def thres(self, total_kib: int) -> int:
        return max(total_kib * self.coef // 100, self.const)

    def config(self) -> str:
        """Config lines for every setting that differs from the default."""
        names = {
            "sleep_msec": "KSM_SLEEP_MSEC",
            "boost": "KSM_NPAGES_BOOST",
            "decay": "KSM_NPAGES_DECAY",
            "npages_min": "KSM_NPAGES_MIN",
            "npages_max": "KSM_NPAGES_MAX",
            "coef": "KSM_THRES_COEF",
            "const": "KSM_THRES_CONST",
        }
        default = Tuning()
        return "".join(
            f"{key}={getattr(self, field)}\n"
            for field, key in names.items()
            if getattr(self, field) != getattr(default, field)
        )


@dataclasses.dataclass(frozen=True)
class Ctx:
    """What a step's inputs are computed from: the startup MemTotal, thres and the
    guests' committed memory measured right before the tick."""

    total: int
    thres: int
    committed: int


@dataclasses.dataclass(frozen=True)
class Step:
    free: Callable[[Ctx], int]  # MemFree + Buffers + Cached for this tick, kB
    expect: str  # "stop", "boost" or "decay": the branch the old daemon must take
    npages: int | None = None  # pages_to_scan expected after the tick
    before: Callable[[Harness], None] | None = None  # e.g. start or kill a guest
    memtotal: Callable[[Ctx], int] | None = None  # MemTotal shown (default: startup total)
    settle_s: float = 0.0  # wait this long before the SIGUSR1 (mid-interval retune)


@dataclasses.dataclass(frozen=True)
class Scenario:
    id: str
    guests_mib: tuple[int, ...]
    total: Callable[[int, Tuning], int]  # startup MemTotal from (committed, tuning)
    steps: tuple[Step, ...]  # steps[0] is the startup adjust
    tuning: Tuning = Tuning()
    config: str | None = None  # None: tuning.config(); else the literal body
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    log_to_stdout: bool = False  # no LOGFILE: compare what each daemon writes to stdout


def total_where_committed_plus_thres_is(target_gap: int) -> Callable[[int, Tuning], int]:
    """MemTotal such that committed + thres == total - target_gap, exactly.

    total - thres(total) grows by 0 or 1 per kB of total, so every value is reached."""

    def solve(committed: int, tuning: Tuning) -> int:
        want = committed + target_gap
        total = want
        while total - tuning.thres(total) < want:
            total += 1
        assert total - tuning.thres(total) == want
        return total

    return solve


def below(ctx: Ctx) -> int:
    return ctx.thres - 1


def at(ctx: Ctx) -> int:
    return ctx.thres


def above(ctx: Ctx) -> int:
    return ctx.thres + 1


def plenty(ctx: Ctx) -> int:
    return ctx.thres * 3


def add_guest(mib: int) -> Callable[[Harness], None]:
    return lambda h: h.add_guests([mib]) and None


def kill_guest(name: str) -> Callable[[Harness], None]:
    return lambda h: h.kill_guest(name) and None


SIXTEEN_GIB = lambda committed, tuning: 16 * GIB_KIB  # noqa: E731  (the old comment's server)
OVERCOMMITTED = lambda committed, tuning: committed + 1024  # noqa: E731  (committed+thres > total)

# From 0: 128, 256, 384 -> MAX 383; then 351, 319, ..., 63, 31 -> MIN 32.  Both clamps are hit
# one page past the limit, so an off-by-one in either comparison shows.
NON_DEFAULT = Tuning(
    sleep_msec=20, boost=128, decay=-32, npages_min=32, npages_max=383, coef=30, const=4096
)
SHELL_FORMS_CONFIG = """\
# ksmtuned.conf written the ways real ones are: comments, quotes, export, repeats
DEBUG=1
LOGFILE="@LOGFILE@"

KSM_MONITOR_INTERVAL='3600'
export KSM_NPAGES_BOOST=500   # inline comment after an export
KSM_NPAGES_DECAY="-25"
KSM_NPAGES_MIN='40'
KSM_NPAGES_MAX=900
KSM_NPAGES_MAX=1000 # repeated key: the last one wins
KSM_THRES_COEF=25\t# tab before the comment
export KSM_SLEEP_MSEC="15"

KSM_THRES_CONST=4096"""  # no newline after the last line
SHELL_FORMS = Tuning(
    sleep_msec=15, boost=500, decay=-25, npages_min=40, npages_max=1000, coef=25, const=4096
)

SCENARIOS = [
    Scenario(
        "no-pressure",
        (16, 24),
        SIXTEEN_GIB,
        (Step(plenty, "stop"), Step(plenty, "stop"), Step(above, "stop")),
    ),
    Scenario(
        "pressure-rises-to-max",
        (16, 24),
        SIXTEEN_GIB,
        (
            Step(plenty, "stop"),
            Step(below, "boost", 300),
            Step(lambda c: c.thres // 2, "boost", 600),
            Step(lambda c: c.thres // 4, "boost", 900),
            Step(lambda c: 4096, "boost", 1200),
            Step(lambda c: 1024, "boost", 1250),  # clamped at KSM_NPAGES_MAX
            Step(lambda c: 0, "boost", 1250),
        ),
    ),
    Scenario(
        "recovery-decays-to-min",
        (16, 24),
        OVERCOMMITTED,
        (
            Step(below, "boost", 300),
            Step(below, "boost", 600),
            *(Step(above, "decay", n) for n in range(550, 100, -50)),
            Step(at, "decay", 100),
            Step(plenty, "decay", 64),  # 100 - 50 clamped at KSM_NPAGES_MIN
            Step(plenty, "decay", 64),
        ),
    ),
    Scenario(
        "free-equals-thres-edges",  # free == thres: runs, decays; stop keeps npages
        (16, 24),
        SIXTEEN_GIB,
        (
            Step(above, "stop"),
            Step(at, "decay", 64),
            Step(below, "boost", 364),
            Step(at, "decay", 314),
            Step(above, "stop"),
            Step(below, "boost", 614),
        ),
    ),
    Scenario(
        "committed-plus-thres-equals-total",  # keeps KSM running; a guest exit stops it
        (16, 24),
        total_where_committed_plus_thres_is(0),
        (
            Step(plenty, "decay", 64),
            Step(below, "boost", 364),
            Step(plenty, "decay", 314),
            Step(plenty, "stop", before=kill_guest("g1")),
        ),
    ),
    Scenario(
        "committed-plus-thres-one-below-total",
        (16, 24),
        total_where_committed_plus_thres_is(1),
        (
            Step(above, "stop"),
            Step(at, "decay", 64),
            Step(plenty, "stop"),
            Step(plenty, "decay", 64, before=add_guest(8)),  # a new guest tips it over
        ),
    ),
    Scenario(
        "retune-mid-interval",  # KSM_MONITOR_INTERVAL=3600: only SIGUSR1 can cause these
        (16,),
        SIXTEEN_GIB,
        (
            Step(plenty, "stop"),
            Step(below, "boost", 300, settle_s=0.5),
            Step(below, "boost", 600, before=add_guest(32), settle_s=0.3),
            Step(plenty, "stop", before=kill_guest("g1"), settle_s=0.2),
        ),
    ),
    Scenario(
        "non-default-config-small-host",  # sleep = 20*16 GiB/total, far above the floor of 10
        (16, 24),
        OVERCOMMITTED,
        (
            Step(below, "boost", 128),
            Step(below, "boost", 256),
            Step(below, "boost", 383),  # 384 clamped at MAX
            Step(below, "boost", 383),
            *(Step(above, "decay", n) for n in range(351, 32, -32)),  # 351 ... 63
            Step(above, "decay", 32),  # 31 clamped at MIN
            Step(at, "decay", 32),
        ),
        tuning=NON_DEFAULT,
    ),
    Scenario(
        "sleep-just-above-floor",  # 10 * 16 GiB / total = 11.0000004
        (16,),
        lambda committed, tuning: 15252014,
        (Step(plenty, "stop"), Step(below, "boost", 300)),
    ),
    Scenario(
        "sleep-just-below-floor",  # 10 * 16 GiB / total = 9.3, floored up to 10
        (16,),
        lambda committed, tuning: 18000000,
        (Step(plenty, "stop"), Step(below, "boost", 300)),
    ),
    Scenario(
        "thres-const-wins",  # KSM_THRES_CONST one kB above MemTotal*COEF/100 = 65535
        (16,),
        lambda committed, tuning: 327675,
        (
            Step(above, "stop"),
            Step(at, "decay", 64),
            Step(below, "boost", 364),
            Step(above, "stop"),
        ),
        tuning=Tuning(const=65536),
    ),
    Scenario(
        "shell-forms-config",
        (16, 24),
        OVERCOMMITTED,
        (
            Step(below, "boost", 500),
            Step(below, "boost", 1000),
            Step(below, "boost", 1000),
            Step(above, "decay", 975),
            Step(at, "decay", 950),
        ),
        tuning=SHELL_FORMS,
        config=SHELL_FORMS_CONFIG,
    ),
    Scenario(
        "environment-fills-unset-keys",  # env used only where the file does not set the key
        (16,),
        OVERCOMMITTED,
        (
            Step(below, "boost", 200),
            Step(below, "boost", 400),
            Step(above, "decay", 330),
        ),
        tuning=Tuning(boost=200, decay=-70),
        config="KSM_NPAGES_DECAY=-70\n",
        env={"KSM_NPAGES_BOOST": "200", "KSM_NPAGES_DECAY": "-10"},
    ),
    Scenario(
        # MemTotal is read once at startup.  Tick 1 shows a MemTotal equal to the startup
        # committed + thres: a daemon that compared against the new total would start KSM.
        "memtotal-read-once",
        (16, 24),
        SIXTEEN_GIB,
        (
            Step(plenty, "stop"),
            Step(above, "stop", memtotal=lambda c: c.committed + c.thres),
            Step(below, "boost", 300, memtotal=lambda c: 64 * GIB_KIB),
        ),
    ),
    Scenario(
        # Zero is a legal value for each of these: sleep 0 is floored to 10, thres is CONST
        # alone, npages neither decays nor has a floor.
        "zero-valued-settings",
        (16,),
        SIXTEEN_GIB,
        (
            Step(above, "stop"),
            Step(below, "boost", 250),
            Step(at, "decay", 250),
            Step(below, "boost", 500),
            Step(below, "boost", 500),
        ),
        tuning=Tuning(
            sleep_msec=0, boost=250, decay=0, npages_min=0, npages_max=500, coef=0, const=100000
        ),
    ),
    Scenario(
        "debug-lines-to-stdout",  # DEBUG=1 without LOGFILE: standard output (here a file)
        (16,),
        OVERCOMMITTED,
        (Step(below, "boost", 300), Step(above, "decay", 250), Step(at, "decay", 200)),
        log_to_stdout=True,
    ),
    Scenario(
        "no-guests",
        (),
        SIXTEEN_GIB,
        (Step(plenty, "stop"), Step(below, "boost", 300), Step(above, "stop")),
    ),
]


# ---------------------------------------------------------------------------------------------
# Running and comparing
# ---------------------------------------------------------------------------------------------


def run_scenario(
    scenario: Scenario,
    workdir: Path,
    oracle: Path,
    sides: dict[str, str],
    ref: str,
    cand: str,
    configs: dict[str, str] | None = None,
) -> Harness:
    """Run every step; after each tick compare cand against ref.  Returns the harness (closed)."""
    with Harness(workdir, sides, oracle=oracle) as h:
        committed = h.add_guests(list(scenario.guests_mib)) if scenario.guests_mib else 0
        total = scenario.total(committed, scenario.tuning)
        thres = scenario.tuning.thres(total)
        config = configs or (scenario.config if scenario.config is not None else scenario.tuning.config())
        for i, step in enumerate(scenario.steps):
            if step.before is not None:
                step.before(h)
            ctx = Ctx(total, thres, h.committed_kib())
            free = step.free(ctx)
            meminfo = Meminfo.with_free(step.memtotal(ctx) if step.memtotal else total, free)
            if i == 0:
                assert step.settle_s == 0 and step.memtotal is None
                tick = h.start(
                    config, meminfo, env=scenario.env, log_to_stdout=scenario.log_to_stdout
                )
            else:
                tick = h.tick(meminfo, settle_s=step.settle_s)
            where = f"scenario {scenario.id}, tick {tick.index}"
            check_reference(h, tick.sides[ref], ctx, free, step, scenario.tuning, where, first=i == 0)
            compare(h, tick.sides[ref], tick.sides[cand], ref, cand, where)
        extra = h.quiet(0.2)
        assert not any(extra.values()), f"{scenario.id}: lines logged without a tick: {extra}"
    return h


def check_reference(h, r, ctx: Ctx, free: int, step: Step, tuning: Tuning, where: str, first: bool):
    """The reference (old) daemon took the branch the step was designed for."""
    text = "\n".join(r.lines)
    context = f"{where}: the scenario does not exercise what it claims\n{h.describe()}"
    assert f"committed {ctx.committed} free {free}" in r.lines, context
    if first:
        assert r.lines[:3] == [
            f"total {ctx.total}",
            f"sleep {max(tuning.sleep_msec * 16 * 1024 * 1024 // ctx.total, 10)}",
            f"thres {ctx.thres}",
        ], context
    if step.expect == "stop":
        assert text.endswith(", stop ksm") and r.knobs["run"] == "0", context
    else:
        assert f", {step.expect}" in text and r.knobs["run"] == "1", context
    if step.npages is not None:
        assert r.knobs["pages_to_scan"] == str(step.npages), context


def compare(h, ref, cand, ref_name: str, cand_name: str, where: str) -> None:
    if cand.lines != ref.lines:
        diff = "\n".join(
            difflib.unified_diff(ref.lines, cand.lines, ref_name, cand_name, lineterm="")
        )
        pytest.fail(f"{where}: debug lines differ (after the date)\n{diff}\n\n{h.describe()}")
    assert cand.knobs == ref.knobs, f"{where}: KSM knobs differ\n{h.describe()}"
    assert cand.sysfs == ref.sysfs, f"{where}: KSM directories differ\n{h.describe()}"
    for name, side in ((ref_name, ref), (cand_name, cand)):
        assert side.dates_ok, f"{where}: {name} lines lack a `date` prefix: {side.raw_lines}"
        if side.latency_s is not None:
            assert side.latency_s < RETUNE_DEADLINE_S, (
                f"{where}: {name} took {side.latency_s:.3f}s from SIGUSR1 to the tick's last line"
            )


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_ours_matches_old_daemon(scenario: Scenario, tmp_path: Path, oracle: Path) -> None:
    run_scenario(scenario, tmp_path, oracle, {"old": "old", "new": "new"}, "old", "new")


def test_harness_self_check_two_old_daemons_agree(tmp_path: Path, oracle: Path) -> None:
    """The harness itself: two copies of the old daemon must agree on a scenario with an exact
    equality edge and a guest exiting."""
    scenario = next(s for s in SCENARIOS if s.id == "committed-plus-thres-equals-total")
    run_scenario(scenario, tmp_path, oracle, {"a": "old", "b": "old"}, "a", "b")


def test_harness_self_check_sees_a_difference(tmp_path: Path, oracle: Path) -> None:
    """The comparison can fail: two old daemons whose configs differ by one key disagree."""
    scenario = next(s for s in SCENARIOS if s.id == "pressure-rises-to-max")
    configs = {"a": "", "b": "KSM_NPAGES_BOOST=301\n"}
    with pytest.raises(pytest.fail.Exception, match=r"debug lines differ[\s\S]*KSMCTL start 301 10"):
        run_scenario(scenario, tmp_path, oracle, {"a": "old", "b": "old"}, "a", "b", configs)


def test_retune_lands_within_deadline_on_both(tmp_path: Path, oracle: Path) -> None:
    """A retune in the middle of a one-hour interval: both adjust within the deadline, and
    neither adjusts again on its own afterwards."""
    with Harness(tmp_path, {"old": "old", "new": "new"}, oracle=oracle) as h:
        committed = h.add_guests([16])
        total = 16 * GIB_KIB
        thres = Tuning().thres(total)
        h.start("", Meminfo.with_free(total, thres * 3))
        time.sleep(0.4)
        tick = h.tick(Meminfo.with_free(total, thres - 1))
        for name, side in tick.sides.items():
            assert side.latency_s is not None and side.latency_s < RETUNE_DEADLINE_S, h.describe()
            assert side.lines[-1] == "KSMCTL start 300 10", h.describe()
            assert f"committed {committed} free {thres - 1}" in side.lines, h.describe()
        assert h.quiet(0.5) == {"old": [], "new": []}
