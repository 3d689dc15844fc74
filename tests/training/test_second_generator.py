"""The GalSim second generator: its lens equation, labels, noise and reproducibility."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("galsim")

from training import second_generator as sg  # noqa: E402
from training.dataset import load_dataset  # noqa: E402


@pytest.mark.parametrize("q", [0.45, 0.8, 1.0])
def test_sie_shear_deflection_matches_lenstronomy_with_the_training_labels(q):
    # training.simulate labels theta_E, e1, e2 and the centre as lenstronomy's SIE + SHEAR
    # take them; the same numbers must give the same deflection here.
    lens_model = pytest.importorskip("lenstronomy.LensModel.lens_model")
    from lenstronomy.Util.param_util import phi_q2_ellipticity

    rng = np.random.default_rng(1)
    x, y = rng.uniform(-4, 4, (2, 200))
    phi, theta_e, centre, shear = 0.7, 1.37, (0.12, -0.08), (0.03, -0.05)
    e1, e2 = phi_q2_ellipticity(phi, q)
    expected = lens_model.LensModel(["SIE", "SHEAR"]).alpha(
        x,
        y,
        [
            {"theta_E": theta_e, "e1": e1, "e2": e2, "center_x": centre[0], "center_y": centre[1]},
            {"gamma1": shear[0], "gamma2": shear[1], "ra_0": centre[0], "dec_0": centre[1]},
        ],
    )
    got = sg.sie_shear_deflection(
        x,
        y,
        {
            "theta_E": theta_e,
            "q": q,
            "phi": phi,
            "center_x": centre[0],
            "center_y": centre[1],
            "gamma1": shear[0],
            "gamma2": shear[1],
        },
    )
    # lenstronomy evaluates the SIE through its EPL/NIE code with a tiny core: 1e-4 arcsec.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_lens_labels_use_the_training_ellipticity_convention():
    rng = np.random.default_rng(4)
    scene = sg.draw_scene(rng, is_lens=True)
    lens, labels = scene.lens, scene.labels
    ellipticity = (1 - lens["q"]) / (1 + lens["q"])
    np.testing.assert_allclose(labels["e1"], ellipticity * math.cos(2 * lens["phi"]))
    np.testing.assert_allclose(labels["e2"], ellipticity * math.sin(2 * lens["phi"]))
    assert (labels["center_x"], labels["center_y"]) == (lens["center_x"], lens["center_y"])


def test_lenses_are_brighter_near_the_einstein_ring_than_without_their_source():
    rng = np.random.default_rng(8)
    scene = sg.draw_scene(rng, is_lens=True)
    with_source, source = sg.render(scene)
    without, _ = sg.render(scene, with_source=False)
    np.testing.assert_allclose(with_source - without, source, atol=1e-9)
    coords = (np.arange(sg.CUTOUT_PIXELS) - (sg.CUTOUT_PIXELS - 1) / 2) * sg.PIXEL_SCALE_ARCSEC
    x, y = np.meshgrid(coords, coords)
    radius = np.hypot(x - scene.lens["center_x"], y - scene.lens["center_y"])
    theta_e = scene.lens["theta_E"]
    ring = np.abs(radius - theta_e) < 0.4
    far = radius > theta_e + 2.5
    # The lensed light sits on the ring, not in the outskirts (in every band).
    assert np.all(source[:, ring].mean(axis=1) > 0)
    assert np.all(source[:, ring].mean(axis=1) > 20 * source[:, far].mean(axis=1))
    # Surface brightness is conserved, so the lensed flux is the source's flux times
    # a magnification > 1 for a source inside the caustic region (r band).
    unlensed_r = sum(obj.flux for obj in scene.source["r"])
    assert source[1].sum() > unlensed_r


def test_sky_noise_gives_the_dr2_ten_sigma_depth():
    # A point source at the 10-sigma depth has S/N 10 in the 1.95" aperture, with the
    # sky noise alone (sqrt(aperture pixels) x per-pixel sigma).
    scene = sg.draw_scene(np.random.default_rng(2), is_lens=False)
    sigma = sg.noise_sigma(scene, np.zeros((3, 64, 64)))
    aperture_pixels = math.pi * (1.95 / 2 / 0.263) ** 2
    for k, band in enumerate(sg.BANDS):
        depth_flux = 10 ** (-0.4 * (scene.depth_10sigma_mag[band] - 30))
        np.testing.assert_allclose(depth_flux / (sigma[k, 0, 0] * math.sqrt(aperture_pixels)), 10)


def test_shards_are_reproducible_finite_and_balanced():
    seed = np.random.SeedSequence(21)
    images, labels = sg.simulate_shard(6, seed)
    again, labels_again = sg.simulate_shard(6, seed)
    np.testing.assert_array_equal(images, again)
    assert json.dumps(labels) == json.dumps(labels_again)  # NaN labels compare equal as text
    assert images.shape == (6, 3, 64, 64) and images.dtype == np.float32
    assert np.isfinite(images).all()
    assert [row["is_lens"] for row in labels] == [1, 1, 1, 0, 0, 0]
    for row in labels[:3]:
        assert row["kind"] == "lens"
        assert row["arc_snr"] >= sg.MIN_ARC_SNR and row["magnification"] >= sg.MIN_MAGNIFICATION
        assert 0.5 <= row["theta_E"] <= 3.0
    assert all(
        row["kind"] in sg.NEGATIVE_KINDS and math.isnan(row["theta_E"]) for row in labels[3:]
    )


def test_generate_writes_the_dataset_format_whatever_the_workers(tmp_path):
    one = sg.generate(tmp_path / "one", n_cutouts=5, seed=3, workers=1, shard_size=3)
    two = sg.generate(tmp_path / "two", n_cutouts=5, seed=3, workers=2, shard_size=3)
    for name in ("shard_0000.npz", "shard_0001.npz", "labels.csv"):
        assert (one / name).read_bytes() == (two / name).read_bytes()
    dataset = load_dataset(one)
    assert dataset.images.shape == (5, 3, 64, 64)
    assert list(dataset.labels["is_lens"]) == [1, 1, 0, 1, 0]
