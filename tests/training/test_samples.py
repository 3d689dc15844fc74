"""The committed sample cutouts are exactly what ``python -m training samples`` writes."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

pytest.importorskip("lenstronomy")

from training.cli import main  # noqa: E402
from training.config import SAMPLES_SEED  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[2] / "examples" / "cutouts"


def _files(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.suffix != ".md" and p.is_file()
    )


@pytest.mark.slow
def test_the_command_regenerates_the_committed_samples_bit_for_bit(tmp_path, capsys):
    assert main(["samples", "--out", str(tmp_path), "--seed", str(SAMPLES_SEED)]) == 0
    assert "wrote 20 files" in capsys.readouterr().out
    assert _files(tmp_path) == _files(SAMPLES)
    for name in _files(SAMPLES):
        assert (tmp_path / name).read_bytes() == (SAMPLES / name).read_bytes(), name


def test_the_truth_table_describes_the_clean_cubes():
    with (SAMPLES / "truth.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["id"]) for row in rows] == list(range(12))
    lenses = [row for row in rows if row["is_lens"] == "1"]
    # Six lenses with theta_E in the range training/samples.py draws from (arcsec).
    assert len(lenses) == 6 and all(1.2 <= float(row["theta_E"]) <= 2.6 for row in lenses)
    kinds = {row["kind"] for row in rows if row["is_lens"] == "0"}
    assert kinds == {"plain", "companions", "tangential", "ring", "spiral", "star"}
    assert {row["kind"] for row in lenses} == {"lens"}
    for row in rows:
        path = SAMPLES / "clean" / f"{int(row['id']):05d}.fits"
        # No artefacts in the samples: every pixel of every clean cube is finite.
        assert np.isfinite(fits.getdata(path)).all()
        header = fits.getheader(path)
        assert header["BANDS"] == "g,r,i" and header["MAGZERO"] == 30.0
        # The WCS reference point is the cutout centre: (64 + 1) / 2 in 1-based pixels.
        assert header["CRPIX1"] == header["CRPIX2"] == 32.5
        np.testing.assert_allclose(
            [header["CRVAL1"], header["CRVAL2"]], [float(row["ra"]), float(row["dec"])], rtol=1e-12
        )
