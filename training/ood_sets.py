"""Out-of-distribution test sets, each derived from in-distribution simulated cutouts.

``python -m training ood-sets --data DIR --out OUT`` writes one folder per kind
under ``OUT`` in the format of :mod:`training.dataset` (``shard_0000.npz`` with
``images`` (n, 3, 64, 64) float32, and ``labels.csv``: the source cutout's
labels plus ``ood_kind``). Kinds:

* ``noise_only``: Gaussian noise at each band's robust (MAD) noise level of the
  source cutout, plus its background: no source at all;
* ``permuted_bands``: the bands in a random order other than g, r, i;
* ``one_band_copied``: one random band copied into all three;
* ``magnitudes``: pixel values in asinh magnitudes (Lupton et al. 1999, softened
  at each band's noise) instead of fluxes;
* ``counts_offset``: counts at zero point 27 instead of 30 (x 0.063) plus an
  offset of 1000 counts (an unsubtracted sky);
* ``psf_sharp`` / ``psf_broad``: re-rendered by the simulator with the same seed
  and the DES DR2 median seeing of every band halved / doubled (depth fixed, so
  the pixel noise follows the simulator's rule for the seeing);
* ``pixel_scale_0.2`` / ``pixel_scale_0.5``: resampled (bilinear) as if the
  pixels were 0.2 or 0.5 arcsec, without telling the service: the scene is
  magnified by 0.263/0.2 (centre crop) or shrunk by 0.263/0.5 into the centre of
  a noise field at the resampled noise level; surface brightness is kept;
* ``saturated_star``: a star of magnitude 9-12 (r; the training's stars are
  15-23) pasted within 8 pixels of the centre, saturated at the training's
  20000-35000 level, so its plateau is far wider than any trained on;
* ``heavy_artefacts``: re-rendered with every artefact kind on every cutout.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from training.config import BANDS, PIXEL_SCALE_ARCSEC, SimulationConfig
from training.dataset import (
    CONFIG_FILE,
    LABEL_FILE,
    _write_labels,
    load_dataset,
    simulate_dataset,
)

OOD_KINDS: tuple[str, ...] = (
    "noise_only",
    "permuted_bands",
    "one_band_copied",
    "magnitudes",
    "counts_offset",
    "psf_sharp",
    "psf_broad",
    "pixel_scale_0.2",
    "pixel_scale_0.5",
    "saturated_star",
    "heavy_artefacts",
)
#: Kinds re-rendered by the simulator, and the factor on every band's median seeing.
_RERENDERED_SEEING = {"psf_sharp": 0.5, "psf_broad": 2.0}
#: Zero point and offset (counts) of ``counts_offset``.
_COUNTS_ZERO_POINT = 27.0
_COUNTS_OFFSET = 1000.0
#: Zero point of the training data's fluxes (AB).
_ZERO_POINT = 30.0
#: r-band magnitudes of the pasted saturated stars.
_BRIGHT_STAR_MAG_R = (9.0, 12.0)
_STAR_COLOURS = {"g": 0.6, "r": 0.0, "i": -0.2}
_MOFFAT_BETA = 2.5


def _robust_sigma(band: NDArray[np.float64]) -> float:
    finite = band[np.isfinite(band)]
    return float(1.4826 * np.median(np.abs(finite - np.median(finite)))) if finite.size else 1.0


def _filled(cube: NDArray[np.floating]) -> NDArray[np.float64]:
    """The cube with masked pixels set to their band's median (for resampling)."""
    data = np.array(cube, dtype=np.float64)
    for band in data:
        band[~np.isfinite(band)] = np.nanmedian(band) if np.isfinite(band).any() else 0.0
    return data


def noise_only(rng: np.random.Generator, cube: NDArray) -> NDArray:
    data = np.asarray(cube, dtype=np.float64)
    out = np.empty_like(data)
    for b, band in enumerate(data):
        out[b] = np.nanmedian(band) + _robust_sigma(band) * rng.standard_normal(band.shape)
    return out


def permuted_bands(rng: np.random.Generator, cube: NDArray) -> NDArray:
    orders = ((0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
    return np.asarray(cube)[list(orders[rng.integers(len(orders))])]


def one_band_copied(rng: np.random.Generator, cube: NDArray) -> NDArray:
    band = np.asarray(cube)[rng.integers(len(cube))]
    return np.stack([band] * len(cube))


def magnitudes(rng: np.random.Generator, cube: NDArray) -> NDArray:
    """Asinh magnitudes m = ZP - 2.5/ln(10) [asinh(f / 2b) + ln b], b = the band's noise."""
    data = np.asarray(cube, dtype=np.float64)
    out = np.empty_like(data)
    for k, band in enumerate(data):
        b = max(_robust_sigma(band), 1e-3)
        out[k] = _ZERO_POINT - 2.5 / np.log(10) * (np.arcsinh(band / (2 * b)) + np.log(b))
    return out


def counts_offset(rng: np.random.Generator, cube: NDArray) -> NDArray:
    scale = 10 ** (0.4 * (_COUNTS_ZERO_POINT - _ZERO_POINT))
    return np.asarray(cube, dtype=np.float64) * scale + _COUNTS_OFFSET


def _resampled(cube: NDArray, pixel_scale_arcsec: float, rng: np.random.Generator) -> NDArray:
    """The scene as pixels of ``pixel_scale_arcsec`` would sample it, on 64 x 64 pixels."""
    data = _filled(cube)
    zoom = PIXEL_SCALE_ARCSEC / pixel_scale_arcsec
    area = (pixel_scale_arcsec / PIXEL_SCALE_ARCSEC) ** 2
    size = data.shape[1]
    out = np.empty_like(data)
    for b, band in enumerate(data):
        resampled = ndimage.zoom(band, zoom, order=1) * area
        n = resampled.shape[0]
        if n >= size:
            start = (n - size) // 2
            out[b] = resampled[start : start + size, start : start + size]
        else:
            sigma = _robust_sigma(resampled)
            field = np.median(resampled) + sigma * rng.standard_normal((size, size))
            start = (size - n) // 2
            field[start : start + n, start : start + n] = resampled
            out[b] = field
    return out


def pixel_scale_02(rng: np.random.Generator, cube: NDArray) -> NDArray:
    return _resampled(cube, 0.2, rng)


def pixel_scale_05(rng: np.random.Generator, cube: NDArray) -> NDArray:
    return _resampled(cube, 0.5, rng)


def saturated_star(rng: np.random.Generator, cube: NDArray, *, fwhm_arcsec: float) -> NDArray:
    """A bright Moffat star, saturated at the training's level, near the centre."""
    data = np.array(cube, dtype=np.float64)
    size = data.shape[1]
    x0, y0 = (size - 1) / 2 + rng.uniform(-8, 8, size=2)
    y, x = np.mgrid[:size, :size]
    alpha = fwhm_arcsec / PIXEL_SCALE_ARCSEC / (2 * np.sqrt(2 ** (1 / _MOFFAT_BETA) - 1))
    profile = (1 + ((x - x0) ** 2 + (y - y0) ** 2) / alpha**2) ** (-_MOFFAT_BETA)
    profile *= (_MOFFAT_BETA - 1) / (np.pi * alpha**2)
    mag_r = rng.uniform(*_BRIGHT_STAR_MAG_R)
    level = rng.uniform(*SimulationConfig().saturation_flux)
    for b, band in enumerate(BANDS):
        flux = 10 ** (-0.4 * (mag_r + _STAR_COLOURS[band] - _ZERO_POINT))
        data[b] = np.minimum(data[b] + flux * profile, level)
    return data


_DERIVED = {
    "noise_only": noise_only,
    "permuted_bands": permuted_bands,
    "one_band_copied": one_band_copied,
    "magnitudes": magnitudes,
    "counts_offset": counts_offset,
    "pixel_scale_0.2": pixel_scale_02,
    "pixel_scale_0.5": pixel_scale_05,
}


def _source_config(data_dir: Path) -> SimulationConfig:
    """The default simulation config with the seed of ``data_dir``'s own, if it has one."""
    config_file = data_dir / CONFIG_FILE
    seed = SimulationConfig.seed
    if config_file.exists():
        seed = int(json.loads(config_file.read_text()).get("seed", seed))
    return replace(SimulationConfig(), seed=seed)


def _rerender(kind: str, base: SimulationConfig, n: int, out_dir: Path) -> None:
    if kind in _RERENDERED_SEEING:
        factor = _RERENDERED_SEEING[kind]
        bands = {
            name: replace(band, seeing_fwhm_arcsec=band.seeing_fwhm_arcsec * factor)
            for name, band in base.survey_bands.items()
        }
        config = replace(base, survey_bands=bands)
    else:
        kinds = base.artefact_kinds
        config = replace(base, artefact_probability=1.0, extra_artefact_mean=10.0 * len(kinds))
    simulate_dataset(replace(config, n_cutouts=n, shard_size=n), out_dir, workers=1)
    rows = load_dataset(out_dir).labels
    table = [
        {**{key: values[i] for key, values in rows.items() if key != "index"}, "ood_kind": kind}
        for i in range(n)
    ]
    _write_labels(out_dir / LABEL_FILE, table)


def write_ood_sets(
    data_dir: Path,
    out_dir: Path,
    *,
    n: int = 1000,
    seed: int = 0,
    kinds: tuple[str, ...] = OOD_KINDS,
) -> list[Path]:
    """Write each out-of-distribution kind from ``n`` cutouts of ``data_dir``.

    Derived kinds transform a random subset of ``n`` cutouts; re-rendered kinds
    simulate ``n`` cutouts with ``data_dir``'s seed and one thing changed.

    Parameters
    ----------
    data_dir : Path
        In-distribution simulated cutouts (:func:`training.dataset.simulate_dataset`).
    out_dir : Path
        One sub-folder per kind is written here.
    n : int
        Cutouts per kind (count).
    seed : int
        Seed of the derivations (permutations, noise, stars).
    kinds : tuple of str
        Which of ``OOD_KINDS`` to write.
    """
    unknown = sorted(set(kinds) - set(OOD_KINDS))
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; known: {list(OOD_KINDS)}")
    source = load_dataset(data_dir)
    n = min(n, len(source))
    # A random subset: each shard holds its lenses first.
    source = source.subset(np.sort(np.random.default_rng(seed).permutation(len(source))[:n]))
    written = []
    for k, kind in enumerate(kinds):
        kind_dir = out_dir / kind
        kind_dir.mkdir(parents=True, exist_ok=True)
        if kind in _RERENDERED_SEEING or kind == "heavy_artefacts":
            _rerender(kind, _source_config(data_dir), n, kind_dir)
            written.append(kind_dir)
            continue
        rng = np.random.default_rng([seed, k])
        if kind == "saturated_star":
            fwhm = source.labels["seeing_fwhm_arcsec_r"]
            images = [
                saturated_star(rng, cube, fwhm_arcsec=float(fwhm[i]))
                for i, cube in enumerate(source.images)
            ]
        else:
            images = [_DERIVED[kind](rng, cube) for cube in source.images]
        np.savez(kind_dir / "shard_0000.npz", images=np.stack(images).astype(np.float32))
        rows = [
            {
                **{key: v[i] for key, v in source.labels.items() if key != "index"},
                "ood_kind": kind,
                "source_index": i,
            }
            for i in range(n)
        ]
        _write_labels(kind_dir / LABEL_FILE, rows)
        written.append(kind_dir)
    (out_dir / "ood_sets.json").write_text(
        json.dumps({"source": str(data_dir), "n": n, "seed": seed, "kinds": list(kinds)}, indent=2)
        + "\n"
    )
    return written
