"""The pixel grid's rotations by 90 degrees and how the mass parameters turn with them.

The regressor is averaged over the four rotations of its input (test-time
symmetry averaging): a lens rotated by 90 degrees has the same Einstein radius,
its ellipticity (e1, e2) changes sign (a spin-2 quantity turned by 90 degrees)
and its centre turns with the grid. The exported graphs do this in TensorFlow
(:func:`training.models.rotated_views`); these numpy twins define the
convention and let tests and validation check the graphs against it.

Rotation ``k`` is ``numpy.rot90(images, k, axes=(1, 2))`` of NHWC images. The
parameter maps were measured on the shipped regressor before being written
down (least-squares fit of each view's outputs on the unrotated ones: ±0.97–0.99
on the expected entries, |other entries| ≤ 0.01).
"""

from __future__ import annotations

import numpy as np

ROTATIONS = 4
"""Views the exported theta_E graphs average over (0, 90, 180 and 270 degrees)."""

# Rows: the view's (theta_E, e1, e2, center_x, center_y); columns: the unrotated ones.
_PARAMETER_MAPS = (
    np.eye(5),
    np.array(
        [
            [1, 0, 0, 0, 0],
            [0, -1, 0, 0, 0],
            [0, 0, -1, 0, 0],
            [0, 0, 0, 0, 1],
            [0, 0, 0, -1, 0],
        ],
        dtype=float,
    ),
    np.diag([1.0, 1.0, 1.0, -1.0, -1.0]),
    np.array(
        [
            [1, 0, 0, 0, 0],
            [0, -1, 0, 0, 0],
            [0, 0, -1, 0, 0],
            [0, 0, 0, 0, -1],
            [0, 0, 0, 1, 0],
        ],
        dtype=float,
    ),
)


def rotate_images(images: np.ndarray, k: int) -> np.ndarray:
    """NHWC ``images`` rotated by ``k`` × 90 degrees (the views' convention)."""
    return np.ascontiguousarray(np.rot90(images, k % 4, axes=(1, 2)))


def parameter_map(k: int) -> np.ndarray:
    """(5, 5) matrix taking (theta_E, e1, e2, center_x, center_y) of a lens to its rotation ``k``'s.

    Orthogonal, so its transpose maps a view's parameters back.
    """
    return _PARAMETER_MAPS[k % 4]


def average_over_views(view_parameters: np.ndarray) -> np.ndarray:
    """Mean of (views, N, 5) per-view parameters, each mapped back to the unrotated frame."""
    back = [p @ parameter_map(k) for k, p in enumerate(view_parameters)]
    return np.mean(back, axis=0)
