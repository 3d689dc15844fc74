"""Decoding in worker processes: a worker that dies costs its own task, not the server.

The tasks are standard-library functions (picklable by name): ``os.abort``
kills its worker with SIGABRT the way a heap overflow in native code would;
``pow`` is an innocent task running beside it.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from service.core.isolation import IsolatedDecoder
from service.errors import InvalidFitsError

GiB = 2**30


async def _with_decoder(test, **options):  # type: ignore[no-untyped-def]
    decoder = IsolatedDecoder(**{"workers": 2, "max_memory_bytes": 2 * GiB, **options})
    decoder.start()
    try:
        return await test(decoder)
    finally:
        decoder.close()


@pytest.mark.slow
def test_a_task_that_kills_its_worker_fails_alone_and_the_others_are_answered():
    async def scenario(decoder: IsolatedDecoder) -> None:
        innocents = [decoder.run(pow, 2, n) for n in range(8)]
        outcomes = await asyncio.gather(decoder.run(os.abort), *innocents, return_exceptions=True)
        assert isinstance(outcomes[0], InvalidFitsError)
        assert "crashed the decoder process" in str(outcomes[0])
        assert outcomes[1:] == [2**n for n in range(8)]
        # Once in the shared pool, once alone in quarantine.
        assert decoder.crashes == 2
        assert await decoder.run(pow, 3, 3) == 27

    asyncio.run(_with_decoder(scenario))


@pytest.mark.slow
def test_a_worker_cannot_allocate_past_its_address_space_limit():
    async def scenario(decoder: IsolatedDecoder) -> None:
        with pytest.raises(MemoryError):
            await decoder.run(bytearray, 2 * GiB)
        assert await decoder.run(pow, 2, 2) == 4
        assert decoder.crashes == 0

    asyncio.run(_with_decoder(scenario, max_memory_bytes=1 * GiB))


def test_bad_pool_sizes_are_refused():
    with pytest.raises(ValueError):
        IsolatedDecoder(workers=0, max_memory_bytes=GiB)
