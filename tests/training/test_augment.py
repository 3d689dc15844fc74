"""Grid symmetries: group laws and label transforms."""

from __future__ import annotations

import numpy as np

from training.augment import mirror_x, random_symmetry, rotate90


def _example(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(5, 8, 8, 3)), rng.normal(size=(5, 5))


def test_four_rotations_and_two_mirrors_are_the_identity():
    images, params = _example()
    im, par = images, params
    for _ in range(4):
        im, par = rotate90(im, par)
    np.testing.assert_array_equal(im, images)
    np.testing.assert_array_equal(par, params)
    im, par = mirror_x(*mirror_x(images, params))
    np.testing.assert_array_equal(im, images)
    np.testing.assert_array_equal(par, params)


def test_rotation_keeps_theta_e_and_the_ellipticity_modulus():
    images, params = _example(1)
    _, rotated = rotate90(images, params)
    np.testing.assert_array_equal(rotated[:, 0], params[:, 0])
    np.testing.assert_allclose(
        np.hypot(rotated[:, 1], rotated[:, 2]), np.hypot(params[:, 1], params[:, 2])
    )
    np.testing.assert_allclose(
        np.hypot(rotated[:, 3], rotated[:, 4]), np.hypot(params[:, 3], params[:, 4])
    )


def test_random_symmetry_maps_each_cutout_by_one_of_the_eight():
    images, params = _example(2)
    out_images, out_params = random_symmetry(images, params, np.random.default_rng(3))
    for k in range(len(images)):
        candidates = []
        im, par = images[k : k + 1], params[k : k + 1]
        for mirrored in (False, True):
            a, b = mirror_x(im, par) if mirrored else (im, par)
            for _ in range(4):
                candidates.append((a, b))
                a, b = rotate90(a, b)
        assert any(
            np.array_equal(out_images[k], a[0]) and np.allclose(out_params[k], b[0])
            for a, b in candidates
        )
