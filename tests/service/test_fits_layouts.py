"""Survey layouts (issue 16): one file per band, science images among mask, weight, RMS
and PSF extensions, Euclid-MER-like multi-band files, BAND0..BANDn and g,r,i,z cubes.

Every layout is written by astropy from the pixels of one synthetic object and compared
with the plain g,r,i cube of the same pixels: the decoder must give the same pixels, and
the real app (shipped ONNX models) the same answers, within 1e-3 when nothing changes the
pixels or the noise level and within 0.02 when a weight or RMS map sets the noise level.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from astropy.io import fits
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.contract.preprocessing import preprocess_cutout
from service.errors import BandMismatchError, LensServeError, NoImageDataError
from service.fits.decode import BandFile, decode_band_files, decode_fits, decode_plain_fits
from service.settings import Settings

BANDS = ("g", "r", "i")
SIZE = 64
PIXEL_SCALE_DEG = 0.263 / 3600
#: Per-band noise of the synthetic object (file units); the weight and RMS maps state these.
NOISE = {"g": 0.8, "r": 1.0, "i": 1.3, "z": 1.6}
EXACT = 1e-3
NOISE_MAP_TOLERANCE = 0.02
SEED = 16


# ----------------------------------------------------------------------------- files


#: Ring amplitudes (file units) of two objects: one the classifier takes for a lens
#: (probability about 1), one it doubts (about 0.02), measured with the shipped models.
RINGS = {"lens": 1.5, "faint": 0.7}


def _object_planes(ring_amplitude: float = RINGS["lens"]) -> dict[str, np.ndarray]:
    """A compact red deflector with a bluer ring around it, plus Gaussian noise of
    :data:`NOISE` on a sky of 5, per band (64x64)."""
    rng = np.random.default_rng(SEED)
    y, x = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    radius = np.hypot(x, y)
    deflector = 20 * np.exp(-radius / 1.5)
    ring = (
        ring_amplitude * np.exp(-(((radius - 7) / 1.2) ** 2)) * (1 + 0.6 * np.cos(np.arctan2(y, x)))
    )
    colours = {"g": (0.5, 1.0), "r": (1.0, 0.8), "i": (1.4, 0.6), "z": (1.6, 0.4)}
    return {
        band: (a * deflector + b * ring + rng.normal(5.0, NOISE[band], (SIZE, SIZE))).astype(
            np.float32
        )
        for band, (a, b) in colours.items()
    }


def _wcs_header(*, shift_pixels: float = 0.0) -> fits.Header:
    """A TAN WCS at the DES pixel scale; ``shift_pixels`` moves the reference pixel in x."""
    header = fits.Header()
    header.update(
        CTYPE1="RA---TAN",
        CTYPE2="DEC--TAN",
        CRVAL1=150.1,
        CRVAL2=2.2,
        CRPIX1=32.5 + shift_pixels,
        CRPIX2=32.5,
        CD1_1=-PIXEL_SCALE_DEG,
        CD1_2=0.0,
        CD2_1=0.0,
        CD2_2=PIXEL_SCALE_DEG,
    )
    return header


def _fits_bytes(hdus: list[Any]) -> bytes:
    buffer = io.BytesIO()
    fits.HDUList(hdus).writeto(buffer)
    return buffer.getvalue()


def _plain_cube(planes: dict[str, np.ndarray]) -> bytes:
    header = _wcs_header()
    header["BANDS"] = "g,r,i"
    return _fits_bytes([fits.PrimaryHDU(np.stack([planes[b] for b in BANDS]), header=header)])


def _band_file(
    planes: dict[str, np.ndarray],
    band: str,
    *,
    filter_name: str | None = None,
    extensions: bool = False,
    shift_pixels: float = 0.0,
) -> bytes:
    """One band's file: a plain 2D primary image, or a DES-like SCI/MSK/WGT file."""
    header = _wcs_header(shift_pixels=shift_pixels)
    header["FILTER"] = filter_name or f"{band} DECam SDSS c0001 4720.0 1520.0"
    if not extensions:
        return _fits_bytes([fits.PrimaryHDU(planes[band], header=header)])
    primary = fits.PrimaryHDU()
    primary.header["FILTER"] = header["FILTER"]
    del header["FILTER"]
    return _fits_bytes(
        [
            primary,
            fits.ImageHDU(planes[band], header=header, name="SCI"),
            fits.ImageHDU(np.zeros((SIZE, SIZE), dtype=np.int16), name="MSK"),
            fits.ImageHDU(
                np.full((SIZE, SIZE), 1 / NOISE[band] ** 2, dtype=np.float32), name="WGT"
            ),
        ]
    )


def _euclid_mer(planes: dict[str, np.ndarray], *, rms: bool = True) -> bytes:
    """A Euclid-MER-like file: VIS (finer pixels) and four DES bands, each as *_BGSUB beside
    its *_RMS and *_PSF."""
    rng = np.random.default_rng(SEED + 1)
    hdus: list[Any] = [fits.PrimaryHDU()]
    psf = np.outer(np.hanning(21), np.hanning(21)).astype(np.float32)
    vis = fits.ImageHDU(rng.normal(0, 1, (170, 170)).astype(np.float32), name="VIS_BGSUB")
    vis.header["FILTER"] = "VIS"
    hdus += [vis, fits.ImageHDU(psf, name="VIS_PSF")]
    for band in ("g", "r", "i", "z"):
        name = f"DES_{band.upper()}"
        science = fits.ImageHDU(planes[band], header=_wcs_header(), name=f"{name}_BGSUB")
        science.header["FILTER"] = f"DECAM_{band}"
        hdus.append(science)
        if rms:
            noise = np.full((SIZE, SIZE), NOISE[band], dtype=np.float32)
            hdus.append(fits.ImageHDU(noise, name=f"{name}_RMS"))
        hdus.append(fits.ImageHDU(psf, name=f"{name}_PSF"))
    return _fits_bytes(hdus)


def _numbered_cube(planes: dict[str, np.ndarray]) -> bytes:
    """A Legacy-Survey-like cube whose planes (i, g, r) are named by BAND0..BAND2."""
    header = _wcs_header()
    header.update(BAND0="i", BAND1="g", BAND2="r")
    return _fits_bytes([fits.PrimaryHDU(np.stack([planes[b] for b in "igr"]), header=header)])


def _griz_cube(planes: dict[str, np.ndarray]) -> bytes:
    header = _wcs_header()
    header["BANDS"] = "g,r,i,z"
    return _fits_bytes([fits.PrimaryHDU(np.stack([planes[b] for b in "griz"]), header=header)])


def _band_files(planes: dict[str, np.ndarray], **kwargs: Any) -> dict[str, BandFile]:
    return {
        band: BandFile(_band_file(planes, band, **kwargs), f"obj_{band}.fits") for band in BANDS
    }


# ----------------------------------------------------------------------------- decoder


@pytest.fixture(scope="module")
def planes() -> dict[str, np.ndarray]:
    return _object_planes()


@pytest.fixture(scope="module")
def plain(planes):
    return decode_fits(_plain_cube(planes))


def test_per_band_files_decode_to_the_plain_cube_pixels(planes, plain):
    decoded = decode_band_files(_band_files(planes))
    np.testing.assert_array_equal(decoded.pixels, plain.pixels)
    assert (decoded.ra_deg, decoded.dec_deg) == pytest.approx((plain.ra_deg, plain.dec_deg))
    assert decoded.noise_sigma is None


def test_sci_msk_wgt_files_take_the_science_image_and_the_weights_noise(planes, plain):
    decoded = decode_band_files(_band_files(planes, extensions=True))
    np.testing.assert_array_equal(decoded.pixels, plain.pixels)
    # 1/sqrt(weight) of a constant inverse-variance map is the noise it was written from.
    np.testing.assert_allclose(decoded.noise_sigma, [NOISE[b] for b in BANDS], rtol=1e-6)
    assert any(
        "noise level 0.8 (file units) from the weight map WGT" in w for w in decoded.warnings
    )


def test_a_mask_extension_masks_its_nonzero_pixels(planes):
    files = _band_files(planes, extensions=True)
    with fits.open(io.BytesIO(files["r"].data)) as hdul:
        hdul["MSK"].data[10:12, 20:30] = 4  # a flagged bad column pair, 20 pixels
        buffer = io.BytesIO()
        hdul.writeto(buffer)
    files["r"] = BandFile(buffer.getvalue(), "obj_r.fits")
    decoded = decode_band_files(files)
    assert np.isnan(decoded.pixels[1, 10:12, 20:30]).all()
    assert np.count_nonzero(np.isnan(decoded.pixels)) == 20
    assert "band r: masked 20 pixels flagged in MSK (HDU 2)" in decoded.warnings


def test_a_euclid_mer_file_takes_the_bgsub_images_and_leaves_vis_z_and_the_psfs(planes, plain):
    decoded = decode_fits(_euclid_mer(planes))
    np.testing.assert_array_equal(decoded.pixels, plain.pixels)
    np.testing.assert_allclose(decoded.noise_sigma, [NOISE[b] for b in BANDS], rtol=1e-6)
    (psf_warning,) = [w for w in decoded.warnings if "PSF" in w]
    assert "DES_G_PSF" in psf_warning and "DES_I_PSF" in psf_warning
    without_rms = decode_fits(_euclid_mer(planes, rms=False))
    np.testing.assert_array_equal(without_rms.pixels, plain.pixels)
    assert without_rms.noise_sigma is None


def test_band0_and_griz_cubes_select_their_planes_by_name(planes, plain):
    for data in (_numbered_cube(planes), _griz_cube(planes)):
        decoded = decode_fits(data)
        np.testing.assert_array_equal(decoded.pixels, plain.pixels)
        # Plain float cubes stay on the fast path that reads them without astropy.
        fast = decode_plain_fits(data)
        assert fast is not None
        np.testing.assert_array_equal(fast.pixels, plain.pixels)


def test_the_fast_path_leaves_the_new_layouts_to_astropy(planes):
    assert decode_plain_fits(_euclid_mer(planes)) is None
    assert decode_plain_fits(_band_file(planes, "g")) is None


def test_band_names_are_read_from_survey_forms():
    planes = _object_planes()
    hdus: list[Any] = [fits.PrimaryHDU()]
    for band, filter_name in zip(BANDS, ("DECAM_g", "DES_R", "i DECam"), strict=True):
        hdu = fits.ImageHDU(planes[band], header=_wcs_header())
        hdu.header["FILTER"] = filter_name
        hdus.append(hdu)
    np.testing.assert_array_equal(
        decode_fits(_fits_bytes(hdus)).pixels, decode_fits(_plain_cube(planes)).pixels
    )
    by_extname = [fits.PrimaryHDU()] + [
        fits.ImageHDU(planes[b], header=_wcs_header(), name=f"DES_{b.upper()}_BGSUB") for b in BANDS
    ]
    np.testing.assert_array_equal(
        decode_fits(_fits_bytes(by_extname)).pixels, decode_fits(_plain_cube(planes)).pixels
    )


def test_noise_override_leaves_the_default_path_bit_identical(planes, plain):
    rng = np.random.default_rng(SEED)
    cube = rng.normal(0, 1, (3, SIZE, SIZE))
    masked = cube.copy()
    masked[0, 5, 5] = np.nan
    for data in (cube, masked):
        assert (
            preprocess_cutout(data).tobytes() == preprocess_cutout(data, noise_sigma=None).tobytes()
        )
        assert (
            preprocess_cutout(data).tobytes()
            == preprocess_cutout(data, noise_sigma=[None, None, None]).tobytes()
        )
    # With every band's noise known (s), the input is asinh((x - border median) / (3 s)):
    # the definition in service/contract/preprocessing.py, nothing estimated from the pixels.
    border = np.ones((SIZE, SIZE), dtype=bool)
    border[4:-4, 4:-4] = False
    background = np.array([np.median(band[border]) for band in cube])
    expected = np.arcsinh((cube - background[:, None, None]) / (3 * 2.5))
    known = preprocess_cutout(cube, noise_sigma=[2.5, 2.5, 2.5])
    np.testing.assert_allclose(known, np.moveaxis(expected, 0, -1), rtol=1e-6, atol=1e-6)
    # The shared scale is the median of the bands' levels, known or estimated.
    np.testing.assert_array_equal(preprocess_cutout(cube, noise_sigma=[None, 2.5, 2.5]), known)
    with pytest.raises(ValueError, match="positive"):
        preprocess_cutout(cube, noise_sigma=[0.0, 1.0, 1.0])


# ----------------------------------------------------------------------------- mismatches


def test_a_band_file_naming_another_band_is_refused_with_both_names(planes):
    files = _band_files(planes)
    files["g"] = BandFile(_band_file(planes, "g", filter_name="DECam r"), "obj_r.fits")
    with pytest.raises(BandMismatchError, match=r"band g \('obj_r.fits'\).*FILTER = 'DECam r'"):
        decode_band_files(files)


def test_a_missing_or_extra_band_file_is_refused(planes):
    files = _band_files(planes)
    del files["i"]
    with pytest.raises(BandMismatchError, match="missing i"):
        decode_band_files(files)
    files["i"] = files["z"] = _band_files(planes)["i"]
    with pytest.raises(BandMismatchError, match="z not used by the model"):
        decode_band_files(files)


def test_bands_whose_wcs_disagree_are_refused(planes):
    files = _band_files(planes)
    files["r"] = BandFile(_band_file(planes, "r", shift_pixels=0.8), "obj_r.fits")
    with pytest.raises(BandMismatchError, match=r"disagree.*0\.8 pixels away in band r"):
        decode_band_files(files)
    files["r"] = BandFile(_band_file(planes, "r", shift_pixels=0.3), "obj_r.fits")
    decode_band_files(files)  # within half a pixel


def test_two_rms_maps_or_a_misfit_weight_map_are_named(planes):
    data = _euclid_mer(planes)
    with fits.open(io.BytesIO(data)) as hdul:
        extra = fits.ImageHDU(hdul["DES_R_RMS"].data, name="DES_R_ERR")
        buffer = io.BytesIO()
        fits.HDUList([*hdul, extra]).writeto(buffer)
    with pytest.raises(BandMismatchError, match=r"2 rms images for band r \(DES_R_RMS"):
        decode_fits(buffer.getvalue())
    files = _band_files(planes, extensions=True)
    with fits.open(io.BytesIO(files["i"].data)) as hdul:
        hdul["WGT"].data = np.ones((SIZE, SIZE + 2), dtype=np.float32)
        buffer = io.BytesIO()
        hdul.writeto(buffer)
    files["i"] = BandFile(buffer.getvalue(), "obj_i.fits")
    with pytest.raises(BandMismatchError, match=r"weight map WGT \(HDU 3\) of band i at 66x64"):
        decode_band_files(files)


def test_a_band_file_without_a_science_image_is_named(planes):
    files = _band_files(planes)
    files["i"] = BandFile(
        _fits_bytes([fits.PrimaryHDU(), fits.ImageHDU(np.ones((SIZE, SIZE)), name="WGT")]),
        "obj_i.fits",
    )
    with pytest.raises(NoImageDataError, match=r"band i \('obj_i.fits'\): got no 2D science"):
        decode_band_files(files)


# ----------------------------------------------------------------------------- the app


def _wait_ready(test_client: TestClient, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while test_client.get("/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "the app did not become ready"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def app_client() -> Iterator[TestClient]:
    settings = Settings(device="cpu", max_files=8, max_queue_cutouts=64, max_body_bytes=4 << 20)
    with TestClient(create_app(settings)) as test_client:
        _wait_ready(test_client)
        yield test_client


def _predict(test_client: TestClient, **kwargs: Any) -> httpx.Response:
    return test_client.post("/v1/predict", params={"seed": SEED}, **kwargs)


def _one_result(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result.get("error") is None, result
    return result


def _per_band_form(files: dict[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(band, (f"obj_{band}.fits", data, "application/fits")) for band, data in files.items()]


@pytest.fixture(scope="module")
def plain_results(app_client) -> dict[str, dict[str, Any]]:
    """The answer for the plain cube of each object, by object."""
    return {
        name: _one_result(
            _predict(
                app_client,
                content=_plain_cube(_object_planes(ring)),
                headers={"content-type": "application/fits"},
            )
        )
        for name, ring in RINGS.items()
    }


def _assert_agrees(result: dict[str, Any], reference: dict[str, Any], tolerance: float) -> None:
    assert result["lens_probability"] == pytest.approx(reference["lens_probability"], abs=tolerance)
    assert result["parameters"]["theta_E"] == pytest.approx(
        reference["parameters"]["theta_E"], abs=tolerance
    )


@pytest.mark.parametrize("name", sorted(RINGS))
@pytest.mark.parametrize(
    ("layout", "tolerance"),
    [
        ("per_band_plain", EXACT),
        ("per_band_sci_msk_wgt", NOISE_MAP_TOLERANCE),
        ("euclid_mer_psf_only", EXACT),
        ("euclid_mer_rms", NOISE_MAP_TOLERANCE),
        ("band0_cube", EXACT),
        ("griz_cube", EXACT),
    ],
)
def test_each_layout_answers_as_the_plain_cube(app_client, plain_results, name, layout, tolerance):
    planes = _object_planes(RINGS[name])
    kwargs: dict[str, Any]
    if layout.startswith("per_band"):
        extensions = layout.endswith("wgt")
        files = {b: _band_file(planes, b, extensions=extensions) for b in BANDS}
        kwargs = {"files": _per_band_form(files)}
    else:
        data = {
            "euclid_mer_psf_only": lambda: _euclid_mer(planes, rms=False),
            "euclid_mer_rms": lambda: _euclid_mer(planes),
            "band0_cube": lambda: _numbered_cube(planes),
            "griz_cube": lambda: _griz_cube(planes),
        }[layout]()
        kwargs = {"content": data, "headers": {"content-type": "application/fits"}}
    result = _one_result(_predict(app_client, **kwargs))
    _assert_agrees(result, plain_results[name], tolerance)
    if tolerance == NOISE_MAP_TOLERANCE:
        assert any("noise level" in warning for warning in result["warnings"])
    if layout.startswith("per_band"):
        assert result["filename"] == "obj_g.fits+obj_r.fits+obj_i.fits"


def _error(response: httpx.Response) -> str:
    assert 400 <= response.status_code < 500, response.text
    return response.json()["error"]["message"]


def test_per_band_mistakes_are_4xx_naming_the_bands(app_client, planes):
    files = {b: _band_file(planes, b) for b in BANDS}
    wrong = {**files, "g": _band_file(planes, "g", filter_name="DECAM_r")}
    assert "FILTER = 'DECAM_r' (band r)" in _error(
        _predict(app_client, files=_per_band_form(wrong))
    )
    two = {b: files[b] for b in "gr"}
    assert "missing i" in _error(_predict(app_client, files=_per_band_form(two)))
    twice = [*_per_band_form(files), ("g", ("again_g.fits", files["g"], "application/fits"))]
    assert "got band g twice (g: obj_g.fits, g: again_g.fits)" in _error(
        _predict(app_client, files=twice)
    )
    mixed = [*_per_band_form(files), ("files", ("cube.fits", _plain_cube(planes), "x/y"))]
    assert "'files' (cube.fits) and per-band files" in _error(_predict(app_client, files=mixed))
    shifted = {**files, "i": _band_file(planes, "i", shift_pixels=1.0)}
    message = _error(_predict(app_client, files=_per_band_form(shifted)))
    assert "WCSs disagree" in message and "band i" in message
    z_only = [("z", ("obj_z.fits", files["g"], "application/fits"))]
    assert "'z'" in _error(_predict(app_client, files=z_only))


def test_the_demo_cutout_takes_per_band_files(app_client, planes, plain):
    files = {b: _band_file(planes, b) for b in BANDS}
    response = app_client.post("/v1/cutout", files=_per_band_form(files))
    assert response.status_code == 200, response.text
    pixels = np.array(response.json()["pixels"], dtype=np.float32)
    np.testing.assert_array_equal(pixels, plain.pixels)
    assert "missing i" in _error(
        app_client.post("/v1/cutout", files=_per_band_form({b: files[b] for b in "gr"}))
    )


def _with_extra_hdu(data: bytes, hdu: Any) -> bytes:
    with fits.open(io.BytesIO(data)) as hdul:
        buffer = io.BytesIO()
        fits.HDUList([*hdul, hdu]).writeto(buffer)
    return buffer.getvalue()


def test_multi_band_file_mistakes_are_4xx_naming_the_extensions(app_client, planes):
    mer = _euclid_mer(planes)
    second_rms = _with_extra_hdu(mer, fits.ImageHDU(np.ones((SIZE, SIZE)), name="DES_G_ERR"))
    second_science = _with_extra_hdu(
        mer, fits.ImageHDU(planes["r"], header=_wcs_header(), name="DES_R_FLUX")
    )
    misfit_mask = _with_extra_hdu(mer, fits.ImageHDU(np.zeros((8, 8)), name="DES_I_MSK"))
    psf_only = _fits_bytes(
        [fits.PrimaryHDU()] + [fits.ImageHDU(planes[b], name=f"DES_{b.upper()}_PSF") for b in BANDS]
    )
    expected = {
        second_rms: ["2 rms images for band g", "DES_G_RMS", "DES_G_ERR"],
        second_science: ["band r in 2 HDUs", "DES_R_BGSUB", "DES_R_FLUX"],
        misfit_mask: ["mask DES_I_MSK", "band i at 8x8", "DES_I_BGSUB"],
        psf_only: ["HDU 1: g psf", "missing g, r, i"],
    }
    for data, parts in expected.items():
        response = _predict(app_client, content=data, headers={"content-type": "application/fits"})
        assert response.status_code == 422, response.text
        message = response.json()["error"]["message"]
        assert all(part in message for part in parts), message


#: Header keywords the new layouts read, and values to put in them.
_HOSTILE_KEYWORDS = (
    b"EXTNAME",
    b"FILTER ",
    b"BAND0  ",
    b"BAND1  ",
    b"BANDS  ",
    b"CRPIX1 ",
    b"CD1_1  ",
)
_HOSTILE_VALUES = (b"'DES_G_RMS'", b"'r'", b"'MSK PSF'", b"0", b"-1E300", b"'g,g,g'", b"NaN", b"''")


def _mutant(data: bytes, rng: np.random.Generator) -> bytes:
    """``data`` with one of the keywords above given a hostile value, or bytes flipped."""
    out = bytearray(data)
    if rng.random() < 0.7:
        starts = [m.start() for key in _HOSTILE_KEYWORDS for m in re.finditer(re.escape(key), data)]
        if starts:
            start = int(rng.choice(starts))
            value = _HOSTILE_VALUES[int(rng.integers(len(_HOSTILE_VALUES)))]
            out[start + 10 : start + 80] = value.ljust(70)
            return bytes(out)
    for position in rng.integers(0, len(out), size=8):
        out[int(position)] = int(rng.integers(256))
    return bytes(out)


def test_mutated_new_layouts_raise_only_service_errors(planes):
    """200 mutants of a Euclid-MER-like file, a BAND0 cube and SCI/MSK/WGT band files: each
    decodes or raises a LensServeError, never anything else (seeded, so reproducible)."""
    rng = np.random.default_rng(SEED)
    seeds = [_euclid_mer(planes), _numbered_cube(planes)]
    files = _band_files(planes, extensions=True)
    for _ in range(100):
        try:
            decode_fits(_mutant(seeds[int(rng.integers(2))], rng))
        except LensServeError:
            pass
        band = BANDS[int(rng.integers(3))]
        mutated = {**files, band: BandFile(_mutant(files[band].data, rng), f"obj_{band}.fits")}
        try:
            decode_band_files(mutated)
        except LensServeError:
            pass
