"""Stars along the stellar locus and quasars with redshift-dependent colours.

Colour tables are data with a citation; both are approximate medians, read
off published SDSS figures (the DES g, r, i bands differ from SDSS's by less
than about 0.1 mag in these colours, which is below the scatter drawn here):

* stellar locus: Covey et al. (2007), AJ 134, 2398, median g-r and r-i of
  main-sequence stars from F to mid-M;
* quasars: Richards et al. (2001), AJ 121, 2308, median g-r and r-i of SDSS
  quasars against redshift (the Lyman-alpha forest reddens g-r above z ~ 2.5).
"""

from __future__ import annotations

import numpy as np

from training.config import SimulationConfig
from training.light import Galaxy, PointSource, colour_mags

#: (g-r, r-i) nodes along the main-sequence locus, F stars to mid-M dwarfs (Covey et al. 2007).
STELLAR_LOCUS_GR_RI: tuple[tuple[float, float], ...] = (
    (0.20, 0.05),
    (0.35, 0.10),
    (0.55, 0.17),
    (0.80, 0.27),
    (1.05, 0.38),
    (1.25, 0.55),
    (1.40, 0.85),
    (1.45, 1.20),
    (1.50, 1.60),
)
#: Relative frequency of each locus node at high Galactic latitude: turn-off
#: stars of the halo (g-r ~ 0.3) and M dwarfs of the disc dominate faint counts.
STELLAR_LOCUS_WEIGHTS: tuple[float, ...] = (0.8, 1.4, 1.0, 0.6, 0.5, 0.6, 0.9, 0.7, 0.4)
#: Scatter of stars about the locus (mag).
STELLAR_LOCUS_SCATTER_MAG = 0.05

#: (z, g-r, r-i) median quasar colours (Richards et al. 2001), linearly interpolated.
QUASAR_COLOURS_Z_GR_RI: tuple[tuple[float, float, float], ...] = (
    (0.1, 0.30, 0.35),
    (0.5, 0.15, 0.10),
    (0.8, 0.05, 0.20),
    (1.0, 0.10, 0.15),
    (1.3, 0.15, 0.05),
    (1.6, 0.15, 0.10),
    (2.0, 0.15, 0.15),
    (2.3, 0.20, 0.10),
    (2.6, 0.35, 0.05),
    (3.0, 0.70, 0.10),
)
#: Scatter of quasars about the median colours (mag).
QUASAR_COLOUR_SCATTER_MAG = 0.12


def _power_law_magnitude(rng: np.random.Generator, low: float, high: float, slope: float) -> float:
    """A magnitude from dN/dm proportional to 10**(slope m) on [low, high] (inverse CDF)."""
    if slope == 0:
        return float(rng.uniform(low, high))
    a, b = 10 ** (slope * low), 10 ** (slope * high)
    return float(np.log10(a + rng.uniform() * (b - a)) / slope)


def stellar_colours(rng: np.random.Generator) -> tuple[float, float]:
    """(g-r, r-i) of a random star on the locus, with scatter."""
    weights = np.asarray(STELLAR_LOCUS_WEIGHTS)
    k = int(
        rng.choice(
            len(weights) - 1, p=(weights[:-1] + weights[1:]) / (weights[:-1] + weights[1:]).sum()
        )
    )
    t = rng.uniform()
    (gr0, ri0), (gr1, ri1) = STELLAR_LOCUS_GR_RI[k], STELLAR_LOCUS_GR_RI[k + 1]
    scatter = rng.normal(0, STELLAR_LOCUS_SCATTER_MAG, 2)
    return gr0 + t * (gr1 - gr0) + scatter[0], ri0 + t * (ri1 - ri0) + scatter[1]


def quasar_colours(rng: np.random.Generator, redshift: float) -> tuple[float, float]:
    """(g-r, r-i) of a quasar at ``redshift``, with scatter."""
    z, gr, ri = np.asarray(QUASAR_COLOURS_Z_GR_RI).T
    scatter = rng.normal(0, QUASAR_COLOUR_SCATTER_MAG, 2)
    return float(np.interp(redshift, z, gr)) + scatter[0], float(
        np.interp(redshift, z, ri)
    ) + scatter[1]


def draw_star(
    rng: np.random.Generator,
    cfg: SimulationConfig,
    *,
    center: tuple[float, float],
    mag_r: float | None = None,
) -> tuple[PointSource, dict]:
    """A star on the locus; bright ones get wide PSF wings and a faint halo."""
    if mag_r is None:
        mag_r = _power_law_magnitude(rng, *cfg.star_mag_r, cfg.star_count_slope)
    gr, ri = stellar_colours(rng)
    star = PointSource(
        colour_mags(mag_r, "r", gr, ri),
        *center,
        wing_fraction=float(rng.uniform(0.03, 0.1)),
        wing_beta=float(rng.uniform(1.5, 2.2)),
        wing_fwhm_factor=float(rng.uniform(1.2, 2.0)),
        halo_fraction=float(rng.uniform(0.005, 0.03)),
        halo_fwhm_arcsec=float(rng.uniform(5.0, 15.0)),
    )
    return star, {"star_mag_r": mag_r, "star_gr": gr, "star_ri": ri}


def draw_quasar(
    rng: np.random.Generator,
    cfg: SimulationConfig,
    *,
    center: tuple[float, float],
    mag_r: float,
    host_probability: float,
) -> tuple[PointSource, list[Galaxy], dict]:
    """A quasar (point source) and, with ``host_probability``, a faint host galaxy."""
    redshift = float(rng.uniform(*cfg.quasar_redshift))
    gr, ri = quasar_colours(rng, redshift)
    quasar = PointSource(colour_mags(mag_r, "r", gr, ri), *center)
    host: list[Galaxy] = []
    if rng.uniform() < host_probability:
        host_gr, host_ri = rng.uniform(0.3, 1.2), rng.uniform(0.1, 0.5)
        q = rng.uniform(0.5, 1.0)
        angle = rng.uniform(0, np.pi)
        e = (1 - q) / (1 + q)
        host.append(
            Galaxy(
                colour_mags(mag_r + rng.uniform(0.5, 2.5), "r", host_gr, host_ri),
                float(rng.uniform(0.3, 1.0)),
                float(rng.uniform(1.0, 4.0)),
                float(e * np.cos(2 * angle)),
                float(e * np.sin(2 * angle)),
                *center,
            )
        )
    labels = {
        "quasar_redshift": redshift,
        "quasar_mag_r": mag_r,
        "quasar_has_host": int(bool(host)),
    }
    return quasar, host, labels
