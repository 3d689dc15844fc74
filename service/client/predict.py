"""``lensserve predict``: send FITS files to a running service and write one table row each.

The table (astropy: CSV, ECSV, FITS or VOTable by the ending of ``--out``)
has one row per input file, keyed by ``filename`` (the path as given), or with
``--group-bands`` one row per object sent as one file per band, keyed by its
folder and stem (``data/obj`` for ``data/obj_g.fits``, ``data/obj_r.fits``, ...):
position, lens probability, the SIE parameters, the theta_E distribution,
and ``error_code``/``error`` for a file that failed.

The table is rewritten atomically (temporary file, then rename) when a file
finishes at least ``checkpoint_s`` seconds after the last rewrite, and at the
end, so a killed run leaves a valid table of most of the files finished;
``--resume`` keeps its successful rows, skips those files and sends the rest,
failed ones included.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import MaskedColumn, Table
from tqdm import tqdm

from service.client.client import Item, LensClient, LensPrediction, RetryPolicy, item_key
from service.fits.band_files import group_band_files

#: astropy writer of each output ending.
FORMAT_BY_SUFFIX: dict[str, str] = {
    ".csv": "ascii.csv",
    ".ecsv": "ascii.ecsv",
    ".fits": "fits",
    ".vot": "votable",
    ".xml": "votable",
}
QUANTILE_KEYS = ("0.025", "0.16", "0.5", "0.84", "0.975")
#: Float columns in table order, with units.
FLOAT_COLUMNS: tuple[tuple[str, str | None], ...] = (
    ("ra", "deg"),
    ("dec", "deg"),
    ("lens_probability", None),
    ("theta_E", "arcsec"),
    ("e1", None),
    ("e2", None),
    ("center_x", "arcsec"),
    ("center_y", "arcsec"),
    ("theta_E_mean", "arcsec"),
    ("theta_E_std", "arcsec"),
    ("theta_E_aleatoric_std", "arcsec"),
    ("theta_E_epistemic_std", "arcsec"),
    *((f"theta_E_q{key.replace('.', '_')}", "arcsec") for key in QUANTILE_KEYS),
)
STRING_COLUMNS = ("warnings", "error_code", "error")
#: Files a folder given on the command line contributes.
FITS_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fits.fz")


@dataclass(frozen=True)
class PredictSummary:
    """What a run did (counts of files)."""

    total: int
    skipped: int
    succeeded: int
    failures: tuple[LensPrediction, ...]
    retries: int


def table_format(path: Path) -> str:
    """astropy's format name for an output path; ValueError for an unknown ending."""
    fmt = FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"cannot tell the table format of {str(path)!r}; end it with "
            f"{', '.join(FORMAT_BY_SUFFIX)}"
        )
    return fmt


def prediction_row(prediction: LensPrediction) -> dict[str, object]:
    """The flat table row of one prediction; missing numbers are NaN."""
    row: dict[str, object] = {name: math.nan for name, _ in FLOAT_COLUMNS}
    row.update(filename=prediction.path, warnings="; ".join(prediction.warnings))
    row.update(error_code="", error="")
    if prediction.error is not None:
        row.update(error_code=prediction.error.code, error=prediction.error.message)
    if prediction.ra_deg is not None and prediction.dec_deg is not None:
        row.update(ra=prediction.ra_deg, dec=prediction.dec_deg)
    if prediction.lens_probability is not None:
        row["lens_probability"] = prediction.lens_probability
    if prediction.parameters is not None:
        row.update(vars(prediction.parameters))
    radius = prediction.einstein_radius
    if radius is not None:
        row.update(
            theta_E_mean=radius.mean,
            theta_E_std=radius.std,
            theta_E_aleatoric_std=radius.aleatoric_std,
            theta_E_epistemic_std=radius.epistemic_std,
        )
        for key in QUANTILE_KEYS:
            row[f"theta_E_q{key.replace('.', '_')}"] = radius.quantiles.get(key, math.nan)
    return row


def rows_table(rows: Sequence[dict[str, object]]) -> Table:
    """The output table; NaN numbers are masked so every format writes them as missing."""
    table = Table()
    table["filename"] = np.array([str(row["filename"]) for row in rows], dtype=str)
    for name, unit in FLOAT_COLUMNS:
        values = np.array([row[name] for row in rows], dtype=np.float64)
        table[name] = MaskedColumn(values, mask=np.isnan(values), unit=unit)
    for name in STRING_COLUMNS:
        table[name] = np.array([str(row[name]) for row in rows], dtype=str)
    return table


def write_table(rows: Sequence[dict[str, object]], out: Path) -> None:
    """Write ``rows`` to ``out`` atomically: readers never see a half-written table."""
    partial = out.with_name(f".{out.name}.partial{out.suffix}")
    rows_table(rows).write(partial, format=table_format(out), overwrite=True)
    os.replace(partial, out)


def _text(value: object) -> str:
    """A table cell as text; masked and missing cells are ''."""
    if value is None or np.ma.is_masked(value):
        return ""
    return str(value)


def read_finished_rows(out: Path) -> list[dict[str, object]]:
    """The successful rows of an earlier run's table (those without an error_code)."""
    table = Table.read(out, format=table_format(out))
    rows: list[dict[str, object]] = []
    for record in table:
        if _text(record["error_code"]):
            continue
        row: dict[str, object] = {"filename": _text(record["filename"])}
        for name, _ in FLOAT_COLUMNS:
            value = record[name]
            row[name] = math.nan if np.ma.is_masked(value) else float(value)
        for name in STRING_COLUMNS:
            row[name] = _text(record[name])
        rows.append(row)
    return rows


def run_predict(
    paths: Sequence[Item],
    *,
    client: LensClient,
    out: Path,
    resume: bool,
    progress: bool,
    checkpoint_s: float = 1.0,
) -> PredictSummary:
    """Predict every path not already finished in ``out`` and write the table.

    Parameters
    ----------
    paths : sequence of str or BandGroup
        Input FITS files, or objects as one file per band; duplicates are sent once.
    client : LensClient
        Talks to the service.
    out : Path
        The table to write (.csv, .ecsv, .fits, .vot).
    resume : bool
        Keep the successful rows of an existing ``out`` and skip their files.
    progress : bool
        Show a progress bar on stderr.
    checkpoint_s : float
        Longest time between two rewrites of ``out`` (seconds).
    """
    table_format(out)
    rows = read_finished_rows(out) if resume and out.exists() else []
    finished = {str(row["filename"]) for row in rows}
    unique = list({item_key(p): p for p in paths[::-1]}.values())[::-1]  # first of each key
    todo = [p for p in unique if item_key(p) not in finished]
    failures: list[LensPrediction] = []
    last_write_s = time.monotonic()
    with tqdm(
        total=len(todo), unit="file", disable=not progress, file=sys.stderr, desc="lensserve"
    ) as bar:
        for prediction in client.iter_predict(todo):
            rows.append(prediction_row(prediction))
            if not prediction.ok:
                failures.append(prediction)
            bar.update(1)
            if time.monotonic() - last_write_s >= checkpoint_s:
                write_table(rows, out)
                last_write_s = time.monotonic()
    order = {item_key(p): i for i, p in reversed(list(enumerate(paths)))}
    rows.sort(key=lambda row: order.get(str(row["filename"]), -1))
    write_table(rows, out)
    return PredictSummary(
        total=len(paths),
        skipped=len(unique) - len(todo),
        succeeded=len(todo) - len(failures),
        failures=tuple(failures),
        retries=client.stats.retries,
    )


def expand_inputs(items: Sequence[str]) -> list[str]:
    """Paths from the command line: files as given, folders expanded to their FITS files."""
    paths: list[str] = []
    for item in items:
        folder = Path(item)
        if folder.is_dir():
            found = sorted(p for p in folder.iterdir() if p.name.lower().endswith(FITS_SUFFIXES))
            paths.extend(str(p) for p in found)
        else:
            paths.append(item)
    return paths


def predict_command(
    inputs: Sequence[str],
    *,
    url: str,
    out: Path,
    resume: bool = False,
    overwrite: bool = False,
    files_per_request: int = 16,
    concurrency: int = 4,
    max_retries: int = 8,
    samples: int | None = None,
    seed: int | None = None,
    progress: bool = True,
    checkpoint_s: float = 1.0,
    group_bands: str | None = None,
    bands: Sequence[str] = ("g", "r", "i"),
) -> int:
    """Run ``lensserve predict`` and report on stderr; returns the exit status.

    ``group_bands``: a name pattern such as ``{stem}_{band}.fits[.gz]`` that groups
    the input files into objects of one file per band (``bands``), each sent as one
    object; None sends each file as a whole object.
    """
    try:
        table_format(out)
    except ValueError as exc:
        print(f"lensserve predict: {exc}", file=sys.stderr)
        return 2
    if out.exists() and not (resume or overwrite):
        print(
            f"lensserve predict: {out} exists; pass --resume to continue it or --overwrite",
            file=sys.stderr,
        )
        return 2
    paths: list[Item] = list(expand_inputs(inputs))
    if group_bands is not None:
        try:
            paths = group_band_files(map(str, paths), bands=bands, pattern=group_bands)
        except ValueError as exc:
            print(f"lensserve predict: {exc}", file=sys.stderr)
            return 2
    with LensClient(
        url,
        files_per_request=files_per_request,
        concurrency=concurrency,
        retry=RetryPolicy(max_retries=max_retries),
        samples=samples,
        seed=seed,
    ) as client:
        summary = run_predict(
            paths,
            client=client,
            out=out,
            resume=resume,
            progress=progress,
            checkpoint_s=checkpoint_s,
        )
    print(
        f"lensserve predict: {summary.total} {'objects' if group_bands else 'files'}: "
        f"{summary.succeeded} predicted, "
        f"{summary.skipped} already in {out}, {len(summary.failures)} failed; "
        f"{summary.retries} retries",
        file=sys.stderr,
    )
    for failure in summary.failures:
        assert failure.error is not None
        print(f"  {failure.path}: {failure.error.code}: {failure.error.message}", file=sys.stderr)
    return 1 if summary.failures else 0
