"""Evaluation metrics (pure numpy): lens finding as in Metcalf et al. 2019,
theta_E regression errors, and interval coverage of predictive distributions."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

#: theta_E bin edges (arcsec) for per-bin regression metrics.
THETA_E_BINS_ARCSEC: tuple[float, ...] = (0.4, 1.0, 1.5, 2.0, 2.5, 3.3)


def roc_curve(labels: NDArray, scores: NDArray) -> tuple[NDArray, NDArray]:
    """False- and true-positive rates at every distinct score threshold (descending)."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order].astype(bool)
    distinct = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    tp = np.cumsum(sorted_labels)[distinct]
    fp = np.cumsum(~sorted_labels)[distinct]
    tpr = np.r_[0.0, tp / max(sorted_labels.sum(), 1)]
    fpr = np.r_[0.0, fp / max((~sorted_labels).sum(), 1)]
    return fpr, tpr


def auroc(labels: NDArray, scores: NDArray) -> float:
    """Area under the ROC curve (trapezoidal; ties handled)."""
    fpr, tpr = roc_curve(labels, scores)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def tpr_at_fpr(labels: NDArray, scores: NDArray, max_fpr: float) -> float:
    """Highest true-positive rate reached with a false-positive rate <= ``max_fpr``."""
    fpr, tpr = roc_curve(labels, scores)
    return float(tpr[fpr <= max_fpr].max())


def regression_errors(true: NDArray, predicted: NDArray) -> dict[str, float]:
    """RMSE, MAE, bias (arcsec) and median fractional error of theta_E."""
    error = predicted - true
    return {
        "theta_E_rmse_arcsec": float(np.sqrt(np.mean(error**2))),
        "theta_E_mae_arcsec": float(np.mean(np.abs(error))),
        "theta_E_bias_arcsec": float(np.mean(error)),
        "theta_E_median_frac_err": float(np.median(np.abs(error) / true)),
        "n": int(len(true)),
    }


def binned_regression_errors(true: NDArray, predicted: NDArray) -> dict[str, dict[str, float]]:
    """:func:`regression_errors` in each bin of ``THETA_E_BINS_ARCSEC``."""
    bins = {}
    edges = THETA_E_BINS_ARCSEC
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (true >= low) & (true < high)
        if inside.any():
            bins[f"{low:.1f}-{high:.1f}"] = regression_errors(true[inside], predicted[inside])
    return bins


def interval_coverage(true: NDArray, lower: NDArray, upper: NDArray) -> float:
    """Fraction of true values inside [lower, upper]."""
    return float(np.mean((true >= lower) & (true <= upper)))


def reliability(
    labels: NDArray, probabilities: NDArray, n_bins: int = 10
) -> tuple[NDArray, NDArray, NDArray]:
    """Mean predicted probability, observed lens fraction and count per probability bin."""
    edges = np.linspace(0, 1, n_bins + 1)
    index = np.clip(np.digitize(probabilities, edges) - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    mean_p = np.bincount(index, probabilities, minlength=n_bins) / np.maximum(counts, 1)
    observed = np.bincount(index, labels.astype(float), minlength=n_bins) / np.maximum(counts, 1)
    return mean_p, observed, counts


def bootstrap_interval(
    statistic: Callable[[list[NDArray]], float],
    sizes: list[int],
    rng: np.random.Generator,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic of one or more independent samples.

    Parameters
    ----------
    statistic : callable
        Takes one index array per sample (rows drawn with replacement) and
        returns the statistic of those rows.
    sizes : list of int
        Size of each sample (rows); each is resampled on its own, so a two-sample
        statistic such as an AUROC keeps both sizes.
    rng : numpy.random.Generator
        Source of the resampling.
    n_boot : int
        Resamples (count).
    level : float
        Coverage of the central interval (fraction).
    """
    values = [statistic([rng.integers(0, size, size) for size in sizes]) for _ in range(n_boot)]
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)
