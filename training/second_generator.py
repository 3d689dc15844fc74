"""A second, independently written DES-like generator, rendered with GalSim.

Training never uses it: it exists to show how the models fare on cutouts the
training simulator (:mod:`training.simulate`, lenstronomy) did not make
(issue 14, item 4; ``docs/second_generator.md``). It differs from that
simulator on purpose wherever the physics allows:

- light profiles are GalSim's: de Vaucouleurs bulge plus exponential disc
  deflectors, Sersic sources with ``galsim.RandomKnots`` star-forming knots,
  knotty discs and stars drawn as the PSF itself;
- PSFs are GalSim Moffat or Kolmogorov profiles, slightly sheared, with the
  seeing of the r band drawn around the DES DR2 median and the other bands
  following it (seeing correlated across bands);
- lensing is ray shooting through an analytic SIE plus external shear written
  here (the Kormann et al. 1994 / Keeton 2001 deflection), sampling a
  finely drawn GalSim source image by bilinear interpolation;
- noise follows DES DR2's 10-sigma depths (1.95" aperture) with a per-object
  scatter, plus the source's own Poisson noise.

Labels follow :mod:`training.simulate`'s conventions: ``theta_E`` in
lenstronomy's SIE normalisation, ``e1, e2 = (1 - q)/(1 + q) (cos 2 phi, sin 2 phi)``
of the mass, ``center_x`` growing with column and ``center_y`` with row (arcsec
from the cutout centre), AB zero point 30 pixel fluxes, (3, 64, 64) g, r, i.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import galsim
import numpy as np
from numpy.typing import NDArray
from scipy.ndimage import map_coordinates
from scipy.signal import fftconvolve

from training.dataset import CONFIG_FILE, LABEL_FILE, _write_labels

BANDS = ("g", "r", "i")
PIXEL_SCALE_ARCSEC = 0.263
CUTOUT_PIXELS = 64
ZERO_POINT_AB = 30.0
GENERATOR = "training.second_generator (GalSim)"

#: DES DR2 median PSF FWHM per band (arcsec; Abbott et al. 2021, ApJS 255, 20).
DR2_SEEING_FWHM_ARCSEC = {"g": 1.11, "r": 0.95, "i": 0.88}
#: DES DR2 median 10-sigma depth in a 1.95" diameter aperture (AB mag; same paper).
DR2_DEPTH_10SIGMA_MAG = {"g": 24.7, "r": 24.4, "i": 23.8}
DEPTH_APERTURE_DIAMETER_ARCSEC = 1.95
#: Per-object scatter of the depth (mag): shared by the bands, and each band's own.
DEPTH_SCATTER_MAG = (0.2, 0.05)
#: Log-normal scatter of the r-band seeing about its median, and of the band ratios.
SEEING_SCATTER_LN = (0.15, 0.03)
#: Electrons per AB-zero-point-30 flux unit of a coadd (8 x 90 s at 26.7 mag per e-/s):
#: sets the Poisson noise of the objects themselves.
ELECTRONS_PER_FLUX = 8 * 90.0 * 10 ** (-0.4 * (ZERO_POINT_AB - 26.7))
SUPERSAMPLING = 4
SOURCE_STAMP_PIXELS = 192
SOURCE_STAMP_SCALE_ARCSEC = 0.03
MIN_ARC_SNR = 20.0
MIN_MAGNIFICATION = 3.0
NEGATIVE_KINDS = {"elliptical": 0.35, "disc": 0.3, "star": 0.2, "blend": 0.15}
_MAX_SOURCE_REDRAWS = 20
_GSPARAMS = galsim.GSParams(maximum_fft_size=8192, folding_threshold=1e-2)


@dataclass
class Scene:
    """One drawn cutout: GalSim profiles per band (fluxes in zero point 30 units)."""

    kind: str
    psfs: dict[str, galsim.GSObject]
    depth_10sigma_mag: dict[str, float]
    unlensed: dict[str, list[galsim.GSObject]] = field(default_factory=dict)
    source: dict[str, list[galsim.GSObject]] = field(default_factory=dict)
    """Source components per band, centred on the source position ``source_xy``."""
    source_xy: tuple[float, float] = (0.0, 0.0)
    lens: dict[str, float] = field(default_factory=dict)
    labels: dict[str, float | int | str] = field(default_factory=dict)


def sie_shear_deflection(x: NDArray, y: NDArray, lens: dict[str, float]) -> tuple[NDArray, NDArray]:
    """Deflection (arcsec) of a singular isothermal ellipsoid plus external shear.

    Kormann, Schneider & Bartelmann (1994); Keeton (2001, eq. 34 with s = 0), in
    the frame of the major axis, normalised so that the convergence is
    theta_E / (2 sqrt(q x^2 + y^2 / q)) as in lenstronomy's SIE.

    Parameters
    ----------
    x, y : ndarray
        Image-plane positions (arcsec from the cutout centre).
    lens : dict
        ``theta_E`` (arcsec), axis ratio ``q``, major-axis angle ``phi`` (rad from +x),
        ``center_x``, ``center_y`` (arcsec), shear ``gamma1``, ``gamma2`` about the centre.
    """
    dx, dy = x - lens["center_x"], y - lens["center_y"]
    cos, sin = math.cos(lens["phi"]), math.sin(lens["phi"])
    major, minor = cos * dx + sin * dy, -sin * dx + cos * dy
    q, theta_e = lens["q"], lens["theta_E"]
    radius = np.maximum(np.hypot(q * major, minor), 1e-12)
    if q > 0.9999:  # the SIS limit, where the elliptical formula divides 0 by 0
        distance = np.maximum(np.hypot(major, minor), 1e-12)
        alpha_major, alpha_minor = theta_e * major / distance, theta_e * minor / distance
    else:
        root = math.sqrt(1.0 - q * q)
        scale = theta_e * math.sqrt(q) / root
        alpha_major = scale * np.arctan(root * major / radius)
        alpha_minor = scale * np.arctanh(np.clip(root * minor / radius, -1 + 1e-15, 1 - 1e-15))
    alpha_x = cos * alpha_major - sin * alpha_minor + lens["gamma1"] * dx + lens["gamma2"] * dy
    alpha_y = sin * alpha_major + cos * alpha_minor + lens["gamma2"] * dx - lens["gamma1"] * dy
    return alpha_x, alpha_y


def _flux(mag: float) -> float:
    return 10 ** (-0.4 * (mag - ZERO_POINT_AB))


def _mags(r_mag: float, gr: float, ri: float) -> dict[str, float]:
    return {"g": r_mag + gr, "r": r_mag, "i": r_mag - ri}


def _observation(rng: np.random.Generator, labels: dict) -> tuple[dict, dict]:
    """PSF per band (correlated seeing, one shape) and 10-sigma depth per band."""
    ln_scatter, ratio_scatter = SEEING_SCATTER_LN
    r_fwhm = float(np.clip(0.95 * math.exp(rng.normal(0, ln_scatter)), 0.7, 1.6))
    moffat_beta = float(rng.uniform(2.5, 4.5)) if rng.uniform() < 0.5 else None
    shear_g, shear_angle = rng.uniform(0, 0.05), rng.uniform(0, math.pi)
    common_depth = rng.normal(0, DEPTH_SCATTER_MAG[0])
    psfs, depths = {}, {}
    for band in BANDS:
        ratio = DR2_SEEING_FWHM_ARCSEC[band] / DR2_SEEING_FWHM_ARCSEC["r"]
        fwhm = r_fwhm * ratio * (1.0 if band == "r" else math.exp(rng.normal(0, ratio_scatter)))
        if moffat_beta is None:
            psf = galsim.Kolmogorov(fwhm=fwhm, gsparams=_GSPARAMS)
        else:
            psf = galsim.Moffat(beta=moffat_beta, fwhm=fwhm, gsparams=_GSPARAMS)
        psfs[band] = psf.shear(g=shear_g, beta=shear_angle * galsim.radians)
        depths[band] = (
            DR2_DEPTH_10SIGMA_MAG[band] + common_depth + rng.normal(0, DEPTH_SCATTER_MAG[1])
        )
        labels[f"seeing_fwhm_arcsec_{band}"] = fwhm
        labels[f"depth_10sigma_mag_{band}"] = depths[band]
    labels.update(
        psf_profile="kolmogorov" if moffat_beta is None else "moffat",
        psf_moffat_beta=moffat_beta or 0.0,
        psf_shear_g=shear_g,
    )
    return psfs, depths


def _early_type(
    rng: np.random.Generator,
    *,
    r_eff: float,
    q: float,
    phi: float,
    i_mag: float,
    x: float,
    y: float,
) -> dict[str, list[galsim.GSObject]]:
    """A red bulge (de Vaucouleurs) with a faint exponential disc, per band."""
    gr, ri = rng.uniform(1.1, 1.7), rng.uniform(0.4, 0.65)
    mags = _mags(i_mag + ri, gr, ri)
    disc_fraction = rng.uniform(0.0, 0.3)
    bulge = galsim.DeVaucouleurs(half_light_radius=r_eff, trunc=8 * r_eff, gsparams=_GSPARAMS)
    disc = galsim.Exponential(half_light_radius=1.5 * r_eff, gsparams=_GSPARAMS)
    disc_q = float(np.clip(q - rng.uniform(0, 0.2), 0.2, 1.0))
    bulge = bulge.shear(q=q, beta=phi * galsim.radians)
    disc = disc.shear(q=disc_q, beta=phi * galsim.radians)
    return {
        band: [
            bulge.withFlux((1 - disc_fraction) * _flux(mags[band])).shift(x, y),
            disc.withFlux(disc_fraction * _flux(mags[band])).shift(x, y),
        ]
        for band in BANDS
    }


def _star_forming(
    rng: np.random.Generator,
    *,
    r_mag: float,
    r_eff: float,
    knot_fraction: float,
    n_knots: int,
    q: float,
    phi: float,
    x: float,
    y: float,
    disc: bool = False,
) -> dict[str, list[galsim.GSObject]]:
    """A blue Sersic (or exponential disc) body with GalSim RandomKnots, per band."""
    gr, ri = rng.uniform(0.0, 0.5), rng.uniform(-0.1, 0.3)
    body_mags = _mags(r_mag, gr, ri)
    knot_mags = _mags(r_mag, gr - 0.2, ri - 0.1)
    if disc:
        body = galsim.Exponential(half_light_radius=r_eff, gsparams=_GSPARAMS)
    else:
        body = galsim.Sersic(
            n=float(rng.uniform(0.6, 2.0)), half_light_radius=r_eff, gsparams=_GSPARAMS
        )
    knots = galsim.RandomKnots(
        n_knots,
        half_light_radius=r_eff,
        rng=galsim.BaseDeviate(int(rng.integers(1, 2**31))),
        gsparams=_GSPARAMS,
    )
    knots = galsim.Convolve(knots, galsim.Gaussian(sigma=0.04, gsparams=_GSPARAMS))
    body = body.shear(q=q, beta=phi * galsim.radians)
    knots = knots.shear(q=q, beta=phi * galsim.radians)
    return {
        band: [
            body.withFlux((1 - knot_fraction) * _flux(body_mags[band])).shift(x, y),
            knots.withFlux(knot_fraction * _flux(knot_mags[band])).shift(x, y),
        ]
        for band in BANDS
    }


def _star(rng: np.random.Generator, psfs: dict, *, x: float, y: float, labels: dict) -> dict:
    """A point source along an approximate stellar locus (g-r 0.2-1.45), r 16-23."""
    r_mag = rng.uniform(16.0, 23.0)
    gr = rng.uniform(0.2, 1.45)
    ri = 0.38 * gr - 0.08 + (rng.uniform(0, 1.0) if gr > 1.3 else 0.0) + rng.normal(0, 0.05)
    mags = _mags(r_mag, gr, ri)
    labels.update(star_mag_r=r_mag, star_gr=gr, star_ri=ri)
    return {band: [galsim.DeltaFunction(flux=_flux(mags[band])).shift(x, y)] for band in BANDS}


def _merge(*parts: dict[str, list]) -> dict[str, list]:
    return {band: [obj for part in parts for obj in part.get(band, [])] for band in BANDS}


def _field_galaxies(rng: np.random.Generator) -> dict[str, list]:
    """Unrelated faint galaxies away from the centre."""
    half = CUTOUT_PIXELS * PIXEL_SCALE_ARCSEC / 2
    parts = []
    for _ in range(int(rng.poisson(1.0))):
        x, y = rng.uniform(-half, half, 2)
        if math.hypot(x, y) < 2.5:
            continue
        parts.append(
            _star_forming(
                rng,
                r_mag=rng.uniform(21, 25),
                r_eff=rng.uniform(0.15, 0.8),
                knot_fraction=rng.uniform(0, 0.3),
                n_knots=int(rng.integers(3, 10)),
                q=rng.uniform(0.3, 1.0),
                phi=rng.uniform(0, math.pi),
                x=x,
                y=y,
            )
        )
    return _merge(*parts)


def _draw_deflector(rng: np.random.Generator, labels: dict) -> tuple[dict, dict]:
    """SIE + shear mass and the early-type galaxy that carries it."""
    theta_e = float(np.clip(1.3 * math.exp(rng.normal(0, 0.4)), 0.5, 3.0))
    q = float(rng.uniform(0.5, 1.0))
    phi = float(rng.uniform(0, math.pi))
    cx, cy = (float(v) for v in np.clip(rng.normal(0, 0.08, 2), -0.3, 0.3))
    shear, shear_angle = rng.uniform(0, 0.08), rng.uniform(0, math.pi)
    lens = {
        "theta_E": theta_e,
        "q": q,
        "phi": phi,
        "center_x": cx,
        "center_y": cy,
        "gamma1": shear * math.cos(2 * shear_angle),
        "gamma2": shear * math.sin(2 * shear_angle),
    }
    i_mag = float(np.clip(19.6 - 4 * math.log10(theta_e / 1.2) + rng.normal(0, 0.4), 16.8, 21.5))
    r_eff = float(np.clip(1.1 * theta_e**0.8 * math.exp(rng.normal(0, 0.25)), 0.4, 3.0))
    q_light = float(np.clip(q + rng.normal(0, 0.1), 0.35, 1.0))
    phi_light = phi + math.radians(rng.normal(0, 10))
    ellipticity = (1 - q) / (1 + q)
    labels.update(
        theta_E=theta_e,
        e1=ellipticity * math.cos(2 * phi),
        e2=ellipticity * math.sin(2 * phi),
        center_x=cx,
        center_y=cy,
        mass_q=q,
        mass_phi_rad=phi,
        shear_gamma1=lens["gamma1"],
        shear_gamma2=lens["gamma2"],
        deflector_mag_i=i_mag,
        deflector_r_eff_arcsec=r_eff,
    )
    light = _early_type(
        rng,
        r_eff=r_eff,
        q=q_light,
        phi=phi_light,
        i_mag=i_mag,
        x=cx + rng.normal(0, 0.02),
        y=cy + rng.normal(0, 0.02),
    )
    return lens, light


def _draw_source(rng: np.random.Generator, scene: Scene) -> None:
    """A knotty star-forming source inside the caustic region (uniform in area)."""
    lens = scene.lens
    radius = 0.7 * lens["theta_E"] * math.sqrt(rng.uniform())
    angle = rng.uniform(0, 2 * math.pi)
    x = lens["center_x"] + radius * math.cos(angle)
    y = lens["center_y"] + radius * math.sin(angle)
    r_mag, r_eff = rng.uniform(21.0, 25.0), rng.uniform(0.1, 0.6)
    scene.source = _star_forming(
        rng,
        r_mag=r_mag,
        r_eff=r_eff,
        knot_fraction=rng.uniform(0.05, 0.6),
        n_knots=int(rng.integers(5, 31)),
        q=rng.uniform(0.4, 1.0),
        phi=rng.uniform(0, math.pi),
        x=0.0,
        y=0.0,
    )
    scene.source_xy = (x, y)
    scene.labels.update(source_x=x, source_y=y, source_mag_r=r_mag, source_r_eff_arcsec=r_eff)


def draw_scene(rng: np.random.Generator, *, is_lens: bool) -> Scene:
    """Draw one lens or non-lens scene; every drawn number also goes to ``labels``."""
    labels: dict = {"is_lens": int(is_lens)}
    psfs, depths = _observation(rng, labels)
    field_galaxies = _field_galaxies(rng)
    if is_lens:
        lens, light = _draw_deflector(rng, labels)
        scene = Scene("lens", psfs, depths, _merge(light, field_galaxies), lens=lens, labels=labels)
        _draw_source(rng, scene)
        return scene
    kinds = list(NEGATIVE_KINDS)
    weights = np.array(list(NEGATIVE_KINDS.values()))
    kind = str(rng.choice(kinds, p=weights / weights.sum()))
    offset = lambda: (float(v) for v in rng.normal(0, 0.3, 2))  # noqa: E731
    if kind == "elliptical":
        _, light = _draw_deflector(rng, labels)
    elif kind == "disc":
        x, y = offset()
        light = _star_forming(
            rng,
            r_mag=rng.uniform(17.5, 21.0),
            r_eff=rng.uniform(0.8, 2.5),
            knot_fraction=rng.uniform(0.1, 0.4),
            n_knots=int(rng.integers(10, 50)),
            q=rng.uniform(0.15, 1.0),
            phi=rng.uniform(0, math.pi),
            x=x,
            y=y,
            disc=True,
        )
        bulge = _early_type(
            rng,
            r_eff=rng.uniform(0.2, 0.6),
            q=rng.uniform(0.7, 1.0),
            phi=rng.uniform(0, math.pi),
            i_mag=rng.uniform(19.0, 22.0),
            x=x,
            y=y,
        )
        light = _merge(light, bulge)
    elif kind == "star":
        x, y = (float(v) for v in rng.normal(0, 0.5, 2))
        light = _star(rng, psfs, x=x, y=y, labels=labels)
    else:
        _, galaxy = _draw_deflector(rng, labels)
        separation, angle = rng.uniform(0.6, 2.0), rng.uniform(0, 2 * math.pi)
        x, y = separation * math.cos(angle), separation * math.sin(angle)
        if rng.uniform() < 0.5:
            other = _star(rng, psfs, x=x, y=y, labels=labels)
        else:
            other = _early_type(
                rng,
                r_eff=rng.uniform(0.3, 1.2),
                q=rng.uniform(0.4, 1.0),
                phi=rng.uniform(0, math.pi),
                i_mag=rng.uniform(18.5, 21.5),
                x=x,
                y=y,
            )
        light = _merge(galaxy, other)
    for key in ("theta_E", "e1", "e2", "center_x", "center_y"):
        labels[key] = float("nan")
    return Scene(kind, psfs, depths, _merge(light, field_galaxies), labels=labels)


def _pixel_grid() -> tuple[NDArray, NDArray]:
    """Sub-pixel centres (arcsec): x grows with column, y with row, 0 at the cutout centre."""
    n = CUTOUT_PIXELS * SUPERSAMPLING
    coords = (np.arange(n) - (n - 1) / 2) * (PIXEL_SCALE_ARCSEC / SUPERSAMPLING)
    return np.meshgrid(coords, coords)


_GRID = _pixel_grid()


def _render_unlensed(scene: Scene) -> NDArray[np.float64]:
    """PSF-convolved, pixel-integrated (3, 64, 64) flux of the unlensed light."""
    out = np.zeros((len(BANDS), CUTOUT_PIXELS, CUTOUT_PIXELS))
    for k, band in enumerate(BANDS):
        objects = scene.unlensed[band]
        if not objects:
            continue
        image = galsim.ImageD(CUTOUT_PIXELS, CUTOUT_PIXELS, scale=PIXEL_SCALE_ARCSEC)
        galsim.Convolve(galsim.Add(objects), scene.psfs[band]).drawImage(image=image)
        out[k] = image.array
    return out


def _render_source(scene: Scene) -> NDArray[np.float64]:
    """The lensed source: ray-shot sub-pixels sample a fine GalSim image of the source,
    then PSF convolution on the sub-pixel grid and summation into pixels."""
    x, y = _GRID
    alpha_x, alpha_y = sie_shear_deflection(x, y, scene.lens)
    beta_x = x - alpha_x - scene.source_xy[0]
    beta_y = y - alpha_y - scene.source_xy[1]
    centre = (SOURCE_STAMP_PIXELS - 1) / 2
    coords = np.stack(
        [beta_y / SOURCE_STAMP_SCALE_ARCSEC + centre, beta_x / SOURCE_STAMP_SCALE_ARCSEC + centre]
    )
    sub_area = (PIXEL_SCALE_ARCSEC / SUPERSAMPLING) ** 2
    fine_scale = PIXEL_SCALE_ARCSEC / SUPERSAMPLING
    # The bands differ only in each component's flux: draw and lens each component once
    # (r band), then scale it per band.
    lensed = []
    for component in scene.source["r"]:
        stamp = component.drawImage(
            nx=SOURCE_STAMP_PIXELS,
            ny=SOURCE_STAMP_PIXELS,
            scale=SOURCE_STAMP_SCALE_ARCSEC,
            method="no_pixel",
        ).array
        sampled = map_coordinates(stamp, coords, order=1, cval=0.0)
        lensed.append(sampled * (sub_area / SOURCE_STAMP_SCALE_ARCSEC**2) / component.flux)
    out = np.zeros((len(BANDS), CUTOUT_PIXELS, CUTOUT_PIXELS))
    n = CUTOUT_PIXELS
    for k, band in enumerate(BANDS):
        fluxes = [component.flux for component in scene.source[band]]
        sub_pixels = sum(flux * unit for flux, unit in zip(fluxes, lensed, strict=True))
        kernel = scene.psfs[band].drawImage(nx=61, ny=61, scale=fine_scale, method="no_pixel").array
        fine = fftconvolve(sub_pixels, kernel / kernel.sum(), mode="same")
        out[k] = fine.reshape(n, SUPERSAMPLING, n, SUPERSAMPLING).sum(axis=(1, 3))
    return out


def render(scene: Scene, *, with_source: bool = True) -> tuple[NDArray, NDArray]:
    """Noiseless (3, 64, 64) flux of the scene and of its lensed source alone."""
    unlensed = _render_unlensed(scene)
    if not scene.source or not with_source:
        return unlensed, np.zeros_like(unlensed)
    source = _render_source(scene)
    return unlensed + source, source


def noise_sigma(scene: Scene, signal: NDArray) -> NDArray[np.float64]:
    """Per-pixel noise: sky from the 10-sigma aperture depth, plus the objects' Poisson noise."""
    aperture_pixels = math.pi * (DEPTH_APERTURE_DIAMETER_ARCSEC / 2 / PIXEL_SCALE_ARCSEC) ** 2
    sky = np.array(
        [_flux(scene.depth_10sigma_mag[b]) / 10 / math.sqrt(aperture_pixels) for b in BANDS]
    )
    return np.sqrt(sky[:, None, None] ** 2 + np.clip(signal, 0, None) / ELECTRONS_PER_FLUX)


def arc_snr(source: NDArray, sigma: NDArray) -> float:
    """Best-band SNR of the lensed source over the pixels where it exceeds the noise."""
    bright = source > sigma
    snr = [
        source[k][bright[k]].sum() / math.sqrt((sigma[k][bright[k]] ** 2).sum())
        for k in range(len(BANDS))
        if bright[k].any()
    ]
    return float(max(snr, default=0.0))


def simulate_cutout(rng: np.random.Generator, *, is_lens: bool) -> tuple[NDArray[np.float32], dict]:
    """One noisy (3, 64, 64) float32 cutout (AB zero point 30) and its label row.

    A lens keeps its source only if the arcs have SNR >= 20 and the source is
    magnified >= 3 times (r band); otherwise the source, then the scene, is redrawn.
    """
    while True:
        scene = draw_scene(rng, is_lens=is_lens)
        for _ in range(_MAX_SOURCE_REDRAWS if is_lens else 1):
            signal, source = render(scene)
            sigma = noise_sigma(scene, signal)
            if not is_lens:
                break
            snr = arc_snr(source, sigma)
            unlensed_r = sum(obj.flux for obj in scene.source["r"])
            magnification = float(source[1].sum() / unlensed_r)
            scene.labels.update(arc_snr=snr, magnification=magnification)
            if snr >= MIN_ARC_SNR and magnification >= MIN_MAGNIFICATION:
                break
            _draw_source(rng, scene)
        else:
            continue
        scene.labels.setdefault("arc_snr", 0.0)
        scene.labels.setdefault("magnification", 1.0)
        scene.labels["kind"] = scene.kind
        image = signal + sigma * rng.standard_normal(signal.shape)
        return image.astype(np.float32), scene.labels


def simulate_shard(size: int, seed: np.random.SeedSequence) -> tuple[NDArray[np.float32], list]:
    """``size`` cutouts, the first half lenses (every shard balanced)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k in range(size):
        image, row = simulate_cutout(rng, is_lens=(k + 0.5) / size <= 0.5)
        images.append(image)
        labels.append(row)
    return np.stack(images), labels


def _shard_job(args: tuple[int, np.random.SeedSequence]) -> tuple[NDArray, list]:
    return simulate_shard(*args)


def generate(
    out_dir: Path, *, n_cutouts: int, seed: int, workers: int, shard_size: int = 250
) -> Path:
    """Write ``n_cutouts`` cutouts as ``shard_*.npz`` plus ``labels.csv`` (the format of
    :mod:`training.dataset`), the same for any number of workers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(n_cutouts / shard_size)
    sizes = [min(shard_size, n_cutouts - i * shard_size) for i in range(n_shards)]
    jobs = list(zip(sizes, np.random.SeedSequence(seed).spawn(n_shards), strict=True))
    rows: list[dict] = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for index, (images, labels) in enumerate(pool.map(_shard_job, jobs)):
            np.savez(out_dir / f"shard_{index:04d}.npz", images=images)
            rows += labels
    _write_labels(out_dir / LABEL_FILE, rows)
    config = {
        "generator": GENERATOR,
        "seed": seed,
        "n_cutouts": n_cutouts,
        "shard_size": shard_size,
        "galsim_version": galsim.__version__,
        "dr2_seeing_fwhm_arcsec": DR2_SEEING_FWHM_ARCSEC,
        "dr2_depth_10sigma_mag": DR2_DEPTH_10SIGMA_MAG,
        "negative_kinds": NEGATIVE_KINDS,
        "min_arc_snr": MIN_ARC_SNR,
        "min_magnification": MIN_MAGNIFICATION,
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out_dir
