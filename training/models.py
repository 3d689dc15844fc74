"""Keras 3 builders for the three lensserve models.

Every model is a deterministic convolutional trunk followed by a task head
(keras-hub style: backbone separate from head, stable derived layer names).
``einstein_radius_mc`` reuses the ``einstein_radius`` trunk and puts all its
dropout in a small head, so T Monte Carlo samples cost one trunk pass (per
view: the exported theta_E graphs see the cutout's four rotations,
:mod:`training.symmetry`) plus T cheap head passes (see
:func:`build_mc_sampler`); the exported MC graph also applies the regressor's
own head to those trunk passes, so one ONNX call gives the point estimates and
the distribution.
"""

from __future__ import annotations

import keras
from keras import ops

from training.config import ModelConfig

#: Order of the regressed deflector parameters (arcsec for theta_E and centres).
PARAMETER_NAMES: tuple[str, ...] = ("theta_E", "e1", "e2", "center_x", "center_y")
#: Typical centre and spread of each parameter; the regressor's last layer
#: maps unit-scale outputs to physical units with these, so losses are balanced.
PARAMETER_OFFSETS: tuple[float, ...] = (1.75, 0.0, 0.0, 0.0, 0.0)
PARAMETER_SCALES: tuple[float, ...] = (0.75, 0.12, 0.12, 0.1, 0.1)
#: Relative weight of each parameter in the regression loss: theta_E is the
#: product's headline number, the others are nuisances the trunk must see.
PARAMETER_LOSS_WEIGHTS: tuple[float, ...] = (4.0, 1.0, 1.0, 1.0, 1.0)


def _tensorflow_backend() -> bool:
    return keras.backend.backend() == "tensorflow"


@keras.saving.register_keras_serializable(package="lensserve")
class McDropout(keras.layers.Layer):
    """Dropout that is always on, built on ``tf.random.uniform`` under TensorFlow.

    Keras' own ``Dropout(training=True)`` exports to ONNX as
    ``StatelessRandomUniformV2``, which tf2onnx cannot convert; under the
    TensorFlow backend this layer exports as ``RandomUniformLike`` and stays
    stochastic in onnxruntime. Other backends (JAX, for GPU training) draw
    with ``keras.random.uniform`` and a ``SeedGenerator``, whose state is not
    saved: a model saved under JAX has the same config and weights and loads
    under TensorFlow.
    """

    def __init__(self, rate: float, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
        self.rate = float(rate)
        self.seed_generator = None if _tensorflow_backend() else keras.random.SeedGenerator()

    def call(self, inputs):
        keep = 1.0 - self.rate
        if self.seed_generator is None:
            import tensorflow as tf  # only under the TensorFlow backend: JAX training needs no TF

            uniform = tf.random.uniform(tf.shape(inputs), dtype=inputs.dtype)
        else:
            uniform = keras.random.uniform(
                ops.shape(inputs), dtype=inputs.dtype, seed=self.seed_generator
            )
        return inputs * ops.cast(uniform < keep, inputs.dtype) / keep

    def get_config(self):
        return {**super().get_config(), "rate": self.rate}


@keras.saving.register_keras_serializable(package="lensserve")
class Affine(keras.layers.Layer):
    """Fixed per-channel ``x * scale + offset`` (maps unit outputs to physical units)."""

    def __init__(self, scale: list[float], offset: list[float], **kwargs):
        super().__init__(**kwargs)
        self.scale = [float(s) for s in scale]
        self.offset = [float(o) for o in offset]

    def call(self, inputs):
        scale = ops.convert_to_tensor(self.scale, dtype=inputs.dtype)
        offset = ops.convert_to_tensor(self.offset, dtype=inputs.dtype)
        return inputs * scale + offset

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "offset": self.offset}


@keras.saving.register_keras_serializable(package="lensserve")
class RepeatSamples(keras.layers.Layer):
    """Tile features (batch, d) to (batch, num_samples, d) for MC dropout passes."""

    def __init__(self, num_samples: int, **kwargs):
        super().__init__(**kwargs)
        self.num_samples = int(num_samples)

    def call(self, inputs):
        return ops.tile(ops.expand_dims(inputs, 1), [1, self.num_samples, 1])

    def get_config(self):
        return {**super().get_config(), "num_samples": self.num_samples}


def build_trunk(config: ModelConfig, *, name: str) -> keras.Model:
    """Deterministic CNN: image (64, 64, 3) -> feature vector (``config.feature_units``)."""
    image = keras.Input(shape=config.input_shape, name="image")
    x = image
    stages = zip(config.stage_filters, config.convs_per_stage, strict=True)
    for stage, (filters, n_convs) in enumerate(stages):
        for conv in range(n_convs):
            prefix = f"{name}_stage{stage}_conv{conv}"
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=prefix)(x)
            x = keras.layers.BatchNormalization(name=f"{prefix}_bn")(x)
            x = keras.layers.Activation("relu", name=f"{prefix}_relu")(x)
        x = keras.layers.MaxPooling2D(2, name=f"{name}_stage{stage}_pool")(x)
    # Flatten, not global pooling: the centre offsets need absolute position.
    x = keras.layers.Flatten(name=f"{name}_flatten")(x)
    # SiLU, not ReLU: a regression loss can switch off every ReLU unit early on
    # (and exact GELU exports as Erfc, which ONNX opset 17 lacks).
    x = keras.layers.Dense(config.feature_units, activation="silu", name=f"{name}_features")(x)
    return keras.Model(image, x, name=name)


def build_lens_classifier(config: ModelConfig) -> keras.Model:
    """P(lens) for a preprocessed cutout: output ``lens_probability``, shape (batch, 1)."""
    image = keras.Input(shape=config.input_shape, name="image")
    features = build_trunk(config, name="lens_classifier_trunk")(image)
    x = keras.layers.Dropout(config.train_dropout, name="lens_classifier_dropout")(features)
    logit = keras.layers.Dense(1, name="lens_classifier_logit")(x)
    probability = keras.layers.Activation("sigmoid", name="lens_probability")(logit)
    return keras.Model(image, probability, name="lens_classifier")


def build_einstein_radius(config: ModelConfig) -> keras.Model:
    """Point estimates of ``PARAMETER_NAMES``: output ``parameters``, shape (batch, 5)."""
    image = keras.Input(shape=config.input_shape, name="image")
    features = build_trunk(config, name="einstein_radius_trunk")(image)
    x = keras.layers.Dropout(config.train_dropout, name="einstein_radius_dropout")(features)
    unit = keras.layers.Dense(len(PARAMETER_NAMES), name="einstein_radius_unit")(x)
    parameters = Affine(list(PARAMETER_SCALES), list(PARAMETER_OFFSETS), name="parameters")(unit)
    return keras.Model(image, parameters, name="einstein_radius")


def build_mc_head(config: ModelConfig, *, log_variance_offset: float = 0.0) -> keras.Model:
    """Stochastic head: features (..., d) -> (..., 2) = [theta_E mean, log-variance].

    ``log_variance_offset`` adds 2 ln(s) to the log-variance: the post-hoc
    calibration factor s on the aleatoric standard deviation.
    """
    features = keras.Input(shape=(None, config.feature_units), name="features")
    x = McDropout(config.mc_dropout, name="mc_dropout_0")(features)
    x = keras.layers.Dense(config.mc_head_units, activation="relu", name="mc_dense_0")(x)
    x = McDropout(config.mc_dropout, name="mc_dropout_1")(x)
    unit = keras.layers.Dense(2, name="mc_unit")(x)
    out = Affine(
        [PARAMETER_SCALES[0], 1.0],
        [PARAMETER_OFFSETS[0], log_variance_offset],
        name="theta_E_mean_log_variance",
    )(unit)
    return keras.Model(features, out, name="einstein_radius_mc_head")


def build_einstein_radius_mc(
    trunk: keras.Model, head: keras.Model, *, num_samples: int
) -> keras.Model:
    """MC-dropout model: image -> (batch, num_samples, 2) [theta_E mean, log-variance]."""
    image = keras.Input(shape=trunk.input.shape[1:], name="image")
    features = trunk(image)
    repeated = RepeatSamples(num_samples, name="repeat_samples")(features)
    return keras.Model(image, head(repeated), name="einstein_radius_mc")


def mc_trunk_and_head(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """The (trunk, head) sub-models of a model built by :func:`build_einstein_radius_mc`."""
    trunk = next(layer for layer in model.layers if layer.name.endswith("_trunk"))
    head = model.get_layer("einstein_radius_mc_head")
    return trunk, head


def regressor_point_head(regressor: keras.Model) -> keras.Model:
    """The layers of a :func:`build_einstein_radius` model after its trunk, as a model.

    features (batch, d) -> ``parameters`` (batch, 5) in the units of
    ``PARAMETER_NAMES`` (arcsec for theta_E and the centre). The layers and
    weights are the regressor's own; its dropout is the identity at inference.
    """
    features = keras.Input(shape=(regressor.get_layer("einstein_radius_trunk").output.shape[-1],))
    x = regressor.get_layer("einstein_radius_dropout")(features)
    unit = regressor.get_layer("einstein_radius_unit")(x)
    parameters = regressor.get_layer("parameters")(unit)
    return keras.Model(features, parameters, name="einstein_radius_point_head")


def rotated_views(image, views: int):
    """TensorFlow: (N, H, W, C) -> (views * N, H, W, C), view k rotated by k × 90 degrees.

    View-major, in :func:`training.symmetry.rotate_images`' convention
    (``numpy.rot90`` over the pixel axes), written with transposes and
    reversals so tf2onnx exports plain ``Transpose`` and ``Slice`` nodes.
    """
    import tensorflow as tf

    rotations = (
        lambda x: x,
        lambda x: tf.transpose(tf.reverse(x, [2]), [0, 2, 1, 3]),
        lambda x: tf.reverse(x, [1, 2]),
        lambda x: tf.transpose(tf.reverse(x, [1]), [0, 2, 1, 3]),
    )
    return tf.concat([rotations[k](image) for k in range(views)], axis=0)


def average_parameters_over_views(view_parameters, views: int):
    """TensorFlow: (views * N, 5) view-major parameters -> (N, 5) in the unrotated frame."""
    import numpy as np
    import tensorflow as tf

    from training.symmetry import parameter_map

    maps = tf.constant(np.stack([parameter_map(k) for k in range(views)]), tf.float32)
    per_view = tf.reshape(view_parameters, (views, -1, view_parameters.shape[-1]))
    return tf.reduce_mean(tf.einsum("vnq,vqp->vnp", per_view, maps), axis=0)


def build_mc_sampler(
    trunk: keras.Model,
    head: keras.Model,
    input_shape: tuple[int, ...],
    *,
    point_head: keras.Model | None = None,
    views: int = 1,
):
    """A ``tf.function`` (image, num_samples) -> (means, log_variances), each (batch, T).

    This is the graph exported to ONNX: one trunk pass per cutout and view,
    then the head on T copies of the features, so T samples cost little more
    than the trunk. With ``views`` > 1 the cutout is seen in that many
    rotations (:func:`rotated_views`) and pass t uses view t mod ``views``, so
    the mixture spans the views at the same head cost. With ``point_head``
    (:func:`regressor_point_head`) it also returns the regressor's
    ``parameters`` (batch, 5) from the same trunk passes, averaged over the
    views, so the point estimates need no second trunk. Needs the TensorFlow
    backend (export only).
    """
    import tensorflow as tf

    @tf.function(
        input_signature=[
            tf.TensorSpec((None, *input_shape), tf.float32, name="image"),
            tf.TensorSpec((), tf.int32, name="num_samples"),
        ]
    )
    def sample(image, num_samples):
        features = trunk(rotated_views(image, views), training=False)
        per_view = tf.reshape(features, (views, -1, features.shape[-1]))
        view_of_pass = tf.math.floormod(tf.range(num_samples), views)
        passes = tf.transpose(tf.gather(per_view, view_of_pass), [1, 0, 2])
        out = head(passes, training=False)
        means = tf.identity(out[..., 0], name="theta_E_samples")
        log_variances = tf.identity(out[..., 1], name="theta_E_log_variance_samples")
        if point_head is None:
            return means, log_variances
        parameters = average_parameters_over_views(point_head(features, training=False), views)
        return means, log_variances, tf.identity(parameters, name="parameters")

    return sample
