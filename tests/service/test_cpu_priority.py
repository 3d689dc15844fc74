"""Decode threads and worker processes run at a lower priority than the server's threads."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.core.cpu import MAX_NICE, current_thread_nice, lower_current_thread_priority
from service.core.isolation import IsolatedDecoder

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values: Linux")


def test_only_the_calling_thread_is_lowered_and_never_past_19():
    base = current_thread_nice()
    with (
        ThreadPoolExecutor(1, initializer=lower_current_thread_priority, initargs=(5,)) as lowered,
        ThreadPoolExecutor(1) as plain,
    ):
        assert lowered.submit(current_thread_nice).result() == min(base + 5, MAX_NICE)
        assert plain.submit(current_thread_nice).result() == base
    assert current_thread_nice() == base
    seen: list[int] = []

    def lower_a_lot() -> None:
        lower_current_thread_priority(100)
        seen.append(current_thread_nice())

    worker = threading.Thread(target=lower_a_lot)
    worker.start()
    worker.join()
    assert seen == [MAX_NICE] and current_thread_nice() == base


def test_zero_niceness_changes_nothing():
    with ThreadPoolExecutor(1, initializer=lower_current_thread_priority, initargs=(0,)) as pool:
        assert pool.submit(current_thread_nice).result() == current_thread_nice()


@pytest.mark.slow
def test_decode_worker_processes_start_lowered():
    async def scenario() -> int:
        decoder = IsolatedDecoder(workers=1, max_memory_bytes=2**31, niceness=7)
        decoder.start()
        try:
            return await decoder.run(os.getpriority, os.PRIO_PROCESS, 0)
        finally:
            decoder.close()

    assert asyncio.run(scenario()) == min(os.getpriority(os.PRIO_PROCESS, 0) + 7, MAX_NICE)
