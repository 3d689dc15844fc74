"""Augmented batches are reproducible whichever loader thread builds them."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("keras")

from training.train import AugmentedBatches  # noqa: E402


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
