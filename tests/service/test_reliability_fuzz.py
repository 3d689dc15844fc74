"""Hostile FITS input: astropy's own test files and mutants of real files, decoder and HTTP.

The seeds are every FITS file astropy ships for its own tests (tables, random
groups, compressed images, checksums, broken headers) and the repository's sample
cutouts. Hypothesis mutates them structurally (lies in NAXISn, BITPIX, PCOUNT,
ZNAXISn..., hostile cards, flipped bytes, spliced blocks, truncation, gzip).
The decoder may only answer or raise a :class:`~service.errors.LensServeError`;
a real server may only answer 200 or 4xx, and must stay up. schemathesis then
checks every operation in ``/openapi.json`` against the same server.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import astropy
import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.errors import LensServeError
from service.fits.decode import FitsLimits, decode_fits

ASTROPY_DATA = Path(astropy.__file__).parent / "io" / "fits" / "tests" / "data"
ASTROPY_FILES = sorted(p for p in ASTROPY_DATA.rglob("*") if p.is_file() and ".fits" in p.name)
SAMPLES = Path(__file__).resolve().parents[2] / "examples" / "cutouts"
SAMPLE_FILES = sorted((SAMPLES / "clean").glob("*.fits")) + sorted((SAMPLES / "formats").glob("*"))
SEED_FILES = ASTROPY_FILES + SAMPLE_FILES
#: The issue asks for at least this many mutants over HTTP.
HTTP_MUTANTS = 500
#: Small enough that a lying header cannot make a test slow, large enough for the samples.
FUZZ_LIMITS = FitsLimits(max_pixels=2**20)

_BLOCK_BYTES = 2880
_CARD_BYTES = 80
#: Keywords whose values decide how many bytes follow, and how they are read.
STRUCTURAL_KEYWORDS = (
    b"BITPIX",
    b"NAXIS",
    b"NAXIS1",
    b"NAXIS2",
    b"NAXIS3",
    b"PCOUNT",
    b"GCOUNT",
    b"ZNAXIS1",
    b"ZNAXIS2",
    b"ZNAXIS3",
    b"ZTILE1",
    b"ZTILE2",
    b"ZBITPIX",
    b"TFIELDS",
    b"THEAP",
    b"BLANK",
    b"BSCALE",
    b"BZERO",
)
INTERESTING_VALUES = (
    -(2**63),
    -(2**31),
    -64,
    -32,
    -1,
    0,
    1,
    2,
    3,
    7,
    8,
    16,
    64,
    999,
    2**31 - 1,
    2**31,
    2**32 + 1,
    2**62,
    10**20,
)
HOSTILE_CARDS = (
    "ZCMPTYPE= 'HCOMPRESS_1'",
    "ZCMPTYPE= 'PLIO_1'",
    "ZCMPTYPE= 'RICE_1'",
    "ZCMPTYPE= 'NOPE'",
    "ZIMAGE  =                    T",
    "XTENSION= 'BINTABLE'",
    "XTENSION= 'IMAGE   '",
    "SIMPLE  =                    F",
    "GROUPS  =                    T",
    "TFORM1  = '1PB(99999999)'",
    "TFORM1  = 'QD'",
    "CTYPE1  = 'RA---ZPN'",
    "CTYPE3  = 'WAVE-LOG'",
    "PV2_1   =                1E300",
    "CDELT1  =                  0.0",
    "BANDS   = 'g,r,i'",
    "CONTINUE  '&'",
    "END",
)


def _seed_id(path: Path) -> str:
    return str(path.relative_to(path.parents[1]))


@st.composite
def fits_mutants(draw: st.DrawFn, seeds: tuple[Path, ...] = tuple(SEED_FILES)) -> bytes:
    """A real FITS file, structurally mutated: lying keywords, hostile cards, bytes, blocks."""
    data = bytearray(draw(st.sampled_from(seeds)).read_bytes())
    if data[:2] == b"\x1f\x8b":
        data = bytearray(gzip.decompress(bytes(data)))
    cards = [i for i in range(0, min(len(data), 8 * _BLOCK_BYTES), _CARD_BYTES)]
    structural = [i for i in cards if data[i : i + 8].rstrip() in STRUCTURAL_KEYWORDS]
    if structural:
        for _ in range(draw(st.integers(0, 3))):
            at = draw(st.sampled_from(structural))
            value = str(draw(st.sampled_from(INTERESTING_VALUES))).rjust(20).encode()
            data[at + 10 : at + 30] = value
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.sampled_from(cards))
        data[at : at + _CARD_BYTES] = draw(st.sampled_from(HOSTILE_CARDS)).ljust(80).encode()
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    blocks = len(data) // _BLOCK_BYTES
    if blocks > 1 and draw(st.booleans()):
        source, target = draw(st.integers(0, blocks - 1)), draw(st.integers(0, blocks - 1))
        block = data[source * _BLOCK_BYTES : (source + 1) * _BLOCK_BYTES]
        data[target * _BLOCK_BYTES : (target + 1) * _BLOCK_BYTES] = block
    if draw(st.integers(0, 3)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.integers(0, 4)) == 0:
        data = bytearray(gzip.compress(bytes(data), compresslevel=1))
    return bytes(data)


def _decodes_or_refuses(data: bytes) -> None:
    """A well-formed cutout or a LensServeError with a message; nothing else."""
    try:
        decoded = decode_fits(data, limits=FUZZ_LIMITS)
    except LensServeError as error:
        assert str(error)
        return
    assert decoded.pixels.shape == (3, 64, 64) and decoded.pixels.dtype == np.float32


def test_astropy_ships_its_fits_test_files():
    # astropy 6-8 ship about 35 of them; a packaging change that drops them must not go unseen.
    assert len(ASTROPY_FILES) >= 30, ASTROPY_DATA


@pytest.mark.parametrize("path", ASTROPY_FILES, ids=_seed_id)
def test_every_astropy_test_file_decodes_or_raises_a_service_error(path):
    _decodes_or_refuses(path.read_bytes())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fits_mutants())
def test_fuzz_mutated_astropy_and_sample_files_raise_only_service_errors(data):
    _decodes_or_refuses(data)


# --------------------------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def server(launch_server) -> str:
    return launch_server(LENSSERVE_LOG_LEVEL="warning", LENSSERVE_SHUTDOWN_GRACE_S="0").url


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server, timeout=60.0) as http:
        yield http


def _assert_answered(response: httpx.Response) -> None:
    """200 with results, or a 4xx JSON error: never a 5xx."""
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    body = response.json()
    if response.status_code == 200:
        assert len(body["results"]) == 1
    else:
        assert set(body) == {"error"} and body["error"]["code"] and body["error"]["message"]


def _post(client: httpx.Client, data: bytes) -> httpx.Response:
    return client.post(
        "/v1/predict", content=data, params={"samples": 8}, headers={"content-type": "image/fits"}
    )


def _assert_alive(client: httpx.Client) -> None:
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").status_code == 200


@pytest.mark.slow
def test_every_astropy_test_file_gets_200_or_4xx_over_http(client):
    statuses = {}
    for path in ASTROPY_FILES:
        response = _post(client, path.read_bytes())
        _assert_answered(response)
        statuses[_seed_id(path)] = response.status_code
    _assert_alive(client)
    # Tables, random groups and 2D images are not g, r, i cutouts: refused, not crashed.
    assert set(statuses.values()) <= {200, 400, 413, 415, 422}
    assert len(statuses) == len(ASTROPY_FILES)


@pytest.mark.slow
def test_http_fuzz_mutants_get_200_or_4xx_and_the_server_stays_up(client, server):
    statuses: list[int] = []

    @settings(
        max_examples=HTTP_MUTANTS,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(fits_mutants())
    def post_mutant(data: bytes) -> None:
        response = _post(client, data)
        _assert_answered(response)
        statuses.append(response.status_code)

    post_mutant()
    assert len(statuses) >= HTTP_MUTANTS
    _assert_alive(client)
    # The mix, for the record: most mutants are refused, a few still decode.
    assert any(400 <= status < 500 for status in statuses)
    metrics = client.get("/metrics").text
    work_5xx = r'lensserve_requests_total\{[^}]*route="/v[^}]*status="5\d\d"\} (\S+)'
    server_errors = re.findall(work_5xx, metrics)
    assert not any(float(count) for count in server_errors), metrics


# --------------------------------------------------------------------------------- schemathesis


#: Generated cases per operation: enough to hit each parameter's bounds and odd bodies.
SCHEMA_EXAMPLES = 40


@pytest.mark.slow
def test_openapi_operations_never_answer_5xx_and_match_the_schema(server):
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/v1/predict",
        "/v1/models",
        "/health/ready",
        "/v2/models/{model_name}/infer",
    }
    calls: dict[str, int] = {}
    for operation in operations:

        @settings(
            max_examples=SCHEMA_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def call(case: schemathesis.Case) -> None:
            case.call_and_validate(
                checks=[
                    not_a_server_error,
                    status_code_conformance,
                    content_type_conformance,
                    response_schema_conformance,
                ]
            )
            calls[case.operation.label] = calls.get(case.operation.label, 0) + 1

        call()
    assert len(calls) == len(operations), calls
