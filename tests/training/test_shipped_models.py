"""The shipped models: cards match files, ONNX agrees with Keras, MC is stochastic
and calibrated in distribution, and predictions ignore the flux unit."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from astropy.io import fits

keras = pytest.importorskip("keras")

import training  # noqa: E402,F401  (registers the custom layers)
from service.contract.preprocessing import PREPROCESSING_ID, preprocess_batch  # noqa: E402
from training.models import build_mc_sampler, mc_trunk_and_head  # noqa: E402
from training.symmetry import average_over_views, parameter_map, rotate_images  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
SAMPLES = ROOT / "examples" / "cutouts" / "clean"
NAMES = ("lens_classifier", "einstein_radius", "einstein_radius_mc")


def _card(name: str) -> dict:
    return json.loads((MODELS / f"{name}.json").read_text())


def _session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(MODELS / f"{name}.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def cubes() -> np.ndarray:
    files = sorted(SAMPLES.glob("*.fits"))
    assert len(files) == 12, f"expected the 12 sample cutouts in {SAMPLES}"
    return np.stack([fits.getdata(f).astype(np.float64) for f in files])


@pytest.mark.parametrize("name", NAMES)
def test_card_names_its_files_and_hash(name):
    card = _card(name)
    onnx_path = MODELS / card["onnx_file"]
    assert hashlib.sha256(onnx_path.read_bytes()).hexdigest() == card["onnx_sha256"]
    assert (MODELS / card["keras_file"]).exists()
    assert card["input"]["bands"] == ["g", "r", "i"]
    assert card["input"]["pixel_scale_arcsec"] == pytest.approx(0.263)
    assert card["input"]["preprocessing"] == PREPROCESSING_ID
    session_inputs = [i.name for i in _session(name).get_inputs()]
    assert session_inputs == [card["input"]["name"], *(i["name"] for i in card["extra_inputs"])]
    assert [o.name for o in _session(name).get_outputs()] == [o["name"] for o in card["outputs"]]


@pytest.mark.parametrize("name", ["lens_classifier", "einstein_radius"])
def test_deterministic_models_match_keras(name, cubes):
    images = preprocess_batch(cubes)
    model = keras.saving.load_model(MODELS / f"{name}.keras")
    if name == "einstein_radius":
        # The graph averages the Keras model over the cutout's rotations by 90 degrees.
        views = _card(name)["theta_E_views"]
        expected = average_over_views(
            np.stack([model.predict(rotate_images(images, k), verbose=0) for k in range(views)])
        )
    else:
        expected = model.predict(images, verbose=0)
    got, *features = _session(name).run(None, {"image": images})
    np.testing.assert_allclose(got, expected, atol=1e-4)
    if name == "lens_classifier":
        # The second output is the trunk's feature vector (the out-of-distribution score's input).
        trunk = model.get_layer("lens_classifier_trunk").predict(images, verbose=0)
        np.testing.assert_allclose(features[0], trunk, atol=1e-3)


def test_mc_graph_gives_the_regressor_point_estimates(cubes):
    images = preprocess_batch(cubes)
    card = _card("einstein_radius_mc")
    point = next(o for o in card["outputs"] if o["name"] == "parameters")
    regressor_output = _card("einstein_radius")["outputs"][0]
    assert point["components"] == regressor_output["components"]
    assert point["units"] == regressor_output["units"]
    (expected,) = _session("einstein_radius").run(None, {"image": images})
    for num_samples in (1, 100):
        (got,) = _session("einstein_radius_mc").run(
            ["parameters"], {"image": images, "num_samples": np.array(num_samples, np.int32)}
        )
        # The same trunk and head weights on the same inputs: equal up to float32 rounding.
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    # Deterministic: the dropout that feeds the samples does not reach this output.
    (again,) = _session("einstein_radius_mc").run(
        ["parameters"], {"image": images, "num_samples": np.array(7, np.int32)}
    )
    np.testing.assert_array_equal(again, got)


@pytest.mark.parametrize("name", ["einstein_radius", "einstein_radius_mc"])
def test_theta_e_graphs_turn_with_the_cutout(name, cubes):
    """Averaged over the four rotations, a rotated cutout gets the same θ_E and turned e, centre."""
    assert _card(name)["theta_E_views"] == 4
    images = preprocess_batch(cubes)
    feeds = {"num_samples": np.array(3, np.int32)} if name == "einstein_radius_mc" else {}
    session = _session(name)
    (base,) = session.run(["parameters"], {"image": images, **feeds})
    for k in (1, 2, 3):
        (turned,) = session.run(["parameters"], {"image": rotate_images(images, k), **feeds})
        np.testing.assert_allclose(turned, base @ parameter_map(k).T, atol=1e-4)


def test_mc_model_is_stochastic_and_matches_keras_in_distribution(cubes):
    image = preprocess_batch(cubes[1:2])
    session = _session("einstein_radius_mc")
    n = 2000
    first = session.run(None, {"image": image, "num_samples": np.array(n, dtype=np.int32)})
    second = session.run(None, {"image": image, "num_samples": np.array(n, dtype=np.int32)})
    assert first[0].shape == (1, n)
    assert not np.array_equal(first[0], second[0]), "two ONNX runs gave identical MC samples"

    model = keras.saving.load_model(MODELS / "einstein_radius_mc.keras")
    trunk, head = mc_trunk_and_head(model)
    views = _card("einstein_radius_mc")["theta_E_views"]
    keras_means, keras_log_variances = build_mc_sampler(trunk, head, image.shape[1:], views=views)(
        image, np.int32(n)
    )
    for onnx_values, keras_values in ((first[0], keras_means), (first[1], keras_log_variances)):
        a, b = np.ravel(onnx_values), np.ravel(np.asarray(keras_values))
        # Means of two independent n-sample sets: standard error sqrt(2/n) * std; allow 5 sigma.
        pooled_std = np.sqrt((a.var() + b.var()) / 2)
        assert abs(a.mean() - b.mean()) < 5 * pooled_std * np.sqrt(2 / n)
        # Sample std: relative standard error ~ 1/sqrt(2n) each; allow 5 sigma of the ratio.
        assert abs(a.std() / b.std() - 1) < 5 * np.sqrt(1 / n)


@pytest.mark.parametrize("factor", [1e-3, 7.5, 1e4])
def test_predictions_do_not_depend_on_the_flux_unit(cubes, factor):
    for name in ("lens_classifier", "einstein_radius"):
        session = _session(name)
        first = [session.get_outputs()[0].name]
        (base,) = session.run(first, {"image": preprocess_batch(cubes)})
        (scaled,) = session.run(first, {"image": preprocess_batch(cubes * factor)})
        np.testing.assert_allclose(scaled, base, atol=1e-4)
    mc_feeds = {"num_samples": np.array(3, np.int32)}
    (base,) = _session("einstein_radius_mc").run(
        ["parameters"], {"image": preprocess_batch(cubes), **mc_feeds}
    )
    (scaled,) = _session("einstein_radius_mc").run(
        ["parameters"], {"image": preprocess_batch(cubes * factor), **mc_feeds}
    )
    np.testing.assert_allclose(scaled, base, atol=1e-4)


def test_masked_pixels_are_tolerated(cubes):
    masked = cubes.copy()
    masked[:, :, 5:8, :] = np.nan
    (probability,) = _session("lens_classifier").run(
        ["lens_probability"], {"image": preprocess_batch(masked)}
    )
    assert np.all(np.isfinite(probability))
