"""Physics-respecting augmentation: the 8 symmetries of the square pixel grid.

Images are channels-last (n, y, x, bands). Rotating by 90 degrees maps sky
coordinates (x, y) -> (y, -x) and turns the position angle by -90 degrees,
which flips the sign of both ellipticity components; mirroring x -> -x keeps
e1 and flips e2. Centres move with the pixels.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

#: Column order of the label arrays transformed here.
PARAMETER_COLUMNS = ("theta_E", "e1", "e2", "center_x", "center_y")


def rotate90(images: NDArray, parameters: NDArray) -> tuple[NDArray, NDArray]:
    """Rotate images by one ``np.rot90`` step (axes y, x) and transform the parameters."""
    rotated = np.rot90(images, k=1, axes=(1, 2))
    theta_e, e1, e2, cx, cy = parameters.T
    return rotated, np.stack([theta_e, -e1, -e2, cy, -cx], axis=1)


def mirror_x(images: NDArray, parameters: NDArray) -> tuple[NDArray, NDArray]:
    """Mirror images along x (reverse columns) and transform the parameters."""
    theta_e, e1, e2, cx, cy = parameters.T
    return images[:, :, ::-1], np.stack([theta_e, e1, -e2, -cx, cy], axis=1)


def random_symmetry(
    images: NDArray, parameters: NDArray, rng: np.random.Generator
) -> tuple[NDArray, NDArray]:
    """Apply an independent random symmetry of the square to each cutout."""
    out_images = np.empty_like(images)
    out_parameters = np.empty_like(parameters)
    codes = rng.integers(0, 8, len(images))
    for code in range(8):
        index = np.flatnonzero(codes == code)
        if index.size == 0:
            continue
        im, par = images[index], parameters[index]
        if code >= 4:
            im, par = mirror_x(im, par)
        for _ in range(code % 4):
            im, par = rotate90(im, par)
        out_images[index], out_parameters[index] = im, par
    return out_images, out_parameters
