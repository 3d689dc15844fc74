"""Occlusion maps: the numpy assembly, and ``explain=true`` through the real app and models."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from astropy.io import fits
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.contract.preprocessing import preprocess_cutout
from service.core.explain import (
    DEFAULT_GRID,
    OcclusionGrid,
    assemble_maps,
    explain_occlusion,
    occluded_copies,
)
from service.settings import Settings

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
#: The response keeps 6 decimals (service.schemas.EXPLANATION_DECIMALS); onnxruntime's own
#: batch-to-batch rounding of float32 outputs is far below that.
JSON_TOLERANCE = 1e-6 + 1e-6


def test_the_default_grid_tiles_the_central_24_pixels_with_nine_patches():
    masks = DEFAULT_GRID.masks((64, 64))
    assert masks.shape == (9, 64, 64)
    assert (masks.sum(axis=(1, 2)) == 64).all()  # 8 x 8 pixels each
    covered = masks.sum(axis=0)
    # 64 - 24 = 40 pixels left over, 20 on each side: rows and columns 20..43.
    assert (covered[20:44, 20:44] == 1).all()
    assert covered.sum() == 24 * 24


def test_grids_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="does not fit"):
        OcclusionGrid(patch_pixels=16, region_pixels=8)
    with pytest.raises(ValueError, match="positive"):
        OcclusionGrid(stride_pixels=0)


def test_occluded_copies_zero_each_patch_and_keep_the_rest():
    rng = np.random.default_rng(3)
    images = rng.normal(0.0, 1.0, (2, 8, 8, 3)).astype(np.float32)
    masks = OcclusionGrid(patch_pixels=4, stride_pixels=4, region_pixels=8).masks((8, 8))
    copies = occluded_copies(images, masks).reshape(2, 4, 8, 8, 3)
    for n in range(2):
        for k, mask in enumerate(masks):
            assert (copies[n, k][mask] == 0).all()
            np.testing.assert_array_equal(copies[n, k][~mask], images[n][~mask])


def test_overlapping_patches_are_averaged_and_unprobed_pixels_are_zero():
    # Two 4-pixel patches, stride 2, on a 1 x 8 strip's central 6 pixels: columns 1-4 and 3-6.
    masks = np.zeros((2, 1, 8), dtype=bool)
    masks[0, 0, 1:5] = True
    masks[1, 0, 3:7] = True
    maps = assemble_maps(np.array([[1.0, 3.0]]), masks)
    # Columns 3-4 are covered by both patches: (1 + 3) / 2; columns 0 and 7 by neither.
    np.testing.assert_array_equal(maps[0, 0], [0, 1, 1, 2, 2, 3, 3, 0])


def test_the_maps_of_a_linear_model_are_its_weights_times_the_pixels():
    """For f(x) = sum(w * x), occluding a patch drops f by the patch's sum of w * x."""
    rng = np.random.default_rng(5)
    images = rng.normal(0.0, 1.0, (3, 16, 16, 3)).astype(np.float32)
    weights = rng.normal(0.0, 1.0, (16, 16, 3)).astype(np.float32)
    grid = OcclusionGrid(patch_pixels=4, stride_pixels=4, region_pixels=8)

    def linear(x: np.ndarray) -> np.ndarray:
        return (x.astype(np.float64) * weights).sum(axis=(1, 2, 3))

    explanations = explain_occlusion(
        images,
        lens_probability=linear(images),
        theta_E=2.0 * linear(images),
        predict_lens_probability=linear,
        predict_theta_E=lambda x: 2.0 * linear(x),
        grid=grid,
        max_batch_size=5,  # 12 copies in calls of 5, 5 and 2
    )
    contribution = (images.astype(np.float64) * weights).sum(axis=3)
    for n, explanation in enumerate(explanations):
        assert explanation.method == "occlusion"
        for row in (4, 8):
            for column in (4, 8):
                patch = contribution[n, row : row + 4, column : column + 4].sum()
                cell = explanation.lens_probability[row : row + 4, column : column + 4]
                np.testing.assert_allclose(cell, patch, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(
                    explanation.theta_E[row : row + 4, column : column + 4],
                    2.0 * patch,
                    rtol=1e-5,
                    atol=1e-5,
                )
        outside = np.ones((16, 16), dtype=bool)
        outside[4:12, 4:12] = False
        assert (explanation.lens_probability[outside] == 0).all()


def _galaxy_cube(seed: int) -> np.ndarray:
    """A red elliptical with a blue arc at 2 arcsec (7.6 pixels) in sky noise, (3, 64, 64)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:64, :64] - 31.5
    radius = np.hypot(x, y)
    deflector = 40.0 * np.exp(-radius / 3.0)
    arc = 15.0 * np.exp(-0.5 * ((radius - 7.6) / 1.0) ** 2) * (x > 0)
    colours = ((0.4, 1.0), (0.8, 0.6), (1.0, 0.3))  # (deflector, arc) flux per band g, r, i
    cube = np.stack([d * deflector + a * arc for d, a in colours])
    return (cube + rng.normal(0.0, 1.0, cube.shape)).astype(np.float32)


def _fits_bytes(cube: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    fits.PrimaryHDU(cube).writeto(buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = Settings(device="cpu", models_dir=MODELS_DIR, model_instances=1)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _ready(test_client: TestClient) -> None:
    for _ in range(600):
        if test_client.get("/health/ready").status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError("the app never became ready")


def test_explain_true_adds_maps_that_onnxruntime_reproduces(client):
    _ready(client)
    cube = _galaxy_cube(11)
    files = [("files", ("galaxy.fits", _fits_bytes(cube), "application/fits"))]
    plain = client.post("/v1/predict", files=files)
    explained = client.post("/v1/predict", files=files, params={"explain": "true"})
    assert plain.status_code == 200 and explained.status_code == 200, explained.text
    plain_result, result = plain.json()["results"][0], explained.json()["results"][0]
    assert "explanation" not in plain_result  # absent unless asked
    # Everything else is the plain answer (the MC draws are random: compare the point answers).
    assert result["lens_probability"] == pytest.approx(plain_result["lens_probability"], abs=1e-6)
    assert result["parameters"] == pytest.approx(plain_result["parameters"], abs=1e-6)
    explanation = result["explanation"]
    assert explanation["method"] == "occlusion"
    assert (explanation["patch_pixels"], explanation["stride_pixels"]) == (8, 8)
    assert explanation["region_pixels"] == 24
    p_map = np.array(explanation["lens_probability"])
    theta_map = np.array(explanation["theta_E"])
    assert p_map.shape == theta_map.shape == (64, 64)

    # The same drops straight from onnxruntime on the same preprocessed cutout.
    image = preprocess_cutout(cube)[None]
    classifier = ort.InferenceSession(str(MODELS_DIR / "lens_classifier.onnx"))
    regressor = ort.InferenceSession(str(MODELS_DIR / "einstein_radius.onnx"))
    p0 = classifier.run(None, {"image": image})[0].item()
    theta0 = regressor.run(None, {"image": image})[0][0, 0]
    for row in (20, 28, 36):
        for column in (20, 28, 36):
            occluded = image.copy()
            occluded[0, row : row + 8, column : column + 8] = 0.0
            p_drop = p0 - classifier.run(None, {"image": occluded})[0].item()
            theta_drop = theta0 - regressor.run(None, {"image": occluded})[0][0, 0]
            cell = (slice(row, row + 8), slice(column, column + 8))
            np.testing.assert_allclose(p_map[cell], p_drop, atol=JSON_TOLERANCE)
            np.testing.assert_allclose(theta_map[cell], theta_drop, atol=JSON_TOLERANCE)
    outside = np.ones((64, 64), dtype=bool)
    outside[20:44, 20:44] = False
    assert (p_map[outside] == 0).all() and (theta_map[outside] == 0).all()
    # The galaxy drives the answers: occluding its centre changes them.
    assert np.abs(p_map).max() > 0 and np.abs(theta_map).max() > 0


def test_explain_works_for_seeded_requests_and_many_files(client):
    _ready(client)
    files = [
        ("files", (f"{seed}.fits", _fits_bytes(_galaxy_cube(seed)), "application/fits"))
        for seed in range(3)
    ]
    response = client.post("/v1/predict", files=files, params={"explain": "true", "seed": 4})
    assert response.status_code == 200, response.text
    maps = [np.array(r["explanation"]["theta_E"]) for r in response.json()["results"]]
    assert all(m.shape == (64, 64) for m in maps)
    assert not np.array_equal(maps[0], maps[1])  # each cutout its own map
