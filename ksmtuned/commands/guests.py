"""`ksmtuned guests [--json]`: what is counted as a guest, how much memory it holds, what KSM saves.

Reads the same settings as the daemon (KSM_GUEST_MATCH, KSM_PS_METRIC), so what it lists is
what the daemon counts.  It reads ``smaps_rollup`` for every guest (PSS and THP), which the
daemon avoids each tick.  ``--json`` prints a GuestsDocument (docs/schemas/guests.json).
"""

from __future__ import annotations

import json

from ..core.documents import GuestEntry, GuestsDocument
from ..core.text import printable
from ..core.ticks import committed_kib
from ..engine.guests import GuestFinder
from ..errors import ExitCode
from ..paths import Paths
from ..service.config_file import load


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def render_table(guests, metric: str, matchers) -> str:
    rows = [("PID", "NAME", "MATCHER", "USER", "RSS MiB", "PSS MiB", "VSZ MiB", "THP MiB", "KSM saved MiB", "KSM profit MiB")]
    for g in guests:
        rows.append((
            str(g.pid), printable(g.name if g.name_known else f"({g.name})"), printable(",".join(g.matchers)),
            printable(g.user or "?") + ("" if g.trusted else " *"), _mib(g.rss_kib),
            _mib(g.pss_kib), _mib(g.vsz_kib), _mib(g.thp_kib) + (" !" if g.thp_warning else ""),
            _mib(g.ksm_saved_kib),
            "-" if g.ksm_profit_bytes is None else f"{g.ksm_profit_bytes / 1048576:.1f}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    left = {1, 2, 3}
    lines = ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    counted = [g for g in guests if g.trusted]
    lines.append(
        f"{len(counted)} guest(s) by {printable(','.join(matchers))}; committed ({metric}): {committed_kib(guests, metric)} kB"
    )
    untrusted = [g for g in guests if not g.trusted]
    if untrusted:
        lines.append(f"* {len(untrusted)} guest-looking process(es) of unprivileged users, not counted "
                     "(KSM_GUEST_TRUST, docs/security.md)")
    warned = [g for g in guests if g.thp_warning]
    for g in warned:
        lines.append(f"! {printable(g.name)} (pid {g.pid}): {_mib(g.thp_kib)} MiB on transparent huge pages, which KSM "
                     "does not merge")
    if guests and all(g.ksm_merging_pages is None for g in guests):
        lines.append("(no per-process KSM counters: /proc/PID/ksm_stat needs Linux 6.1 or later)")
    return "\n".join(lines)


def main(paths: Paths, as_json: bool = False) -> int:
    loaded = load(paths)
    finder = GuestFinder.from_settings(loaded.settings, run_dir=paths.run_dir)
    guests = finder.scan(details=True)
    metric = loaded.settings.ps_metric
    if as_json:
        doc = GuestsDocument(matchers=list(finder.matcher_names), metric=metric, trust=list(finder.trust),
                             untrusted=sum(1 for g in guests if not g.trusted),
                             committed_kib=committed_kib(guests, metric),
                             guests=[GuestEntry.model_validate(g) for g in guests])
        print(json.dumps(doc.model_dump(mode="json", by_alias=True), indent=2))
        return ExitCode.OK
    print(render_table(guests, metric, finder.matcher_names))
    return ExitCode.OK
