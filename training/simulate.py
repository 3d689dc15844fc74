"""DES-like strong-lens and non-lens cutouts, rendered with lenstronomy.

One cutout is drawn in two steps: :func:`draw_scene` samples every physical
and observational parameter from a :class:`SimulationConfig`, and
:func:`render_components` turns the scene into noiseless component images;
:func:`simulate_cutout` adds noise and artefacts and returns a g, r, i cube in
AB zero point 30 fluxes (the format of ``examples/cutouts``). Lensing uses
lenstronomy's ray shooting (SIE or EPL plus external shear); light uses its
Sersic and Gaussian profiles. The populations live in their own modules:
observing conditions (:mod:`training.observing`), negatives
(:mod:`training.negatives`, :mod:`training.point_sources`), lensed quasars
(:mod:`training.lensed_quasars`) and artefacts (:mod:`training.artefacts`);
``docs/simulations.md`` lists every kind, its fraction and its sources.

Galaxy-galaxy lens visibility rule (kept lenses only), after Collett (2015):
the lensed source's signal-to-noise, sum(S) / sqrt(sum(sigma^2)) over the
pixels where the PSF-convolved source exceeds the pixel noise sigma, is at
least ``min_arc_snr`` (20) in the best of g, r, i; the total magnification is
at least ``min_magnification`` (3); and the lens is resolved,
theta_E^2 > r_source^2 + (FWHM_r / 2)^2. Lensed quasars follow the rule in
:mod:`training.lensed_quasars` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from lenstronomy.LensModel.lens_model import LensModel
from lenstronomy.Util.param_util import phi_q2_ellipticity
from numpy.typing import NDArray
from scipy.signal import fftconvolve

from training.artefacts import (
    NO_ARTEFACTS,
    apply_artefacts,
    correlated_noise,
    draw_artefact_kinds,
)
from training.config import (
    BANDS,
    CUTOUT_PIXELS,
    OUTPUT_ZERO_POINT_AB,
    PIXEL_SCALE_ARCSEC,
    SimulationConfig,
)
from training.lensed_quasars import image_point_sources, images_visible, solve_images
from training.light import Galaxy, PointSource, colour_mags, draw_blue_galaxy, ellipticity
from training.negatives import draw_field_galaxies, draw_negative
from training.observing import Observation, draw_observation, noise_sigma
from training.point_sources import draw_quasar
from training.psf import gaussian_image, moffat_image, psf_kernel

__all__ = [
    "Galaxy",
    "PointSource",
    "Scene",
    "arc_snr",
    "draw_scene",
    "render_components",
    "simulate_cutout",
]

_LENS_MODELS = {"SIE": LensModel(["SIE", "SHEAR"]), "EPL": LensModel(["EPL", "SHEAR"])}
_MAX_SOURCE_REDRAWS = 30


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
    observation: Observation
    psf_kernels: dict[str, NDArray]
    point_sources: list[PointSource] = field(default_factory=list)
    """Unlensed point sources (stars, quasars)."""
    lensed_quasar: PointSource | None = None
    """The quasar in the source plane (lensed quasars only); its images are rendered."""
    labels: dict[str, float | int | str] = field(default_factory=dict)

    @property
    def psf_fwhm_arcsec(self) -> dict[str, float]:
        return self.observation.psf_fwhm_arcsec


def _draw_deflector(
    rng: np.random.Generator, cfg: SimulationConfig, labels: dict
) -> tuple[Galaxy, str, list[dict]]:
    """A red early-type galaxy and its mass (SIE or EPL) plus external shear."""
    cx, cy = np.clip(rng.normal(0, cfg.center_sigma_arcsec, 2), -0.35, 0.35)
    e1, e2, phi, q = ellipticity(rng, cfg.mass_q)
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
    mags = colour_mags(
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
    return draw_blue_galaxy(
        rng, cfg, center=position, mag_r=mag_r, r_eff=r_eff, max_clumps=cfg.source_max_clumps
    )


def _draw_lensed_quasar(
    rng: np.random.Generator,
    cfg: SimulationConfig,
    theta_e: float,
    center: tuple[float, float],
    labels: dict,
) -> tuple[PointSource, list[Galaxy]]:
    """A quasar behind the lens (uniform in area) and its star-forming host galaxy.

    A fraction ``lensed_quasar_inner_fraction`` is drawn close to the centre,
    where the caustic makes quads.
    """
    inner = rng.uniform() < cfg.lensed_quasar_inner_fraction
    max_frac = 0.15 if inner else cfg.lensed_quasar_source_max_frac
    radius = theta_e * max_frac * np.sqrt(rng.uniform())
    angle = rng.uniform(0, 2 * np.pi)
    position = (center[0] + radius * np.cos(angle), center[1] + radius * np.sin(angle))
    quasar, _, quasar_labels = draw_quasar(
        rng, cfg, center=position, mag_r=float(rng.uniform(*cfg.quasar_mag_r)), host_probability=0
    )
    host_mag_r = quasar_labels["quasar_mag_r"] + rng.uniform(0.5, 3.0)
    r_eff = rng.uniform(0.1, 0.5)
    labels.update(
        quasar_labels,
        quasar_has_host=1,
        source_x=position[0],
        source_y=position[1],
        source_mag_r=host_mag_r,
        source_r_eff_arcsec=r_eff,
    )
    host = draw_blue_galaxy(rng, cfg, center=position, mag_r=host_mag_r, r_eff=r_eff, max_clumps=3)
    return quasar, host


def _choose(rng: np.random.Generator, kinds_weights: tuple[tuple[str, float], ...]) -> str:
    kinds, weights = zip(*kinds_weights, strict=True)
    return str(rng.choice(kinds, p=np.asarray(weights) / sum(weights)))


def draw_scene(
    rng: np.random.Generator, cfg: SimulationConfig, *, is_lens: bool, kind: str | None = None
) -> Scene:
    """Draw one lens or non-lens scene (every parameter drawn ends up in ``labels``).

    ``kind`` forces one of ``cfg.lens_kinds`` (lenses) or ``cfg.negative_kinds``;
    by default it is drawn with their relative frequencies.
    """
    labels: dict = {"is_lens": int(is_lens)}
    observation = draw_observation(rng, cfg, labels)
    deflector, lens_model, lens_kwargs = _draw_deflector(rng, cfg, labels)
    center = (lens_kwargs[0]["center_x"], lens_kwargs[0]["center_y"])
    source: list[Galaxy] = []
    point_sources: list[PointSource] = []
    lensed_quasar = None
    contaminants = draw_field_galaxies(rng, cfg)
    if kind is None:
        kind = _choose(rng, cfg.lens_kinds if is_lens else cfg.negative_kinds)
    if kind == "lensed_quasar":
        lensed_quasar, source = _draw_lensed_quasar(
            rng, cfg, lens_kwargs[0]["theta_E"], center, labels
        )
    elif is_lens:
        source = _draw_source(rng, cfg, lens_kwargs[0]["theta_E"], center, labels)
    else:
        light = draw_negative(rng, cfg, kind, center=center, deflector=deflector)
        contaminants += light.galaxies
        point_sources = light.point_sources
        labels.update(light.labels)
        if light.replaces_deflector:
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
        observation,
        dict(observation.psf_kernels),
        point_sources,
        lensed_quasar,
        labels=labels,
    )


def _pixel_grid(supersampling: int, pixels: int) -> tuple[NDArray, NDArray]:
    """Sub-pixel centres (arcsec) of a ``pixels``-wide cutout; x grows with column, y with row."""
    n = pixels * supersampling
    coords = (np.arange(n) - (n - 1) / 2) * (PIXEL_SCALE_ARCSEC / supersampling)
    x, y = np.meshgrid(coords, coords)
    return x.ravel(), y.ravel()


def _bin_to_pixels(values: NDArray, supersampling: int, pixels: int) -> NDArray:
    """Mean surface brightness per pixel times pixel area: flux per pixel."""
    grid = values.reshape(pixels, supersampling, pixels, supersampling)
    return grid.mean(axis=(1, 3)) * PIXEL_SCALE_ARCSEC**2


def _flux(mag: float) -> float:
    return 10 ** (-0.4 * (mag - OUTPUT_ZERO_POINT_AB))


def _convolved_galaxies(
    galaxies: list[Galaxy], x: NDArray, y: NDArray, scene: Scene, supersampling: int, pixels: int
) -> NDArray:
    """PSF-convolved (3, pixels, pixels) flux of ``galaxies`` at (x, y) (ray-traced or not)."""
    images = np.zeros((len(BANDS), pixels, pixels))
    if not galaxies:
        return images
    for galaxy in galaxies:
        unit = _bin_to_pixels(galaxy.unit_surface_brightness(x, y), supersampling, pixels)
        for k, band in enumerate(BANDS):
            images[k] += unit * _flux(galaxy.mags[band])
    return np.stack(
        [fftconvolve(images[k], scene.psf_kernels[b], mode="same") for k, b in enumerate(BANDS)]
    )


def _pixel_centres(pixels: int) -> tuple[NDArray, NDArray]:
    """Pixel centres (arcsec) of a ``pixels``-wide cutout as two (pixels, pixels) arrays."""
    coords = (np.arange(pixels) - (pixels - 1) / 2) * PIXEL_SCALE_ARCSEC
    x, y = np.meshgrid(coords, coords)
    return x, y


def _point_source_images(points: list[PointSource], scene: Scene, pixels: int) -> NDArray:
    """(3, pixels, pixels) flux of point sources: a sub-pixel-centred PSF core, wings and halo."""
    images = np.zeros((len(BANDS), pixels, pixels))
    if not points:
        return images
    obs = scene.observation
    half = scene.psf_kernels[BANDS[0]].shape[0] // 2
    pixel_x, pixel_y = _pixel_centres(pixels)
    for point in points:
        col = point.x / PIXEL_SCALE_ARCSEC + (pixels - 1) / 2
        row = point.y / PIXEL_SCALE_ARCSEC + (pixels - 1) / 2
        ic, ir = int(round(col)), int(round(row))
        offset = ((col - ic) * PIXEL_SCALE_ARCSEC, (row - ir) * PIXEL_SCALE_ARCSEC)
        r0, r1 = max(ir - half, 0), min(ir + half + 1, pixels)
        c0, c1 = max(ic - half, 0), min(ic + half + 1, pixels)
        core_fraction = 1.0 - point.wing_fraction - point.halo_fraction
        for k, band in enumerate(BANDS):
            flux = _flux(point.mags[band])
            if r0 < r1 and c0 < c1:
                kernel = psf_kernel(
                    fwhm_arcsec=obs.psf_fwhm_arcsec[band],
                    pixel_scale_arcsec=PIXEL_SCALE_ARCSEC,
                    moffat_beta=obs.moffat_beta,
                    ellipticity=obs.psf_ellipticity,
                    angle_rad=obs.psf_angle_rad,
                    offset_arcsec=offset,
                )
                images[k, r0:r1, c0:c1] += (
                    core_fraction
                    * flux
                    * kernel[r0 - ir + half : r1 - ir + half, c0 - ic + half : c1 - ic + half]
                )
            if point.wing_fraction:
                dx, dy = pixel_x - point.x, pixel_y - point.y
                images[k] += (
                    point.wing_fraction
                    * flux
                    * moffat_image(
                        dx,
                        dy,
                        fwhm_arcsec=obs.psf_fwhm_arcsec[band] * point.wing_fwhm_factor,
                        beta=point.wing_beta,
                        pixel_scale_arcsec=PIXEL_SCALE_ARCSEC,
                    )
                )
                images[k] += (
                    point.halo_fraction
                    * flux
                    * gaussian_image(
                        dx,
                        dy,
                        fwhm_arcsec=point.halo_fwhm_arcsec,
                        pixel_scale_arcsec=PIXEL_SCALE_ARCSEC,
                    )
                )
    return images


def _lensed_quasar_images(scene: Scene) -> list[PointSource]:
    """The images of the scene's lensed quasar (solved once per source position)."""
    quasar = scene.lensed_quasar
    if quasar is None:
        return []
    x, y, magnification = solve_images(
        scene.lens_model, scene.lens_kwargs, source_xy=(quasar.x, quasar.y)
    )
    return image_point_sources(quasar, x=x, y=y, magnification=magnification)


def _render_unlensed(scene: Scene, cfg: SimulationConfig, pixels: int) -> dict[str, NDArray]:
    x, y = _pixel_grid(cfg.supersampling, pixels)
    ss = cfg.supersampling
    return {
        "deflector": _convolved_galaxies(scene.deflector, x, y, scene, ss, pixels),
        "contaminants": _convolved_galaxies(scene.contaminants, x, y, scene, ss, pixels)
        + _point_source_images(scene.point_sources, scene, pixels),
    }


def _ray_traced_grid(scene: Scene, cfg: SimulationConfig, pixels: int) -> tuple[NDArray, NDArray]:
    """Source-plane positions of the sub-pixel grid (depends on the mass only)."""
    x, y = _pixel_grid(cfg.supersampling, pixels)
    return _LENS_MODELS[scene.lens_model].ray_shooting(x, y, scene.lens_kwargs)


def _render_source(
    scene: Scene,
    cfg: SimulationConfig,
    quasar_images: list[PointSource],
    source_grid: tuple[NDArray, NDArray],
    pixels: int,
) -> NDArray:
    if not scene.source and not quasar_images:
        return np.zeros((len(BANDS), pixels, pixels))
    return _convolved_galaxies(
        scene.source, *source_grid, scene, cfg.supersampling, pixels
    ) + _point_source_images(quasar_images, scene, pixels)


def render_components(
    scene: Scene, cfg: SimulationConfig, *, pixels: int = CUTOUT_PIXELS
) -> dict[str, NDArray]:
    """Noiseless, PSF-convolved (3, pixels, pixels) images of 'deflector', 'source', 'contaminants'.

    Fluxes are AB zero point 30. The source (galaxy and, for lensed quasars,
    the quasar's images) is ray-traced through the lens; stars, quasars and
    other galaxies are in 'contaminants' and are not lensed. ``pixels`` other
    than 64 renders the same scene on a larger (or smaller) grid about the
    same centre.
    """
    components = _render_unlensed(scene, cfg, pixels)
    components["source"] = _render_source(
        scene, cfg, _lensed_quasar_images(scene), _ray_traced_grid(scene, cfg, pixels), pixels
    )
    return components


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


def _saturate(rng: np.random.Generator, cfg: SimulationConfig, signal: NDArray) -> bool:
    """Clip pixels above a saturation level in place, bleeding the excess along the column.

    Returns whether any pixel saturated.
    """
    level = rng.uniform(*cfg.saturation_flux)
    saturated = False
    for band in signal:
        over = band > level
        if not over.any():
            continue
        saturated = True
        excess = float(np.sum(band[over] - level))
        row, col = np.unravel_index(np.argmax(band), band.shape)
        band[over] = level
        length = int(excess / level)
        band[max(row - length // 2, 0) : row + length // 2 + 1, col] = level
    return saturated


def _check_lens(
    scene: Scene, cfg: SimulationConfig, source: NDArray, sigma: NDArray, images: list
) -> bool:
    """Apply the visibility rule of the scene's kind and record its numbers in the labels."""
    snr = arc_snr(source, sigma)
    if scene.kind == "lensed_quasar":
        visible, separation = images_visible(images, scene.observation, cfg=cfg)
        unlensed = _flux(scene.lensed_quasar.mags["r"])
        magnification = float(sum(_flux(im.mags["r"]) for im in images) / unlensed)
        scene.labels.update(
            arc_snr=snr,
            magnification=magnification,
            n_images=len(images),
            image_separation_arcsec=separation,
        )
        return visible
    unlensed = sum(_flux(g.mags["r"]) for g in scene.source)
    magnification = float(source[1].sum() / unlensed)
    scene.labels.update(arc_snr=snr, magnification=magnification)
    return (
        snr >= cfg.min_arc_snr and magnification >= cfg.min_magnification and _resolved(scene, cfg)
    )


def _redraw_source(rng: np.random.Generator, cfg: SimulationConfig, scene: Scene) -> None:
    center = (scene.lens_kwargs[0]["center_x"], scene.lens_kwargs[0]["center_y"])
    theta_e = scene.lens_kwargs[0]["theta_E"]
    if scene.kind == "lensed_quasar":
        scene.lensed_quasar, scene.source = _draw_lensed_quasar(
            rng, cfg, theta_e, center, scene.labels
        )
    else:
        scene.source = _draw_source(rng, cfg, theta_e, center, scene.labels)


def simulate_cutout(
    rng: np.random.Generator,
    cfg: SimulationConfig,
    *,
    is_lens: bool,
    kind: str | None = None,
    pixels: int = CUTOUT_PIXELS,
) -> tuple[NDArray[np.float32], dict]:
    """One noisy (3, pixels, pixels) float32 cutout and its label row.

    Lenses failing their visibility rule get a new source (up to 30 times) and
    then a new scene, so every returned lens is one a survey would see.
    Artefacts come last; masked pixels are NaN. ``kind`` forces a kind (see
    :func:`draw_scene`). Scenes are drawn for a 64-pixel cutout whatever
    ``pixels`` is (field galaxies fall within its 64 x 64 centre); a larger
    ``pixels`` renders the scene about the same centre, the visibility rule is
    applied to the whole grid and artefacts scale with it.
    """
    while True:
        scene = draw_scene(rng, cfg, is_lens=is_lens, kind=kind)
        unlensed = _render_unlensed(scene, cfg, pixels)
        # The mass stays while sources are redrawn: ray-trace the grid once.
        source_grid = (
            _ray_traced_grid(scene, cfg, pixels) if is_lens else (np.zeros(0), np.zeros(0))
        )
        for _ in range(_MAX_SOURCE_REDRAWS if is_lens else 1):
            images = _lensed_quasar_images(scene)
            source = _render_source(scene, cfg, images, source_grid, pixels)
            signal = unlensed["deflector"] + unlensed["contaminants"] + source
            sigma = noise_sigma(scene.observation, signal)
            if not is_lens or _check_lens(scene, cfg, source, sigma, images):
                break
            _redraw_source(rng, cfg, scene)
        else:
            continue
        saturated = _saturate(rng, cfg, signal)
        if saturated:
            sigma = noise_sigma(scene.observation, signal)
        artefacts = draw_artefact_kinds(rng, cfg)
        noise = (
            correlated_noise(rng, signal.shape)
            if "correlated_noise" in artefacts
            else rng.standard_normal(signal.shape)
        )
        image = signal + sigma * noise
        sky_sigma = np.array([scene.observation.sky_sigma[b] for b in BANDS])
        apply_artefacts(
            rng, image, artefacts, sky_sigma=sky_sigma, fwhm_arcsec=scene.psf_fwhm_arcsec["r"]
        )
        scene.labels.update(
            saturated=int(saturated),
            artefacts="+".join(artefacts) if artefacts else NO_ARTEFACTS,
            masked_fraction=float(np.mean(~np.isfinite(image))),
        )
        scene.labels.setdefault("arc_snr", 0.0)
        scene.labels.setdefault("magnification", 1.0)
        return image.astype(np.float32), scene.labels
