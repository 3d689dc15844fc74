"""A tiny simulate -> train -> evaluate -> export -> onnxruntime run."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("lenstronomy")

from training.cli import main  # noqa: E402
from training.dataset import load_dataset  # noqa: E402


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path):
    data, runs, models = tmp_path / "data", tmp_path / "runs", tmp_path / "models"
    assert (
        main(["simulate", "--out", str(data), "--n", "160", "--seed", "3", "--workers", "2"]) == 0
    )
    dataset = load_dataset(data)
    assert dataset.images.shape == (160, 3, 64, 64)
    assert dataset.labels["is_lens"].sum() == 80
    lens_theta = dataset.labels["theta_E"][dataset.labels["is_lens"] == 1]
    assert np.all((lens_theta >= 0.45) & (lens_theta <= 3.2))
    assert np.all(np.isnan(dataset.labels["theta_E"][dataset.labels["is_lens"] == 0]))

    assert main(["train", "--data", str(data), "--runs", str(runs), "--quick"]) == 0
    assert main(["evaluate", "--data", str(data), "--runs", str(runs)]) == 0
    assert main(["export", "--runs", str(runs), "--models", str(models), "--data", str(data)]) == 0
    _check_seeing_and_ood(models, data)
    _check_finetune(runs, data, tmp_path / "tuned")
    _check_finetune_classifier_from_models(models, data, tmp_path / "tuned_from_models")
    _check_recalibrate(tmp_path / "tuned", data)

    image = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    for name in ("lens_classifier", "einstein_radius", "einstein_radius_mc"):
        card = json.loads((models / f"{name}.json").read_text())
        onnx_file = models / card["onnx_file"]
        assert hashlib.sha256(onnx_file.read_bytes()).hexdigest() == card["onnx_sha256"]
        assert card["metrics"]["test_split"]["n_cutouts"] == 160
        assert card["training_data"]["data"]["n_cutouts"] == 160
        session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        feeds = {"image": image}
        if card["extra_inputs"]:
            feeds["num_samples"] = np.array(5, dtype=np.int32)
        outputs = session.run(None, feeds)
        assert all(np.all(np.isfinite(o)) for o in outputs)
    # The MC graph gives the regressor's point estimates from its one trunk pass.
    (expected,) = ort.InferenceSession(
        str(models / "einstein_radius.onnx"), providers=["CPUExecutionProvider"]
    ).run(None, {"image": image})
    (from_mc,) = ort.InferenceSession(
        str(models / "einstein_radius_mc.onnx"), providers=["CPUExecutionProvider"]
    ).run(["parameters"], {"image": image, "num_samples": np.array(5, dtype=np.int32)})
    np.testing.assert_allclose(from_mc, expected, rtol=0, atol=1e-4)
    assert (models / "lens_classifier_roc.png").stat().st_size > 1000
    mc_metrics = json.loads((models / "einstein_radius_mc.json").read_text())["metrics"]
    assert 0.0 <= mc_metrics["coverage_68"] <= 1.0
    _check_classifier_round(models, data, tmp_path / "tuned_from_models", image)
    _check_reexport_theta_e(models, image)


def _check_reexport_theta_e(models, image) -> None:
    """The exported regressor is the Keras one averaged over four rotations; reexport-theta-e
    rewrites both theta_E graphs (here with one view: the Keras model itself) and their cards."""
    import keras

    from training.symmetry import average_over_views, rotate_images

    def onnx_parameters():
        session = ort.InferenceSession(
            str(models / "einstein_radius.onnx"), providers=["CPUExecutionProvider"]
        )
        return session.run(None, {"image": image})[0]

    regressor = keras.saving.load_model(models / "einstein_radius.keras", compile=False)
    per_view = np.stack([regressor.predict(rotate_images(image, k), verbose=0) for k in range(4)])
    assert json.loads((models / "einstein_radius.json").read_text())["theta_E_views"] == 4
    np.testing.assert_allclose(onnx_parameters(), average_over_views(per_view), atol=1e-4)

    command = ["reexport-theta-e", "--models", str(models), "--views", "1"]
    assert main([*command, "--version", "9.9.9"]) == 0
    np.testing.assert_allclose(onnx_parameters(), per_view[0], atol=1e-4)
    for name in ("einstein_radius", "einstein_radius_mc"):
        card = json.loads((models / f"{name}.json").read_text())
        assert (card["version"], card["theta_E_views"]) == ("9.9.9", 1)
        onnx_file = models / card["onnx_file"]
        assert hashlib.sha256(onnx_file.read_bytes()).hexdigest() == card["onnx_sha256"]


def _check_seeing_and_ood(models, data) -> None:
    """seeing grafts the estimator into the classifier; ood then fits the three-term score."""
    from service.contract.cards import SEEING_OUTPUT, read_model_cards
    from service.contract.ood import OOD_METHOD_ID

    assert main(["seeing", "--data", str(data), "--models", str(models), "--epochs", "1"]) == 0
    command = ["ood", "--models", str(models), "--fit-data", str(data)]
    assert main([*command, "--threshold-data", str(data)]) == 0
    model_set = read_model_cards(models)
    assert SEEING_OUTPUT in model_set.classifier.output_names
    assert model_set.ood is not None and model_set.ood.has_seeing
    assert model_set.classifier.out_of_distribution.method == OOD_METHOD_ID


def _check_finetune(runs, data, tuned) -> None:
    """finetune moves the regressor, rebuilds the MC model on its trunk, keeps the classifier."""
    import keras

    command = ["finetune", "--runs", str(runs), "--data", str(data), "--out", str(tuned)]
    assert main([*command, "--epochs", "1", "--preset", "cpu"]) == 0
    assert (tuned / "lens_classifier.keras").read_bytes() == (
        runs / "lens_classifier.keras"
    ).read_bytes()

    def trunk_weights(run, file):
        model = keras.saving.load_model(run / file, compile=False)
        trunk = next(layer for layer in model.layers if layer.name.endswith("_trunk"))
        return trunk.get_weights()

    before = trunk_weights(runs, "einstein_radius.keras")
    after = trunk_weights(tuned, "einstein_radius.keras")
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    for a, b in zip(after, trunk_weights(tuned, "einstein_radius_mc.keras"), strict=True):
        np.testing.assert_array_equal(a, b)
    summary = json.loads((tuned / "training.json").read_text())
    assert summary["fine_tuned_regressor"]["epochs"] == 1


def _check_finetune_classifier_from_models(models, data, tuned) -> None:
    """finetune starts from a models/ folder (its MC card's training summary); with
    --classifier-epochs it moves the classifier's weights, and with --epochs 0 it keeps the
    regressor and the MC model as they were (a classifier-only round)."""
    import keras

    command = ["finetune", "--runs", str(models), "--data", str(data), "--out", str(tuned)]
    assert main([*command, "--epochs", "0", "--preset", "cpu", "--classifier-epochs", "1"]) == 0
    for kept in ("einstein_radius.keras", "einstein_radius_mc.keras"):
        assert (tuned / kept).read_bytes() == (models / kept).read_bytes()

    def weights(folder):
        model = keras.saving.load_model(folder / "lens_classifier.keras", compile=False)
        return model.get_weights()

    before, after = weights(models), weights(tuned)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    summary = json.loads((tuned / "training.json").read_text())
    assert summary["fine_tuned_classifier"]["epochs"] == 1
    assert len(summary["fine_tuned_classifier"]["val_auroc"]) == 1
    assert "fine_tuned_regressor" not in summary


def _check_recalibrate(run, data) -> None:
    """recalibrate changes only the MC head's log-variance offset, to twice the log of the
    new factor, and records the factor and its data in the run's summary."""
    import keras

    import training  # noqa: F401  (registers the custom layers)

    def load():
        return keras.saving.load_model(run / "einstein_radius_mc.keras", compile=False)

    old = load()
    assert main(["recalibrate", "--runs", str(run), "--data", str(data)]) == 0
    new = load()
    summary = json.loads((run / "training.json").read_text())
    for before, after in zip(old.get_weights(), new.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    affine = new.get_layer("einstein_radius_mc_head").get_layer("theta_E_mean_log_variance")
    factor = summary["aleatoric_calibration_factor"]
    assert affine.offset[1] == pytest.approx(2 * np.log(factor), rel=1e-6)
    assert summary["aleatoric_calibration_data"]["n_lenses"] == 80


def _check_classifier_round(models, data, tuned, image) -> None:
    """A classifier-only round: export --only the classifier under a new version (which grafts
    the seeing estimator the old one had), refit the score; the regressor's and MC model's
    files stay."""
    from service.contract.cards import SEEING_OUTPUT, read_model_cards

    def seeing_output():
        session = ort.InferenceSession(
            str(models / "lens_classifier.onnx"), providers=["CPUExecutionProvider"]
        )
        return session.run([SEEING_OUTPUT], {"image": image})[0]

    kept = {
        f.name: f.read_bytes() for f in models.iterdir() if f.name.startswith("einstein_radius")
    }
    seeing_before = seeing_output()
    command = ["export", "--runs", str(tuned), "--models", str(models), "--data", str(data)]
    assert main([*command, "--only", "lens_classifier", "--version", "9.9.9"]) == 0
    command = ["ood", "--models", str(models), "--fit-data", str(data)]
    assert main([*command, "--threshold-data", str(data)]) == 0

    assert {name: (models / name).read_bytes() for name in kept} == kept
    model_set = read_model_cards(models)
    assert model_set.classifier.version == "9.9.9"
    assert model_set.regressor.version != "9.9.9"
    np.testing.assert_array_equal(seeing_output(), seeing_before)
