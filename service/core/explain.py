"""Occlusion-sensitivity maps of what drives P(lens) and theta_E, computed with onnxruntime.

Method (Zeiler & Fergus 2014, "Visualizing and understanding convolutional
networks", sec. 4.2): each of K square patches of the preprocessed cutout is
set to 0 in every band, which is the sky level after preprocessing (each band
loses its border median, and asinh(0) = 0; :mod:`service.contract.preprocessing`).
The K occluded copies of every cutout go through the classifier and the point
regressor, batched (one onnxruntime call per model for each ``max_batch_size``
copies). A patch's *drop* is the model's
answer on the cutout minus its answer with the patch occluded; each pixel of a
map is the mean drop of the patches that cover it, and 0 where none does.

Cost and geometry
    Every occluded copy costs one classifier and one regressor pass, which is
    about what the plain answer costs per cutout (the classifier plus the MC
    graph's trunk passes, one per rotation as in the regressor: ``lensserve
    bench`` rows (a) and (b) differ by 8-15%).
    An explanation with K patches therefore costs about 1 + K plain answers;
    to stay within 10x, K is 9: a 3 x 3 grid of 8 x 8 pixel patches with
    stride 8 over the central 24 x 24 pixels (6.3 arcsec square). The cutouts
    are centred on the candidate deflector, and the training lenses have
    theta_E of 0.45 to 3.2 arcsec (12 pixels) and centres within 0.35 arcsec
    of the middle, so the arcs fall in that square; pixels outside it are not
    probed and their map value is 0. docs/explanations.md measures the cost
    and where the maps' mass lies.

Pure numpy apart from the two model calls, which the caller passes in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

#: What ``explanation.method`` says in a response.
OCCLUSION_METHOD = "occlusion"


@dataclass(frozen=True)
class OcclusionGrid:
    """Square patches on a regular grid over a central square of the cutout (all in pixels)."""

    patch_pixels: int = 8
    """Side of each occluded patch (pixels)."""
    stride_pixels: int = 8
    """Step between neighbouring patches (pixels)."""
    region_pixels: int = 24
    """Side of the central square the patches tile (pixels); the whole cutout if larger."""

    def __post_init__(self) -> None:
        if min(self.patch_pixels, self.stride_pixels, self.region_pixels) < 1:
            raise ValueError(f"patch, stride and region must be positive pixels, got {self}")
        if self.patch_pixels > self.region_pixels:
            raise ValueError(
                f"a {self.patch_pixels}-pixel patch does not fit in a "
                f"{self.region_pixels}-pixel region"
            )

    def starts(self, size_pixels: int) -> list[int]:
        """First row (or column) of each patch along one axis of a ``size_pixels`` cutout."""
        region = min(self.region_pixels, size_pixels)
        low = (size_pixels - region) // 2
        return list(range(low, low + region - self.patch_pixels + 1, self.stride_pixels))

    def masks(self, shape: tuple[int, int]) -> NDArray[np.bool_]:
        """Boolean masks of the patches, shape (K, ny, nx), row-major over the grid."""
        rows, columns = self.starts(shape[0]), self.starts(shape[1])
        masks = np.zeros((len(rows) * len(columns), *shape), dtype=bool)
        for k, (row, column) in enumerate((r, c) for r in rows for c in columns):
            masks[k, row : row + self.patch_pixels, column : column + self.patch_pixels] = True
        return masks


#: The grid the service uses; see the module docstring for why.
DEFAULT_GRID = OcclusionGrid()


@dataclass(frozen=True)
class Explanation:
    """Occlusion maps of one cutout, indexed [row][column] like the cutout's pixels."""

    method: str
    lens_probability: NDArray[np.float32]
    """Shape (ny, nx): mean drop in P(lens) (probability) when the pixel is occluded."""
    theta_E: NDArray[np.float32]
    """Shape (ny, nx): mean drop in the point theta_E (arcsec) when the pixel is occluded."""
    grid: OcclusionGrid


def occluded_copies(images: NDArray[np.float32], masks: NDArray[np.bool_]) -> NDArray[np.float32]:
    """Every cutout with each patch set to 0 (the sky level), shape (n * K, ny, nx, bands).

    Parameters
    ----------
    images : ndarray, shape (n, ny, nx, bands), float32
        Preprocessed cutouts (asinh noise units).
    masks : ndarray, shape (K, ny, nx), bool
        The patches, from :meth:`OcclusionGrid.masks`.
    """
    keep = (~masks)[None, :, :, :, None].astype(images.dtype)
    copies = images[:, None] * keep
    return copies.reshape(-1, *images.shape[1:])


def assemble_maps(drops: NDArray[np.floating], masks: NDArray[np.bool_]) -> NDArray[np.float32]:
    """Spread each patch's drop over its pixels; overlapping patches are averaged.

    Parameters
    ----------
    drops : ndarray, shape (n, K)
        Answer on the cutout minus answer with patch k occluded (the model's unit).
    masks : ndarray, shape (K, ny, nx), bool
        The patches.

    Returns
    -------
    ndarray, shape (n, ny, nx), float32
        Mean drop of the patches covering each pixel; 0 where no patch does.
    """
    weights = masks.astype(np.float64)
    coverage = weights.sum(axis=0)
    total = np.einsum("nk,kij->nij", np.asarray(drops, dtype=np.float64), weights)
    return np.divide(total, coverage, out=np.zeros_like(total), where=coverage > 0).astype(
        np.float32
    )


def explain_occlusion(
    images: NDArray[np.float32],
    *,
    lens_probability: NDArray[np.floating],
    theta_E: NDArray[np.floating],
    predict_lens_probability: Callable[[NDArray[np.float32]], NDArray[np.floating]],
    predict_theta_E: Callable[[NDArray[np.float32]], NDArray[np.floating]],
    grid: OcclusionGrid = DEFAULT_GRID,
    max_batch_size: int = 64,
) -> list[Explanation]:
    """Occlusion maps for a batch, with one call per model for all occluded copies.

    Parameters
    ----------
    images : ndarray, shape (n, ny, nx, bands), float32
        Preprocessed cutouts.
    lens_probability : ndarray, shape (n,)
        The classifier's answer on ``images`` (probability), already computed.
    theta_E : ndarray, shape (n,)
        The point regressor's theta_E on ``images`` (arcsec), already computed.
    predict_lens_probability, predict_theta_E : callable
        Map a batch of shape (m, ny, nx, bands) to shape (m,): P(lens) and theta_E (arcsec).
    grid : OcclusionGrid
        The patches.
    max_batch_size : int
        Most occluded copies per model call (copies): the n * K copies run in
        calls of this size, so memory stays that of an ordinary batch.

    Returns
    -------
    list of Explanation
        One per cutout, in order.
    """
    n = len(images)
    if n == 0:
        return []
    masks = grid.masks(images.shape[1:3])
    copies = occluded_copies(images, masks)
    occluded_p = _in_chunks(predict_lens_probability, copies, max_batch_size).reshape(n, -1)
    occluded_theta = _in_chunks(predict_theta_E, copies, max_batch_size).reshape(n, -1)
    p_maps = assemble_maps(np.reshape(lens_probability, (n, 1)) - occluded_p, masks)
    theta_maps = assemble_maps(np.reshape(theta_E, (n, 1)) - occluded_theta, masks)
    return [
        Explanation(method=OCCLUSION_METHOD, lens_probability=p_map, theta_E=theta_map, grid=grid)
        for p_map, theta_map in zip(p_maps, theta_maps, strict=True)
    ]


def _in_chunks(
    predict: Callable[[NDArray[np.float32]], NDArray[np.floating]],
    copies: NDArray[np.float32],
    size: int,
) -> NDArray[np.float64]:
    """``predict`` over ``copies`` in calls of at most ``size``, answers joined, shape (m,)."""
    return np.concatenate(
        [
            np.asarray(predict(copies[start : start + size]), dtype=np.float64).reshape(-1)
            for start in range(0, len(copies), max(size, 1))
        ]
    )
