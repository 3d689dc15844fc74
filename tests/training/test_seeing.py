"""The seeing estimator grafted into the classifier's ONNX graph (training.seeing).

A real Keras network (untrained: the graft, not the fit, is under test) is
converted with tf2onnx and grafted into a copy of the shipped classifier; real
onnxruntime sessions compare the graph before and after.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("tensorflow")

from service.contract.cards import SEEING_OUTPUT, read_model_card, read_model_cards  # noqa: E402
from training.seeing import (  # noqa: E402
    KERAS_FILE,
    build_seeing_estimator,
    graft_into_classifier,
    seeing_targets,
)

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="module")
def models_copy(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    for path in MODELS.iterdir():
        if path.suffix in {".onnx", ".json", ".npz"}:
            shutil.copy(path, folder / path.name)
    return folder


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_grafting_adds_the_seeing_output_and_keeps_the_classifier(models_copy: Path):
    card_path = models_copy / "lens_classifier.json"
    onnx_path = models_copy / read_model_card(card_path).onnx_file
    before = _session(onnx_path)
    images = np.random.default_rng(3).normal(0.0, 1.0, (5, 64, 64, 3)).astype(np.float32)
    probability, features = before.run(["lens_probability", "features"], {"image": images})

    model = build_seeing_estimator((64, 64, 3), np.log10([1.1, 1.0, 0.95]))
    for attempt in range(2):  # a second graft replaces the first
        graft_into_classifier(models_copy, model, {"epochs": attempt})
    after = _session(onnx_path)
    assert [o.name for o in after.get_outputs()].count(SEEING_OUTPUT) == 1
    p2, f2, seeing = after.run(["lens_probability", "features", SEEING_OUTPUT], {"image": images})
    np.testing.assert_array_equal(p2, probability)
    np.testing.assert_array_equal(f2, features)
    np.testing.assert_allclose(seeing, model.predict(images, verbose=0), rtol=1e-4, atol=1e-5)

    card = json.loads(card_path.read_text())
    assert card["seeing_estimator"]["keras_file"] == KERAS_FILE
    assert (models_copy / KERAS_FILE).exists()
    assert SEEING_OUTPUT in read_model_cards(models_copy).classifier.output_names


def test_seeing_targets_are_log10_fwhm_in_band_order():
    fwhm = {"g": 1.0, "r": 0.8, "i": 0.5}
    labels = {f"seeing_fwhm_arcsec_{b}": np.array([v, 2 * v]) for b, v in fwhm.items()}
    np.testing.assert_allclose(
        seeing_targets(labels), np.log10([[1.0, 0.8, 0.5], [2.0, 1.6, 1.0]]), rtol=1e-6
    )
