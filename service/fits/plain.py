"""Read the common cutout layout without astropy: one float image in the primary HDU.

Survey cutouts nearly always arrive as a single uncompressed primary HDU
holding a float32 (or float64) cube, a few dozen header cards and nothing
after it. ``astropy.io.fits`` takes about a millisecond to open such a file
(file-like wrappers, lazy HDU machinery, card objects), more than the
networks spend on it. :func:`read_plain_primary` parses exactly that layout
from the bytes and returns None for anything else (integer pixels,
BSCALE/BZERO/BLANK, extensions, long strings, HIERARCH cards, values it
cannot read strictly), which the caller hands to astropy. Header values
follow FITS 4.0 section 4.2: strings in single quotes (trailing blanks not
significant), logicals T/F, integers and reals (E or D exponent).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from service.errors import PayloadTooLargeError
from service.fits.raw import padded_bytes, scan_header

#: Big-endian pixel types of the float BITPIX values; integers need BSCALE/BZERO handling.
_FLOAT_DTYPES = {-32: np.dtype(">f4"), -64: np.dtype(">f8")}
#: Cards without a value that may appear anywhere (FITS 4.0 section 4.4.2.4).
_COMMENTARY = frozenset({"COMMENT", "HISTORY", ""})
_KEYWORD = re.compile(r"[A-Z0-9_-]{1,8}")
_INTEGER = re.compile(r"[+-]?\d+")
_REAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[EeDd][+-]?\d+)?")
#: Keywords that change how the data bytes map to values: left to astropy.
_SCALING = ("BSCALE", "BZERO", "BLANK")

HeaderValue = str | bool | int | float


@dataclass(frozen=True)
class PlainPrimary:
    """The primary HDU of a single-HDU FITS file holding a float cube.

    ``header`` maps each keyword to its value (none is repeated); ``data`` is
    the cube in numpy axis order (NAXIS3, NAXIS2, NAXIS1), big-endian, a view
    of the file's bytes.
    """

    header: dict[str, HeaderValue]
    data: NDArray[np.floating]


def read_plain_primary(raw: bytes, *, max_cards: int, max_pixels: int) -> PlainPrimary | None:
    """The file's only HDU when it is a plain float cube, else None (astropy's case).

    Parameters
    ----------
    raw : bytes
        A whole, decompressed FITS file.
    max_cards : int
        Most header cards to parse; a longer header is astropy's (it refuses it).
    max_pixels : int
        Most pixels in the image; a larger one is astropy's (it refuses it).
    """
    parsed = _parse_header(raw, max_cards=max_cards)
    if parsed is None:
        return None
    header, header_bytes = parsed
    shape = _float_image_shape(header)
    if shape is None or math.prod(shape) > max_pixels:
        return None
    dtype = _FLOAT_DTYPES[header["BITPIX"]]
    data_bytes = math.prod(shape) * dtype.itemsize
    if len(raw) != header_bytes + padded_bytes(data_bytes):
        return None  # truncated, or more HDUs follow: astropy checks and reads those
    data = np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=header_bytes)
    return PlainPrimary(header=header, data=data.reshape(shape))


def _parse_header(raw: bytes, *, max_cards: int) -> tuple[dict[str, HeaderValue], int] | None:
    """Keyword values of the primary header and its padded length (bytes); None if unusual."""
    try:
        scanned = scan_header(raw, max_cards=max_cards)
    except PayloadTooLargeError:
        return None  # astropy's guards refuse it with the same error
    if scanned is None or scanned.end_card[8:].strip():
        return None
    header: dict[str, HeaderValue] = {}
    for card_bytes in scanned.cards:
        try:
            card = card_bytes.decode("ascii")
        except UnicodeDecodeError:
            return None
        name = card[:8].rstrip()
        if name in _COMMENTARY:
            continue
        if card[8:10] != "= " or not _KEYWORD.fullmatch(name):
            return None  # HIERARCH, CONTINUE, a keyword without a value: astropy's
        value = _parse_value(card[10:])
        if value is None or name in header:
            return None  # a repeated keyword: astropy decides which counts, or refuses
        header[name] = value
    return header, scanned.size_bytes


def _parse_value(field: str) -> HeaderValue | None:
    """A card's value (columns 11-80) as str, bool, int or float; None when not plain."""
    text = field.lstrip()
    if text.startswith("'"):
        return _parse_string(text)
    value = text.split("/", 1)[0].strip()
    if value in ("T", "F"):
        return value == "T"
    if _INTEGER.fullmatch(value):
        return int(value)
    if _REAL.fullmatch(value):
        return float(value.replace("D", "E").replace("d", "e"))
    return None  # undefined, complex or malformed: astropy decides


def _parse_string(text: str) -> str | None:
    """A quoted FITS string ('' is a quote); trailing blanks dropped; None if unterminated."""
    chars: list[str] = []
    position = 1
    while position < len(text):
        char = text[position]
        if char == "'":
            if text.startswith("''", position):
                chars.append("'")
                position += 2
                continue
            rest = text[position + 1 :].strip()
            return "".join(chars).rstrip() if not rest or rest.startswith("/") else None
        chars.append(char)
        position += 1
    return None


def _float_image_shape(header: dict[str, HeaderValue]) -> tuple[int, ...] | None:
    """Numpy shape (planes, ny, nx) of a float cube in a primary header; None otherwise."""
    if header.get("SIMPLE") is not True or header.get("BITPIX") not in _FLOAT_DTYPES:
        return None
    if any(key in header for key in _SCALING) or header.get("GROUPS") is True:
        return None
    naxis = header.get("NAXIS")
    if naxis != 3 or type(naxis) is not int:
        return None  # a cube; 2D band images come as extensions, which astropy reads
    dims = [header.get(f"NAXIS{axis}") for axis in range(naxis, 0, -1)]
    if not all(type(dim) is int and dim > 0 for dim in dims):
        return None
    return tuple(dims)  # type: ignore[arg-type]
