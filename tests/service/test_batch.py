"""``lensserve batch``: inputs, tables, and Dask runs compared with the HTTP API's answers.

Expected numbers are never constants: they are what a real ``lensserve serve``
answers for the same files (``live_server``). Deterministic fields (the lens
probability and the point parameters) must agree to 1e-4 whatever the
partitioning; the MC-dropout fields agree too when the batch and the API draw
the same dropout masks, i.e. one partition holding the same cutouts as one
seeded request (partition 0 uses the seed as chunk 0 of a request does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.batch import run as batch
from service.batch import table as batch_table
from service.batch import worker as batch_worker
from service.batch.inputs import resolve_inputs
from service.batch.table import COLUMNS, flatten_value, read_table, rows_to_arrow, write_table
from service.cli import main
from service.core.inference import CutoutPrediction, EinsteinRadiusPrediction
from service.errors import InvalidBatchInputError, InvalidFitsError
from service.schemas import encode_result

REPO = Path(__file__).resolve().parents[2]
CLEAN_SAMPLES = sorted((REPO / "examples" / "cutouts" / "clean").glob("*.fits"))
SEED = 20240611
#: Agreement with the API for every number (float32 models, different thread counts).
TOLERANCE = 1e-4
DETERMINISTIC = ("lens_probability",) + tuple(
    c.name for c in COLUMNS if c.name.startswith("parameters_")
)
MC_FIELDS = tuple(c.name for c in COLUMNS if c.name.startswith("einstein_radius_"))

needs_samples = pytest.mark.skipif(not CLEAN_SAMPLES, reason="sample cutouts missing")


@pytest.fixture(autouse=True)
def keep_environment(monkeypatch):
    """``lensserve batch --models-dir`` exports LENSSERVE_MODELS_DIR; undo it after each test."""
    monkeypatch.setenv("LENSSERVE_DEVICE", "cpu")
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# ----------------------------------------------------------------------------- inputs


def test_inputs_expand_globs_folders_and_lists_in_order_without_repeats(tmp_path):
    folder = tmp_path / "cutouts"
    (folder / "deep").mkdir(parents=True)
    for name in ("b.fits", "a.fits.gz", "deep/c.fit", "notes.txt"):
        (folder / name).write_bytes(b"")
    listing = tmp_path / "paths.txt"
    listing.write_text("# catalogue\ncutouts/b.fits\n\nmissing.fits\n/abs/x.fits\n")

    paths = resolve_inputs([str(folder / "b.fits"), str(folder), str(listing), "zz.fits"])

    assert paths == [
        str(folder / "b.fits"),
        str(folder / "a.fits.gz"),
        str(folder / "deep" / "c.fit"),
        str(tmp_path / "missing.fits"),  # kept: it becomes an error row, not a silent gap
        "/abs/x.fits",
        os.path.abspath("zz.fits"),
    ]
    assert resolve_inputs([str(tmp_path / "cutouts" / "*.fits*")]) == paths[1::-1]


@pytest.mark.parametrize("spec", ["*.nothing", "empty"])
def test_a_glob_or_folder_without_fits_files_is_refused(tmp_path, spec):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidBatchInputError, match="no"):
        resolve_inputs([str(tmp_path / spec)])


# ----------------------------------------------------------------------------- tables


def _example_rows() -> list[dict[str, Any]]:
    quantiles = dict(zip((0.025, 0.16, 0.5, 0.84, 0.975), (0.9, 1.0, 1.2, 1.3, 1.5), strict=True))
    prediction = CutoutPrediction(
        filename="a.fits",
        lens_probability=0.75,
        parameters={"theta_E": 1.2, "e1": 0.1, "e2": -0.2, "center_x": 0.01, "center_y": 0.02},
        einstein_radius=EinsteinRadiusPrediction(
            mean=1.2,
            std=0.2,
            aleatoric_std=0.1,
            epistemic_std=0.15,
            quantiles=quantiles,
            samples=None,
        ),
        ra_deg=10.5,
        dec_deg=-3.25,
        warnings=("filled 3 masked pixels",),
    )
    failed = InvalidFitsError("b.fits is not a FITS file")
    return [
        batch_table.flatten_result(encode_result(prediction, filename="a.fits"), path="/d/a.fits"),
        batch_table.flatten_result(encode_result(failed, filename="b.fits"), path="/d/b.fits"),
    ]


def test_a_result_flattens_to_the_api_fields():
    good, bad = _example_rows()
    assert list(good) == [c.name for c in COLUMNS]
    assert good["einstein_radius_q0_975"] == 1.5 and good["wcs_dec"] == -3.25
    assert json.loads(good["warnings"]) == ["filled 3 masked pixels"]
    assert good["error_code"] is None
    assert bad["lens_probability"] is None and bad["error_code"] == "invalid_fits"


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".fits"])
def test_every_format_reads_back_the_rows_it_was_given(tmp_path, suffix):
    rows = _example_rows()
    out = tmp_path / f"t{suffix}"
    tables = [rows_to_arrow(rows[:1]), rows_to_arrow(rows[1:])]
    assert write_table(iter(tables), out, model_versions={"lens_classifier": "1.0.0"}) == 2
    assert read_table(out) == rows
    assert not list(tmp_path.glob("*.partial"))


def test_an_unknown_table_ending_is_refused_before_any_work(tmp_path, capsys):
    assert main(["batch", "x.fits", "--out", str(tmp_path / "t.xlsx")]) == 2
    assert "table format" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Dask runs


def _answers(response: httpx.Response) -> dict[str, dict[str, Any]]:
    assert response.status_code == 200, response.text
    return {result["filename"]: result for result in response.json()["results"]}


@pytest.fixture(scope="module")
def api_single(live_server: str) -> dict[str, dict[str, Any]]:
    """The API's answer for each clean cutout sent alone."""
    answers = {}
    with httpx.Client(base_url=live_server, timeout=60.0) as http:
        for path in CLEAN_SAMPLES:
            response = http.post(
                "/v1/predict",
                content=path.read_bytes(),
                headers={"content-type": "application/fits"},
            )
            (result,) = _answers(response).values()
            answers[path.name] = result
    return answers


@pytest.fixture(scope="module")
def api_seeded_together(live_server: str) -> dict[str, dict[str, Any]]:
    """The API's answers for all clean cutouts in one seeded multipart request (one chunk)."""
    files = [("files", (p.name, p.read_bytes(), "application/fits")) for p in CLEAN_SAMPLES]
    with httpx.Client(base_url=live_server, timeout=120.0) as http:
        return _answers(http.post("/v1/predict", files=files, params={"seed": SEED}))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A Dask scheduler on a free port with two single-threaded worker processes."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        scheduler_port=0,
        dashboard_address=None,
    ) as local:
        yield local


def _run_cli(*args: str) -> int:
    return main(["batch", *args, "--models-dir", str(REPO / "models"), "--no-progress"])


def _assert_matches_api(
    rows: list[dict[str, Any]], answers: dict[str, dict[str, Any]], fields: tuple[str, ...]
) -> None:
    assert [row["filename"] for row in rows] == [p.name for p in CLEAN_SAMPLES]
    for row in rows:
        answer = answers[row["filename"]]
        assert row["path"] == str(CLEAN_SAMPLES[0].parent / row["filename"])
        assert row["error_code"] is None and answer["error"] is None
        assert json.loads(row["warnings"]) == answer["warnings"]
        specs = {c.name: c for c in COLUMNS}
        for name in ("wcs_ra", "wcs_dec", *fields):
            expected = flatten_value(answer, specs[name].path)
            np.testing.assert_allclose(row[name], expected, rtol=0, atol=TOLERANCE, err_msg=name)


@needs_samples
@pytest.mark.slow
def test_batch_on_a_local_cluster_of_two_workers_matches_the_api(tmp_path, api_single):
    out = tmp_path / "t.fits"
    paths = [str(p) for p in CLEAN_SAMPLES]
    assert _run_cli(*paths, "--out", str(out), "--workers", "2", "--partition-size", "5") == 0

    rows = read_table(out)
    assert len(rows) == 12
    _assert_matches_api(rows, api_single, DETERMINISTIC)
    assert not batch.parts_dir_for(out).exists()  # finished runs leave no parts behind


@needs_samples
@pytest.mark.slow
def test_batch_on_a_given_scheduler_matches_the_api_mc_fields_included(
    tmp_path, cluster, api_single, api_seeded_together
):
    out = tmp_path / "t.parquet"
    scheduler = cluster.scheduler_address
    args = ("--out", str(out), "--scheduler", scheduler, "--seed", str(SEED))
    folder = str(CLEAN_SAMPLES[0].parent)
    assert _run_cli(folder, *args, "--partition-size", "12") == 0

    rows = read_table(out)
    _assert_matches_api(rows, api_single, DETERMINISTIC)
    # One partition of the same 12 cutouts with the request's seed: the same dropout masks.
    _assert_matches_api(rows, api_seeded_together, DETERMINISTIC + MC_FIELDS)


@needs_samples
@pytest.mark.slow
def test_each_worker_loads_the_models_once_for_all_its_partitions(tmp_path, cluster):
    distributed = pytest.importorskip("distributed")
    out = tmp_path / "t.csv"
    paths = [str(p) for p in CLEAN_SAMPLES]
    assert (
        _run_cli(
            *paths,
            "--out",
            str(out),
            "--scheduler",
            cluster.scheduler_address,
            "--partition-size",
            "2",
        )
        == 0
    )
    assert len(read_table(out)) == 12
    with distributed.Client(cluster.scheduler_address) as client:
        loads = client.run(batch_worker.runtime_loads)
    # Six partitions on two workers, and never more than one load per worker process.
    assert set(loads.values()) <= {0, 1} and sum(loads.values()) >= 1


@needs_samples
@pytest.mark.slow
def test_bad_files_keep_their_rows_with_their_errors(tmp_path, cluster):
    not_fits = tmp_path / "notes.fits"
    not_fits.write_text("not a FITS file")
    listing = tmp_path / "more.txt"
    listing.write_text(f"{CLEAN_SAMPLES[1]}\nmissing.fits\n")
    out = tmp_path / "t.csv"
    inputs = [str(CLEAN_SAMPLES[0]), str(not_fits), str(listing)]
    assert (
        _run_cli(
            *inputs,
            "--out",
            str(out),
            "--scheduler",
            cluster.scheduler_address,
            "--partition-size",
            "3",
        )
        == 0
    )

    rows = read_table(out)
    assert [row["filename"] for row in rows] == [
        "00000.fits",
        "notes.fits",
        "00001.fits",
        "missing.fits",
    ]
    assert [row["error_code"] for row in rows] == [None, "invalid_fits", None, "unreadable_file"]
    assert rows[1]["lens_probability"] is None and "FITS" in rows[1]["error_message"]
    assert rows[2]["lens_probability"] is not None  # the good file shared a model call


@needs_samples
@pytest.mark.slow
def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, cluster, monkeypatch, capsys):
    paths = [str(p) for p in CLEAN_SAMPLES]
    scheduler = cluster.scheduler_address
    complete = tmp_path / "complete.parquet"
    common = ("--scheduler", scheduler, "--partition-size", "3", "--seed", str(SEED))
    assert _run_cli(*paths, "--out", str(complete), *common) == 0

    out = tmp_path / "t.parquet"
    real_write_part = batch_table.write_part
    written: list[Path] = []

    def crash_after_two(table: Any, path: Path) -> None:
        if len(written) == 2:
            raise RuntimeError("simulated crash")
        real_write_part(table, path)
        written.append(path)

    monkeypatch.setattr(batch_table, "write_part", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run_cli(*paths, "--out", str(out), *common)
    assert not out.exists() and len(list(batch.parts_dir_for(out).glob("part-*"))) == 2

    monkeypatch.setattr(batch_table, "write_part", real_write_part)
    capsys.readouterr()
    assert _run_cli(*paths, "--out", str(out), *common) == 0
    assert "scored 2, resumed 2, failed 0" in capsys.readouterr().err
    # Same partitions, same seeds: the resumed table is the uninterrupted one.
    for resumed, whole in zip(read_table(out), read_table(complete), strict=True):
        assert resumed.keys() == whole.keys()
        for name, value in resumed.items():
            if isinstance(value, float):
                np.testing.assert_allclose(value, whole[name], rtol=0, atol=TOLERANCE)
            else:
                assert value == whole[name]

    # A finished table is not replaced silently.
    assert _run_cli(*paths, "--out", str(out), *common) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_serving_imports_none_of_the_batch_dependencies():
    # A fresh interpreter: this one already holds Dask and pyarrow from the tests above.
    script = (
        "import sys, service.api.app, service.cli\n"
        "service.api.app.create_app()\n"
        "roots = {m.split('.')[0] for m in sys.modules}\n"
        "print(sorted(roots & {'dask', 'distributed', 'pyarrow'}))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == "[]"


@needs_samples
@pytest.mark.slow
def test_a_partition_whose_workers_cannot_load_the_models_keeps_its_rows(tmp_path, cluster, capsys):
    out = tmp_path / "t.parquet"
    paths = [str(p) for p in CLEAN_SAMPLES[:3]]
    status = main(
        [
            "batch",
            *paths,
            "--out",
            str(out),
            "--scheduler",
            cluster.scheduler_address,
            "--models-dir",
            str(tmp_path / "nowhere"),
            "--partition-size",
            "2",
            "--no-progress",
        ]
    )
    assert status == 1
    assert "rerun the same command" in capsys.readouterr().err
    rows = read_table(out)
    assert [row["filename"] for row in rows] == [p.name for p in CLEAN_SAMPLES[:3]]
    assert {row["error_code"] for row in rows} == {"model_unavailable"}
    # Nothing was recorded as scored: the next run tries both partitions again.
    assert not list(batch.parts_dir_for(out).glob("part-*"))
