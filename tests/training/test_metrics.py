"""Evaluation metrics against hand-computed values."""

from __future__ import annotations

import numpy as np

from training import metrics as m


def test_auroc_of_perfect_random_and_tied_scores():
    labels = np.array([0, 0, 1, 1])
    assert m.auroc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert m.auroc(labels, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    # All scores tied: the ROC is the diagonal, area 1/2.
    assert m.auroc(labels, np.full(4, 0.5)) == 0.5
    # One inversion out of four positive-negative pairs: 3/4 (Mann-Whitney).
    assert m.auroc(labels, np.array([0.1, 0.6, 0.5, 0.9])) == 0.75


def test_tpr_at_fpr():
    labels = np.array([0] * 100 + [1] * 10)
    scores = np.r_[np.linspace(0, 0.5, 99), 0.95, np.linspace(0.6, 1.0, 10)]
    # Positives are 0.6, 0.644, ..., 0.956, 1.0: only the top two beat the negative at 0.95,
    # so with no false positive the TPR is 2/10; allowing one (FPR 0.01) catches all.
    assert m.tpr_at_fpr(labels, scores, 0.0) == 0.2
    assert m.tpr_at_fpr(labels, scores, 0.01) == 1.0


def test_regression_errors_and_coverage():
    true = np.array([1.0, 2.0, 3.0, 1.5])
    predicted = np.array([1.1, 1.9, 3.3, 1.5])
    errors = m.regression_errors(true, predicted)
    np.testing.assert_allclose(errors["theta_E_rmse_arcsec"], np.sqrt((0.01 + 0.01 + 0.09) / 4))
    np.testing.assert_allclose(errors["theta_E_bias_arcsec"], (0.1 - 0.1 + 0.3 + 0.0) / 4)
    np.testing.assert_allclose(errors["theta_E_median_frac_err"], np.median([0.1, 0.05, 0.1, 0.0]))
    assert m.interval_coverage(true, true - 0.1, true + 0.1) == 1.0
    assert m.interval_coverage(true, predicted - 0.05, predicted + 0.05) == 0.25


def _resample(n, seed):
    """One resample drawn explicitly, and its count row as the weighted statistics take it."""
    index = np.random.default_rng(seed).integers(0, n, n)
    return index, np.bincount(index, minlength=n).astype(float)[None, :]


def test_weighted_statistics_equal_the_plain_ones_on_an_explicit_resample():
    rng = np.random.default_rng(11)
    labels = np.r_[np.zeros(300), np.ones(200)]
    # Rounded scores: many ties, which both implementations must count as halves.
    scores = np.round(np.r_[rng.normal(0, 1, 300), rng.normal(1.2, 1, 200)], 1)
    for seed in range(5):
        index, counts = _resample(len(labels), seed)
        np.testing.assert_allclose(
            m.weighted_auroc(counts, labels, scores)[0],
            m.auroc(labels[index], scores[index]),
            rtol=0,
            atol=1e-12,
        )
        for max_fpr in (0.0, 0.01, 0.1):
            tpr, fpr, threshold = m.weighted_operating_point(counts, labels, scores, max_fpr)
            assert tpr[0] == m.tpr_at_fpr(labels[index], scores[index], max_fpr)
            negatives = scores[index][labels[index] == 0]
            assert fpr[0] <= max_fpr
            np.testing.assert_allclose(fpr[0], np.mean(negatives >= threshold[0]), atol=1e-12)
            rate = m.weighted_rate_above(counts, labels == 0, scores, threshold)
            np.testing.assert_allclose(rate, fpr, atol=1e-12)
        values = rng.normal(size=len(labels))
        np.testing.assert_allclose(m.weighted_mean(counts, values)[0], values[index].mean())


def test_bootstrap_interval_of_a_mean_covers_about_95_percent():
    # 200 samples of 400 draws from N(0, 1): the interval should hold the true mean 0
    # in about 95% of them (binomial sd 1.5%); percentile intervals run slightly short.
    rng = np.random.default_rng(3)
    hits = 0
    for trial in range(200):
        values = rng.normal(0, 1, 400)
        (interval,) = m.bootstrap(
            lambda counts, v=values: m.weighted_mean(counts, v), 400, n_resamples=1000, seed=trial
        )
        hits += interval.low <= 0.0 <= interval.high
        np.testing.assert_allclose(interval.value, values.mean())
    assert 0.90 <= hits / 200 <= 0.99


def test_bootstrap_auroc_of_two_gaussians_contains_the_analytic_value():
    # Scores N(0, 1) for 1000 negatives and N(1, 1) for 1000 positives:
    # AUROC = P(X_pos > X_neg) = Phi(1 / sqrt(2)) = 0.76025 (normal CDF of the difference).
    rng = np.random.default_rng(5)
    labels = np.r_[np.zeros(1000), np.ones(1000)]
    scores = np.r_[rng.normal(0, 1, 1000), rng.normal(1, 1, 1000)]
    (interval,) = m.bootstrap(
        lambda counts: m.weighted_auroc(counts, labels, scores), 2000, n_resamples=1000, seed=1
    )
    assert interval.low < 0.76025 < interval.high
    np.testing.assert_allclose(interval.value, m.auroc(labels, scores), rtol=1e-12)
    # Hanley & McNeil (1982) standard error at A = 0.76, 1000 + 1000: 0.0107;
    # the interval should span about 2 x 1.96 of it.
    a = 0.76025
    q1, q2 = a / (2 - a), 2 * a**2 / (1 + a)
    se = np.sqrt((a * (1 - a) + 999 * (q1 - a**2) + 999 * (q2 - a**2)) / 1000**2)
    np.testing.assert_allclose(interval.high - interval.low, 2 * 1.96 * se, rtol=0.2)


def test_bootstrap_is_seeded_and_leaves_out_empty_groups():
    values = np.arange(10.0)
    members = values < 1  # one item: absent from about a third of the resamples

    def statistic(counts):
        return np.stack(
            [
                m.weighted_mean(counts, values),
                m.weighted_rate_above(counts, members, values, np.zeros(len(counts))),
            ],
            axis=1,
        )

    first = m.bootstrap(statistic, 10, n_resamples=1000, seed=2)
    assert first == m.bootstrap(statistic, 10, n_resamples=1000, seed=2)
    assert first != m.bootstrap(statistic, 10, n_resamples=1000, seed=3)
    # The member's rate above 0 is 1 whenever it is drawn: NaN resamples are left out.
    assert (first[1].low, first[1].high) == (1.0, 1.0)


def test_purity_at_low_prevalence():
    # TPR 0.9, FPR 0.01, one lens in 1000: 0.0009 / (0.0009 + 0.00999) = 0.0826.
    np.testing.assert_allclose(m.purity(np.array([0.9]), np.array([0.01]), 1e-3), 0.0826, atol=1e-4)
    assert m.purity(np.array([0.0]), np.array([0.0]), 1e-3)[0] == 1.0
