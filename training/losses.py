"""Losses, registered so that saved models load with their compile config."""

from __future__ import annotations

import keras
import tensorflow as tf

from training.models import PARAMETER_LOSS_WEIGHTS, PARAMETER_SCALES


@keras.saving.register_keras_serializable(package="lensserve")
def scaled_mse(y_true, y_pred):
    """Weighted mean squared error, each parameter in units of its typical spread."""
    scale = tf.constant(PARAMETER_SCALES, y_pred.dtype)
    weight = tf.constant(PARAMETER_LOSS_WEIGHTS, y_pred.dtype)
    return tf.reduce_sum(weight * tf.square((y_true - y_pred) / scale), axis=-1) / tf.reduce_sum(
        weight
    )


@keras.saving.register_keras_serializable(package="lensserve")
def gaussian_nll(y_true, y_pred):
    """Negative log-likelihood of theta_E under N(mean, exp(log_variance)) (up to a constant)."""
    mean, log_variance = y_pred[..., 0], y_pred[..., 1]
    return tf.reduce_mean(
        0.5 * (log_variance + tf.square(y_true[..., 0] - mean) * tf.exp(-log_variance)), axis=-1
    )
