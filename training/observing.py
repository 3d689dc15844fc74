"""DES DR2-like observing conditions: per-band seeing, PSF shape, depth and pixel noise.

Survey figures are data with a citation (:data:`training.config.DES_DR2_BANDS`). The noise of a
cutout is set from its 10-sigma depth, not from an exposure count: the sky
variance per pixel is the one that makes a 1.95" diameter aperture reach
signal-to-noise 10 at the depth magnitude, and source shot noise uses the
effective gain that this sky variance implies (sky counts / sky variance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from training.config import (
    BANDS,
    DEPTH_APERTURE_DIAMETER_ARCSEC,
    OUTPUT_ZERO_POINT_AB,
    PIXEL_SCALE_ARCSEC,
    SimulationConfig,
)
from training.psf import psf_kernel

#: Equivalent 90 s single exposures, for the ``exposures_{band}`` label column.
_REFERENCE_EXPOSURE_S = 90.0
#: lenstronomy's DES zero points (electrons per second for a 0-magnitude AB source, as magnitudes).
_ELECTRON_ZERO_POINTS = {"g": 26.58, "r": 26.78, "i": 26.75}


@dataclass(frozen=True)
class Observation:
    """What one cutout was observed with (per band)."""

    psf_fwhm_arcsec: dict[str, float]
    psf_kernels: dict[str, NDArray]
    moffat_beta: float | None
    psf_ellipticity: float
    psf_angle_rad: float
    sky_sigma: dict[str, float]
    """Pixel noise of the sky alone (zero point 30 flux)."""
    gain: dict[str, float]
    """Effective electrons per zero point 30 flux unit (source shot noise)."""


def sky_sigma_from_depth(depth_10sigma_mag: float) -> float:
    """Per-pixel sky sigma (zero point 30) giving S/N 10 at ``depth`` in the DR2 aperture.

    Background-limited: aperture noise = sigma_pix * sqrt(aperture pixels).
    """
    aperture_pixels = math.pi * (DEPTH_APERTURE_DIAMETER_ARCSEC / 2) ** 2 / PIXEL_SCALE_ARCSEC**2
    flux_10sigma = 10 ** (-0.4 * (depth_10sigma_mag - OUTPUT_ZERO_POINT_AB))
    return flux_10sigma / 10.0 / math.sqrt(aperture_pixels)


def draw_observation(rng: np.random.Generator, cfg: SimulationConfig, labels: dict) -> Observation:
    """Seeing correlated across bands, PSF shape and depth; every draw goes into ``labels``.

    One atmosphere factor (log-normal) scales all three DR2 median FWHMs; each
    band then scatters by ``seeing_band_scatter_frac``. Depth is the DR2 median
    plus a common and a per-band normal offset.
    """
    atmosphere = float(
        np.clip(
            np.exp(rng.normal(0.0, cfg.seeing_log_sigma)),
            *cfg.seeing_factor_range,
        )
    )
    moffat_beta = rng.uniform(*cfg.moffat_beta) if rng.uniform() < cfg.moffat_fraction else None
    psf_e = rng.uniform(*cfg.psf_ellipticity)
    psf_angle = rng.uniform(0, np.pi)
    depth_common = rng.normal(0.0, cfg.depth_common_sigma_mag)
    fwhm, kernels, sky_sigma, gain = {}, {}, {}, {}
    for band in BANDS:
        survey = cfg.survey_bands[band]
        fwhm[band] = (
            survey.seeing_fwhm_arcsec
            * atmosphere
            * (1.0 + rng.normal(0.0, cfg.seeing_band_scatter_frac))
        )
        kernels[band] = psf_kernel(
            fwhm_arcsec=fwhm[band],
            pixel_scale_arcsec=PIXEL_SCALE_ARCSEC,
            moffat_beta=moffat_beta,
            ellipticity=psf_e,
            angle_rad=psf_angle,
        )
        offset = np.clip(
            depth_common + rng.normal(0.0, cfg.depth_band_sigma_mag), *cfg.depth_offset_range_mag
        )
        depth = survey.depth_10sigma_mag + float(offset)
        sky_sigma[band] = sky_sigma_from_depth(depth)
        sky_flux = (
            10 ** (-0.4 * (survey.sky_brightness_mag_arcsec2 - OUTPUT_ZERO_POINT_AB))
            * PIXEL_SCALE_ARCSEC**2
        )
        gain[band] = sky_flux / sky_sigma[band] ** 2
        electrons_per_flux_s = 10 ** (-0.4 * (OUTPUT_ZERO_POINT_AB - _ELECTRON_ZERO_POINTS[band]))
        labels[f"seeing_fwhm_arcsec_{band}"] = fwhm[band]
        labels[f"depth_10sigma_mag_{band}"] = depth
        labels[f"sky_sigma_{band}"] = sky_sigma[band]
        labels[f"exposures_{band}"] = gain[band] / electrons_per_flux_s / _REFERENCE_EXPOSURE_S
        labels[f"sky_mag_arcsec2_{band}"] = survey.sky_brightness_mag_arcsec2
    labels.update(
        seeing_atmosphere_factor=atmosphere,
        survey_years=float(np.mean([labels[f"exposures_{b}"] for b in BANDS])) / (10.0 / 3.0),
        psf_moffat_beta=moffat_beta or 0.0,
        psf_is_moffat=int(moffat_beta is not None),
        psf_ellipticity=psf_e,
        psf_angle_rad=psf_angle,
    )
    return Observation(fwhm, kernels, moffat_beta, psf_e, psf_angle, sky_sigma, gain)


def noise_sigma(observation: Observation, signal: NDArray) -> NDArray:
    """Per-pixel noise (zero point 30) of a (3, ny, nx) noiseless signal: sky plus shot noise."""
    return np.stack(
        [
            np.sqrt(
                observation.sky_sigma[band] ** 2
                + np.clip(signal[k], 0, None) / observation.gain[band]
            )
            for k, band in enumerate(BANDS)
        ]
    )
