"""Faults and overload on a real uvicorn server: failing inference, gone clients, deadlines.

Each server runs the app in a thread of this process, built by the public
factory ``create_app(settings, runtime=...)`` around the shipped ONNX models;
the runtime only adds a gate (to hold a batch) and a one-shot failure that is
a real onnxruntime error (a real session fed a wrong-shaped tensor). Waiting
is done by polling the server's own metrics, never by sleeping a fixed time.
"""

from __future__ import annotations

import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import uvicorn

from service.api.app import create_app
from service.contract.cards import CLASSIFIER_NAME
from service.core.runtime import OnnxModelRuntime, RawPredictions
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "examples" / "cutouts"
CLEAN = sorted((SAMPLES / "clean").glob("*.fits"))
FITS_MEDIA = {"content-type": "application/fits"}
WAIT_LIMIT_S = 60.0

pytestmark = pytest.mark.skipif(not CLEAN, reason=f"no sample cutouts in {SAMPLES}")


class FaultyRuntime(OnnxModelRuntime):
    """The shipped models, with a gate that holds batches and a one-shot onnxruntime failure."""

    def __init__(self) -> None:
        super().__init__(REPO / "models", device="cpu", warmup_batch_sizes=())
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = threading.Event()
        self.batch_sizes: list[int] = []
        self.failed_batch_sizes: list[int] = []

    def predict(
        self, images: np.ndarray, *, num_samples: int, seed: int | None = None
    ) -> RawPredictions:
        # Armed before the batch arrives, so a batch already held at the gate runs normally.
        fail = self.fail_next.is_set()
        self.fail_next.clear()
        self.batch_sizes.append(len(images))
        if not self.gate.wait(WAIT_LIMIT_S):
            raise TimeoutError("the test never opened the gate")
        if fail:
            self.failed_batch_sizes.append(len(images))
            self._raise_onnxruntime_error(images)
        return super().predict(images, num_samples=num_samples, seed=seed)

    def _raise_onnxruntime_error(self, images: np.ndarray) -> None:
        """Make onnxruntime itself fail: the classifier fed images with one band missing."""
        session = ort.InferenceSession(self.models.onnx_bytes[CLASSIFIER_NAME])
        session.run(None, {"image": np.ascontiguousarray(images[..., :2])})
        raise AssertionError("onnxruntime accepted a two-band image")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(settings: Settings, runtime: FaultyRuntime) -> Iterator[str]:
    """Run ``create_app(settings, runtime=runtime)`` on uvicorn in a thread; yield its URL."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings, runtime=runtime), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: _ready(url), "the server to become ready")
        yield url
    finally:
        runtime.gate.set()
        server.should_exit = True
        thread.join(WAIT_LIMIT_S)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health/ready", timeout=2.0).status_code == 200
    except httpx.TransportError:
        return False


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.02)


def _metric(url: str, name: str, **labels: str) -> float:
    """Value of one sample in the server's /metrics (0 when absent)."""
    text = httpx.get(f"{url}/metrics", timeout=5.0).text
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if line.split("{")[0].split(" ")[0] == name and found == labels:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _post(url: str, paths: list[Path], **params: object) -> httpx.Response:
    files = [("files", (p.name, p.read_bytes(), "application/fits")) for p in paths]
    return httpx.post(f"{url}/v1/predict", files=files, params=params, timeout=WAIT_LIMIT_S)


def _error_code(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    return str(body["error"]["code"])


# ------------------------------------------------------------------------------ failures


@pytest.mark.slow
def test_an_onnxruntime_failure_fails_only_its_batch_and_the_service_recovers():
    runtime = FaultyRuntime()
    settings = Settings(  # one batch at a time, so the others queue behind the held one
        device="cpu",
        warmup=False,
        max_batch_size=4,
        max_batch_wait_s=0.0,
        max_files=4,
        model_instances=1,
    )
    with serve(settings, runtime) as url:
        runtime.gate.clear()
        with ThreadPoolExecutor(max_workers=8) as pool:
            # The first request's batch is held at the gate while the other seven queue.
            first = pool.submit(_post, url, CLEAN[:1], samples=16)
            _wait_for(lambda: len(runtime.batch_sizes) == 1, "the first batch to start")
            rest = [pool.submit(_post, url, [path], samples=16) for path in CLEAN[1:8]]
            _wait_for(lambda: _metric(url, "lensserve_queued_cutouts") == 7, "seven queued cutouts")
            runtime.fail_next.set()
            runtime.gate.set()
            responses = [first.result(), *(future.result() for future in rest)]
        failed = [r for r in responses if r.status_code != 200]
        # The held batch ran; the next (four queued cutouts) failed; the last three ran.
        assert runtime.failed_batch_sizes == [4]
        assert len(failed) == 4 and all(r.status_code == 500 for r in failed)
        for response in failed:
            assert _error_code(response) == "inference_failed"
            assert "InvalidArgument" in response.json()["error"]["message"]
        assert sum(r.status_code == 200 for r in responses) == 4
        assert _ready(url)
        assert _post(url, CLEAN[:4], samples=16).status_code == 200


@pytest.mark.slow
def test_a_client_that_disconnects_has_its_queued_work_dropped():
    runtime = FaultyRuntime()
    settings = Settings(  # one batch at a time, so the others queue behind the held one
        device="cpu", warmup=False, max_batch_size=8, max_batch_wait_s=0.0, model_instances=1
    )
    with serve(settings, runtime) as url:
        runtime.gate.clear()
        with ThreadPoolExecutor(max_workers=1) as pool:
            held = pool.submit(_post, url, CLEAN[:1], samples=16)
            _wait_for(lambda: len(runtime.batch_sizes) == 1, "the first batch to start")
            # Three cutouts queue behind it, then their client goes away.
            body, boundary = _multipart(CLEAN[1:4])
            with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
                sock.sendall(
                    b"POST /v1/predict?samples=16 HTTP/1.1\r\nHost: test\r\n"
                    b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                _wait_for(
                    lambda: _metric(url, "lensserve_queued_cutouts") == 3, "three queued cutouts"
                )
            gone = {"method": "POST", "route": "/v1/predict", "status": "499"}
            _wait_for(
                lambda: _metric(url, "lensserve_requests_total", **gone) == 1,
                "the server to notice the disconnect",
            )
            runtime.gate.set()
            assert held.result().status_code == 200
        # A later request runs alone: the gone client's three cutouts never reached the models.
        assert _post(url, CLEAN[4:5], samples=16).status_code == 200
        assert runtime.batch_sizes == [1, 1]
        assert _metric(url, "lensserve_queued_cutouts") == 0


def _multipart(paths: list[Path]) -> tuple[bytes, bytes]:
    boundary = b"lensserve-test-boundary"
    parts = [
        b"--" + boundary + b"\r\n"
        b'Content-Disposition: form-data; name="files"; filename="' + p.name.encode() + b'"\r\n'
        b"Content-Type: application/fits\r\n\r\n" + p.read_bytes() + b"\r\n"
        for p in paths
    ]
    return b"".join(parts) + b"--" + boundary + b"--\r\n", boundary


# ------------------------------------------------------------------------------ overload


@pytest.mark.slow
def test_overload_is_a_quick_503_with_retry_after_and_readiness_says_so():
    runtime = FaultyRuntime()
    settings = Settings(
        device="cpu",
        warmup=False,
        max_batch_size=2,
        max_batch_wait_s=0.0,
        max_files=2,
        max_queue_cutouts=2,
        max_concurrent_requests=3,
        overload_retry_after_s=7,
        model_instances=1,  # one batch at a time, so the next request queues
    )
    with serve(settings, runtime) as url:
        runtime.gate.clear()
        with ThreadPoolExecutor(max_workers=2) as pool:
            running = pool.submit(_post, url, CLEAN[:2], samples=16)
            _wait_for(lambda: len(runtime.batch_sizes) == 1, "the first batch to start")
            queued = pool.submit(_post, url, CLEAN[2:4], samples=16)
            _wait_for(lambda: _metric(url, "lensserve_queued_cutouts") == 2, "a full queue")
            # The queue is full: readiness and a third request say so at once.
            readiness = httpx.get(f"{url}/health/ready")
            assert readiness.status_code == 503 and _error_code(readiness) == "overloaded"
            refused = _post(url, CLEAN[4:5], samples=16)
            assert refused.status_code == 503 and _error_code(refused) == "overloaded"
            assert refused.headers["retry-after"] == "7"
            # A third request holds its slot while its body trickles in: a fourth is refused
            # before its body is read. The refused request's slot is freed once its answer
            # has been sent, which can lag the client's read of it by a moment.
            _wait_for(lambda: _in_flight(url) == 2, "the refused request's slot to be freed")
            with _partial_upload(url, CLEAN[4]):
                _wait_for(lambda: _in_flight(url) == 3, "three requests in flight")
                refused = _post(url, CLEAN[5:6], samples=16)
                assert refused.status_code == 503 and _error_code(refused) == "overloaded"
                assert "at once" in refused.json()["error"]["message"]
            runtime.gate.set()
            assert running.result().status_code == 200
            assert queued.result().status_code == 200
        _wait_for(lambda: _in_flight(url) == 0, "the trickling client's slot to be freed")
        assert _ready(url)


@pytest.mark.slow
def test_a_queue_whose_expected_wait_passes_the_deadline_is_refused_and_a_short_one_is_not():
    runtime = FaultyRuntime()
    settings = Settings(
        device="cpu",
        warmup=False,
        max_batch_wait_s=0.0,
        model_instances=1,
        # Shorter than one cutout's service time: one cutout admitted ahead is too many.
        max_queue_wait_s=0.001,
        overload_retry_after_s=7,
        refusal_delay_s=0.3,
    )
    with serve(settings, runtime) as url:
        # Nothing ahead: one request after another is admitted, before the service time is
        # measured and after.
        for path in CLEAN[:2]:
            assert _post(url, [path], samples=16).status_code == 200
        assert _metric(url, "lensserve_expected_queue_wait_seconds") == 0.0
        runtime.gate.clear()
        with ThreadPoolExecutor(max_workers=1) as pool:
            held = pool.submit(_post, url, CLEAN[2:3], samples=16)
            _wait_for(lambda: len(runtime.batch_sizes) == 3, "the third batch to start")
            assert _metric(url, "lensserve_admitted_cutouts") == 1
            # One cutout ahead, at the service time measured on the first two batches.
            wait_s = _metric(url, "lensserve_expected_queue_wait_seconds")
            assert wait_s >= settings.max_queue_wait_s
            retry_after = str(max(1, math.ceil(wait_s)))  # from the wait, not the setting
            # Refused before its body is read: the headers alone get the answer.
            head = _headers_only_post(url, CLEAN[3])
            assert head.startswith(b"HTTP/1.1 503"), head
            assert f"retry-after: {retry_after}\r\n".encode() in head.lower()
            refusals, answered_after_s = [], []
            for _ in range(2):
                started = time.perf_counter()
                refusals.append(_post(url, CLEAN[3:4], samples=16))
                answered_after_s.append(time.perf_counter() - started)
            # Each refusal waits refusal_delay_s, so a client retrying at once is slowed.
            assert min(answered_after_s) >= settings.refusal_delay_s
            for refused in refusals:
                assert refused.status_code == 503 and _error_code(refused) == "overloaded"
                assert refused.headers["retry-after"] == retry_after
                assert "waiting more than 0.001 s" in refused.json()["error"]["message"]
            # The answer is rendered once and replayed.
            assert refusals[0].content == refusals[1].content
            assert _metric(url, "lensserve_admission_refusals_total", reason="queue_wait") == 3
            assert _metric(url, "lensserve_errors_total", code="overloaded") == 3
            runtime.gate.set()
            assert held.result().status_code == 200
        # The queue drained: admitted again.
        _wait_for(lambda: _metric(url, "lensserve_admitted_cutouts") == 0, "an empty queue")
        assert _post(url, CLEAN[3:4], samples=16).status_code == 200
        assert runtime.batch_sizes == [1, 1, 1, 1]


def _headers_only_post(url: str, path: Path) -> bytes:
    """Send a POST's headers, declaring the file's length, but none of its body; return the
    head of the answer."""
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/fits\r\n"
            b"Content-Length: " + str(path.stat().st_size).encode() + b"\r\n\r\n"
        )
        sock.settimeout(WAIT_LIMIT_S)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return head


@contextmanager
def _partial_upload(url: str, path: Path) -> Iterator[None]:
    """A client that sends the headers and half of a FITS body, then hangs up on leaving."""
    data = path.read_bytes()
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/fits\r\n"
            b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data[: len(data) // 2]
        )
        yield


def _in_flight(url: str) -> int:
    return int(_metric(url, "lensserve_requests_in_flight"))


@pytest.mark.slow
def test_the_request_deadline_refuses_slow_bodies_408_and_slow_answers_503():
    runtime = FaultyRuntime()
    settings = Settings(device="cpu", warmup=False, max_batch_wait_s=0.0, request_timeout_s=1.0)
    with serve(settings, runtime) as url:
        port = int(url.rsplit(":", 1)[1])
        data = CLEAN[0].read_bytes()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/fits\r\n"
                b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data[:1000]
            )
            status_line = sock.makefile("rb").readline()
        assert status_line.startswith(b"HTTP/1.1 408"), status_line
        runtime.gate.clear()
        slow = _post(url, CLEAN[:1], samples=16)
        assert slow.status_code == 503 and _error_code(slow) == "overloaded"
        assert "within 1 s" in slow.json()["error"]["message"]
        runtime.gate.set()
        assert _post(url, CLEAN[:1], samples=16).status_code == 200
