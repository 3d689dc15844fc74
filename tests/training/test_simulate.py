"""The simulator's labels agree with its images."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("lenstronomy")

from training.augment import rotate90  # noqa: E402
from training.config import PIXEL_SCALE_ARCSEC, SimulationConfig  # noqa: E402
from training.simulate import Galaxy, draw_scene, render_components, simulate_cutout  # noqa: E402

CONFIG = SimulationConfig()


def _pixel_coordinates() -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in arcsec, x along columns, y along rows (as the simulator)."""
    coords = (np.arange(64) - 31.5) * PIXEL_SCALE_ARCSEC
    return np.meshgrid(coords, coords)


def _ring_scene(
    seed: int, *, theta_e: float, center: tuple[float, float], e1=0.0, e2=0.0, source_xy=(0.0, 0.0)
):
    """A lens scene with a controlled mass and a round source (resolved by the sub-pixels)."""
    scene = draw_scene(np.random.default_rng(seed), CONFIG, is_lens=True)
    scene.lens_model = "SIE"
    scene.lens_kwargs = [
        {"theta_E": theta_e, "e1": e1, "e2": e2, "center_x": center[0], "center_y": center[1]},
        {"gamma1": 0.0, "gamma2": 0.0, "ra_0": center[0], "dec_0": center[1]},
    ]
    mags = {"g": 21.0, "r": 21.0, "i": 21.0}
    scene.source = [
        Galaxy(mags, 0.25, 1.0, 0.0, 0.0, center[0] + source_xy[0], center[1] + source_xy[1])
    ]
    return scene


def test_non_lenses_carry_no_source_light():
    rng = np.random.default_rng(1)
    for _ in range(12):
        scene = draw_scene(rng, CONFIG, is_lens=False)
        components = render_components(scene, CONFIG)
        assert not scene.source
        assert np.all(components["source"] == 0.0)
        assert np.isnan(scene.labels["theta_E"])


def test_ring_radius_and_centre_match_labels():
    # A source exactly behind a round SIE makes an Einstein ring of radius theta_E.
    theta_e, center = 1.6, (0.25, -0.15)
    scene = _ring_scene(3, theta_e=theta_e, center=center)
    source = render_components(scene, CONFIG)["source"][1]
    x, y = _pixel_coordinates()
    weight = np.clip(source, 0, None)
    centroid = (np.sum(weight * x) / weight.sum(), np.sum(weight * y) / weight.sum())
    # Centroid of a symmetric ring sits on the lens centre to a small fraction of a pixel.
    np.testing.assert_allclose(centroid, center, atol=0.03)
    radius = np.hypot(x - center[0], y - center[1])
    mean_radius = np.sum(weight * radius) / weight.sum()
    # PSF blurring biases the light-weighted radius by well under a pixel (0.263").
    assert abs(mean_radius - theta_e) < 0.15


def test_rotation_augmentation_matches_a_rotated_scene():
    # Rendering the scene with rotated labels must equal rotating the rendered image.
    params = np.array([[1.3, 0.15, -0.08, 0.2, -0.1]])
    source_xy = (0.3, 0.1)
    theta_e, e1, e2, cx, cy = params[0]
    scene = _ring_scene(5, theta_e=theta_e, center=(cx, cy), e1=e1, e2=e2, source_xy=source_xy)
    scene.psf_kernels = {b: np.pad([[1.0]], 12) for b in scene.psf_kernels}
    image = render_components(scene, CONFIG)["source"]

    rotated_image, rotated_params = rotate90(np.moveaxis(image, 0, -1)[None], params)
    theta_e, e1, e2, cx, cy = rotated_params[0]
    rotated_source = (source_xy[1], -source_xy[0])
    scene2 = _ring_scene(
        5, theta_e=theta_e, center=(cx, cy), e1=e1, e2=e2, source_xy=rotated_source
    )
    scene2.psf_kernels = scene.psf_kernels
    expected = render_components(scene2, CONFIG)["source"]
    np.testing.assert_allclose(
        rotated_image[0], np.moveaxis(expected, 0, -1), atol=1e-6 * image.max()
    )


def test_lenses_pass_the_visibility_rule_and_are_reproducible():
    config = replace(CONFIG, min_arc_snr=20.0)
    first = [simulate_cutout(np.random.default_rng(11), config, is_lens=True) for _ in range(2)]
    image_a, labels_a = first[0]
    image_b, labels_b = first[1]
    np.testing.assert_array_equal(image_a, image_b)
    assert labels_a == labels_b
    assert labels_a["arc_snr"] >= 20.0 and labels_a["magnification"] >= 2.0
    assert image_a.shape == (3, 64, 64) and image_a.dtype == np.float32
    assert 0.45 <= labels_a["theta_E"] <= 3.2
