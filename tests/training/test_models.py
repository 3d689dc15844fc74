"""Model builders give the documented shapes, names and serialisation."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from training.config import ModelConfig  # noqa: E402
from training.models import (  # noqa: E402
    PARAMETER_NAMES,
    McDropout,
    build_einstein_radius,
    build_einstein_radius_mc,
    build_lens_classifier,
    build_mc_head,
    build_mc_sampler,
    mc_trunk_and_head,
)

CONFIG = ModelConfig()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(3, *CONFIG.input_shape)).astype(np.float32)


def test_classifier_outputs_a_probability(images):
    model = build_lens_classifier(CONFIG)
    assert model.name == "lens_classifier"
    assert (
        model.output.name.startswith("lens_probability")
        or model.layers[-1].name == "lens_probability"
    )
    probability = model.predict(images, verbose=0)
    assert probability.shape == (3, 1)
    assert np.all((probability >= 0) & (probability <= 1))


def test_regressor_outputs_five_parameters(images):
    model = build_einstein_radius(CONFIG)
    assert model.layers[-1].name == "parameters"
    assert model.predict(images, verbose=0).shape == (3, len(PARAMETER_NAMES))
    assert model.get_layer("einstein_radius_trunk").output.shape[-1] == CONFIG.feature_units


def test_mc_model_samples_differ_and_round_trip(tmp_path, images):
    regressor = build_einstein_radius(CONFIG)
    trunk = regressor.get_layer("einstein_radius_trunk")
    model = build_einstein_radius_mc(trunk, build_mc_head(CONFIG), num_samples=7)
    out = model.predict(images, verbose=0)
    assert out.shape == (3, 7, 2)
    # Dropout stays active at inference: the 7 passes of one cutout are not all equal.
    assert np.std(out[0, :, 0]) > 0

    path = tmp_path / "mc.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    assert any(
        isinstance(layer, McDropout) for layer in loaded.get_layer("einstein_radius_mc_head").layers
    )
    loaded_trunk, loaded_head = mc_trunk_and_head(loaded)
    np.testing.assert_allclose(
        loaded_trunk.predict(images, verbose=0), trunk.predict(images, verbose=0), atol=1e-5
    )
    means, log_variances = build_mc_sampler(loaded_trunk, loaded_head, CONFIG.input_shape)(
        images, np.int32(11)
    )
    assert means.shape == (3, 11) and log_variances.shape == (3, 11)


def test_mc_dropout_rejects_a_bad_rate():
    with pytest.raises(ValueError, match="dropout rate"):
        McDropout(1.5)
