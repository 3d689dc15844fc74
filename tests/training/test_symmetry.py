"""The rotation convention of the theta_E graphs, checked against the simulator's pixel grid."""

from __future__ import annotations

import numpy as np
import pytest

from training.config import PIXEL_SCALE_ARCSEC
from training.symmetry import average_over_views, parameter_map, rotate_images

PIXELS = 64


def _elliptical_blob(e1: float, e2: float, cx: float, cy: float) -> np.ndarray:
    """(1, 64, 64, 1) Gaussian with lenstronomy's (e1, e2) at (cx, cy) arcsec.

    The simulator's grid: x (arcsec) grows with the column, y with the row.
    """
    coords = (np.arange(PIXELS) - (PIXELS - 1) / 2) * PIXEL_SCALE_ARCSEC
    x, y = np.meshgrid(coords, coords)
    phi = 0.5 * np.arctan2(e2, e1)
    e = np.hypot(e1, e2)
    q = (1 - e) / (1 + e)
    u = (x - cx) * np.cos(phi) + (y - cy) * np.sin(phi)
    v = -(x - cx) * np.sin(phi) + (y - cy) * np.cos(phi)
    return np.exp(-0.5 * (u**2 * q + v**2 / q) / 0.8**2)[None, :, :, None]


def _measured(image: np.ndarray) -> np.ndarray:
    """(e1, e2, cx, cy) of a blob from its moments, in the same convention."""
    coords = (np.arange(PIXELS) - (PIXELS - 1) / 2) * PIXEL_SCALE_ARCSEC
    x, y = np.meshgrid(coords, coords)
    w = image[0, :, :, 0] / image.sum()
    cx, cy = (w * x).sum(), (w * y).sum()
    qxx, qyy = (w * (x - cx) ** 2).sum(), (w * (y - cy) ** 2).sum()
    qxy = (w * (x - cx) * (y - cy)).sum()
    # Second-moment ellipticity: same orientation as (e1, e2), a monotone function of |e|.
    chi1, chi2 = (qxx - qyy) / (qxx + qyy), 2 * qxy / (qxx + qyy)
    return np.array([chi1, chi2, cx, cy])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_parameter_map_follows_the_rotated_pixels(k):
    e1, e2, cx, cy = 0.15, -0.08, 0.3, -0.2
    before = _measured(_elliptical_blob(e1, e2, cx, cy))
    after = _measured(rotate_images(_elliptical_blob(e1, e2, cx, cy), k))
    predicted = parameter_map(k) @ np.array([1.0, *before])
    np.testing.assert_allclose(after, predicted[1:], atol=1e-6)


def test_maps_are_orthogonal_and_four_turns_are_none():
    for k in range(4):
        np.testing.assert_allclose(parameter_map(k) @ parameter_map(k).T, np.eye(5))
    np.testing.assert_allclose(parameter_map(1) @ parameter_map(3), np.eye(5))
    np.testing.assert_allclose(parameter_map(4), np.eye(5))


def test_average_over_views_undoes_each_views_rotation():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(7, 5))
    views = np.stack([truth @ parameter_map(k).T for k in range(4)])
    np.testing.assert_allclose(average_over_views(views), truth, atol=1e-12)
    # A view that disagrees moves the mean by a quarter of its error, in the unrotated frame.
    views[1, :, 0] += 0.4
    np.testing.assert_allclose(average_over_views(views)[:, 0], truth[:, 0] + 0.1)
