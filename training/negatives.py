"""Non-lens scenes: look-alike galaxies, stars, quasars, blends, groups and edge-on discs.

:func:`draw_negative` returns the light a negative of a given kind adds to
(or puts in place of) the central red galaxy drawn for every scene. The
kinds and their relative frequencies are ``SimulationConfig.negative_kinds``;
``docs/simulations.md`` gives each one's distributions and sources.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from lenstronomy.Util.param_util import phi_q2_ellipticity

from training.config import CUTOUT_PIXELS, PIXEL_SCALE_ARCSEC, SimulationConfig
from training.light import Galaxy, PointSource, colour_mags, draw_blue_galaxy, ellipticity, polar
from training.point_sources import draw_quasar, draw_star

#: Kinds whose main object takes the place of the central red galaxy.
_REPLACE_DEFLECTOR = frozenset({"spiral", "edge_on", "star", "quasar"})


@dataclass
class NegativeLight:
    """What a negative kind adds: galaxies, point sources and label entries."""

    galaxies: list[Galaxy] = field(default_factory=list)
    point_sources: list[PointSource] = field(default_factory=list)
    replaces_deflector: bool = False
    labels: dict = field(default_factory=dict)


def _draw_lookalikes(
    rng: np.random.Generator, cfg: SimulationConfig, kind: str, center: tuple[float, float]
) -> tuple[list[Galaxy], bool]:
    """Galaxies that mimic lensing features. Returns (galaxies, replaces_deflector)."""
    galaxies: list[Galaxy] = []
    if kind == "companions":
        for _ in range(int(rng.integers(1, 4))):
            x, y, _ = polar(rng, (0.8, 3.5))
            galaxies += draw_blue_galaxy(
                rng,
                cfg,
                center=(center[0] + x, center[1] + y),
                mag_r=rng.uniform(20.5, 24.0),
                r_eff=rng.uniform(0.1, 0.5),
                max_clumps=2,
            )
    elif kind == "tangential":
        for _ in range(int(rng.integers(1, 3))):
            x, y, a = polar(rng, (0.7, 3.2))
            galaxies += draw_blue_galaxy(
                rng,
                cfg,
                center=(center[0] + x, center[1] + y),
                mag_r=rng.uniform(20.0, 23.5),
                r_eff=rng.uniform(0.3, 1.0),
                q_range=(0.12, 0.4),
                angle=a + np.pi / 2,
                max_clumps=2,
            )
    elif kind == "spiral":
        # Replace the elliptical by a disc galaxy with clumpy logarithmic arms.
        e1, e2, phi, q = ellipticity(rng, (0.3, 1.0))
        mag = rng.uniform(17.5, 20.5)
        gr, ri = rng.uniform(0.3, 0.9), rng.uniform(0.1, 0.45)
        r_disc = rng.uniform(0.8, 2.5)
        galaxies.append(
            Galaxy(colour_mags(mag, "r", gr, ri), r_disc, 1.0, float(e1), float(e2), *center)
        )
        galaxies.append(
            Galaxy(
                colour_mags(mag + rng.uniform(0.5, 2.0), "r", gr + 0.4, ri + 0.15),
                rng.uniform(0.2, 0.6),
                4.0,
                0.0,
                0.0,
                *center,
            )
        )
        pitch, phase = rng.uniform(0.2, 0.5), rng.uniform(0, 2 * np.pi)
        for arm in range(2):
            for t in np.linspace(0.0, 2.5, int(rng.integers(4, 9))):
                r = 0.4 * r_disc * np.exp(pitch * t * 2)
                a = phase + arm * np.pi + t * 2
                px, py = r * np.cos(a), r * q * np.sin(a)
                galaxies.append(
                    Galaxy(
                        colour_mags(mag + rng.uniform(3.0, 5.0), "r", gr - 0.3, ri - 0.1),
                        rng.uniform(0.08, 0.25),
                        None,
                        0.0,
                        0.0,
                        center[0] + px * np.cos(phi) - py * np.sin(phi),
                        center[1] + px * np.sin(phi) + py * np.cos(phi),
                    )
                )
        return galaxies, True
    elif kind == "merger":
        x, y, a = polar(rng, (1.0, 3.0))
        gr, ri = rng.uniform(0.6, 1.7), rng.uniform(0.3, 0.7)
        galaxies.append(
            Galaxy(
                colour_mags(rng.uniform(18.5, 21.5), "i", gr, ri),
                rng.uniform(0.4, 1.5),
                rng.uniform(1.0, 4.0),
                *ellipticity(rng, (0.5, 1.0))[:2],
                center[0] + x,
                center[1] + y,
            )
        )
        # A tidal tail: a faint, very elongated, curved-looking pair of blobs.
        for _ in range(2):
            tx, ty, _ = polar(rng, (1.0, 3.5))
            e1, e2 = phi_q2_ellipticity(a + np.pi / 2 + rng.normal(0, 0.4), rng.uniform(0.1, 0.35))
            galaxies.append(
                Galaxy(
                    colour_mags(rng.uniform(22.0, 24.5), "r", gr - 0.2, ri - 0.1),
                    rng.uniform(0.5, 1.5),
                    0.7,
                    float(e1),
                    float(e2),
                    center[0] + tx,
                    center[1] + ty,
                )
            )
    return galaxies, False


def _draw_ring(
    rng: np.random.Generator, cfg: SimulationConfig, center: tuple[float, float]
) -> tuple[list[Galaxy], dict]:
    """A collisional ring galaxy: knots on an ellipse around the central bulge.

    Returns the knots and label entries of the ring's geometry (radius and offset
    in arcsec), by which its look-alikeness to an Einstein ring can be studied.
    """
    radius, q_ring = rng.uniform(*cfg.ring_radius_arcsec), rng.uniform(0.5, 1.0)
    tilt, offset = rng.uniform(0, np.pi), rng.normal(0, 0.3, 2)
    gr, ri = rng.uniform(0.0, 0.6), rng.uniform(-0.1, 0.3)
    knots = []
    for a in rng.uniform(0, 2 * np.pi, int(rng.integers(6, 16))):
        px, py = radius * np.cos(a), radius * q_ring * np.sin(a)
        cx = center[0] + offset[0] + px * np.cos(tilt) - py * np.sin(tilt)
        cy = center[1] + offset[1] + px * np.sin(tilt) + py * np.cos(tilt)
        knots.append(
            Galaxy(
                colour_mags(rng.uniform(23.0, 25.5), "r", gr, ri),
                rng.uniform(0.1, 0.35),
                None,
                0.0,
                0.0,
                cx,
                cy,
            )
        )
    labels = {
        "ring_radius_arcsec": float(radius),
        "ring_axis_ratio": float(q_ring),
        "ring_offset_arcsec": float(np.hypot(*offset)),
        "ring_knots": len(knots),
    }
    return knots, labels


def _draw_edge_on(rng: np.random.Generator, center: tuple[float, float]) -> list[Galaxy]:
    """A thin exponential disc seen edge-on, with a small bulge in 60% of cases."""
    phi = rng.uniform(0, np.pi)
    e1, e2 = phi_q2_ellipticity(phi, rng.uniform(0.08, 0.25))
    mag = rng.uniform(17.5, 21.0)
    gr, ri = rng.uniform(0.5, 1.2), rng.uniform(0.2, 0.5)
    parts = [
        Galaxy(
            colour_mags(mag, "r", gr, ri),
            rng.uniform(0.8, 3.0),
            rng.uniform(0.8, 1.2),
            float(e1),
            float(e2),
            *center,
        )
    ]
    if rng.uniform() < 0.6:
        be1, be2 = phi_q2_ellipticity(phi, rng.uniform(0.6, 1.0))
        parts.append(
            Galaxy(
                colour_mags(mag + rng.uniform(1.0, 3.0), "r", gr + 0.3, ri + 0.1),
                rng.uniform(0.2, 0.6),
                4.0,
                float(be1),
                float(be2),
                *center,
            )
        )
    return parts


def _red_galaxy_like(
    rng: np.random.Generator, deflector: Galaxy, *, center: tuple[float, float], dmag: float
) -> Galaxy:
    """An early-type galaxy with the deflector's colours (scattered), ``dmag`` fainter in i."""
    gr = deflector.mags["g"] - deflector.mags["r"] + rng.normal(0, 0.1)
    ri = deflector.mags["r"] - deflector.mags["i"] + rng.normal(0, 0.05)
    return Galaxy(
        colour_mags(deflector.mags["i"] + dmag, "i", gr, ri),
        rng.uniform(0.3, 2.0),
        rng.uniform(2.0, 6.0),
        *ellipticity(rng, (0.45, 1.0))[:2],
        *center,
    )


def draw_negative(
    rng: np.random.Generator,
    cfg: SimulationConfig,
    kind: str,
    *,
    center: tuple[float, float],
    deflector: Galaxy,
) -> NegativeLight:
    """The light of a negative of ``kind`` around the scene centre ``center`` (arcsec)."""
    light = NegativeLight(replaces_deflector=kind in _REPLACE_DEFLECTOR)
    if kind == "edge_on":
        light.galaxies = _draw_edge_on(rng, center)
    elif kind == "star":
        position = center
        if rng.uniform() < cfg.star_offset_fraction:
            x, y, _ = polar(rng, (0.3, 3.0))
            position = (center[0] + x, center[1] + y)
        star, light.labels = draw_star(rng, cfg, center=position)
        light.point_sources.append(star)
    elif kind == "quasar":
        mag_r = rng.uniform(17.0, 22.5)
        quasar, host, light.labels = draw_quasar(
            rng, cfg, center=center, mag_r=mag_r, host_probability=cfg.quasar_host_fraction
        )
        if light.labels["quasar_redshift"] >= 1.0:
            # Hosts of quasars at z > 1 are below DES's surface-brightness limit.
            host = []
            light.labels["quasar_has_host"] = 0
        light.point_sources.append(quasar)
        light.galaxies = host
    elif kind == "star_galaxy_blend":
        x, y, _ = polar(rng, (0.5, 3.0))
        star, light.labels = draw_star(
            rng, cfg, center=(center[0] + x, center[1] + y), mag_r=float(rng.uniform(16.5, 22.5))
        )
        light.point_sources.append(star)
    elif kind == "galaxy_blend":
        x, y, _ = polar(rng, (0.4, 2.5))
        neighbour = (center[0] + x, center[1] + y)
        if rng.uniform() < 0.5:
            light.galaxies.append(
                _red_galaxy_like(rng, deflector, center=neighbour, dmag=rng.uniform(-1.0, 1.5))
            )
        else:
            light.galaxies += draw_blue_galaxy(
                rng,
                cfg,
                center=neighbour,
                mag_r=deflector.mags["r"] + rng.uniform(-0.5, 2.0),
                r_eff=rng.uniform(0.3, 1.5),
                max_clumps=3,
            )
    elif kind == "group":
        for _ in range(int(rng.integers(2, 5))):
            x, y, _ = polar(rng, (1.5, 6.0))
            light.galaxies.append(
                _red_galaxy_like(
                    rng,
                    deflector,
                    center=(center[0] + x, center[1] + y),
                    dmag=rng.uniform(0.0, 2.5),
                )
            )
    elif kind == "ring":
        light.galaxies, light.labels = _draw_ring(rng, cfg, center)
    else:
        light.galaxies, _ = _draw_lookalikes(rng, cfg, kind, center)
    return light


def draw_field_galaxies(rng: np.random.Generator, cfg: SimulationConfig) -> list[Galaxy]:
    """Unrelated faint galaxies anywhere in the cutout."""
    half = CUTOUT_PIXELS * PIXEL_SCALE_ARCSEC / 2
    galaxies: list[Galaxy] = []
    for _ in range(int(rng.poisson(1.0))):
        x, y = rng.uniform(-half, half, 2)
        if np.hypot(x, y) < 2.0:
            continue
        gr, ri = rng.uniform(0.0, 1.8), rng.uniform(0.0, 0.8)
        galaxies.append(
            Galaxy(
                colour_mags(rng.uniform(20.0, 25.0), "r", gr, ri),
                rng.uniform(0.1, 1.0),
                rng.uniform(0.5, 4.0),
                *ellipticity(rng, (0.3, 1.0))[:2],
                x,
                y,
            )
        )
    return galaxies
