"""Admission by work: the expected wait of the admitted cutouts against the deadline.

The service time comes from a real :class:`~service.core.batching.DynamicBatcher`
whose batch function sleeps a set time per cutout, so the wait each decision sees
is known to within the machine's scheduling noise. The app-level test, through a
real server with the ONNX models, is in ``test_reliability_faults.py``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import pytest

from service.api.guards import (
    BODY_BYTES,
    QUEUE_WAIT,
    REQUESTS,
    Admission,
    AdmissionTicket,
    Refusal,
    RefusalAccessLogFilter,
    content_length,
)
from service.core.batching import DynamicBatcher

#: The service time per cutout the batch function below takes (seconds).
SECONDS_PER_CUTOUT = 0.02
#: Body of one single-cutout request: a FITS file of a g, r, i 64x64 float32 cube (54,720
#: bytes, the size of the sample cutouts) and some multipart framing (bytes).
ONE_CUTOUT_BODY = 54_720 + 200
MiB = 1024 * 1024


def sleep_per_cutout(items: list[int]) -> list[int]:
    """A batch function; each item is its own number of cutouts."""
    time.sleep(SECONDS_PER_CUTOUT * sum(items))
    return list(items)


def measured_batcher_time() -> float:
    """Run one batch of 8 cutouts through a real batcher; its measured time per cutout."""

    async def body() -> float | None:
        batcher = DynamicBatcher(
            sleep_per_cutout, max_batch_size=8, max_batch_wait_s=0.0, max_queue_size=64
        )
        await batcher.start()
        try:
            await batcher.submit(8, size=8)
        finally:
            await batcher.stop()
        return batcher.seconds_per_item

    measured = asyncio.run(body())
    assert measured is not None
    return measured


def make_admission(seconds_per_cutout: float | None, **overrides: object) -> Admission:
    options: dict[str, object] = {
        "max_queue_wait_s": 0.5,
        "seconds_per_cutout": lambda: seconds_per_cutout,
        "max_body_bytes_in_flight": 256 * MiB,
        "unknown_body_bytes": 32 * MiB,
        "max_requests": 1024,
        "retry_after_s": 7,
    }
    options.update(overrides)
    return Admission(**options)  # type: ignore[arg-type]


def admitted(outcome: AdmissionTicket | Refusal) -> AdmissionTicket:
    assert isinstance(outcome, AdmissionTicket), outcome
    return outcome


def test_a_short_queue_is_admitted_and_one_past_the_deadline_refused_with_its_wait():
    per_cutout_s = measured_batcher_time()
    # time.sleep never returns early; a busy machine adds a little to an 160 ms batch.
    assert SECONDS_PER_CUTOUT <= per_cutout_s < 1.5 * SECONDS_PER_CUTOUT
    admission = make_admission(per_cutout_s)
    # Five single-cutout requests: about 0.1 s of work, under the 0.5 s deadline.
    short = [admitted(admission.admit(ONE_CUTOUT_BODY)) for _ in range(5)]
    assert admission.cutouts == 5
    assert admission.expected_wait_s() == pytest.approx(5 * per_cutout_s)
    # A 30-file request is still admitted (0.1 s ahead of it) and is estimated from its
    # Content-Length: 30 cutouts.
    large = admitted(admission.admit(30 * ONE_CUTOUT_BODY))
    assert large.cutouts == 30
    # Now 35 cutouts, about 0.7 s, are ahead: a request of any size is refused, before its
    # body is read, with a Retry-After of that wait rounded up.
    wait_s = admission.expected_wait_s()
    assert wait_s >= 0.5
    refusal = admission.admit(ONE_CUTOUT_BODY)
    assert isinstance(refusal, Refusal) and refusal.reason == QUEUE_WAIT
    assert refusal.retry_after_s == max(1, math.ceil(wait_s))
    assert "waiting more than 0.5 s" in str(refusal.error)
    assert admission.refused[QUEUE_WAIT] == 1
    assert admission.active == 6
    # Its body held two (compressed) files, not thirty: corrected, the queue is short again.
    large.correct(2)
    assert admission.cutouts == 7
    admitted(admission.admit(ONE_CUTOUT_BODY)).release()
    # Answered requests give back what they held, once.
    for ticket in [*short, large]:
        ticket.release()
        ticket.release()
    assert (admission.active, admission.cutouts, admission.body_bytes) == (0, 0, 0)


def test_an_empty_server_admits_any_request_and_an_unmeasured_one_counts_no_wait():
    slow = make_admission(10.0)  # 10 s per cutout: one cutout ahead is past any deadline
    ticket = admitted(slow.admit(256 * ONE_CUTOUT_BODY))
    assert isinstance(slow.admit(ONE_CUTOUT_BODY), Refusal)
    ticket.release()
    admitted(slow.admit(ONE_CUTOUT_BODY))
    unmeasured = make_admission(None)
    for _ in range(10):
        admitted(unmeasured.admit(256 * ONE_CUTOUT_BODY))
    assert unmeasured.expected_wait_s() == 0.0


def test_bodies_count_by_content_length_or_as_the_largest_without_one():
    admission = make_admission(
        None, max_body_bytes_in_flight=3 * MiB, unknown_body_bytes=2 * MiB, max_requests=100
    )
    chunked = admitted(admission.admit(None))
    assert (chunked.cutouts, chunked.body_bytes) == (1, 2 * MiB)
    # 2 MiB + 1 MiB fit; one byte more does not.
    one_mib = admitted(admission.admit(MiB))
    refusal = admission.admit(1)
    assert isinstance(refusal, Refusal) and refusal.reason == BODY_BYTES
    assert refusal.retry_after_s == 7
    one_mib.release()
    chunked.release()
    # A declared length over the largest body counts as the largest: the route stops there.
    huge = admitted(admission.admit(10 * MiB))
    assert huge.body_bytes == 2 * MiB
    admitted(admission.admit(MiB)).release()
    assert isinstance(admission.admit(MiB + 1), Refusal)


def test_the_request_count_limit_still_works_and_refusals_are_reused():
    reasons: list[str] = []
    admission = make_admission(None, max_requests=2, on_refusal=reasons.append)
    tickets = [admitted(admission.admit(ONE_CUTOUT_BODY)) for _ in range(2)]
    first = admission.admit(ONE_CUTOUT_BODY)
    second = admission.admit(ONE_CUTOUT_BODY)
    assert isinstance(first, Refusal) and first.reason == REQUESTS
    assert "2 requests are being handled, the most at once" in str(first.error)
    # One object per reason: its answer is rendered once and replayed.
    assert second is first
    assert reasons == [REQUESTS, REQUESTS]
    tickets[0].release()
    admitted(admission.admit(ONE_CUTOUT_BODY))


def test_refusals_are_summed_up_in_at_most_one_log_line_per_interval(caplog):
    admission = make_admission(None, max_requests=1)
    admitted(admission.admit(ONE_CUTOUT_BODY))
    with caplog.at_level(logging.WARNING, logger="lensserve.admission"):
        for _ in range(1000):
            assert isinstance(admission.admit(ONE_CUTOUT_BODY), Refusal)
    lines = [r for r in caplog.records if r.name == "lensserve.admission"]
    assert len(lines) == 1
    assert "refused 1 requests" in lines[0].getMessage()
    assert admission.refused[REQUESTS] == 1000


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"content-length", b"1234")], 1234),
        ([(b"host", b"x")], None),
        ([(b"content-length", b"twelve")], None),
        ([(b"content-length", b"-5")], None),
    ],
)
def test_content_length_is_read_from_the_headers(headers, expected):
    assert content_length(headers) == expected


def test_the_access_log_drops_only_refused_posts_under_the_guarded_prefixes():
    drop = RefusalAccessLogFilter()

    def record(method: str, path: str, status: int) -> logging.LogRecord:
        # The shape of uvicorn's access record: client, method, path, HTTP version, status.
        return logging.LogRecord(
            "uvicorn.access",
            logging.INFO,
            __file__,
            1,
            '%s - "%s %s HTTP/%s" %d',
            ("127.0.0.1:5000", method, path, "1.1", status),
            None,
        )

    assert not drop.filter(record("POST", "/v1/predict?samples=16", 503))
    assert not drop.filter(record("POST", "/v2/models/lens_classifier/infer", 503))
    assert drop.filter(record("POST", "/v1/predict", 200))
    assert drop.filter(record("GET", "/health/ready", 503))
    assert drop.filter(record("POST", "/v10/predict", 503))


def test_once_a_window_of_work_is_measured_the_pipeline_time_replaces_the_engines():
    engine_s = 0.001  # the batcher's time alone: what decoding and answering leave out
    admission = make_admission(engine_s)
    assert admission.seconds_per_cutout() == engine_s
    # A request whose body is read (4 files) takes 0.6 s of wall time.
    working = admitted(admission.admit(4 * ONE_CUTOUT_BODY))
    working.correct(4)
    time.sleep(0.6)
    working.release()
    measured = admission.seconds_per_cutout()
    assert measured is not None
    # time.sleep never returns early; a busy machine adds a little.
    assert 0.6 / 4 <= measured < 1.0 / 4
    # Its estimate now governs admission: 4 cutouts ahead are past the 0.5 s deadline.
    ahead = admitted(admission.admit(4 * ONE_CUTOUT_BODY))
    assert isinstance(admission.admit(ONE_CUTOUT_BODY), Refusal)
    # A request that never had its body read (refused by its route, say) is not timed.
    ahead.release()
    assert admission.seconds_per_cutout() == measured
