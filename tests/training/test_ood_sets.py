"""Fitting the out-of-distribution statistics, the derived test sets, the bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from service.contract.ood import INPUT_STATISTIC_NAMES, input_statistics
from training.dataset import _write_labels, load_dataset
from training.metrics import auroc, bootstrap_interval
from training.ood import fit_statistics
from training.ood_sets import counts_offset, magnitudes, one_band_copied, write_ood_sets


def _two_classes(rng: np.random.Generator, n: int, d: int):
    """Features of two classes 4 apart in every dimension, and standard-normal inputs."""
    is_lens = np.arange(n) < n // 2
    features = rng.standard_normal((n, d)) + np.where(is_lens[:, None], 2.0, -2.0)
    return features, rng.standard_normal((n, len(INPUT_STATISTIC_NAMES))), is_lens


def test_fitted_statistics_standardise_the_fit_data_and_separate_a_shifted_class():
    rng = np.random.default_rng(3)
    n, d = 4000, 8
    features, inputs, is_lens = _two_classes(rng, n, d)
    stats = fit_statistics(features, inputs, is_lens)
    # Class means recovered to about 4/sqrt(2000) ~ 0.09 (float32 storage aside).
    np.testing.assert_allclose(stats.feature_means[0], 2.0, atol=0.1)
    np.testing.assert_allclose(stats.feature_means[1], -2.0, atol=0.1)
    terms = stats.terms(features, inputs)
    # By construction the terms have median 0 and robust spread 1 on the fit data.
    np.testing.assert_allclose(np.median(terms, axis=0), 0.0, atol=1e-3)
    # Cutouts between the two classes (features 0) are far from both class means.
    far = stats.score(np.zeros((100, d)), rng.standard_normal((100, len(INPUT_STATISTIC_NAMES))))
    labels = np.r_[np.zeros(n), np.ones(100)]
    assert auroc(labels, np.r_[terms.max(axis=1), far]) > 0.99


def test_the_seeing_term_meets_the_others_tail_less_its_offset_and_flags_a_broad_psf():
    rng = np.random.default_rng(5)
    n = 4000
    features, inputs, is_lens = _two_classes(rng, n, 8)
    seeing = rng.normal(np.log10([1.1, 1.0, 0.95]), 0.05, (n, 3))
    stats = fit_statistics(features, inputs, is_lens, seeing, tail_quantile=0.99, seeing_offset=2.0)
    terms = stats.terms(features, inputs, seeing)
    two_terms = terms[:, :2].max(axis=1)
    # Float32 storage moves the quantiles by ~1e-6 relative.
    assert np.quantile(terms[:, 2], 0.99) == pytest.approx(
        np.quantile(two_terms, 0.99) - 2.0, abs=1e-3
    )
    broad = seeing[:200] + np.log10(2.0)  # the same cutouts seen through a PSF twice as broad
    scores = stats.score(features[:200], inputs[:200], broad)
    threshold = np.quantile(stats.score(features, inputs, seeing), 0.99)
    assert np.mean(scores > threshold) > 0.95


def test_bootstrap_interval_covers_the_statistic():
    rng = np.random.default_rng(4)
    values = rng.normal(1.0, 1.0, 400)
    low, high = bootstrap_interval(lambda idx: float(values[idx[0]].mean()), [400], rng)
    # The mean's standard error is 1/sqrt(400) = 0.05: the 95% interval is about +-0.1.
    assert low < values.mean() < high
    assert 0.15 < high - low < 0.25


@pytest.fixture
def tiny_set(tmp_path):
    rng = np.random.default_rng(6)
    n = 12
    images = rng.normal(0, 10, (n, 3, 64, 64)).astype(np.float32)
    images[:, :, 28:36, 28:36] += np.array([200.0, 400.0, 600.0])[None, :, None, None]
    np.savez(tmp_path / "shard_0000.npz", images=images)
    rows = [{"is_lens": float(i % 2), "seeing_fwhm_arcsec_r": 1.0} for i in range(n)]
    _write_labels(tmp_path / "labels.csv", rows)
    return tmp_path


def test_derived_sets_are_written_in_the_dataset_format(tiny_set, tmp_path):
    kinds = (
        "noise_only",
        "permuted_bands",
        "one_band_copied",
        "magnitudes",
        "counts_offset",
        "pixel_scale_0.2",
        "pixel_scale_0.5",
        "saturated_star",
    )
    written = write_ood_sets(tiny_set, tmp_path / "ood", n=10, seed=1, kinds=kinds)
    assert [p.name for p in written] == list(kinds)
    for path in written:
        data = load_dataset(path)
        assert data.images.shape == (10, 3, 64, 64) and np.isfinite(data.images).all()
        assert set(data.labels["ood_kind"]) == {path.name}
    star = load_dataset(tmp_path / "ood" / "saturated_star").images
    # Saturated at the training's level (20000-35000 in zero point 30 flux).
    assert 20000 <= star.max() <= 35000
    with pytest.raises(ValueError, match="unknown kinds"):
        write_ood_sets(tiny_set, tmp_path / "x", kinds=("nonsense",))


def test_the_unit_changes_move_the_input_statistics():
    rng = np.random.default_rng(7)
    cube = rng.normal(0, 10, (3, 64, 64))
    base = input_statistics(cube)
    # Counts at zero point 27: x 10**-1.2 (log10 sigma down by 1.2) on a 1000-count sky.
    shifted = input_statistics(counts_offset(rng, cube))
    np.testing.assert_allclose(shifted[:3] - base[:3], -1.2, atol=1e-6)
    assert (shifted[3:6] > 1000).all()
    assert input_statistics(magnitudes(rng, cube))[3:6].min() > 10
    np.testing.assert_allclose(input_statistics(one_band_copied(rng, cube))[6:9], 1.0)
