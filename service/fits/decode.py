"""Decode an uploaded FITS cutout into a band-ordered float32 cube.

Accepted layouts (one of each in ``examples/cutouts/formats``):

- an image cube in the primary HDU or the first image extension, its planes
  named in order by the ``BANDS`` keyword (``'g,r,i'``; g, r, i when absent);
- an image cube whose planes are named by ``BAND0``, ``BAND1``, ... (Legacy
  Survey); a cube with more planes than the model needs (g, r, i, z) gives
  the planes it names;
- one 2D image extension per band, the band named by ``FILTER`` or ``BAND``
  (``'r'``, ``'DECam r'``, ``'DECAM_g'``, ``'DES_G'``, ``'r DECam SDSS c0002
  6415.0 1480.0'``) or else by ``EXTNAME`` (``G``, ``R``, ``I``, ``DES_G_BGSUB``);
  beside each band's science image (``EXTNAME`` like ``SCI``, ``IMAGE``,
  ``FLUX``, ``BGSUB``, or no such word) the file may hold its mask
  (``MSK``/``MASK``/``FLAGS``: nonzero pixels are masked), weight
  (``WGT``/``WEIGHT``/``IVAR``), noise (``RMS``/``SIGMA``/``ERR``) or variance
  (``VAR``) map, and PSF (``PSF``, ignored), and images of bands the model does
  not use (z, Y, VIS, NIR...), which are ignored (Euclid MER cutouts, DES coadds);
- one file per band (:func:`decode_band_files`), each holding that band's
  science image and its ancillary extensions as above;
- either of these gzip-compressed, or with tile-compressed (e.g. RICE) image
  HDUs, with any BITPIX and BSCALE/BZERO/BLANK.

Every input is hostile until proven otherwise: the decompressed size, the
header lengths and the image sizes are checked against
:class:`~service.fits.raw.FitsLimits` (:mod:`service.fits.raw`) before astropy
parses or reads them, and whatever astropy raises is wrapped,
so :func:`decode_fits` raises only :class:`~service.errors.LensServeError`
subclasses whatever the bytes.
"""

import io
import itertools
import math
import re
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS
from numpy.typing import NDArray

from service.errors import (
    BandMismatchError,
    CutoutTooSmallError,
    InvalidFitsError,
    LensServeError,
    NoImageDataError,
    PayloadTooLargeError,
    PixelScaleMismatchError,
    TooManyMaskedPixelsError,
)
from service.fits.plain import read_plain_primary
from service.fits.raw import (
    ACCEPTED_LAYOUTS,
    BITPIX_VALUES,
    DEFAULT_LIMITS,
    FITS_MAGIC,
    IDENTITY_ENCODINGS,
    MAX_HDUS,
    FitsLimits,
    check_axis_counts,
    check_header_lengths,
    check_signature,
    decompress,
)
from service.fits.tan_wcs import TanWcs, simple_tan_wcs

#: Plane order assumed for a cube without a ``BANDS`` keyword.
DEFAULT_CUBE_BANDS = ("g", "r", "i")
#: Largest relative difference between the WCS and the model pixel scales (DES: 0.263 arcsec).
PIXEL_SCALE_TOLERANCE = 0.02
#: Header keywords naming the band of a 2D image, in order of preference (EXTNAME is the fallback).
BAND_KEYWORDS = ("FILTER", "BAND")
#: Single-letter survey bands recognised inside FILTER values such as 'DECam r'.
KNOWN_BANDS = frozenset("ugrizy")
_BAND_SEPARATORS = re.compile(r"[\s,;:/_.'\"()\[\]-]+")
#: EXTNAME words (case-insensitive) that say what a 2D image holds. An image with none
#: of them is a science image; so is one whose band is all its EXTNAME says (``G``).
ROLE_WORDS: dict[str, frozenset[str]] = {
    "science": frozenset({"SCI", "SCIENCE", "IMAGE", "IMG", "FLUX", "BGSUB", "DATA"}),
    "mask": frozenset({"MSK", "MASK", "FLAGS", "FLAG", "BPM", "DQ"}),
    "weight": frozenset({"WGT", "WEIGHT", "WHT", "IVAR", "INVVAR"}),
    "rms": frozenset({"RMS", "SIGMA", "ERR", "ERROR", "NOISE", "STD"}),
    "variance": frozenset({"VAR", "VARIANCE"}),
    "psf": frozenset({"PSF"}),
}
#: Roles whose image sets a band's noise level, in order of preference.
NOISE_ROLES = ("rms", "weight", "variance")
#: Largest distance (pixels) between where two bands' WCSs put the cutout centre.
MAX_BAND_OFFSET_PIXELS = 0.5
#: ``warnings.catch_warnings`` swaps process-wide state; concurrent decodes in worker
#: threads must not interleave their save/restore, or the filters end up wrong for good.
_WARNINGS_LOCK = threading.Lock()


@dataclass(frozen=True)
class DecodedCutout:
    """A decoded cutout, ready for :func:`service.contract.preprocessing.preprocess_cutout`.

    Parameters
    ----------
    pixels : ndarray of float32, shape (n_bands, size_pixels, size_pixels)
        Linear fluxes in the file's unit, bands in the requested order;
        masked pixels (NaN, infinite or BLANK) are NaN. C-contiguous, native
        byte order.
    masked_fraction : float
        Fraction (0-1) of ``pixels`` that is masked.
    ra_deg, dec_deg : float or None
        ICRS right ascension and declination (degrees) of the cutout centre,
        from the file's celestial WCS; None without a usable one.
    warnings : tuple of str
        What the decoder changed or assumed, for a person to read.
    noise_sigma : tuple of (float or None), or None
        Per band, the noise level (standard deviation, in the file's flux
        unit) that a weight, RMS or variance map gives; None where the
        preprocessing is to estimate it from the pixels.
    """

    pixels: NDArray[np.float32]
    masked_fraction: float
    ra_deg: float | None
    dec_deg: float | None
    warnings: tuple[str, ...]
    noise_sigma: tuple[float | None, ...] | None = None


@dataclass(frozen=True)
class _Image:
    """An image HDU with data: its position, and its shape in numpy order."""

    index: int
    hdu: fits.PrimaryHDU | fits.ImageHDU | None  # None: read by service.fits.plain
    header: Mapping[str, object]
    full_shape: tuple[int, ...]
    shape: tuple[int, ...]  # full_shape without leading length-1 axes, at least 2D


@dataclass(frozen=True)
class _Ancillary:
    """An image that goes with a band's science image: its role (mask, weight, rms,
    variance) and a name for messages (``'DES_G_RMS (HDU 5)'``)."""

    role: str
    image: _Image
    name: str


@dataclass(frozen=True)
class _Selection:
    """Where each requested band lives: an image and a plane (None for a 2D image)."""

    planes: tuple[tuple[_Image, int | None], ...]
    header: Mapping[str, object]  # carries the WCS of the selected pixels
    warnings: tuple[str, ...]
    #: Per band, its mask and noise images (empty for a cube).
    ancillaries: tuple[tuple[_Ancillary, ...], ...] = ()
    #: Per band, where its science image is, for messages; set when bands come from
    #: separate 2D images, whose WCSs must then agree.
    sources: tuple[str, ...] = field(default=())

    @property
    def image_shape(self) -> tuple[int, int]:
        """(ny, nx) of every band (pixels)."""
        ny, nx = self.planes[0][0].shape[-2:]
        return ny, nx


@dataclass(frozen=True)
class _Target:
    """What the caller asked for: bands in order, cutout side (pixels), pixel scale
    (arcsec/pixel) and the limits."""

    bands: tuple[str, ...]
    size_pixels: int
    pixel_scale_arcsec: float
    limits: FitsLimits


def decode_fits(
    data: bytes,
    *,
    bands: Sequence[str] = DEFAULT_CUBE_BANDS,
    size_pixels: int = 64,
    pixel_scale_arcsec: float = 0.263,
    limits: FitsLimits = DEFAULT_LIMITS,
    content_encoding: str | None = None,
) -> DecodedCutout:
    """Decode one FITS cutout into a band-ordered float32 cube.

    Parameters
    ----------
    data : bytes
        The file as received: FITS, or gzip-compressed FITS (sniffed from
        its magic bytes 1f 8b).
    bands : sequence of str
        Band names the model needs, in its input order (case-insensitive).
    size_pixels : int
        Side of the square cutout the model takes (pixels). Larger images are
        centre-cropped: with an odd excess the extra row or column is dropped
        from the high-index end (top or right in the usual display).
    pixel_scale_arcsec : float
        Pixel scale the model was trained at (arcsec/pixel); a celestial WCS
        that differs by more than :data:`PIXEL_SCALE_TOLERANCE` is refused.
    limits : FitsLimits
        Caps on decompressed size (bytes), pixels per image, header cards and
        masked fraction.
    content_encoding : str or None
        HTTP ``Content-Encoding`` the bytes came with: ``gzip``, ``identity``
        or None.

    Returns
    -------
    DecodedCutout
        Pixels of shape (len(bands), size_pixels, size_pixels), the masked
        fraction, the centre's RA/Dec (degrees) and warnings.

    Raises
    ------
    InvalidFitsError
        Not FITS, truncated or corrupt, or a declared gzip body that is not.
    NoImageDataError
        No image HDU with data (e.g. only tables), or an image that is
        neither 2D nor a cube.
    BandMismatchError
        The bands present are not those the model needs.
    CutoutTooSmallError
        The image is smaller than ``size_pixels`` on an axis.
    PixelScaleMismatchError
        The WCS pixel scale is not ``pixel_scale_arcsec`` within 2%.
    TooManyMaskedPixelsError
        More than ``limits.max_masked_fraction`` of the cutout, or a whole
        band, is masked.
    PayloadTooLargeError
        Over a limit in ``limits``, or more than :data:`MAX_HDUS` HDUs.
    UnsupportedMediaTypeError
        A ``content_encoding`` other than gzip or identity.
    ValueError
        Invalid ``bands``, ``size_pixels`` or ``pixel_scale_arcsec``: a
        programming error, not a property of the file.
    """
    wanted = _normalise_bands(bands)
    _check_geometry(size_pixels, pixel_scale_arcsec)
    raw = decompress(bytes(data), content_encoding=content_encoding, limits=limits)
    check_signature(raw)
    target = _Target(wanted, size_pixels, pixel_scale_arcsec, limits)
    decoded = _decode_plain_cube(raw, target)
    if decoded is not None:
        return decoded
    # Guards for astropy, which loops over what headers claim (the plain reader reads
    # at most max_header_cards cards and three axes, so needs none of them).
    check_axis_counts(raw)
    check_header_lengths(raw, limits)
    return _decode_with_astropy(raw, target)


def _decode_plain_cube(raw: bytes, target: _Target) -> DecodedCutout | None:
    """The survey's usual layout, read without astropy; None for any other file.

    Same checks, warnings and pixels as :func:`_decode_with_astropy` (tests compare the two);
    a WCS that is not plain TAN is left to astropy with the rest of the file.
    """
    limits, size = target.limits, target.size_pixels
    primary = read_plain_primary(
        raw, max_cards=limits.max_header_cards, max_pixels=limits.max_pixels
    )
    if primary is None:
        return None
    header = primary.header
    has_wcs = any(key.startswith("CTYPE") for key in header)
    plain_tan = simple_tan_wcs(header) if has_wcs else None
    if has_wcs and plain_tan is None:
        return None
    shape = primary.data.shape
    cube = _Image(index=0, hdu=None, header=header, full_shape=shape, shape=shape)
    selection = _select_cube_planes(cube, target.bands)
    y0, x0, crop_warnings = _crop_origin(selection.image_shape, size)
    planes = [plane for _, plane in selection.planes]
    pixels = np.ascontiguousarray(
        primary.data[planes, y0 : y0 + size, x0 : x0 + size], dtype=np.float32
    )
    return _finish(pixels, selection, crop_warnings, (y0, x0), target, plain_tan=plain_tan)


def _decode_with_astropy(raw: bytes, target: _Target) -> DecodedCutout:
    """Any accepted layout, parsed by astropy (compressed HDUs, extensions, scaled integers)."""
    with _astropy_quietly(), _open_fits(raw) as hdul:
        images, descriptions = _read_images(hdul, target.limits)
        fallback = _primary_band(hdul, target.bands)
        selection = _select_bands(images, descriptions, target.bands, fallback_band=fallback)
        return _cut_out(selection, target)


def _cut_out(selection: _Selection, target: _Target) -> DecodedCutout:
    """The selected bands cropped, their masks and noise maps applied, and checked."""
    y0, x0, crop_warnings = _crop_origin(selection.image_shape, target.size_pixels)
    pixels = _read_cutout(selection, y0=y0, x0=x0, size_pixels=target.size_pixels)
    noise_sigma, ancillary_warnings = _apply_ancillaries(
        pixels, selection, y0=y0, x0=x0, bands=target.bands
    )
    return _finish(
        pixels,
        selection,
        [*crop_warnings, *ancillary_warnings],
        (y0, x0),
        target,
        noise_sigma=noise_sigma,
    )


def _finish(
    pixels: NDArray[np.float32],
    selection: _Selection,
    crop_warnings: list[str],
    origin: tuple[int, int],
    target: _Target,
    *,
    plain_tan: TanWcs | None = None,
    noise_sigma: tuple[float | None, ...] | None = None,
) -> DecodedCutout:
    """Masked pixels as NaN, the centre's sky position (``origin``: the crop's (y0, x0) in
    pixels) and the checks on both."""
    pixels[~np.isfinite(pixels)] = np.nan
    centre = (target.size_pixels - 1) / 2
    x, y = origin[1] + centre, origin[0] + centre
    ra_deg, dec_deg, wcs_warnings = _centre_sky_position(
        selection.header,
        x=x,
        y=y,
        pixel_scale_arcsec=target.pixel_scale_arcsec,
        plain_tan=plain_tan,
    )
    if selection.sources:
        wcs_warnings = [*wcs_warnings, *_check_band_alignment(selection, target.bands, x=x, y=y)]
    masked_fraction, mask_warnings = _check_masked(
        pixels, target.bands, target.limits.max_masked_fraction
    )
    return DecodedCutout(
        pixels=pixels,
        masked_fraction=masked_fraction,
        ra_deg=ra_deg,
        dec_deg=dec_deg,
        warnings=(*selection.warnings, *crop_warnings, *wcs_warnings, *mask_warnings),
        noise_sigma=noise_sigma,
    )


@dataclass(frozen=True)
class BandFile:
    """One band's file in a request: its bytes as received, its name (for messages) and
    the HTTP ``Content-Encoding`` it came with (``gzip`` or None)."""

    data: bytes
    filename: str
    content_encoding: str | None = None


def decode_band_files(
    files: Mapping[str, BandFile],
    *,
    bands: Sequence[str] = DEFAULT_CUBE_BANDS,
    size_pixels: int = 64,
    pixel_scale_arcsec: float = 0.263,
    limits: FitsLimits = DEFAULT_LIMITS,
) -> DecodedCutout:
    """Decode one object sent as one FITS file per band into a band-ordered float32 cube.

    Each file holds its band's science image (the only 2D image, or the one
    whose EXTNAME says SCI, IMAGE, FLUX or BGSUB) and optionally its mask,
    weight, RMS, variance and PSF extensions, read as :func:`decode_fits` reads
    them in a multi-band file. The bands must share one pixel grid: equal
    sizes, and WCSs that put the cutout centre within
    :data:`MAX_BAND_OFFSET_PIXELS` of each other.

    Parameters
    ----------
    files : mapping of str to BandFile
        One file per band the model needs, keyed by band name (case-insensitive).
    bands, size_pixels, pixel_scale_arcsec, limits
        As for :func:`decode_fits`.

    Returns
    -------
    DecodedCutout
        As :func:`decode_fits` returns it.

    Raises
    ------
    BandMismatchError
        A band missing, one the model does not use, a file whose FILTER, BAND
        or EXTNAME names another band, band images of different sizes, or
        WCSs that disagree. Every error names the band and file it concerns.
    LensServeError
        Whatever :func:`decode_fits` raises for one of the files.
    """
    wanted = _normalise_bands(bands)
    _check_geometry(size_pixels, pixel_scale_arcsec)
    given = _band_files_by_name(files, wanted)
    target = _Target(wanted, size_pixels, pixel_scale_arcsec, limits)
    raws: dict[str, bytes] = {}
    for band in wanted:
        with _naming_file(band, given[band].filename):
            raws[band] = _checked_raw(given[band], limits)
    with _astropy_quietly(), ExitStack() as stack:
        parts: list[_BandPart] = []
        for band in wanted:
            with _naming_file(band, given[band].filename):
                hdul = stack.enter_context(_open_fits(raws[band]))
                parts.append(
                    _band_file_part(hdul, band=band, filename=given[band].filename, target=target)
                )
        return _cut_out(_join_band_parts(parts, wanted), target)


def _band_files_by_name(
    files: Mapping[str, BandFile], wanted: tuple[str, ...]
) -> dict[str, BandFile]:
    """``files`` keyed by lower-case band; BandMismatchError unless they are the model's bands."""
    given: dict[str, BandFile] = {}
    for name, band_file in files.items():
        band = str(name).strip().lower()
        if band in given:
            raise BandMismatchError(
                f"got band {band} twice ({given[band].filename!r}, {band_file.filename!r}); "
                f"send one file per band ({_join(wanted)})"
            )
        given[band] = band_file
    missing = [band for band in wanted if band not in given]
    unknown = sorted(band for band in given if band not in wanted)
    if missing or unknown:
        problems = [f"missing {_join(missing)}"] if missing else []
        problems += [f"{_join(unknown)} not used by the model"] if unknown else []
        raise BandMismatchError(
            f"got files for bands {_join(given)}; the model needs one file for each of "
            f"{_join(wanted)} ({'; '.join(problems)})"
        )
    return given


@contextmanager
def _naming_file(band: str, filename: str) -> Iterator[None]:
    """Prefix the message of a LensServeError raised inside with the band and file it concerns."""
    try:
        yield
    except LensServeError as exc:
        raise type(exc)(f"band {band} ({filename!r}): {exc.message}") from exc


def _checked_raw(band_file: BandFile, limits: FitsLimits) -> bytes:
    """A band file decompressed and past the guards astropy needs."""
    raw = decompress(
        bytes(band_file.data), content_encoding=band_file.content_encoding, limits=limits
    )
    check_signature(raw)
    check_axis_counts(raw)
    check_header_lengths(raw, limits)
    return raw


@dataclass(frozen=True)
class _BandPart:
    """One band's science image, its ancillary images and what is said about them."""

    band: str
    science: _Image
    ancillaries: tuple[_Ancillary, ...]
    source: str
    warnings: tuple[str, ...]


def _band_file_part(hdul: fits.HDUList, *, band: str, filename: str, target: _Target) -> _BandPart:
    """The science image of the one band in ``hdul``, with its mask and noise images."""
    images, descriptions = _read_images(hdul, target.limits)
    primary = _header(_hdu_at(hdul, 0), 0)
    for index, header in [(0, primary), *((image.index, image.header) for image in images)]:
        for key in (*BAND_KEYWORDS, "EXTNAME"):
            value = _header_value(header, key, index)
            other = _band_from_text(value, target.bands)
            if other is not None and other != band:
                raise BandMismatchError(
                    f"got this file as band {band}, but its HDU {index} has {key} = {value!r} "
                    f"(band {other}); send each file under the band it holds"
                )
    flat = [image for image in images if len(image.shape) == 2]
    science = [image for image in flat if _role_of(image) == "science"]
    if not science:
        raise NoImageDataError(
            f"got no 2D science image ({', '.join(descriptions)}); a band's file holds one 2D "
            "image, optionally with MSK, WGT, RMS, VAR and PSF extensions (a cube goes in the "
            "files field)"
        )
    if len(science) > 1:
        raise BandMismatchError(
            f"got {len(science)} science images ({_join(map(_image_name, science))}); a band's "
            "file holds one, and its other extensions need an EXTNAME saying what they hold "
            "(MSK, WGT, RMS, VAR or PSF)"
        )
    extras = [
        _Ancillary(role, image, _image_name(image))
        for image in flat
        if (role := _role_of(image)) not in ("science", "psf")
    ]
    psfs = [_image_name(image) for image in flat if _role_of(image) == "psf"]
    return _BandPart(
        band=band,
        science=science[0],
        ancillaries=_band_ancillaries(band, science=science[0], extras=extras),
        source=f"{filename} {_image_name(science[0])}",
        warnings=(f"band {band}: ignored the PSF image {_join(psfs)}",) if psfs else (),
    )


def _join_band_parts(parts: list[_BandPart], wanted: tuple[str, ...]) -> _Selection:
    """One selection of the bands' science images, which must be of one size."""
    _check_equal_sizes([(part.band, part.science) for part in parts])
    return _Selection(
        planes=tuple((part.science, None) for part in parts),
        header=parts[0].science.header,
        warnings=tuple(warning for part in parts for warning in part.warnings),
        ancillaries=tuple(part.ancillaries for part in parts),
        sources=tuple(part.source for part in parts),
    )


def decode_plain_fits(
    data: bytes,
    *,
    bands: Sequence[str] = DEFAULT_CUBE_BANDS,
    size_pixels: int = 64,
    pixel_scale_arcsec: float = 0.263,
    limits: FitsLimits = DEFAULT_LIMITS,
    content_encoding: str | None = None,
) -> DecodedCutout | None:
    """:func:`decode_fits` for an uncompressed plain float cube, without astropy; else None.

    Pure Python and numpy on bytes whose structure has been checked, so it may
    run beside the server (no native code parses the file); every other file,
    gzip-compressed ones included, gives None and is :func:`decode_fits`'s.
    Raises what :func:`decode_fits` raises for the same bytes.
    """
    wanted = _normalise_bands(bands)
    _check_geometry(size_pixels, pixel_scale_arcsec)
    encoding = (content_encoding or "").strip().lower()
    if encoding not in IDENTITY_ENCODINGS or len(data) > limits.max_decompressed_bytes:
        return None
    if not bytes(data[: len(FITS_MAGIC)]) == FITS_MAGIC:
        return None
    return _decode_plain_cube(bytes(data), _Target(wanted, size_pixels, pixel_scale_arcsec, limits))


# --------------------------------------------------------------------------- arguments


def _normalise_bands(bands: Sequence[str]) -> tuple[str, ...]:
    """Lower-case, stripped band names; ValueError for an empty or repeated list."""
    if isinstance(bands, str):
        raise ValueError(f"bands must be a sequence of names, not the string {bands!r}")
    wanted = tuple(str(band).strip().lower() for band in bands)
    if not wanted or "" in wanted or len(set(wanted)) != len(wanted):
        raise ValueError(f"bands must be distinct, non-empty names; got {list(bands)}")
    return wanted


def _check_geometry(size_pixels: int, pixel_scale_arcsec: float) -> None:
    """ValueError unless the cutout side (pixels) and pixel scale (arcsec) make sense."""
    if size_pixels < 1:
        raise ValueError(f"size_pixels must be at least 1, got {size_pixels}")
    if not (math.isfinite(pixel_scale_arcsec) and pixel_scale_arcsec > 0):
        raise ValueError(f"pixel_scale_arcsec must be positive, got {pixel_scale_arcsec}")


# --------------------------------------------------------------------------- astropy


@contextmanager
def _astropy_quietly() -> Iterator[None]:
    """Silence astropy's and numpy's warnings about odd files: the result reports what matters.

    Warnings turned into errors (``-W error``) would otherwise make a readable
    file fail; numpy's error state is thread-local, the warnings filters are
    not, hence the lock.
    """
    with _WARNINGS_LOCK, warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


def _reason(exc: BaseException) -> str:
    """A third-party exception, short enough for a client message."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:197] + "..."


def _open_fits(raw: bytes) -> fits.HDUList:
    """An HDU list over ``raw`` that parses each HDU only when it is reached."""
    try:
        return fits.open(
            io.BytesIO(raw),
            mode="readonly",
            memmap=False,
            lazy_load_hdus=True,
            cache=False,
            uint=False,  # BZERO = 2**15 etc. scale to floats like any other BZERO
        )
    except Exception as exc:  # astropy raises OSError, ValueError, TypeError, ... on bad bytes
        raise InvalidFitsError(
            f"got {len(raw)} bytes that astropy cannot read as FITS ({_reason(exc)}); "
            f"{ACCEPTED_LAYOUTS}"
        ) from exc


def _read_images(hdul: fits.HDUList, limits: FitsLimits) -> tuple[list[_Image], list[str]]:
    """The image HDUs with data, and a description of every HDU, after the size checks."""
    images: list[_Image] = []
    descriptions: list[str] = []
    for index in itertools.count():
        hdu = _hdu_at(hdul, index)
        if hdu is None:
            break
        if index == MAX_HDUS:
            raise PayloadTooLargeError(
                f"got a FITS file of more than {MAX_HDUS} HDUs; at most {MAX_HDUS} are accepted"
            )
        image = _as_image(hdu, index, limits)
        if image is not None:
            images.append(image)
        descriptions.append(f"HDU {index} {_describe_hdu(hdu, image)}")
    return images, descriptions


def _hdu_at(hdul: fits.HDUList, index: int) -> fits.hdu.base._BaseHDU | None:
    """HDU ``index``, parsed now; None past the last one."""
    try:
        return hdul[index]
    except IndexError:
        return None
    except Exception as exc:
        raise InvalidFitsError(
            f"got a FITS file whose HDU {index} cannot be read ({_reason(exc)}); {ACCEPTED_LAYOUTS}"
        ) from exc


def _describe_hdu(hdu: fits.hdu.base._BaseHDU, image: _Image | None) -> str:
    """What an HDU holds, in a few words."""
    if image is not None:
        return f"({type(hdu).__name__}, {'x'.join(map(str, image.full_shape))} image)"
    if _is_image_hdu(hdu):
        return f"({type(hdu).__name__} without data)"
    return f"({type(hdu).__name__})"


def _is_image_hdu(hdu: object) -> bool:
    """Whether ``hdu`` is an image (plain or tile-compressed), not a table or random groups."""
    return isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU) and not isinstance(hdu, fits.GroupsHDU)


def _as_image(hdu: fits.hdu.base._BaseHDU, index: int, limits: FitsLimits) -> _Image | None:
    """``hdu`` as an image with data after the header checks; None for a table or no data."""
    header = _header(hdu, index)
    if len(header) > limits.max_header_cards:
        raise PayloadTooLargeError(
            f"got a header (HDU {index}) of {len(header)} cards; at most "
            f"{limits.max_header_cards} cards per header are accepted"
        )
    if not _is_image_hdu(hdu):
        return None
    bitpix = _header_int(header, "BITPIX", index)
    if bitpix not in BITPIX_VALUES:
        raise InvalidFitsError(
            f"got BITPIX = {bitpix} in HDU {index}; FITS allows {sorted(BITPIX_VALUES)}"
        )
    naxis = _header_int(header, "NAXIS", index)
    if not 0 <= naxis <= 999:
        raise InvalidFitsError(f"got NAXIS = {naxis} in HDU {index}; FITS allows 0 to 999")
    full_shape = tuple(_header_int(header, f"NAXIS{axis}", index) for axis in range(naxis, 0, -1))
    if not full_shape or min(full_shape) <= 0:
        return None
    pixels = math.prod(full_shape)
    if pixels > limits.max_pixels:
        raise PayloadTooLargeError(
            f"got a {' x '.join(map(str, full_shape))} image in HDU {index} ({pixels} pixels "
            f"of BITPIX {bitpix}); at most {limits.max_pixels} pixels per image are accepted"
        )
    shape = full_shape
    while len(shape) > 2 and shape[0] == 1:
        shape = shape[1:]
    return _Image(index=index, hdu=hdu, header=header, full_shape=full_shape, shape=shape)


def _header(hdu: fits.hdu.base._BaseHDU, index: int) -> fits.Header:
    """The header of ``hdu``; InvalidFitsError when astropy cannot build it."""
    try:
        return hdu.header
    except Exception as exc:
        raise InvalidFitsError(
            f"got a FITS file whose HDU {index} header cannot be read ({_reason(exc)}); "
            f"{ACCEPTED_LAYOUTS}"
        ) from exc


def _header_value(header: Mapping[str, object], key: str, index: int) -> object:
    """The value of keyword ``key``, None when absent; InvalidFitsError when unparsable."""
    try:
        return header.get(key)
    except Exception as exc:  # astropy parses card values lazily: VerifyError, ValueError, ...
        raise InvalidFitsError(
            f"got a header (HDU {index}) whose {key} card cannot be parsed ({_reason(exc)})"
        ) from exc


def _header_int(header: fits.Header, key: str, index: int) -> int:
    """Integer keyword ``key``; InvalidFitsError when missing or not an integer."""
    value = _header_value(header, key, index)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidFitsError(f"got {key} = {value!r} in HDU {index}; it must be an integer")
    return value


# --------------------------------------------------------------------------- bands


def _select_bands(
    images: list[_Image],
    descriptions: list[str],
    wanted: tuple[str, ...],
    *,
    fallback_band: str | None = None,
) -> _Selection:
    """Where each wanted band is: planes of the first image cube, or 2D image extensions."""
    if not images:
        raise NoImageDataError(
            f"got a FITS file with no image data: {', '.join(descriptions)}; {ACCEPTED_LAYOUTS}"
        )
    first = images[0]
    if len(first.shape) == 3:
        return _select_cube_planes(first, wanted)
    if len(first.shape) == 2:
        return _select_band_images(
            [image for image in images if len(image.shape) == 2],
            wanted,
            fallback_band=fallback_band,
        )
    raise NoImageDataError(
        f"got a {len(first.full_shape)}-dimensional image of shape "
        f"{'x'.join(map(str, first.full_shape))} in HDU {first.index}; {ACCEPTED_LAYOUTS}"
    )


def _select_cube_planes(cube: _Image, wanted: tuple[str, ...]) -> _Selection:
    """The planes of ``cube`` holding the wanted bands, by its BANDS or BAND0..BANDn keywords."""
    n_planes = cube.shape[0]
    named = _header_value(cube.header, "BANDS", cube.index)
    warnings_: tuple[str, ...] = ()
    if isinstance(named, str) and named.strip():
        names = [
            _canonical_band(name, wanted) for name in re.split(r"[\s,;]+", named.strip()) if name
        ]
        if len(names) != n_planes:
            raise BandMismatchError(
                f"got a {n_planes}-plane cube whose BANDS keyword {named!r} names {len(names)} "
                f"bands; the model needs {_join(wanted)}, one plane each"
            )
    elif (numbered := _numbered_plane_names(cube)) is not None:
        first, values = numbered
        if len(values) != n_planes:
            raise BandMismatchError(
                f"got a {n_planes}-plane cube whose BAND{first}.. keywords name {len(values)} "
                f"plane{'' if len(values) == 1 else 's'} ({_join(values)}); name every plane, "
                f"BAND{first} to BAND{first + n_planes - 1}"
            )
        names = [_canonical_band(value, wanted) for value in values]
    elif n_planes == len(DEFAULT_CUBE_BANDS):
        names = list(DEFAULT_CUBE_BANDS)
        warnings_ = (f"no BANDS keyword: assumed the planes are {_join(DEFAULT_CUBE_BANDS)}",)
    else:
        raise BandMismatchError(
            f"got a {n_planes}-plane cube without a BANDS keyword; the model needs "
            f"{_join(wanted)} (a {len(DEFAULT_CUBE_BANDS)}-plane cube is read as "
            f"{_join(DEFAULT_CUBE_BANDS)}; otherwise name the planes in BANDS or BAND0..BANDn)"
        )
    repeated = sorted({name for name in names if names.count(name) > 1 and name in wanted})
    missing = [band for band in wanted if band not in names]
    if missing or repeated:
        problem = f"missing {_join(missing)}" if missing else f"{_join(repeated)} repeated"
        raise BandMismatchError(
            f"got {_count_bands(names)}; the model needs {_join(wanted)} ({problem})"
        )
    planes = tuple((cube, names.index(band)) for band in wanted)
    return _Selection(planes=planes, header=cube.header, warnings=warnings_)


def _numbered_plane_names(cube: _Image) -> tuple[int, list[str]] | None:
    """(first number, values) of a cube's BAND0, BAND1, ... (or BAND1, BAND2, ...) keywords
    in sequence; None when neither BAND0 nor BAND1 is a name."""
    for first in (0, 1):
        values: list[str] = []
        for number in itertools.count(first):
            value = _header_value(cube.header, f"BAND{number}", cube.index)
            if not (isinstance(value, str) and value.strip()) or number >= first + MAX_HDUS:
                break
            values.append(value.strip())
        if values:
            return first, values
    return None


def _canonical_band(name: str, wanted: tuple[str, ...]) -> str:
    """The band a plane name stands for ('DECAM_g' -> 'g'); else the name, lower-case."""
    return _band_from_text(name, wanted) or name.strip().lower()


def _select_band_images(
    images: list[_Image], wanted: tuple[str, ...], *, fallback_band: str | None = None
) -> _Selection:
    """One 2D science image per wanted band, by FILTER, BAND or EXTNAME, with its mask,
    weight, RMS or variance image; PSFs and the bands the model does not use are left."""
    science: dict[str, list[_Image]] = {}
    extras: dict[str, list[_Ancillary]] = {}
    psfs: list[str] = []
    labels: list[str] = []
    for image in images:
        band = _band_of(image, wanted) or fallback_band
        role = _role_of(image)
        labels.append(
            f"HDU {image.index}: {band or 'no band named'}{'' if role == 'science' else ' ' + role}"
        )
        if band not in wanted:
            continue  # no band named, or one the model does not use (z, Y, VIS, NIR...)
        if role == "science":
            science.setdefault(band, []).append(image)
        elif role == "psf":
            psfs.append(_image_name(image))
        else:
            extras.setdefault(band, []).append(_Ancillary(role, image, _image_name(image)))
    missing = [band for band in wanted if band not in science]
    if missing:
        raise BandMismatchError(
            f"got {len(images)} 2D image{'' if len(images) == 1 else 's'} ({', '.join(labels)}); "
            f"the model needs {_join(wanted)}, as a cube or as one 2D image per band named by "
            f"FILTER, BAND or EXTNAME (missing {_join(missing)})"
        )
    for band in wanted:
        if len(science[band]) > 1:
            raise BandMismatchError(
                f"got band {band} in {len(science[band])} HDUs, each read as its science image "
                f"({_join(map(_image_name, science[band]))}); each band the model needs "
                f"({_join(wanted)}) must appear once, and other extensions of a band need an "
                "EXTNAME saying what they hold (MSK, WGT, RMS, VAR or PSF)"
            )
    chosen = [science[band][0] for band in wanted]
    _check_equal_sizes(list(zip(wanted, chosen, strict=True)))
    ancillaries = tuple(
        _band_ancillaries(band, science=image, extras=extras.get(band, []))
        for band, image in zip(wanted, chosen, strict=True)
    )
    return _Selection(
        planes=tuple((image, None) for image in chosen),
        header=chosen[0].header,
        warnings=(f"ignored the PSF images {_join(psfs)}",) if psfs else (),
        ancillaries=ancillaries,
        sources=tuple(_image_name(image) for image in chosen),
    )


def _check_equal_sizes(chosen: list[tuple[str, _Image]]) -> None:
    """BandMismatchError unless every band's image has the same shape."""
    if len({image.shape for _, image in chosen}) > 1:
        sizes = ", ".join(f"{band} {image.shape[1]}x{image.shape[0]}" for band, image in chosen)
        raise BandMismatchError(f"got band images of different sizes ({sizes}); they must match")


def _band_ancillaries(
    band: str, *, science: _Image, extras: list[_Ancillary]
) -> tuple[_Ancillary, ...]:
    """A band's mask and noise images, at most one of each role and of the science image's size."""
    for role in sorted({extra.role for extra in extras}):
        same = [extra.name for extra in extras if extra.role == role]
        if len(same) > 1:
            raise BandMismatchError(
                f"got {len(same)} {role} images for band {band} ({_join(same)}); at most one "
                "of each per band is accepted"
            )
    for extra in extras:
        if extra.image.shape != science.shape:
            ny, nx = extra.image.shape
            sy, sx = science.shape
            raise BandMismatchError(
                f"got the {_role_label(extra.role)} {extra.name} of band {band} at {nx}x{ny} "
                f"pixels and its science image {_image_name(science)} at {sx}x{sy}; they must "
                "match"
            )
    return tuple(extras)


def _role_label(role: str) -> str:
    """'weight map', 'mask', ... for messages."""
    return "mask" if role == "mask" else f"{role} map"


def _role_of(image: _Image) -> str:
    """What a 2D image holds, by the words of its EXTNAME: science unless it says otherwise."""
    name = _header_value(image.header, "EXTNAME", image.index)
    if not isinstance(name, str):
        return "science"
    words = {word.upper() for word in _BAND_SEPARATORS.split(name) if word}
    for role, role_words in ROLE_WORDS.items():
        if role != "science" and words & role_words:
            return role
    return "science"


def _image_name(image: _Image) -> str:
    """'DES_G_RMS (HDU 5)', or 'HDU 5' without an EXTNAME."""
    name = _header_value(image.header, "EXTNAME", image.index)
    if isinstance(name, str) and name.strip():
        return f"{name.strip()} (HDU {image.index})"
    return f"HDU {image.index}"


def _primary_band(hdul: fits.HDUList, wanted: tuple[str, ...]) -> str | None:
    """The band the primary header's FILTER or BAND names: that of extensions naming none
    (a one-band file with SCI, MSK and WGT extensions)."""
    primary = _hdu_at(hdul, 0)
    if primary is None:
        return None
    header = _header(primary, 0)
    for key in BAND_KEYWORDS:
        band = _band_from_text(_header_value(header, key, 0), wanted)
        if band is not None:
            return band
    return None


def _band_of(image: _Image, wanted: tuple[str, ...]) -> str | None:
    """The band a 2D image holds, from FILTER or BAND, else EXTNAME; None if none says."""
    for key in (*BAND_KEYWORDS, "EXTNAME"):
        band = _band_from_text(_header_value(image.header, key, image.index), wanted)
        if band is not None:
            return band
    return None


def _band_from_text(value: object, wanted: tuple[str, ...]) -> str | None:
    """The one band named in a keyword value such as 'DECam r' or 'r DECam SDSS c0002'."""
    if not isinstance(value, str):
        return None
    words = {word.lower() for word in _BAND_SEPARATORS.split(value) if word}
    hits = words & (KNOWN_BANDS | set(wanted))
    return hits.pop() if len(hits) == 1 else None


def _join(items: Iterable[str]) -> str:
    """'g, r, i'."""
    return ", ".join(items)


def _count_bands(names: Sequence[str]) -> str:
    """'2 bands (g, r)'."""
    return f"{len(names)} band{'' if len(names) == 1 else 's'} ({_join(names)})"


# --------------------------------------------------------------------------- pixels


def _crop_origin(image_shape: tuple[int, int], size_pixels: int) -> tuple[int, int, list[str]]:
    """Offsets (y0, x0, pixels) of the central ``size_pixels`` square, and a warning if cropped.

    With an odd excess the extra row or column is left at the high-index end.
    """
    ny, nx = image_shape
    if ny < size_pixels or nx < size_pixels:
        raise CutoutTooSmallError(
            f"got a {nx}x{ny}-pixel cutout; the model needs at least {size_pixels}x{size_pixels} "
            "pixels (larger cutouts are cropped to their centre)"
        )
    y0, x0 = (ny - size_pixels) // 2, (nx - size_pixels) // 2
    if (ny, nx) == (size_pixels, size_pixels):
        return y0, x0, []
    return y0, x0, [f"cropped {nx}x{ny} to the central {size_pixels}x{size_pixels} pixels"]


def _read_cutout(
    selection: _Selection, *, y0: int, x0: int, size_pixels: int
) -> NDArray[np.float32]:
    """The cropped bands as float32, scaled by BSCALE/BZERO (BLANK -> NaN)."""
    pixels = np.empty((len(selection.planes), size_pixels, size_pixels), dtype=np.float32)
    rows, columns = slice(y0, y0 + size_pixels), slice(x0, x0 + size_pixels)
    for band, (image, plane) in enumerate(selection.planes):
        leading = (0,) * (len(image.full_shape) - len(image.shape))
        key = (*leading, *(() if plane is None else (plane,)), rows, columns)
        _read_section(image, key, out=pixels[band])
    return pixels


def _read_section(image: _Image, key: tuple[int | slice, ...], *, out: NDArray[np.float32]) -> None:
    """Write part of an image's data, scaled (BLANK -> NaN), into ``out``.

    ``section`` reads only those pixels, and decompresses only the tiles that hold them.
    """
    try:
        out[...] = image.hdu.section[key]
    except Exception as exc:
        raise InvalidFitsError(
            f"got a FITS file whose image data in HDU {image.index} cannot be read "
            f"({_reason(exc)}); the file may be truncated or corrupt"
        ) from exc


def _apply_ancillaries(
    pixels: NDArray[np.float32],
    selection: _Selection,
    *,
    y0: int,
    x0: int,
    bands: tuple[str, ...],
) -> tuple[tuple[float | None, ...] | None, list[str]]:
    """Mask the pixels each band's mask flags (nonzero) or weight map gives no weight, and
    read each band's noise level (file units) from its RMS, weight or variance map.

    Returns the per-band noise levels (None where no map gives one; None for all when
    none does) and warnings saying what was used.
    """
    if not any(selection.ancillaries):
        return None, []
    size = pixels.shape[-1]
    rows, columns = slice(y0, y0 + size), slice(x0, x0 + size)
    noise: list[float | None] = []
    notes: list[str] = []
    for index, (band, extras) in enumerate(zip(bands, selection.ancillaries, strict=True)):
        by_role = {extra.role: extra for extra in extras}
        plane = pixels[index]
        if "mask" in by_role:
            flags = _read_plane(by_role["mask"].image, rows, columns)
            notes += _mask_where(
                plane, flags != 0, why=f"flagged in {by_role['mask'].name}", band=band
            )
        sigma: float | None = None
        for role in NOISE_ROLES:
            if role in by_role:
                sigma, role_notes = _noise_level(
                    plane, by_role[role], band=band, rows=rows, columns=columns
                )
                notes += role_notes
                break
        noise.append(sigma)
    return (tuple(noise) if any(sigma is not None for sigma in noise) else None), notes


def _read_plane(image: _Image, rows: slice, columns: slice) -> NDArray[np.float32]:
    """The cropped pixels of a 2D image as float32 (BLANK -> NaN)."""
    out = np.empty((rows.stop - rows.start, columns.stop - columns.start), dtype=np.float32)
    leading = (0,) * (len(image.full_shape) - len(image.shape))
    _read_section(image, (*leading, rows, columns), out=out)
    return out


def _mask_where(
    plane: NDArray[np.float32], flagged: NDArray[np.bool_], *, why: str, band: str
) -> list[str]:
    """Set the ``flagged`` pixels of one band to NaN; a warning saying how many were."""
    newly = flagged & ~np.isnan(plane)
    count = int(np.count_nonzero(newly))
    plane[newly] = np.nan
    return [f"band {band}: masked {count} pixels {why}"] if count else []


def _noise_level(
    plane: NDArray[np.float32],
    extra: _Ancillary,
    *,
    band: str,
    rows: slice,
    columns: slice,
) -> tuple[float | None, list[str]]:
    """One band's noise level (standard deviation, file units) from its noise map: the
    median over the cutout of its usable values, which the sky, not the sources, sets."""
    values = _read_plane(extra.image, rows, columns).astype(np.float64)
    notes: list[str] = []
    if extra.role == "weight":
        # Inverse-variance weights: zero weight means no data at that pixel.
        notes += _mask_where(plane, ~(values > 0), why=f"with no weight in {extra.name}", band=band)
    usable = values[np.isfinite(values) & (values > 0)]
    if usable.size == 0:
        return None, [*notes, f"band {band}: ignored {extra.name}, which has no positive value"]
    level = float(np.median(usable))
    sigma = {"rms": level, "weight": 1.0 / math.sqrt(level), "variance": math.sqrt(level)}[
        extra.role
    ]
    return sigma, [
        *notes,
        f"band {band}: noise level {sigma:.4g} (file units) from the {_role_label(extra.role)} "
        f"{extra.name}, not estimated from the pixels",
    ]


def _check_masked(
    pixels: NDArray[np.float32], wanted: tuple[str, ...], max_fraction: float
) -> tuple[float, list[str]]:
    """The masked fraction (0-1) of the cutout, and a warning; refuses too much masking."""
    masked = np.isnan(pixels)
    count = int(np.count_nonzero(masked))
    fraction = count / pixels.size
    empty = [band for band, plane in zip(wanted, masked, strict=True) if plane.all()]
    if empty:
        raise TooManyMaskedPixelsError(
            f"got a cutout whose band(s) {_join(empty)} are entirely masked (NaN or BLANK); "
            f"every band needs data, and at most {_percent(max_fraction)} of the pixels may be "
            "masked"
        )
    if fraction > max_fraction:
        raise TooManyMaskedPixelsError(
            f"got {count} of {pixels.size} pixels masked (NaN or BLANK), {_percent(fraction)} "
            f"of the cutout; at most {_percent(max_fraction)} may be masked"
        )
    if count == 0:
        return 0.0, []
    return fraction, [
        f"{_percent(fraction)} of pixels masked (NaN/BLANK) were filled ({count} of {pixels.size})"
    ]


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


# --------------------------------------------------------------------------- WCS


def _centre_sky_position(
    header: Mapping[str, object],
    *,
    x: float,
    y: float,
    pixel_scale_arcsec: float,
    plain_tan: TanWcs | None = None,
) -> tuple[float | None, float | None, list[str]]:
    """ICRS RA/Dec (degrees) at 0-based pixel (x, y) from the header's celestial WCS.

    Returns Nones without a celestial WCS, and Nones with a warning when the
    WCS cannot be used; raises PixelScaleMismatchError when its pixel scale
    (arcsec/pixel) is not ``pixel_scale_arcsec`` within the tolerance.
    ``plain_tan``: the header's plain TAN WCS when the caller has parsed it already.
    """
    try:
        if not any(key.startswith("CTYPE") for key in header):
            return None, None, []
        plain_tan = plain_tan or simple_tan_wcs(header)
        if plain_tan is not None:
            scales_arcsec = plain_tan.pixel_scales_arcsec()
            ra_deg, dec_deg = plain_tan.pixel_to_sky_deg(x, y)
        else:
            scales_arcsec, ra_deg, dec_deg = _astropy_sky_position(header, x=x, y=y)
    except _WcsUnusable as exc:
        return None, None, [str(exc)] if str(exc) else []
    except Exception as exc:  # wcslib and astropy raise many types on broken WCS keywords
        return None, None, [f"ignored the WCS: astropy could not use it ({_reason(exc)})"]
    if not all(math.isfinite(s) and s > 0 for s in scales_arcsec):
        return None, None, ["ignored the WCS: its pixel scale is not a positive number"]
    _check_pixel_scale(scales_arcsec, pixel_scale_arcsec)
    if not (math.isfinite(ra_deg) and math.isfinite(dec_deg)):
        return None, None, ["ignored the WCS: the cutout centre has no sky position"]
    return ra_deg, dec_deg, []


class _WcsUnusable(Exception):
    """The header's WCS gives no sky position; the message, if any, is the warning."""


def _astropy_sky_position(
    header: fits.Header, *, x: float, y: float
) -> tuple[list[float], float, float]:
    """(pixel scales in arcsec, RA, Dec in degrees) at 0-based (x, y) through astropy's WCS."""
    # Headers that are not plain ICRS TAN (service.fits.tan_wcs) come here. Building WCS objects and
    # SkyCoords dominated decoding: one WCS of the two image axes is all the answer needs
    # (celestial axes elsewhere leave it without a longitude/latitude pair), and ICRS needs
    # no frame transform.
    celestial = WCS(header, naxis=2)
    if not celestial.has_celestial:
        raise _WcsUnusable("")
    if {celestial.wcs.lng, celestial.wcs.lat} != {0, 1}:
        raise _WcsUnusable("ignored the WCS: its celestial axes are not the image axes")
    scales_arcsec = [q.to_value(u.arcsec) for q in celestial.proj_plane_pixel_scales()]
    if celestial.wcs.radesys == "ICRS" and celestial.wcs.lng == 0:
        ((ra_deg, dec_deg),) = celestial.all_pix2world([[x, y]], 0).tolist()
        return scales_arcsec, ra_deg, dec_deg
    sky = celestial.pixel_to_world(x, y)
    icrs = sky.icrs if isinstance(sky, SkyCoord) else None
    if icrs is None:
        return scales_arcsec, math.nan, math.nan
    return scales_arcsec, float(icrs.ra.deg), float(icrs.dec.deg)


def _check_band_alignment(
    selection: _Selection, bands: tuple[str, ...], *, x: float, y: float
) -> list[str]:
    """BandMismatchError when the bands' WCSs put the cutout centre, 0-based pixel (x, y)
    of the first band, more than :data:`MAX_BAND_OFFSET_PIXELS` apart; warnings when they
    cannot be compared."""
    headers = [image.header for image, _ in selection.planes]
    if all(header is headers[0] for header in headers):
        return []
    with_wcs = [any(str(key).startswith("CTYPE") for key in header) for header in headers]
    if not any(with_wcs):
        return []
    if not all(with_wcs):
        without = [band for band, has in zip(bands, with_wcs, strict=True) if not has]
        return [f"band {_join(without)} has no WCS: the bands' alignment was not checked"]
    try:
        wcss = [WCS(header, naxis=2) for header in headers]
        if not all(wcs.has_celestial for wcs in wcss):
            return []
        sky = wcss[0].all_pix2world([[x, y]], 0)
        offsets = [math.hypot(*(wcs.all_world2pix(sky, 0)[0] - (x, y))) for wcs in wcss[1:]]
    except Exception as exc:  # wcslib raises many types on broken WCS keywords
        return [f"the bands' alignment was not checked: a WCS is unusable ({_reason(exc)})"]
    for band, source, offset in zip(bands[1:], selection.sources[1:], offsets, strict=True):
        if not offset <= MAX_BAND_OFFSET_PIXELS:
            raise BandMismatchError(
                f"got bands whose WCSs disagree: the cutout centre of band {bands[0]} "
                f"({selection.sources[0]}) is {offset:.3g} pixels away in band {band} ({source}); "
                f"at most {MAX_BAND_OFFSET_PIXELS} pixel is accepted: resample the bands onto "
                "one pixel grid"
            )
    return []


def _check_pixel_scale(scales_arcsec: list[float], pixel_scale_arcsec: float) -> None:
    """PixelScaleMismatchError when an axis scale (arcsec/pixel) is off by more than 2%."""
    if all(abs(scale / pixel_scale_arcsec - 1) <= PIXEL_SCALE_TOLERANCE for scale in scales_arcsec):
        return
    got = " x ".join(f"{scale:.4g}" for scale in scales_arcsec)
    raise PixelScaleMismatchError(
        f"got a pixel scale of {got} arcsec/pixel from the WCS; the model needs "
        f"{pixel_scale_arcsec:.4g} arcsec/pixel (within {_percent(PIXEL_SCALE_TOLERANCE)}); "
        "resample the cutout to that scale"
    )
