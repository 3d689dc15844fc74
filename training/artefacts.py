"""Image artefacts of survey coadds, applied to any simulated cutout (lenses too).

Amplitudes are in units of each band's sky noise sigma, so an artefact is as
visible in a shallow cutout as in a deep one. Masked pixels are written as NaN,
as a survey's weight-zero pixels reach the service; the one preprocessing
(``service.contract.preprocessing.preprocess_cutout``, which training also uses) leaves
them out of its background and noise estimates and fills them from their
neighbours.

Kinds (``SimulationConfig.artefact_kinds``):

* ``satellite_trail``: a straight streak, PSF-wide, in one band or all;
* ``cosmic_ray``: a few sharp 1-6 pixel tracks in one band (unconvolved);
* ``star_halo``: the scattered-light wing of a bright star outside the cutout;
* ``ghost``: an out-of-focus reflection of a bright star: a faint, wide ring;
* ``masked_columns``: 1-3 adjacent columns of NaN (bad columns, bleed masks);
* ``nan_patch``: a NaN region, an edge strip (no coverage) or a round star mask;
  with masked columns, at most about 24% of the cube, under the service's 25% limit;
* ``sky_gradient``: a residual plane from imperfect sky subtraction;
* ``correlated_noise``: noise correlated by coadd resampling (see
  :func:`correlated_noise`), applied where the noise is drawn.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy.signal import fftconvolve

from training.config import BANDS, CUTOUT_PIXELS, PIXEL_SCALE_ARCSEC, SimulationConfig

#: Label value of a cutout without artefacts.
NO_ARTEFACTS = "none"


def _grid(image: NDArray) -> tuple[NDArray, NDArray, int, float]:
    """Pixel centres (arcsec) of ``image``'s grid, its side, and its size over a 64-pixel cutout.

    Positions and extents drawn for a 64-pixel cutout are multiplied by the
    last value, so that a larger cutout gets the same artefacts at its scale.
    """
    n = image.shape[-1]
    coords = (np.arange(n) - (n - 1) / 2) * PIXEL_SCALE_ARCSEC
    x, y = np.meshgrid(coords, coords)
    return x, y, n, n / CUTOUT_PIXELS


def draw_artefact_kinds(rng: np.random.Generator, cfg: SimulationConfig) -> list[str]:
    """The (sorted, distinct) artefact kinds of one cutout; mostly none."""
    if rng.uniform() >= cfg.artefact_probability:
        return []
    kinds, weights = zip(*cfg.artefact_kinds, strict=True)
    p = np.asarray(weights) / sum(weights)
    n = min(1 + int(rng.poisson(cfg.extra_artefact_mean)), len(kinds))
    return sorted(str(k) for k in rng.choice(kinds, size=n, replace=False, p=p))


def correlated_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> NDArray:
    """Unit-variance noise correlated over neighbouring pixels, as in resampled coadds.

    White noise convolved with a bilinear-interpolation kernel of a random
    sub-pixel shift (what SWarp-like resampling does to each input exposure),
    then divided by the kernel's quadratic norm so that the per-pixel sigma is
    unchanged and only the correlations are added.
    """
    dx, dy = rng.uniform(0.2, 0.8, 2)
    kernel = np.outer([dy, 1 - dy], [dx, 1 - dx])
    kernel /= np.sqrt(np.sum(kernel**2))
    white = rng.standard_normal(shape)
    return np.stack([fftconvolve(plane, kernel, mode="same") for plane in white])


def _bands_hit(rng: np.random.Generator, single_probability: float) -> list[int]:
    """One random band with ``single_probability``, otherwise all of them."""
    if rng.uniform() < single_probability:
        return [int(rng.integers(len(BANDS)))]
    return list(range(len(BANDS)))


def _satellite_trail(rng: np.random.Generator, image: NDArray, sigma: NDArray, fwhm: float) -> None:
    x, y, _, scale = _grid(image)
    x0, y0 = rng.uniform(-6, 6, 2) * scale
    angle = rng.uniform(0, np.pi)
    distance = np.abs((x - x0) * np.sin(angle) - (y - y0) * np.cos(angle))
    width = fwhm * rng.uniform(0.5, 1.5) / 2.3548
    profile = np.exp(-0.5 * (distance / width) ** 2)
    amplitude = rng.uniform(3.0, 100.0)
    for k in _bands_hit(rng, 0.7):
        image[k] += amplitude * sigma[k] * profile


def _cosmic_rays(rng: np.random.Generator, image: NDArray, sigma: NDArray) -> None:
    n = image.shape[-1]
    k = int(rng.integers(len(BANDS)))
    for _ in range(int(rng.integers(1, 5))):
        row, col = rng.integers(0, n, 2)
        angle = rng.uniform(0, 2 * np.pi)
        for step in range(int(rng.integers(1, 7))):
            r = int(round(row + step * np.sin(angle)))
            c = int(round(col + step * np.cos(angle)))
            if 0 <= r < n and 0 <= c < n:
                image[k, r, c] += rng.uniform(5.0, 80.0) * sigma[k]


def _star_halo(rng: np.random.Generator, image: NDArray, sigma: NDArray) -> None:
    # A star 9-25 arcsec from the centre (64 pixels), outside the 16.8" cutout.
    x, y, _, scale = _grid(image)
    distance, angle = rng.uniform(9.0, 25.0) * scale, rng.uniform(0, 2 * np.pi)
    sx, sy = distance * np.cos(angle), distance * np.sin(angle)
    alpha, beta = rng.uniform(3.0, 10.0), rng.uniform(1.5, 2.5)
    shape = (1.0 + ((x - sx) ** 2 + (y - sy) ** 2) / alpha**2) ** (-beta)
    shape /= (1.0 + (sx**2 + sy**2) / alpha**2) ** (-beta)
    level, colour = rng.uniform(0.5, 5.0), rng.uniform(0.6, 1.4, len(BANDS))
    image += (level * colour * sigma)[:, None, None] * shape


def _ghost(rng: np.random.Generator, image: NDArray, sigma: NDArray) -> None:
    x, y, _, scale = _grid(image)
    cx, cy = rng.uniform(-8, 8, 2) * scale
    radius, width = rng.uniform(2.0, 8.0), rng.uniform(0.4, 2.0)
    ring = np.exp(-0.5 * ((np.hypot(x - cx, y - cy) - radius) / width) ** 2)
    level, colour = rng.uniform(0.5, 3.0), rng.uniform(0.6, 1.4, len(BANDS))
    image += (level * colour * sigma)[:, None, None] * ring


def _masked_columns(rng: np.random.Generator, image: NDArray) -> None:
    n = image.shape[-1]
    start, width = int(rng.integers(0, n - 3)), int(rng.integers(1, 4))
    rows = slice(None) if rng.uniform() < 0.6 else slice(int(rng.integers(0, n // 2)), None)
    for k in _bands_hit(rng, 0.5):
        image[k, rows, start : start + width] = np.nan


def _nan_patch(rng: np.random.Generator, image: NDArray) -> None:
    x, y, n, scale = _grid(image)
    mask = np.zeros((n, n), dtype=bool)
    if rng.uniform() < 0.5:
        # At most 12 of 64 rows, so that with masked columns the cutout stays
        # under the service's 25% masked-pixel limit (service/fits/raw.py).
        depth = int(rng.integers(3, 13)) * n // CUTOUT_PIXELS
        edge = int(rng.integers(4))
        view = np.rot90(mask, edge)
        view[:depth] = True
    else:
        # A round star mask away from the centre (>= 3 arcsec), 2-6 pixels in radius.
        r, a = rng.uniform(3.0, 7.5) * scale, rng.uniform(0, 2 * np.pi)
        mask = (
            np.hypot(x - r * np.cos(a), y - r * np.sin(a))
            < rng.uniform(2, 6) * scale * PIXEL_SCALE_ARCSEC
        )
    for k in _bands_hit(rng, 0.3):
        image[k][mask] = np.nan


def _sky_gradient(rng: np.random.Generator, image: NDArray, sigma: NDArray) -> None:
    x, y, n, _ = _grid(image)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (x * np.cos(angle) + y * np.sin(angle)) / (n * PIXEL_SCALE_ARCSEC)
    for k in range(len(BANDS)):
        image[k] += sigma[k] * (rng.uniform(0.5, 3.0) * ramp + rng.uniform(-1.0, 1.0))


def apply_artefacts(
    rng: np.random.Generator,
    image: NDArray[np.float64],
    kinds: list[str],
    *,
    sky_sigma: NDArray,
    fwhm_arcsec: float,
) -> None:
    """Add ``kinds`` (except ``correlated_noise``) to a noisy (3, n, n) ``image`` in place.

    ``sky_sigma`` is each band's sky noise (zero point 30 flux); masks come
    last so that nothing is drawn over a NaN. Drawn for a 64-pixel cutout,
    positions and sizes scale with ``n`` (amplitudes do not).
    """
    for kind in kinds:
        if kind == "satellite_trail":
            _satellite_trail(rng, image, sky_sigma, fwhm_arcsec)
        elif kind == "cosmic_ray":
            _cosmic_rays(rng, image, sky_sigma)
        elif kind == "star_halo":
            _star_halo(rng, image, sky_sigma)
        elif kind == "ghost":
            _ghost(rng, image, sky_sigma)
        elif kind == "sky_gradient":
            _sky_gradient(rng, image, sky_sigma)
    for kind in kinds:
        if kind == "masked_columns":
            _masked_columns(rng, image)
        elif kind == "nan_patch":
            _nan_patch(rng, image)
