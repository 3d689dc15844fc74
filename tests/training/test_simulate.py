"""The simulator's labels agree with its images."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("lenstronomy")

from training.augment import rotate90  # noqa: E402
from training.cli import build_parser, simulation_config  # noqa: E402
from training.config import PIXEL_SCALE_ARCSEC, SimulationConfig  # noqa: E402
from training.psf import psf_kernel  # noqa: E402
from training.simulate import Galaxy, draw_scene, render_components, simulate_cutout  # noqa: E402

CONFIG = SimulationConfig()


def _pixel_coordinates() -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in arcsec, x along columns, y along rows (as the simulator)."""
    coords = (np.arange(64) - 31.5) * PIXEL_SCALE_ARCSEC
    return np.meshgrid(coords, coords)


def _ring_scene(
    seed: int, *, theta_e: float, center: tuple[float, float], e1=0.0, e2=0.0, source_xy=(0.0, 0.0)
):
    """A lens scene with a controlled mass, a round source and a Gaussian PSF of DR2's r median."""
    scene = draw_scene(np.random.default_rng(seed), CONFIG, is_lens=True, kind="lens")
    kernel = psf_kernel(fwhm_arcsec=0.95, pixel_scale_arcsec=PIXEL_SCALE_ARCSEC)
    scene.psf_kernels = {band: kernel for band in scene.psf_kernels}
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


NO_ARTEFACTS = replace(CONFIG, artefact_probability=0.0)
NEW_NEGATIVE_KINDS = ("star", "quasar", "star_galaxy_blend", "galaxy_blend", "group", "edge_on")


@pytest.mark.parametrize("kind", NEW_NEGATIVE_KINDS)
def test_new_negative_kinds_render_finite_cutouts(kind):
    image, labels = simulate_cutout(
        np.random.default_rng(21), NO_ARTEFACTS, is_lens=False, kind=kind
    )
    assert image.shape == (3, 64, 64) and image.dtype == np.float32
    assert np.isfinite(image).all()
    assert labels["kind"] == kind and labels["is_lens"] == 0
    assert np.isnan(labels["theta_E"]) and labels["artefacts"] == "none"
    # The object sits in the cutout: the central 32x32 holds more than noise.
    centre = image[:, 16:48, 16:48].sum()
    assert centre > 5 * np.sqrt(32 * 32) * min(labels[f"sky_sigma_{b}"] for b in "gri")


def test_a_ring_negative_records_its_geometry():
    from training.negatives import draw_negative

    _, labels = simulate_cutout(np.random.default_rng(5), NO_ARTEFACTS, is_lens=False, kind="ring")
    assert 1.2 <= labels["ring_radius_arcsec"] <= 3.5 and 0.5 <= labels["ring_axis_ratio"] <= 1
    for seed in range(5):
        light = draw_negative(
            np.random.default_rng(seed), CONFIG, "ring", center=(0.2, -0.1), deflector=None
        )
        radius, q = light.labels["ring_radius_arcsec"], light.labels["ring_axis_ratio"]
        offset = light.labels["ring_offset_arcsec"]
        assert len(light.galaxies) == light.labels["ring_knots"]
        # Each knot lies on the tilted ellipse of semi-axes radius and q * radius about a
        # centre ``offset`` arcsec from the scene's.
        distance = np.array([np.hypot(g.center_x - 0.2, g.center_y + 0.1) for g in light.galaxies])
        assert np.all(distance >= q * radius - offset - 1e-9)
        assert np.all(distance <= radius + offset + 1e-9)
    narrow = replace(CONFIG, ring_radius_arcsec=(1.2, 1.5))
    for seed in range(5):
        light = draw_negative(
            np.random.default_rng(seed), narrow, "ring", center=(0.0, 0.0), deflector=None
        )
        assert 1.2 <= light.labels["ring_radius_arcsec"] <= 1.5


def test_a_centred_star_keeps_its_flux_in_the_cutout():
    # Total flux 10**(-0.4 (m - 30)); only the wide wings and halo beyond the
    # 16.8" cutout (at most a few per cent for these profiles) are lost.
    rng = np.random.default_rng(4)
    config = replace(NO_ARTEFACTS, star_offset_fraction=0.0, star_mag_r=(19.0, 19.0))
    scene = draw_scene(rng, config, is_lens=False, kind="star")
    contaminants = render_components(scene, config)["contaminants"]
    assert len(scene.point_sources) == 1
    field_flux = render_components(replace(scene, point_sources=[]), config)["contaminants"]
    star_r = (contaminants - field_flux)[1].sum()
    np.testing.assert_allclose(star_r, 10 ** (-0.4 * (19.0 - 30.0)), rtol=0.05)


def test_bright_stars_saturate_and_are_flagged():
    config = replace(
        NO_ARTEFACTS, star_offset_fraction=0.0, star_mag_r=(15.0, 15.0), saturation_flux=(2e4, 2e4)
    )
    image, labels = simulate_cutout(np.random.default_rng(8), config, is_lens=False, kind="star")
    assert labels["saturated"] == 1
    # Clipped at 2e4 plus noise (sigma of a 2e4 pixel is about 2e4 / sqrt(gain * 2e4) << 2e4).
    assert image[1].max() < 2e4 * 1.1


def test_lensed_quasars_have_resolved_images_that_map_to_the_source():
    from lenstronomy.LensModel.lens_model import LensModel

    rng = np.random.default_rng(13)
    for _ in range(3):
        scene = draw_scene(rng, NO_ARTEFACTS, is_lens=True, kind="lensed_quasar")
        image, labels = simulate_cutout(rng, NO_ARTEFACTS, is_lens=True, kind="lensed_quasar")
        assert labels["kind"] == "lensed_quasar" and labels["is_lens"] == 1
        assert labels["n_images"] >= 2
        assert labels["image_separation_arcsec"] > 0.8 * labels["seeing_fwhm_arcsec_r"]
        assert 0.45 <= labels["theta_E"] <= 3.2 and np.isfinite(image).all()
    from training.lensed_quasars import solve_images

    x, y, mu = solve_images(scene.lens_model, scene.lens_kwargs, source_xy=(0.05, -0.03))
    beta_x, beta_y = LensModel([scene.lens_model, "SHEAR"]).ray_shooting(x, y, scene.lens_kwargs)
    # Every image is a solution of the lens equation to well under a milliarcsecond.
    np.testing.assert_allclose(beta_x, 0.05, atol=1e-4)
    np.testing.assert_allclose(beta_y, -0.03, atol=1e-4)
    assert len(x) >= 2 and np.all(np.abs(mu) > 0)


@pytest.mark.parametrize("artefact", ["masked_columns", "nan_patch"])
def test_masks_are_nan_and_preprocessing_fills_them(artefact):
    from service.contract.preprocessing import preprocess_cutout

    config = replace(CONFIG, artefact_probability=1.0, artefact_kinds=((artefact, 1.0),))
    image, labels = simulate_cutout(np.random.default_rng(2), config, is_lens=False, kind="plain")
    masked = np.isnan(image)
    assert labels["artefacts"] == artefact
    assert masked.any() and not masked.all()
    assert masked.mean() <= 0.25  # the service refuses cutouts with more (service/fits/raw.py)
    np.testing.assert_allclose(labels["masked_fraction"], masked.mean(), rtol=1e-12)
    assert np.isfinite(image[~masked]).all()
    assert np.isfinite(preprocess_cutout(image)).all()


def test_correlated_noise_keeps_the_pixel_sigma():
    from training.artefacts import correlated_noise

    noise = correlated_noise(np.random.default_rng(0), (3, 256, 256))
    # 196 608 samples: the standard deviation is known to about 0.2%.
    np.testing.assert_allclose(noise.std(), 1.0, atol=0.01)
    neighbours = np.corrcoef(noise[:, :, :-1].ravel(), noise[:, :, 1:].ravel())[0, 1]
    assert neighbours > 0.2


def test_seeing_is_correlated_across_bands_around_the_dr2_medians():
    from training.observing import draw_observation

    rng = np.random.default_rng(6)
    rows = []
    for _ in range(400):
        labels = {}
        draw_observation(rng, CONFIG, labels)
        rows.append([labels[f"seeing_fwhm_arcsec_{b}"] for b in "gri"])
        rows[-1] += [labels[f"depth_10sigma_mag_{b}"] for b in "gri"]
    rows = np.array(rows)
    # DR2 medians (Abbott et al. 2021): FWHM 1.11, 0.95, 0.88"; depth 24.7, 24.4, 23.8.
    np.testing.assert_allclose(np.median(rows[:, :3], axis=0), [1.11, 0.95, 0.88], rtol=0.03)
    np.testing.assert_allclose(np.median(rows[:, 3:], axis=0), [24.7, 24.4, 23.8], atol=0.05)
    assert np.corrcoef(rows[:, 0], rows[:, 2])[0, 1] > 0.8


def test_kind_and_artefact_fractions_follow_the_config():
    from training.artefacts import draw_artefact_kinds

    rng = np.random.default_rng(17)
    n = 600
    kinds = [draw_scene(rng, NO_ARTEFACTS, is_lens=False).kind for _ in range(n)]
    weights = dict(CONFIG.negative_kinds)
    total = sum(weights.values())
    for kind, weight in weights.items():
        p = weight / total
        # Four binomial standard deviations: fails by chance about once in 16 000 kinds.
        assert abs(kinds.count(kind) / n - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-9, kind
    lenses = [draw_scene(rng, NO_ARTEFACTS, is_lens=True).kind for _ in range(300)]
    p = dict(CONFIG.lens_kinds)["lensed_quasar"] / sum(dict(CONFIG.lens_kinds).values())
    assert abs(lenses.count("lensed_quasar") / 300 - p) < 4 * np.sqrt(p * (1 - p) / 300)
    hits = [bool(draw_artefact_kinds(rng, CONFIG)) for _ in range(4000)]
    p = CONFIG.artefact_probability
    assert abs(np.mean(hits) - p) < 4 * np.sqrt(p * (1 - p) / 4000)


@pytest.mark.parametrize(("kind", "is_lens"), [("lensed_quasar", True), ("star", False)])
def test_new_kinds_are_reproducible_from_the_seed(kind, is_lens):
    config = replace(CONFIG, artefact_probability=1.0)
    a = simulate_cutout(np.random.default_rng(31), config, is_lens=is_lens, kind=kind)
    b = simulate_cutout(np.random.default_rng(31), config, is_lens=is_lens, kind=kind)
    np.testing.assert_array_equal(a[0], b[0])  # NaN pixels compare equal here
    assert a[1].keys() == b[1].keys()
    for key, value in a[1].items():
        if isinstance(value, str):
            assert value == b[1][key]
        else:
            np.testing.assert_array_equal(value, b[1][key], err_msg=key)


def test_simulate_command_takes_a_kind_mix(tmp_path):
    """--negative-kinds replaces the negatives' mix (recorded in simulation.json); an unknown
    kind stops the command with a message naming the known ones."""
    import json

    from training.cli import main

    out = tmp_path / "stars"
    mix = "star=1"
    assert (
        main(
            [
                "simulate",
                "--out",
                str(out),
                "--n",
                "4",
                "--seed",
                "5",
                "--workers",
                "1",
                "--negative-kinds",
                mix,
            ]
        )
        == 0
    )
    config = json.loads((out / "simulation.json").read_text())
    assert config["negative_kinds"] == [["star", 1.0]]
    labels = (out / "labels.csv").read_text()
    assert labels.count(",star,") == 2
    with pytest.raises(SystemExit, match="quasar"):
        main(["simulate", "--out", str(tmp_path / "x"), "--n", "2", "--negative-kinds", "stars=1"])


@pytest.mark.parametrize(
    ("kind", "is_lens", "seed"),
    [("lens", True, 5), ("lensed_quasar", True, 6), ("star_galaxy_blend", False, 7)],
)
def test_a_larger_grid_renders_the_same_scene_about_the_same_centre(kind, is_lens, seed):
    config = replace(NO_ARTEFACTS, star_offset_fraction=0.0)
    scene = draw_scene(np.random.default_rng(seed), config, is_lens=is_lens, kind=kind)
    small = render_components(scene, config)
    large = render_components(scene, config, pixels=100)
    # Only light the PSF spreads in from beyond the 64-pixel edge may differ.
    m = scene.psf_kernels["r"].shape[0] // 2
    for name, image in small.items():
        assert image.shape == (3, 64, 64) and large[name].shape == (3, 100, 100)
        # Both sides even: the central 64 x 64 of the 100-pixel grid are the same pixels.
        crop = large[name][:, 18:82, 18:82]
        peak = max(np.abs(image).max(), 1e-30)
        np.testing.assert_allclose(
            crop[:, m:-m, m:-m], image[:, m:-m, m:-m], rtol=0, atol=1e-9 * peak
        )
        np.testing.assert_allclose(crop, image, rtol=0, atol=0.02 * peak)
    assert small["source"][1].sum() > 0 if is_lens else small["source"].max() == 0


def test_a_larger_cutout_has_its_artefacts_scaled_to_the_grid():
    config = replace(CONFIG, artefact_probability=1.0, extra_artefact_mean=3.0)
    for seed in range(3):
        image, labels = simulate_cutout(
            np.random.default_rng(seed), config, is_lens=seed == 0, pixels=101
        )
        masked = np.isnan(image)
        assert image.shape == (3, 101, 101) and image.dtype == np.float32
        assert labels["artefacts"] != "none" and masked.mean() <= 0.25
        np.testing.assert_allclose(labels["masked_fraction"], masked.mean(), rtol=1e-12)
        assert np.isfinite(image[~masked]).all()


def test_simulate_options_reach_the_simulator_config():
    args = build_parser().parse_args(
        [
            "simulate",
            "--out",
            "x",
            "--n",
            "10",
            "--seed",
            "3",
            "--theta-e-range",
            "0.1",
            "3.6",
            "--lens-fraction",
            "1",
            "--unresolved-lenses",
            "--artefact-probability",
            "0.5",
            "--ring-radius-range",
            "1.2",
            "2.0",
        ]
    )
    config = simulation_config(args)
    assert config.artefact_probability == 0.5
    assert config.ring_radius_arcsec == (1.2, 2.0)
    assert (config.seed, config.n_cutouts, config.lens_fraction) == (3, 10, 1.0)
    assert config.theta_E_arcsec == (0.1, 3.6)
    assert config.require_resolved is False
    default = simulation_config(build_parser().parse_args(["simulate", "--out", "x"]))
    assert default.require_resolved is True
    assert default.theta_E_arcsec == SimulationConfig().theta_E_arcsec
    assert default.artefact_probability == SimulationConfig().artefact_probability
    assert default.ring_radius_arcsec == (1.2, 3.5)
    with pytest.raises(SystemExit, match="ring-radius-range"):
        simulation_config(
            build_parser().parse_args(["simulate", "--out", "x", "--ring-radius-range", "2", "1"])
        )
    with pytest.raises(SystemExit, match="artefact-probability"):
        simulation_config(
            build_parser().parse_args(["simulate", "--out", "x", "--artefact-probability", "2"])
        )
