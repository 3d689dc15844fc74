"""The sealed-evaluation report: exported ONNX models on a tiny simulated set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("galsim")

from service.contract.cards import read_model_cards  # noqa: E402
from service.contract.preprocessing import preprocess_batch  # noqa: E402
from service.core.runtime import OnnxModelRuntime  # noqa: E402
from training import report as r  # noqa: E402
from training.cli import main  # noqa: E402
from training.dataset import load_dataset  # noqa: E402
from training.second_generator import generate  # noqa: E402

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    """24 GalSim cutouts (12 lenses), made once for the module."""
    return generate(tmp_path_factory.mktemp("tiny"), n_cutouts=24, seed=8, workers=1, shard_size=8)


@pytest.fixture(scope="module")
def report(tiny_set) -> dict:
    return r.build_report(tiny_set, MODELS, role="sealed_test", num_samples=20, n_resamples=1000)


def _intervals(node):
    if isinstance(node, dict) and {"value", "low", "high"} <= node.keys():
        yield node
    elif isinstance(node, dict):
        for child in node.values():
            yield from _intervals(child)


def test_predictions_are_the_services(tiny_set):
    # The report runs the exported files itself; the service's runtime must agree on the
    # deterministic outputs (probability, point theta_E) for the same cutouts.
    labels = r.read_labels(tiny_set)
    got = r.predict_set(MODELS, tiny_set, labels, num_samples=10, seed=1)
    runtime = OnnxModelRuntime(MODELS, device="cpu")
    runtime.load()
    raw = runtime.predict(preprocess_batch(load_dataset(tiny_set).images), num_samples=10)
    np.testing.assert_allclose(got.lens_probability, raw.lens_probability, atol=1e-5)
    np.testing.assert_allclose(
        got.regressor_theta_e_arcsec, raw.parameters[labels.is_lens, 0], atol=1e-5
    )
    quantiles = got.mc_quantiles_arcsec
    assert quantiles.shape == (12, 5) and np.all(np.diff(quantiles, axis=1) > 0)
    assert np.all((got.mc_mean_arcsec > quantiles[:, 0]) & (got.mc_mean_arcsec < quantiles[:, 4]))


def test_report_sections_and_intervals(report, tiny_set):
    data = report["set"]
    assert data["seed"] == 8 and data["n_cutouts"] == 24
    assert data["hashed_files"] == [
        "shard_0000.npz",
        "shard_0001.npz",
        "shard_0002.npz",
        "labels.csv",
    ]
    assert data["counts_by_kind"]["lens"] == 12
    assert report["evaluation"]["mc_mixture_levels"] == list(
        read_model_cards(MODELS).mc_mixture_levels
    )
    cls = report["classification"]
    assert set(cls) >= {"auroc", "fpr_0.01", "fpr_0.001", "counts"}
    point = cls["fpr_0.01"]
    assert set(point["fpr_by_kind"]) >= set(data["counts_by_kind"]) - {"lens"}
    assert set(point["purity"]) == {"1:1000", "1:10000"}
    lens = report["regression"]["lens"]
    assert lens["n"] == 12
    assert set(lens["coverage"]) == {"all", "theta_E_bins", "arc_snr_terciles"}
    assert sum(b["n"] for b in lens["coverage"]["arc_snr_terciles"].values()) == 12
    intervals = list(_intervals(report["classification"])) + list(_intervals(report["regression"]))
    assert len(intervals) > 40
    for interval in intervals:
        assert interval["low"] <= interval["value"] + 1e-12
        assert interval["value"] <= interval["high"] + 1e-12
    # Issue 14's composition is far from met by 24 cutouts, and says so.
    assert not any(row["met"] for row in data["composition"] if row["group"] != "with_artefacts")


def test_targets_are_met_only_on_the_right_side_of_the_interval():
    passing = r._target("x", "m", {"value": 0.997, "low": 0.996, "high": 0.998}, at_least=0.995)
    straddling = r._target("x", "m", {"value": 0.997, "low": 0.994, "high": 0.999}, at_least=0.995)
    assert passing["met"] and not straddling["met"]
    inside = {"value": 0.68, "low": 0.65, "high": 0.71}
    assert r._target("c", "m", inside, at_least=0.64, at_most=0.72)["met"]
    assert not r._target("c", "m", inside, at_least=0.66, at_most=0.72)["met"]
    # A statistic no resample defined (null in the JSON) meets nothing.
    undefined = {"value": None, "low": None, "high": None}
    assert not r._target("n", "m", undefined, at_most=0.01)["met"]


def test_targets_cover_every_acceptance_point(report):
    names = [t["name"] for t in report["targets"]]
    assert "AUROC against all negatives" in names
    assert {"TPR at FPR 0.01", "TPR at FPR 0.001"} <= set(names)
    assert "FPR of star at the FPR-0.01 threshold" in names
    star = next(t for t in report["targets"] if t["name"].startswith("FPR of star"))
    assert star["at_most"] == 0.01
    # The GalSim set has no quasars and no lensed quasars: their points are listed, unmet.
    missing = [t for t in report["targets"] if "quasar" in t["name"]]
    assert {t["name"] for t in missing} == {
        "FPR of quasar at the FPR-0.01 threshold",
        "theta_E RMSE (arcsec), lensed_quasar",
    }
    assert all(t["value"] is None and not t["met"] for t in missing)
    json.dumps(report, allow_nan=False)  # strict JSON: no NaN anywhere
    assert names.count("theta_E RMSE (arcsec), lens") == 2  # both models
    assert any(n.startswith("mean theta_E error (arcsec), lens, theta_E") for n in names)
    assert {
        "served 68% interval coverage, all lenses",
        "served 95% interval coverage, all lenses",
    } <= set(names)


def test_fingerprint_changes_with_one_byte(tiny_set, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_set, copy)
    assert r.dataset_fingerprint(copy) == r.dataset_fingerprint(tiny_set)
    labels = (copy / "labels.csv").read_text()
    (copy / "labels.csv").write_text(labels.replace("lens", "lenz", 1))
    assert r.dataset_fingerprint(copy)["sha256"] != r.dataset_fingerprint(tiny_set)["sha256"]


def test_cards_take_the_report_and_stay_valid(report, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(MODELS, models, ignore=shutil.ignore_patterns("*.keras", "*.png"))
    r.add_report_to_cards(report, models)
    cards = read_model_cards(models)  # the service still accepts them (hashes unchanged)
    for name, card in cards.cards.items():
        entry = card.metrics["sealed_test"]
        assert entry["set"]["seed"] == 8
        assert entry["set"]["sha256"] == report["set"]["sha256"]
        assert entry["all_targets_met"] == all(t["met"] for t in entry["targets"])
        assert all(t["model"] == name for t in entry["targets"])
    assert "classification" in cards.classifier.metrics["sealed_test"]
    assert "coverage" in cards.mc.metrics["sealed_test"]["regression"]["lens"]
    # A report of other ONNX files is refused.
    other = json.loads(json.dumps(report))
    other["models"]["lens_classifier"]["onnx_sha256"] = "0" * 64
    with pytest.raises(ValueError, match="vouches for ONNX"):
        r.add_report_to_cards(other, models)


def test_report_command_writes_json_and_markdown(tiny_set, tmp_path):
    out = tmp_path / "out"
    argv = ["report", "--data", str(tiny_set), "--out", str(out), "--role", "second_generator"]
    assert main([*argv, "--num-samples", "10", "--resamples", "1000"]) == 0
    saved = json.loads((out / "report.json").read_text())
    assert saved["role"] == "second_generator" and saved["targets"] == []
    markdown = (out / "report.md").read_text()
    assert "| AUROC (all negatives) |" in markdown and "second_generator" in markdown


def test_report_reads_the_training_simulator_kinds_and_artefacts(tmp_path):
    pytest.importorskip("lenstronomy")
    data = tmp_path / "sim"
    argv = ["simulate", "--out", str(data), "--n", "40", "--seed", "77", "--workers", "1"]
    argv += ["--lens-kinds", "lens=1,lensed_quasar=1"]
    assert main([*argv, "--negative-kinds", "star=1,star_galaxy_blend=1,galaxy_blend=1"]) == 0
    labels = r.read_labels(data)
    assert set(labels.kind[labels.is_lens]) == {"lens", "lensed_quasar"}
    report = r.build_report(data, MODELS, num_samples=10, n_resamples=1000)
    assert set(report["regression"]) == {"all", "lens", "lensed_quasar"}
    by_kind = report["classification"]["fpr_0.01"]["fpr_by_kind"]
    assert report["set"]["n_with_artefacts"] == int(labels.has_artefacts.sum())
    assert {"star", "star_galaxy_blend", "galaxy_blend", "blends"} <= set(by_kind)
    if (labels.has_artefacts & ~labels.is_lens).any():
        assert "with_artefacts" in by_kind
    names = {t["name"] for t in report["targets"]}
    # Pooled groups are reported, but only kinds carry issue 14's per-kind target.
    assert not any("blends" in n or "with_artefacts" in n for n in names)
    assert "theta_E RMSE (arcsec), lensed_quasar" in names


def test_a_set_too_small_for_the_fpr_has_no_threshold():
    # Three negatives: the lowest non-zero FPR is 1/3, so no threshold gives FPR <= 1%
    # unless the best-scoring negative is below every lens. Here it is the top score.
    labels = r.Labels(
        is_lens=np.array([True, True, False, False, False]),
        kind=np.array(["lens", "lens", "star", "star", "plain"]),
        theta_e_arcsec=np.array([1.0, 1.5, np.nan, np.nan, np.nan]),
        arc_snr=None,
        has_artefacts=np.zeros(5, dtype=bool),
    )
    probability = np.array([0.8, 0.7, 0.9, 0.1, 0.2])
    seed = np.random.SeedSequence(0)
    section = r.classification_section(labels, probability, n_resamples=1000, seed=seed)
    assert section["fpr_0.01"]["threshold"] is None
    assert section["fpr_0.01"]["tpr"]["value"] == 0.0
    # AUROC: 4 of the 6 lens-negative pairs are ordered right (Mann-Whitney).
    np.testing.assert_allclose(section["auroc"]["value"], 4 / 6)
    json.dumps(section, allow_nan=False)
