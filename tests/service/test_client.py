"""The pipeline client and ``lensserve predict`` against real servers.

The models answer from a real ``lensserve serve`` process (``live_server``).
Between the client and it sits, where a test needs one, a small proxy app on
its own uvicorn server that refuses with 503 for a while or holds requests,
so retries and a killed run are shown over real sockets. Expected numbers
come from the same server's direct answer to the same files.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from astropy.table import Table
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.client import (
    UNAVAILABLE,
    AsyncLensClient,
    LensClient,
    RetryPolicy,
    parse_retry_after,
)
from service.client.predict import read_finished_rows, run_predict

REPO = Path(__file__).resolve().parents[2]
CLEAN_SAMPLES = sorted((REPO / "examples" / "cutouts" / "clean").glob("*.fits"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(len(CLEAN_SAMPLES) != 12, reason="the 12 clean samples are missing"),
]
#: Agreement with the server's direct answer: the classifier and regressor are deterministic.
TOLERANCE = 1e-6
FAST_RETRY = RetryPolicy(max_retries=8, backoff_s=0.01, max_backoff_s=0.05)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_in_thread(app: Starlette) -> Iterator[str]:
    """Run ``app`` on a real uvicorn server on a free port; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                pytest.fail("the test proxy did not start")
            threading.Event().wait(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@dataclass
class Proxy:
    """Forwards ``POST /v1/predict`` to the real service, after some refusals or a hold.

    ``refuse_first`` requests are answered 503 with ``Retry-After``; with
    ``hold_after`` set, requests past that many are held until ``release``
    is set.
    """

    upstream: str
    refuse_first: int = 0
    retry_after: str = "0"
    hold_after: int | None = None
    release: threading.Event = field(default_factory=threading.Event)
    held: threading.Event = field(default_factory=threading.Event)
    statuses: list[int] = field(default_factory=list)
    files_per_request: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        async def forward(request: Request) -> Response:
            with self.lock:
                number = len(self.statuses) + 1
                refuse = number <= self.refuse_first
                self.statuses.append(503 if refuse else 200)
            if refuse:
                body = {"error": {"code": "overloaded", "message": "test proxy refuses"}}
                return JSONResponse(body, 503, headers={"Retry-After": self.retry_after})
            if self.hold_after is not None and number > self.hold_after:
                self.held.set()
                await asyncio.to_thread(self.release.wait)
            body = await request.body()
            async with httpx.AsyncClient(timeout=60) as client:
                answer = await client.post(
                    self.upstream + "/v1/predict",
                    params=request.query_params,
                    content=body,
                    headers={"content-type": request.headers["content-type"]},
                )
            with self.lock:
                self.files_per_request.append(len(answer.json().get("results", [None])))
            return Response(answer.content, answer.status_code, media_type="application/json")

        return Starlette(routes=[Route("/v1/predict", forward, methods=["POST"])])


@pytest.fixture(scope="module")
def direct_answers(live_server: str) -> dict[str, dict]:
    """The service's own answer for each clean sample, keyed by file name."""
    files = [("files", (p.name, p.read_bytes(), "application/fits")) for p in CLEAN_SAMPLES]
    response = httpx.post(f"{live_server}/v1/predict", files=files, timeout=120)
    response.raise_for_status()
    return {r["filename"]: r for r in response.json()["results"]}


def _lensserve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "service", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _assert_rows_match(table: Table, direct_answers: dict[str, dict]) -> None:
    for row in table:
        answer = direct_answers[Path(str(row["filename"])).name]
        np.testing.assert_allclose(
            row["lens_probability"], answer["lens_probability"], atol=TOLERANCE
        )
        np.testing.assert_allclose(row["theta_E"], answer["parameters"]["theta_E"], atol=TOLERANCE)
        np.testing.assert_allclose(row["ra"], answer["wcs"]["ra"], atol=1e-9)


def test_lensserve_predict_writes_one_row_per_sample(live_server, direct_answers, tmp_path):
    out = tmp_path / "r.csv"
    paths = [str(p) for p in CLEAN_SAMPLES]
    process = _lensserve(
        "predict",
        *paths,
        "--url",
        live_server,
        "--out",
        str(out),
        "--files-per-request",
        "5",
        "--concurrency",
        "2",
    )
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "12 files: 12 predicted, 0 already" in stderr
    table = Table.read(out, format="ascii.csv")
    assert list(table["filename"]) == paths  # input order, each file once
    assert {"lens_probability", "theta_E", "theta_E_q0_16", "theta_E_q0_975", "error"} <= set(
        table.colnames
    )
    _assert_rows_match(table, direct_answers)


@pytest.mark.parametrize("suffix", [".ecsv", ".fits", ".vot"])
def test_every_table_format_reads_back(live_server, direct_answers, tmp_path, suffix):
    out = tmp_path / f"r{suffix}"
    with LensClient(live_server, files_per_request=12) as client:
        summary = run_predict(
            [str(p) for p in CLEAN_SAMPLES[:3]],
            client=client,
            out=out,
            resume=False,
            progress=False,
        )
    assert summary.succeeded == 3 and not summary.failures
    table = Table.read(out)
    assert table["theta_E"].unit == "arcsec"
    _assert_rows_match(table, direct_answers)
    assert len(read_finished_rows(out)) == 3


def test_a_killed_run_resumes_with_each_file_once(live_server, tmp_path):
    """Kill the command while request 7 of 12 is held, then --resume: 12 rows, none twice."""
    proxy = Proxy(live_server, hold_after=6)
    out = tmp_path / "r.csv"
    paths = [str(p) for p in CLEAN_SAMPLES]
    common = [
        "--out",
        str(out),
        "--files-per-request",
        "1",
        "--concurrency",
        "1",
        "--checkpoint-s",
        "0",
        "--no-progress",
    ]
    with serve_in_thread(proxy.app()) as url:
        first = _lensserve("predict", *paths, "--url", url, *common)
        try:
            assert proxy.held.wait(timeout=120), "the first run never reached request 7"
        finally:
            first.send_signal(signal.SIGKILL)
            first.communicate(timeout=30)
        assert first.returncode == -signal.SIGKILL
        done_before = [str(f) for f in Table.read(out, format="ascii.csv")["filename"]]
        assert done_before == paths[:6]

        proxy.release.set()
        requests_before = len(proxy.files_per_request)
        second = _lensserve("predict", *paths, "--url", url, *common, "--resume")
        _, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr
    assert "12 files: 6 predicted, 6 already" in stderr
    table = Table.read(out, format="ascii.csv")
    assert sorted(str(f) for f in table["filename"]) == sorted(paths)  # 12 rows, none twice
    assert np.all(np.isfinite(table["lens_probability"])) and np.all(np.isfinite(table["theta_E"]))
    # The resumed run sent only the 6 missing files (the held request may also have finished).
    assert len(proxy.files_per_request) - requests_before in (6, 7)


def test_503s_are_retried_and_no_file_is_lost(live_server, direct_answers):
    proxy = Proxy(live_server, refuse_first=5, retry_after="0")
    paths = [str(p) for p in CLEAN_SAMPLES]
    with serve_in_thread(proxy.app()) as url:
        with LensClient(url, files_per_request=4, concurrency=2, retry=FAST_RETRY) as client:
            predictions = client.predict(paths)
    assert proxy.statuses.count(503) == 5
    assert client.stats.retries == 5 and client.stats.retry_statuses == [503] * 5
    assert [p.path for p in predictions] == paths
    assert all(p.ok for p in predictions)
    for prediction in predictions:
        answer = direct_answers[prediction.filename]
        assert prediction.lens_probability == pytest.approx(
            answer["lens_probability"], abs=TOLERANCE
        )
        assert prediction.parameters is not None
        assert prediction.parameters.theta_E == pytest.approx(
            answer["parameters"]["theta_E"], abs=TOLERANCE
        )


def test_the_async_client_retries_the_same_way(live_server, direct_answers):
    proxy = Proxy(live_server, refuse_first=3, retry_after="0")
    paths = [str(p) for p in CLEAN_SAMPLES]

    async def run(url: str) -> tuple[list, int]:
        async with AsyncLensClient(
            url, files_per_request=5, concurrency=3, retry=FAST_RETRY, include_samples=True
        ) as client:
            return await client.predict(paths), client.stats.retries

    with serve_in_thread(proxy.app()) as url:
        predictions, retries = asyncio.run(run(url))
    assert retries == 3 == proxy.statuses.count(503)
    assert [p.path for p in predictions] == paths
    for prediction in predictions:
        assert prediction.einstein_radius is not None
        assert len(prediction.einstein_radius.samples or ()) > 1
        answer = direct_answers[prediction.filename]
        assert prediction.lens_probability == pytest.approx(
            answer["lens_probability"], abs=TOLERANCE
        )


def test_a_service_that_never_answers_gives_every_file_an_error(tmp_path):
    paths = [str(p) for p in CLEAN_SAMPLES[:3]] + [str(tmp_path / "missing.fits")]
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    with LensClient(url, files_per_request=2, retry=RetryPolicy(2, 0.01, 0.02)) as client:
        predictions = client.predict(paths)
    assert [p.path for p in predictions] == paths
    codes = [p.error.code if p.error else None for p in predictions]
    assert codes == [UNAVAILABLE] * 3 + ["unreadable_file"]
    assert client.stats.retries == 2 * 2  # two batches, two retries each
    assert all(reason == "ConnectError" for reason in client.stats.retry_statuses)


def test_failures_are_listed_and_the_exit_code_is_1(live_server, tmp_path):
    bad = tmp_path / "notes.fits"
    bad.write_text("not a FITS file")
    out = tmp_path / "r.ecsv"
    process = _lensserve(
        "predict",
        str(CLEAN_SAMPLES[0]),
        str(bad),
        "--url",
        live_server,
        "--out",
        str(out),
        "--no-progress",
    )
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert f"{bad}: invalid_fits:" in stderr
    table = Table.read(out)
    # An empty cell (success) reads back masked from ECSV.
    codes = ["" if np.ma.is_masked(code) else str(code) for code in table["error_code"]]
    assert codes == ["", "invalid_fits"]
    # --resume keeps the good row and tries the failed file again.
    assert [row["filename"] for row in read_finished_rows(out)] == [str(CLEAN_SAMPLES[0])]


def test_retry_after_sets_the_least_wait():
    policy = RetryPolicy(max_retries=3, backoff_s=0.01, max_backoff_s=30.0)
    assert policy.delay_s(0, retry_after_s=2.0) >= 2.0  # the server's wish beats a short backoff
    assert RetryPolicy(backoff_s=1.0, max_backoff_s=5.0).delay_s(10, retry_after_s=None) <= 5.0
    assert parse_retry_after("7") == 7.0
    now = datetime(2026, 1, 1, tzinfo=UTC)
    date = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(date, now_s=now.timestamp()) == pytest.approx(30.0)
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
