"""The table ``lensserve batch`` writes: one flat row per input file, in three formats.

Each row is the API's :class:`~service.schemas.CutoutResult` for the file,
flattened: nested fields are joined with ``_`` (``parameters_theta_E``,
``einstein_radius_q0_975``, ``wcs_ra``, ``error_code``), ``warnings`` is a
JSON list, and ``path`` names the file that was read. A failed file keeps its
row, with null numbers and its ``error_code`` and ``error_message``.

Rows travel as plain dicts (the Dask workers need no pyarrow); this module
turns them into Arrow tables for the partial results of a run, and merges
those into Parquet (streamed), CSV (streamed) or a FITS binary table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from service.contract.cards import PARAMETER_COMPONENTS
from service.contract.uncertainty import QUANTILE_LEVELS
from service.schemas import CutoutResult

TableFormat = Literal["parquet", "csv", "fits"]
#: Output formats by file ending.
FORMAT_BY_SUFFIX: dict[str, TableFormat] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".fits": "fits",
    ".fit": "fits",
    ".fits.gz": "fits",
}
#: Schema metadata key holding the model versions as JSON.
MODEL_VERSIONS_KEY = b"lensserve_model_versions"
_PARAMETER_UNITS = {"theta_E": "arcsec", "center_x": "arcsec", "center_y": "arcsec"}


@dataclass(frozen=True)
class ColumnSpec:
    """One column: where its value sits in the API's JSON result, its type and unit."""

    name: str
    path: tuple[str, ...]
    kind: Literal["float", "str"]
    unit: str | None = None


def _quantile_column(level: float) -> ColumnSpec:
    label = f"{level:g}"  # the API's key, e.g. "0.025"
    return ColumnSpec(
        f"einstein_radius_q{label.replace('.', '_')}",
        ("einstein_radius", "quantiles", label),
        "float",
        "arcsec",
    )


#: The columns, in table order; ``path`` is added by the batch run, not by the API.
COLUMNS: tuple[ColumnSpec, ...] = (
    ColumnSpec("path", ("path",), "str"),
    ColumnSpec("filename", ("filename",), "str"),
    ColumnSpec("lens_probability", ("lens_probability",), "float"),
    *(
        ColumnSpec(f"parameters_{name}", ("parameters", name), "float", _PARAMETER_UNITS.get(name))
        for name in PARAMETER_COMPONENTS
    ),
    *(
        ColumnSpec(f"einstein_radius_{name}", ("einstein_radius", name), "float", "arcsec")
        for name in ("mean", "std", "aleatoric_std", "epistemic_std")
    ),
    *(_quantile_column(level) for level in QUANTILE_LEVELS),
    ColumnSpec("wcs_ra", ("wcs", "ra"), "float", "deg"),
    ColumnSpec("wcs_dec", ("wcs", "dec"), "float", "deg"),
    ColumnSpec("warnings", ("warnings",), "str"),
    ColumnSpec("error_code", ("error", "code"), "str"),
    ColumnSpec("error_message", ("error", "message"), "str"),
)
COLUMN_NAMES: tuple[str, ...] = tuple(column.name for column in COLUMNS)


def table_format(path: Path) -> TableFormat:
    """The output format named by a file's ending; ValueError for another ending."""
    name = path.name.lower()
    for suffix, fmt in FORMAT_BY_SUFFIX.items():
        if name.endswith(suffix):
            return fmt
    raise ValueError(
        f"cannot tell the table format of {str(path)!r}; end it with {', '.join(FORMAT_BY_SUFFIX)}"
    )


def flatten_value(document: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The value at ``path`` in a JSON document, None where a level is missing or null."""
    value: Any = document
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def flatten_result(result: CutoutResult, *, path: str) -> dict[str, Any]:
    """One table row from the API's result for one file.

    Parameters
    ----------
    result : CutoutResult
        What :func:`service.schemas.encode_result` built for the file.
    path : str
        The file that was read.
    """
    document = {**result.model_dump(mode="json", by_alias=True), "path": path}
    row = {column.name: flatten_value(document, column.path) for column in COLUMNS}
    row["warnings"] = json.dumps(row["warnings"] or [])
    return row


def _schema(model_versions: Mapping[str, str] | None = None) -> pa.Schema:
    fields = [
        pa.field(
            column.name,
            pa.float64() if column.kind == "float" else pa.string(),
            metadata={"unit": column.unit} if column.unit else None,
        )
        for column in COLUMNS
    ]
    metadata = {MODEL_VERSIONS_KEY: json.dumps(dict(model_versions or {})).encode()}
    return pa.schema(fields, metadata=metadata)


def rows_to_arrow(
    rows: Sequence[Mapping[str, Any]], *, model_versions: Mapping[str, str] | None = None
) -> pa.Table:
    """An Arrow table of rows from :func:`flatten_result`, with the model versions."""
    schema = _schema(model_versions)
    return pa.Table.from_pylist([dict(row) for row in rows], schema=schema)


def write_part(table: pa.Table, path: Path) -> None:
    """Write one partition's rows so that a crash never leaves half a file under ``path``."""
    partial = path.with_name(path.name + ".partial")
    pq.write_table(table, partial)
    os.replace(partial, path)


def read_model_versions(path: Path) -> dict[str, str]:
    """The model versions a partition file was scored with."""
    metadata = pq.read_schema(path).metadata or {}
    return dict(json.loads(metadata.get(MODEL_VERSIONS_KEY, b"{}")))


def write_table(parts: Iterable[pa.Table], out: Path, *, model_versions: Mapping[str, str]) -> int:
    """Merge partition tables, in order, into ``out``; returns the rows written.

    Parquet and CSV are streamed part by part; a FITS binary table needs its
    length up front, so FITS holds the whole table in memory. The file
    appears under ``out`` only once complete.
    """
    fmt = table_format(out)
    partial = out.with_name(out.name + ".partial")
    schema = _schema(model_versions)
    rows = 0
    if fmt == "fits":
        rows = _write_fits(
            pa.concat_tables([p.cast(schema) for p in parts]), partial, model_versions
        )
    else:
        writer: pq.ParquetWriter | pa_csv.CSVWriter = (
            pq.ParquetWriter(partial, schema)
            if fmt == "parquet"
            else pa_csv.CSVWriter(partial, schema)
        )
        with writer:
            for part in parts:
                writer.write_table(part.cast(schema))
                rows += part.num_rows
    os.replace(partial, out)
    return rows


def _write_fits(table: pa.Table, path: Path, model_versions: Mapping[str, str]) -> int:
    from astropy.table import Table

    fits_table = Table()
    for column in COLUMNS:
        values = table.column(column.name).to_pylist()
        if column.kind == "float":
            # FITS has no null for floats: NaN marks a value the file could not get.
            fits_table[column.name] = np.array(
                [np.nan if v is None else v for v in values], dtype=np.float64
            )
        else:
            fits_table[column.name] = np.array(["" if v is None else v for v in values], dtype=str)
        fits_table[column.name].unit = column.unit
    fits_table.meta["EXTNAME"] = "LENSSERVE"
    fits_table.meta["MODELS"] = json.dumps(dict(model_versions))
    fits_table.write(path, format="fits", overwrite=True)
    return len(fits_table)


def read_table(path: Path) -> list[dict[str, Any]]:
    """The rows of a table written by :func:`write_table`, with nulls as None.

    FITS NaN numbers and empty strings read back as None, so the three
    formats compare equal.
    """
    fmt = table_format(path)
    if fmt == "parquet":
        return pq.read_table(path).to_pylist()
    if fmt == "csv":
        types = {c.name: pa.float64() if c.kind == "float" else pa.string() for c in COLUMNS}
        options = pa_csv.ConvertOptions(column_types=types, strings_can_be_null=True)
        return pa_csv.read_csv(path, convert_options=options).to_pylist()
    from astropy.table import Table

    table = Table.read(path, format="fits")
    kinds = {column.name: column.kind for column in COLUMNS}
    return [
        {name: _fits_value(row[name], kinds.get(name, "str")) for name in table.colnames}
        for row in table
    ]


def _fits_value(value: Any, kind: str) -> Any:
    if np.ma.is_masked(value):  # astropy masks the empty strings and NaNs it reads
        return None
    if kind == "float":
        number = float(value)
        return None if np.isnan(number) else number
    text = str(value)
    return text or None
