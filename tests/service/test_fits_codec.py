"""Tests of service.fits.decode: every accepted layout, every limit, and hostile bytes.

FITS files are built in memory or in tmp_path with astropy from seeded RNGs;
the repository's sample cutouts (``examples/cutouts``) are the reference
layouts.
"""

import csv
import gzip
import io
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.errors import (
    BandMismatchError,
    CutoutTooSmallError,
    InferenceError,
    InvalidFitsError,
    InvalidRequestError,
    LensServeError,
    ModelUnavailableError,
    NoImageDataError,
    OverloadedError,
    PayloadTooLargeError,
    PixelScaleMismatchError,
    TooManyMaskedPixelsError,
    UnsupportedMediaTypeError,
)
from service.fits.decode import DEFAULT_LIMITS, DecodedCutout, FitsLimits, decode_fits

SAMPLES = Path(__file__).resolve().parents[2] / "examples" / "cutouts"
CLEAN = sorted((SAMPLES / "clean").glob("*.fits"))
FORMATS = sorted((SAMPLES / "formats").glob("*"))
ALL_SAMPLES = CLEAN + FORMATS
#: DES pixel scale (arcsec/pixel), as in the samples' README.
DES_PIXEL_SCALE_ARCSEC = 0.263
#: Float32 rounding (relative) when a float32 cube goes through a lossless layout.
LOSSLESS_RTOL = 1e-5


def _fits_bytes(hdus: list[fits.hdu.base._BaseHDU]) -> bytes:
    buffer = io.BytesIO()
    fits.HDUList(hdus).writeto(buffer)
    return buffer.getvalue()


def _cube(rng: np.random.Generator, shape: tuple[int, ...] = (3, 64, 64)) -> np.ndarray:
    """Sky-like float32 pixels: background 10 plus unit Gaussian noise."""
    return (10.0 + rng.normal(size=shape)).astype(np.float32)


def _celestial_header(
    *, crpix: tuple[float, float], pixel_scale_arcsec: float = DES_PIXEL_SCALE_ARCSEC
) -> fits.Header:
    """A TAN WCS header centred on (RA, Dec) = (150, 2) degrees at ``crpix`` (1-based)."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = list(crpix)
    scale_deg = pixel_scale_arcsec / 3600
    wcs.wcs.cdelt = [-scale_deg, scale_deg]
    return wcs.to_header()


def _clean(path: Path) -> np.ndarray:
    """The clean g, r, i cube of the sample object ``path`` is a layout of."""
    return fits.getdata(SAMPLES / "clean" / f"{path.name[:5]}.fits").astype(np.float32)


def _truth() -> dict[int, dict[str, str]]:
    with (SAMPLES / "truth.csv").open() as stream:
        return {int(row["id"]): row for row in csv.DictReader(stream)}


# --------------------------------------------------------------------------- errors


def test_error_codes_are_stable_snake_case_and_distinct():
    classes = [
        InvalidFitsError,
        NoImageDataError,
        BandMismatchError,
        CutoutTooSmallError,
        PixelScaleMismatchError,
        TooManyMaskedPixelsError,
        PayloadTooLargeError,
        UnsupportedMediaTypeError,
        InvalidRequestError,
        ModelUnavailableError,
        InferenceError,
        OverloadedError,
    ]
    codes = [cls.code for cls in classes]
    assert codes == [
        "invalid_fits",
        "no_image_data",
        "band_mismatch",
        "cutout_too_small",
        "pixel_scale_mismatch",
        "too_many_masked_pixels",
        "payload_too_large",
        "unsupported_media_type",
        "invalid_request",
        "model_unavailable",
        "inference_failed",
        "overloaded",
    ]
    assert all(issubclass(cls, LensServeError) for cls in classes)
    error = BandMismatchError("got 2 bands (g, r); the model needs g, r, i")
    assert str(error) == error.message == "got 2 bands (g, r); the model needs g, r, i"
    assert error.code == "band_mismatch"


# --------------------------------------------------------------------------- samples


def test_the_samples_are_there():
    assert len(CLEAN) == 12 and len(FORMATS) == 7, SAMPLES


@pytest.mark.parametrize("path", ALL_SAMPLES, ids=lambda p: p.name)
def test_every_sample_decodes_at_its_truth_position(path):
    decoded = decode_fits(path.read_bytes())
    assert isinstance(decoded, DecodedCutout)
    assert decoded.pixels.shape == (3, 64, 64)
    assert decoded.pixels.dtype == np.float32 and decoded.pixels.dtype.isnative
    assert decoded.pixels.flags.c_contiguous
    # truth.csv gives the centre's RA/Dec; 0.01 arcsec is far below a pixel (0.263 arcsec).
    row = _truth()[int(path.name[:5])]
    assert decoded.ra_deg == pytest.approx(float(row["ra"]), abs=0.01 / 3600)
    assert decoded.dec_deg == pytest.approx(float(row["dec"]), abs=0.01 / 3600)
    if path.name.endswith(("_nan.fits", "_101px.fits")):
        assert decoded.warnings
    else:
        assert decoded.warnings == () and decoded.masked_fraction == 0.0


@pytest.mark.parametrize(
    "path",
    [
        p
        for p in FORMATS
        if p.name.endswith(("_mef.fits", "_cube.fits.gz", "_f64.fits", "_101px.fits"))
    ],
    ids=lambda p: p.name,
)
def test_lossless_layouts_equal_the_clean_cube(path):
    decoded = decode_fits(path.read_bytes())
    np.testing.assert_allclose(decoded.pixels, _clean(path), rtol=LOSSLESS_RTOL, atol=0)


@pytest.mark.parametrize("path", [p for p in FORMATS if p.name.endswith("_101px.fits")])
def test_a_larger_cutout_is_cropped_to_its_centre(path):
    decoded = decode_fits(path.read_bytes())
    assert decoded.warnings == ("cropped 101x101 to the central 64x64 pixels",)
    # 37 extra pixels: 18 dropped before, 19 after (the odd one at the high-index end).
    big = fits.getdata(path)
    np.testing.assert_array_equal(decoded.pixels, big[:, 18:82, 18:82])


@pytest.mark.parametrize("path", [p for p in FORMATS if p.name.endswith("_int16.fits")])
def test_int16_layout_agrees_within_its_quantisation_rounding(path):
    bscale = fits.getheader(path)["BSCALE"]
    clean = _clean(path)
    decoded = decode_fits(path.read_bytes())
    # Rounding to the integer grid errs by BSCALE / 2, plus the file's own rounding of
    # BSCALE/BZERO (measured: 0.5023 BSCALE) and astropy's float32 scaling near BZERO ~ 233
    # (2e-5 = 0.0024 BSCALE): 0.51 BSCALE bounds all three.
    np.testing.assert_allclose(decoded.pixels, clean, rtol=0, atol=0.51 * bscale)


@pytest.mark.parametrize("path", [p for p in FORMATS if p.name.endswith("_rice.fits")])
def test_rice_layout_agrees_within_half_a_quantisation_step(path):
    with fits.open(path, disable_image_compression=True) as table:
        zscale = np.max(table[1].data["ZSCALE"])
    clean = _clean(path)
    decoded = decode_fits(path.read_bytes())
    # RICE quantises each tile to multiples of its ZSCALE: the error is at most ZSCALE / 2,
    # plus float32 rounding of the restored values (1e-6 relative is ample).
    tolerance = zscale / 2 + 1e-6 * np.abs(clean)
    assert np.all(np.abs(decoded.pixels - clean) <= tolerance)


@pytest.mark.parametrize("path", [p for p in FORMATS if p.name.endswith("_nan.fits")])
def test_masked_column_stays_nan_and_the_rest_is_exact(path):
    masked = np.isnan(fits.getdata(path))
    decoded = decode_fits(path.read_bytes())
    np.testing.assert_array_equal(np.isnan(decoded.pixels), masked)
    np.testing.assert_array_equal(decoded.pixels[~masked], _clean(path)[~masked])
    # One 64-pixel column in each of 3 bands: 192 of 12288 pixels.
    assert masked.sum() == 192
    assert decoded.masked_fraction == pytest.approx(192 / 12288, rel=1e-12)
    assert decoded.warnings == ("1.56% of pixels masked (NaN/BLANK) were filled (192 of 12288)",)


def test_gzip_is_sniffed_and_content_encoding_gzip_is_honoured():
    plain = CLEAN[3].read_bytes()
    expected = decode_fits(plain).pixels
    np.testing.assert_array_equal(decode_fits(gzip.compress(plain)).pixels, expected)
    # A .fits.gz sent with Content-Encoding: gzip is gzipped twice.
    twice = gzip.compress(gzip.compress(plain))
    np.testing.assert_array_equal(decode_fits(twice, content_encoding="gzip").pixels, expected)
    # Concatenated gzip members are one stream (RFC 1952, section 2.2).
    members = gzip.compress(plain[:10000]) + gzip.compress(plain[10000:])
    np.testing.assert_array_equal(decode_fits(members).pixels, expected)
    np.testing.assert_array_equal(decode_fits(bytearray(plain)).pixels, expected)


# --------------------------------------------------------------------------- layouts


def test_cube_planes_are_reordered_by_bands_keyword():
    rng = np.random.default_rng(1)
    gri = _cube(rng)
    shuffled = fits.PrimaryHDU(gri[[2, 0, 1]])
    shuffled.header["BANDS"] = "I G R"
    decoded = decode_fits(_fits_bytes([shuffled]))
    np.testing.assert_array_equal(decoded.pixels, gri)
    # A subset and another order of what the file holds.
    decoded = decode_fits(_fits_bytes([shuffled]), bands=("r", "g"))
    np.testing.assert_array_equal(decoded.pixels, gri[[1, 0]])


def test_cube_without_bands_keyword_is_read_as_g_r_i_with_a_warning():
    rng = np.random.default_rng(2)
    gri = _cube(rng)
    decoded = decode_fits(_fits_bytes([fits.PrimaryHDU(gri)]))
    np.testing.assert_array_equal(decoded.pixels, gri)
    assert decoded.warnings == ("no BANDS keyword: assumed the planes are g, r, i",)
    assert decoded.ra_deg is None and decoded.dec_deg is None


def test_cube_in_the_first_image_extension_with_leading_unit_axis():
    rng = np.random.default_rng(3)
    gri = _cube(rng)
    extension = fits.ImageHDU(gri[np.newaxis], name="SCI")
    extension.header["BANDS"] = "g,r,i"
    decoded = decode_fits(_fits_bytes([fits.PrimaryHDU(), extension]))
    np.testing.assert_array_equal(decoded.pixels, gri)


@pytest.mark.parametrize(
    ("keyword", "values"),
    [
        ("FILTER", ("g", "r", "i")),
        ("FILTER", ("DECam g", "DECam r", "DECam i")),
        (
            "FILTER",
            (
                "g DECam SDSS c0001 4720.0 1520.0",
                "r DECam SDSS c0002 6415.0 1480.0",
                "i DECam SDSS c0003 7835.0 1470.0",
            ),
        ),
        ("FILTER", ("DES g", "DES r", "DES i")),
        ("BAND", ("G", "R", "I")),
        ("EXTNAME", ("g", "R", "i")),
    ],
)
def test_one_2d_extension_per_band_in_any_order(keyword, values):
    rng = np.random.default_rng(4)
    gri = _cube(rng)
    hdus = [fits.PrimaryHDU()]
    for plane in (2, 0, 1):  # extensions in i, g, r order
        extension = fits.ImageHDU(gri[plane])
        extension.header[keyword] = values[plane]
        hdus.append(extension)
    decoded = decode_fits(_fits_bytes(hdus))
    np.testing.assert_array_equal(decoded.pixels, gri)


def test_non_square_cutout_is_cropped_with_the_odd_pixel_left_at_the_high_end():
    rng = np.random.default_rng(5)
    big = _cube(rng, (3, 70, 81))
    hdu = fits.PrimaryHDU(big, header=_celestial_header(crpix=(10.0, 20.0)))
    hdu.header["BANDS"] = "g,r,i"
    decoded = decode_fits(_fits_bytes([hdu]))
    # (70 - 64) // 2 = 3 rows and (81 - 64) // 2 = 8 columns before; 3 and 9 after.
    np.testing.assert_array_equal(decoded.pixels, big[:, 3:67, 8:72])
    assert decoded.warnings == ("cropped 81x70 to the central 64x64 pixels",)
    # Centre of the crop: 0-based pixel (8 + 31.5, 3 + 31.5) of the original image.
    expected = WCS(hdu.header).celestial.pixel_to_world(8 + 31.5, 3 + 31.5)
    assert decoded.ra_deg == pytest.approx(expected.ra.deg, abs=1e-9)
    assert decoded.dec_deg == pytest.approx(expected.dec.deg, abs=1e-9)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.int64])
def test_integer_bitpix_with_bscale_bzero_blank(dtype):
    rng = np.random.default_rng(6)
    info = np.iinfo(dtype)
    raw = rng.integers(max(info.min, -100), min(info.max, 200), size=(3, 64, 64)).astype(dtype)
    blank = int(info.max)
    raw[1, 10, 20:30] = blank
    hdu = fits.PrimaryHDU(raw, do_not_scale_image_data=True)
    hdu.header.update({"BSCALE": 0.25, "BZERO": -7.0, "BLANK": blank, "BANDS": "g,r,i"})
    decoded = decode_fits(_fits_bytes([hdu]))
    # FITS 4.0 eq. 3: physical = BZERO + BSCALE * stored; BLANK marks undefined pixels.
    expected = raw.astype(np.float64) * 0.25 - 7.0
    expected[raw == blank] = np.nan
    np.testing.assert_allclose(decoded.pixels, expected, rtol=1e-7, atol=0)
    assert decoded.masked_fraction == pytest.approx(10 / raw.size, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_bitpix_with_bscale_bzero(dtype):
    rng = np.random.default_rng(7)
    raw = rng.normal(size=(3, 64, 64)).astype(dtype)
    hdu = fits.PrimaryHDU(raw, do_not_scale_image_data=True)
    hdu.header.update({"BSCALE": 2.0, "BZERO": 100.0})
    decoded = decode_fits(_fits_bytes([hdu]))
    np.testing.assert_allclose(decoded.pixels, raw * 2.0 + 100.0, rtol=LOSSLESS_RTOL)


def test_tile_compressed_integer_cube_is_lossless():
    rng = np.random.default_rng(8)
    raw = rng.integers(0, 5000, size=(3, 64, 64)).astype(np.int32)
    compressed = fits.CompImageHDU(raw, compression_type="RICE_1")
    compressed.header["BANDS"] = "g,r,i"
    decoded = decode_fits(_fits_bytes([fits.PrimaryHDU(), compressed]))
    np.testing.assert_array_equal(decoded.pixels, raw.astype(np.float32))


def test_wcs_in_another_frame_gives_icrs_coordinates():
    rng = np.random.default_rng(9)
    header = _celestial_header(crpix=(32.5, 32.5))
    header["CTYPE1"], header["CTYPE2"] = "GLON-TAN", "GLAT-TAN"
    hdu = fits.PrimaryHDU(_cube(rng), header=header)
    decoded = decode_fits(_fits_bytes([hdu]))
    expected = SkyCoord(l=150.0 * u.deg, b=2.0 * u.deg, frame="galactic").icrs
    assert decoded.ra_deg == pytest.approx(expected.ra.deg, abs=1e-9)
    assert decoded.dec_deg == pytest.approx(expected.dec.deg, abs=1e-9)


def test_pixel_scale_within_two_percent_is_accepted():
    rng = np.random.default_rng(10)
    header = _celestial_header(crpix=(32.5, 32.5), pixel_scale_arcsec=0.263 * 1.015)
    decoded = decode_fits(_fits_bytes([fits.PrimaryHDU(_cube(rng), header=header)]))
    assert decoded.ra_deg == pytest.approx(150.0, abs=1e-9)


def test_a_broken_wcs_is_ignored_with_a_warning():
    rng = np.random.default_rng(11)
    header = _celestial_header(crpix=(32.5, 32.5))
    header["CTYPE1"], header["CTYPE2"] = "RA---XYZ", "DEC--XYZ"
    hdu = fits.PrimaryHDU(_cube(rng), header=header)
    hdu.header["BANDS"] = "g,r,i"
    decoded = decode_fits(_fits_bytes([hdu]))
    assert decoded.ra_deg is None and decoded.dec_deg is None
    assert len(decoded.warnings) == 1 and decoded.warnings[0].startswith("ignored the WCS")


def test_infinite_pixels_count_as_masked():
    rng = np.random.default_rng(12)
    cube = _cube(rng)
    cube[0, 0, :8] = np.inf
    decoded = decode_fits(_fits_bytes([fits.PrimaryHDU(cube)]))
    assert np.isnan(decoded.pixels[0, 0, :8]).all()
    assert decoded.masked_fraction == pytest.approx(8 / cube.size, rel=1e-12)


def test_concurrent_decodes_agree_and_leave_the_warning_filters_alone():
    before = list(warnings.filters)
    paths = ALL_SAMPLES * 4
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda path: decode_fits(path.read_bytes()), paths))
    for path, result in zip(paths, results, strict=True):
        np.testing.assert_array_equal(result.pixels, decode_fits(path.read_bytes()).pixels)
    assert warnings.filters == before


# --------------------------------------------------------------------------- refusals


def _huge_header() -> bytes:
    """A primary header claiming a 100000 x 100000 x 3 float32 cube (120 GB), and no data."""
    header = fits.Header()
    header["SIMPLE"] = True
    header["BITPIX"] = -32
    header["NAXIS"] = 3
    header["NAXIS1"] = 100_000
    header["NAXIS2"] = 100_000
    header["NAXIS3"] = 3
    return header.tostring().encode("ascii")


def _gzip_bomb(decompressed_bytes: int) -> bytes:
    """Gzip of a valid 3x64x64 header followed by zeros, ``decompressed_bytes`` in all.

    Compresses one 1 MiB chunk of zeros and repeats its bytes: after a full
    flush deflate forgets its history, so every chunk compresses identically.
    The gzip header and CRC-32/size trailer are written by hand (RFC 1952).
    """
    header = fits.PrimaryHDU(np.zeros((3, 64, 64), np.float32)).header.tostring().encode()
    chunk = bytes(1 << 20)
    count = (decompressed_bytes - len(header)) // len(chunk)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = deflate.compress(header) + deflate.flush(zlib.Z_FULL_FLUSH)
    repeated = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    tail = deflate.flush(zlib.Z_FINISH)
    crc = zlib.crc32(header)
    for _ in range(count):
        crc = zlib.crc32(chunk, crc)
    size = len(header) + count * len(chunk)
    return b"".join(
        [
            b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff",
            head,
            repeated * count,
            tail,
            crc.to_bytes(4, "little"),
            (size % 2**32).to_bytes(4, "little"),
        ]
    )


def _bad_inputs() -> dict[str, tuple[bytes, type[LensServeError], tuple[str, ...]]]:
    """Hostile files: the error each must raise and phrases its message must contain."""
    rng = np.random.default_rng(13)
    clean = CLEAN[0].read_bytes()
    table = fits.BinTableHDU.from_columns([fits.Column(name="flux", format="E", array=[1.0])])
    two_bands = fits.PrimaryHDU(_cube(rng, (2, 64, 64)))
    two_bands.header["BANDS"] = "g,r"
    uvw = fits.PrimaryHDU(_cube(rng))
    uvw.header["BANDS"] = "u,v,w"
    coarse = fits.PrimaryHDU(
        _cube(rng), header=_celestial_header(crpix=(32.5, 32.5), pixel_scale_arcsec=0.5)
    )
    coarse.header["BANDS"] = "g,r,i"
    return {
        "random_bytes": (rng.bytes(5760), InvalidFitsError, ("not a FITS file", "accepted")),
        "empty": (b"", InvalidFitsError, ("empty", "accepted")),
        "truncated_fits": (clean[: len(clean) // 2], InvalidFitsError, ("truncated",)),
        "text": (b"RA,Dec\n170.85,-53.17\n" * 20, InvalidFitsError, ("b'RA,Dec",)),
        "bintable_only": (
            _fits_bytes([fits.PrimaryHDU(), table]),
            NoImageDataError,
            ("BinTableHDU", "PrimaryHDU without data", "accepted"),
        ),
        "single_2d_band": (
            _fits_bytes([fits.PrimaryHDU(_cube(rng, (64, 64)))]),
            BandMismatchError,
            ("got 1 2D image (HDU 0: no band named); the model needs g, r, i",),
        ),
        "cube_20x20": (
            _fits_bytes([fits.PrimaryHDU(_cube(rng, (3, 20, 20)))]),
            CutoutTooSmallError,
            ("20x20", "at least 64x64"),
        ),
        "header_claiming_100000x100000x3": (
            _huge_header(),
            PayloadTooLargeError,
            ("3 x 100000 x 100000", "30000000000 pixels", f"at most {DEFAULT_LIMITS.max_pixels}"),
        ),
        "all_nan": (
            _fits_bytes([fits.PrimaryHDU(np.full((3, 64, 64), np.nan, np.float32))]),
            TooManyMaskedPixelsError,
            ("g, r, i are entirely masked",),
        ),
        "two_band_cube": (
            _fits_bytes([two_bands]),
            BandMismatchError,
            ("got 2 bands (g, r); the model needs g, r, i",),
        ),
        "bands_u_v_w": (
            _fits_bytes([uvw]),
            BandMismatchError,
            ("got 3 bands (u, v, w); the model needs g, r, i",),
        ),
        "wrong_pixel_scale": (
            _fits_bytes([coarse]),
            PixelScaleMismatchError,
            ("0.5 x 0.5 arcsec/pixel", "needs 0.263 arcsec/pixel"),
        ),
        "gzip_of_text": (
            gzip.compress(b"hello " * 1000),
            InvalidFitsError,
            ("not a FITS file",),
        ),
        "truncated_gzip": (
            gzip.compress(clean)[:-100],
            InvalidFitsError,
            ("ends early",),
        ),
        "corrupt_gzip": (
            b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4,
            InvalidFitsError,
            ("corrupt gzip",),
        ),
        "gzip_with_trailing_garbage": (
            gzip.compress(clean) + b"garbage",
            InvalidFitsError,
            ("trailing data",),
        ),
    }


BAD_INPUTS = _bad_inputs()


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_a_bad_input_raises_its_error_with_a_helpful_message(name):
    data, error, phrases = BAD_INPUTS[name]
    with pytest.raises(error) as caught:
        decode_fits(data)
    message = str(caught.value)
    assert message.startswith("got "), message
    for phrase in phrases:
        assert phrase in message, message


def test_a_400_megabyte_gzip_bomb_is_refused_quickly():
    bomb = _gzip_bomb(400 * 2**20)
    assert len(bomb) < 2**20
    started = time.perf_counter()
    with pytest.raises(
        PayloadTooLargeError, match=f"more than {DEFAULT_LIMITS.max_decompressed_bytes} bytes"
    ):
        decode_fits(bomb)
    # Inflating zeros runs at ~1 GB/s: the 64 MiB cap costs well under 5 s on any CI machine.
    assert time.perf_counter() - started < 5.0
    with pytest.raises(PayloadTooLargeError, match="more than 1048576 bytes"):
        decode_fits(bomb, limits=FitsLimits(max_decompressed_bytes=2**20))


def test_a_small_gzip_bomb_is_well_formed():
    """The bomb builder makes real gzip: the standard library inflates it, CRC included."""
    bomb = _gzip_bomb(8 * 2**20)
    # One 2880-byte header block, then as many whole MiB of zeros as fit: 7.
    assert gzip.decompress(bomb) == fits.PrimaryHDU(
        np.zeros((3, 64, 64), np.float32)
    ).header.tostring().encode() + bytes(7 * 2**20)


def test_a_plain_file_over_the_decompressed_limit_is_refused():
    with pytest.raises(PayloadTooLargeError, match="54720-byte FITS file"):
        decode_fits(CLEAN[0].read_bytes(), limits=FitsLimits(max_decompressed_bytes=50_000))


def test_the_pixel_limit_applies_per_image_before_reading():
    with pytest.raises(PayloadTooLargeError, match="3 x 64 x 64 image in HDU 0"):
        decode_fits(CLEAN[0].read_bytes(), limits=FitsLimits(max_pixels=12287))
    assert decode_fits(CLEAN[0].read_bytes(), limits=FitsLimits(max_pixels=12288))


@pytest.mark.parametrize("where", ["primary", "extension"])
def test_too_many_header_cards_are_refused_before_parsing(where):
    rng = np.random.default_rng(14)
    hdus = [fits.PrimaryHDU(_cube(rng)), fits.ImageHDU(_cube(rng, (64, 64)))]
    long_header = hdus[0 if where == "primary" else 1].header
    for index in range(3000):
        long_header[f"K{index}"] = index
    data = _fits_bytes(hdus)
    # "more than": the raw scan stopped counting at the limit, before astropy parsed the header.
    with pytest.raises(PayloadTooLargeError, match="more than 2000 cards"):
        decode_fits(data)
    assert decode_fits(data, limits=FitsLimits(max_header_cards=3100))


def test_bytes_after_the_last_hdu_are_not_mistaken_for_a_long_header():
    data = CLEAN[0].read_bytes() + bytes(2880 * 100)  # 9000 blank "cards" of zeros
    np.testing.assert_array_equal(
        decode_fits(data).pixels, decode_fits(CLEAN[0].read_bytes()).pixels
    )


def test_too_many_hdus_are_refused():
    rng = np.random.default_rng(15)
    hdus = [fits.PrimaryHDU(_cube(rng))] + [fits.ImageHDU() for _ in range(64)]
    with pytest.raises(PayloadTooLargeError, match="more than 64 HDUs"):
        decode_fits(_fits_bytes(hdus))


def test_masking_beyond_the_limit_or_of_a_whole_band_is_refused():
    rng = np.random.default_rng(16)
    cube = _cube(rng)
    cube[:, :17, :] = np.nan  # 17 of 64 rows: 26.6% of the cutout
    with pytest.raises(TooManyMaskedPixelsError, match=r"26.6% of the cutout; at most 25%"):
        decode_fits(_fits_bytes([fits.PrimaryHDU(cube)]))
    accepted = decode_fits(
        _fits_bytes([fits.PrimaryHDU(cube)]), limits=FitsLimits(max_masked_fraction=0.3)
    )
    assert accepted.masked_fraction == pytest.approx(17 / 64, rel=1e-12)
    one_band = _cube(rng)
    one_band[2] = np.nan
    with pytest.raises(TooManyMaskedPixelsError, match="band\\(s\\) i are entirely masked"):
        decode_fits(
            _fits_bytes([fits.PrimaryHDU(one_band)]), limits=FitsLimits(max_masked_fraction=0.5)
        )


def test_band_extension_problems_are_named():
    rng = np.random.default_rng(17)
    g, r = fits.ImageHDU(_cube(rng, (64, 64))), fits.ImageHDU(_cube(rng, (64, 64)))
    g.header["FILTER"], r.header["FILTER"] = "g", "r"
    unnamed = fits.ImageHDU(_cube(rng, (64, 64)), name="SCI")
    with pytest.raises(BandMismatchError, match="HDU 1: g, HDU 2: r, HDU 3: no band named"):
        decode_fits(_fits_bytes([fits.PrimaryHDU(), g, r, unnamed]))
    again = fits.ImageHDU(_cube(rng, (64, 64)))
    again.header["FILTER"] = "DECam r"
    i = fits.ImageHDU(_cube(rng, (64, 64)))
    i.header["FILTER"] = "i"
    with pytest.raises(BandMismatchError, match="got band r in 2 HDUs"):
        decode_fits(_fits_bytes([fits.PrimaryHDU(), g, r, again, i]))
    wide = fits.ImageHDU(_cube(rng, (64, 70)))
    wide.header["FILTER"] = "i"
    with pytest.raises(BandMismatchError, match="different sizes .*i 70x64"):
        decode_fits(_fits_bytes([fits.PrimaryHDU(), g, r, wide]))


def test_cube_band_problems_are_named():
    rng = np.random.default_rng(18)
    four = fits.PrimaryHDU(_cube(rng, (4, 64, 64)))
    with pytest.raises(BandMismatchError, match="4-plane cube without a BANDS keyword"):
        decode_fits(_fits_bytes([four]))
    four.header["BANDS"] = "g,r,i"
    with pytest.raises(BandMismatchError, match="names 3 bands"):
        decode_fits(_fits_bytes([four]))
    four.header["BANDS"] = "g,r,r,i"
    with pytest.raises(BandMismatchError, match=r"\(r repeated\)"):
        decode_fits(_fits_bytes([four]))
    four.header["BANDS"] = "g,r,i,z"
    assert decode_fits(_fits_bytes([four])).pixels.shape == (3, 64, 64)


def test_unusable_dimensions_and_encodings_are_refused():
    rng = np.random.default_rng(19)
    line = fits.PrimaryHDU(_cube(rng, (64,)))
    with pytest.raises(NoImageDataError, match="1-dimensional image"):
        decode_fits(_fits_bytes([line]))
    hypercube = fits.PrimaryHDU(_cube(rng, (2, 3, 64, 64)))
    with pytest.raises(NoImageDataError, match="4-dimensional image of shape 2x3x64x64"):
        decode_fits(_fits_bytes([hypercube]))
    plain = CLEAN[0].read_bytes()
    with pytest.raises(UnsupportedMediaTypeError, match="'br'; accepted: gzip or identity"):
        decode_fits(plain, content_encoding="br")
    with pytest.raises(InvalidFitsError, match="does not start with the gzip magic"):
        decode_fits(plain, content_encoding="gzip")
    assert decode_fits(plain, content_encoding="identity")


def test_bad_arguments_are_programming_errors():
    plain = CLEAN[0].read_bytes()
    for bands in ((), ("g", "G"), "gri"):
        with pytest.raises(ValueError, match="bands"):
            decode_fits(plain, bands=bands)
    with pytest.raises(ValueError, match="size_pixels"):
        decode_fits(plain, size_pixels=0)
    with pytest.raises(ValueError, match="pixel_scale_arcsec"):
        decode_fits(plain, pixel_scale_arcsec=-1.0)
    with pytest.raises(ValueError, match="max_masked_fraction"):
        FitsLimits(max_masked_fraction=1.5)


# --------------------------------------------------------------------------- fuzzing

#: Header cards a fuzzer splices into real headers: structural lies and nonsense.
HOSTILE_CARDS = [
    "BITPIX  =                    7",
    "BITPIX  =                  -64",
    "NAXIS   =                    5",
    "NAXIS   =                   -1",
    "NAXIS1  =            999999999",
    "NAXIS2  =                    0",
    "NAXIS3  =                    1",
    "BSCALE  =                1E308",
    "BZERO   =                  NaN",
    "BLANK   =                  1.5",
    "PCOUNT  =            100000000",
    "ZTILE1  =            100000000",
    "ZNAXIS1 =                10000",
    "ZCMPTYPE= 'HCOMPRESS_1'",
    "ZBITPIX =                   13",
    "BANDS   = 'g,g,g'",
    "FILTER  = 'r'",
    "CTYPE1  = 'RA---ZPN'",
    "CDELT1  =                  0.0",
    "CRVAL2  =                 95.0",
    "PV2_1   =                  1E9",
    "END",
    "XTENSION= 'BINTABLE'",
    "SIMPLE  =                    F",
]


def _decodes_or_refuses(data: bytes) -> None:
    """Decoding returns a well-formed cutout or raises a LensServeError; nothing else."""
    try:
        decoded = decode_fits(data, limits=FitsLimits(max_pixels=2**20))
    except LensServeError as error:
        assert str(error)
        return
    assert decoded.pixels.shape == (3, 64, 64) and decoded.pixels.dtype == np.float32
    assert 0.0 <= decoded.masked_fraction <= 0.25


@st.composite
def _mutated_samples(draw: st.DrawFn) -> bytes:
    """A sample file (any layout) with its bytes flipped, cards replaced and/or truncated."""
    sample = bytearray(draw(st.sampled_from(ALL_SAMPLES)).read_bytes())
    if draw(st.booleans()) and sample[:2] == b"\x1f\x8b":
        sample = bytearray(gzip.decompress(bytes(sample)))
    for _ in range(draw(st.integers(0, 3))):
        card = draw(st.integers(0, min(len(sample), 2880 * 4) // 80 - 1))
        text = draw(st.sampled_from(HOSTILE_CARDS)).ljust(80).encode()
        sample[card * 80 : card * 80 + 80] = text
    for _ in range(draw(st.integers(0, 8))):
        position = draw(st.integers(0, len(sample) - 1))
        sample[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        sample = sample[: draw(st.integers(0, len(sample)))]
    if draw(st.booleans()):
        sample = bytearray(gzip.compress(bytes(sample), compresslevel=1))
    return bytes(sample)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated_samples())
def test_fuzz_mutated_samples_raise_only_lensserve_errors(data):
    _decodes_or_refuses(data)


@settings(max_examples=100, deadline=None)
@given(
    cards=st.lists(st.sampled_from(HOSTILE_CARDS), max_size=12),
    tail=st.binary(max_size=6000),
)
def test_fuzz_random_headers_raise_only_lensserve_errors(cards, tail):
    head = ["SIMPLE  =                    T", *cards, "END"]
    header = "".join(card.ljust(80) for card in head).encode()
    _decodes_or_refuses(header + b" " * (-len(header) % 2880) + tail)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=4000))
def test_fuzz_random_bytes_raise_only_lensserve_errors(data):
    _decodes_or_refuses(data)
    _decodes_or_refuses(b"\x1f\x8b" + data)
    _decodes_or_refuses(b"SIMPLE  =" + data)
