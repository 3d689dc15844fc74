"""Pipelines over one file per band (issue 16): grouping file names into objects, and
``lensserve predict --group-bands``, ``LensClient`` and ``lensserve batch`` writing one
row per object.

The files are written by astropy in ``tmp_path`` from synthetic objects; the expected
numbers are what the same server (``live_server``) answers for the plain g,r,i cube of
the same pixels, which the per-band files decode to exactly (tests/service/test_fits_layouts.py).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from service.batch import worker as batch_worker
from service.batch.table import read_table
from service.cli import main
from service.client import LensClient
from service.fits.band_files import BandGroup, band_pattern, group_band_files
from service.fits.raw import FitsLimits

REPO = Path(__file__).resolve().parents[2]
BANDS = ("g", "r", "i")
PIXEL_SCALE_DEG = 0.263 / 3600
#: Agreement with the plain cube's answer (the same pixels; issue 16's acceptance bound).
TOLERANCE = 1e-3


# ----------------------------------------------------------------------------- grouping


def test_files_group_by_folder_and_stem_and_unused_bands_are_left_out():
    paths = [
        "a/obj1_g.fits",
        "a/cube.fits",
        "a/obj1_r.fits.gz",
        "a/obj1_i.fits",
        "a/obj1_z.fits",
        "b/obj1_G.fits",
        "a/only_z_z.fits",
        "b/obj1_r.fits",
        "b/obj1_i.fits",
    ]
    items = group_band_files(paths, bands=BANDS)
    assert items == [
        BandGroup(
            "a/obj1", (("g", "a/obj1_g.fits"), ("r", "a/obj1_r.fits.gz"), ("i", "a/obj1_i.fits"))
        ),
        "a/cube.fits",  # no band in its name: a whole object
        BandGroup(
            "b/obj1", (("g", "b/obj1_G.fits"), ("r", "b/obj1_r.fits"), ("i", "b/obj1_i.fits"))
        ),
    ]


def test_a_missing_or_repeated_band_is_the_groups_problem():
    items = group_band_files(
        ["o_g.fits", "o_r.fits", "p_g.fits", "p_g.fits.gz", "p_r.fits", "p_i.fits"], bands=BANDS
    )
    assert [item.problem for item in items] == [
        "got files for bands g, r of 'o'; it needs one for each of g, r, i (missing i)",
        "got band g (p_g.fits, p_g.fits.gz) twice for 'p'; keep one file per band",
    ]


def test_patterns_take_other_names_and_refuse_missing_placeholders():
    assert band_pattern("{band}-band/{stem}.fit").fullmatch("r-band/obj.fit")
    items = group_band_files(
        ["x.G.fits", "x.R.fits", "x.I.fits"], bands=BANDS, pattern="{stem}.{band}.fits"
    )
    assert items == [BandGroup("x", (("g", "x.G.fits"), ("r", "x.R.fits"), ("i", "x.I.fits")))]
    with pytest.raises(ValueError, match=r"\{band\} once"):
        band_pattern("{stem}.fits")


# ----------------------------------------------------------------------------- files


def _planes(seed: int) -> dict[str, np.ndarray]:
    """A compact deflector, a ring whose strength depends on ``seed``, and noise, per band."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:64, :64] - 31.5
    radius = np.hypot(x, y)
    ring = rng.uniform(0.5, 2.0) * np.exp(-(((radius - 7) / 1.2) ** 2))
    colours = {"g": (0.5, 1.0), "r": (1.0, 0.8), "i": (1.4, 0.6), "z": (1.6, 0.4)}
    return {
        band: (20 * a * np.exp(-radius / 1.5) + b * ring + rng.normal(5, 1, (64, 64))).astype(
            np.float32
        )
        for band, (a, b) in colours.items()
    }


def _header() -> fits.Header:
    header = fits.Header()
    header.update(
        CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRVAL1=40.0, CRVAL2=-30.0, CRPIX1=32.5,
        CRPIX2=32.5, CD1_1=-PIXEL_SCALE_DEG, CD1_2=0.0, CD2_1=0.0, CD2_2=PIXEL_SCALE_DEG,
    )  # fmt: skip
    return header


def _write_objects(folder: Path, seeds: list[int]) -> dict[str, bytes]:
    """``obj<seed>_<band>.fits`` for g, r, i, z (z unused), each a DES-like SCI/MSK/WGT-less
    file; returns the plain g,r,i cube of each object, by stem."""
    cubes = {}
    for seed in seeds:
        planes = _planes(seed)
        for band, plane in planes.items():
            header = _header()
            header["FILTER"] = f"DECam {band}"
            fits.PrimaryHDU(plane, header=header).writeto(folder / f"obj{seed}_{band}.fits")
        buffer = io.BytesIO()
        header = _header()
        header["BANDS"] = "g,r,i"
        fits.PrimaryHDU(np.stack([planes[b] for b in BANDS]), header=header).writeto(buffer)
        cubes[f"obj{seed}"] = buffer.getvalue()
    return cubes


def _plain_answers(url: str, cubes: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    with httpx.Client(base_url=url, timeout=60.0) as http:
        return {
            stem: http.post(
                "/v1/predict", content=data, headers={"content-type": "application/fits"}
            ).json()["results"][0]
            for stem, data in cubes.items()
        }


def _assert_close(row_probability: float, row_theta_e: float, answer: dict[str, Any]) -> None:
    assert row_probability == pytest.approx(answer["lens_probability"], abs=TOLERANCE)
    assert row_theta_e == pytest.approx(answer["parameters"]["theta_E"], abs=TOLERANCE)


# ----------------------------------------------------------------------------- predict


@pytest.mark.slow
def test_lensserve_predict_group_bands_writes_one_row_per_object(live_server, tmp_path):
    folder = tmp_path / "cutouts"
    folder.mkdir()
    cubes = _write_objects(folder, [1, 2, 3])
    (folder / "obj4_g.fits").write_bytes((folder / "obj1_g.fits").read_bytes())  # r, i missing
    out = tmp_path / "objects.csv"
    process = subprocess.run(
        [sys.executable, "-m", "service", "predict", str(folder), "--group-bands", "--url",
         live_server, "--out", str(out), "--no-progress"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert process.returncode == 1, process.stderr  # obj4 is incomplete
    assert "4 objects: 3 predicted" in process.stderr
    table = Table.read(out, format="ascii.csv")
    assert list(table["filename"]) == [str(folder / f"obj{n}") for n in (1, 2, 3, 4)]
    answers = _plain_answers(live_server, cubes)
    for row in table[:3]:
        _assert_close(row["lens_probability"], row["theta_E"], answers[Path(row["filename"]).name])
        assert not row["error_code"] or np.ma.is_masked(row["error_code"])
    assert table[3]["error_code"] == "band_mismatch"
    assert "missing r, i" in table[3]["error"]


@pytest.mark.slow
def test_lens_client_sends_each_group_as_one_object(live_server, tmp_path):
    cubes = _write_objects(tmp_path, [5, 6])
    items = group_band_files(sorted(map(str, tmp_path.glob("*.fits"))), bands=BANDS)
    whole = tmp_path / "cube5.fits"
    whole.write_bytes(cubes["obj5"])
    with LensClient(live_server, files_per_request=4) as client:
        predictions = client.predict([*items, str(whole)])
    assert [p.path for p in predictions] == [
        str(tmp_path / "obj5"),
        str(tmp_path / "obj6"),
        str(whole),
    ]
    assert predictions[0].filename == "obj5_g.fits+obj5_r.fits+obj5_i.fits"
    answers = _plain_answers(live_server, cubes)
    for prediction, stem in zip(predictions, ["obj5", "obj6", "obj5"], strict=True):
        assert prediction.ok, prediction.error
        assert prediction.parameters is not None and prediction.lens_probability is not None
        _assert_close(prediction.lens_probability, prediction.parameters.theta_E, answers[stem])


# ----------------------------------------------------------------------------- batch


def test_a_batch_partition_scores_a_group_as_one_row(tmp_path):
    """The Dask task itself, in this process: one row per object, errors in their rows."""
    cubes = _write_objects(tmp_path, [7])
    items = group_band_files(sorted(map(str, tmp_path.glob("*.fits"))), bands=BANDS)
    cube = tmp_path / "cube7.fits"
    cube.write_bytes(cubes["obj7"])
    incomplete = BandGroup("x/obj9", (("g", "x/obj9_g.fits"),), problem="missing r, i")
    config = batch_worker.WorkerConfig(
        models_dir=str(REPO / "models"),
        device="cpu",
        intra_op_threads=1,
        limits=FitsLimits(),
        num_samples=4,
        seed=1,
    )
    result = batch_worker.score_partition([*items, str(cube), incomplete], index=0, config=config)
    grouped, plain, failed = result.rows
    assert grouped["path"] == str(tmp_path / "obj7") and grouped["error_code"] is None
    for name in ("lens_probability", "parameters_theta_E"):
        assert grouped[name] == pytest.approx(plain[name], abs=TOLERANCE)
    assert (failed["path"], failed["error_code"]) == ("x/obj9", "band_mismatch")


@pytest.mark.slow
def test_lensserve_batch_group_bands_writes_one_row_per_object(tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    monkeypatch.setenv("LENSSERVE_DEVICE", "cpu")
    folder = tmp_path / "cutouts"
    folder.mkdir()
    _write_objects(folder, [8, 9])
    out = tmp_path / "t.parquet"
    argv = ["batch", str(folder), "--group-bands", "--out", str(out), "--workers", "1",
            "--models-dir", str(REPO / "models"), "--no-progress"]  # fmt: skip
    try:
        assert main(argv) == 0
    finally:
        os.environ.pop("LENSSERVE_MODELS_DIR", None)
    rows = read_table(out)
    assert [row["path"] for row in rows] == [str(folder / "obj8"), str(folder / "obj9")]
    assert all(row["error_code"] is None for row in rows)
