"""Intervals calibrated per regime: fit the MC card's table, and check its coverage.

One calibration of the whole population (:mod:`training.calibrate`) leaves the
68% interval covering about 0.78 of the lenses predicted under 1 arcsec and
0.56-0.60 of those above 2 arcsec. Here the held-out lenses are split by bin
of predicted theta_E (the regressor's point estimate, 0.5 arcsec wide, sparse
end bins merged until each holds ``min_lenses``) and by tercile of the
cutout's signal-to-noise (:func:`service.contract.preprocessing.signal_to_noise`);
in each regime the quantiles of the standardised residual (truth - m) / s, m
and s the mixture's mean and standard deviation, become the calibrated
distribution's (split conformal by group; Romano, Patterson & Candes 2019).
m and s are pooled over several numbers of dropout passes, so one table serves
any ``samples``. The ONNX models run on onnxruntime and the summaries are the
service's own (:mod:`service.contract.uncertainty`): what is fitted and checked
is what is served.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from service.contract.cards import (
    MC_NAME,
    RegimeCalibration,
    read_model_cards,
)
from service.contract.preprocessing import noise_level, preprocess_batch
from service.contract.uncertainty import (
    QUANTILE_LEVELS,
    REGIME_TABLE_LEVELS,
    MixtureSummary,
    RegimeTable,
    calibrate_by_regime,
    regime_spread,
    summarise_mc_samples,
)
from training.dataset import load_dataset
from training.mc_passes import McPasses, McRunner

#: Width of the bins of predicted theta_E (arcsec).
BIN_WIDTH_ARCSEC = 0.5
#: Fewest lenses in a bin of predicted theta_E; sparser end bins merge inward.
MIN_BIN_LENSES = 300
#: Signal-to-noise bands (terciles).
SIGNAL_TO_NOISE_BANDS = 3
#: Fewest lenses in one regime (bin x band) for its own quantiles; a sparser regime
#: takes those of its whole theta_E bin.
MIN_REGIME_LENSES = 100
#: Numbers of dropout passes whose residuals are pooled into one table.
FIT_NUM_SAMPLES = (10, 100, 1000)
#: Central intervals checked, with their nominal fraction and accepted range.
CHECKED_INTERVALS: dict[str, tuple[float, float, float, float]] = {
    "68": (0.16, 0.84, 0.64, 0.72),
    "95": (0.025, 0.975, 0.92, 0.975),
}


@dataclass(frozen=True)
class LensPredictions:
    """What the served models say about held-out lenses, for several numbers of passes."""

    truth: NDArray[np.float64]
    """True theta_E (arcsec), shape (n,)."""
    theta_E_point: NDArray[np.float64]
    """The regressor's theta_E (arcsec), shape (n,)."""
    signal_to_noise: NDArray[np.float64]
    """Central-aperture signal-to-noise (dimensionless), shape (n,)."""
    noise_sigma: NDArray[np.float64]
    """The preprocessing's noise scale in the data's flux unit (AB zero point 30), shape (n,)."""
    summaries: dict[int, MixtureSummary]
    """Mixture summary per number of passes T; quantiles at the card's mixture levels."""


def predict_lenses(
    models_dir: Path,
    data_dirs: list[Path],
    *,
    num_samples: tuple[int, ...],
    batch_size: int = 256,
    seed: int = 17,
) -> LensPredictions:
    """Run the served models on every lens of ``data_dirs`` at each T in ``num_samples``.

    Parameters
    ----------
    models_dir : Path
        Folder with the three ONNX models and their cards.
    data_dirs : list of Path
        Simulated sets (``python -m training simulate``) no model was trained on.
    num_samples : tuple of int
        Numbers of MC-dropout passes per cutout (samples).
    batch_size : int
        Cutouts per model call (cutouts).
    seed : int
        Seed of onnxruntime's dropout generator (the masks of all batches follow from it).
    """
    cubes, truth = [], []
    for data_dir in data_dirs:
        dataset = load_dataset(data_dir)
        lenses = dataset.labels["is_lens"] == 1
        cubes.append(dataset.images[lenses])
        truth.append(dataset.labels["theta_E"][lenses])
    cube = np.concatenate(cubes)
    images = preprocess_batch(cube)
    models = read_model_cards(Path(models_dir))
    levels = models.mc_mixture_levels
    # onnxruntime seeds the graph's dropout generator when the session is created.
    ort.set_seed(seed)
    # Two threads: a modest share of a shared machine.
    runner = McRunner(models, num_samples=max(num_samples), threads=2)
    batches: list[McPasses] = []
    parts: dict[int, list[MixtureSummary]] = {t: [] for t in num_samples}
    for start in range(0, len(images), batch_size):
        passes = runner.run(images[start : start + batch_size])
        batches.append(passes)
        means, log_variances = passes.means, passes.log_variances
        # The passes are independent draws: the first t of max(T) passes are a draw at t,
        # as the service's batcher serves a request for fewer passes from a shared call.
        for t in num_samples:
            parts[t].append(summarise_mc_samples(means[:, :t], log_variances[:, :t], levels))
    placed = McPasses.concatenate(batches)
    return LensPredictions(
        truth=np.concatenate(truth).astype(np.float64),
        theta_E_point=placed.point_theta_E,
        signal_to_noise=placed.signal_to_noise,
        noise_sigma=np.array([noise_level(c) for c in cube]),
        summaries={t: _concatenate(p) for t, p in parts.items()},
    )


def _concatenate(parts: list[MixtureSummary]) -> MixtureSummary:
    return MixtureSummary(
        **{
            field: np.concatenate([getattr(p, field) for p in parts])
            for field in ("mean", "std", "aleatoric_std", "epistemic_std", "quantiles")
        }
    )


def theta_E_bin_edges(
    theta_E_arcsec: NDArray[np.floating],
    *,
    width: float = BIN_WIDTH_ARCSEC,
    min_lenses: int = MIN_BIN_LENSES,
) -> tuple[NDArray[np.float64], list[str]]:
    """Interior edges of ``width``-wide bins of theta_E (arcsec), sparse bins merged.

    Bins start on multiples of ``width``. An end bin with fewer than
    ``min_lenses`` merges into its neighbour until it has enough; a sparse
    inner bin merges into its smaller neighbour. Returns the interior edges and
    one line per merge.
    """
    values = np.asarray(theta_E_arcsec, dtype=np.float64)
    low = np.floor(values.min() / width) * width
    high = np.ceil(values.max() / width) * width
    edges = list(np.round(np.arange(low + width, high - width / 2, width), 6))
    notes: list[str] = []

    def counts() -> NDArray[np.intp]:
        return np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)

    while edges:
        n = counts()
        if n[0] < min_lenses:
            notes.append(f"bin below {edges[0]:.2f} arcsec ({n[0]} lenses) merged upward")
            edges.pop(0)
        elif n[-1] < min_lenses:
            notes.append(f"bin above {edges[-1]:.2f} arcsec ({n[-1]} lenses) merged downward")
            edges.pop()
        elif (n < min_lenses).any():
            i = int(np.argmin(n))
            drop = i - 1 if n[i - 1] < n[i + 1] else i
            notes.append(f"bin {i} ({n[i]} lenses) merged with a neighbour")
            edges.pop(drop)
        else:
            break
    return np.asarray(edges, dtype=np.float64), notes


def fit_regime_table(
    *,
    truth: NDArray[np.floating],
    theta_E_point: NDArray[np.floating],
    signal_to_noise: NDArray[np.floating],
    means: list[NDArray[np.floating]],
    stds: list[NDArray[np.floating]],
    min_lenses: int = MIN_BIN_LENSES,
    bands: int = SIGNAL_TO_NOISE_BANDS,
    min_regime_lenses: int = MIN_REGIME_LENSES,
) -> tuple[RegimeTable, dict]:
    """Fit the per-regime quantiles of the standardised residual.

    Parameters
    ----------
    truth, theta_E_point : ndarray, shape (n,)
        True and predicted (point estimate) theta_E of each lens (arcsec).
    signal_to_noise : ndarray, shape (n,)
        Each lens's signal-to-noise (dimensionless).
    means, stds : list of ndarray, shape (n,) each
        The mixture's mean and spread (:func:`~service.contract.uncertainty.regime_spread`;
        arcsec) at each number of passes pooled into the fit.
    min_lenses : int
        Fewest lenses per theta_E bin (lenses).
    bands : int
        Signal-to-noise bands, at equal counts (count).
    min_regime_lenses : int
        Fewest lenses for a regime's own quantiles (lenses).

    Returns
    -------
    RegimeTable, dict
        The table, and its provenance: lenses per regime, bin merges, pooled T count.
    """
    truth = np.asarray(truth, dtype=np.float64)
    edges, notes = theta_E_bin_edges(theta_E_point, min_lenses=min_lenses)
    snr_edges = np.quantile(signal_to_noise, np.arange(1, bands) / bands)
    theta_bin = np.searchsorted(edges, theta_E_point, side="right")
    snr_band = np.searchsorted(snr_edges, signal_to_noise, side="right")
    residuals = np.stack(
        [(truth - np.asarray(m)) / np.asarray(s) for m, s in zip(means, stds, strict=True)]
    )  # (passes settings, n)
    table = np.empty((len(edges) + 1, bands, len(REGIME_TABLE_LEVELS)))
    n_lenses = np.zeros((len(edges) + 1, bands), dtype=int)
    for i in range(len(edges) + 1):
        for j in range(bands):
            cell = (theta_bin == i) & (snr_band == j)
            n_lenses[i, j] = int(cell.sum())
            if n_lenses[i, j] < min_regime_lenses:
                cell = theta_bin == i
                notes.append(f"regime ({i}, {j}) has {n_lenses[i, j]} lenses: its bin's quantiles")
            table[i, j] = _rising(np.quantile(residuals[:, cell].ravel(), REGIME_TABLE_LEVELS))
    fitted = RegimeTable(
        theta_E_edges_arcsec=edges,
        signal_to_noise_edges=snr_edges,
        levels=REGIME_TABLE_LEVELS,
        residual_quantiles=table,
    )
    return fitted, {"n_lenses": n_lenses.tolist(), "notes": notes}


def _rising(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """Quantiles made strictly rising (ties, from few lenses, split by 1e-6)."""
    out = values.copy()
    for k in range(1, len(out)):
        out[k] = max(out[k], out[k - 1] + 1e-6)
    return out


def coverage_report(
    predictions: LensPredictions,
    table: RegimeTable | None,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Coverage of the 68% and 95% intervals by theta_E bin and by noise tercile, per T.

    The bins of predicted theta_E are this set's own (:func:`theta_E_bin_edges`);
    the terciles are this set's, of the signal-to-noise and of the
    preprocessing's noise scale. Each coverage has a bootstrap 95% interval.
    With ``table`` None, the quantiles are the served mixture's (the card's
    mixture levels).
    """
    rng = np.random.default_rng(seed)
    edges, notes = theta_E_bin_edges(predictions.theta_E_point)
    groups: dict[str, NDArray[np.bool_]] = {"all": np.ones(len(predictions.truth), dtype=bool)}
    bounds = [-np.inf, *edges, np.inf]
    theta_bin = np.searchsorted(edges, predictions.theta_E_point, side="right")
    for i in range(len(bounds) - 1):
        groups[f"theta_E {bounds[i]:.1f}-{bounds[i + 1]:.1f}"] = theta_bin == i
    for name, values in (
        ("signal_to_noise", predictions.signal_to_noise),
        ("noise_sigma", predictions.noise_sigma),
    ):
        cuts = np.quantile(values, [1 / 3, 2 / 3])
        band = np.searchsorted(cuts, values, side="right")
        for j, label in enumerate(("low", "mid", "high")):
            groups[f"{name} {label}"] = band == j
    by_t: dict[str, dict] = {}
    for t, summary in predictions.summaries.items():
        if table is not None:
            summary = calibrate_by_regime(
                summary,
                table,
                theta_E_arcsec=predictions.theta_E_point,
                signal_to_noise=predictions.signal_to_noise,
                num_samples=t,
            )
        rows: dict[str, dict] = {}
        for group, mask in groups.items():
            row: dict = {"n": int(mask.sum())}
            for name, (low, high, *_) in CHECKED_INTERVALS.items():
                q = summary.quantiles[mask]
                lo, hi = QUANTILE_LEVELS.index(low), QUANTILE_LEVELS.index(high)
                truth = predictions.truth[mask]
                covered = ((truth >= q[:, lo]) & (truth <= q[:, hi])).astype(np.float64)
                draws = rng.integers(0, len(covered), (bootstrap, len(covered)))
                resampled = covered[draws].mean(axis=1)
                row[name] = {
                    "coverage": float(covered.mean()),
                    "ci95": [float(v) for v in np.quantile(resampled, [0.025, 0.975])],
                }
            rows[group] = row
        by_t[str(t)] = rows
    return {"bins": edges.tolist(), "notes": notes, "coverage": by_t}


def within_targets(report: dict) -> list[str]:
    """The (T, group, interval) whose coverage falls outside the accepted range."""
    misses = []
    for t, rows in report["coverage"].items():
        for group, row in rows.items():
            for name, (*_, low, high) in CHECKED_INTERVALS.items():
                value = row[name]["coverage"]
                if not low <= value <= high:
                    misses.append(f"T={t} {group}: {name}% covers {value:.3f}")
    return misses


def format_report(report: dict) -> str:
    """A Markdown table of a :func:`coverage_report`: one row per group, two columns per T."""
    ts = list(report["coverage"])
    header = "| group | n | " + " | ".join(f"68% T={t} | 95% T={t}" for t in ts) + " |"
    lines = [header, "|" + "---|" * (2 + 2 * len(ts))]
    for group in report["coverage"][ts[0]]:
        cells = []
        for t in ts:
            row = report["coverage"][t][group]
            for name in CHECKED_INTERVALS:
                c = row[name]
                cells.append(f"{c['coverage']:.3f} ({c['ci95'][0]:.3f}-{c['ci95'][1]:.3f})")
        n = report["coverage"][ts[0]][group]["n"]
        lines.append(f"| {group} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibrate_regimes(
    models_dir: Path, data_dirs: list[Path], *, num_samples: tuple[int, ...] = FIT_NUM_SAMPLES
) -> dict:
    """Fit the per-regime table on ``data_dirs`` and write it into the MC card in ``models_dir``.

    Returns the table's provenance (also written into the card).
    """
    predictions = predict_lenses(models_dir, data_dirs, num_samples=num_samples)
    table, provenance = fit_regime_table(
        truth=predictions.truth,
        theta_E_point=predictions.theta_E_point,
        signal_to_noise=predictions.signal_to_noise,
        means=[predictions.summaries[t].mean for t in num_samples],
        stds=[regime_spread(predictions.summaries[t], t) for t in num_samples],
    )
    calibration = RegimeCalibration(
        theta_E_edges_arcsec=tuple(table.theta_E_edges_arcsec.tolist()),
        signal_to_noise_edges=tuple(table.signal_to_noise_edges.tolist()),
        levels=table.levels,
        residual_quantiles=tuple(
            tuple(tuple(row) for row in bins) for bins in table.residual_quantiles.tolist()
        ),
    )
    provenance = {
        "method": "split-conformal quantiles of (theta_E - mean) / std per theta_E bin x "
        "signal-to-noise tercile, pooled over num_samples",
        "num_samples": list(num_samples),
        "data_dirs": [str(d) for d in data_dirs],
        **provenance,
    }
    card_path = Path(models_dir) / f"{MC_NAME}.json"
    card = json.loads(card_path.read_text())
    card["regime_calibration"] = {**calibration.model_dump(mode="json"), **provenance}
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return provenance


def check_regimes(
    models_dir: Path, data_dirs: list[Path], *, num_samples: tuple[int, ...] = FIT_NUM_SAMPLES
) -> dict:
    """Coverage report of the served intervals of ``models_dir`` on the lenses of ``data_dirs``.

    Has ``calibrated`` (the card's per-regime table, when it has one) and
    ``mixture`` (the mixture at the card's mixture levels, as served without it).
    """
    predictions = predict_lenses(models_dir, data_dirs, num_samples=num_samples)
    table = read_model_cards(Path(models_dir)).mc_regime_table
    report = {"mixture": coverage_report(predictions, None)}
    if table is not None:
        report["calibrated"] = coverage_report(predictions, table)
    report["data_dirs"] = [str(d) for d in data_dirs]
    return report
