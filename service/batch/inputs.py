"""Turn the INPUTS of ``lensserve batch`` into one ordered list of cutout paths.

Each input is read as one of:

- a glob (``*``, ``?`` or ``[`` in it, ``**`` recursing): its matches, sorted;
- a folder: every FITS file below it (:data:`FITS_SUFFIXES`), sorted;
- a list of paths (:data:`LIST_SUFFIXES`): one path a line, blank lines and
  ``#`` comments skipped, relative paths taken from the list's folder;
- anything else: one cutout path, kept even when it does not exist, so that
  the run reports it as an error row instead of losing it.

Paths are made absolute (workers may run elsewhere in the file system) and
the first occurrence of a repeated path wins, so a table has one row per file.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from service.errors import InvalidBatchInputError

#: Endings read as FITS cutouts when a folder is searched.
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fz", ".fits.gz", ".fit.gz", ".fts.gz")
#: Endings read as text files listing one path a line.
LIST_SUFFIXES = (".txt", ".lst", ".list")
_GLOB_CHARACTERS = frozenset("*?[")


def resolve_inputs(inputs: Sequence[str]) -> list[str]:
    """Expand globs, folders and lists of paths into absolute cutout paths.

    Parameters
    ----------
    inputs : sequence of str
        What the user named, in order.

    Returns
    -------
    list of str
        Absolute paths, in the order the inputs name them, each once.

    Raises
    ------
    InvalidBatchInputError
        No input given, a glob or folder that holds no FITS file, or a list
        of paths that cannot be read.
    """
    if not inputs:
        raise InvalidBatchInputError("got no inputs; name FITS files, globs, folders or lists")
    seen: dict[str, None] = {}
    for spec in inputs:
        for path in _expand(spec):
            seen.setdefault(os.path.abspath(path), None)
    return list(seen)


def _expand(spec: str) -> Iterable[str]:
    if _GLOB_CHARACTERS & set(spec):
        return _expand_glob(spec)
    if os.path.isdir(spec):
        return _expand_folder(spec)
    if spec.lower().endswith(LIST_SUFFIXES):
        return _read_list(Path(spec))
    return [spec]


def _is_fits_name(name: str) -> bool:
    return name.lower().endswith(FITS_SUFFIXES)


def _expand_glob(pattern: str) -> list[str]:
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    paths = [
        p for match in matches for p in (_expand_folder(match) if os.path.isdir(match) else [match])
    ]
    if not paths:
        raise InvalidBatchInputError(f"the glob {pattern!r} matches no file")
    return paths


def _expand_folder(folder: str) -> list[str]:
    paths = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if _is_fits_name(name)
    )
    if not paths:
        raise InvalidBatchInputError(
            f"the folder {folder!r} holds no FITS file (endings {', '.join(FITS_SUFFIXES)})"
        )
    return paths


def _read_list(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidBatchInputError(f"cannot read the list of paths {str(path)!r}: {exc}") from exc
    entries = (line.strip() for line in lines)
    return [
        str(path.parent / os.path.expanduser(entry))
        for entry in entries
        if entry and not entry.startswith("#")
    ]
