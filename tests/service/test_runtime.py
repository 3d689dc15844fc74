"""Model cards and the onnxruntime runtime, checked against onnxruntime run directly.

The shipped models may be retrained at any time with the same interface, so
expected numbers here always come from an ``onnxruntime.InferenceSession`` on
the same ONNX file, never from constants.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path
from statistics import NormalDist

import numpy as np
import onnxruntime as ort
import pytest

from service.contract.cards import (
    CLASSIFIER_NAME,
    MC_NAME,
    PARAMETER_COMPONENTS,
    REGRESSOR_NAME,
    read_model_cards,
)
from service.contract.preprocessing import PREPROCESSING_ID
from service.contract.uncertainty import QUANTILE_LEVELS, REGIME_TABLE_LEVELS
from service.core import runtime as runtime_module
from service.core.inference import CutoutPrediction, predict_chunk, prepare_cutout
from service.core.runtime import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    MAX_SEED,
    OnnxModelRuntime,
    choose_providers,
)
from service.errors import InferenceError, ModelUnavailableError
from service.fits.decode import DEFAULT_LIMITS

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
CLEAN_SAMPLES = sorted((MODELS_DIR.parent / "examples" / "cutouts" / "clean").glob("*.fits"))


@pytest.fixture(scope="module")
def runtime():
    model_runtime = OnnxModelRuntime(MODELS_DIR, device="cpu", intra_op_threads=2)
    model_runtime.load()
    yield model_runtime
    model_runtime.close()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    # Values of the size preprocessing produces (asinh noise units, mostly |x| < 5).
    return np.random.default_rng(7).normal(0.0, 1.5, (5, 64, 64, 3)).astype(np.float32)


def _direct_session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(MODELS_DIR / f"{name}.onnx"), providers=[CPU_PROVIDER])


@pytest.fixture
def models_copy(tmp_path) -> Path:
    """A private copy of models/ (cards, ONNX and OOD statistics) to break in various ways."""
    for path in MODELS_DIR.glob("*"):
        if path.suffix in (".json", ".onnx", ".npz"):
            shutil.copy(path, tmp_path / path.name)
    return tmp_path


# ----------------------------------------------------------------------------- cards


def test_cards_are_read_verified_and_consistent():
    models = read_model_cards(MODELS_DIR)
    assert set(models.cards) == {CLASSIFIER_NAME, REGRESSOR_NAME, MC_NAME}
    assert models.input.bands == ["g", "r", "i"]
    assert models.input.shape[1:] == [64, 64, 3]
    assert models.input.pixel_scale_arcsec == pytest.approx(0.263)
    assert models.input.preprocessing == PREPROCESSING_ID
    assert models.regressor.output("parameters").components == list(PARAMETER_COMPONENTS)
    assert all(isinstance(v, str) and v for v in models.versions.values())
    for name, card in models.cards.items():
        assert models.onnx_bytes[name] == (MODELS_DIR / card.onnx_file).read_bytes()


def test_a_model_that_does_not_match_its_card_hash_is_refused(models_copy):
    onnx_path = models_copy / "einstein_radius.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    with pytest.raises(ModelUnavailableError, match="SHA-256"):
        read_model_cards(models_copy)


def test_a_missing_card_or_folder_is_refused(models_copy, tmp_path):
    (models_copy / "lens_classifier.json").unlink()
    with pytest.raises(ModelUnavailableError, match="lens_classifier.json"):
        read_model_cards(models_copy)
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        read_model_cards(tmp_path / "nowhere")


def test_a_card_for_other_preprocessing_or_pixel_scale_is_refused(models_copy):
    card_path = models_copy / "einstein_radius_mc.json"
    original = json.loads(card_path.read_text())
    card = json.loads(card_path.read_text())
    card["input"]["preprocessing"] = "something_else_v9"
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelUnavailableError, match="something_else_v9"):
        read_model_cards(models_copy)
    card = dict(original, input=dict(original["input"], pixel_scale_arcsec=0.2))
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelUnavailableError, match="0.2"):
        read_model_cards(models_copy)


def test_the_mc_cards_interval_calibration_is_read_and_checked(models_copy):
    card_path = models_copy / "einstein_radius_mc.json"
    card = json.loads(card_path.read_text())
    card.pop("interval_calibration", None)
    card_path.write_text(json.dumps(card))
    assert read_model_cards(models_copy).mc_mixture_levels == QUANTILE_LEVELS
    mixture_levels = [0.03, 0.17, 0.5, 0.83, 0.97]
    card["interval_calibration"] = {
        "levels": list(QUANTILE_LEVELS),
        "mixture_levels": mixture_levels,
    }
    card_path.write_text(json.dumps(card))
    assert read_model_cards(models_copy).mc_mixture_levels == tuple(mixture_levels)
    for bad in ([0.03, 0.17, 0.5, 0.83], [0.17, 0.03, 0.5, 0.83, 0.97], [0.0, 0.2, 0.5, 0.8, 1.0]):
        card["interval_calibration"]["mixture_levels"] = bad
        card_path.write_text(json.dumps(card))
        with pytest.raises(ModelUnavailableError, match="mixture_levels"):
            read_model_cards(models_copy)


def test_the_mc_cards_regime_table_is_read_and_checked(models_copy):
    card_path = models_copy / "einstein_radius_mc.json"
    card = json.loads(card_path.read_text())
    card.pop("regime_calibration", None)
    card_path.write_text(json.dumps(card))
    assert read_model_cards(models_copy).mc_regime_table is None
    z = [NormalDist().inv_cdf(level) for level in REGIME_TABLE_LEVELS]
    card["regime_calibration"] = {
        "theta_E_edges_arcsec": [1.5],
        "signal_to_noise_edges": [30.0, 90.0],
        "levels": list(REGIME_TABLE_LEVELS),
        "residual_quantiles": [[z, z, z], [z, z, z]],
        "n_lenses": [[300, 300, 300], [300, 300, 300]],  # provenance is kept, not read
    }
    card_path.write_text(json.dumps(card))
    table = read_model_cards(models_copy).mc_regime_table
    assert table is not None and table.residual_quantiles.shape == (2, 3, len(z))
    for key, bad in (
        ("residual_quantiles", [[z, z, z]]),  # one theta_E bin for two
        ("residual_quantiles", [[z, z, z], [z, z, z[::-1]]]),  # falling
        ("signal_to_noise_edges", [90.0, 30.0]),
    ):
        broken = dict(card["regime_calibration"], **{key: bad})
        card_path.write_text(json.dumps(dict(card, regime_calibration=broken)))
        with pytest.raises(ModelUnavailableError, match="regime_calibration"):
            read_model_cards(models_copy)


def test_a_card_that_is_not_json_is_refused(models_copy):
    (models_copy / "einstein_radius.json").write_text("{ not json")
    with pytest.raises(ModelUnavailableError, match="not a valid card"):
        read_model_cards(models_copy)


# ----------------------------------------------------------------------------- providers


@pytest.mark.parametrize(
    "device, available, expected",
    [
        ("cpu", [CUDA_PROVIDER, CPU_PROVIDER], [CPU_PROVIDER]),
        ("auto", [CPU_PROVIDER], [CPU_PROVIDER]),
        ("auto", [CUDA_PROVIDER, CPU_PROVIDER], [CUDA_PROVIDER, CPU_PROVIDER]),
        ("cuda", [CUDA_PROVIDER, CPU_PROVIDER], [CUDA_PROVIDER, CPU_PROVIDER]),
    ],
)
def test_provider_choice(device, available, expected):
    assert choose_providers(device, available) == expected


def test_cuda_without_a_cuda_provider_is_refused_with_the_fix():
    with pytest.raises(ModelUnavailableError, match="onnxruntime-gpu"):
        choose_providers("cuda", [CPU_PROVIDER])


def test_auto_falls_back_to_cpu_when_a_listed_cuda_provider_cannot_create_a_session(
    monkeypatch, caplog
):
    available = ort.get_available_providers()
    if CUDA_PROVIDER in available:
        pytest.skip("this machine really has CUDA; the fallback is tested on CPU-only hosts")
    # Pretend onnxruntime lists CUDA: creating a session with it then silently yields CPU.
    monkeypatch.setattr(runtime_module, "available_providers", lambda: [CUDA_PROVIDER, *available])
    model_runtime = OnnxModelRuntime(MODELS_DIR, device="auto", warmup_batch_sizes=())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with caplog.at_level(logging.INFO, logger="lensserve"):
            model_runtime.load()
    assert model_runtime.provider == CPU_PROVIDER
    assert any("falling back to CPU" in r.getMessage() for r in caplog.records)
    strict = OnnxModelRuntime(MODELS_DIR, device="cuda", warmup_batch_sizes=())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ModelUnavailableError, match="no CUDA session"):
            strict.load()


def test_load_logs_one_line_naming_the_provider(caplog):
    model_runtime = OnnxModelRuntime(MODELS_DIR, device="cpu", warmup_batch_sizes=())
    with caplog.at_level(logging.INFO, logger="lensserve.runtime"):
        model_runtime.load()
    lines = [r.getMessage() for r in caplog.records if "running on" in r.getMessage()]
    assert len(lines) == 1 and CPU_PROVIDER in lines[0]
    assert model_runtime.loaded and model_runtime.provider == CPU_PROVIDER


# ----------------------------------------------------------------------------- predict


def test_point_estimates_equal_onnxruntime_run_directly(runtime, images):
    raw = runtime.predict(images, num_samples=10)
    probability, features = _direct_session(CLASSIFIER_NAME).run(
        ["lens_probability", "features"], {"image": images}
    )
    (parameters,) = _direct_session(REGRESSOR_NAME).run(None, {"image": images})
    # Same graph, same inputs; only thread scheduling may differ (float32 rounding).
    np.testing.assert_allclose(raw.lens_probability, probability[:, 0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(raw.features, features, rtol=0, atol=1e-4)
    np.testing.assert_allclose(raw.parameters, parameters, rtol=0, atol=1e-5)
    assert raw.theta_E_samples.shape == raw.theta_E_log_variance_samples.shape == (5, 10)
    assert np.all((raw.lens_probability >= 0) & (raw.lens_probability <= 1))


def test_seeded_mc_sampling_is_reproducible_and_matches_set_seed(runtime, images):
    first = runtime.predict(images, num_samples=50, seed=1234)
    again = runtime.predict(images, num_samples=50, seed=1234)
    np.testing.assert_array_equal(first.theta_E_samples, again.theta_E_samples)
    np.testing.assert_array_equal(
        first.theta_E_log_variance_samples, again.theta_E_log_variance_samples
    )
    # The documented mechanism: onnxruntime.set_seed before creating the MC session.
    ort.set_seed(1234)
    direct = _direct_session(MC_NAME).run(
        None, {"image": images, "num_samples": np.asarray(50, dtype=np.int32)}
    )
    np.testing.assert_allclose(first.theta_E_samples, direct[0], rtol=0, atol=1e-5)


def test_different_seeds_give_different_dropout_masks(runtime, images):
    assert runtime.seed_controls_dropout
    first = runtime.predict(images, num_samples=50, seed=1234)
    other = runtime.predict(images, num_samples=50, seed=4321)
    assert not np.array_equal(first.theta_E_samples, other.theta_E_samples)


def test_unseeded_mc_passes_differ_between_calls(runtime, images):
    first = runtime.predict(images, num_samples=50)
    second = runtime.predict(images, num_samples=50)
    assert first.theta_E_samples.shape == (5, 50)
    assert not np.array_equal(first.theta_E_samples, second.theta_E_samples)
    # Each call's passes differ among themselves too: dropout is on.
    assert np.all(first.theta_E_samples.std(axis=1) > 0)


def test_empty_batch_and_bad_inputs(runtime, images):
    empty = runtime.predict(np.zeros((0, 64, 64, 3), np.float32), num_samples=4)
    assert len(empty) == 0 and empty.theta_E_samples.shape == (0, 4)
    with pytest.raises(InferenceError, match="float32"):
        runtime.predict(images.astype(np.float64), num_samples=4)
    with pytest.raises(InferenceError, match="shape"):
        runtime.predict(images[:, :32], num_samples=4)
    with pytest.raises(InferenceError, match="num_samples"):
        runtime.predict(images, num_samples=0)
    with pytest.raises(InferenceError, match="seed"):
        runtime.predict(images, num_samples=4, seed=MAX_SEED + 1)


def test_predict_before_load_and_after_close_is_refused(images):
    model_runtime = OnnxModelRuntime(MODELS_DIR, device="cpu", warmup_batch_sizes=())
    with pytest.raises(ModelUnavailableError):
        model_runtime.predict(images, num_samples=4)
    model_runtime.load()
    assert len(model_runtime.predict(images, num_samples=4)) == 5
    model_runtime.close()
    with pytest.raises(ModelUnavailableError):
        model_runtime.predict(images, num_samples=4)


def test_a_tampered_model_stops_load(models_copy):
    (models_copy / "lens_classifier.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelUnavailableError, match="SHA-256"):
        OnnxModelRuntime(models_copy, device="cpu").load()


# ----------------------------------------------------------------------------- two or three models


def _without_mc_parameters(models_dir: Path) -> None:
    """Edit the MC card so it no longer lists the point ``parameters`` (an older export)."""
    card_path = models_dir / f"{MC_NAME}.json"
    card = json.loads(card_path.read_text())
    card["outputs"] = [o for o in card["outputs"] if o["name"] != "parameters"]
    card_path.write_text(json.dumps(card))


def _flatten(prediction: CutoutPrediction) -> list[float]:
    distribution = prediction.einstein_radius
    return [
        prediction.lens_probability,
        *prediction.parameters.values(),
        distribution.mean,
        distribution.std,
        distribution.aleatoric_std,
        distribution.epistemic_std,
        *distribution.quantiles.values(),
    ]


@pytest.mark.skipif(not CLEAN_SAMPLES, reason="sample cutouts missing")
def test_two_model_path_answers_as_the_three_model_path(models_copy, monkeypatch):
    _without_mc_parameters(models_copy)
    runtimes = {
        "two": OnnxModelRuntime(MODELS_DIR, device="cpu", warmup_batch_sizes=()),
        "three": OnnxModelRuntime(models_copy, device="cpu", warmup_batch_sizes=()),
    }
    calls: dict[str, list[str]] = {"two": [], "three": []}
    for key, model_runtime in runtimes.items():
        model_runtime.load()
        run = model_runtime._run

        def recording(session, name, *args, _run=run, _calls=calls[key]):
            _calls.append(name)
            return _run(session, name, *args)

        monkeypatch.setattr(model_runtime, "_run", recording)
    assert runtimes["two"].models.mc_gives_parameters
    assert not runtimes["three"].models.mc_gives_parameters
    prepared = [
        prepare_cutout(
            p.read_bytes(), filename=p.name, models=runtimes["two"].models, limits=DEFAULT_LIMITS
        )
        for p in CLEAN_SAMPLES
    ]
    # The same seed gives both MC sessions the same dropout masks, so every number compares.
    answers = {
        key: predict_chunk(model_runtime, prepared, num_samples=100, seed=2024)
        for key, model_runtime in runtimes.items()
    }
    assert calls == {
        "two": [CLASSIFIER_NAME, MC_NAME],
        "three": [CLASSIFIER_NAME, REGRESSOR_NAME, MC_NAME],
    }
    for two, three in zip(answers["two"], answers["three"], strict=True):
        assert isinstance(two, CutoutPrediction) and isinstance(three, CutoutPrediction)
        np.testing.assert_allclose(_flatten(two), _flatten(three), rtol=0, atol=1e-4)
