"""Signals turned into events the loop reads.  No work happens in a signal handler.

The signals are blocked and collected with sigtimedwait(), so a retune interrupts the
wait at once (time.sleep() would not wake for a handled signal, PEP 475) and a storm of
signals is coalesced into one event of each kind.
"""

from __future__ import annotations

import enum
import signal


class Event(enum.Enum):
    RETUNE = "retune"  # SIGUSR1: adjust now
    RELOAD = "reload"  # SIGHUP: re-read the config, then adjust
    STOP = "stop"  # SIGTERM / SIGINT: exit cleanly


SIGNAL_EVENTS = {
    signal.SIGUSR1: Event.RETUNE,
    signal.SIGHUP: Event.RELOAD,
    signal.SIGTERM: Event.STOP,
    signal.SIGINT: Event.STOP,
}


class SignalEvents:
    """Blocks the daemon's signals for this thread (and threads started later)."""

    def __init__(self):
        self._signals = set(SIGNAL_EVENTS)
        self._old_mask: set | None = None

    def block(self) -> "SignalEvents":
        self._old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self._signals)
        return self

    def unblock(self) -> None:
        if self._old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)
            self._old_mask = None

    def __enter__(self):
        return self.block()

    def __exit__(self, *exc):
        self.unblock()

    def wait(self, timeout_s: float) -> set[Event]:
        """Events that arrived within timeout_s (empty on timeout), all pending ones drained."""
        events: set[Event] = set()
        info = signal.sigtimedwait(self._signals, max(0.0, timeout_s))
        while info is not None:
            events.add(SIGNAL_EVENTS[info.si_signo])
            info = signal.sigtimedwait(self._signals, 0)
        return events
