"""The JSON documents ksmtuned writes, as pydantic models: the state file and the output of
``status --json``, ``check --json``, ``guests --json`` and ``check-config --json``.

Each model is the document's contract: its fields are its keys, in the order they are written,
each with its type and meaning; ``schema`` is the layout's version (keys are only ever added;
an incompatible change bumps it).  docs/schemas/*.json are generated from these models
(tools/gen-schemas.py) and docs/documents.md describes them.  The state file is also *read*
through its model (``status``, and the daemon's start for the history), so a truncated,
planted or foreign file is refused with one line instead of a traceback.

Pure: no I/O.  Python 3.9 runs this (RHEL 9), and pydantic evaluates the annotations: they use
Optional/List/Dict, never ``X | None``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .config import Settings

#: The documents' layout versions (bumped on an incompatible change; keys are only ever added).
STATE_SCHEMA: Literal[1] = 1
STATUS_SCHEMA: Literal[1] = 1
CHECK_SCHEMA: Literal[1] = 1
GUESTS_SCHEMA: Literal[1] = 1
CHECK_CONFIG_SCHEMA: Literal[1] = 1

#: A KSM counter's value: an integer, or a word (advisor_mode's selected mode).
Counter = Union[int, str]


class Part(BaseModel):
    """A part of a document.  Unknown keys are ignored when reading (keys are only ever added);
    NaN and infinities are refused: JSON has none, and a file that holds them is not ours."""

    model_config = ConfigDict(allow_inf_nan=False)


# --- the state file ------------------------------------------------------------------------

class StateDaemon(Part):
    pid: int = Field(description="the daemon that wrote the file")
    version: str = Field(description="its ksmtuned version")
    started: float = Field(description="when it started (Unix time)")
    config_file: Optional[str] = Field(description="the config file it read")
    sysfs: str = Field(description="its KSM directory")
    procfs: str = Field(description="its proc filesystem")


class Inputs(Part):
    """What the decision was made from (kB = KiB)."""

    total_kib: Optional[int]
    free_kib: Optional[int]
    committed_kib: Optional[int]
    thres_kib: Optional[int]
    free_metric: str = Field(description="KSM_FREE_METRIC")
    ps_metric: str = Field(description="KSM_PS_METRIC")
    guests: int = Field(description="how many guests were counted")


class KnobWrite(Part):
    name: str = Field(description="the KSM file written")
    old: Optional[str]
    new: str


class StateDecision(Part):
    branch: Literal["stop", "boost", "decay"]
    run: bool
    npages: int
    sleep_ms: int
    explain: str = Field(description="the decision in words (as in the log and systemd's STATUS=)")
    writes: List[KnobWrite] = Field(description="the KSM files this tick changed, old -> new")


class Counts(Part):
    adjusts: int = Field(description="adjusts since the daemon started")
    decisions: Dict[str, int] = Field(description="{stop, boost, decay, error}: how often each, since the start")


class StateKsmd(Part):
    pid: Optional[int]
    cpu_seconds: Optional[float] = Field(description="ksmd's CPU time since boot")


class StateGuest(Part):
    pid: int
    name: str
    matcher: str = Field(description="the first configured matcher that claims it")
    memory_kib: Optional[int] = Field(description="its memory by KSM_PS_METRIC")
    ksm_merging_pages: Optional[int]
    ksm_profit_bytes: Optional[int]


class HistoryEntry(Part):
    """One past tick (a previous daemon's are carried over a restart)."""

    t: float = Field(description="when (Unix time)")
    saved_bytes: Optional[int] = None
    profit_bytes: Optional[int] = None
    ksmd_cpu_s: Optional[float] = None
    decision: Optional[str] = None
    npages: Optional[int] = None


class StateBudget(Part):
    """KSM_POLICY=budget's last decision (docs/budget.md); the key is null under classic."""

    mode: Literal["burst", "steady", "off"]
    trigger: str = Field("", description="bursting: the first trigger's kind (new-guest, growth, retune, "
                                         "unvisited); empty otherwise")
    reason: str = Field(description="the trigger of a burst, or how the last one ended")
    explain: str = Field(description="the decision in words (as in the log)")
    pages_to_scan: Optional[int] = Field(description="what the budget wants (null: KSM off)")
    sleep_ms: Optional[int]
    ksmd_cpu_pct: Optional[float] = Field(description="ksmd's CPU over the last budget tick, % of one core")
    target_cpu_pct: float = Field(description="the CPU this decision aims at, % of one core")
    unmerged_kib: int = Field(description="estimate of memory that may still merge")
    eta_s: Optional[float] = Field(description="bursting: estimated seconds until done")
    churn_factor: float = Field(description="share of the steady budget left under churn (1: none)")
    burst_bucket_cpu_s: float = Field(description="burst CPU-seconds left in the bucket")
    cost_ns_per_page: float = Field(description="ksmd's measured CPU per page visit, ns")
    churn_hold: Literal["", "trial", "hold"] = Field("", description="steady: holding churning pages merged "
                                                                     "(hold), trying whether it pays (trial), or not")
    cow_ksm_per_s: Optional[float] = Field(None, description="merged pages broken by writes per second, last tick")


class StateHistory(Part):
    """What the daemon's start reads of a previous daemon's state file: only its history."""

    schema_version: Literal[1] = Field(STATE_SCHEMA, alias="schema")
    history: List[HistoryEntry]


class StateDocument(Part):
    """The state file (default /run/ksmtuned/state.json), replaced atomically after every adjust."""

    model_config = ConfigDict(title="ksmtuned state file", populate_by_name=True)

    schema_version: Literal[1] = Field(STATE_SCHEMA, alias="schema", description="the layout's version")
    daemon: StateDaemon
    time: float = Field(description="when this adjust ran (Unix time)")
    reason: str = Field(description="start, interval, retune, reload or once")
    duration_s: float
    error: Optional[str] = Field(description="why the adjust failed; null when it did not")
    inputs: Inputs
    decision: Optional[StateDecision] = Field(description="null when the adjust failed")
    npages: Optional[int]
    last_success: Optional[float] = Field(description="the last adjust that did not fail (Unix time)")
    counts: Counts
    ksm: Dict[str, Counter] = Field(description="every KSM file, read right after this tick's writes")
    page_size: int
    ksmd: StateKsmd
    guests: List[StateGuest]
    settings: Settings = Field(description="the settings in force, by their ksmtuned.conf keys")
    budget: Optional[StateBudget] = Field(None, description="KSM_POLICY=budget: mode, trigger, ksmd CPU, estimates")
    #: last: the reporter appends its pre-serialized entries to the JSON text
    history: List[HistoryEntry] = Field(description="the last ticks, oldest first (at most 300)")


# --- status --json -------------------------------------------------------------------------

class StatusDaemon(Part):
    running: bool = Field(description="a ksmtuned holds the pid file's lock")
    pid: Optional[int]
    uptime_s: Optional[float]
    config_file: Optional[str] = Field(description="from its state file")
    version: Optional[str] = Field(description="from its state file")
    pidfile: str
    state_file: str
    state_found: bool = Field(description="a state file of this daemon was read")
    message: Optional[str] = Field(description="why it is considered not running")


class LastAdjust(Part):
    time: Optional[float]
    age_s: Optional[float]
    reason: Optional[str]
    decision: Optional[str] = Field(description="stop, boost, decay; null when the adjust failed")
    explain: Optional[str]
    error: Optional[str]
    run: Optional[bool]
    npages: Optional[int]
    sleep_ms: Optional[int]
    inputs: Optional[Inputs]
    counts: Optional[Counts]


class StatusKsm(Part):
    present: bool = Field(description="the KSM directory exists")
    sysfs: str
    counters: Dict[str, Counter] = Field(description="every KSM file the kernel offers, read now")


class StatusKsmd(Part):
    pid: Optional[int]
    cpu_seconds: Optional[float]
    cpu_percent_recent: Optional[float] = Field(description="over the last 10 ticks")
    recent_window_s: Optional[float]
    cpu_percent_since_boot: Optional[float]


class StatusHistory(Part):
    ticks: int
    saved_bytes: List[Optional[int]] = Field(description="per tick, oldest first")
    decisions: List[Optional[str]] = Field(description="per tick, oldest first")


class StatusDocument(Part):
    """``ksmtuned status --json``."""

    model_config = ConfigDict(title="ksmtuned status --json", populate_by_name=True)

    schema_version: Literal[1] = Field(STATUS_SCHEMA, alias="schema")
    time: float = Field(description="when status ran (Unix time)")
    daemon: StatusDaemon
    last_adjust: Optional[LastAdjust] = Field(description="null without a running daemon or its state file")
    ksm: StatusKsm
    page_size: int
    saved_bytes: Optional[int] = Field(description="pages_sharing x page size")
    profit_bytes: Optional[int] = Field(description="general_profit")
    sharing_ratio: Optional[float] = Field(description="pages_sharing / pages_shared")
    waste_ratio: Optional[float] = Field(description="pages_unshared / pages_sharing")
    ksmd: StatusKsmd
    history: StatusHistory
    budget: Optional[StateBudget] = Field(None, description="KSM_POLICY=budget: the state file's budget block")


# --- check --json --------------------------------------------------------------------------

class CheckGuest(Part):
    pid: int
    name: str
    memory_bytes: int
    memory_source: Literal["-m", "default", "vsz"]
    vcpus: int
    thp_bytes: Optional[int]
    rss_bytes: Optional[int]


class CheckUntrusted(Part):
    """A guest-looking process KSM_GUEST_TRUST does not trust: listed, never counted."""

    pid: int
    name: str
    uid: Optional[int]
    user: Optional[str]


class CheckHost(Part):
    ram_bytes: Optional[int]
    swap_bytes: Optional[int]
    cores: int = Field(description="physical cores")
    cpus: int = Field(description="logical CPUs")
    thp_mode: Optional[str]
    ksm_present: bool
    guests: List[CheckGuest] = Field(description="the trusted guests the checks count")
    untrusted_guests: List[CheckUntrusted] = Field(
        default_factory=list, description="guest-looking processes of unprivileged users (docs/security.md)")


class CheckResult(Part):
    name: str
    verdict: Literal["pass", "warn", "fail", "skip"]
    reason: str = Field(description="one line")
    details: Dict[str, Any] = Field(description="the check's numbers")


class CheckSummary(Part):
    model_config = ConfigDict(populate_by_name=True)

    passed: int = Field(alias="pass")
    warn: int
    fail: int
    skip: int


class CheckDocument(Part):
    """``ksmtuned check --json``."""

    model_config = ConfigDict(title="ksmtuned check --json", populate_by_name=True)

    schema_version: Literal[1] = Field(CHECK_SCHEMA, alias="schema")
    ok: bool = Field(description="no check failed")
    summary: CheckSummary
    host: CheckHost
    checks: List[CheckResult]


# --- guests --json -------------------------------------------------------------------------

class GuestEntry(Part):
    """One guest, sizes in kB (KiB); null where not known."""

    model_config = ConfigDict(from_attributes=True)

    pid: int
    name: str
    name_known: bool = Field(description="the name came from the guest's configuration, not the process name")
    matcher: str
    matchers: List[str] = Field(description="every configured matcher that claims it")
    comm: str = Field(description="the process name (psutil: the kernel's 15-character comm, "
                                  "or argv[0]'s base name when comm is its prefix)")
    cmdline: List[str] = Field(description="its command line, the first 8 KiB at most (issue 11: bounded)")
    start_time_s: float = Field(description="when it started (Unix time)")
    pidfile: Optional[str]
    rss_kib: int
    pss_kib: Optional[int]
    vsz_kib: int
    thp_kib: Optional[int]
    thp_warning: bool
    ksm_merging_pages: Optional[int]
    ksm_zero_pages: Optional[int]
    ksm_saved_kib: Optional[int]
    ksm_profit_bytes: Optional[int]
    ksm_mergeable: Optional[bool]
    uid: Optional[int] = Field(description="the process's real owner")
    user: Optional[str] = Field(description="its owner's name")
    trusted: bool = Field(description="counted: KSM_GUEST_TRUST trusts its owner, pid file or cgroup")


class GuestsDocument(Part):
    """``ksmtuned guests --json``."""

    model_config = ConfigDict(title="ksmtuned guests --json", populate_by_name=True)

    schema_version: Literal[1] = Field(GUESTS_SCHEMA, alias="schema")
    matchers: List[str] = Field(description="KSM_GUEST_MATCH")
    metric: str = Field(description="KSM_PS_METRIC")
    trust: List[str] = Field(description="KSM_GUEST_TRUST")
    untrusted: int = Field(description="guest-looking processes KSM_GUEST_TRUST does not trust (not counted)")
    committed_kib: int = Field(description="the trusted guests' memory by KSM_PS_METRIC")
    guests: List[GuestEntry]


# --- check-config --json -------------------------------------------------------------------

class CheckConfigDocument(Part):
    """``ksmtuned check-config --json``: the settings in force and where each came from."""

    model_config = ConfigDict(title="ksmtuned check-config --json", populate_by_name=True)

    schema_version: Literal[1] = Field(CHECK_CONFIG_SCHEMA, alias="schema")
    config_file: str
    file_found: bool
    settings: Settings = Field(description="every setting in force, by its ksmtuned.conf key")
    sources: Dict[str, str] = Field(description='KSM_* key -> "FILE:LINE", "environment", "command line" or "default"')
    warnings: List[str] = Field(description="e.g. unknown keys, each with its FILE:LINE")


#: file name in docs/schemas/ -> model
DOCUMENTS = {
    "state.json": StateDocument,
    "status.json": StatusDocument,
    "check.json": CheckDocument,
    "guests.json": GuestsDocument,
    "check-config.json": CheckConfigDocument,
}


def json_schema(model: type) -> Dict[str, Any]:
    """The JSON Schema of a document as written (aliases, serialization)."""
    return model.model_json_schema(by_alias=True, mode="serialization")  # type: ignore[attr-defined, no-any-return]
