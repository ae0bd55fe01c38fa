"""Latest-value-wins updates: a slider drag draws only the newest threshold, never a backlog of stale ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_NOTHING = object()


def _next_event_loop_turn(callback: Callable[[], None]) -> None:
    """Run ``callback`` once Qt has handled the events already queued (the rest of a drag's moves)."""
    from qtpy.QtCore import QTimer

    QTimer.singleShot(0, callback)


class Coalescer:
    """Calls ``function(value)`` with only the latest of the values requested since it last ran.

    ``request`` stores the value and, unless a call is already scheduled, schedules one with ``schedule``
    (default: the next turn of Qt's event loop). While an update runs, the slider's next moves queue up as
    events; they are all handled before the scheduled call, which then sees only the last value. So a drag
    never queues stale frames, and the view settles one update after the last step.

    Attributes:
        calls: How many times ``function`` ran (for tests and benchmarks).
    """

    def __init__(self, function: Callable[[Any], None],
                 schedule: Callable[[Callable[[], None]], None] = _next_event_loop_turn) -> None:
        self._function = function
        self._schedule = schedule
        self._pending: Any = _NOTHING
        self._scheduled = False
        self.calls = 0

    @property
    def pending(self) -> bool:
        """True when a requested value has not been materialised yet."""
        return self._pending is not _NOTHING

    def request(self, value: Any) -> None:
        """Ask for ``function(value)``; replaces any value still waiting."""
        self._pending = value
        if not self._scheduled:
            self._scheduled = True
            self._schedule(self._run)

    def _run(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Materialise the waiting value now (nothing when none waits)."""
        if self._pending is _NOTHING:
            return
        value, self._pending = self._pending, _NOTHING
        self.calls += 1
        self._function(value)

    def cancel(self) -> None:
        """Drop the waiting value (a scheduled call then does nothing)."""
        self._pending = _NOTHING
