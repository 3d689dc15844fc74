"""The transport-free core: FITS bytes -> prepared cutouts -> batched predictions."""

from __future__ import annotations

import asyncio
import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits

from service.contract.cards import read_model_cards
from service.contract.preprocessing import preprocess_cutout, signal_to_noise
from service.contract.uncertainty import (
    QUANTILE_LEVELS,
    calibrate_by_regime,
    summarise_mc_samples,
)
from service.core.inference import (
    CutoutPrediction,
    InferenceEngine,
    PreparedCutout,
    prepare_cutout,
)
from service.core.runtime import OnnxModelRuntime, RawPredictions
from service.errors import InferenceError
from service.fits.decode import FitsLimits

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


def _cube_fits(cube: np.ndarray) -> bytes:
    hdu = fits.PrimaryHDU(cube.astype(np.float32))
    hdu.header["BANDS"] = "g,r,i"
    buffer = io.BytesIO()
    hdu.writeto(buffer)
    return buffer.getvalue()


def _prepared(n: int, seed: int = 0) -> list[PreparedCutout]:
    rng = np.random.default_rng(seed)
    return [
        PreparedCutout(
            filename=f"{i}.fits",
            image=rng.normal(0.0, 1.5, (64, 64, 3)).astype(np.float32),
            masked_fraction=0.0,
            ra_deg=None,
            dec_deg=None,
            warnings=(),
        )
        for i in range(n)
    ]


class FakeRuntime:
    """Deterministic stand-in: outputs are simple functions of each image's mean."""

    def __init__(self, *, nan_row: int | None = None) -> None:
        self.calls: list[tuple[int, int, int | None]] = []
        self.nan_row = nan_row

    @property
    def models(self) -> Any:
        # The shipped cards, less any per-regime table: these tests follow the raw mixture.
        models = read_model_cards(MODELS_DIR)
        return dataclasses.replace(
            models, mc=models.mc.model_copy(update={"regime_calibration": None})
        )

    @property
    def provider(self) -> str:
        return "FakeProvider"

    def load(self) -> None:
        pass

    def close(self) -> None:
        pass

    def predict(
        self, images: np.ndarray, *, num_samples: int, seed: int | None = None
    ) -> RawPredictions:
        self.calls.append((len(images), num_samples, seed))
        level = images.mean(axis=(1, 2, 3)).astype(np.float32)
        passes = np.arange(num_samples, dtype=np.float32)[None, :]
        probability = 1.0 / (1.0 + np.exp(-level))
        if self.nan_row is not None:
            probability[self.nan_row] = np.nan
        return RawPredictions(
            lens_probability=probability,
            parameters=np.repeat(level[:, None], 5, axis=1),
            theta_E_samples=1.0 + level[:, None] + 0.01 * passes,
            theta_E_log_variance_samples=np.full((len(images), num_samples), -4.0, np.float32),
        )


def _engine(runtime: Any, **overrides: Any) -> InferenceEngine:
    options = {"max_batch_size": 4, "max_batch_wait_s": 0.02, "max_queue_cutouts": 100}
    return InferenceEngine(runtime, **{**options, **overrides})


async def _with_engine(engine: InferenceEngine, work: Any) -> Any:
    await engine.start()
    try:
        return await work(engine)
    finally:
        await engine.close()


def test_prepare_cutout_decodes_and_preprocesses():
    cube = np.random.default_rng(3).normal(100.0, 5.0, (3, 64, 64))
    prepared = prepare_cutout(
        _cube_fits(cube),
        filename="x.fits",
        models=read_model_cards(MODELS_DIR),
        limits=FitsLimits(),
    )
    assert prepared.filename == "x.fits" and prepared.masked_fraction == 0.0
    # The same preprocessing the models were trained with, on the same pixels (float32 I/O).
    np.testing.assert_allclose(
        prepared.image, preprocess_cutout(cube.astype(np.float32)), rtol=0, atol=1e-6
    )


def test_large_requests_are_chunked_and_answered_in_order():
    runtime = FakeRuntime()
    cutouts = _prepared(10)
    outcomes = asyncio.run(
        _with_engine(_engine(runtime), lambda e: e.predict_cutouts(cutouts, num_samples=20))
    )
    assert [o.filename for o in outcomes] == [c.filename for c in cutouts]
    assert sorted(size for size, _, _ in runtime.calls) == [2, 4, 4]  # max_batch_size 4
    for outcome, cutout in zip(outcomes, cutouts, strict=True):
        assert isinstance(outcome, CutoutPrediction)
        level = float(cutout.image.mean())
        assert outcome.parameters["theta_E"] == pytest.approx(level, abs=1e-6)
        # The fake's passes are 1 + level + 0.01 * (0..19): their mean is 1 + level + 0.095.
        assert outcome.einstein_radius.mean == pytest.approx(1.0 + level + 0.095, abs=1e-5)
        assert list(outcome.einstein_radius.quantiles) == list(QUANTILE_LEVELS)
        assert outcome.einstein_radius.samples is None


def test_concurrent_requests_with_different_sample_counts_share_one_call():
    runtime = FakeRuntime()

    async def work(engine: InferenceEngine) -> list[Any]:
        return await asyncio.gather(
            engine.predict_cutouts(_prepared(1, seed=1), num_samples=10, include_samples=True),
            engine.predict_cutouts(_prepared(2, seed=2), num_samples=30, include_samples=True),
        )

    small, large = asyncio.run(_with_engine(_engine(runtime), work))
    # One model call with the larger T; each request keeps the first T passes it asked for.
    assert runtime.calls == [(3, 30, None)]
    assert small[0].einstein_radius.samples.shape == (10,)
    assert all(o.einstein_radius.samples.shape == (30,) for o in large)


def test_seeded_requests_run_alone_and_repeat_exactly():
    runtime = FakeRuntime()

    async def work(engine: InferenceEngine) -> list[Any]:
        cutouts = _prepared(2)
        return await asyncio.gather(
            engine.predict_cutouts(cutouts, num_samples=8, seed=42, include_samples=True),
            engine.predict_cutouts(cutouts, num_samples=8, seed=42, include_samples=True),
            engine.predict_cutouts(cutouts, num_samples=8),
        )

    first, second, unseeded = asyncio.run(_with_engine(_engine(runtime), work))
    assert sorted(runtime.calls, key=str) == sorted([(2, 8, 42), (2, 8, 42), (2, 8, None)], key=str)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.einstein_radius.samples, b.einstein_radius.samples)
    assert unseeded[0].einstein_radius.samples is None


def test_a_lone_request_is_shared_among_idle_model_instances_but_seeded_chunks_keep_their_size():
    runtime = FakeRuntime()
    cutouts = _prepared(6)

    async def work(engine: InferenceEngine) -> list[Any]:
        unseeded = await engine.predict_cutouts(cutouts, num_samples=4)
        seeded = await engine.predict_cutouts(cutouts, num_samples=4, seed=7)
        return [unseeded, seeded]

    engine = _engine(runtime, max_batch_size=8, max_batch_wait_s=0.0, model_instances=2)
    unseeded, seeded = asyncio.run(_with_engine(engine, work))
    # Both instances take half of the unseeded request; the seeded one stays one chunk.
    assert sorted(runtime.calls, key=str) == sorted(
        [(3, 4, None), (3, 4, None), (6, 4, 7)], key=str
    )
    for outcomes in (unseeded, seeded):
        assert [o.filename for o in outcomes] == [c.filename for c in cutouts]
        for outcome, cutout in zip(outcomes, cutouts, strict=True):
            assert outcome.parameters["theta_E"] == pytest.approx(float(cutout.image.mean()))


def test_a_non_finite_output_fails_only_its_cutout():
    outcomes = asyncio.run(
        _with_engine(
            _engine(FakeRuntime(nan_row=1)),
            lambda e: e.predict_cutouts(_prepared(3), num_samples=5),
        )
    )
    assert isinstance(outcomes[0], CutoutPrediction) and isinstance(outcomes[2], CutoutPrediction)
    assert isinstance(outcomes[1], InferenceError) and "1.fits" in str(outcomes[1])


def test_the_engine_on_the_real_models_matches_the_runtime_called_directly():
    # The engine closes the runtime when it stops, so the direct call comes first.
    runtime = OnnxModelRuntime(MODELS_DIR, device="cpu", warmup_batch_sizes=())
    runtime.load()
    cutouts = _prepared(6, seed=5)
    # Seeded, so the direct call and the engine see the same dropout masks.
    direct = runtime.predict(np.stack([c.image for c in cutouts]), num_samples=50, seed=9)
    engine = _engine(runtime, max_batch_size=64)
    outcomes = asyncio.run(
        _with_engine(engine, lambda e: e.predict_cutouts(cutouts, num_samples=50, seed=9))
    )
    table = runtime.models.mc_regime_table
    summary = summarise_mc_samples(
        direct.theta_E_samples,
        direct.theta_E_log_variance_samples,
        runtime.models.mc_mixture_levels,  # the MC card's recalibrated levels
    )
    assert runtime.models.mc_mixture_levels != QUANTILE_LEVELS
    if table is not None:  # the card's per-regime table, placed by the point theta_E and S/N
        summary = calibrate_by_regime(
            summary,
            table,
            theta_E_arcsec=direct.parameters[:, 0],
            signal_to_noise=signal_to_noise(np.stack([c.image for c in cutouts])),
            num_samples=50,
        )
    for row, outcome in enumerate(outcomes):
        assert outcome.lens_probability == pytest.approx(float(direct.lens_probability[row]))
        assert outcome.einstein_radius.mean == pytest.approx(float(summary.mean[row]))
        assert list(outcome.einstein_radius.quantiles.values()) == pytest.approx(
            summary.quantiles[row].tolist()
        )


def test_run_model_returns_the_outputs_asked_for_with_the_values_of_a_full_run():
    runtime = OnnxModelRuntime(MODELS_DIR, device="cpu", warmup_batch_sizes=())
    runtime.load()
    images = np.stack([c.image for c in _prepared(3, seed=2)])
    full = runtime.run_model("lens_classifier", {"image": images})
    assert len(full) == len(runtime.models.classifier.output_names) > 1
    only = runtime.run_model("lens_classifier", {"image": images}, outputs=["lens_probability"])
    assert list(only) == ["lens_probability"]
    np.testing.assert_array_equal(only["lens_probability"], full["lens_probability"])
    runtime.close()


class SeededRuntime:
    """The real ONNX runtime with one fixed dropout seed, so shared calls repeat exactly."""

    def __init__(self, runtime: OnnxModelRuntime) -> None:
        self._runtime = runtime
        self.calls: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)

    def predict(
        self, images: np.ndarray, *, num_samples: int, seed: int | None = None
    ) -> RawPredictions:
        self.calls.append(len(images))
        return self._runtime.predict(images, num_samples=num_samples, seed=11)


def test_single_cutout_requests_summarised_together_answer_as_one_request_would():
    runtime = OnnxModelRuntime(MODELS_DIR, device="cpu", warmup_batch_sizes=())
    runtime.load()
    models = runtime.models
    limits = FitsLimits()
    files = sorted((MODELS_DIR.parent / "examples" / "cutouts" / "clean").glob("*.fits"))[:6]
    cutouts = [
        prepare_cutout(f.read_bytes(), filename=f.name, models=models, limits=limits) for f in files
    ]
    seeded = SeededRuntime(runtime)

    async def work(engine: InferenceEngine) -> Any:
        together = await asyncio.gather(
            *(engine.predict_cutouts([c], num_samples=40) for c in cutouts[:5]),
            # One that asks for its samples is summarised on its own, in its place.
            engine.predict_cutouts(cutouts[5:], num_samples=40, include_samples=True),
        )
        alone = await engine.predict_cutouts(cutouts, num_samples=40)
        return together, alone

    engine = _engine(seeded, max_batch_size=64, max_batch_wait_s=0.05)
    together, alone = asyncio.run(_with_engine(engine, work))
    assert seeded.calls == [6, 6]  # one model call each time, the same images in order
    flat = [outcomes[0] for outcomes in together]
    assert [o.filename for o in flat] == [f.name for f in files]
    for grouped, single in zip(flat, alone, strict=True):
        assert grouped.lens_probability == single.lens_probability
        assert grouped.out_of_distribution == single.out_of_distribution
        assert grouped.out_of_distribution is not None
        assert grouped.einstein_radius.mean == pytest.approx(single.einstein_radius.mean, abs=1e-12)
        assert grouped.einstein_radius.quantiles == pytest.approx(
            single.einstein_radius.quantiles, abs=1e-12
        )
    assert flat[5].einstein_radius.samples is not None
