"""Decode untrusted FITS files in worker processes: a crash in native code costs one file.

astropy reads tile-compressed images and WCS headers with C code (its
cfitsio-derived codecs, wcslib) that has had heap overflows on crafted input
(cfitsio#131, astropy#20349). In a thread, such a crash would take the whole
server down; in a worker process it only breaks that process.

:class:`IsolatedDecoder` runs a picklable function in a pool of worker
processes started from a clean fork server, each under an address-space
limit (``RLIMIT_AS``). When a worker dies, every task then running in that
pool fails with ``BrokenProcessPool``: the pool is replaced, and each of
those tasks is run again alone in a one-worker quarantine pool. A task that
kills the quarantine worker too is the culprit and gets
:class:`~service.errors.InvalidFitsError`; the others get their answer.

The module knows nothing of HTTP or of models.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import resource
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from service.core.cpu import lower_current_thread_priority
from service.errors import InvalidFitsError

logger = logging.getLogger("lensserve.isolation")

ResultT = TypeVar("ResultT")

#: Imported once in the fork server, so new workers start in milliseconds.
_PRELOAD = ["service.fits.decode", "service.contract.preprocessing", "service.core.inference"]


def _limit_worker(max_memory_bytes: int, niceness: int) -> None:
    """Worker initialiser: cap the address space, so a runaway decode is a MemoryError,
    and lower the priority by ``niceness``."""
    resource.setrlimit(resource.RLIMIT_AS, (max_memory_bytes, max_memory_bytes))
    lower_current_thread_priority(niceness)


class IsolatedDecoder:
    """A process pool for untrusted decoding that survives its workers dying.

    Parameters
    ----------
    workers : int
        Worker processes (count).
    max_memory_bytes : int
        Address-space limit of each worker (bytes).
    niceness : int
        Added to each worker's nice value (see :mod:`service.core.cpu`).
    """

    def __init__(self, *, workers: int, max_memory_bytes: int, niceness: int = 0) -> None:
        if workers < 1 or max_memory_bytes < 1:
            raise ValueError(
                f"need workers >= 1 and max_memory_bytes >= 1; got {workers}, {max_memory_bytes}"
            )
        self._workers = workers
        self._max_memory_bytes = max_memory_bytes
        self._niceness = niceness
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(_PRELOAD)
        self._pool: ProcessPoolExecutor | None = None
        self._quarantine: ProcessPoolExecutor | None = None
        self._quarantine_lock = asyncio.Lock()
        self.crashes = 0
        """Worker processes that died so far (count)."""

    def _new_pool(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=workers,
            mp_context=self._context,
            initializer=_limit_worker,
            initargs=(self._max_memory_bytes, self._niceness),
        )

    def start(self) -> None:
        """Create the pools; workers start on first use."""
        self._pool = self._new_pool(self._workers)
        self._quarantine = self._new_pool(1)

    def close(self) -> None:
        """Cancel queued tasks and stop the workers (blocking: run it off the event loop)."""
        for pool in (self._pool, self._quarantine):
            if pool is not None:
                # Joining the workers lets the pool release its semaphores before exit.
                pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._quarantine = None

    async def run(self, function: Callable[..., ResultT], *args: Any) -> ResultT:
        """``function(*args)`` in a worker; what it raises is raised here.

        Raises
        ------
        InvalidFitsError
            The task killed a worker twice, the second time alone.
        """
        pool = self._pool
        if pool is None:
            raise RuntimeError("IsolatedDecoder.start() has not run")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(pool, function, *args)
        except BrokenProcessPool:
            self._replace_pool(pool)
        return await self._run_alone(function, *args)

    def _replace_pool(self, broken: ProcessPoolExecutor) -> None:
        """Swap in a fresh pool, once, however many tasks saw ``broken`` break."""
        if self._pool is broken:
            self.crashes += 1
            logger.error("a decoder worker died; replacing the pool and retrying its tasks alone")
            broken.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool(self._workers)

    async def _run_alone(self, function: Callable[..., ResultT], *args: Any) -> ResultT:
        async with self._quarantine_lock:
            quarantine = self._quarantine
            if quarantine is None:
                raise RuntimeError("IsolatedDecoder is closed")
            try:
                return await asyncio.get_running_loop().run_in_executor(quarantine, function, *args)
            except BrokenProcessPool as exc:
                self.crashes += 1
                quarantine.shutdown(wait=False, cancel_futures=True)
                self._quarantine = self._new_pool(1)
                raise InvalidFitsError(
                    "decoding this file crashed the decoder process (twice, the second time "
                    "alone); it is refused, and the service goes on"
                ) from exc
