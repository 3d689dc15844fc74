"""DES-like strong-lens and non-lens cutouts, rendered with lenstronomy.

One cutout is drawn in two steps: :func:`draw_scene` samples every physical
and observational parameter from a :class:`SimulationConfig`, and
:func:`render_scene` turns the scene into noiseless component images and a
noisy g, r, i cube in AB zero point 30 fluxes (the format of
``examples/cutouts``). Lensing uses lenstronomy's ray shooting (SIE or EPL plus
external shear); light uses its Sersic and Gaussian profiles.

Lens visibility rule (kept lenses only), after Collett (2015): the lensed
source's signal-to-noise, sum(S) / sqrt(sum(sigma^2)) over the pixels where
the PSF-convolved source exceeds the pixel noise sigma, is at least
``min_arc_snr`` (20) in the best of g, r, i; the total magnification is at
least ``min_magnification`` (3); and the lens is resolved,
theta_E^2 > r_source^2 + (FWHM_r / 2)^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from lenstronomy.LensModel.lens_model import LensModel
from lenstronomy.LightModel.Profiles.gaussian import Gaussian
from lenstronomy.LightModel.Profiles.sersic import SersicElliptic
from lenstronomy.Util.param_util import phi_q2_ellipticity
from numpy.typing import NDArray
from scipy.signal import fftconvolve
from scipy.special import gamma as gamma_function

from training.config import (
    BANDS,
    CUTOUT_PIXELS,
    OUTPUT_ZERO_POINT_AB,
    PIXEL_SCALE_ARCSEC,
    SimulationConfig,
)
from training.psf import psf_kernel

_SERSIC = SersicElliptic()
_GAUSSIAN = Gaussian()
_LENS_MODELS = {"SIE": LensModel(["SIE", "SHEAR"]), "EPL": LensModel(["EPL", "SHEAR"])}
_MAX_SOURCE_REDRAWS = 30


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
        amp = 1.0 / _sersic_total_flux(self.r_eff_arcsec, self.n_sersic)
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
class Scene:
    """Everything drawn for one cutout; ``labels`` become the label table row."""

    kind: str
    is_lens: bool
    deflector: list[Galaxy]
    source: list[Galaxy]
    contaminants: list[Galaxy]
    lens_model: str
    lens_kwargs: list[dict]
    psf_fwhm_arcsec: dict[str, float]
    psf_kernels: dict[str, NDArray]
    exposures: dict[str, float]
    sky_mag_arcsec2: dict[str, float]
    labels: dict[str, float | int | str] = field(default_factory=dict)


def _sersic_total_flux(r_eff: float, n: float) -> float:
    """Total flux of lenstronomy's Sersic profile with amp=1 (b_n as lenstronomy)."""
    b_n = 1.9992 * n - 0.3271
    return 2 * math.pi * n * r_eff**2 * math.exp(b_n) * gamma_function(2 * n) / b_n ** (2 * n)


def _pixel_grid(supersampling: int, pixels: int) -> tuple[NDArray, NDArray]:
    """Sub-pixel centres (arcsec) of the cutout; x grows with column, y with row."""
    n = pixels * supersampling
    coords = (np.arange(n) - (n - 1) / 2) * (PIXEL_SCALE_ARCSEC / supersampling)
    x, y = np.meshgrid(coords, coords)
    return x.ravel(), y.ravel()


def _bin_to_pixels(values: NDArray, supersampling: int, pixels: int) -> NDArray:
    """Mean surface brightness per pixel times pixel area: flux per pixel."""
    n = pixels
    grid = values.reshape(n, supersampling, n, supersampling)
    return grid.mean(axis=(1, 3)) * PIXEL_SCALE_ARCSEC**2


def _ellipticity(
    rng: np.random.Generator, q_range: tuple[float, float]
) -> tuple[float, float, float, float]:
    """(e1, e2, phi, q) for a uniformly oriented ellipse."""
    q = rng.uniform(*q_range)
    phi = rng.uniform(0, np.pi)
    e1, e2 = phi_q2_ellipticity(phi, q)
    return float(e1), float(e2), float(phi), float(q)


def _colour_mags(reference_mag: float, band: str, gr: float, ri: float) -> dict[str, float]:
    """Per-band magnitudes from a magnitude in ``band`` and g-r, r-i colours."""
    r = {"g": reference_mag - gr, "r": reference_mag, "i": reference_mag + ri}[band]
    return {"g": r + gr, "r": r, "i": r - ri}


def _draw_observation(rng: np.random.Generator, cfg: SimulationConfig, scene_labels: dict) -> dict:
    """Seeing, PSF shape, depth and sky per band."""
    years = rng.uniform(*cfg.survey_years)
    object_seeing = rng.uniform(*cfg.seeing_scatter_frac)
    moffat_beta = rng.uniform(*cfg.moffat_beta) if rng.uniform() < cfg.moffat_fraction else None
    psf_e = rng.uniform(*cfg.psf_ellipticity)
    psf_angle = rng.uniform(0, np.pi)
    sky_offset = rng.uniform(*cfg.sky_offset_mag)
    fwhm, kernels, exposures, sky = {}, {}, {}, {}
    for band in BANDS:
        obs = cfg.bands[band]
        fwhm[band] = obs.seeing_fwhm_arcsec * object_seeing * rng.uniform(0.9, 1.1)
        kernels[band] = psf_kernel(
            fwhm_arcsec=fwhm[band],
            pixel_scale_arcsec=PIXEL_SCALE_ARCSEC,
            moffat_beta=moffat_beta,
            ellipticity=psf_e,
            angle_rad=psf_angle,
        )
        exposures[band] = max(1.0, years * obs.exposures_per_year)
        sky[band] = obs.sky_brightness_mag_arcsec2 + sky_offset
        scene_labels[f"seeing_fwhm_arcsec_{band}"] = fwhm[band]
        scene_labels[f"exposures_{band}"] = exposures[band]
        scene_labels[f"sky_mag_arcsec2_{band}"] = sky[band]
    scene_labels.update(
        survey_years=years,
        psf_moffat_beta=moffat_beta or 0.0,
        psf_is_moffat=int(moffat_beta is not None),
        psf_ellipticity=psf_e,
        psf_angle_rad=psf_angle,
    )
    return {
        "psf_fwhm_arcsec": fwhm,
        "psf_kernels": kernels,
        "exposures": exposures,
        "sky_mag_arcsec2": sky,
    }


def _draw_deflector(
    rng: np.random.Generator, cfg: SimulationConfig, labels: dict
) -> tuple[Galaxy, str, list[dict]]:
    """A red early-type galaxy and its mass (SIE or EPL) plus external shear."""
    cx, cy = np.clip(rng.normal(0, cfg.center_sigma_arcsec, 2), -0.35, 0.35)
    e1, e2, phi, q = _ellipticity(rng, cfg.mass_q)
    theta_e = rng.uniform(*cfg.theta_E_arcsec)
    use_epl = rng.uniform() < cfg.power_law_fraction
    gamma = rng.uniform(*cfg.power_law_gamma) if use_epl else 2.0
    shear = rng.uniform(0, cfg.shear_max)
    shear_angle = rng.uniform(0, np.pi)
    gamma1, gamma2 = shear * np.cos(2 * shear_angle), shear * np.sin(2 * shear_angle)
    mass = {"theta_E": theta_e, "e1": e1, "e2": e2, "center_x": cx, "center_y": cy}
    if use_epl:
        mass["gamma"] = gamma
    lens_kwargs = [mass, {"gamma1": gamma1, "gamma2": gamma2, "ra_0": cx, "dec_0": cy}]

    q_light = float(np.clip(q + rng.normal(0, 0.1), 0.35, 1.0))
    phi_light = phi + np.deg2rad(rng.normal(0, cfg.light_mass_angle_scatter_deg))
    le1, le2 = phi_q2_ellipticity(phi_light, q_light)
    mags = _colour_mags(
        rng.uniform(*cfg.deflector_mag_i),
        "i",
        rng.uniform(*cfg.deflector_colour_gr),
        rng.uniform(*cfg.deflector_colour_ri),
    )
    light = Galaxy(
        mags,
        rng.uniform(*cfg.deflector_r_eff_arcsec),
        rng.uniform(*cfg.deflector_sersic_n),
        float(le1),
        float(le2),
        cx + rng.normal(0, 0.02),
        cy + rng.normal(0, 0.02),
    )
    labels.update(
        theta_E=theta_e,
        e1=e1,
        e2=e2,
        center_x=cx,
        center_y=cy,
        mass_q=q,
        mass_phi_rad=phi,
        mass_profile="EPL" if use_epl else "SIE",
        mass_gamma=gamma,
        shear_gamma1=gamma1,
        shear_gamma2=gamma2,
        deflector_mag_i=light.mags["i"],
        deflector_mag_g=light.mags["g"],
        deflector_mag_r=light.mags["r"],
        deflector_r_eff_arcsec=light.r_eff_arcsec,
        deflector_sersic_n=light.n_sersic,
        deflector_light_e1=float(le1),
        deflector_light_e2=float(le2),
    )
    return light, "EPL" if use_epl else "SIE", lens_kwargs


def _draw_blue_galaxy(
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
        e1, e2, _, _ = _ellipticity(rng, q_range)
    else:
        e1, e2 = phi_q2_ellipticity(angle, rng.uniform(*q_range))
    n_clumps = int(rng.integers(0, max_clumps + 1))
    clump_fraction = rng.uniform(0.1, 0.5) if n_clumps else 0.0
    body_mag = mag_r - 2.5 * np.log10(1.0 - clump_fraction)
    parts = [
        Galaxy(
            _colour_mags(body_mag, "r", gr, ri),
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
                _colour_mags(clump_mag, "r", gr - rng.uniform(0, 0.3), ri - rng.uniform(0, 0.2)),
                rng.uniform(0.03, 0.15),
                None,
                0.0,
                0.0,
                center[0] + offset[0],
                center[1] + offset[1],
            )
        )
    return parts


def _draw_source(
    rng: np.random.Generator,
    cfg: SimulationConfig,
    theta_e: float,
    center: tuple[float, float],
    labels: dict,
) -> list[Galaxy]:
    """A background source placed inside the caustic region (uniform in area)."""
    radius = theta_e * cfg.source_position_max_frac * np.sqrt(rng.uniform())
    angle = rng.uniform(0, 2 * np.pi)
    position = (center[0] + radius * np.cos(angle), center[1] + radius * np.sin(angle))
    mag_r = rng.uniform(*cfg.source_mag_r)
    r_eff = rng.uniform(*cfg.source_r_eff_arcsec)
    labels.update(
        source_x=position[0], source_y=position[1], source_mag_r=mag_r, source_r_eff_arcsec=r_eff
    )
    return _draw_blue_galaxy(
        rng, cfg, center=position, mag_r=mag_r, r_eff=r_eff, max_clumps=cfg.source_max_clumps
    )


def _polar(rng: np.random.Generator, r_range: tuple[float, float]) -> tuple[float, float, float]:
    r = rng.uniform(*r_range)
    a = rng.uniform(0, 2 * np.pi)
    return r * np.cos(a), r * np.sin(a), a


def _draw_negative_contaminants(
    rng: np.random.Generator, cfg: SimulationConfig, kind: str, center: tuple[float, float]
) -> tuple[list[Galaxy], bool]:
    """Light that mimics lensing features. Returns (galaxies, replaces_deflector)."""
    galaxies: list[Galaxy] = []
    if kind == "companions":
        for _ in range(int(rng.integers(1, 4))):
            x, y, _ = _polar(rng, (0.8, 3.5))
            galaxies += _draw_blue_galaxy(
                rng,
                cfg,
                center=(center[0] + x, center[1] + y),
                mag_r=rng.uniform(20.5, 24.0),
                r_eff=rng.uniform(0.1, 0.5),
                max_clumps=2,
            )
    elif kind == "tangential":
        for _ in range(int(rng.integers(1, 3))):
            x, y, a = _polar(rng, (0.7, 3.2))
            galaxies += _draw_blue_galaxy(
                rng,
                cfg,
                center=(center[0] + x, center[1] + y),
                mag_r=rng.uniform(20.0, 23.5),
                r_eff=rng.uniform(0.3, 1.0),
                q_range=(0.12, 0.4),
                angle=a + np.pi / 2,
                max_clumps=2,
            )
    elif kind == "ring":
        # A collisional ring galaxy: knots on an ellipse around a yellow bulge.
        radius, q_ring = rng.uniform(1.2, 3.5), rng.uniform(0.5, 1.0)
        tilt, offset = rng.uniform(0, np.pi), rng.normal(0, 0.3, 2)
        gr, ri = rng.uniform(0.0, 0.6), rng.uniform(-0.1, 0.3)
        for a in rng.uniform(0, 2 * np.pi, int(rng.integers(6, 16))):
            px, py = radius * np.cos(a), radius * q_ring * np.sin(a)
            cx = center[0] + offset[0] + px * np.cos(tilt) - py * np.sin(tilt)
            cy = center[1] + offset[1] + px * np.sin(tilt) + py * np.cos(tilt)
            galaxies.append(
                Galaxy(
                    _colour_mags(rng.uniform(23.0, 25.5), "r", gr, ri),
                    rng.uniform(0.1, 0.35),
                    None,
                    0.0,
                    0.0,
                    cx,
                    cy,
                )
            )
    elif kind == "spiral":
        # Replace the elliptical by a disc galaxy with clumpy logarithmic arms.
        e1, e2, phi, q = _ellipticity(rng, (0.3, 1.0))
        mag = rng.uniform(17.5, 20.5)
        gr, ri = rng.uniform(0.3, 0.9), rng.uniform(0.1, 0.45)
        r_disc = rng.uniform(0.8, 2.5)
        galaxies.append(
            Galaxy(_colour_mags(mag, "r", gr, ri), r_disc, 1.0, float(e1), float(e2), *center)
        )
        galaxies.append(
            Galaxy(
                _colour_mags(mag + rng.uniform(0.5, 2.0), "r", gr + 0.4, ri + 0.15),
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
                        _colour_mags(mag + rng.uniform(3.0, 5.0), "r", gr - 0.3, ri - 0.1),
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
        x, y, a = _polar(rng, (1.0, 3.0))
        gr, ri = rng.uniform(0.6, 1.7), rng.uniform(0.3, 0.7)
        galaxies.append(
            Galaxy(
                _colour_mags(rng.uniform(18.5, 21.5), "i", gr, ri),
                rng.uniform(0.4, 1.5),
                rng.uniform(1.0, 4.0),
                *_ellipticity(rng, (0.5, 1.0))[:2],
                center[0] + x,
                center[1] + y,
            )
        )
        # A tidal tail: a faint, very elongated, curved-looking pair of blobs.
        for _ in range(2):
            tx, ty, _ = _polar(rng, (1.0, 3.5))
            e1, e2 = phi_q2_ellipticity(a + np.pi / 2 + rng.normal(0, 0.4), rng.uniform(0.1, 0.35))
            galaxies.append(
                Galaxy(
                    _colour_mags(rng.uniform(22.0, 24.5), "r", gr - 0.2, ri - 0.1),
                    rng.uniform(0.5, 1.5),
                    0.7,
                    float(e1),
                    float(e2),
                    center[0] + tx,
                    center[1] + ty,
                )
            )
    return galaxies, False


def _draw_field_galaxies(rng: np.random.Generator, cfg: SimulationConfig) -> list[Galaxy]:
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
                _colour_mags(rng.uniform(20.0, 25.0), "r", gr, ri),
                rng.uniform(0.1, 1.0),
                rng.uniform(0.5, 4.0),
                *_ellipticity(rng, (0.3, 1.0))[:2],
                x,
                y,
            )
        )
    return galaxies


def draw_scene(rng: np.random.Generator, cfg: SimulationConfig, *, is_lens: bool) -> Scene:
    """Draw one lens or non-lens scene (every parameter drawn ends up in ``labels``)."""
    labels: dict = {"is_lens": int(is_lens)}
    observation = _draw_observation(rng, cfg, labels)
    deflector, lens_model, lens_kwargs = _draw_deflector(rng, cfg, labels)
    center = (lens_kwargs[0]["center_x"], lens_kwargs[0]["center_y"])
    source: list[Galaxy] = []
    contaminants = _draw_field_galaxies(rng, cfg)
    if is_lens:
        kind = "lens"
        source = _draw_source(rng, cfg, lens_kwargs[0]["theta_E"], center, labels)
    else:
        kinds, weights = zip(*cfg.negative_kinds, strict=True)
        kind = str(rng.choice(kinds, p=np.asarray(weights) / sum(weights)))
        extra, replaces = _draw_negative_contaminants(rng, cfg, kind, center)
        contaminants += extra
        if replaces:
            deflector = None
        labels["theta_E"] = float("nan")
    labels["kind"] = kind
    return Scene(
        kind,
        is_lens,
        [deflector] if deflector else [],
        source,
        contaminants,
        lens_model,
        lens_kwargs,
        labels=labels,
        **observation,
    )


def _band_flux_images(
    galaxies: list[Galaxy], x: NDArray, y: NDArray, supersampling: int, pixels: int
) -> dict[str, NDArray]:
    """Noiseless, unconvolved flux per pixel (AB zero point 30) for each band."""
    images = {band: np.zeros((pixels, pixels)) for band in BANDS}
    for galaxy in galaxies:
        unit = _bin_to_pixels(galaxy.unit_surface_brightness(x, y), supersampling, pixels)
        for band in BANDS:
            images[band] += unit * 10 ** (-0.4 * (galaxy.mags[band] - OUTPUT_ZERO_POINT_AB))
    return images


def render_components(
    scene: Scene, cfg: SimulationConfig, *, pixels: int = CUTOUT_PIXELS
) -> dict[str, NDArray]:
    """Noiseless, PSF-convolved (3, pixels, pixels) images of 'deflector', 'source', 'contaminants'.

    Fluxes are AB zero point 30. The source is ray-traced through the lens;
    the other components are not lensed. ``pixels`` other than 64 renders the
    same scene on a larger (or smaller) grid about the same centre.
    """
    x, y = _pixel_grid(cfg.supersampling, pixels)
    components = {}
    for name, galaxies in (("deflector", scene.deflector), ("contaminants", scene.contaminants)):
        components[name] = _band_flux_images(galaxies, x, y, cfg.supersampling, pixels)
    if scene.source:
        beta_x, beta_y = _LENS_MODELS[scene.lens_model].ray_shooting(x, y, scene.lens_kwargs)
        components["source"] = _band_flux_images(
            scene.source, beta_x, beta_y, cfg.supersampling, pixels
        )
    else:
        components["source"] = {band: np.zeros((pixels, pixels)) for band in BANDS}
    return {
        name: np.stack([fftconvolve(images[b], scene.psf_kernels[b], mode="same") for b in BANDS])
        for name, images in components.items()
    }


def _noise_sigma(scene: Scene, cfg: SimulationConfig, signal: NDArray) -> NDArray:
    """Per-pixel noise (zero point 30 flux) from sky, source shot noise and read noise."""
    sigmas = []
    for k, band in enumerate(BANDS):
        obs = cfg.bands[band]
        to_electrons_per_s = 10 ** (-0.4 * (OUTPUT_ZERO_POINT_AB - obs.magnitude_zero_point))
        exposure_s = scene.exposures[band] * obs.exposure_time_s
        sky_rate = (
            10 ** (-0.4 * (scene.sky_mag_arcsec2[band] - obs.magnitude_zero_point))
            * PIXEL_SCALE_ARCSEC**2
        )
        electrons = (np.clip(signal[k], 0, None) * to_electrons_per_s + sky_rate) * exposure_s
        variance = electrons + scene.exposures[band] * obs.read_noise_electrons**2
        sigmas.append(np.sqrt(variance) / exposure_s / to_electrons_per_s)
    return np.stack(sigmas)


def arc_snr(source: NDArray, sigma: NDArray) -> float:
    """Best-band SNR of the lensed source over pixels where it exceeds the noise."""
    best = 0.0
    for band_source, band_sigma in zip(source, sigma, strict=True):
        bright = band_source > band_sigma
        if bright.any():
            best = max(
                best, float(band_source[bright].sum() / np.sqrt((band_sigma[bright] ** 2).sum()))
            )
    return best


def _resolved(scene: Scene, cfg: SimulationConfig) -> bool:
    """Collett (2015) resolvability of the arcs in the r band."""
    if not cfg.require_resolved:
        return True
    theta_e = scene.lens_kwargs[0]["theta_E"]
    source_size = scene.labels["source_r_eff_arcsec"]
    return theta_e**2 > source_size**2 + (scene.psf_fwhm_arcsec["r"] / 2) ** 2


def simulate_cutout(
    rng: np.random.Generator, cfg: SimulationConfig, *, is_lens: bool, pixels: int = CUTOUT_PIXELS
) -> tuple[NDArray[np.float32], dict]:
    """One noisy (3, pixels, pixels) float32 cutout and its label row.

    Lenses failing the visibility rule get a new source (up to 30 times) and
    then a new scene, so every returned lens is one a survey would see. Scenes
    are drawn for a 64-pixel cutout whatever ``pixels`` is (field galaxies fall
    within its 64 x 64 centre).
    """
    while True:
        scene = draw_scene(rng, cfg, is_lens=is_lens)
        for _ in range(_MAX_SOURCE_REDRAWS if is_lens else 1):
            components = render_components(scene, cfg, pixels=pixels)
            signal = components["deflector"] + components["source"] + components["contaminants"]
            sigma = _noise_sigma(scene, cfg, signal)
            if not is_lens:
                break
            snr = arc_snr(components["source"], sigma)
            unlensed = sum(
                10 ** (-0.4 * (g.mags["r"] - OUTPUT_ZERO_POINT_AB)) for g in scene.source
            )
            magnification = float(components["source"][1].sum() / unlensed)
            scene.labels.update(arc_snr=snr, magnification=magnification)
            if (
                snr >= cfg.min_arc_snr
                and magnification >= cfg.min_magnification
                and _resolved(scene, cfg)
            ):
                break
            center = (scene.lens_kwargs[0]["center_x"], scene.lens_kwargs[0]["center_y"])
            scene.source = _draw_source(
                rng, cfg, scene.lens_kwargs[0]["theta_E"], center, scene.labels
            )
        else:
            continue
        image = signal + sigma * rng.standard_normal(signal.shape)
        scene.labels.setdefault("arc_snr", 0.0)
        scene.labels.setdefault("magnification", 1.0)
        return image.astype(np.float32), scene.labels
