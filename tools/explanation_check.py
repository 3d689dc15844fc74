"""Where the served occlusion maps put their mass on simulated lenses, and a figure of a few.

Simulates ``--lenses`` lenses with the training simulator (:func:`training.simulate.
simulate_cutout`, seeded), preprocesses them as the service does, and computes the maps of
:mod:`service.core.explain` with the shipped ONNX classifier and point regressor. For each
lens and map it measures the share of the map's absolute mass that lies in the annulus
theta_E - 1" <= r <= theta_E + 1" around the true lens centre (inner edge clipped at 0, so a
disc for theta_E <= 1"), and the same share for a random map of the same total: uniform
random magnitudes over the whole cutout (the issue's baseline), and over the central square
the maps probe (a stricter one: what the grid's placement alone would give). It prints the
figures as JSON and draws a few lenses with their maps (``--figure``).

Needs the ``train`` extra (lenstronomy, matplotlib). The acceptance tests in
``tests/training/test_explanations.py`` import these functions.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from service.contract.preprocessing import preprocess_cutout
from service.core.explain import DEFAULT_GRID, Explanation, explain_occlusion
from training.config import PIXEL_SCALE_ARCSEC, SimulationConfig
from training.simulate import simulate_cutout

REPO = Path(__file__).resolve().parents[1]
#: Half-width of the annulus around theta_E (arcsec), from issue 17's acceptance criterion.
ANNULUS_HALF_WIDTH_ARCSEC = 1.0
CUTOUT_PIXELS = 64


@dataclass(frozen=True)
class SimulatedLenses:
    """Preprocessed simulated lenses and their true mass parameters."""

    images: NDArray[np.float32]
    """Shape (n, 64, 64, 3): network inputs."""
    theta_E: NDArray[np.float64]
    """Shape (n,): true Einstein radius (arcsec)."""
    center_x: NDArray[np.float64]
    """Shape (n,): true lens centre, x from the cutout centre along columns (arcsec)."""
    center_y: NDArray[np.float64]
    """Shape (n,): true lens centre, y from the cutout centre along rows (arcsec)."""


def simulate_lenses(n: int, *, seed: int) -> SimulatedLenses:
    """``n`` lenses from the training simulator's default configuration, seeded."""
    rng = np.random.default_rng(seed)
    config = SimulationConfig()
    images, labels = [], []
    for _ in range(n):
        cube, label = simulate_cutout(rng, config, is_lens=True)
        images.append(preprocess_cutout(cube))
        labels.append(label)
    return SimulatedLenses(
        images=np.stack(images),
        theta_E=np.array([label["theta_E"] for label in labels]),
        center_x=np.array([label["center_x"] for label in labels]),
        center_y=np.array([label["center_y"] for label in labels]),
    )


def session(path: Path | bytes) -> ort.InferenceSession:
    """A CPU onnxruntime session of one model file (or its serialised bytes)."""
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def occlusion_maps(
    images: NDArray[np.float32],
    classifier: ort.InferenceSession,
    regressor: ort.InferenceSession,
) -> list[Explanation]:
    """The service's occlusion maps of ``images`` for these two sessions."""

    def probability(x: NDArray[np.float32]) -> NDArray[np.float32]:
        return classifier.run(None, {"image": x})[0].reshape(-1)

    def theta_E(x: NDArray[np.float32]) -> NDArray[np.float32]:
        return regressor.run(None, {"image": x})[0][:, 0]

    return explain_occlusion(
        images,
        lens_probability=probability(images),
        theta_E=theta_E(images),
        predict_lens_probability=probability,
        predict_theta_E=theta_E,
    )


def annuli(lenses: SimulatedLenses) -> NDArray[np.bool_]:
    """Shape (n, 64, 64): pixels with |r - theta_E| <= 1" from the true centre (r >= 0)."""
    # Pixel centres as the simulator places them: x with column, y with row, 0 at (n-1)/2.
    coords = (np.arange(CUTOUT_PIXELS) - (CUTOUT_PIXELS - 1) / 2) * PIXEL_SCALE_ARCSEC
    x, y = np.meshgrid(coords, coords)
    r = np.hypot(x[None] - lenses.center_x[:, None, None], y[None] - lenses.center_y[:, None, None])
    theta = lenses.theta_E[:, None, None]
    inner = np.maximum(theta - ANNULUS_HALF_WIDTH_ARCSEC, 0.0)
    return (r >= inner) & (r <= theta + ANNULUS_HALF_WIDTH_ARCSEC)


def mass_fractions(maps: NDArray[np.floating], rings: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Per lens, the share of the map's absolute mass inside its annulus (NaN for a 0 map)."""
    mass = np.abs(maps.astype(np.float64))
    total = mass.sum(axis=(1, 2))
    inside = np.where(rings, mass, 0.0).sum(axis=(1, 2))
    return np.divide(inside, total, out=np.full_like(total, np.nan), where=total > 0)


def random_maps(
    like: NDArray[np.floating], rng: np.random.Generator, *, support: NDArray[np.bool_] | None
) -> NDArray[np.float64]:
    """Uniform random magnitudes on ``support`` (all pixels if None), each with ``like``'s total."""
    values = rng.uniform(0.0, 1.0, like.shape)
    if support is not None:
        values = np.where(support, values, 0.0)
    total = np.abs(like.astype(np.float64)).sum(axis=(1, 2), keepdims=True)
    return values / values.sum(axis=(1, 2), keepdims=True) * total


def probed_square() -> NDArray[np.bool_]:
    """The pixels the service's grid occludes, shape (64, 64)."""
    return DEFAULT_GRID.masks((CUTOUT_PIXELS, CUTOUT_PIXELS)).any(axis=0)


def measure(lenses: SimulatedLenses, explanations: list[Explanation], seed: int) -> dict:
    """Mean and median annulus shares of each map and of its random counterparts."""
    rings = annuli(lenses)
    rng = np.random.default_rng(seed)
    out: dict = {"lenses": len(lenses.theta_E)}
    for name in ("lens_probability", "theta_E"):
        maps = np.stack([getattr(e, name) for e in explanations])
        shares = {
            "map": mass_fractions(maps, rings),
            "random_over_cutout": mass_fractions(random_maps(maps, rng, support=None), rings),
            "random_over_probed_square": mass_fractions(
                random_maps(maps, rng, support=probed_square()), rings
            ),
        }
        out[name] = {
            key: {
                "mean": float(np.nanmean(v)),
                "median": float(np.nanmedian(v)),
                "zero_maps": int(np.isnan(v).sum()),
            }
            for key, v in shares.items()
        }
    return out


def draw_figure(
    lenses: SimulatedLenses, explanations: list[Explanation], path: Path, count: int = 4
) -> None:
    """Composite, P(lens) map and theta_E map of the first ``count`` lenses: the annulus in
    green, the probed square dashed; FITS row 0 at the bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, Rectangle

    figure, axes = plt.subplots(count, 3, figsize=(7.5, 2.5 * count), squeeze=False)
    scale = PIXEL_SCALE_ARCSEC
    centre = (CUTOUT_PIXELS - 1) / 2
    for i in range(count):
        rgb = lenses.images[i][..., ::-1]  # g, r, i -> blue, green, red
        rgb = np.clip(rgb / max(float(np.percentile(rgb, 99.5)), 1e-6), 0.0, 1.0)
        column = centre + lenses.center_x[i] / scale
        row = centre + lenses.center_y[i] / scale
        theta = lenses.theta_E[i]
        panels = (
            (rgb, None, f"θ_E = {theta:.2f}″"),
            (explanations[i].lens_probability, "RdBu_r", "drop in P(lens)"),
            (explanations[i].theta_E, "PuOr_r", "drop in θ_E (″)"),
        )
        for ax, (picture, cmap, title) in zip(axes[i], panels, strict=True):
            if cmap is None:
                ax.imshow(picture, origin="lower")
            else:
                limit = max(float(np.abs(picture).max()), 1e-9)
                shown = ax.imshow(picture, origin="lower", cmap=cmap, vmin=-limit, vmax=limit)
                figure.colorbar(shown, ax=ax, fraction=0.046)
            if cmap is not None:  # the square the patches probe; 0 outside it
                low = DEFAULT_GRID.starts(CUTOUT_PIXELS)[0] - 0.5
                side = DEFAULT_GRID.region_pixels
                ax.add_patch(Rectangle((low, low), side, side, fill=False, ls="--", lw=0.8))
            for radius in (theta - ANNULUS_HALF_WIDTH_ARCSEC, theta + ANNULUS_HALF_WIDTH_ARCSEC):
                if radius > 0:
                    ax.add_patch(Circle((column, row), radius / scale, fill=False, color="lime"))
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lenses", type=int, default=200, help="simulated lenses (count)")
    parser.add_argument("--seed", type=int, default=20261203, help="simulation seed")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--figure", type=Path, default=None, help="PNG of a few lenses")
    args = parser.parse_args(argv)
    lenses = simulate_lenses(args.lenses, seed=args.seed)
    explanations = occlusion_maps(
        lenses.images,
        session(args.models_dir / "lens_classifier.onnx"),
        session(args.models_dir / "einstein_radius.onnx"),
    )
    print(json.dumps(measure(lenses, explanations, args.seed), indent=2))
    if args.figure is not None:
        draw_figure(lenses, explanations, args.figure)


if __name__ == "__main__":
    main()
