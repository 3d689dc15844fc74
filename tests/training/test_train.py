"""Augmented batches are reproducible whichever loader thread builds them; the MC
model's aleatoric calibration balances its two reported intervals."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("keras")

from training.train import (  # noqa: E402
    AugmentedBatches,
    calibrate_aleatoric_scale,
    interval_misses,
)


def _batches(workers: int) -> AugmentedBatches:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(20, 8, 8, 3)).astype(np.float32)
    parameters = rng.normal(size=(20, 5)).astype(np.float32)
    return AugmentedBatches(images, parameters, None, batch_size=6, seed=3, workers=workers)


def test_batches_depend_on_seed_epoch_and_index_only():
    one, many = _batches(1), _batches(4)
    assert len(one) == 4  # ceil(20 / 6)
    # Batches fetched out of order (as threads do) equal those fetched in order.
    for index in (3, 0, 2, 1):
        np.testing.assert_array_equal(one[index][0], many[index][0])
        np.testing.assert_array_equal(one[index][1], many[index][1])
    first_epoch = one[0][0]
    one.on_epoch_end()
    many.on_epoch_end()
    np.testing.assert_array_equal(one[0][0], many[0][0])
    assert not np.array_equal(one[0][0], first_epoch)


def _mc_outputs(rng: np.random.Generator, n: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """MC means (n, 20) scattered by 0.01 and log-variances claiming ``sigma`` (arcsec)."""
    centres = rng.uniform(0.5, 3.0, n)
    means = centres[:, None] + 0.01 * rng.normal(size=(n, 20))
    return means, np.full((n, 20), 2 * np.log(sigma))


def test_calibration_leaves_a_calibrated_model_alone_and_rescales_a_wrong_one():
    rng = np.random.default_rng(1)
    means, log_variances = _mc_outputs(rng, 4000, sigma=0.1)
    truth = means.mean(axis=1) + 0.2 * rng.normal(size=4000)  # the model says 0.1: too sure
    scale = calibrate_aleatoric_scale(means, log_variances, truth)
    assert scale == pytest.approx(2.0, rel=0.05)
    assert max(map(abs, interval_misses(means, log_variances, truth, scale))) < 1


def test_heavy_tails_split_the_miss_between_the_68_and_95_percent_intervals():
    rng = np.random.default_rng(2)
    means, log_variances = _mc_outputs(rng, 4000, sigma=0.1)
    truth = means.mean(axis=1) + 0.06 * rng.standard_t(3, size=4000)
    scale = calibrate_aleatoric_scale(means, log_variances, truth)
    miss_68, miss_95 = interval_misses(means, log_variances, truth, scale)
    # The 68% interval over-covers and the 95% under-covers, by about as much (tolerance units).
    assert miss_68 > 0 > miss_95
    assert abs(abs(miss_68) - abs(miss_95)) < 0.3
    for other in (scale * 0.9, scale * 1.1):
        assert max(map(abs, interval_misses(means, log_variances, truth, other))) > max(
            abs(miss_68), abs(miss_95)
        )


def test_fitted_interval_levels_make_each_interval_cover_as_named_on_fresh_data():
    from service.contract.uncertainty import summarise_mc_samples
    from training.calibrate import fit_interval_levels

    rng = np.random.default_rng(3)

    def heavy_tailed(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        means, log_variances = _mc_outputs(rng, n, sigma=0.1)
        return means, log_variances, means.mean(axis=1) + 0.07 * rng.standard_t(3, size=n)

    means, log_variances, truth = heavy_tailed(6000)
    levels = fit_interval_levels(means, log_variances, truth)
    assert levels[2] == 0.5 and levels[0] < levels[1] < 0.5 < levels[3] < levels[4]
    assert levels[0] == pytest.approx(1 - levels[4]) and levels[1] == pytest.approx(1 - levels[3])
    fresh_means, fresh_log_variances, fresh_truth = heavy_tailed(6000)
    nominal_levels = (0.025, 0.16, 0.5, 0.84, 0.975)
    for mixture_levels, expect_nominal in ((levels, True), (nominal_levels, False)):
        q = summarise_mc_samples(fresh_means, fresh_log_variances, mixture_levels).quantiles
        coverage_68 = np.mean((fresh_truth >= q[:, 1]) & (fresh_truth <= q[:, 3]))
        coverage_95 = np.mean((fresh_truth >= q[:, 0]) & (fresh_truth <= q[:, 4]))
        hits = abs(coverage_68 - 0.68) < 0.02 and abs(coverage_95 - 0.95) < 0.01
        assert hits == expect_nominal, (mixture_levels, coverage_68, coverage_95)


def _loss_and_mean_gradient(beta: float, truth, mean, log_variance):
    import tensorflow as tf

    from training.losses import BetaGaussianNLL

    mean = tf.Variable(np.asarray(mean, dtype=np.float32))
    y_true = tf.constant(np.asarray(truth, dtype=np.float32)[:, None, None])
    with tf.GradientTape() as tape:
        y_pred = tf.stack([mean, tf.constant(log_variance, dtype=tf.float32)], axis=-1)
        loss = BetaGaussianNLL(beta)(y_true, y_pred[:, None, :])
    return float(loss), tape.gradient(loss, mean).numpy()


def test_beta_nll_is_the_plain_nll_at_zero_and_gives_the_mean_an_mse_gradient_at_one():
    truth, mean = [1.0, 3.0], [1.5, 2.0]
    log_variance = np.log([0.01, 0.25]).astype(np.float32)
    error = np.subtract(truth, mean)
    plain = np.mean(0.5 * (log_variance + error**2 / np.exp(log_variance)))
    loss, _ = _loss_and_mean_gradient(0.0, truth, mean, log_variance)
    assert loss == pytest.approx(plain, rel=1e-5)
    # beta = 1: d loss / d mean_i = -error_i / n whatever the predicted variance,
    # so the large-variance cutout is not down-weighted (it is, 25-fold, at beta = 0).
    _, gradient = _loss_and_mean_gradient(1.0, truth, mean, log_variance)
    np.testing.assert_allclose(gradient, -error / 2, rtol=1e-5)
    _, gradient = _loss_and_mean_gradient(0.0, truth, mean, log_variance)
    np.testing.assert_allclose(gradient, -error / np.exp(log_variance) / 2, rtol=1e-5)
