"""MC-dropout summaries: moments, variance split and mixture quantiles."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from service.contract.uncertainty import (
    QUANTILE_LEVELS,
    REGIME_TABLE_LEVELS,
    RegimeTable,
    calibrate_by_regime,
    draw_predictive_samples,
    mixture_quantiles,
    regime_spread,
    summarise_mc_samples,
)


def test_variance_splits_into_aleatoric_and_epistemic():
    rng = np.random.default_rng(1)
    means = rng.normal(1.5, 0.1, (4, 200))
    log_variances = np.log(rng.uniform(0.01, 0.04, (4, 200)))
    summary = summarise_mc_samples(means, log_variances)
    np.testing.assert_allclose(summary.mean, means.mean(axis=1))
    np.testing.assert_allclose(summary.epistemic_std, means.std(axis=1))
    np.testing.assert_allclose(summary.aleatoric_std, np.sqrt(np.exp(log_variances).mean(axis=1)))
    np.testing.assert_allclose(summary.std**2, summary.aleatoric_std**2 + summary.epistemic_std**2)


def test_quantiles_match_a_large_monte_carlo_draw():
    rng = np.random.default_rng(2)
    means = rng.normal(2.0, 0.15, (2, 50))
    log_variances = np.log(rng.uniform(0.005, 0.05, (2, 50)))
    summary = summarise_mc_samples(means, log_variances)
    draws = np.concatenate(
        [draw_predictive_samples(means, log_variances, rng) for _ in range(4000)], axis=1
    )
    empirical = np.quantile(draws, QUANTILE_LEVELS, axis=1).T
    # 200,000 draws: the quantile standard error is ~1e-3 arcsec here; allow 5x.
    np.testing.assert_allclose(summary.quantiles, empirical, atol=5e-3)
    assert np.all(np.diff(summary.quantiles, axis=1) > 0)


def test_one_component_gives_gaussian_quantiles():
    summary = summarise_mc_samples(np.array([[1.0]]), np.log(np.array([[0.04]])))
    # N(1, 0.2): the 16% and 84% points are 1 -/+ 0.2 * 0.99446 (z of 0.84).
    np.testing.assert_allclose(
        summary.quantiles[0, [1, 3]], [1 - 0.2 * 0.994458, 1 + 0.2 * 0.994458], atol=1e-5
    )
    np.testing.assert_allclose(summary.quantiles[0, 2], 1.0, atol=1e-7)


def _exact_mixture_cdf(x: np.ndarray, means: np.ndarray, stds: np.ndarray) -> np.ndarray:
    """CDF of each row's mixture at x (n, L), with the exact erf (math.erf), for reference."""
    erf = np.vectorize(math.erf)
    z = (x[:, :, None] - means[:, None, :]) / (stds[:, None, :] * math.sqrt(2.0))
    return (0.5 * (1.0 + erf(z))).mean(axis=2)


def test_quantiles_are_where_the_mixture_cdf_crosses_each_level():
    rng = np.random.default_rng(5)
    means = rng.normal(2.0, 0.2, (6, 100))
    means[0, :50] += 1.5  # two well-separated modes
    means[1] = 1.0  # no epistemic spread: one Gaussian per row
    stds = rng.uniform(0.02, 0.3, (6, 100))
    quantiles = mixture_quantiles(means, stds)
    crossing = _exact_mixture_cdf(quantiles, means, stds)
    # The service's CDF (Abramowitz & Stegun erf) is within 1.5e-7 of the exact one.
    np.testing.assert_allclose(
        crossing, np.broadcast_to(QUANTILE_LEVELS, crossing.shape), atol=2e-7
    )
    # A reference bisection on the exact CDF (60 halvings of a 20-arcsec bracket) agrees.
    low, high = np.full(quantiles.shape, -8.0), np.full(quantiles.shape, 12.0)
    for _ in range(60):
        middle = 0.5 * (low + high)
        below = _exact_mixture_cdf(middle, means, stds) < np.asarray(QUANTILE_LEVELS)
        low, high = np.where(below, middle, low), np.where(below, high, middle)
    np.testing.assert_allclose(quantiles, 0.5 * (low + high), rtol=0, atol=1e-6)


def test_non_finite_passes_give_non_finite_summaries_without_stalling():
    means = np.array([[1.0, np.nan, 1.2], [1.0, 1.1, 1.2]])
    summary = summarise_mc_samples(means, np.full(means.shape, -4.0))
    assert np.all(np.isnan(summary.quantiles[0]))
    assert np.all(np.isfinite(summary.quantiles[1]))


def test_recalibrated_levels_are_where_the_reported_quantiles_are_read():
    rng = np.random.default_rng(4)
    means = 1.5 + 0.05 * rng.normal(size=(30, 40))
    log_variances = np.log(0.1**2) + 0.2 * rng.normal(size=(30, 40))
    levels = (0.03, 0.17, 0.5, 0.83, 0.97)
    summary = summarise_mc_samples(means, log_variances, levels)
    expected = mixture_quantiles(means, np.exp(0.5 * log_variances), levels)
    np.testing.assert_allclose(summary.quantiles, expected, rtol=0, atol=1e-9)
    nominal = summarise_mc_samples(means, log_variances)
    assert np.all(summary.quantiles[:, 1] > nominal.quantiles[:, 1])  # narrower 68% interval
    np.testing.assert_array_equal(summary.mean, nominal.mean)
    np.testing.assert_array_equal(summary.std, nominal.std)


def _table(residual_quantiles: np.ndarray) -> RegimeTable:
    """Two theta_E bins (edge 1.5 arcsec) x two signal-to-noise bands (edge 50)."""
    return RegimeTable(
        theta_E_edges_arcsec=np.array([1.5]),
        signal_to_noise_edges=np.array([50.0]),
        levels=REGIME_TABLE_LEVELS,
        residual_quantiles=residual_quantiles,
    )


def _gaussian_knots() -> np.ndarray:
    return np.array([NormalDist().inv_cdf(level) for level in REGIME_TABLE_LEVELS])


def test_a_regime_table_places_each_cutout_and_reads_its_quantiles_at_the_knots():
    z = _gaussian_knots()
    # Regime (i, j) has residual quantiles (i + 2 j) / 10 + (1 + i) z: a shift and a scale each.
    knots = np.array([[(i + 2 * j) / 10 + (1 + i) * z for j in range(2)] for i in range(2)])
    table = _table(knots)
    theta = np.array([1.0, 1.5, 2.0, 1.0])  # an edge belongs to the bin above it
    snr = np.array([10.0, 10.0, 80.0, 50.0])
    rng = np.random.default_rng(8)
    means = rng.normal(1.5, 0.05, (4, 30))
    log_variances = np.log(rng.uniform(0.004, 0.01, (4, 30)))
    raw = summarise_mc_samples(means, log_variances, None)
    assert raw.quantiles.shape == (4, 0)
    calibrated = calibrate_by_regime(
        raw, table, theta_E_arcsec=theta, signal_to_noise=snr, num_samples=30
    )
    spread = regime_spread(raw, 30)
    # 30 passes: the epistemic variance counts 31/29 times.
    np.testing.assert_allclose(
        spread**2, raw.aleatoric_std**2 + raw.epistemic_std**2 * 31 / 29, rtol=1e-12
    )
    shift = np.array([0.0, 0.1, 0.3, 0.2])
    scale = np.array([1.0, 2.0, 2.0, 1.0])
    z_reported = np.array([NormalDist().inv_cdf(level) for level in QUANTILE_LEVELS])
    expected = raw.mean[:, None] + spread[:, None] * (shift[:, None] + scale[:, None] * z_reported)
    np.testing.assert_allclose(calibrated.quantiles, expected, rtol=1e-12)
    # G(Z) = shift + scale Z (the tails continue the 2.5-16% slope), up to the service's
    # approximate normal quantiles (erf to 1.5e-7): its moments to within 1e-6.
    np.testing.assert_allclose(calibrated.mean, raw.mean + spread * shift, rtol=1e-6)
    np.testing.assert_allclose(calibrated.std, spread * scale, rtol=1e-6)
    ratio = calibrated.std / raw.std  # the parts keep the mixture's proportions
    np.testing.assert_allclose(calibrated.aleatoric_std, raw.aleatoric_std * ratio, rtol=1e-12)
    np.testing.assert_allclose(calibrated.epistemic_std, raw.epistemic_std * ratio, rtol=1e-12)


def test_a_regime_table_refuses_falling_quantiles_and_wrong_shapes():
    z = _gaussian_knots()
    falling = np.broadcast_to(-z, (2, 2, len(z)))
    with pytest.raises(ValueError, match="rise strictly"):
        _table(falling)
    with pytest.raises(ValueError, match="shape"):
        _table(np.broadcast_to(z, (3, 2, len(z))))
