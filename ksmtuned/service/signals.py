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


#: Signals whose default action is to terminate, which mean nothing to ksmtuned: ignored while
#: the daemon runs.  A stray `kill -USR2` or `pkill -ALRM` (or a real-time signal) killed it and
#: left its pid file behind.  SIGQUIT (a core dump on purpose), SIGKILL and the fault signals
#: keep their default action.
IGNORED = tuple(sig for sig in (
    signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF, signal.SIGIO, signal.SIGPIPE,
    getattr(signal, "SIGPWR", None), getattr(signal, "SIGSTKFLT", None),
    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
) if sig is not None)


class SignalEvents:
    """Blocks the daemon's signals for this thread (and threads started later)."""

    def __init__(self):
        self._signals = set(SIGNAL_EVENTS)
        self._old_mask: set | None = None
        self._old_handlers: dict = {}

    def block(self) -> "SignalEvents":
        """Block the daemon's signals (read by :meth:`wait`) and ignore those in IGNORED."""
        self._old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self._signals)
        for sig in IGNORED:
            try:
                self._old_handlers[sig] = signal.signal(sig, signal.SIG_IGN)
            except (OSError, ValueError):  # not settable here, or not from this thread
                pass
        return self

    def unblock(self) -> None:
        if self._old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)
            self._old_mask = None
        for sig, handler in self._old_handlers.items():
            try:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            except (OSError, ValueError, TypeError):
                pass
        self._old_handlers.clear()

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
