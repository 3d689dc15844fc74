"""Light profiles and the galaxies built from them (lenstronomy Sersic and Gaussian).

Magnitudes are AB per band; pixel values elsewhere are zero point 30 fluxes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from lenstronomy.LightModel.Profiles.gaussian import Gaussian
from lenstronomy.LightModel.Profiles.sersic import SersicElliptic
from lenstronomy.Util.param_util import phi_q2_ellipticity
from numpy.typing import NDArray
from scipy.special import gamma as gamma_function

from training.config import SimulationConfig

_SERSIC = SersicElliptic()
_GAUSSIAN = Gaussian()


@dataclass
class Galaxy:
    """A light component: Sersic (``n_sersic``) or, when n_sersic is None, a Gaussian clump.

    ``mags`` are AB magnitudes per band (total flux of the component).
    """

    mags: dict[str, float]
    r_eff_arcsec: float
    n_sersic: float | None
    e1: float
    e2: float
    center_x: float
    center_y: float

    def unit_surface_brightness(self, x: NDArray, y: NDArray) -> NDArray:
        """Surface brightness normalised to a total flux of 1 (per arcsec^2)."""
        if self.n_sersic is None:
            return _GAUSSIAN.function(x, y, 1.0, self.r_eff_arcsec, self.center_x, self.center_y)
        amp = 1.0 / sersic_total_flux(self.r_eff_arcsec, self.n_sersic)
        return _SERSIC.function(
            x,
            y,
            amp,
            self.r_eff_arcsec,
            self.n_sersic,
            self.e1,
            self.e2,
            self.center_x,
            self.center_y,
        )


@dataclass
class PointSource:
    """An unresolved source (star, quasar or lensed quasar image) at (x, y) arcsec.

    ``wing_fraction`` of the flux goes into a wide low-beta Moffat and a faint
    halo around the core PSF (bright stars); ``mags`` are AB per band.
    """

    mags: dict[str, float]
    x: float
    y: float
    wing_fraction: float = 0.0
    wing_beta: float = 1.8
    wing_fwhm_factor: float = 1.5
    halo_fraction: float = 0.0
    halo_fwhm_arcsec: float = 8.0


def sersic_total_flux(r_eff: float, n: float) -> float:
    """Total flux of lenstronomy's Sersic profile with amp=1 (b_n as lenstronomy)."""
    b_n = 1.9992 * n - 0.3271
    return 2 * math.pi * n * r_eff**2 * math.exp(b_n) * gamma_function(2 * n) / b_n ** (2 * n)


def ellipticity(
    rng: np.random.Generator, q_range: tuple[float, float]
) -> tuple[float, float, float, float]:
    """(e1, e2, phi, q) for a uniformly oriented ellipse."""
    q = rng.uniform(*q_range)
    phi = rng.uniform(0, np.pi)
    e1, e2 = phi_q2_ellipticity(phi, q)
    return float(e1), float(e2), float(phi), float(q)


def colour_mags(reference_mag: float, band: str, gr: float, ri: float) -> dict[str, float]:
    """Per-band magnitudes from a magnitude in ``band`` and g-r, r-i colours."""
    r = {"g": reference_mag - gr, "r": reference_mag, "i": reference_mag + ri}[band]
    return {"g": r + gr, "r": r, "i": r - ri}


def polar(rng: np.random.Generator, r_range: tuple[float, float]) -> tuple[float, float, float]:
    """(x, y, angle) of a point at a uniform radius in ``r_range`` and a uniform angle."""
    r = rng.uniform(*r_range)
    a = rng.uniform(0, 2 * np.pi)
    return r * np.cos(a), r * np.sin(a), a


def draw_blue_galaxy(
    rng: np.random.Generator,
    cfg: SimulationConfig,
    *,
    center: tuple[float, float],
    mag_r: float,
    r_eff: float,
    q_range: tuple[float, float] = (0.4, 1.0),
    max_clumps: int = 0,
    angle: float | None = None,
) -> list[Galaxy]:
    """A star-forming galaxy: Sersic body plus Gaussian clumps with bluer colours."""
    gr, ri = rng.uniform(*cfg.source_colour_gr), rng.uniform(*cfg.source_colour_ri)
    if angle is None:
        e1, e2, _, _ = ellipticity(rng, q_range)
    else:
        e1, e2 = phi_q2_ellipticity(angle, rng.uniform(*q_range))
    n_clumps = int(rng.integers(0, max_clumps + 1))
    clump_fraction = rng.uniform(0.1, 0.5) if n_clumps else 0.0
    body_mag = mag_r - 2.5 * np.log10(1.0 - clump_fraction)
    parts = [
        Galaxy(
            colour_mags(body_mag, "r", gr, ri),
            r_eff,
            rng.uniform(*cfg.source_sersic_n),
            float(e1),
            float(e2),
            *center,
        )
    ]
    for _ in range(n_clumps):
        offset = rng.normal(0, r_eff, 2)
        clump_mag = mag_r - 2.5 * np.log10(clump_fraction / n_clumps)
        parts.append(
            Galaxy(
                colour_mags(clump_mag, "r", gr - rng.uniform(0, 0.3), ri - rng.uniform(0, 0.2)),
                rng.uniform(0.03, 0.15),
                None,
                0.0,
                0.0,
                center[0] + offset[0],
                center[1] + offset[1],
            )
        )
    return parts
