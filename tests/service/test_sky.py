"""The plain-TAN fast path agrees with astropy's WCS, and leaves everything else to it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from hypothesis import given, settings
from hypothesis import strategies as st

from service.fits.tan_wcs import simple_tan_wcs

SAMPLES = Path(__file__).resolve().parents[2] / "examples" / "cutouts"
#: Agreement with wcslib (degrees): 1e-9 deg is 3.6 micro-arcsec.
SKY_TOLERANCE_DEG = 1e-9


def _tan_header(ra, dec, crpix, scale_arcsec, rotation_deg, flip, *, form="cd") -> fits.Header:
    c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    scale = scale_arcsec / 3600.0
    sign = -1.0 if flip else 1.0
    header = fits.Header()
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN", "DEC--TAN"
    header["CRPIX1"], header["CRPIX2"] = crpix
    header["CRVAL1"], header["CRVAL2"] = ra, dec
    header["RADESYS"] = "ICRS"
    if form == "cd":
        header["CD1_1"], header["CD1_2"] = sign * scale * c, -scale * s
        header["CD2_1"], header["CD2_2"] = sign * scale * s, scale * c
    else:
        header["CDELT1"], header["CDELT2"] = sign * scale, scale
        header["PC1_1"], header["PC1_2"], header["PC2_1"], header["PC2_2"] = c, -s, s, c
    return header


def _astropy(header: fits.Header, x: float, y: float) -> tuple[list[float], float, float]:
    wcs = WCS(header, naxis=2)
    scales = [q.to_value("arcsec") for q in wcs.proj_plane_pixel_scales()]
    ((ra, dec),) = wcs.all_pix2world([[x, y]], 0).tolist()
    return scales, ra, dec


def _assert_same_sky(ra, dec, want_ra, want_dec):
    assert dec == pytest.approx(want_dec, abs=SKY_TOLERANCE_DEG)
    # RA wraps at 360 and is compressed near the poles: compare on the sky.
    delta_ra = (ra - want_ra + 180.0) % 360.0 - 180.0
    assert abs(delta_ra) * math.cos(math.radians(want_dec)) < SKY_TOLERANCE_DEG


@settings(max_examples=300, deadline=None, database=None)
@given(
    ra=st.floats(0.0, 359.999),
    dec=st.floats(-89.5, 89.5),
    crpix=st.tuples(st.floats(-50.0, 150.0), st.floats(-50.0, 150.0)),
    scale_arcsec=st.floats(0.05, 5.0),
    rotation_deg=st.floats(-180.0, 180.0),
    flip=st.booleans(),
    form=st.sampled_from(["cd", "pc"]),
    pixel=st.tuples(st.floats(0.0, 200.0), st.floats(0.0, 200.0)),
)
def test_plain_tan_matches_astropy(ra, dec, crpix, scale_arcsec, rotation_deg, flip, form, pixel):
    header = _tan_header(ra, dec, crpix, scale_arcsec, rotation_deg, flip, form=form)
    tan = simple_tan_wcs(header)
    assert tan is not None
    want_scales, want_ra, want_dec = _astropy(header, *pixel)
    np.testing.assert_allclose(tan.pixel_scales_arcsec(), want_scales, rtol=1e-12)
    _assert_same_sky(*tan.pixel_to_sky_deg(*pixel), want_ra, want_dec)


@pytest.mark.parametrize("path", sorted((SAMPLES / "clean").glob("*.fits")), ids=lambda p: p.name)
def test_the_samples_take_the_fast_path_and_match_astropy(path):
    header = fits.getheader(path)
    tan = simple_tan_wcs(header)
    assert tan is not None
    want_scales, want_ra, want_dec = _astropy(header, 31.5, 31.5)
    np.testing.assert_allclose(tan.pixel_scales_arcsec(), want_scales, rtol=1e-12)
    _assert_same_sky(*tan.pixel_to_sky_deg(31.5, 31.5), want_ra, want_dec)


def _with(**cards) -> fits.Header:
    header = _tan_header(150.0, 2.0, (32.5, 32.5), 0.263, 10.0, True)
    for key, value in cards.items():
        header[key] = value
    return header


@pytest.mark.parametrize(
    "header",
    [
        _with(CTYPE1="RA---TAN-SIP", CTYPE2="DEC--TAN-SIP", A_ORDER=2, B_ORDER=2),
        _with(CTYPE1="GLON-TAN", CTYPE2="GLAT-TAN"),
        _with(CTYPE1="RA---SIN", CTYPE2="DEC--SIN"),
        _with(RADESYS="FK5", EQUINOX=2000.0),
        _with(CROTA2=30.0),
        _with(PV2_1=0.1),
        _with(LONPOLE=0.0),
        _with(CUNIT1="arcsec", CUNIT2="arcsec"),
        _with(CDELT1=1.0),
    ],
    ids=["sip", "galactic", "sin", "fk5", "crota", "pv", "lonpole", "arcsec", "cd+cdelt"],
)
def test_anything_but_a_plain_icrs_tan_is_left_to_astropy(header):
    assert simple_tan_wcs(header) is None


def test_no_radesys_and_no_equinox_is_icrs_as_in_the_standard():
    header = _with()
    del header["RADESYS"]
    assert simple_tan_wcs(header) is not None
    header["EQUINOX"] = 2000.0
    assert simple_tan_wcs(header) is None
