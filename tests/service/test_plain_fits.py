"""The astropy-free reader of plain cubes gives exactly what astropy gives, or steps aside.

Every comparison decodes the same bytes twice: through :func:`decode_fits` as
served (plain reader first) and with the plain reader switched off (astropy for
everything), and asserts the same pixels, masked fraction, sky position and
warnings, or the same error. The inputs are the sample cutouts, files written
by astropy, and hypothesis-edited headers.
"""

import gzip
import io
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import service.fits.decode as fits_codec
from service.errors import LensServeError
from service.fits.decode import DEFAULT_LIMITS, decode_fits
from service.fits.plain import read_plain_primary

SAMPLES = Path(__file__).resolve().parents[2] / "examples" / "cutouts"
CLEAN = sorted((SAMPLES / "clean").glob("*.fits"))
FORMATS = sorted((SAMPLES / "formats").glob("*"))
#: Layouts the plain reader takes (after gunzip); the others are astropy's.
PLAIN_SUFFIXES = ("_cube.fits.gz", "_f64.fits", "_nan.fits", "_101px.fits")

pytestmark = pytest.mark.skipif(not CLEAN, reason=f"no sample cutouts in {SAMPLES}")


def _astropy_only(data: bytes, monkeypatch: pytest.MonkeyPatch, **kwargs):
    """decode_fits with the plain reader switched off."""
    with monkeypatch.context() as patch:
        patch.setattr(fits_codec, "read_plain_primary", lambda *a, **k: None)
        return _outcome(data, **kwargs)


def _outcome(data: bytes, **kwargs) -> tuple:
    """What decoding says about ``data``: the decoded fields, or the error's class and code."""
    try:
        decoded = decode_fits(data, **kwargs)
    except LensServeError as error:
        return ("error", type(error).__name__, error.code)
    return (
        "ok",
        decoded.pixels.dtype.str,
        decoded.pixels.shape,
        np.where(np.isnan(decoded.pixels), -1.0, decoded.pixels).tobytes(),
        np.isnan(decoded.pixels).tobytes(),
        decoded.masked_fraction,
        decoded.ra_deg,
        decoded.dec_deg,
        decoded.warnings,
    )


def _assert_same(data: bytes, monkeypatch: pytest.MonkeyPatch, **kwargs) -> tuple:
    served = _outcome(data, **kwargs)
    assert served == _astropy_only(data, monkeypatch, **kwargs)
    return served


def _raw(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


@pytest.mark.parametrize("path", CLEAN + FORMATS, ids=lambda p: p.name)
def test_every_sample_decodes_the_same_with_and_without_astropy(path, monkeypatch):
    assert _assert_same(path.read_bytes(), monkeypatch)[0] == "ok"


@pytest.mark.parametrize("path", CLEAN + FORMATS, ids=lambda p: p.name)
def test_the_plain_reader_takes_plain_cubes_and_leaves_the_rest(path):
    primary = read_plain_primary(_raw(path), max_cards=2000, max_pixels=4_000_000)
    plain = path.parent.name == "clean" or path.name.endswith(PLAIN_SUFFIXES)
    assert (primary is not None) == plain
    if plain:
        assert primary.data.ndim == 3 and primary.header["BANDS"].startswith("g")
        np.testing.assert_array_equal(primary.data, fits.getdata(io.BytesIO(_raw(path))))


def _cube_file(header_cards: dict, data: np.ndarray | None = None, *, extra_hdu=False) -> bytes:
    rng = np.random.default_rng(5)
    data = (10 + rng.normal(size=(3, 64, 64))).astype(np.float32) if data is None else data
    hdus = [fits.PrimaryHDU(data, header=fits.Header(list(header_cards.items())))]
    if extra_hdu:
        hdus.append(fits.ImageHDU(np.zeros((4, 4), np.float32)))
    buffer = io.BytesIO()
    fits.HDUList(hdus).writeto(buffer)
    return buffer.getvalue()


TAN = {
    "CTYPE1": "RA---TAN",
    "CTYPE2": "DEC--TAN",
    "CRPIX1": 32.5,
    "CRPIX2": 32.5,
    "CRVAL1": 150.0,
    "CRVAL2": 2.0,
    "CD1_1": -0.263 / 3600,
    "CD1_2": 0.0,
    "CD2_1": 0.0,
    "CD2_2": 0.263 / 3600,
    "RADESYS": "ICRS",
}


@pytest.mark.parametrize(
    ("cards", "plain"),
    [
        ({"BANDS": "r,g,i", **TAN}, True),
        ({}, True),  # no BANDS (a warning), no WCS
        # read plainly, but the WCS (not plain TAN in ICRS) sends the file to astropy
        ({"BANDS": "g,r,i", **{**TAN, "CTYPE1": "RA---SIN", "CTYPE2": "DEC--SIN"}}, True),
        ({"BANDS": "g,r,i", **TAN, "RADESYS": "FK5", "EQUINOX": 2000.0}, True),
        ({"BANDS": "g,r,i", **TAN, "CD1_1": -0.4 / 3600}, True),  # pixel scale refused
        ({"BANDS": "g,i"}, True),  # band mismatch
        ({"BANDS": "g,r,i", "OBJECT": "it's a lens"}, True),
        ({"BANDS": "g,r,i", "LONGSTR": "x" * 100}, False),  # CONTINUE cards
        ({"BANDS": "g,r,i", "HIERARCH ESO DET": 1}, False),
    ],
)
def test_written_headers_decode_the_same(cards, plain, monkeypatch):
    data = _cube_file(cards)
    assert (read_plain_primary(data, max_cards=2000, max_pixels=10**6) is not None) == plain
    _assert_same(data, monkeypatch)


def test_float64_masked_and_cropped_cubes_decode_the_same(monkeypatch):
    rng = np.random.default_rng(11)
    cube = 5 + rng.normal(size=(3, 71, 80))
    cube[1, :, 3] = np.nan
    cube[2, 7, 7] = np.inf
    assert _assert_same(_cube_file({"BANDS": "g r i", **TAN}, cube), monkeypatch)[0] == "ok"


def test_extensions_truncation_and_limits_are_left_to_astropy(monkeypatch):
    with_extension = _cube_file({"BANDS": "g,r,i"}, extra_hdu=True)
    assert read_plain_primary(with_extension, max_cards=2000, max_pixels=10**6) is None
    _assert_same(with_extension, monkeypatch)
    whole = _cube_file({"BANDS": "g,r,i"})
    assert read_plain_primary(whole[:-2880], max_cards=2000, max_pixels=10**6) is None
    assert _assert_same(whole[:-2880], monkeypatch)[0] == "error"
    assert read_plain_primary(whole, max_cards=5, max_pixels=10**6) is None
    assert read_plain_primary(whole, max_cards=2000, max_pixels=3 * 64 * 64 - 1) is None
    for limits in (
        fits_codec.FitsLimits(max_header_cards=5),
        fits_codec.FitsLimits(max_pixels=100),
    ):
        assert _assert_same(whole, monkeypatch, limits=limits)[0] == "error"


#: Card images a hypothesis test writes over cards of a sample's header.
EDITED_CARDS = [
    "BANDS   = 'r,g,i'",
    "BANDS   = 'G R I   '",
    "BANDS   = 'g,r'",
    "BANDS   = ''",
    "BANDS   = 'g,''r'',i'",
    "BANDS   = 'g,r,i' junk",
    "BANDS   = 'g,r,i",
    "BANDS   =                    7",
    "CTYPE1  = 'RA---SIN'",
    "CTYPE2  = 'GLAT-TAN'",
    "CRVAL1  =      1.5000000000D+02",
    "CRVAL1  =                 1.5e2",
    "CRVAL2  =                  95.0",
    "CRPIX1  =                    1",
    "CRPIX1  =                  inf",
    "CRPIX1  =                 1_0.5",
    "CRPIX1  =               (1, 2)",
    "CRPIX1  =",
    "CD1_1   =                  0.0",
    "CDELT1  =               -7E-05",
    "PC1_2   =                  0.1",
    "RADESYS = 'FK5'",
    "EQUINOX =               2000.0",
    "LONPOLE =                180.0",
    "LONPOLE =                 90.0",
    "CROTA2  =                  5.0",
    "PV2_1   =                  0.0",
    "CUNIT1  = 'arcsec'",
    "BITPIX  =                  -64",
    "BITPIX  =                   16",
    "NAXIS   =                    2",
    "NAXIS3  =                    2",
    "NAXIS1  =                   63",
    "BSCALE  =                  2.0",
    "BZERO   =                 10.0",
    "BLANK   =                   -1",
    "SIMPLE  =                    F",
    "EXTEND  =                    F",
    "GROUPS  =                    T",
    "HIERARCH ESO X = 1",
    "CONTINUE  'more'",
    "COMMENT   anything",
    "HISTORY   = not a value",
    "lower   =                    1",
    "END",
    "",
]


@st.composite
def _edited_sample(draw: st.DrawFn) -> bytes:
    """A clean sample with a few header cards overwritten (the data untouched)."""
    sample = bytearray(draw(st.sampled_from(CLEAN)).read_bytes())
    end = sample.index(b"END" + b" " * 77)
    for _ in range(draw(st.integers(1, 3))):
        card = draw(st.integers(1, end // 80))  # never SIMPLE: that only tests the signature
        text = draw(st.sampled_from(EDITED_CARDS)).ljust(80).encode()
        sample[card * 80 : card * 80 + 80] = text
    return bytes(sample)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=_edited_sample())
def test_edited_headers_decode_the_same_with_and_without_astropy(data, monkeypatch):
    _assert_same(data, monkeypatch, limits=DEFAULT_LIMITS)
