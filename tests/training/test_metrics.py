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
