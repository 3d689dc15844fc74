"""The service's measured time per cutout, end to end: busy wall time over cutouts answered.

Admission by work (:mod:`service.api.guards`) needs what one more cutout adds to
the queue's wait. The batcher's run time per cutout leaves out what surrounds
inference on the same cores (reading the body, decoding and preparing the files,
rendering the answer, and refusing other clients), so under load it admits more
work than the deadline allows. This meter measures the whole pipeline instead:
while at least one request's work is under way (its body read, its answer not
yet sent) the wall time counts as busy, and each window of busy time is divided
by the cutouts answered in it. On a saturated server that is the inverse of its
throughput; on a lightly loaded one it is nearer a request's latency per cutout,
an overestimate that matters little because the queue is then short.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: Busy time (seconds) a window gathers before it yields a measurement.
WINDOW_S = 0.5
#: Weight of a new window's measurement in the moving average.
SMOOTHING = 0.3


class BusyTimeMeter:
    """Seconds of busy wall time per cutout answered, as a moving average over windows.

    Parameters
    ----------
    window_s : float
        Busy time a window gathers before it is measured (seconds).
    smoothing : float
        Weight of each new window in the moving average (0 to 1).
    clock : callable
        Monotonic clock (seconds); a parameter so tests can drive it.
    """

    def __init__(
        self,
        *,
        window_s: float = WINDOW_S,
        smoothing: float = SMOOTHING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window_s = window_s
        self._smoothing = smoothing
        self._clock = clock
        self._in_progress = 0
        self._last_event = clock()
        self._busy_s = 0.0
        self._answered = 0
        self._seconds_per_cutout: float | None = None

    @property
    def seconds_per_cutout(self) -> float | None:
        """Moving average of busy seconds per cutout answered; None before the first window."""
        return self._seconds_per_cutout

    @property
    def in_progress(self) -> int:
        """Requests whose work is under way (requests)."""
        return self._in_progress

    def started(self) -> None:
        """A request's work begins (its body has been read)."""
        self._advance()
        self._in_progress += 1

    def finished(self, cutouts: int) -> None:
        """A request that :meth:`started` is answered; it held ``cutouts`` (cutouts)."""
        self._advance()
        self._in_progress = max(self._in_progress - 1, 0)
        self._answered += max(cutouts, 0)
        if self._busy_s >= self._window_s and self._answered > 0:
            measured = self._busy_s / self._answered
            previous = self._seconds_per_cutout
            self._seconds_per_cutout = (
                measured if previous is None else previous + self._smoothing * (measured - previous)
            )
            self._busy_s = 0.0
            self._answered = 0

    def _advance(self) -> None:
        now = self._clock()
        if self._in_progress > 0:
            self._busy_s += now - self._last_event
        self._last_event = now
