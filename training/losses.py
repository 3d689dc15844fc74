"""Losses, registered so that saved models load with their compile config."""

from __future__ import annotations

import keras
from keras import ops

from training.models import PARAMETER_LOSS_WEIGHTS, PARAMETER_SCALES


@keras.saving.register_keras_serializable(package="lensserve")
def scaled_mse(y_true, y_pred):
    """Weighted mean squared error, each parameter in units of its typical spread."""
    scale = ops.convert_to_tensor(PARAMETER_SCALES, dtype=y_pred.dtype)
    weight = ops.convert_to_tensor(PARAMETER_LOSS_WEIGHTS, dtype=y_pred.dtype)
    return ops.sum(weight * ops.square((y_true - y_pred) / scale), axis=-1) / ops.sum(weight)


@keras.saving.register_keras_serializable(package="lensserve")
def gaussian_nll(y_true, y_pred):
    """Negative log-likelihood of theta_E under N(mean, exp(log_variance)) (up to a constant)."""
    mean, log_variance = y_pred[..., 0], y_pred[..., 1]
    return ops.mean(
        0.5 * (log_variance + ops.square(y_true[..., 0] - mean) * ops.exp(-log_variance)), axis=-1
    )
