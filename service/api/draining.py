"""Graceful shutdown on SIGTERM: report not-ready first, then let the server drain.

Orchestrators send SIGTERM and keep routing requests to the process until
they see it is not ready. :func:`drain_on_sigterm` wraps the SIGTERM handler
the server installed (uvicorn's): on the signal it calls ``on_drain`` at once
(the app answers ``/health/ready`` with 503 but still serves requests), and
hands the signal on to the server's handler ``grace_s`` later; uvicorn then
closes the port, waits for the requests in flight and runs the app's shutdown.
A second SIGTERM goes straight to the server's handler.

It does nothing off the main thread (an app served by a test client in a
thread) or when no Python handler is installed (nothing to hand over to).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

logger = logging.getLogger("lensserve.draining")

_Handler = Callable[[int, FrameType | None], object]


def drain_on_sigterm(
    loop: asyncio.AbstractEventLoop, *, on_drain: Callable[[], None], grace_s: float
) -> Callable[[], None]:
    """Install the SIGTERM wrapper; returns a function that puts the previous handler back.

    Parameters
    ----------
    loop : asyncio.AbstractEventLoop
        The loop the server runs on; ``on_drain`` and the hand-over run on it.
    on_drain : callable
        Called once on the loop when the first SIGTERM arrives.
    grace_s : float
        Time between ``on_drain`` and handing the signal to the server (seconds).
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return lambda: None
    server_handler: _Handler = previous
    draining = False

    def hand_over(signum: int, frame: FrameType | None) -> None:
        logger.info("grace period over; closing the port and draining requests in flight")
        server_handler(signum, frame)

    def handle_sigterm(signum: int, frame: FrameType | None) -> None:
        nonlocal draining
        if draining:
            server_handler(signum, frame)
            return
        draining = True
        # A signal handler may interrupt the loop anywhere: schedule, don't act here.
        loop.call_soon_threadsafe(on_drain)
        loop.call_soon_threadsafe(loop.call_later, grace_s, hand_over, signum, frame)

    signal.signal(signal.SIGTERM, handle_sigterm)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is handle_sigterm:
            signal.signal(signal.SIGTERM, previous)

    return restore
