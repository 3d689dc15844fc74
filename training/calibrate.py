"""Recalibrate a run's MC model on simulated lenses that no model was trained on.

Training calibrates the aleatoric scale on its validation split, a few
thousand lenses; that sample's own noise moves the 68% coverage by a few
hundredths, as much as the tolerance on it. This recomputes the scale
(:func:`training.train.calibrate_aleatoric_scale`) on every lens of separate
simulated sets and rebuilds the MC head with the new log-variance offset; the
trunk and every weight are unchanged. Then, because one scale cannot make
both the 68% and the 95% intervals exact when the residuals have heavier
tails than the mixture, it fits the mixture levels that the reported
quantiles are read at (:func:`fit_interval_levels`); export writes them into
the MC model's card and the service reads its quantiles there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import keras
import numpy as np

from service.contract.uncertainty import QUANTILE_LEVELS, mixture_quantiles
from training.config import ModelConfig
from training.dataset import load_dataset
from training.models import build_einstein_radius_mc, build_mc_head, mc_trunk_and_head
from training.train import RUN_FILES, TRAINING_SUMMARY, calibrate_aleatoric_scale, prepare


def recalibrate_mc_model(runs_dir: Path, data_dirs: list[Path]) -> float:
    """Recalibrate ``runs_dir``'s MC model on the lenses of ``data_dirs``; the new factor."""
    summary = json.loads((runs_dir / TRAINING_SUMMARY).read_text())
    model_config = ModelConfig.from_dict(summary["model_config"])
    path = runs_dir / RUN_FILES["einstein_radius_mc"]
    model = keras.saving.load_model(path, compile=False)
    images, truth = _lenses(data_dirs)
    samples = model.predict(images, batch_size=64, verbose=0)
    relative = calibrate_aleatoric_scale(samples[..., 0], samples[..., 1], truth)
    scale = float(summary["aleatoric_calibration_factor"]) * relative

    trunk, head = mc_trunk_and_head(model)
    calibrated = build_mc_head(model_config, log_variance_offset=2 * math.log(scale))
    calibrated.set_weights(head.get_weights())
    build_einstein_radius_mc(trunk, calibrated, num_samples=model_config.mc_samples).save(path)

    log_variances = samples[..., 1] + 2 * math.log(relative)
    mixture_levels = fit_interval_levels(samples[..., 0], log_variances, truth)
    data = {"data_dirs": [str(d) for d in data_dirs], "n_lenses": int(len(truth))}
    summary["aleatoric_calibration_factor"] = scale
    summary["aleatoric_calibration_data"] = data
    summary["interval_calibration"] = {
        "levels": list(QUANTILE_LEVELS),
        "mixture_levels": list(mixture_levels),
        **data,
    }
    (runs_dir / TRAINING_SUMMARY).write_text(json.dumps(summary, indent=2))
    return scale


def fit_interval_levels(
    means: np.ndarray, log_variances: np.ndarray, truth: np.ndarray
) -> tuple[float, ...]:
    """Mixture CDF levels whose central intervals cover ``QUANTILE_LEVELS``' fractions.

    Residuals have heavier tails than the Gaussian mixture, so after the scale
    is calibrated the 68% interval still over-covers a little and the 95%
    under-covers. Each central interval's mixture level is found by bisection
    on its empirical coverage (Kuleshov et al. 2018, recalibration of the
    CDF); the median stays at 0.5. Returned in ``QUANTILE_LEVELS`` order.
    """
    stds = np.exp(0.5 * log_variances)
    fitted = list(QUANTILE_LEVELS)
    for i in range(len(fitted) // 2):  # the lower end of each central interval
        nominal = 1 - 2 * QUANTILE_LEVELS[i]  # its central fraction, e.g. 0.68 for 0.16
        lo, hi = 1e-4, 1 - 1e-4
        for _ in range(30):
            width = 0.5 * (lo + hi)
            q = mixture_quantiles(means, stds, (0.5 - width / 2, 0.5 + width / 2))
            covered = np.mean((truth >= q[:, 0]) & (truth <= q[:, 1]))
            lo, hi = (width, hi) if covered < nominal else (lo, width)
        width = 0.5 * (lo + hi)
        fitted[i], fitted[-1 - i] = 0.5 - width / 2, 0.5 + width / 2
    return tuple(fitted)


def _lenses(data_dirs: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Network inputs and true theta_E (arcsec) of every lens in ``data_dirs``."""
    images, truth = [], []
    for data_dir in data_dirs:
        split = prepare(load_dataset(data_dir))
        lenses = split.is_lens == 1
        images.append(split.images[lenses])
        truth.append(split.parameters[lenses, 0])
    return np.concatenate(images), np.concatenate(truth)
