"""Which processes are guests, and how much memory they hold.

``table``: the process table, one verdict per (pid, create time); ``pidfiles``: libvirt's and
Proxmox's pid files; ``finder``: the scan (claims, pid files, trust) and the measurement.  The
matchers themselves are pure (``core.matchers``); every read of a process is psutil's
(``kernel.processes``).
"""

from __future__ import annotations

from ...core.matchers import MATCHER_NAMES, guest_name, make_matcher
from ...core.ticks import Guest, committed_kib
from .finder import GuestFinder
from .table import YOUNG_S

__all__ = ["MATCHER_NAMES", "YOUNG_S", "Guest", "GuestFinder", "committed_kib", "guest_name", "make_matcher"]
