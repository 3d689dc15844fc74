"""The repository's own sample cutouts (``examples/cutouts/``), simulated from a seed.

``python -m training samples --out examples/cutouts`` writes, bit for bit the same
for the same seed on the same library versions:

- ``clean/NNNNN.fits``: twelve (3, 64, 64) float32 cubes in the primary HDU, planes
  g, r, i as the ``BANDS`` keyword says, linear fluxes with AB zero point ``MAGZERO``
  = 30, a TAN WCS whose reference point is the cutout centre, 0.263 arcsec a pixel.
  Six are lenses that pass a stricter visibility rule than the training sets (arc
  SNR of at least 40, theta_E of 1.2-2.6 arcsec), six are non-lenses of six of the
  kinds the simulator draws (:data:`KINDS`), one a star. None has artefacts
  (the training sets' satellite trails, masks and the like), so no clean cube
  has a NaN pixel.
- ``formats/00000_*``: object 0 again in every other layout the service accepts:
  one image extension per band with ``FILTER`` (``_mef``), gzip (``_cube.fits.gz``),
  a RICE tile-compressed extension (``_rice``), BITPIX 16 with BSCALE/BZERO
  (``_int16``), BITPIX -64 (``_f64``), a column of NaN pixels (``_nan``), and the
  101 x 101 cutout (``_101px``) it was simulated as: its clean cube is the central
  64 x 64 pixels, the crop the service makes.
- ``truth.csv``: id, is_lens, kind, theta_E (arcsec), mass e1/e2, lens centre
  (arcsec from the cutout centre, x along columns, y along rows), RA/Dec (degrees).
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from numpy.typing import NDArray

from training.config import (
    BANDS,
    CUTOUT_PIXELS,
    OUTPUT_ZERO_POINT_AB,
    PIXEL_SCALE_ARCSEC,
    SAMPLES_SEED,
    SimulationConfig,
)
from training.simulate import simulate_cutout

#: Kind of each sample object, by id: six galaxy-galaxy lenses and six kinds of non-lens.
KINDS: tuple[str, ...] = (
    "lens",
    "lens",
    "companions",
    "lens",
    "tangential",
    "lens",
    "ring",
    "plain",
    "spiral",
    "lens",
    "star",
    "lens",
)
#: Lenses a person sees at a glance: bright arcs well outside the seeing disc.
LENS_THETA_E_ARCSEC = (1.2, 2.6)
LENS_MIN_ARC_SNR = 40.0
#: A star a person tells from a galaxy at once: centred, bright, not saturated (r mag).
STAR_MAG_R = (17.0, 19.0)
#: The object written again in every other layout.
FORMATS_OBJECT = 0
#: Side of the larger cutout object ``FORMATS_OBJECT`` is simulated as (pixels).
LARGE_PIXELS = 101
#: Column set to NaN in every band of the ``_nan`` file.
NAN_COLUMN = 10
#: Sky positions are drawn in the DES footprint's RA range and a band of Dec (degrees).
DEC_RANGE_DEG = (-60.0, 0.0)
TRUTH_COLUMNS = ("id", "is_lens", "kind", "theta_E", "e1", "e2", "center_x", "center_y")


def _config(kind: str) -> SimulationConfig:
    """The training simulator's config without artefacts, stricter for lenses and stars."""
    base = replace(SimulationConfig(), artefact_probability=0.0)
    if kind == "lens":
        return replace(base, theta_E_arcsec=LENS_THETA_E_ARCSEC, min_arc_snr=LENS_MIN_ARC_SNR)
    if kind == "star":
        return replace(base, star_mag_r=STAR_MAG_R, star_offset_fraction=0.0)
    return base


def _header(*, ra_deg: float, dec_deg: float, crpix: float, object_id: int) -> fits.Header:
    """TAN WCS with (RA, Dec) at 1-based pixel ``crpix`` on both axes, plus MAGZERO and OBJECT."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra_deg, dec_deg]
    wcs.wcs.crpix = [crpix, crpix]
    scale_deg = PIXEL_SCALE_ARCSEC / 3600
    wcs.wcs.cdelt = [-scale_deg, scale_deg]
    wcs.wcs.radesys = "ICRS"
    header = wcs.to_header()
    header["MAGZERO"] = (OUTPUT_ZERO_POINT_AB, "AB zero point of pixel values")
    header["OBJECT"] = f"lensserve-sample-{object_id:05d}"
    return header


def _cube_header(header: fits.Header) -> fits.Header:
    cube = header.copy()
    cube["BANDS"] = (",".join(BANDS), "filter of each plane, in order")
    return cube


def _to_bytes(hdus: list[fits.hdu.base._BaseHDU]) -> bytes:
    buffer = io.BytesIO()
    fits.HDUList(hdus).writeto(buffer)
    return buffer.getvalue()


def _layouts(
    large: NDArray[np.float32], cube: NDArray[np.float32], header: fits.Header, *, seed: int
) -> dict[str, bytes]:
    """Object ``FORMATS_OBJECT`` in every accepted layout but the plain cube, by file suffix.

    ``large`` is the object as simulated, ``cube`` its central 64 x 64 pixels and
    ``header`` the WCS, MAGZERO and OBJECT cards of ``cube``.
    """
    cube_header = _cube_header(header)
    clean = _to_bytes([fits.PrimaryHDU(cube, cube_header)])
    layouts = {}
    bands = []
    for band, plane in zip(BANDS, cube, strict=True):
        band_header = header.copy()
        band_header["FILTER"] = band
        bands.append(fits.ImageHDU(plane, band_header, name=band.upper()))
    layouts["_mef.fits"] = _to_bytes([fits.PrimaryHDU(header=header.copy()), *bands])
    # mtime=0 and no file name in the gzip header: the bytes depend on the pixels only.
    layouts["_cube.fits.gz"] = gzip.compress(clean, compresslevel=9, mtime=0)
    # A fixed dither seed (1-10000): astropy's default, 0, seeds from the clock.
    rice = fits.CompImageHDU(
        cube, cube_header, compression_type="RICE_1", dither_seed=1 + seed % 10_000
    )
    layouts["_rice.fits"] = _to_bytes([fits.PrimaryHDU(), rice])
    scaled = fits.PrimaryHDU(cube.copy(), cube_header)
    scaled.scale("int16", option="minmax")
    layouts["_int16.fits"] = _to_bytes([scaled])
    layouts["_f64.fits"] = _to_bytes([fits.PrimaryHDU(cube.astype(np.float64), cube_header)])
    masked = cube.copy()
    masked[:, :, NAN_COLUMN] = np.nan
    layouts["_nan.fits"] = _to_bytes([fits.PrimaryHDU(masked, cube_header)])
    large_header = cube_header.copy()
    # The crop's centre keeps the sky position of the cube's centre.
    before = (large.shape[-1] - cube.shape[-1]) // 2
    large_header["CRPIX1"] = large_header["CRPIX1"] + before
    large_header["CRPIX2"] = large_header["CRPIX2"] + before
    layouts["_101px.fits"] = _to_bytes([fits.PrimaryHDU(large, large_header)])
    return layouts


def _truth_value(value: object) -> str:
    if isinstance(value, float | np.floating):
        return "" if math.isnan(value) else repr(float(value))
    return str(value)


def write_samples(out_dir: Path, *, seed: int = SAMPLES_SEED) -> list[Path]:
    """Simulate the sample set into ``out_dir`` (``clean/``, ``formats/``, ``truth.csv``).

    Parameters
    ----------
    out_dir
        Folder to write into (created; files of the same names are replaced).
    seed
        Root of every random draw: object ``i`` uses the ``i``-th child of
        ``numpy.random.SeedSequence(seed)``, the sky positions the last one.

    Returns
    -------
    list of Path
        Every file written, in writing order.
    """
    clean_dir, formats_dir = out_dir / "clean", out_dir / "formats"
    clean_dir.mkdir(parents=True, exist_ok=True)
    formats_dir.mkdir(parents=True, exist_ok=True)
    *object_seeds, extra_seed = np.random.SeedSequence(seed).spawn(len(KINDS) + 1)
    extra = np.random.default_rng(extra_seed)
    ra_deg = extra.uniform(0.0, 360.0, size=len(KINDS))
    dec_deg = extra.uniform(*DEC_RANGE_DEG, size=len(KINDS))
    written: list[Path] = []
    rows = []
    for index, (kind, object_seed) in enumerate(zip(KINDS, object_seeds, strict=True)):
        pixels = LARGE_PIXELS if index == FORMATS_OBJECT else CUTOUT_PIXELS
        large, labels = simulate_cutout(
            np.random.default_rng(object_seed),
            _config(kind),
            is_lens=kind == "lens",
            kind=kind,
            pixels=pixels,
        )
        # A centre crop to 64 drops (pixels - 64) // 2 pixels before, the rest after.
        before = (pixels - CUTOUT_PIXELS) // 2
        image = np.ascontiguousarray(
            large[:, before : before + CUTOUT_PIXELS, before : before + CUTOUT_PIXELS]
        )
        header = _header(
            ra_deg=float(ra_deg[index]),
            dec_deg=float(dec_deg[index]),
            crpix=(image.shape[-1] + 1) / 2,
            object_id=index,
        )
        path = clean_dir / f"{index:05d}.fits"
        path.write_bytes(_to_bytes([fits.PrimaryHDU(image, _cube_header(header))]))
        written.append(path)
        row = {"id": index, "is_lens": int(kind == "lens"), "kind": labels["kind"]}
        row |= {key: labels[key] for key in TRUTH_COLUMNS[3:]}
        row |= {"ra": float(ra_deg[index]), "dec": float(dec_deg[index])}
        rows.append(row)
        if index == FORMATS_OBJECT:
            for suffix, data in _layouts(large, image, header, seed=seed).items():
                path = formats_dir / f"{index:05d}{suffix}"
                path.write_bytes(data)
                written.append(path)
    truth = out_dir / "truth.csv"
    with truth.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow([*TRUTH_COLUMNS, "ra", "dec"])
        for row in rows:
            writer.writerow([_truth_value(value) for value in row.values()])
    written.append(truth)
    return written
