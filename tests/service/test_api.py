"""The HTTP API, end to end.

Two ways in: a real ``lensserve serve`` process (uvicorn on a free port) for
the repository's sample cutouts and the hostile inputs, and the same app in process
(Starlette's TestClient) where a test needs its own settings. Expected model
numbers are never constants: formats are compared with the clean cube of the
same object, answered by the same server.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import NormalDist
from typing import Any

import httpx
import numpy as np
import pytest
from astropy.io import fits
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.errors import status_for
from service.contract.uncertainty import (
    QUANTILE_LEVELS,
    REGIME_TABLE_LEVELS,
    summarise_mc_samples,
)
from service.core.cpu import available_cores
from service.core.inference import prepare_cutout
from service.core.runtime import OnnxModelRuntime
from service.errors import (
    InferenceError,
    InvalidFitsError,
    OverloadedError,
    PayloadTooLargeError,
)
from service.fits.raw import FitsLimits
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
MODELS_DIR = REPO / "models"
SAMPLES = REPO / "examples" / "cutouts"
CLEAN = sorted((SAMPLES / "clean").glob("*.fits"))
FORMATS = sorted((SAMPLES / "formats").glob("*"))
SERVER_BODY_LIMIT = 4 * 1024 * 1024
#: Agreement with the clean cube: exact layouts, and layouts that quantise or mask pixels.
LOSSLESS_TOLERANCE = 1e-3
LOSSY_TOLERANCE = 0.02
LOSSY_SUFFIXES = ("_int16.fits", "_rice.fits", "_nan.fits")
SEED = 20240611
FITS_MEDIA = {"content-type": "application/fits"}


@pytest.fixture(scope="module")
def server(launch_server) -> str:
    """A real ``python -m service serve`` process with a small body limit; its base URL."""
    return launch_server(
        LENSSERVE_MAX_BODY_BYTES=str(SERVER_BODY_LIMIT), LENSSERVE_LOG_LEVEL="warning"
    ).url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60.0) as http:
        yield http


def _post_file(
    http: httpx.Client, data: bytes, *, params: dict[str, Any] | None = None, **headers: str
) -> httpx.Response:
    return http.post(
        "/v1/predict", content=data, params=params or {}, headers={**FITS_MEDIA, **headers}
    )


def _assert_error(response: httpx.Response, status: int | None = None) -> dict[str, str]:
    """A JSON error body with a code and a message; returns the ``error`` object."""
    if status is None:
        assert 400 <= response.status_code < 500, response.text
    else:
        assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and len(body["error"]["message"]) > 10
    return body["error"]


def _assert_result_schema(result: dict[str, Any], *, samples: int | None = None) -> None:
    assert result["error"] is None
    assert 0.0 <= result["lens_probability"] <= 1.0
    assert set(result["parameters"]) == {"theta_E", "e1", "e2", "center_x", "center_y"}
    radius = result["einstein_radius"]
    assert set(radius["quantiles"]) == {"0.025", "0.16", "0.5", "0.84", "0.975"}
    quantiles = [radius["quantiles"][k] for k in ("0.025", "0.16", "0.5", "0.84", "0.975")]
    assert quantiles == sorted(quantiles)
    assert radius["std"] >= 0 and radius["aleatoric_std"] >= 0 and radius["epistemic_std"] >= 0
    # The mixture variance is the sum of its two parts.
    np.testing.assert_allclose(
        radius["std"] ** 2, radius["aleatoric_std"] ** 2 + radius["epistemic_std"] ** 2, rtol=1e-6
    )
    if samples is None:
        assert "samples" not in radius
    else:
        assert len(radius["samples"]) == samples
    assert isinstance(result["warnings"], list)


def _truth() -> dict[int, dict[str, str]]:
    with (SAMPLES / "truth.csv").open() as handle:
        return {int(row["id"]): row for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def clean_results(client: httpx.Client) -> dict[str, dict[str, Any]]:
    """The server's seeded answer for each clean cube, keyed by object id ("00000")."""
    answers = {}
    for path in CLEAN:
        response = _post_file(client, path.read_bytes(), params={"seed": SEED})
        assert response.status_code == 200, response.text
        (result,) = response.json()["results"]
        answers[path.stem] = result
    return answers


# ----------------------------------------------------------------------------- samples


@pytest.mark.slow
def test_every_clean_cutout_is_answered_with_the_full_schema(clean_results):
    truth = _truth()
    assert len(clean_results) == 12
    for stem, result in clean_results.items():
        _assert_result_schema(result)
        assert result["filename"] == "body"
        row = truth[int(stem)]
        # The centre's sky position from the file's TAN WCS (truth.csv), to 0.01 arcsec.
        assert result["wcs"]["ra"] == pytest.approx(float(row["ra"]), abs=0.01 / 3600)
        assert result["wcs"]["dec"] == pytest.approx(float(row["dec"]), abs=0.01 / 3600)


@pytest.mark.slow
@pytest.mark.parametrize("path", FORMATS, ids=lambda p: p.name)
def test_every_format_agrees_with_its_clean_cube(client, clean_results, path):
    response = _post_file(client, path.read_bytes(), params={"seed": SEED})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    _assert_result_schema(result)
    reference = clean_results[path.name[:5]]
    tolerance = LOSSY_TOLERANCE if path.name.endswith(LOSSY_SUFFIXES) else LOSSLESS_TOLERANCE
    got = [result["lens_probability"], *result["parameters"].values()]
    want = [reference["lens_probability"], *reference["parameters"].values()]
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)
    # Same seed, same dropout masks: the MC summaries agree to the same tolerance.
    radius, reference_radius = result["einstein_radius"], reference["einstein_radius"]
    for key in ("mean", "std", "aleatoric_std", "epistemic_std"):
        assert radius[key] == pytest.approx(reference_radius[key], abs=tolerance), key
    for level, value in radius["quantiles"].items():
        assert value == pytest.approx(reference_radius["quantiles"][level], abs=tolerance), level
    if path.name.endswith(("_nan.fits", "_101px.fits")):
        assert result["warnings"], "a masked or cropped cutout must say so"
    else:
        assert result["warnings"] == []
    assert result["wcs"]["ra"] == pytest.approx(reference["wcs"]["ra"], abs=0.01 / 3600)
    assert result["wcs"]["dec"] == pytest.approx(reference["wcs"]["dec"], abs=0.01 / 3600)


@pytest.mark.slow
def test_a_multipart_request_answers_all_twelve_in_order(client, clean_results):
    files = [("files", (path.name, path.read_bytes(), "application/fits")) for path in CLEAN]
    response = client.post("/v1/predict", files=files, params={"seed": SEED})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body["model_versions"]) == {
        "lens_classifier",
        "einstein_radius",
        "einstein_radius_mc",
    }
    results = body["results"]
    assert [r["filename"] for r in results] == [path.name for path in CLEAN]
    for path, result in zip(CLEAN, results, strict=True):
        _assert_result_schema(result)
        single = clean_results[path.stem]
        # Same models on the same pixels, batched with 11 others: float32 batch rounding only.
        np.testing.assert_allclose(
            [result["lens_probability"], *result["parameters"].values()],
            [single["lens_probability"], *single["parameters"].values()],
            rtol=0,
            atol=1e-4,
        )


@pytest.mark.slow
def test_a_bad_file_among_good_ones_gets_an_error_in_its_slot(client):
    files = [
        ("files", ("a.fits", CLEAN[0].read_bytes(), "application/fits")),
        ("files", ("notes.txt", b"these are not the pixels you are looking for\n", "text/plain")),
        ("files", ("b.fits.gz", gzip.compress(CLEAN[1].read_bytes()), "application/gzip")),
    ]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 200, response.text
    first, bad, last = response.json()["results"]
    _assert_result_schema(first)
    _assert_result_schema(last)
    assert bad["filename"] == "notes.txt" and bad["lens_probability"] is None
    assert bad["error"]["code"] == "invalid_fits" and bad["error"]["message"]


@pytest.mark.slow
def test_content_encoding_gzip_and_samples_on_request(client):
    data = gzip.compress(CLEAN[2].read_bytes())
    response = _post_file(
        client,
        data,
        params={"samples": 37, "include_samples": "true", "seed": 5},
        **{"content-encoding": "gzip"},
    )
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    _assert_result_schema(result, samples=37)
    again = _post_file(
        client,
        data,
        params={"samples": 37, "include_samples": "true", "seed": 5},
        **{"content-encoding": "gzip"},
    )
    assert again.json() == response.json()  # seeded: bit-for-bit reproducible


# ----------------------------------------------------------------------------- bad inputs


def _fits_bytes(hdus: list[fits.hdu.base.ExtensionHDU | fits.PrimaryHDU]) -> bytes:
    buffer = io.BytesIO()
    fits.HDUList(hdus).writeto(buffer)
    return buffer.getvalue()


def _cube(rng: np.random.Generator, shape: tuple[int, ...] = (3, 64, 64)) -> np.ndarray:
    return rng.normal(10.0, 1.0, shape).astype(np.float32)


def _huge_header() -> bytes:
    """A primary header claiming a 100000 x 100000 x 3 float32 cube (120 GB), and no data."""
    header = fits.Header()
    header["SIMPLE"] = True
    header["BITPIX"] = -32
    header["NAXIS"] = 3
    header["NAXIS1"] = 100_000
    header["NAXIS2"] = 100_000
    header["NAXIS3"] = 3
    return header.tostring().encode("ascii")


def _gzip_bomb(decompressed_bytes: int = 400 * 1024 * 1024) -> bytes:
    """A gzip file of a valid 64x64x3 FITS header followed by ~400 MB of zeros (~0.4 MB).

    Built without compressing 400 MB: after a full flush deflate forgets its
    history, so every further 1 MiB block of zeros compresses to the same
    bytes, which are repeated; the gzip header and CRC-32 trailer are
    written by hand (RFC 1952).
    """
    header = fits.PrimaryHDU(np.zeros((3, 64, 64), np.float32)).header.tostring().encode()
    block = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = compressor.compress(header) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeated = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    count = (decompressed_bytes - len(header)) // len(block)
    tail = compressor.flush(zlib.Z_FINISH)
    crc = zlib.crc32(header)
    for _ in range(count):
        crc = zlib.crc32(block, crc)
    size = len(header) + count * len(block)
    return b"".join(
        [
            b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff",
            head,
            repeated * count,
            tail,
            crc.to_bytes(4, "little"),
            (size & 0xFFFFFFFF).to_bytes(4, "little"),
        ]
    )


def test_the_gzip_bomb_really_inflates_to_400_megabytes():
    bomb = _gzip_bomb()
    assert len(bomb) < 1024 * 1024
    inflated = 0
    with gzip.GzipFile(fileobj=io.BytesIO(bomb)) as stream:  # checks the CRC at the end
        while chunk := stream.read(16 << 20):
            inflated += len(chunk)
    assert inflated >= 400 * 1024 * 1024 - (1 << 20)


def _bad_inputs() -> dict[str, tuple[bytes, set[str]]]:
    """Each hostile body, with the error codes that would be a correct answer to it."""
    rng = np.random.default_rng(99)
    clean = CLEAN[0].read_bytes()
    all_nan = np.full((3, 64, 64), np.nan, np.float32)
    table = fits.BinTableHDU.from_columns([fits.Column(name="flux", format="E", array=[1.0, 2.0])])
    return {
        "random_bytes": (rng.bytes(5760), {"invalid_fits"}),
        "empty_body": (b"", {"invalid_fits", "invalid_request"}),
        "truncated_fits": (clean[: len(clean) // 2], {"invalid_fits"}),
        "text": (b"RA,Dec\n170.85,-53.17\n" * 20, {"invalid_fits"}),
        "fits_table": (_fits_bytes([fits.PrimaryHDU(), table]), {"no_image_data"}),
        "single_2d_band": (
            _fits_bytes([fits.PrimaryHDU(_cube(rng, (64, 64)))]),
            {"band_mismatch", "no_image_data"},
        ),
        "cube_20x20": (
            _fits_bytes([fits.PrimaryHDU(_cube(rng, (3, 20, 20)))]),
            {"cutout_too_small"},
        ),
        "header_claiming_100000x100000x3": (_huge_header(), {"payload_too_large"}),
        "all_nan": (_fits_bytes([fits.PrimaryHDU(all_nan)]), {"too_many_masked_pixels"}),
        "gzip_bomb": (_gzip_bomb(), {"payload_too_large"}),
        "over_the_body_limit": (rng.bytes(SERVER_BODY_LIMIT + 1), {"payload_too_large"}),
    }


BAD_INPUTS = _bad_inputs()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_a_bad_input_gets_a_4xx_json_error_and_the_server_stays_ready(client, name):
    data, codes = BAD_INPUTS[name]
    started = time.perf_counter()
    response = _post_file(client, data)
    error = _assert_error(response)
    assert error["code"] in codes, error
    assert time.perf_counter() - started < 10.0
    assert client.get("/health/ready").status_code == 200


@pytest.mark.slow
def test_a_streamed_body_is_cut_off_at_the_limit(client):
    """No Content-Length: the limit is enforced on the bytes as they arrive."""
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(64):  # 64 x 256 KiB = 16 MiB, four times the limit
            sent += 256 * 1024
            yield bytes(256 * 1024)

    try:
        response = client.post("/v1/predict", content=chunks(), headers=FITS_MEDIA)
    except httpx.TransportError:
        # The server may close the connection while the client is still writing; what
        # matters is that it did not take in the whole body.
        assert sent < 16 * 1024 * 1024
    else:
        assert _assert_error(response, 413)["code"] == "payload_too_large"
    assert client.get("/health/ready").status_code == 200


@pytest.mark.slow
def test_metrics_count_requests_errors_batches_and_cutouts(client, clean_results):
    _post_file(client, b"not fits at all")
    text = client.get("/metrics").text
    for name in (
        "lensserve_requests_total",
        "lensserve_errors_total",
        "lensserve_request_duration_seconds_bucket",
        "lensserve_batch_size_cutouts_bucket",
        "lensserve_queue_time_seconds_bucket",
        "lensserve_cutouts_processed_total",
    ):
        assert name in text, name
    assert 'lensserve_errors_total{code="invalid_fits"}' in text
    assert 'route="/v1/predict"' in text and 'status="200"' in text
    processed = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("lensserve_cutouts_processed_total")
    )
    assert processed >= 12


@pytest.mark.slow
def test_models_endpoint_and_health(client):
    assert client.get("/health/live").json() == {"status": "live"}
    assert client.get("/health/ready").json() == {"status": "ready"}
    body = client.get("/v1/models").json()
    assert body["provider"] == "CPUExecutionProvider"  # the server fixture runs with device=cpu
    assert body["provider"] in body["available_providers"]
    # The defaults: two batches at once where there are two cores, the cores shared.
    assert body["model_instances"] == min(2, available_cores())
    assert body["model_instances"] * body["intra_op_threads"] <= max(available_cores(), 1)
    assert set(body["models"]) == {"lens_classifier", "einstein_radius", "einstein_radius_mc"}
    for name, card in body["models"].items():
        assert body["versions"][name] == card["version"]
        assert card["input"]["bands"] == ["g", "r", "i"]


# ----------------------------------------------------------------------------- in process


def _wait_ready(test_client: TestClient, timeout_s: float = 30.0) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        response = test_client.get("/health/ready")
        if response.status_code == 200 or time.monotonic() > deadline:
            return response
        if response.json()["error"]["message"].startswith("the models could not be loaded"):
            return response
        time.sleep(0.05)


@pytest.fixture(scope="module")
def app_client() -> Iterator[TestClient]:
    settings = Settings(device="cpu", max_files=4, max_queue_cutouts=64, max_body_bytes=1 << 20)
    with TestClient(create_app(settings)) as test_client:
        assert _wait_ready(test_client).status_code == 200
        yield test_client


def test_unsupported_media_type_and_encoding_are_415(app_client):
    data = CLEAN[0].read_bytes()
    error = _assert_error(
        app_client.post("/v1/predict", content=data, headers={"content-type": "text/csv"}), 415
    )
    assert "application/fits" in error["message"] and "multipart/form-data" in error["message"]
    error = _assert_error(
        app_client.post(
            "/v1/predict", content=data, headers={**FITS_MEDIA, "content-encoding": "br"}
        ),
        415,
    )
    assert error["code"] == "unsupported_media_type"


def test_bad_query_parameters_are_422_in_the_same_shape(app_client):
    data = CLEAN[0].read_bytes()
    for params in ({"samples": 0}, {"samples": 1001}, {"seed": -1}, {"include_samples": "maybe"}):
        error = _assert_error(
            app_client.post("/v1/predict", content=data, params=params, headers=FITS_MEDIA), 422
        )
        assert error["code"] == "invalid_request"
        assert next(iter(params)) in error["message"]


def test_multipart_limits_and_mistakes(app_client):
    data = CLEAN[0].read_bytes()
    too_many = [("files", (f"{i}.fits", data, "application/fits")) for i in range(5)]
    error = _assert_error(app_client.post("/v1/predict", files=too_many), 413)
    assert "at most 4" in error["message"]
    wrong_field = [("cutouts", ("a.fits", data, "application/fits"))]
    error = _assert_error(app_client.post("/v1/predict", files=wrong_field), 400)
    assert "'files'" in error["message"]
    no_files = app_client.post(
        "/v1/predict",
        content=b"--xyz--\r\n",
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert _assert_error(no_files, 400)["code"] == "invalid_request"
    truncated = app_client.post(
        "/v1/predict",
        content=b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a"\r\n\r\nSIM',
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert _assert_error(truncated, 400)["code"] == "invalid_request"


def test_a_single_file_multipart_request_with_a_bad_file_is_a_4xx(app_client):
    response = app_client.post("/v1/predict", files=[("files", ("x.fits", b"junk", "image/fits"))])
    assert _assert_error(response, 400)["code"] == "invalid_fits"


def test_a_declared_content_length_over_the_limit_is_refused_before_reading(app_client):
    response = app_client.post("/v1/predict", content=bytes((1 << 20) + 1), headers=FITS_MEDIA)
    assert _assert_error(response, 413)["code"] == "payload_too_large"


def test_unknown_routes_answer_in_the_same_error_shape(app_client):
    assert _assert_error(app_client.get("/v2/nothing"), 404)["code"] == "not_found"


def test_openapi_documents_bodies_responses_and_examples(app_client):
    spec = app_client.get("/openapi.json").json()
    predict = spec["paths"]["/v1/predict"]["post"]
    assert {
        "application/fits",
        "image/fits",
        "application/octet-stream",
        "multipart/form-data",
    } <= set(predict["requestBody"]["content"])
    assert {"200", "400", "413", "415", "422", "503"} <= set(predict["responses"])
    assert {p["name"] for p in predict["parameters"]} == {
        "samples",
        "include_samples",
        "seed",
        "explain",
    }
    schemas = spec["components"]["schemas"]
    assert schemas["PredictResponse"]["examples"]
    assert "arcsec" in schemas["EinsteinRadiusDistribution"]["properties"]["mean"]["description"]
    assert set(schemas["Quantiles"]["properties"]) == {"0.025", "0.16", "0.5", "0.84", "0.975"}
    # The explanation is optional and off the list of required result fields.
    assert "explanation" in schemas["CutoutResult"]["properties"]
    assert "explanation" not in schemas["CutoutResult"].get("required", [])
    assert (
        "probability" in schemas["ExplanationMaps"]["properties"]["lens_probability"]["description"]
    )
    for path in ("/v1/models", "/health/live", "/health/ready", "/metrics"):
        assert "get" in spec["paths"][path]


def test_a_service_without_models_is_live_but_not_ready(tmp_path):
    with TestClient(create_app(Settings(models_dir=tmp_path, device="cpu"))) as test_client:
        response = _wait_ready(test_client)
        assert _assert_error(response, 503)["code"] == "model_unavailable"
        assert test_client.get("/health/live").status_code == 200
        response = test_client.post(
            "/v1/predict", content=CLEAN[0].read_bytes(), headers=FITS_MEDIA
        )
        assert _assert_error(response, 503)["code"] == "model_unavailable"
        assert "lensserve_ready 0.0" in test_client.get("/metrics").text


def test_error_classes_map_to_http_statuses():
    assert status_for(InvalidFitsError("x")) == 400
    assert status_for(PayloadTooLargeError("x")) == 413
    assert status_for(OverloadedError("x")) == 503
    assert status_for(InferenceError("x")) == 500


class _GatedRuntime(OnnxModelRuntime):
    """The real runtime, made slow or broken on demand for the queueing tests."""

    gate = threading.Event()
    fail = False

    def predict(self, images, *, num_samples, seed=None):  # type: ignore[no-untyped-def]
        if images.shape[0] and not type(self).gate.wait(10.0):
            raise TimeoutError("gate never opened")
        if type(self).fail and images.shape[0]:
            raise RuntimeError("simulated onnxruntime failure")
        return super().predict(images, num_samples=num_samples, seed=seed)


@pytest.fixture
def gated_client(monkeypatch) -> Iterator[TestClient]:
    monkeypatch.setattr("service.api.app.OnnxModelRuntime", _GatedRuntime)
    _GatedRuntime.gate.set()  # warm-up runs straight through
    _GatedRuntime.fail = False
    settings = Settings(
        device="cpu",
        max_files=2,
        max_batch_size=2,
        max_queue_cutouts=2,
        max_batch_wait_s=0.0,
        overload_retry_after_s=3,
        model_instances=1,  # one batch at the gate at a time: the next request queues
    )
    with TestClient(create_app(settings)) as test_client:
        assert _wait_ready(test_client).status_code == 200
        yield test_client
    _GatedRuntime.gate.set()


def _post_two(test_client: TestClient) -> httpx.Response:
    files = [("files", (p.name, p.read_bytes(), "application/fits")) for p in CLEAN[:2]]
    return test_client.post("/v1/predict", files=files)


def test_a_full_queue_answers_503_overloaded_with_retry_after(gated_client):
    _GatedRuntime.gate.clear()
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = pool.submit(_post_two, gated_client)  # runs, held at the gate
        time.sleep(0.5)
        queued = pool.submit(_post_two, gated_client)  # fills the 2-cutout queue
        time.sleep(0.5)
        refused = _post_two(gated_client)
        _GatedRuntime.gate.set()
        assert running.result(timeout=30).status_code == 200
        assert queued.result(timeout=30).status_code == 200
    assert _assert_error(refused, 503)["code"] == "overloaded"
    assert refused.headers["retry-after"] == "3"


def test_a_failing_batch_fails_every_request_in_it(gated_client):
    _GatedRuntime.gate.clear()
    _GatedRuntime.fail = True
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(_post_two, gated_client)
        time.sleep(0.5)
        second = pool.submit(_post_two, gated_client)
        time.sleep(0.5)
        _GatedRuntime.gate.set()
        responses = [first.result(timeout=30), second.result(timeout=30)]
    for response in responses:
        error = _assert_error(response, 500)
        assert error["code"] == "inference_failed"
        assert "simulated onnxruntime failure" in error["message"]
    _GatedRuntime.fail = False
    assert _post_two(gated_client).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("decode_threads", [1, 2])
def test_worker_processes_decode_only_what_the_plain_reader_leaves(monkeypatch, decode_threads):
    """Plain cubes are prepared in a server thread; astropy's layouts cross to the workers."""
    from service.core.isolation import IsolatedDecoder

    sent: list[str] = []
    original_run = IsolatedDecoder.run

    async def counting_run(self, function, *args):  # type: ignore[no-untyped-def]
        sent.append(function.keywords["filename"])
        return await original_run(self, function, *args)

    monkeypatch.setattr(IsolatedDecoder, "run", counting_run)
    names = ["00000.fits", "00000_f64.fits", "00000_101px.fits", "00000_rice.fits"]
    names += ["00000_mef.fits", "00000_cube.fits.gz"]
    paths = [SAMPLES / ("clean" if "_" not in n else "formats") / n for n in names]
    settings = Settings(device="cpu", decode_isolation="process", decode_threads=decode_threads)
    with TestClient(create_app(settings)) as test_client:
        assert _wait_ready(test_client).status_code == 200
        response = test_client.post(
            "/v1/predict",
            files=[
                *(("files", (p.name, p.read_bytes(), "application/fits")) for p in paths[:3]),
                ("files", ("notes.fits", b"not a FITS file", "application/fits")),
                *(("files", (p.name, p.read_bytes(), "application/fits")) for p in paths[3:]),
            ],
            params={"seed": SEED},
        )
    assert response.status_code == 200, response.text
    # Not a plain cube: astropy's layouts, and a file that is not FITS at all.
    assert sorted(sent) == ["00000_cube.fits.gz", "00000_mef.fits", "00000_rice.fits", "notes.fits"]
    results = response.json()["results"]
    # Every file answers in its place, the refused one too (plain files go in groups).
    assert [r["filename"] for r in results] == [*names[:3], "notes.fits", *names[3:]]
    assert results[3]["error"]["code"] == "invalid_fits"
    results = results[:3] + results[4:]
    reference = [results[0]["lens_probability"], *results[0]["parameters"].values()]
    for result in results[1:]:
        tolerance = LOSSY_TOLERANCE if result["filename"].endswith(LOSSY_SUFFIXES) else 1e-4
        got = [result["lens_probability"], *result["parameters"].values()]
        np.testing.assert_allclose(got, reference, rtol=0, atol=tolerance)


# ----------------------------------------------------------------------------- calibration


def _models_with_regime_table(folder: Path, table: dict[str, Any] | None) -> Path:
    """The shipped models in ``folder``, the MC card's per-regime table replaced (or removed)."""
    folder.mkdir()
    for data_file in [*MODELS_DIR.glob("*.onnx"), *MODELS_DIR.glob("*.npz")]:
        (folder / data_file.name).symlink_to(data_file)
    for name in ("lens_classifier", "einstein_radius", "einstein_radius_mc"):
        card = json.loads((MODELS_DIR / f"{name}.json").read_text())
        if name == "einstein_radius_mc":
            card.pop("regime_calibration", None)
            if table is not None:
                card["regime_calibration"] = table
        (folder / f"{name}.json").write_text(json.dumps(card))
    return folder


def _uniform_table(shift: float, scale: float) -> dict[str, Any]:
    """A table whose every regime says: residual quantiles are shift + scale * z (Gaussian)."""
    z = [NormalDist().inv_cdf(level) for level in REGIME_TABLE_LEVELS]
    return {
        "theta_E_edges_arcsec": [1.0, 2.0],
        "signal_to_noise_edges": [10.0, 100.0],
        "levels": list(REGIME_TABLE_LEVELS),
        "residual_quantiles": [[[shift + scale * v for v in z]] * 3] * 3,
    }


def test_the_mc_cards_regime_table_sets_the_served_distribution(tmp_path):
    """Through the real app and the shipped MC model: no table serves the mixture as before;
    a table makes every field the calibrated distribution m + s G(Z), with G from the card."""
    data = CLEAN[0].read_bytes()
    params = {"seed": SEED, "samples": 64, "include_samples": "true"}
    tables = {
        "none": None,
        "gaussian": _uniform_table(0.0, 1.0),
        "wide": _uniform_table(0.1, 2.0),
    }
    answers = {}
    for name, table in tables.items():
        models = _models_with_regime_table(tmp_path / name, table)
        with TestClient(create_app(Settings(models_dir=models, device="cpu"))) as test_client:
            assert _wait_ready(test_client).status_code == 200
            response = test_client.post(
                "/v1/predict", content=data, params=params, headers=FITS_MEDIA
            )
        assert response.status_code == 200, response.text
        (result,) = response.json()["results"]
        _assert_result_schema(result, samples=64)
        answers[name] = result["einstein_radius"]

    # No table: today's answer, the mixture read at the card's mixture levels, computed here
    # from the runtime called directly with the request's seed (its first chunk's dropout seed).
    runtime = OnnxModelRuntime(tmp_path / "none", device="cpu", warmup_batch_sizes=())
    runtime.load()
    prepared = prepare_cutout(data, filename="a", models=runtime.models, limits=FitsLimits())
    raw = runtime.predict(prepared.image[None], num_samples=64, seed=SEED)
    mixture = summarise_mc_samples(
        raw.theta_E_samples, raw.theta_E_log_variance_samples, runtime.models.mc_mixture_levels
    )
    runtime.close()
    none = answers["none"]
    assert none["calibration"] == "mixture"
    np.testing.assert_allclose(list(none["quantiles"].values()), mixture.quantiles[0], rtol=1e-6)
    np.testing.assert_allclose([none["mean"], none["std"]], [mixture.mean[0], mixture.std[0]])
    m, a, e = none["mean"], none["aleatoric_std"], none["epistemic_std"]
    s = np.sqrt(a**2 + e**2 * 65 / 63)  # regime_spread at T = 64
    z = np.array([NormalDist().inv_cdf(level) for level in QUANTILE_LEVELS])
    # The Gaussian table's G is the identity: moments m and s, Gaussian quantiles. Its
    # moments are integrated on a grid, to ~1e-7 of the std.
    gaussian = answers["gaussian"]
    assert gaussian["calibration"] == "per_regime"
    assert gaussian["signal_to_noise"] == pytest.approx(none["signal_to_noise"]) and s > 0
    np.testing.assert_allclose([gaussian["mean"], gaussian["std"]], [m, s], rtol=1e-6)
    np.testing.assert_allclose(list(gaussian["quantiles"].values()), m + s * z, rtol=1e-6)
    assert gaussian["quantiles"] != none["quantiles"]
    # The wide table moves the centre by 0.1 s and doubles every spread, the draws too; the
    # two parts keep the mixture's proportions.
    wide = answers["wide"]
    np.testing.assert_allclose([wide["mean"], wide["std"]], [m + 0.1 * s, 2 * s], rtol=1e-6)
    ratio = 2 * s / none["std"]
    np.testing.assert_allclose(
        [wide["aleatoric_std"], wide["epistemic_std"]], [ratio * a, ratio * e], rtol=1e-6
    )
    np.testing.assert_allclose(list(wide["quantiles"].values()), m + s * (0.1 + 2 * z), rtol=1e-6)
    draws = np.random.default_rng((SEED, 0)).standard_normal(64)  # the request's draw stream
    np.testing.assert_allclose(wide["samples"], m + s * (0.1 + 2 * draws), rtol=1e-6)
