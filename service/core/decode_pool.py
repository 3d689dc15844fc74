"""Where untrusted FITS bytes are decoded and preprocessed, off the event loop.

A :class:`DecodePool` owns the decode threads and, with process isolation,
the worker processes of :class:`~service.core.isolation.IsolatedDecoder`.
It knows nothing of HTTP: the API hands it :class:`Upload` records and gets
back one prepared cutout, or the error that stopped the file, per upload.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Literal, TypeVar

from service.contract.cards import InputSpec
from service.core.cpu import lower_current_thread_priority
from service.core.inference import (
    PreparedCutout,
    prepare_band_files_for_input,
    prepare_cutout_for_input,
    prepare_plain_cutout_for_input,
)
from service.core.isolation import IsolatedDecoder
from service.errors import InvalidFitsError, LensServeError
from service.fits.decode import BandFile
from service.fits.raw import FitsLimits

logger = logging.getLogger("lensserve.decode")
ResultT = TypeVar("ResultT")


@dataclass
class Upload:
    """One file received in a request."""

    filename: str
    data: bytes
    content_encoding: str | None = None
    band: str | None = None
    """The band this file holds when it is one of an object's per-band files; None for a
    whole object."""


class DecodePool:
    """Decode threads, and worker processes when ``isolation`` is ``"process"``.

    Parameters
    ----------
    isolation : {"process", "thread"}
        ``process`` decodes in worker processes (plain float cubes stay in the
        threads); ``thread`` decodes everything in this process's threads.
    workers : int
        Decode threads, and worker processes with process isolation (count).
    max_memory_bytes : int
        Address-space limit of each worker process (bytes).
    niceness : int
        Added to the nice value of the threads and workers (see :mod:`service.core.cpu`).
    limits : FitsLimits
        The FITS limits every file is decoded under.
    """

    def __init__(
        self,
        *,
        isolation: Literal["process", "thread"],
        workers: int,
        max_memory_bytes: int,
        niceness: int,
        limits: FitsLimits,
    ) -> None:
        self.isolation = isolation
        self.workers = workers
        self.max_memory_bytes = max_memory_bytes
        self.niceness = niceness
        self.limits = limits
        self.executor: ThreadPoolExecutor | None = None
        self.decoder: IsolatedDecoder | None = None

    def start(self) -> None:
        """Start the worker processes (with process isolation) and the decode threads."""
        if self.isolation == "process":
            self.decoder = IsolatedDecoder(
                workers=self.workers,
                max_memory_bytes=self.max_memory_bytes,
                niceness=self.niceness,
            )
            self.decoder.start()
        self.executor = ThreadPoolExecutor(
            max_workers=self.workers,
            thread_name_prefix="lensserve-decode",
            initializer=lower_current_thread_priority,
            initargs=(self.niceness,),
        )

    async def close(self) -> None:
        """Stop the workers and the threads; decodes still queued are cancelled."""
        if self.decoder is not None:
            await asyncio.to_thread(self.decoder.close)
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def run(self, call: Callable[[], ResultT]) -> ResultT:
        """Run a decode of untrusted bytes in a worker process (or the decode threads)."""
        if self.decoder is not None:
            return await self.decoder.run(call)
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    async def prepare(
        self, uploads: Sequence[Upload], *, spec: InputSpec
    ) -> list[PreparedCutout | LensServeError]:
        """Decode and preprocess a request's files; a file's error takes its place.

        With worker processes, plain float cubes (the survey's usual file, read without
        astropy) are prepared in the decode threads instead: nothing native parses
        them, and they save two pipe crossings. They go in a few groups, one call per
        decode thread rather than per file, so a 64-file request wakes the event loop a few
        times, not 64. The files the plain reader leaves go to the workers one by one.
        """
        outcomes: list[PreparedCutout | LensServeError | None] = [None] * len(uploads)
        if self.decoder is not None:
            outcomes = await self._prepare_plain_groups(uploads, spec=spec)
        rest = [i for i, outcome in enumerate(outcomes) if outcome is None]
        decoded = await asyncio.gather(*(self._prepare_one(uploads[i], spec=spec) for i in rest))
        for i, outcome in zip(rest, decoded, strict=True):
            outcomes[i] = outcome
        return [outcome for outcome in outcomes if outcome is not None]

    async def prepare_bands(
        self, uploads: Sequence[Upload], *, spec: InputSpec
    ) -> PreparedCutout | LensServeError:
        """Decode and preprocess one object sent as one file per band (``Upload.band``)."""
        full = partial(
            prepare_band_files_for_input,
            {
                upload.band or "": BandFile(upload.data, upload.filename, upload.content_encoding)
                for upload in uploads
            },
            filename=band_group_name(uploads),
            spec=spec,
            limits=self.limits,
        )
        try:
            return await self.run(full)
        except LensServeError as exc:
            return exc
        except Exception as exc:  # a file the codec did not foresee must not take the request down
            return _unforeseen_decode_error(band_group_name(uploads), exc)

    async def _prepare_plain_groups(
        self, uploads: Sequence[Upload], *, spec: InputSpec
    ) -> list[PreparedCutout | LensServeError | None]:
        """:func:`_prepare_plain_group` over the decode threads; None where a file is not
        plain."""
        n_groups = max(1, min(len(uploads), self.workers))
        size = -(-len(uploads) // n_groups)  # ceiling division
        loop = asyncio.get_running_loop()
        groups = await asyncio.gather(
            *(
                loop.run_in_executor(
                    self.executor,
                    partial(_prepare_plain_group, uploads[start : start + size], spec, self.limits),
                )
                for start in range(0, len(uploads), size)
            )
        )
        return [outcome for group in groups for outcome in group]

    async def _prepare_one(
        self, upload: Upload, *, spec: InputSpec
    ) -> PreparedCutout | LensServeError:
        """Decode and preprocess one file in a worker process (or a decode thread); errors
        are returned."""
        full = partial(
            prepare_cutout_for_input,
            upload.data,
            filename=upload.filename,
            spec=spec,
            limits=self.limits,
            content_encoding=upload.content_encoding,
        )
        try:
            return await self.run(full)
        except LensServeError as exc:
            return exc
        except Exception as exc:  # a file the codec did not foresee must not take the request down
            return _unforeseen_decode_error(upload.filename, exc)


def _prepare_plain_group(
    uploads: Sequence[Upload], spec: InputSpec, limits: FitsLimits
) -> list[PreparedCutout | LensServeError | None]:
    """Prepare each plain float cube of ``uploads`` in this thread; None for the others."""
    outcomes: list[PreparedCutout | LensServeError | None] = []
    for upload in uploads:
        try:
            outcomes.append(
                prepare_plain_cutout_for_input(
                    upload.data,
                    filename=upload.filename,
                    spec=spec,
                    limits=limits,
                    content_encoding=upload.content_encoding,
                )
            )
        except LensServeError as exc:
            outcomes.append(exc)
        except Exception as exc:  # a file the codec did not foresee must not take the request down
            outcomes.append(_unforeseen_decode_error(upload.filename, exc))
    return outcomes


def band_group_name(uploads: Sequence[Upload]) -> str:
    """The name one object's per-band files are answered under: 'obj_g.fits+obj_r.fits+...'."""
    return "+".join(upload.filename for upload in uploads)


def _unforeseen_decode_error(filename: str, exc: Exception) -> InvalidFitsError:
    """The 400 for a file whose decoding raised what the codec does not raise."""
    logger.error("unexpected failure decoding %r", filename, exc_info=exc)
    error = InvalidFitsError(f"{filename!r} could not be decoded ({type(exc).__name__}: {exc})")
    error.__cause__ = exc
    return error
