"""Open Inference Protocol v2: the tensor codec, and a real server called with tritonclient.

The model outputs expected from ``/v2`` are not constants: they are what the
same server answers on ``/v1`` for the same cutouts, whose preprocessed
tensors the test builds with the service's own :func:`prepare_cutout`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.oip_codec import (
    InferRequest,
    RequestedOutput,
    decode_infer_request,
    encode_infer_response,
    feeds_for_model,
)
from service.contract.cards import read_model_cards
from service.contract.uncertainty import calibrate_by_regime, summarise_mc_samples
from service.core.inference import prepare_cutout
from service.errors import InvalidRequestError
from service.fits.decode import DEFAULT_LIMITS
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
CLEAN_SAMPLES = sorted((REPO / "examples" / "cutouts" / "clean").glob("*.fits"))
MODELS = read_model_cards(REPO / "models")
SEED = 20240611
#: Agreement between /v1 and /v2 for the same float32 model calls (arcsec or probability).
TOLERANCE = 1e-4

needs_samples = pytest.mark.skipif(not CLEAN_SAMPLES, reason="sample cutouts missing")


# ----------------------------------------------------------------------------- codec


def _request(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def test_json_tensors_decode_flat_or_nested_in_row_major_order():
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    for data in (values.ravel().tolist(), values.tolist()):
        body = _request([{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": data}])
        decoded = decode_infer_request(body)
        np.testing.assert_array_equal(decoded.inputs["x"], values)
        assert decoded.inputs["x"].dtype == np.float32


def test_binary_tensors_follow_the_json_header_in_input_order():
    first = np.arange(4, dtype=np.float32).reshape(2, 2)
    second = np.array([7], dtype=np.int32)
    header = _request(
        [
            {
                "name": "a",
                "shape": [2, 2],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 16},
            },
            {"name": "b", "shape": [1], "datatype": "INT32", "parameters": {"binary_data_size": 4}},
        ]
    )
    decoded = decode_infer_request(header, first.tobytes() + second.tobytes())
    np.testing.assert_array_equal(decoded.inputs["a"], first)
    np.testing.assert_array_equal(decoded.inputs["b"], second)


@pytest.mark.parametrize(
    ("inputs", "binary", "message"),
    [
        ([{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0]}], b"", "elements"),
        ([{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}], b"", "datatype"),
        ([{"name": "x", "shape": [1], "datatype": "FP32"}], b"", "neither"),
        (
            [
                {
                    "name": "x",
                    "shape": [2],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 8},
                }
            ],
            b"\0" * 4,
            "ends inside",
        ),
        ([{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}], b"\0", "binary"),
    ],
)
def test_malformed_tensors_are_refused_with_what_was_wrong(inputs, binary, message):
    with pytest.raises(InvalidRequestError, match=message):
        decode_infer_request(_request(inputs), binary)


def test_feeds_follow_the_card_and_accept_a_scalar_sent_as_one_element():
    card = MODELS.mc
    image = np.zeros((2, 64, 64, 3), dtype=np.float32)
    feeds = feeds_for_model(
        card, {"image": image, "num_samples": np.array([5], dtype=np.int32)}, defaults={}
    )
    assert feeds["num_samples"].shape == () and int(feeds["num_samples"]) == 5
    default = {"num_samples": np.asarray(9, dtype=np.int32)}
    assert int(feeds_for_model(card, {"image": image}, defaults=default)["num_samples"]) == 9
    with pytest.raises(InvalidRequestError, match=r"\[-1, 64, 64, 3\]"):
        feeds_for_model(card, {"image": image[:, :32]}, defaults=default)
    with pytest.raises(InvalidRequestError, match="FP32"):
        feeds_for_model(card, {"image": image.astype(np.float64)}, defaults=default)
    with pytest.raises(InvalidRequestError, match="no input"):
        feeds_for_model(card, {"image": image, "extra": image}, defaults=default)


def test_binary_outputs_come_after_the_header_whose_length_is_reported():
    outputs = {"p": np.array([[0.25], [0.5]], dtype=np.float32), "q": np.array([1.0], np.float32)}
    request = InferRequest("7", {}, {}, [RequestedOutput("p", True), RequestedOutput("q", False)])
    encoded = encode_infer_response(request, model_name="m", model_version="1", outputs=outputs)
    assert encoded.header_length is not None
    header = json.loads(encoded.body[: encoded.header_length])
    assert header["id"] == "7" and [o["name"] for o in header["outputs"]] == ["p", "q"]
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert header["outputs"][1]["data"] == [1.0]
    blob = np.frombuffer(encoded.body[encoded.header_length :], dtype="<f4")
    np.testing.assert_array_equal(blob.reshape(2, 1), outputs["p"])


# ----------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def triton(live_server: str) -> Any:
    http = pytest.importorskip("tritonclient.http")
    client = http.InferenceServerClient(live_server.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """The clean cutouts as the models take them, shape (12, 64, 64, 3) float32."""
    return np.stack(
        [
            prepare_cutout(
                p.read_bytes(), filename=p.name, models=MODELS, limits=DEFAULT_LIMITS
            ).image
            for p in CLEAN_SAMPLES
        ]
    )


@pytest.fixture(scope="module")
def v1_answers(live_server: str) -> list[dict[str, Any]]:
    """/v1 answers for each clean cutout sent alone with the test seed."""
    answers = []
    with httpx.Client(base_url=live_server, timeout=60.0) as http:
        for path in CLEAN_SAMPLES:
            response = http.post(
                "/v1/predict",
                content=path.read_bytes(),
                params={"seed": SEED},
                headers={"content-type": "application/fits"},
            )
            assert response.status_code == 200, response.text
            answers.append(response.json()["results"][0])
    return answers


def _infer(triton: Any, model: str, arrays: dict[str, np.ndarray], *, binary: bool, **kw: Any):
    http = pytest.importorskip("tritonclient.http")
    inputs = []
    for name, array in arrays.items():
        datatype = {"float32": "FP32", "int32": "INT32"}[array.dtype.name]
        tensor = http.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return triton.infer(model, inputs, **kw)


@needs_samples
@pytest.mark.slow
def test_server_metadata_and_health_answer_tritonclient(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    metadata = triton.get_server_metadata()
    assert metadata["name"] == "lensserve" and "binary_tensor_data" in metadata["extensions"]
    for card in MODELS.cards.values():
        assert triton.is_model_ready(card.name)
        assert triton.is_model_ready(card.name, model_version=card.version)


@needs_samples
@pytest.mark.slow
def test_model_metadata_lists_the_cards_inputs_and_outputs(triton):
    for card in MODELS.cards.values():
        metadata = triton.get_model_metadata(card.name)
        assert metadata["name"] == card.name and metadata["versions"] == [card.version]
        expected_inputs = [{"name": "image", "datatype": "FP32", "shape": [-1, 64, 64, 3]}]
        if card.name == "einstein_radius_mc":
            expected_inputs.append({"name": "num_samples", "datatype": "INT32", "shape": []})
        assert metadata["inputs"] == expected_inputs
        assert metadata["outputs"] == [
            {"name": o.name, "datatype": "FP32", "shape": [-1 if d is None else d for d in o.shape]}
            for o in card.outputs
        ]


@needs_samples
@pytest.mark.slow
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_classifier_and_regressor_agree_with_v1(triton, images, v1_answers, binary):
    classified = _infer(triton, "lens_classifier", {"image": images}, binary=binary)
    probability = classified.as_numpy("lens_probability")
    assert probability.shape == (12, 1)
    expected = [answer["lens_probability"] for answer in v1_answers]
    np.testing.assert_allclose(probability[:, 0], expected, rtol=0, atol=TOLERANCE)

    regressed = _infer(triton, "einstein_radius", {"image": images}, binary=binary)
    expected_parameters = [list(answer["parameters"].values()) for answer in v1_answers]
    np.testing.assert_allclose(
        regressed.as_numpy("parameters"), expected_parameters, rtol=0, atol=TOLERANCE
    )


@needs_samples
@pytest.mark.slow
def test_a_seeded_mc_request_draws_the_masks_of_the_seeded_v1_request(triton, images, v1_answers):
    # /v1 with one file and seed S runs the MC model once, on that cutout alone, seeded with S.
    arrays = {"image": images[:1], "num_samples": np.array([100], dtype=np.int32)}
    result = _infer(triton, "einstein_radius_mc", arrays, binary=True, parameters={"seed": SEED})
    means = result.as_numpy("theta_E_samples")
    assert means.shape == (1, 100)
    summary = summarise_mc_samples(means, result.as_numpy("theta_E_log_variance_samples"))
    radius = v1_answers[0]["einstein_radius"]
    if MODELS.mc_regime_table is not None:  # /v1 answers the card's per-regime calibration
        summary = calibrate_by_regime(
            summary,
            MODELS.mc_regime_table,
            theta_E_arcsec=np.array([v1_answers[0]["parameters"]["theta_E"]]),
            signal_to_noise=np.array([radius["signal_to_noise"]]),
            num_samples=100,
        )
    np.testing.assert_allclose(summary.mean[0], radius["mean"], rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(summary.std[0], radius["std"], rtol=0, atol=TOLERANCE)


@needs_samples
@pytest.mark.slow
def test_a_json_request_built_from_the_spec_gets_a_json_answer(live_server, images):
    body = {
        "id": "42",
        "inputs": [
            {
                "name": "image",
                "shape": [1, 64, 64, 3],
                "datatype": "FP32",
                "data": images[0].tolist(),
            }
        ],
        "outputs": [{"name": "lens_probability"}],
    }
    response = httpx.post(f"{live_server}/v2/models/lens_classifier/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["id"] == "42" and answer["model_name"] == "lens_classifier"
    (output,) = answer["outputs"]
    assert output["name"] == "lens_probability" and output["datatype"] == "FP32"
    assert output["shape"] == [1, 1] and 0.0 <= output["data"][0] <= 1.0


def _image_input(shape: list[int], datatype: str = "FP32") -> dict[str, Any]:
    count = int(np.prod(shape))
    return {"name": "image", "shape": shape, "datatype": datatype, "data": [0] * count}


@needs_samples
@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v2/models/nope/infer", {"inputs": [_image_input([1, 64, 64, 3])]}, 404),
        (
            "/v2/models/lens_classifier/versions/9.9/infer",
            {"inputs": [_image_input([1, 64, 64, 3])]},
            404,
        ),
        ("/v2/models/lens_classifier/infer", {"inputs": [_image_input([1, 64, 64])]}, 400),
        (
            "/v2/models/lens_classifier/infer",
            {"inputs": [_image_input([1, 64, 64, 3], "INT32")]},
            400,
        ),
        ("/v2/models/lens_classifier/infer", {"inputs": []}, 400),
        ("/v2/models/lens_classifier/infer", "not json", 400),
        (
            "/v2/models/einstein_radius_mc/infer",
            {
                "inputs": [
                    _image_input([1, 64, 64, 3]),
                    {"name": "num_samples", "shape": [1], "datatype": "INT32", "data": [10**6]},
                ]
            },
            400,
        ),
        (
            "/v2/models/lens_classifier/infer",
            {"inputs": [_image_input([1, 64, 64, 3])], "outputs": [{"name": "nope"}]},
            400,
        ),
    ],
)
def test_errors_are_answered_in_the_protocols_shape(live_server, path, body, status):
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    response = httpx.post(f"{live_server}{path}", content=content, timeout=30)
    assert response.status_code == status, response.text
    answer = response.json()
    assert set(answer) == {"error"} and isinstance(answer["error"], str) and answer["error"]


def test_v2_says_not_ready_while_the_models_cannot_load(tmp_path):
    app = create_app(Settings(models_dir=tmp_path, device="cpu", warmup=False))
    with TestClient(app) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 400
        assert client.get("/v2/models/lens_classifier/ready").status_code == 400
        response = client.post("/v2/models/lens_classifier/infer", json={"inputs": []})
        assert response.status_code == 503 and set(response.json()) == {"error"}
