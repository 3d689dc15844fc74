"""API keys and CORS on a real ``lensserve serve`` process.

With ``LENSSERVE_API_KEYS`` set, everything under ``/v1`` and ``/v2`` (routes
that exist or not) needs a key; health, metrics, docs and the schema stay
open; the keys never reach the logs.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from service.api.guards import is_protected, presented_key
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
CLEAN = sorted((REPO / "examples" / "cutouts" / "clean").glob("*.fits"))
#: Test keys, made up here: at least 16 printable characters each.
KEYS = ("test-key-0123456789abcdef", "second-key-fedcba9876543210")
ORIGIN = "https://lenses.example.org"
FITS_MEDIA = {"content-type": "application/fits"}

pytestmark = pytest.mark.skipif(not CLEAN, reason="no sample cutouts")


@pytest.fixture(scope="module")
def keyed_server(launch_server):
    return launch_server(
        LENSSERVE_API_KEYS=",".join(KEYS),
        LENSSERVE_CORS_ORIGINS=ORIGIN,
        LENSSERVE_SHUTDOWN_GRACE_S="0",
    )


@pytest.fixture(scope="module")
def client(keyed_server):
    with httpx.Client(base_url=keyed_server.url, timeout=60.0) as http:
        yield http


def _assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    error = response.json()["error"]
    if response.url.path.startswith("/v2"):
        assert "API key" in error  # the Open Inference Protocol's {"error": "<message>"}
    else:
        assert error["code"] == "unauthorized"


@pytest.mark.slow
def test_a_request_without_a_key_gets_401_and_with_one_gets_200(client):
    data = CLEAN[0].read_bytes()
    _assert_unauthorized(client.post("/v1/predict", content=data, headers=FITS_MEDIA))
    wrong = {**FITS_MEDIA, "authorization": f"Bearer {KEYS[0]}x"}
    _assert_unauthorized(client.post("/v1/predict", content=data, headers=wrong))
    _assert_unauthorized(client.post("/v1/predict", content=data, headers={"x-api-key": "nope"}))
    for headers in ({"authorization": f"Bearer {KEYS[0]}"}, {"x-api-key": KEYS[1]}):
        response = client.post("/v1/predict", content=data, headers={**FITS_MEDIA, **headers})
        assert response.status_code == 200, response.text
        assert client.get("/v1/models", headers=headers).status_code == 200


@pytest.mark.slow
def test_every_path_under_v1_and_v2_needs_a_key_and_the_rest_stays_open(client):
    for path in ("/v1/models", "/v1/anything", "/v2", "/v2/models/lens/infer", "/v1"):
        _assert_unauthorized(client.get(path))
    for path in ("/health/live", "/health/ready", "/metrics", "/openapi.json", "/docs"):
        assert client.get(path).status_code == 200, path
    assert client.get("/v10/predict").status_code == 404  # not under /v1


@pytest.mark.slow
def test_cors_allows_only_the_configured_origin_even_before_a_key(client):
    preflight = {
        "origin": ORIGIN,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type",
    }
    response = client.options("/v1/predict", headers=preflight)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    refused = client.options("/v1/predict", headers={**preflight, "origin": "https://evil.test"})
    assert "access-control-allow-origin" not in refused.headers
    # A refusal still carries CORS headers, so the page can read why.
    response = client.get("/v1/models", headers={"origin": ORIGIN})
    _assert_unauthorized(response)
    assert response.headers["access-control-allow-origin"] == ORIGIN


@pytest.mark.slow
def test_the_keys_never_reach_the_logs(client, keyed_server):
    client.get("/v1/models", headers={"authorization": f"Bearer {KEYS[0]}"})
    client.get("/v1/models", headers={"x-api-key": KEYS[1] + "-wrong"})
    log = keyed_server.log()
    assert "GET /v1/models" in log  # the access log is on
    assert not any(key in log for key in KEYS)


def test_without_keys_or_origins_nothing_is_required_or_allowed(monkeypatch):
    for name in ("LENSSERVE_API_KEYS", "LENSSERVE_CORS_ORIGINS"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.api_keys == [] and settings.cors_origins == []


def test_keys_and_origins_read_as_lists_and_stay_secret(monkeypatch):
    monkeypatch.setenv("LENSSERVE_API_KEYS", f'["{KEYS[0]}", "{KEYS[1]}"]')
    monkeypatch.setenv("LENSSERVE_CORS_ORIGINS", f"{ORIGIN}, http://localhost:8000")
    settings = Settings()
    assert [key.get_secret_value() for key in settings.api_keys] == list(KEYS)
    assert settings.cors_origins == [ORIGIN, "http://localhost:8000"]
    assert KEYS[0] not in repr(settings) and KEYS[0] not in str(settings.model_dump())
    monkeypatch.setenv("LENSSERVE_API_KEYS", "short-key")
    with pytest.raises(ValueError) as refused:
        Settings()
    assert "short-key" not in str(refused.value)


def test_key_lookup_and_protected_paths():
    assert presented_key([(b"authorization", b"Bearer abc")]) == b"abc"
    assert presented_key([(b"authorization", b"bearer  abc ")]) == b"abc"
    assert presented_key([(b"authorization", b"Basic abc")]) is None
    assert presented_key([(b"x-api-key", b"abc")]) == b"abc"
    assert presented_key([]) is None
    assert is_protected("/v1") and is_protected("/v2/models/x/infer")
    assert not is_protected("/v10") and not is_protected("/health/ready")
    assert not is_protected("/") and not is_protected("/static/app.js")
