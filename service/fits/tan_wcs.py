"""Sky positions from a plain gnomonic (TAN) WCS, without building an astropy WCS.

An astropy ``WCS`` costs about 1 ms per file (it re-serialises and re-verifies
every header card before wcslib parses them), more than the three networks
take per cutout. Survey cutouts nearly always carry a plain ``RA---TAN`` /
``DEC--TAN`` WCS in ICRS; :func:`simple_tan_wcs` recognises exactly that and
returns None for anything else (distortions, other projections or frames,
rotations given as CROTA), which the caller hands to astropy instead.
Formulae: Calabretta & Greisen 2002, A&A 395, 1077, eqs. 2, 3, 54.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Keywords (prefixes) whose presence means the WCS is not a plain TAN one.
_NOT_PLAIN_PREFIXES = (
    "PV1_", "PV2_", "PS1_", "PS2_", "A_", "B_", "AP_", "BP_",
    "CPDIS", "CQDIS", "DP1", "DP2", "DQ1", "DQ2", "D2IM", "CROTA",
)  # fmt: skip
_CD_KEYS = ("CD1_1", "CD1_2", "CD2_1", "CD2_2")
_PC_KEYS = ("PC1_1", "PC1_2", "PC2_1", "PC2_2")


@dataclass(frozen=True)
class TanWcs:
    """A gnomonic projection: reference pixel, reference sky position, CD matrix.

    ``crpix`` is 1-based (FITS) pixel (x, y); ``crval_deg`` the ICRS (RA, Dec)
    there in degrees; ``cd_deg`` the 2x2 matrix (degrees per pixel) from pixel
    offsets (x, y) to intermediate world coordinates, row-major.
    """

    crpix: tuple[float, float]
    crval_deg: tuple[float, float]
    cd_deg: tuple[float, float, float, float]

    def pixel_scales_arcsec(self) -> list[float]:
        """Scale along each pixel axis (arcsec/pixel), as astropy's proj_plane_pixel_scales."""
        cd11, cd12, cd21, cd22 = self.cd_deg
        return [math.hypot(cd11, cd21) * 3600.0, math.hypot(cd12, cd22) * 3600.0]

    def pixel_to_sky_deg(self, x: float, y: float) -> tuple[float, float]:
        """ICRS (RA, Dec) in degrees of 0-based pixel (x, y); RA in [0, 360)."""
        cd11, cd12, cd21, cd22 = self.cd_deg
        dx, dy = x + 1.0 - self.crpix[0], y + 1.0 - self.crpix[1]
        world_x = math.radians(cd11 * dx + cd12 * dy)
        world_y = math.radians(cd21 * dx + cd22 * dy)
        # Native spherical coordinates of the TAN projection (C&G eq. 54).
        phi = math.atan2(world_x, -world_y)
        theta = math.atan2(1.0, math.hypot(world_x, world_y))
        # Native to celestial, pole at native longitude 180 degrees (C&G eq. 2).
        ra0, dec0 = math.radians(self.crval_deg[0]), math.radians(self.crval_deg[1])
        dphi = phi - math.pi
        ra = ra0 + math.atan2(
            -math.cos(theta) * math.sin(dphi),
            math.sin(theta) * math.cos(dec0) - math.cos(theta) * math.sin(dec0) * math.cos(dphi),
        )
        sin_dec = math.sin(theta) * math.sin(dec0) + math.cos(theta) * math.cos(dec0) * math.cos(
            dphi
        )
        dec = math.asin(max(-1.0, min(1.0, sin_dec)))
        return math.degrees(ra) % 360.0, math.degrees(dec)


def simple_tan_wcs(header: Mapping[str, Any]) -> TanWcs | None:
    """The header's WCS when it is a plain ICRS TAN projection in degrees, else None.

    A numeric keyword that holds no number (``CRPIX1 = 'r'``) gives None too: astropy
    then judges the WCS, and the decoder reports it as unusable.
    """
    try:
        return _simple_tan_wcs(header)
    except (TypeError, ValueError):
        return None


def _simple_tan_wcs(header: Mapping[str, Any]) -> TanWcs | None:
    if (_text(header, "CTYPE1"), _text(header, "CTYPE2")) != ("RA---TAN", "DEC--TAN"):
        return None
    radesys = _text(header, "RADESYS")
    # Without RADESYS, an EQUINOX means FK4/FK5 (a frame transform); neither means ICRS.
    if radesys != "ICRS" and not (radesys is None and "EQUINOX" not in header):
        return None
    if any(_text(header, key) not in (None, "deg") for key in ("CUNIT1", "CUNIT2")):
        return None
    if float(header.get("LONPOLE", 180.0)) != 180.0:
        return None
    if any(str(key).startswith(_NOT_PLAIN_PREFIXES) for key in header):
        return None
    cd = _cd_matrix(header)
    if cd is None:
        return None
    values = (
        float(header.get("CRPIX1", 0.0)),
        float(header.get("CRPIX2", 0.0)),
        float(header.get("CRVAL1", 0.0)),
        float(header.get("CRVAL2", 0.0)),
        *cd,
    )
    if not all(math.isfinite(value) for value in values):
        return None
    return TanWcs(crpix=values[0:2], crval_deg=values[2:4], cd_deg=values[4:8])


def _cd_matrix(header: Mapping[str, Any]) -> tuple[float, float, float, float] | None:
    """CD from CDi_j, or from CDELTi and PCi_j; None when both kinds are present or neither."""
    has_cd = any(key in header for key in _CD_KEYS)
    has_pc = any(key in header for key in _PC_KEYS)
    has_cdelt = "CDELT1" in header and "CDELT2" in header
    if has_cd:
        if has_pc or "CDELT1" in header or "CDELT2" in header:
            return None
        cd11, cd12, cd21, cd22 = (float(header.get(key, 0.0)) for key in _CD_KEYS)
        return cd11, cd12, cd21, cd22
    if not has_cdelt:
        return None
    cdelt1, cdelt2 = float(header["CDELT1"]), float(header["CDELT2"])
    pc11, pc12, pc21, pc22 = (
        float(header.get(key, 1.0 if key in ("PC1_1", "PC2_2") else 0.0)) for key in _PC_KEYS
    )
    return cdelt1 * pc11, cdelt1 * pc12, cdelt2 * pc21, cdelt2 * pc22


def _text(header: Mapping[str, Any], key: str) -> str | None:
    value = header.get(key)
    return value.strip() if isinstance(value, str) else None if value is None else str(value)
