"""The one preprocessing: shape, flux-unit invariance, masked pixels."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service.contract.preprocessing import (
    _normalise_masked,
    _normalise_unmasked,
    _row_medians,
    masked_fraction,
    preprocess_batch,
    preprocess_cutout,
)


@pytest.fixture
def cube() -> np.ndarray:
    rng = np.random.default_rng(42)
    y, x = np.mgrid[:64, :64]
    galaxy = 300.0 * np.exp(-((x - 31.5) ** 2 + (y - 31.5) ** 2) / 20.0)
    return np.stack(
        [galaxy * c + rng.normal(0, s, (64, 64)) for c, s in ((0.3, 1.2), (0.7, 1.6), (1.0, 3.0))]
    )


def test_shape_and_dtype(cube):
    out = preprocess_cutout(cube)
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    assert preprocess_batch(cube[None]).shape == (1, 64, 64, 3)
    assert preprocess_batch(np.zeros((0, 3, 64, 64))).shape == (0, 64, 64, 3)


@pytest.mark.parametrize("factor", [1e-6, 0.37, 1.0, 58.0, 1e9])
def test_output_does_not_depend_on_the_flux_unit(cube, factor):
    np.testing.assert_allclose(preprocess_cutout(cube * factor), preprocess_cutout(cube), atol=1e-5)


def test_masked_pixels_are_filled_from_their_neighbours_and_counted(cube):
    masked = cube.copy()
    masked[:, :, 10] = np.nan
    assert masked_fraction(masked) == pytest.approx(1 / 64)
    out = preprocess_cutout(masked)
    assert np.all(np.isfinite(out))
    # A bad column is bridged by the flux mean of the columns either side of it;
    # the stretch is monotonic, so each filled pixel lies between its neighbours.
    low = np.minimum(out[:, 9, :], out[:, 11, :]) - 1e-6
    high = np.maximum(out[:, 9, :], out[:, 11, :]) + 1e-6
    assert np.all((low <= out[:, 10, :]) & (out[:, 10, :] <= high))
    # Unmasked pixels barely move: the background and noise estimates are robust.
    keep = np.ones(64, bool)
    keep[10] = False
    np.testing.assert_allclose(out[:, keep], preprocess_cutout(cube)[:, keep], atol=0.05)


def test_a_masked_block_is_filled_from_its_edge_inwards():
    ramp = np.tile(np.linspace(1.0, 2.0, 64), (3, 64, 1)) * 100.0
    masked = ramp.copy()
    masked[:, 20:40, 20:40] = np.nan
    out = preprocess_cutout(masked)
    assert np.all(np.isfinite(out))
    # The filled block lies between the values at its left and right edges.
    left, right = out[30, 19, :].min(), out[30, 40, :].max()
    block = out[20:40, 20:40, :]
    assert left - 1e-6 <= block.min() and block.max() <= right + 1e-6


def test_blank_cutout_stays_zero():
    assert np.all(preprocess_cutout(np.zeros((3, 64, 64))) == 0.0)
    assert np.all(preprocess_cutout(np.full((3, 64, 64), np.nan)) == 0.0)


@pytest.mark.parametrize("shape", [(3, 64, 64), (3, 65, 64), (2, 9, 12), (3, 8, 8), (1, 3, 5)])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_unmasked_cubes_normalise_exactly_as_the_masked_path_would(shape, offset):
    """The all-bands-at-once path for cubes without NaN equals the per-band one bit for bit."""
    rng = np.random.default_rng(sum(shape))
    data = offset + rng.standard_t(3, size=shape) * rng.uniform(0.5, 3.0, size=(shape[0], 1, 1))
    expected, expected_sigma, expected_levels = _normalise_masked(data)
    assert np.isfinite(preprocess_cutout(data)).all()
    if min(shape[1:]) <= 8:
        return  # no inner region: preprocess_cutout takes the per-band path
    got, sigma, levels = _normalise_unmasked(data)
    np.testing.assert_array_equal(got, expected)
    assert sigma == expected_sigma
    # The band levels the OOD statistics reuse are the same numbers on either path.
    np.testing.assert_array_equal(levels.background, expected_levels.background)
    np.testing.assert_array_equal(levels.noise_sigma, expected_levels.noise_sigma)


@settings(max_examples=300, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 4), st.integers(1, 40)),
        elements=st.floats(allow_nan=False, allow_infinity=False, width=64),
    )
)
def test_row_medians_are_numpys_medians(rows):
    """Integer-key partitions give np.median's values (ties, zeros of both signs, extremes)."""
    np.testing.assert_array_equal(_row_medians(rows), np.median(rows, axis=1))


@pytest.mark.parametrize("width", [4096, 960, 4095])
def test_row_medians_of_survey_sized_rows_are_numpys_medians(width):
    rng = np.random.default_rng(width)
    rows = rng.standard_t(3, size=(3, width)) * rng.uniform(0.1, 1e3, size=(3, 1))
    rows[0, ::7] = rows[0, 0]  # ties
    np.testing.assert_array_equal(_row_medians(rows), np.median(rows, axis=1))
    np.testing.assert_array_equal(_row_medians(np.abs(rows)), np.median(np.abs(rows), axis=1))
