"""Dynamic batching: requests from concurrent callers merged into one model call.

Like Triton's dynamic batcher (``max_queue_delay_microseconds``) and MLServer's
``mlserver/batching/adaptive.py``: the first request to arrive in an empty
queue waits at most ``max_batch_wait_s`` for others to join it; a batch
leaves as soon as it holds ``max_batch_size`` items' worth of work or the
wait is over. Batches run in worker threads, off the event loop, at most
``max_concurrent_batches`` at a time (Triton's ``instance_group`` count), while
the next batch gathers. When several workers are free, the waiting work is
shared among them (a batch takes at most its share), so a lone request that
arrives in parts keeps every worker busy; under a backlog batches fill up.
The queue is bounded: a request that would push it past ``max_queue_size`` is
refused at once with :class:`~service.errors.OverloadedError`, so a flood turns
into quick 503s instead of unbounded memory and latency. When a batch fails, every request
in it receives the error.

The batcher also measures its service time: a moving average of each batch's run
time per unit of size (:attr:`DynamicBatcher.seconds_per_item`), weighted by the
batch's size so that the full batches of a backlog, the regime in which the
figure is used, dominate it. The API's admission turns it into the expected
wait of a queue (:mod:`service.api.guards`).

The batcher knows nothing of HTTP or of models: it batches opaque items,
each with a size (cutouts), through a synchronous ``run_batch`` function.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Generic, TypeVar

from service.errors import InferenceError, LensServeError, ModelUnavailableError, OverloadedError

logger = logging.getLogger("lensserve.batching")

#: Weight of each unit of a new batch's size in the service-time average (fraction): a
#: batch of 64 cutouts moves it 1 - 0.98**64 = 73% of the way to its own figure, a lone
#: cutout 2%.
SERVICE_TIME_SMOOTHING = 0.02

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class BatchStats:
    """What one batch did, handed to the ``on_batch`` callback after it ran."""

    size: int
    """Total size of the batch's items (cutouts)."""
    requests: int
    """Number of items (requests or request chunks) merged into the batch."""
    queue_times_s: tuple[float, ...]
    """Time each item waited between submission and the start of the batch (seconds)."""
    run_s: float
    """Time ``run_batch`` took (seconds)."""
    failed: bool
    """Whether ``run_batch`` raised."""


@dataclass
class _Pending(Generic[ItemT, ResultT]):
    item: ItemT
    size: int
    future: asyncio.Future[ResultT]
    submitted_at: float = field(default_factory=time.perf_counter)


class DynamicBatcher(Generic[ItemT, ResultT]):
    """Merge items submitted concurrently into batches for one synchronous function.

    Parameters
    ----------
    run_batch : callable
        Takes a list of items and returns one result per item, in order. It
        runs in a worker thread. What it raises is given to every item of the
        batch (wrapped in :class:`~service.errors.InferenceError` unless it is
        already a :class:`~service.errors.LensServeError`).
    max_batch_size : int
        Largest total size of a batch (cutouts). An item larger than this
        runs alone.
    max_batch_wait_s : float
        Longest time the oldest item waits for others before its batch
        leaves (seconds); 0 sends whatever is queued at once.
    max_queue_size : int
        Largest total size of the items waiting (cutouts).
    on_batch : callable, optional
        Called on the event loop with a :class:`BatchStats` after each batch.
    max_concurrent_batches : int
        Batches that may run at once, each in its own worker thread (count);
        ``run_batch`` must then be thread-safe. A batch leaves only when a
        worker is free, so while all are busy the queue keeps gathering.
    """

    def __init__(
        self,
        run_batch: Callable[[list[ItemT]], Sequence[ResultT]],
        *,
        max_batch_size: int,
        max_batch_wait_s: float,
        max_queue_size: int,
        on_batch: Callable[[BatchStats], None] | None = None,
        max_concurrent_batches: int = 1,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_batch_wait_s < 0:
            raise ValueError(
                f"need max_batch_size >= 1, max_queue_size >= 1 and max_batch_wait_s >= 0; got "
                f"{max_batch_size}, {max_queue_size} and {max_batch_wait_s}"
            )
        if max_concurrent_batches < 1:
            raise ValueError(f"need max_concurrent_batches >= 1; got {max_concurrent_batches}")
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._max_batch_wait_s = max_batch_wait_s
        self._max_queue_size = max_queue_size
        self._on_batch = on_batch
        self._max_concurrent_batches = max_concurrent_batches
        self._queue: deque[_Pending[ItemT, ResultT]] = deque()
        self._queued_size = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._free_workers: asyncio.Semaphore | None = None
        self._running_batches: dict[asyncio.Task[None], list[_Pending[ItemT, ResultT]]] = {}
        self._seconds_per_item: float | None = None

    @property
    def queued_size(self) -> int:
        """Total size of the items waiting for a batch (cutouts)."""
        return self._queued_size

    @property
    def seconds_per_item(self) -> float | None:
        """Moving average of ``run_batch``'s time per unit of size, over the batches that
        succeeded, weighted by their size (seconds per cutout); None before the first."""
        return self._seconds_per_item

    def _observe_service_time(self, run_s: float, size: int) -> None:
        per_item_s = run_s / size
        if self._seconds_per_item is None:
            self._seconds_per_item = per_item_s
            return
        weight = 1.0 - (1.0 - SERVICE_TIME_SMOOTHING) ** size
        self._seconds_per_item += weight * (per_item_s - self._seconds_per_item)

    @property
    def running(self) -> bool:
        """Whether :meth:`start` has run and :meth:`stop` has not."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self.running:
            return
        self._wakeup = asyncio.Event()
        self._free_workers = asyncio.Semaphore(self._max_concurrent_batches)
        self._executor = ThreadPoolExecutor(
            max_workers=self._max_concurrent_batches, thread_name_prefix="lensserve-batch"
        )
        self._task = asyncio.create_task(self._loop(), name="lensserve-batcher")

    async def stop(self) -> None:
        """Stop the loop; items still waiting fail with ModelUnavailableError."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        running, self._running_batches = self._running_batches, {}
        for batch_task in running:
            batch_task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        shutting_down = ModelUnavailableError("the service is shutting down")
        for batch in running.values():  # a task cancelled before it started failed nobody
            self._fail_all(batch, shutting_down)
        self._fail_all(list(self._queue), shutting_down)
        self._queue.clear()
        self._queued_size = 0
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def submit(self, item: ItemT, *, size: int = 1) -> ResultT:
        """Queue one item and wait for its result.

        Parameters
        ----------
        item : object
            Passed to ``run_batch`` as part of some batch.
        size : int
            Its share of a batch (cutouts), at least 1.

        Raises
        ------
        OverloadedError
            The queue cannot take ``size`` more.
        ModelUnavailableError
            The batcher is not running.
        """
        (result,) = await self.submit_many([(item, size)])
        return result

    async def submit_many(self, items: Sequence[tuple[ItemT, int]]) -> list[ResultT]:
        """Queue several ``(item, size)`` pairs at once and wait for all their results.

        Either every item is queued or, when the queue cannot take their total
        size, none is and :class:`~service.errors.OverloadedError` is raised.
        If any item fails, its error is raised once all of them are done.
        """
        if not self.running or self._wakeup is None:
            raise ModelUnavailableError("the inference queue is not running")
        total = sum(size for _, size in items)
        if any(size < 1 for _, size in items):
            raise ValueError(f"item sizes must be at least 1; got {[s for _, s in items]}")
        if self._queued_size + total > self._max_queue_size:
            raise OverloadedError(
                f"the inference queue holds {self._queued_size} cutouts and cannot take "
                f"{total} more (at most {self._max_queue_size}); retry later"
            )
        loop = asyncio.get_running_loop()
        pending = [_Pending(item, size, loop.create_future()) for item, size in items]
        self._queue.extend(pending)
        self._queued_size += total
        self._wakeup.set()
        outcomes = await asyncio.gather(*(p.future for p in pending), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return list(outcomes)  # type: ignore[arg-type]

    async def _loop(self) -> None:
        assert self._wakeup is not None and self._free_workers is not None
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._free_workers.acquire()
            await self._wait_for_batch()
            batch = self._take_batch()
            if not batch:  # every queued caller went away
                self._free_workers.release()
                continue
            task = asyncio.create_task(self._run(batch), name="lensserve-batch")
            self._running_batches[task] = batch
            # The semaphore of this start: after a stop and a new start, a late batch
            # must not free a worker of the new loop.
            task.add_done_callback(partial(self._batch_done, self._free_workers))

    def _batch_done(self, free_workers: asyncio.Semaphore, task: asyncio.Task[None]) -> None:
        self._running_batches.pop(task, None)
        free_workers.release()

    async def _wait_for_batch(self) -> None:
        """Sleep until a full batch is queued or the oldest item has waited long enough."""
        assert self._wakeup is not None
        deadline = self._queue[0].submitted_at + self._max_batch_wait_s
        while self._queued_size < self._max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Pending[ItemT, ResultT]]:
        """Pop whole items from the front while they fit in this batch (at least one).

        The batch holds at most ``max_batch_size``, and at most its share of the queue
        when other workers are free too.
        """
        free_workers = self._max_concurrent_batches - len(self._running_batches)
        share = -(-self._queued_size // max(free_workers, 1))  # ceiling division
        limit = min(self._max_batch_size, max(share, 1))
        batch: list[_Pending[ItemT, ResultT]] = []
        size = 0
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # its caller went away (cancelled); drop it
                self._queue.popleft()
                self._queued_size -= head.size
                continue
            if batch and size + head.size > limit:
                break
            self._queue.popleft()
            self._queued_size -= head.size
            batch.append(head)
            size += head.size
        return batch

    async def _run(self, batch: list[_Pending[ItemT, ResultT]]) -> None:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        items = [p.item for p in batch]
        failed = True
        try:
            results = await loop.run_in_executor(self._executor, self._run_batch, items)
            if len(results) != len(batch):
                raise InferenceError(
                    f"the batch function returned {len(results)} results for {len(batch)} items"
                )
        except asyncio.CancelledError:
            self._fail_all(batch, ModelUnavailableError("the service is shutting down"))
            raise
        except LensServeError as exc:
            self._fail_all(batch, exc)
        except Exception as exc:
            logger.exception("a batch of %d items failed", len(batch))
            error = InferenceError(
                f"inference failed on a batch of {sum(p.size for p in batch)} cutouts from "
                f"{len(batch)} requests: {type(exc).__name__}: {exc}"
            )
            error.__cause__ = exc
            self._fail_all(batch, error)
        else:
            failed = False
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)
        run_s = time.perf_counter() - started
        size = sum(p.size for p in batch)
        if not failed:
            self._observe_service_time(run_s, size)
        if self._on_batch is not None:
            stats = BatchStats(
                size=size,
                requests=len(batch),
                queue_times_s=tuple(started - p.submitted_at for p in batch),
                run_s=run_s,
                failed=failed,
            )
            try:
                self._on_batch(stats)
            except Exception:  # a broken metrics hook must not stop the batching loop
                logger.exception("the on_batch callback failed")

    @staticmethod
    def _fail_all(batch: list[_Pending[ItemT, ResultT]], error: BaseException) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(error)
