"""FITS at the byte level: limits, decompression, and the one header scanner.

Everything here runs before astropy sees a file, and none of it imports
astropy: the :class:`FitsLimits` a file is held to, gunzipping within those
limits (a gzip bomb is refused as soon as its output passes the cap), the
signature check, :func:`scan_header` (the one walk over 80-byte header cards,
shared by :mod:`service.fits.plain` and the guards below), and the guards that
keep astropy from looping over what a hostile header claims.
"""

import math
import re
import zlib
from dataclasses import dataclass

from service.errors import InvalidFitsError, PayloadTooLargeError, UnsupportedMediaTypeError

#: Most HDUs one file may hold; a cutout needs at most one per band plus the primary.
MAX_HDUS = 64
#: First bytes of a gzip member (RFC 1952) and of a FITS file (FITS 4.0, section 4.4.1.1).
GZIP_MAGIC = b"\x1f\x8b"
FITS_MAGIC = b"SIMPLE  ="
#: Content-Encoding values read as gzip or as no encoding.
GZIP_ENCODINGS = frozenset({"gzip", "x-gzip"})
IDENTITY_ENCODINGS = frozenset({"", "identity"})
#: A body may be gzipped for transport on top of a ``.fits.gz`` file, but no deeper.
MAX_GZIP_LAYERS = 2
#: The BITPIX values FITS allows (FITS 4.0, table 8).
BITPIX_VALUES = frozenset({8, 16, 32, 64, -32, -64})
#: Bytes per header card and per FITS block (FITS 4.0, sections 3.1 and 4.4.1).
CARD_BYTES = 80
BLOCK_BYTES = 2880
#: Compressed bytes fed to zlib per call: keeps each copy of its unconsumed input small.
_INFLATE_INPUT_BYTES = 1 << 16
#: Most axes (NAXIS, ZNAXIS) or table columns (TFIELDS) the FITS standard allows.
MAX_AXES = 999
#: A card of a keyword astropy loops over, with a signed integer value.
_COUNT_CARD = re.compile(rb"(NAXIS|ZNAXIS|TFIELDS) *= *([-+]?\d+)")
#: The end of every message refusing a file's layout.
ACCEPTED_LAYOUTS = (
    "accepted: a FITS file, optionally gzip-compressed, holding the bands as an image cube "
    "(planes named by BANDS or BAND0..BANDn) or as one 2D image extension per band (named by "
    "FILTER, BAND or EXTNAME; mask, weight, RMS and PSF extensions beside it), or one such "
    "file per band (docs/fits-layouts.md)"
)

#: Media types under which an HTTP body is one FITS file.
RAW_FITS_MEDIA_TYPES = ("application/fits", "image/fits", "application/octet-stream")


@dataclass(frozen=True)
class FitsLimits:
    """Caps that keep a hostile file from exhausting memory or time.

    Parameters
    ----------
    max_decompressed_bytes : int
        Largest FITS file accepted after gunzipping (bytes); a gzip bomb is
        refused as soon as its output passes this.
    max_pixels : int
        Largest image accepted per HDU (pixels, product of NAXISn), checked
        from the header before any data is read.
    max_header_cards : int
        Most cards (80-byte records) one header may hold.
    max_masked_fraction : float
        Largest fraction (0-1) of the cropped cutout that may be masked
        (NaN or BLANK).
    """

    # Sized for cutouts on a small box; Settings takes its defaults from here.
    max_decompressed_bytes: int = 64 * 2**20
    max_pixels: int = 4_000_000
    max_header_cards: int = 2000
    max_masked_fraction: float = 0.25

    def __post_init__(self) -> None:
        for name in ("max_decompressed_bytes", "max_pixels", "max_header_cards"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.max_masked_fraction <= 1.0:
            raise ValueError(
                f"max_masked_fraction must lie in [0, 1], got {self.max_masked_fraction}"
            )


DEFAULT_LIMITS = FitsLimits()


def decompress(data: bytes, *, content_encoding: str | None, limits: FitsLimits) -> bytes:
    """The FITS bytes: gunzipped when gzip-compressed, within the decompressed-size cap."""
    encoding = (content_encoding or "").strip().lower()
    if encoding not in GZIP_ENCODINGS | IDENTITY_ENCODINGS:
        raise UnsupportedMediaTypeError(
            f"got Content-Encoding {content_encoding!r}; accepted: gzip or identity"
        )
    if encoding in GZIP_ENCODINGS and not data.startswith(GZIP_MAGIC):
        raise InvalidFitsError(
            f"got a body declared as Content-Encoding {content_encoding!r} that does not start "
            f"with the gzip magic bytes 1f 8b (it starts with {data[:8]!r})"
        )
    for _ in range(MAX_GZIP_LAYERS):
        if not data.startswith(GZIP_MAGIC):
            break
        data = _gunzip(data, max_bytes=limits.max_decompressed_bytes)
    else:
        if data.startswith(GZIP_MAGIC):
            raise InvalidFitsError(
                f"got a file gzip-compressed more than {MAX_GZIP_LAYERS} times; {ACCEPTED_LAYOUTS}"
            )
    if len(data) > limits.max_decompressed_bytes:
        raise PayloadTooLargeError(
            f"got a {len(data)}-byte FITS file; at most {limits.max_decompressed_bytes} bytes "
            "are accepted"
        )
    return data


def _gunzip(data: bytes, *, max_bytes: int) -> bytes:
    """Inflate every gzip member in ``data``, refusing output beyond ``max_bytes`` (bytes)."""
    out = bytearray()
    rest = data
    while rest.startswith(GZIP_MAGIC):
        rest = _inflate_member(rest, out, max_bytes=max_bytes)
    if rest.strip(b"\0"):
        raise InvalidFitsError(
            f"got {len(rest)} bytes of trailing data after the gzip stream, starting with "
            f"{rest[:8]!r}; {ACCEPTED_LAYOUTS}"
        )
    return bytes(out)


def _inflate_member(member: bytes, out: bytearray, *, max_bytes: int) -> bytes:
    """Inflate the gzip member at the start of ``member`` into ``out``; return what follows it.

    The output is produced at most ``max_bytes + 1`` bytes at a time, so a
    gzip bomb costs no more than the cap in time and memory before it is refused.
    """
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    view = memoryview(member)
    try:
        for start in range(0, len(view), _INFLATE_INPUT_BYTES):
            pending: bytes | memoryview = view[start : start + _INFLATE_INPUT_BYTES]
            while pending and not inflater.eof:
                out += inflater.decompress(pending, max_bytes + 1 - len(out))
                if len(out) > max_bytes:
                    raise PayloadTooLargeError(
                        f"got a gzip file that inflates to more than {max_bytes} bytes; at "
                        f"most {max_bytes} decompressed bytes are accepted"
                    )
                pending = inflater.unconsumed_tail
            if inflater.eof:
                return inflater.unused_data + bytes(view[start + _INFLATE_INPUT_BYTES :])
    except zlib.error as exc:
        raise InvalidFitsError(f"got a corrupt gzip stream ({exc}); {ACCEPTED_LAYOUTS}") from exc
    raise InvalidFitsError(
        f"got a gzip stream that ends early, after {len(out)} decompressed bytes (truncated?); "
        f"{ACCEPTED_LAYOUTS}"
    )


def check_signature(raw: bytes) -> None:
    """InvalidFitsError unless ``raw`` starts like a FITS file."""
    if not raw:
        raise InvalidFitsError(f"got an empty file (0 bytes); {ACCEPTED_LAYOUTS}")
    if not raw.startswith(FITS_MAGIC):
        raise InvalidFitsError(
            f"got {len(raw)} bytes starting with {raw[:20]!r}, not a FITS file (which starts "
            f"with {FITS_MAGIC.decode()!r}); {ACCEPTED_LAYOUTS}"
        )


def check_header_lengths(raw: bytes, limits: FitsLimits) -> None:
    """Refuse a header over ``limits.max_header_cards`` cards before astropy parses it.

    astropy spends microseconds per card, so a header tens of megabytes long
    would hold a worker for seconds. This walks the HDUs by their mandatory
    keywords only and stops quietly at anything it cannot follow; astropy
    judges the rest, and :mod:`service.fits.decode` checks each parsed header too.
    """
    offset = 0
    for index in range(MAX_HDUS):
        header = scan_header(raw, offset, max_cards=limits.max_header_cards, index=index)
        if header is None:
            return
        data_bytes = _raw_data_bytes(_structural_keywords(header))
        if data_bytes is None:
            return
        offset += header.size_bytes + padded_bytes(data_bytes)
        if not raw.startswith(b"XTENSION=", offset):
            return  # the end, or bytes after the last HDU that astropy ignores


def check_axis_counts(raw: bytes) -> None:
    """Refuse NAXIS, ZNAXIS or TFIELDS outside 0-999 anywhere a header card could start.

    astropy loops ``range(NAXIS)`` (and over ZNAXIS, TFIELDS) while it builds an
    HDU, so one card claiming 2**31 axes holds a worker for hours and fills
    gigabytes (found by fuzzing). FITS caps all three at 999 (FITS 4.0,
    sections 4.4.1.1, 7.2.1 and 10.1.1). Every header starts on a 2880-byte
    block, so only cards on 80-byte boundaries are looked at.
    """
    for match in _COUNT_CARD.finditer(raw):
        if match.start() % CARD_BYTES:
            continue
        value = int(match.group(2))
        if not 0 <= value <= MAX_AXES:
            keyword = match.group(1).decode()
            raise InvalidFitsError(
                f"got {keyword} = {value} at byte {match.start()}; FITS allows 0 to {MAX_AXES}"
            )


@dataclass(frozen=True)
class HeaderCards:
    """The card images of one header, in order, up to its END card.

    ``cards`` holds the 80-byte cards before END (commentary cards included);
    ``end_card`` is the END card itself; ``size_bytes`` is the header's length
    padded to whole 2880-byte blocks, where its data unit starts.
    """

    cards: list[bytes]
    end_card: bytes
    size_bytes: int


def scan_header(
    raw: bytes, offset: int = 0, *, max_cards: int, index: int = 0
) -> HeaderCards | None:
    """The cards of the header that starts at byte ``offset`` of a FITS file.

    The one header scanner of the package: the plain reader parses the cards it
    returns, and :func:`check_header_lengths` walks the HDUs with it.

    Parameters
    ----------
    raw : bytes
        A whole, decompressed FITS file.
    offset : int
        Where the header starts (bytes; a multiple of 2880 for a valid file).
    max_cards : int
        Most cards accepted before the END card (cards).
    index : int
        The HDU's position in the file, for the error message.

    Returns
    -------
    HeaderCards or None
        None when the bytes end before an END card.

    Raises
    ------
    PayloadTooLargeError
        More than ``max_cards`` cards come before the END card.
    """
    cards: list[bytes] = []
    for start in range(offset, len(raw) - CARD_BYTES + 1, CARD_BYTES):
        card = raw[start : start + CARD_BYTES]
        if card[:8].rstrip() == b"END":
            return HeaderCards(cards, card, padded_bytes(start + CARD_BYTES - offset))
        if len(cards) >= max_cards:
            raise PayloadTooLargeError(
                f"got a header (HDU {index}) of more than {max_cards} cards; at most "
                f"{max_cards} cards per header are accepted"
            )
        cards.append(card)
    return None


def _structural_keywords(header: HeaderCards) -> dict[str, int]:
    """The integer structural keywords (BITPIX, NAXISn, PCOUNT, GCOUNT) of a header."""
    keywords: dict[str, int] = {}
    for card in header.cards:
        name = card[:8].rstrip()
        if name in (b"BITPIX", b"PCOUNT", b"GCOUNT") or name.startswith(b"NAXIS"):
            value = _raw_card_int(card)
            if value is not None:  # astropy reads the first of repeated keywords
                keywords.setdefault(name.decode("ascii", "replace"), value)
    return keywords


def _raw_card_int(card: bytes) -> int | None:
    """The integer value of a header card image, or None."""
    if card[8:10] != b"= ":
        return None
    try:
        return int(card[10:].split(b"/", 1)[0].strip())
    except ValueError:
        return None


def _raw_data_bytes(keywords: dict[str, int]) -> int | None:
    """Size (bytes) of the data unit these keywords describe; None for anything unusual."""
    bitpix, naxis = keywords.get("BITPIX"), keywords.get("NAXIS")
    pcount, gcount = keywords.get("PCOUNT", 0), keywords.get("GCOUNT", 1)
    if bitpix not in BITPIX_VALUES or naxis is None or not 0 <= naxis <= 999:
        return None
    if naxis == 0:
        return 0
    dims = [keywords.get(f"NAXIS{axis}", 0) for axis in range(1, naxis + 1)]
    if min(dims) <= 0 or pcount < 0 or gcount < 0:
        return None  # includes random groups (NAXIS1 = 0): obsolete, left to astropy
    return abs(bitpix) // 8 * gcount * (pcount + math.prod(dims))


def padded_bytes(size_bytes: int) -> int:
    """``size_bytes`` rounded up to whole 2880-byte FITS blocks."""
    return -(-size_bytes // BLOCK_BYTES) * BLOCK_BYTES
