"""The one preprocessing step between a decoded cutout and a network input.

Training imports this module, so the service and the models can never disagree
on how pixels are normalised. Pure numpy; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

#: Identifier written into every model card; bump it when the maths changes.
PREPROCESSING_ID = "asinh_noise_v1"

#: Width of the border (pixels) whose median sets each band's background.
_BORDER_PIXELS = 4
#: Noise multiple at which the asinh stretch turns from linear to logarithmic.
_ASINH_SOFTENING_SIGMA = 3.0
#: Floor on the noise estimate, relative to the brightest pixel, for noiseless inputs.
_RELATIVE_NOISE_FLOOR = 1e-6


def masked_fraction(cube: NDArray[np.floating]) -> float:
    """Fraction (0-1) of non-finite pixels in a cutout of any shape."""
    return float(np.count_nonzero(~np.isfinite(cube)) / max(cube.size, 1))


def _border_median(band: NDArray[np.float64]) -> float:
    """Median of the finite pixels in the outer frame of one band."""
    inner = np.ones(band.shape, dtype=bool)
    inner[_BORDER_PIXELS:-_BORDER_PIXELS, _BORDER_PIXELS:-_BORDER_PIXELS] = False
    frame = band[inner]
    frame = frame[np.isfinite(frame)]
    return float(np.median(frame)) if frame.size else 0.0


def _robust_sigma(values: NDArray[np.float64]) -> float:
    """Gaussian-equivalent standard deviation from the median absolute deviation."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(finite - np.median(finite))))


def _neighbour_sum(padded: NDArray[np.float64]) -> NDArray[np.float64]:
    """Sum of the 4-neighbours of each pixel of a (bands, ny+2, nx+2) padded stack."""
    return padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]


def _fill_masked(data: NDArray[np.float64]) -> NDArray[np.float64]:
    """Masked (non-finite) pixels take the mean of their finite 4-neighbours.

    The fill grows inward from the mask's edge, one ring per step, so a bad
    column or a satellite trail is bridged by the light on either side instead
    of leaving a dark stripe through the deflector that no training image had.
    Pixels with no finite pixel anywhere in their band stay 0 (background).
    """
    known = np.isfinite(data)
    if known.all():
        return data
    filled = np.where(known, data, 0.0)
    for _ in range(sum(data.shape[1:])):
        values = np.pad(np.where(known, filled, 0.0), ((0, 0), (1, 1), (1, 1)))
        counts = np.pad(known.astype(np.float64), ((0, 0), (1, 1), (1, 1)))
        total, count = _neighbour_sum(values), _neighbour_sum(counts)
        grow = ~known & (count > 0)
        if not grow.any():
            break
        filled[grow] = total[grow] / count[grow]
        known |= grow
    return filled


@dataclass(frozen=True)
class BandLevels:
    """Each band's background and estimated noise, as the preprocessing measures them."""

    background: NDArray[np.float64]
    """Median of the finite pixels of each band's outer frame, shape (bands,) (flux units)."""
    noise_sigma: NDArray[np.float64]
    """Robust (MAD) noise of each background-subtracted band from its finite pixels, before
    any known noise level replaces it, shape (bands,) (flux units); 0 for an empty band."""


def preprocess_cutout(
    cube: NDArray[np.floating], *, noise_sigma: Sequence[float | None] | None = None
) -> NDArray[np.float32]:
    """Turn one band-ordered cutout into the network input.

    Each band loses its background (median of the border), the cube is divided
    by one noise scale shared by all bands (so colours survive) and passed
    through an asinh stretch. The result does not depend on the flux unit:
    multiplying ``cube`` by any positive constant leaves it unchanged up to
    float rounding. Masked (NaN/inf) pixels are left out of the background and
    noise estimates and then filled from their neighbours (:func:`_fill_masked`).

    Parameters
    ----------
    cube : ndarray, shape (n_bands, ny, nx)
        Linear fluxes in any unit, bands in the model's order (g, r, i).
    noise_sigma : sequence of (float or None), or None
        Per band, a known noise level (standard deviation, in the unit of
        ``cube``), e.g. from a survey's weight or RMS map; it replaces that
        band's estimate from the pixels before the bands' median is taken.
        None (the default), or a None entry, estimates it.

    Returns
    -------
    ndarray, shape (ny, nx, n_bands), float32
        Channels-last input in units of asinh(flux / (3 sigma_noise)).
    """
    return preprocess_cutout_with_levels(cube, noise_sigma=noise_sigma)[0]


def preprocess_cutout_with_levels(
    cube: NDArray[np.floating], *, noise_sigma: Sequence[float | None] | None = None
) -> tuple[NDArray[np.float32], BandLevels]:
    """:func:`preprocess_cutout`, and the band levels it measured on the way (one pass)."""
    data = np.asarray(cube, dtype=np.float64)
    if data.ndim != 3:
        raise ValueError(f"expected a (bands, ny, nx) cube, got shape {data.shape}")
    known = _known_noise(noise_sigma, data.shape[0])
    if min(data.shape[1:]) > 2 * _BORDER_PIXELS and np.isfinite(data).all():
        data, sigma, levels = _normalise_unmasked(data, known)
    else:
        data, sigma, levels = _normalise_masked(data, known)
    return _stretch(data, sigma), levels


def _stretch(data: NDArray[np.float64], sigma: float) -> NDArray[np.float32]:
    """Masked pixels filled, then the asinh stretch at 3 sigma, channels last."""
    data = _fill_masked(data)
    scaled = np.arcsinh(data / (_ASINH_SOFTENING_SIGMA * sigma))
    scaled[~np.isfinite(scaled)] = 0.0
    return np.ascontiguousarray(np.moveaxis(scaled, 0, -1), dtype=np.float32)


def _known_noise(
    noise_sigma: Sequence[float | None] | None, n_bands: int
) -> NDArray[np.float64] | None:
    """Known per-band noise levels as an array, NaN where unknown; None when none is known."""
    if noise_sigma is None:
        return None
    if len(noise_sigma) != n_bands:
        raise ValueError(f"expected {n_bands} noise levels, got {len(noise_sigma)}")
    known = np.array([np.nan if s is None else float(s) for s in noise_sigma])
    if np.any(known[np.isfinite(known)] <= 0) or np.isinf(known).any():
        raise ValueError(f"noise levels must be positive and finite, got {list(noise_sigma)}")
    return None if np.isnan(known).all() else known


def _with_known(
    band_sigmas: NDArray[np.float64], known: NDArray[np.float64] | None
) -> NDArray[np.float64]:
    """Each band's estimated noise, replaced where a known level is given."""
    return band_sigmas if known is None else np.where(np.isnan(known), band_sigmas, known)


def _normalise_masked(
    data: NDArray[np.float64], known: NDArray[np.float64] | None = None
) -> tuple[NDArray[np.float64], float, BandLevels]:
    """Background-subtracted bands, the shared noise scale and the band levels, masked pixels
    left out."""
    background = np.array([_border_median(band) for band in data])
    data = data - background[:, None, None]
    band_sigmas = np.array([_robust_sigma(band) for band in data])
    sigma = np.median(_with_known(band_sigmas, known))
    peak = float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 0.0
    return data, _noise_scale(float(sigma), peak), BandLevels(background, band_sigmas)


def _normalise_unmasked(
    data: NDArray[np.float64], known: NDArray[np.float64] | None = None
) -> tuple[NDArray[np.float64], float, BandLevels]:
    """:func:`_normalise_masked` for a cube without masked pixels, all bands at once.

    The same medians of the same values, without per-band copies and NaN
    filtering: the survey's usual cutout, in about two thirds of the time.
    """
    n_bands = data.shape[0]
    edge = _BORDER_PIXELS
    frame = np.concatenate(
        [
            data[:, :edge].reshape(n_bands, -1),
            data[:, -edge:].reshape(n_bands, -1),
            data[:, edge:-edge, :edge].reshape(n_bands, -1),
            data[:, edge:-edge, -edge:].reshape(n_bands, -1),
        ],
        axis=1,
    )
    background = _row_medians(frame)
    data = data - background[:, None, None]
    flat = data.reshape(n_bands, -1)
    estimated = 1.4826 * _row_medians(np.abs(flat - _row_medians(flat)[:, None]))
    band_sigmas = _with_known(estimated, known)
    sigma = _row_medians(band_sigmas[None, :])[0]  # np.median costs more on three values
    noise_scale = _noise_scale(float(sigma), float(np.max(np.abs(flat))))
    return data, noise_scale, BandLevels(background, estimated)


def _row_medians(rows: NDArray[np.float64]) -> NDArray[np.float64]:
    """Median of each row of finite values, as ``np.median(rows, axis=1)`` computes it.

    One partition of integer keys that order like the floats (:func:`_order_keys`):
    the same middle values, a third faster than partitioning floats, whose comparisons
    also have to place NaN. For an even count the lower middle value is the largest
    key left of the upper one: a maximum over half the row costs a fifth of what
    numpy's partition at two positions does.
    """
    keys = _order_keys(rows)
    middle = rows.shape[1] // 2
    part = np.partition(keys, middle, axis=1)
    high = _order_keys_to_floats(part[:, middle])
    if rows.shape[1] % 2:
        return high
    low = _order_keys_to_floats(part[:, :middle].max(axis=1))
    return (low + high) / 2.0


#: The bits of a float64 below its sign bit.
_BELOW_SIGN_BITS = np.int64(0x7FFF_FFFF_FFFF_FFFF)


def _order_keys(values: NDArray[np.float64]) -> NDArray[np.int64]:
    """int64 keys in the order of the finite float64 ``values`` (its own inverse).

    A non-negative IEEE double orders like its bits read as an integer; a negative one
    has its magnitude bits flipped, so larger magnitudes sort lower. Only -0.0 and 0.0,
    equal as floats, get distinct keys (-0.0 first), which can only change a zero's sign.
    """
    bits = np.ascontiguousarray(values, dtype=np.float64).view(np.int64)
    return bits ^ ((bits >> 63) & _BELOW_SIGN_BITS)


def _order_keys_to_floats(keys: NDArray[np.int64]) -> NDArray[np.float64]:
    """The float64 values of keys from :func:`_order_keys`."""
    return np.ascontiguousarray(keys ^ ((keys >> 63) & _BELOW_SIGN_BITS)).view(np.float64)


def _noise_scale(sigma: float, peak: float) -> float:
    """The noise unit of the stretch: ``sigma``, floored for noiseless inputs, never 0."""
    sigma = max(sigma, peak * _RELATIVE_NOISE_FLOOR)
    # An all-zero (or all-masked) cutout carries no signal; keep it zero.
    return sigma if sigma > 0.0 else 1.0


def noise_level(cube: NDArray[np.floating]) -> float:
    """The noise scale :func:`preprocess_cutout` divides by, in the cube's own flux unit.

    The median over bands of the robust (MAD) noise of each background-subtracted
    band. Unlike the network input it depends on the flux unit (AB zero point 30
    for the simulations), so it only compares cutouts of one survey and unit.
    """
    data = np.asarray(cube, dtype=np.float64)
    if min(data.shape[1:]) > 2 * _BORDER_PIXELS and np.isfinite(data).all():
        return _normalise_unmasked(data)[1]
    return _normalise_masked(data)[1]


#: Radius (pixels) of the central aperture of :func:`signal_to_noise`: 12 pixels are 3.2
#: arcsec at DES's 0.263 arcsec/pixel, the largest Einstein radius the models were trained on.
SIGNAL_TO_NOISE_RADIUS_PIXELS = 12.0


def signal_to_noise(images: NDArray[np.floating]) -> NDArray[np.float64]:
    """Signal-to-noise of the light in the central aperture of network inputs (dimensionless).

    The inputs are asinh(flux / (3 sigma)) (:func:`preprocess_cutout`), so the
    flux in noise units is 3 sinh(input): the sum over the aperture's pixels
    in all bands, divided by the square root of their number, is the aperture's
    signal-to-noise against the cutout's own noise level. Like the input, it
    does not depend on the flux unit; it tells a faint or shallow cutout from
    a bright or deep one, and is the noise axis of the MC model's per-regime
    interval calibration.

    Parameters
    ----------
    images : ndarray, shape (n, ny, nx, bands) or (ny, nx, bands)
        Network inputs, in asinh noise units.

    Returns
    -------
    ndarray, shape (n,) or ()
        Signal-to-noise of each cutout's central aperture.
    """
    data = np.asarray(images, dtype=np.float64)
    ny, nx = data.shape[-3:-1]
    y, x = np.ogrid[:ny, :nx]
    inside = (y - (ny - 1) / 2) ** 2 + (x - (nx - 1) / 2) ** 2 <= SIGNAL_TO_NOISE_RADIUS_PIXELS**2
    flux = 3.0 * np.sinh(data[..., inside, :])
    return flux.sum(axis=(-2, -1)) / np.sqrt(flux.shape[-2] * flux.shape[-1])


def preprocess_batch(cubes: NDArray[np.floating]) -> NDArray[np.float32]:
    """Apply :func:`preprocess_cutout` to a stack of shape (n, bands, ny, nx)."""
    return (
        np.stack([preprocess_cutout(cube) for cube in cubes])
        if len(cubes)
        else np.zeros(
            (0, *np.asarray(cubes).shape[2:], np.asarray(cubes).shape[1]), dtype=np.float32
        )
    )
