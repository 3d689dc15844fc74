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
class BetaGaussianNLL(keras.losses.Loss):
    """Gaussian NLL with each cutout weighted by its predicted variance to the power beta.

    The beta-NLL of Seitzer et al. (2022, ICLR): plain NLL (beta = 0) weights a
    cutout's squared error by 1/variance, so the mean is fitted loosely where
    the predicted spread is large (the largest Einstein radii) and pulled toward
    the bulk there. The weight is held constant in the gradient; beta = 1 gives
    the mean the gradient of a mean squared error, 0.5 is the authors' default,
    0 is the plain NLL (up to a constant).
    """

    def __init__(self, beta: float = 0.0, name: str = "beta_gaussian_nll", **kwargs):
        super().__init__(name=name, **kwargs)
        self.beta = float(beta)

    def call(self, y_true, y_pred):
        log_variance = y_pred[..., 1]
        weight = ops.stop_gradient(ops.exp(self.beta * log_variance))
        error = y_true[..., 0] - y_pred[..., 0]
        nll = 0.5 * (log_variance + ops.square(error) * ops.exp(-log_variance))
        return ops.mean(weight * nll, axis=-1)

    def get_config(self) -> dict:
        return {**super().get_config(), "beta": self.beta}
