"""The dynamic batcher, through its public interface only, with fake batch functions."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest

from service.core.batching import BatchStats, DynamicBatcher
from service.errors import InferenceError, ModelUnavailableError, OverloadedError


def run(coroutine_function: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run one async test body on a fresh event loop."""
    return asyncio.run(coroutine_function())


class Recorder:
    """A batch function that doubles numbers and remembers the batches it saw."""

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        return [2 * item for item in items]


def test_concurrent_requests_are_merged_and_each_gets_its_own_result():
    recorder = Recorder()
    stats: list[BatchStats] = []

    async def body() -> list[int]:
        batcher = DynamicBatcher(
            recorder,
            max_batch_size=64,
            max_batch_wait_s=0.05,
            max_queue_size=1000,
            on_batch=stats.append,
        )
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(i) for i in range(20)))
        finally:
            await batcher.stop()

    results = run(body)
    assert results == [2 * i for i in range(20)]
    # All 20 arrived within the 50 ms wait, so they shared one model call.
    assert len(recorder.batches) == 1 and sorted(recorder.batches[0]) == list(range(20))
    assert stats[0].size == 20 and stats[0].requests == 20 and not stats[0].failed
    assert len(stats[0].queue_times_s) == 20
    # The batch function ran in the worker thread, not on the event loop.
    assert recorder.threads and all(name.startswith("lensserve-batch") for name in recorder.threads)


def test_batches_respect_max_batch_size_in_item_sizes():
    recorder = Recorder()

    async def body() -> list[int]:
        batcher = DynamicBatcher(
            recorder, max_batch_size=10, max_batch_wait_s=0.05, max_queue_size=1000
        )
        await batcher.start()
        try:
            # Sizes 4 + 4 fit in 10, the third (4) does not; the 30-cutout item runs alone.
            return await asyncio.gather(
                batcher.submit(1, size=4),
                batcher.submit(2, size=4),
                batcher.submit(3, size=4),
                batcher.submit(4, size=30),
            )
        finally:
            await batcher.stop()

    assert run(body) == [2, 4, 6, 8]
    assert recorder.batches == [[1, 2], [3], [4]]


def test_a_failing_batch_fails_every_request_in_it_with_a_clear_error():
    def explode(items: list[int]) -> list[int]:
        raise RuntimeError("GPU fell off the bus")

    async def body() -> list[Any]:
        batcher = DynamicBatcher(
            explode, max_batch_size=64, max_batch_wait_s=0.05, max_queue_size=100
        )
        await batcher.start()
        try:
            return await asyncio.gather(
                *(batcher.submit(i) for i in range(5)), return_exceptions=True
            )
        finally:
            await batcher.stop()

    outcomes = run(body)
    assert len(outcomes) == 5
    for outcome in outcomes:
        assert isinstance(outcome, InferenceError)
        assert "GPU fell off the bus" in str(outcome) and "5 requests" in str(outcome)
        assert isinstance(outcome.__cause__, RuntimeError)


def test_a_service_error_from_the_batch_reaches_every_request_unchanged():
    def refuse(items: list[int]) -> list[int]:
        raise ModelUnavailableError("models unloaded")

    async def body() -> list[Any]:
        batcher = DynamicBatcher(refuse, max_batch_size=8, max_batch_wait_s=0.02, max_queue_size=8)
        await batcher.start()
        try:
            return await asyncio.gather(
                *(batcher.submit(i) for i in range(3)), return_exceptions=True
            )
        finally:
            await batcher.stop()

    outcomes = run(body)
    assert all(isinstance(o, ModelUnavailableError) for o in outcomes)


def test_wrong_number_of_results_fails_the_batch():
    async def body() -> list[Any]:
        batcher = DynamicBatcher(
            lambda items: items[:-1], max_batch_size=8, max_batch_wait_s=0.02, max_queue_size=8
        )
        await batcher.start()
        try:
            return await asyncio.gather(
                *(batcher.submit(i) for i in range(3)), return_exceptions=True
            )
        finally:
            await batcher.stop()

    outcomes = run(body)
    assert all(isinstance(o, InferenceError) and "2 results for 3" in str(o) for o in outcomes)


def test_the_batcher_keeps_working_after_a_failed_batch():
    calls = []

    def flaky(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("transient")
        return items

    async def body() -> tuple[Any, Any]:
        batcher = DynamicBatcher(flaky, max_batch_size=8, max_batch_wait_s=0.0, max_queue_size=8)
        await batcher.start()
        try:
            first = await asyncio.gather(batcher.submit(1), return_exceptions=True)
            second = await batcher.submit(2)
            return first[0], second
        finally:
            await batcher.stop()

    first, second = run(body)
    assert isinstance(first, InferenceError) and second == 2


@pytest.mark.parametrize("max_batch_wait_s", [0.0, 0.02, 0.1])
def test_a_lone_request_waits_no_longer_than_max_batch_wait(max_batch_wait_s):
    recorder = Recorder()
    stats: list[BatchStats] = []

    async def body() -> float:
        batcher = DynamicBatcher(
            recorder,
            max_batch_size=64,
            max_batch_wait_s=max_batch_wait_s,
            max_queue_size=100,
            on_batch=stats.append,
        )
        await batcher.start()
        try:
            started = time.perf_counter()
            await batcher.submit(7)
            return time.perf_counter() - started
        finally:
            await batcher.stop()

    elapsed = run(body)
    (batch,) = stats
    # It waited for company for max_batch_wait_s, then left alone; 50 ms of slack covers
    # thread hand-off and a busy test machine.
    assert max_batch_wait_s <= batch.queue_times_s[0] + 1e-3
    assert batch.queue_times_s[0] <= max_batch_wait_s + 0.05
    assert elapsed <= max_batch_wait_s + 0.1


def test_a_full_batch_leaves_without_waiting_for_the_timer():
    recorder = Recorder()
    stats: list[BatchStats] = []

    async def body() -> None:
        # A 10-second wait that must not be waited: 8 items fill the batch at once.
        batcher = DynamicBatcher(
            recorder,
            max_batch_size=8,
            max_batch_wait_s=10.0,
            max_queue_size=100,
            on_batch=stats.append,
        )
        await batcher.start()
        try:
            await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(8))), 2.0)
        finally:
            await batcher.stop()

    run(body)
    assert stats[0].size == 8 and max(stats[0].queue_times_s) < 1.0


def test_a_full_queue_refuses_new_requests_with_overloaded():
    release = threading.Event()

    def slow(items: list[int]) -> list[int]:
        release.wait(5.0)
        return items

    async def body() -> tuple[list[int], BaseException | None, int]:
        batcher = DynamicBatcher(slow, max_batch_size=4, max_batch_wait_s=0.0, max_queue_size=6)
        await batcher.start()
        try:
            running = asyncio.ensure_future(batcher.submit(0, size=4))
            await asyncio.sleep(0.05)  # the first batch is now running and holds the worker
            waiting = asyncio.ensure_future(batcher.submit(1, size=5))
            await asyncio.sleep(0.01)
            queued = batcher.queued_size
            refused = None
            try:
                await batcher.submit(2, size=2)  # 5 + 2 > 6
            except OverloadedError as exc:
                refused = exc
            release.set()
            return list(await asyncio.gather(running, waiting)), refused, queued
        finally:
            release.set()
            await batcher.stop()

    results, refused, queued = run(body)
    assert results == [0, 1]
    assert queued == 5
    assert isinstance(refused, OverloadedError) and "at most 6" in str(refused)


def test_submit_many_is_all_or_nothing():
    recorder = Recorder()

    async def body() -> tuple[BaseException | None, list[int], int]:
        batcher = DynamicBatcher(recorder, max_batch_size=4, max_batch_wait_s=0.0, max_queue_size=6)
        await batcher.start()
        try:
            refused = None
            try:
                await batcher.submit_many([(1, 4), (2, 4)])
            except OverloadedError as exc:
                refused = exc
            size_after = batcher.queued_size
            return refused, await batcher.submit_many([(3, 4), (4, 2)]), size_after
        finally:
            await batcher.stop()

    refused, results, size_after = run(body)
    assert isinstance(refused, OverloadedError) and size_after == 0
    assert results == [6, 8]
    assert [1] not in recorder.batches


def test_a_cancelled_request_is_dropped_and_the_others_answered():
    release = threading.Event()
    recorder = Recorder()

    def gated(items: list[int]) -> list[int]:
        release.wait(5.0)
        return recorder(items)

    async def body() -> list[int]:
        batcher = DynamicBatcher(gated, max_batch_size=1, max_batch_wait_s=0.0, max_queue_size=10)
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(1))
            await asyncio.sleep(0.05)
            doomed = asyncio.ensure_future(batcher.submit(2))
            kept = asyncio.ensure_future(batcher.submit(3))
            await asyncio.sleep(0.01)
            doomed.cancel()  # e.g. the HTTP client went away
            release.set()
            return [await first, await kept]
        finally:
            release.set()
            await batcher.stop()

    assert run(body) == [2, 6]
    assert [2] not in recorder.batches


def test_submit_before_start_and_after_stop_is_refused():
    async def body() -> tuple[BaseException, BaseException]:
        batcher = DynamicBatcher(
            Recorder(), max_batch_size=4, max_batch_wait_s=0.0, max_queue_size=4
        )
        with pytest.raises(ModelUnavailableError) as before:
            await batcher.submit(1)
        await batcher.start()
        await batcher.stop()
        with pytest.raises(ModelUnavailableError) as after:
            await batcher.submit(1)
        return before.value, after.value

    run(body)


def test_stop_fails_waiting_requests():
    release = threading.Event()

    def slow(items: list[int]) -> list[int]:
        release.wait(5.0)
        return items

    async def body() -> list[Any]:
        batcher = DynamicBatcher(slow, max_batch_size=1, max_batch_wait_s=0.0, max_queue_size=10)
        await batcher.start()
        futures = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
        await asyncio.sleep(0.05)
        await batcher.stop()
        release.set()
        return await asyncio.gather(*futures, return_exceptions=True)

    outcomes = run(body)
    assert all(isinstance(o, ModelUnavailableError) for o in outcomes)


@asynccontextmanager
async def running(batcher: DynamicBatcher) -> AsyncIterator[DynamicBatcher]:
    """The batcher, started for the block and stopped after it."""
    await batcher.start()
    try:
        yield batcher
    finally:
        await batcher.stop()


class Overlap:
    """A batch function that records how many batches were running at once (at most)."""

    def __init__(self, *, hold_s: float) -> None:
        self.hold_s = hold_s
        self.running = 0
        self.most_at_once = 0
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, items: list[int]) -> list[int]:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.threads.add(threading.current_thread().name)
        time.sleep(self.hold_s)
        with self._lock:
            self.running -= 1
        return [2 * item for item in items]


@pytest.mark.parametrize("instances", [1, 2, 3])
def test_at_most_max_concurrent_batches_run_at_once_and_each_request_gets_its_own_result(
    instances,
):
    overlap = Overlap(hold_s=0.05)

    async def body() -> list[int]:
        batcher = DynamicBatcher(
            overlap,
            max_batch_size=2,
            max_batch_wait_s=0.0,
            max_queue_size=100,
            max_concurrent_batches=instances,
        )
        async with running(batcher):
            return await asyncio.gather(*(batcher.submit(i) for i in range(12)))

    assert run(body) == [2 * i for i in range(12)]
    # Six batches of two, each held 50 ms: every worker is used, never more than that.
    assert overlap.most_at_once == instances
    assert len(overlap.threads) == instances


@pytest.mark.parametrize("instances, expected", [(1, [[0, 1, 2, 3]]), (2, [[0, 1], [2, 3]])])
def test_idle_workers_share_the_queue_and_a_lone_worker_takes_it_whole(instances, expected):
    recorder = Recorder(delay_s=0.05)

    async def body() -> list[int]:
        batcher = DynamicBatcher(
            recorder,
            max_batch_size=64,
            max_batch_wait_s=0.01,
            max_queue_size=100,
            max_concurrent_batches=instances,
        )
        async with running(batcher):
            return await batcher.submit_many([(i, 3) for i in range(4)])

    assert run(body) == [0, 2, 4, 6]
    # Four items of 3 fit one batch of 64; two idle workers take half each instead.
    assert sorted(recorder.batches) == expected


def test_stop_fails_the_requests_of_every_running_batch():
    release = threading.Event()

    def blocked(items: list[int]) -> list[int]:
        release.wait(5.0)
        return items

    async def body() -> list[Any]:
        batcher = DynamicBatcher(
            blocked,
            max_batch_size=1,
            max_batch_wait_s=0.0,
            max_queue_size=10,
            max_concurrent_batches=2,
        )
        await batcher.start()
        futures = [asyncio.ensure_future(batcher.submit(i)) for i in range(4)]
        await asyncio.sleep(0.05)  # two batches running, two items queued
        await batcher.stop()
        release.set()
        return await asyncio.gather(*futures, return_exceptions=True)

    outcomes = run(body)
    assert all(isinstance(o, ModelUnavailableError) for o in outcomes), outcomes


def test_a_failing_batch_fails_only_its_own_requests_while_another_runs():
    def fail_odd(items: list[int]) -> list[int]:
        time.sleep(0.02)
        if items[0] % 2:
            raise RuntimeError(f"bad batch {items}")
        return items

    async def body() -> list[Any]:
        batcher = DynamicBatcher(
            fail_odd,
            max_batch_size=1,
            max_batch_wait_s=0.0,
            max_queue_size=10,
            max_concurrent_batches=2,
        )
        async with running(batcher):
            return await asyncio.gather(
                *(batcher.submit(i) for i in range(6)), return_exceptions=True
            )

    outcomes = run(body)
    assert outcomes[0::2] == [0, 2, 4]
    assert all(isinstance(o, InferenceError) and "bad batch" in str(o) for o in outcomes[1::2])


def test_nonsense_configuration_is_rejected():
    with pytest.raises(ValueError):
        DynamicBatcher(Recorder(), max_batch_size=0, max_batch_wait_s=0.0, max_queue_size=1)
    with pytest.raises(ValueError):
        DynamicBatcher(Recorder(), max_batch_size=1, max_batch_wait_s=-1.0, max_queue_size=1)
    with pytest.raises(ValueError):
        DynamicBatcher(
            Recorder(),
            max_batch_size=1,
            max_batch_wait_s=0.0,
            max_queue_size=1,
            max_concurrent_batches=0,
        )


class PerItemSleep:
    """A batch function whose run time is a set time per unit of size: a known service
    time. Each item is its own size."""

    def __init__(self, seconds_per_item: float) -> None:
        self.seconds_per_item = seconds_per_item

    def __call__(self, items: list[int]) -> list[int]:
        time.sleep(self.seconds_per_item * sum(items))
        return list(items)


def test_the_service_time_per_item_is_measured_from_the_batches_that_ran():
    service = PerItemSleep(0.01)

    async def body() -> tuple[float | None, float | None]:
        batcher = DynamicBatcher(
            service, max_batch_size=8, max_batch_wait_s=0.05, max_queue_size=64
        )
        before = batcher.seconds_per_item
        async with running(batcher):
            await asyncio.gather(*(batcher.submit(1) for _ in range(8)))
            await asyncio.gather(*(batcher.submit(4, size=4) for _ in range(2)))
            return before, batcher.seconds_per_item

    before, measured = run(body)
    assert before is None
    # Two batches of 8 at 10 ms per item: time.sleep never returns early, and a busy
    # machine may add a few milliseconds per batch (80 ms each).
    assert measured is not None
    assert 0.01 <= measured < 0.02


def test_a_failed_batch_does_not_move_the_service_time():
    calls = 0

    def slow_then_failing(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            time.sleep(0.01 * len(items))
            return list(items)
        time.sleep(0.5)
        raise RuntimeError("the model broke")

    async def body() -> tuple[float | None, float | None]:
        batcher = DynamicBatcher(
            slow_then_failing, max_batch_size=4, max_batch_wait_s=0.0, max_queue_size=64
        )
        async with running(batcher):
            await batcher.submit(0, size=4)
            measured = batcher.seconds_per_item
            with pytest.raises(InferenceError):
                await batcher.submit(1, size=4)
            return measured, batcher.seconds_per_item

    measured, after = run(body)
    assert measured is not None and after == measured
