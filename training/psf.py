"""Pixel-integrated PSF kernels (pure numpy): Gaussian and Moffat, optionally elliptical."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

_KERNEL_PIXELS = 25
_SUBSAMPLING = 5


def psf_kernel(
    *,
    fwhm_arcsec: float,
    pixel_scale_arcsec: float,
    moffat_beta: float | None = None,
    ellipticity: float = 0.0,
    angle_rad: float = 0.0,
    offset_arcsec: tuple[float, float] = (0.0, 0.0),
) -> NDArray[np.float64]:
    """A normalised (25, 25) PSF kernel, integrated over pixels.

    Parameters
    ----------
    fwhm_arcsec : float
        Full width at half maximum along the mean axis (arcsec).
    pixel_scale_arcsec : float
        Pixel side (arcsec).
    moffat_beta : float or None
        Moffat power index; ``None`` gives a Gaussian.
    ellipticity : float
        (a - b) / (a + b) of the isophotes, 0 for round.
    angle_rad : float
        Position angle of the major axis (radians from +x).
    offset_arcsec : tuple of float
        (x, y) of the PSF centre from the central pixel's centre (arcsec), for
        point sources between pixel centres.
    """
    n = _KERNEL_PIXELS * _SUBSAMPLING
    step = pixel_scale_arcsec / _SUBSAMPLING
    coords = (np.arange(n) - (n - 1) / 2) * step
    x, y = np.meshgrid(coords - offset_arcsec[0], coords - offset_arcsec[1])
    cos, sin = np.cos(angle_rad), np.sin(angle_rad)
    major = (cos * x + sin * y) / (1.0 + ellipticity)
    minor = (-sin * x + cos * y) / (1.0 - ellipticity)
    r2 = major**2 + minor**2
    if moffat_beta is None:
        sigma = fwhm_arcsec / (2.0 * np.sqrt(2.0 * np.log(2.0)))
        fine = np.exp(-0.5 * r2 / sigma**2)
    else:
        alpha = fwhm_arcsec / (2.0 * np.sqrt(2.0 ** (1.0 / moffat_beta) - 1.0))
        fine = (1.0 + r2 / alpha**2) ** (-moffat_beta)
    kernel = fine.reshape(_KERNEL_PIXELS, _SUBSAMPLING, _KERNEL_PIXELS, _SUBSAMPLING).sum(
        axis=(1, 3)
    )
    return kernel / kernel.sum()


def moffat_image(
    x: NDArray, y: NDArray, *, fwhm_arcsec: float, beta: float, pixel_scale_arcsec: float
) -> NDArray[np.float64]:
    """Fraction of a unit flux per pixel of a round Moffat sampled at pixel centres.

    Normalised analytically over the whole plane (beta > 1), so the part that
    falls outside the cutout is lost, as on the sky. Used for the wide wings of
    bright stars, which the (25, 25) kernel truncates.
    """
    alpha = fwhm_arcsec / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    norm = (beta - 1.0) / (np.pi * alpha**2)
    return norm * (1.0 + (x**2 + y**2) / alpha**2) ** (-beta) * pixel_scale_arcsec**2


def gaussian_image(
    x: NDArray, y: NDArray, *, fwhm_arcsec: float, pixel_scale_arcsec: float
) -> NDArray[np.float64]:
    """Fraction of a unit flux per pixel of a round Gaussian sampled at pixel centres."""
    sigma = fwhm_arcsec / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    return np.exp(-0.5 * (x**2 + y**2) / sigma**2) / (2 * np.pi * sigma**2) * pixel_scale_arcsec**2
