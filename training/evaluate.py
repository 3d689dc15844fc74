"""Metrics and plots for the three trained models on a held-out simulated split.

Writes ``metrics.json`` (read by the exporter into each card's ``metrics``)
and PNG plots (ROC, reliability, predicted vs true theta_E, coverage) into
the runs directory; the exporter copies the plots beside the cards.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import matplotlib
import numpy as np
from numpy.typing import NDArray

from service.contract.uncertainty import QUANTILE_LEVELS, mixture_quantiles, summarise_mc_samples
from training import metrics as m
from training.dataset import load_dataset
from training.symmetry import ROTATIONS, average_over_views, rotate_images
from training.train import RUN_FILES, TRAINING_SUMMARY, prepare

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend first)

METRICS_FILE = "metrics.json"
PLOT_FILES = {
    "lens_classifier": ("lens_classifier_roc.png", "lens_classifier_reliability.png"),
    "einstein_radius": ("einstein_radius_pred_vs_true.png",),
    "einstein_radius_mc": (
        "einstein_radius_mc_coverage.png",
        "einstein_radius_mc_pred_vs_true.png",
    ),
}
_NOMINAL_LEVELS = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.683, 0.8, 0.9, 0.954, 0.99])


def classifier_metrics(labels: NDArray, probabilities: NDArray) -> dict:
    return {
        "auroc": m.auroc(labels, probabilities),
        "tpr_at_fpr_0.01": m.tpr_at_fpr(labels, probabilities, 0.01),
        "tpr_at_fpr_0.001": m.tpr_at_fpr(labels, probabilities, 0.001),
        "n_lenses": int(labels.sum()),
        "n_non_lenses": int((1 - labels).sum()),
    }


def regressor_metrics(true: NDArray, predicted: NDArray) -> dict:
    """theta_E errors overall and per bin, plus RMSE of the other parameters."""
    result = m.regression_errors(true[:, 0], predicted[:, 0])
    result["theta_E_bins"] = m.binned_regression_errors(true[:, 0], predicted[:, 0])
    for k, name in enumerate(("e1", "e2", "center_x", "center_y"), start=1):
        result[f"{name}_rmse"] = float(np.sqrt(np.mean((predicted[:, k] - true[:, k]) ** 2)))
    return result


def central_interval_coverage(
    means: NDArray, log_variances: NDArray, true: NDArray, levels: NDArray
) -> NDArray:
    """Coverage of the central interval of each nominal level, from mixture quantiles."""
    tails = tuple(float(t) for level in levels for t in ((1 - level) / 2, (1 + level) / 2))
    quantiles = mixture_quantiles(means, np.exp(0.5 * log_variances), tails)
    return np.array(
        [
            m.interval_coverage(true, quantiles[:, 2 * i], quantiles[:, 2 * i + 1])
            for i in range(len(levels))
        ]
    )


def mc_metrics(
    true_theta_e: NDArray,
    means: NDArray,
    log_variances: NDArray,
    mixture_levels: tuple[float, ...] = QUANTILE_LEVELS,
) -> tuple[dict, NDArray]:
    """MC metrics of the intervals as served (quantiles at ``mixture_levels``); the raw
    mixture's coverage beside them."""
    summary = summarise_mc_samples(means, log_variances, mixture_levels)
    raw = summarise_mc_samples(means, log_variances).quantiles
    q = summary.quantiles
    coverage = central_interval_coverage(means, log_variances, true_theta_e, _NOMINAL_LEVELS)
    result = m.regression_errors(true_theta_e, summary.mean)
    result.update(
        {
            "coverage_68": m.interval_coverage(true_theta_e, q[:, 1], q[:, 3]),
            "coverage_95": m.interval_coverage(true_theta_e, q[:, 0], q[:, 4]),
            "mixture_coverage_68": m.interval_coverage(true_theta_e, raw[:, 1], raw[:, 3]),
            "mixture_coverage_95": m.interval_coverage(true_theta_e, raw[:, 0], raw[:, 4]),
            "mixture_levels": list(mixture_levels),
            "mean_width_68_arcsec": float(np.mean(q[:, 3] - q[:, 1])),
            "mean_width_95_arcsec": float(np.mean(q[:, 4] - q[:, 0])),
            "mean_aleatoric_std_arcsec": float(np.mean(summary.aleatoric_std)),
            "mean_epistemic_std_arcsec": float(np.mean(summary.epistemic_std)),
            "coverage_curve": {
                f"{lv:.3f}": float(c) for lv, c in zip(_NOMINAL_LEVELS, coverage, strict=True)
            },
            "num_samples": int(means.shape[1]),
        }
    )
    return result, summary.mean


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_roc(labels, probabilities, path: Path) -> None:
    fpr, tpr = m.roc_curve(labels, probabilities)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(fpr, tpr)
    ax.set(
        xscale="log",
        xlim=(1e-4, 1),
        ylim=(0, 1.01),
        xlabel="false-positive rate",
        ylabel="true-positive rate",
        title=f"lens_classifier ROC (AUROC {m.auroc(labels, probabilities):.4f})",
    )
    ax.axvline(0.01, ls=":", c="grey")
    _save(fig, path)


def _plot_reliability(labels, probabilities, path: Path) -> None:
    mean_p, observed, counts = m.reliability(labels, probabilities)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot([0, 1], [0, 1], c="grey", ls=":")
    ax.plot(mean_p[counts > 0], observed[counts > 0], "o-")
    ax.set(xlabel="predicted P(lens)", ylabel="observed lens fraction", title="reliability diagram")
    _save(fig, path)


def _plot_pred_vs_true(true, predicted, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.scatter(true, predicted, s=2, alpha=0.3)
    ax.plot([0.4, 3.3], [0.4, 3.3], c="k", lw=0.8)
    ax.set(xlabel="true theta_E (arcsec)", ylabel="predicted theta_E (arcsec)", title=title)
    _save(fig, path)


def _plot_coverage(coverage_curve: dict, path: Path) -> None:
    levels = np.array([float(k) for k in coverage_curve])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot([0, 1], [0, 1], c="grey", ls=":")
    ax.plot(levels, list(coverage_curve.values()), "o-")
    ax.set(
        xlabel="nominal central-interval level",
        ylabel="empirical coverage",
        title="einstein_radius_mc calibration",
    )
    _save(fig, path)


def _mixture_levels(runs_dir: Path) -> tuple[float, ...]:
    """The run's recalibrated mixture levels (``python -m training recalibrate``), or nominal."""
    summary_file = runs_dir / TRAINING_SUMMARY
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    calibration = summary.get("interval_calibration")
    return QUANTILE_LEVELS if calibration is None else tuple(calibration["mixture_levels"])


def _theta_e_predictions(models: dict, images: NDArray) -> tuple[NDArray, NDArray]:
    """(parameters (N, 5), MC samples (N, T, 2)) as the exported graphs give them.

    The graphs see each cutout in :data:`~training.symmetry.ROTATIONS` rotations
    (:mod:`training.symmetry`): the point estimates are averaged over the views
    and MC pass t comes from view t mod ROTATIONS.
    """
    views = [rotate_images(images, k) for k in range(ROTATIONS)]
    parameters = average_over_views(
        np.stack([models["einstein_radius"].predict(v, batch_size=512, verbose=0) for v in views])
    )
    per_view = np.stack(
        [models["einstein_radius_mc"].predict(v, batch_size=64, verbose=0) for v in views]
    )
    passes = np.arange(per_view.shape[2])
    mc = per_view[passes % ROTATIONS, :, passes].transpose(1, 0, 2)
    return parameters, mc


def evaluate_all(data_dir: Path, runs_dir: Path) -> dict:
    """Evaluate the models in ``runs_dir`` on the split in ``data_dir``; write metrics and plots."""
    split = prepare(load_dataset(data_dir))
    lenses = split.is_lens == 1
    models = {
        name: keras.saving.load_model(runs_dir / f, compile=False) for name, f in RUN_FILES.items()
    }

    probabilities = models["lens_classifier"].predict(split.images, batch_size=512, verbose=0)[:, 0]
    parameters, mc = _theta_e_predictions(models, split.images[lenses])
    true = split.parameters[lenses]

    results = {
        "lens_classifier": classifier_metrics(split.is_lens, probabilities),
        "einstein_radius": regressor_metrics(true, parameters),
    }
    levels = _mixture_levels(runs_dir)
    results["einstein_radius_mc"], mc_mean = mc_metrics(true[:, 0], mc[..., 0], mc[..., 1], levels)
    for result in results.values():
        result["test_split"] = {
            "n_cutouts": int(len(split.images)),
            "n_lenses": int(lenses.sum()),
            "data_dir": data_dir.name,
        }

    roc_png, reliability_png = PLOT_FILES["lens_classifier"]
    _plot_roc(split.is_lens, probabilities, runs_dir / roc_png)
    _plot_reliability(split.is_lens, probabilities, runs_dir / reliability_png)
    _plot_pred_vs_true(
        true[:, 0],
        parameters[:, 0],
        runs_dir / PLOT_FILES["einstein_radius"][0],
        "einstein_radius (point estimate)",
    )
    coverage_png, mc_png = PLOT_FILES["einstein_radius_mc"]
    _plot_coverage(results["einstein_radius_mc"]["coverage_curve"], runs_dir / coverage_png)
    _plot_pred_vs_true(true[:, 0], mc_mean, runs_dir / mc_png, "einstein_radius_mc (mixture mean)")

    (runs_dir / METRICS_FILE).write_text(json.dumps(results, indent=2))
    print(
        json.dumps(
            {
                k: {kk: vv for kk, vv in v.items() if not isinstance(vv, dict)}
                for k, v in results.items()
            },
            indent=2,
        )
    )
    return results
