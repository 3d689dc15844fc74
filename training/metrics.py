"""Evaluation metrics (pure numpy): lens finding as in Metcalf et al. 2019,
theta_E regression errors, and interval coverage of predictive distributions."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

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


# Bootstrap intervals. A resample is a row of counts: how often each item (cutout) was
# drawn, with replacement, out of n draws. Every statistic below takes a (B, n) matrix of
# such counts and returns one value per row, so B resamples cost a few array operations
# instead of B Python calls; a row of ones is the set itself.

#: Resamples per chunk: (chunk, n) float64 counts stay near 16 MB for n = 20 000.
_BOOTSTRAP_CHUNK = 100


@dataclass(frozen=True)
class Interval:
    """A statistic on the whole set and its bootstrap percentile interval."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def bootstrap_counts(
    n_items: int, *, n_resamples: int, seed: int | np.random.SeedSequence
) -> Iterator[NDArray[np.float64]]:
    """Resamples with replacement as (B, n_items) count matrices, in chunks of at most 100 rows.

    Parameters
    ----------
    n_items : int
        Items (cutouts) in the set; each resample draws that many.
    n_resamples : int
        Resamples in all, over the chunks.
    seed : int or SeedSequence
        Seed of the draws: the same seed gives the same resamples.
    """
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_resamples:
        rows = min(_BOOTSTRAP_CHUNK, n_resamples - done)
        draws = rng.integers(0, n_items, size=(rows, n_items))
        flat = (draws + n_items * np.arange(rows)[:, None]).ravel()
        yield np.bincount(flat, minlength=rows * n_items).reshape(rows, n_items).astype(float)
        done += rows


def bootstrap(
    statistic: Callable[[NDArray[np.float64]], NDArray[np.float64]],
    n_items: int,
    *,
    n_resamples: int = 1000,
    seed: int | np.random.SeedSequence = 0,
    level: float = 0.95,
) -> list[Interval]:
    """Percentile bootstrap intervals of the k statistics that ``statistic`` returns.

    Parameters
    ----------
    statistic : callable
        Maps a (B, n_items) matrix of resample counts to a (B, k) or (B,) array.
        Resamples where a statistic is undefined (NaN, e.g. an empty bin) are left
        out of that statistic's interval.
    n_items : int
        Items resampled (cutouts).
    n_resamples : int
        Bootstrap resamples (at least 1000 for a 95% interval).
    seed : int or SeedSequence
        Seed of the resampling.
    level : float
        Central probability of the interval (0.95: the 2.5th to 97.5th percentiles).

    Returns
    -------
    list of Interval
        One per statistic: its value on the whole set and the interval.
    """
    point = np.atleast_1d(np.asarray(statistic(np.ones((1, n_items)))[0], dtype=float))
    samples = np.concatenate(
        [
            np.asarray(statistic(counts), dtype=float).reshape(len(counts), -1)
            for counts in bootstrap_counts(n_items, n_resamples=n_resamples, seed=seed)
        ]
    )
    tails = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    intervals = []
    for k, value in enumerate(point):
        column = samples[:, k][np.isfinite(samples[:, k])]
        low, high = np.percentile(column, tails) if column.size else (np.nan, np.nan)
        intervals.append(Interval(float(value), float(low), float(high)))
    return intervals


def _safe_ratio(numerator: NDArray, denominator: NDArray) -> NDArray[np.float64]:
    """numerator / denominator, NaN where the denominator is 0 (an empty resample group)."""
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, np.nan)


def weighted_mean(counts: NDArray, values: NDArray) -> NDArray[np.float64]:
    """Mean of ``values`` in each resample (rows of ``counts``)."""
    return _safe_ratio(counts @ values, counts.sum(axis=1))


def _tie_groups(sorted_scores: NDArray) -> NDArray[np.intp]:
    """Start index of each run of equal values in a sorted array."""
    return np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]


def weighted_auroc(counts: NDArray, labels: NDArray, scores: NDArray) -> NDArray[np.float64]:
    """AUROC of each resample; ties count one half (as :func:`auroc`)."""
    order = np.argsort(scores, kind="mergesort")
    starts = _tie_groups(scores[order])
    positive = labels[order].astype(bool)
    sorted_counts = counts[:, order]
    pos = np.add.reduceat(sorted_counts * positive, starts, axis=1)
    neg = np.add.reduceat(sorted_counts * ~positive, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    return _safe_ratio(np.sum(pos * (below + 0.5 * neg), axis=1), pairs)


def weighted_operating_point(
    counts: NDArray, labels: NDArray, scores: NDArray, max_fpr: float
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """The ROC point of each resample with the highest TPR at FPR <= ``max_fpr``.

    Returns
    -------
    tpr, fpr, threshold : ndarray, shape (B,)
        True- and false-positive rates of the rule ``score >= threshold``;
        the threshold is +inf where no score threshold keeps FPR <= ``max_fpr``.
    """
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    starts = _tie_groups(sorted_scores)
    ends = np.r_[starts[1:], len(scores)] - 1
    positive = labels[order].astype(bool)
    sorted_counts = counts[:, order]
    tp = np.cumsum(sorted_counts * positive, axis=1)[:, ends]
    fp = np.cumsum(sorted_counts * ~positive, axis=1)[:, ends]
    tpr = _safe_ratio(tp, tp[:, -1:])
    fpr = _safe_ratio(fp, fp[:, -1:])
    # FPR never falls as the threshold drops, so the allowed points are a prefix.
    allowed = np.sum(fpr <= max_fpr, axis=1)
    rows = np.arange(len(counts))
    last = np.maximum(allowed - 1, 0)
    some = allowed > 0
    return (
        np.where(some, tpr[rows, last], 0.0),
        np.where(some, fpr[rows, last], 0.0),
        np.where(some, sorted_scores[starts][last], np.inf),
    )


def weighted_rate_above(
    counts: NDArray, members: NDArray, scores: NDArray, thresholds: NDArray
) -> NDArray[np.float64]:
    """Fraction of the ``members`` (a boolean mask) scoring >= each resample's threshold."""
    member_counts = counts[:, members]
    above = scores[members][None, :] >= thresholds[:, None]
    return _safe_ratio(np.sum(member_counts * above, axis=1), member_counts.sum(axis=1))


def purity(tpr: NDArray, fpr: NDArray, prevalence: float) -> NDArray[np.float64]:
    """Fraction of lenses among the candidates at lens prevalence ``prevalence``.

    purity = TPR p / (TPR p + FPR (1 - p)); 1 where nothing is selected.
    """
    selected = tpr * prevalence + fpr * (1 - prevalence)
    return np.where(selected > 0, _safe_ratio(tpr * prevalence, selected), 1.0)


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
