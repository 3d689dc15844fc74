"""The out-of-distribution evaluation reports the coverage of the intervals the service
serves: the MC card's per-regime table, after the novelty widening of flagged cutouts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from service.contract.cards import read_model_cards
from service.contract.uncertainty import QUANTILE_LEVELS, calibrate_by_regime, summarise_mc_samples
from training.ood import Scored, coverage_68, inflated_summary

MODELS = Path(__file__).resolve().parents[2] / "models"
LOW, MEDIAN, HIGH = (QUANTILE_LEVELS.index(level) for level in (0.16, 0.5, 0.84))


def _scored(rng: np.random.Generator, n: int = 300, passes: int = 100) -> Scored:
    """MC passes of n lenses spread over the table's regimes (theta_E 0.3-3.5", any SNR)."""
    point = rng.uniform(0.3, 3.5, n)
    means = point[:, None] + rng.normal(0.0, 0.03, (n, passes))
    log_variances = np.log(rng.uniform(0.05, 0.15, (n, passes)) ** 2)
    return Scored(
        features=np.zeros((n, 1), np.float32),
        inputs=np.zeros((n, 1)),
        is_lens=np.ones(n, bool),
        theta_E=np.full(n, np.nan),
        mc_means=means.astype(np.float32),
        mc_log_variances=log_variances.astype(np.float32),
        point_theta_E=point,
        signal_to_noise=rng.uniform(50.0, 900.0, n),
    )


def test_the_coverage_is_that_of_the_per_regime_intervals_the_service_serves():
    models = read_model_cards(MODELS)
    table = models.mc_regime_table
    assert table is not None, "the shipped MC card has a per-regime table"
    scored = _scored(np.random.default_rng(0))
    ones = np.ones(len(scored.is_lens))
    served = calibrate_by_regime(
        summarise_mc_samples(scored.mc_means, scored.mc_log_variances, None),
        table,
        theta_E_arcsec=scored.point_theta_E,
        signal_to_noise=scored.signal_to_noise,
        num_samples=scored.mc_means.shape[1],
    )
    np.testing.assert_allclose(inflated_summary(scored, ones, models).quantiles, served.quantiles)
    # Truths just inside and just outside each served 68% interval.
    width = served.quantiles[:, HIGH] - served.quantiles[:, LOW]
    inside = replace(scored, theta_E=served.quantiles[:, HIGH] - 0.01 * width)
    outside = replace(scored, theta_E=served.quantiles[:, HIGH] + 0.01 * width)
    assert coverage_68(inside, ones, models) == 1.0
    assert coverage_68(outside, ones, models) == 0.0
    # The mixture's own intervals (no table) would not give that answer.
    mixture = summarise_mc_samples(
        scored.mc_means, scored.mc_log_variances, models.mc_mixture_levels
    )
    covered = (inside.theta_E >= mixture.quantiles[:, LOW]) & (
        inside.theta_E <= mixture.quantiles[:, HIGH]
    )
    assert covered.mean() < 0.9


def test_widening_flagged_cutouts_widens_their_served_intervals_only():
    models = read_model_cards(MODELS)
    scored = _scored(np.random.default_rng(1))
    n = len(scored.is_lens)
    factor = np.where(np.arange(n) % 2 == 0, 3.0, 1.0)  # every other cutout flagged
    plain = inflated_summary(scored, np.ones(n), models)
    widened = inflated_summary(scored, factor, models)
    width = lambda s: s.quantiles[:, HIGH] - s.quantiles[:, LOW]  # noqa: E731
    flagged = factor > 1
    assert np.all(width(widened)[flagged] > width(plain)[flagged])
    np.testing.assert_allclose(width(widened)[~flagged], width(plain)[~flagged])
