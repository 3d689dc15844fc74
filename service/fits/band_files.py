"""Group per-band file names into objects: ``obj_g.fits``, ``obj_r.fits`` ... -> ``obj``.

Survey cutout services hand out one file per band; ``lensserve predict`` and
``lensserve batch`` send such files as one object each (the multipart fields
``g``, ``r``, ``i`` of ``POST /v1/predict``, or
:func:`service.fits.decode.decode_band_files`). A name pattern says which part
of a file name is the object and which the band: ``{stem}_{band}.fits[.gz]``
(the default) matches ``obj_g.fits`` and ``obj_g.fits.gz``; text in square
brackets is optional, ``{stem}`` and ``{band}`` are what they say, and the rest
must match exactly (case-insensitively). Pure Python, no astropy: the pipeline
client imports it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: The name pattern of per-band files when none is given.
DEFAULT_BAND_PATTERN = "{stem}_{band}.fits[.gz]"
_PLACEHOLDER = re.compile(r"\{(stem|band)\}|\[([^\[\]]*)\]")


@dataclass(frozen=True)
class BandGroup:
    """One object's per-band files.

    Parameters
    ----------
    name : str
        The object: its folder and stem (``data/obj`` for ``data/obj_g.fits``); the key
        of its table row.
    files : tuple of (str, str)
        (band, path) of each band found, in the order of the bands asked for.
    problem : str or None
        Why the object cannot be sent (a band missing or found twice); None when it can.
    """

    name: str
    files: tuple[tuple[str, str], ...]
    problem: str | None = None


def band_pattern(pattern: str) -> re.Pattern[str]:
    """The regular expression of a name pattern such as ``{stem}_{band}.fits[.gz]``.

    Raises
    ------
    ValueError
        ``{stem}`` or ``{band}`` missing or repeated.
    """
    for placeholder in ("{stem}", "{band}"):
        if pattern.count(placeholder) != 1:
            raise ValueError(
                f"the band-file pattern {pattern!r} must hold {placeholder} once, as in "
                f"{DEFAULT_BAND_PATTERN!r}"
            )
    parts: list[str] = []
    position = 0
    for match in _PLACEHOLDER.finditer(pattern):
        parts.append(re.escape(pattern[position : match.start()]))
        if match.group(1) == "stem":
            parts.append(r"(?P<stem>.+)")
        elif match.group(1) == "band":
            parts.append(r"(?P<band>[A-Za-z0-9]+)")
        else:
            parts.append(f"(?:{_optional(match.group(2))})?")
        position = match.end()
    parts.append(re.escape(pattern[position:]))
    return re.compile("".join(parts), re.IGNORECASE)


def _optional(text: str) -> str:
    if "{" in text:
        raise ValueError(f"an optional part [{text}] of a band-file pattern cannot hold {{...}}")
    return re.escape(text)


def group_band_files(
    paths: Iterable[str], *, bands: Sequence[str], pattern: str = DEFAULT_BAND_PATTERN
) -> list[str | BandGroup]:
    """Paths grouped into objects by ``pattern``, in the order their first file comes.

    Parameters
    ----------
    paths : iterable of str
        File paths; each file name is matched against ``pattern``.
    bands : sequence of str
        The bands an object needs (those of the models, e.g. g, r, i); files of other
        bands (z, Y...) are left out.
    pattern : str
        Name pattern with ``{stem}`` and ``{band}``; ``[...]`` is optional text.

    Returns
    -------
    list of str or BandGroup
        A path whose name does not match the pattern stays a path (a whole object,
        e.g. a cube); matching files become one :class:`BandGroup` per folder and stem,
        with ``problem`` set when a band is missing or found twice.
    """
    regex = band_pattern(pattern)
    wanted = [band.lower() for band in bands]
    items: list[str | BandGroup] = []
    found: dict[str, dict[str, list[str]]] = {}
    slots: dict[str, int] = {}
    for path in paths:
        match = regex.fullmatch(os.path.basename(path))
        if match is None:
            items.append(path)
            continue
        name = os.path.join(os.path.dirname(path), match.group("stem"))
        if name not in slots:
            slots[name] = len(items)
            items.append(name)  # replaced by its group below
            found[name] = {}
        found[name].setdefault(match.group("band").lower(), []).append(path)
    for name, by_band in found.items():
        items[slots[name]] = _group(name, by_band, wanted)
    return [item for item in items if not (isinstance(item, BandGroup) and item.files == ())]


def _group(name: str, by_band: dict[str, list[str]], wanted: list[str]) -> BandGroup:
    """The group of one object; an object with only unused bands has no files."""
    files = tuple((band, by_band[band][0]) for band in wanted if band in by_band)
    if not files:
        return BandGroup(name, ())
    twice = [
        f"{band} ({', '.join(by_band[band])})" for band in wanted if len(by_band.get(band, [])) > 1
    ]
    missing = [band for band in wanted if band not in by_band]
    problem = None
    if twice:
        problem = f"got band {'; '.join(twice)} twice for {name!r}; keep one file per band"
    elif missing:
        problem = (
            f"got files for bands {', '.join(b for b, _ in files)} of {name!r}; it needs one "
            f"for each of {', '.join(wanted)} (missing {', '.join(missing)})"
        )
    return BandGroup(name, files, problem)
