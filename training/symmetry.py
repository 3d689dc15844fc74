"""The cutout's four rotations by 90 degrees, as the theta_E graphs average over them.

The regressor is averaged over the four rotations of its input (test-time
symmetry averaging): a lens rotated by 90 degrees has the same Einstein radius,
its ellipticity (e1, e2) changes sign (a spin-2 quantity turned by 90 degrees)
and its centre turns with the grid. The convention is the training
augmentation's (:func:`training.augment.rotate90`, one ``numpy.rot90`` step
over the pixel axes). The exported graphs do the same in TensorFlow
(:func:`training.models.rotated_views`); these numpy functions define it for
them, and let tests and validation check the graphs. Measured on the shipped
regressor before the graphs were built: a least-squares fit of each view's
outputs on the unrotated ones gives ±0.97–0.99 on these maps' entries and
|other entries| ≤ 0.01.
"""

from __future__ import annotations

import numpy as np

from training.augment import rotate90

ROTATIONS = 4
"""Views the exported theta_E graphs average over (0, 90, 180 and 270 degrees)."""


def _quarter_turn_map() -> np.ndarray:
    """(5, 5) matrix of :func:`training.augment.rotate90`'s parameter transform."""
    _, turned = rotate90(np.zeros((5, 1, 1, 1)), np.eye(5))
    return turned.T


def rotate_images(images: np.ndarray, k: int) -> np.ndarray:
    """NHWC ``images`` rotated by ``k`` × 90 degrees (the views' convention)."""
    return np.ascontiguousarray(np.rot90(images, k % 4, axes=(1, 2)))


def parameter_map(k: int) -> np.ndarray:
    """(5, 5) matrix taking (theta_E, e1, e2, center_x, center_y) of a lens to its rotation ``k``'s.

    Orthogonal, so its transpose maps a view's parameters back.
    """
    return np.linalg.matrix_power(_quarter_turn_map(), k % 4)


def average_over_views(view_parameters: np.ndarray) -> np.ndarray:
    """Mean of (views, N, 5) per-view parameters, each mapped back to the unrotated frame."""
    back = [p @ parameter_map(k) for k, p in enumerate(view_parameters)]
    return np.mean(back, axis=0)
