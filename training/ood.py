"""Fit the out-of-distribution score's statistics, set its threshold, and measure it.

``python -m training ood`` runs the exported classifier (ONNX, with its
``features`` output) on simulated training cutouts, fits the statistics of
:mod:`service.contract.ood` (class means and a shared covariance of the
features; mean and covariance of the input statistics), then sets the threshold
so that a chosen share (1%) of an in-distribution test set is flagged. It
writes ``models/lens_classifier_ood.npz`` and the classifier card's
``out_of_distribution`` entry (file, sha256, threshold).

``python -m training ood-evaluate`` scores an in-distribution set and the
out-of-distribution sets of :mod:`training.ood_sets`: AUROC of each kind with
bootstrap intervals, the flagged shares, and the median epistemic std of
theta_E (the service's ``einstein_radius.epistemic_std``) on each.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from service.contract.cards import (
    CLASSIFIER_NAME,
    FEATURES_OUTPUT,
    SEEING_OUTPUT,
    ModelSet,
    OutOfDistributionSpec,
    read_model_card,
    read_model_cards,
)
from service.contract.ood import (
    INPUT_STATISTIC_NAMES,
    OOD_METHOD_ID,
    OOD_METHOD_ID_TWO_TERMS,
    OodStatistics,
    input_statistics,
    novelty_factor,
    read_ood_statistics,
    spread_pass_means,
)
from service.contract.preprocessing import preprocess_batch
from service.contract.uncertainty import (
    QUANTILE_LEVELS,
    MixtureSummary,
    calibrate_by_regime,
    summarise_mc_samples,
)
from training.config import FLAGGED_FRACTION, SEEING_OFFSET, TAIL_QUANTILE
from training.dataset import load_dataset
from training.mc_passes import McPasses, McRunner, cpu_session
from training.metrics import auroc, bootstrap_interval

#: File of the statistics, next to the classifier's card.
STATISTICS_FILE = "lens_classifier_ood.npz"
#: Shrinkage of each covariance towards its diagonal (fraction), so that the
#: 256x256 feature covariance of a few thousand cutouts inverts stably.
FEATURE_SHRINKAGE = 0.05
INPUT_SHRINKAGE = 0.01
#: Cutouts per onnxruntime call.
_BATCH = 256
#: MC-dropout passes per cutout when measuring the epistemic std (the service's default).
_MC_SAMPLES = 100


@dataclass(frozen=True)
class Scored:
    """What the models say about a set of cutouts, for the score and its evaluation."""

    features: NDArray[np.float32]
    inputs: NDArray[np.float64]
    is_lens: NDArray[np.bool_]
    theta_E: NDArray[np.float64]
    """True theta_E (arcsec; NaN for non-lenses)."""
    mc_means: NDArray[np.float32] | None
    """(n, T) theta_E of each MC-dropout pass (arcsec), when asked for."""
    mc_log_variances: NDArray[np.float32] | None
    seeing: NDArray[np.float32] | None = None
    """(n, bands) the classifier's seeing estimates (log10 arcsec), when it has them."""
    point_theta_E: NDArray[np.float64] | None = None
    """(n,) the regressor's point theta_E (arcsec), with the MC passes: what places a
    cutout in its regime of the MC card's table."""
    signal_to_noise: NDArray[np.float64] | None = None
    """(n,) each cutout's signal-to-noise, with the MC passes: the table's other axis."""

    @property
    def epistemic_std(self) -> NDArray[np.float64]:
        """The service's ``einstein_radius.epistemic_std`` of each cutout (arcsec)."""
        if self.mc_means is None:
            raise ValueError("scored without the MC model")
        return self.mc_means.astype(np.float64).std(axis=1)


def score_inputs(
    models_dir: Path, images: NDArray[np.floating], *, epistemic: bool = False
) -> tuple[NDArray[np.float32], NDArray[np.float64], McPasses | None, NDArray | None]:
    """Features, input statistics, (optionally) the MC passes and the seeing estimates
    (None when the classifier has no such output) of raw cutouts.

    Parameters
    ----------
    models_dir : Path
        Folder with the classifier (with ``features``) and, for ``epistemic``, the MC model.
    images : ndarray, shape (n, 3, 64, 64)
        Cutouts as the service decodes them (flux units; masked pixels NaN).
    epistemic : bool
        Also run the MC model (100 passes): theta_E and log-variance of each pass, with
        the point theta_E and signal-to-noise that place a cutout in the MC card's table.
    """
    classifier_card = read_model_card(models_dir / f"{CLASSIFIER_NAME}.json")
    if FEATURES_OUTPUT not in classifier_card.output_names:
        raise ValueError(
            f"{models_dir / classifier_card.onnx_file} has no {FEATURES_OUTPUT!r} output; "
            "re-export the classifier (python -m training export, or reexport_classifier)"
        )
    classifier = cpu_session((models_dir / classifier_card.onnx_file).read_bytes())
    has_seeing = SEEING_OUTPUT in classifier_card.output_names
    outputs = [FEATURES_OUTPUT, SEEING_OUTPUT] if has_seeing else [FEATURES_OUTPUT]
    runner = McRunner(read_model_cards(models_dir), num_samples=_MC_SAMPLES) if epistemic else None
    features, inputs, seeing, passes = [], [], [], []
    for start in range(0, len(images), _BATCH):
        cubes = np.asarray(images[start : start + _BATCH])
        batch = preprocess_batch(cubes)
        values = classifier.run(outputs, {"image": batch})
        features.append(values[0])
        seeing.extend(values[1:])
        inputs.extend(input_statistics(cube) for cube in cubes)
        if runner is not None:
            passes.append(runner.run(batch))
    return (
        np.concatenate(features).astype(np.float32),
        np.stack(inputs),
        McPasses.concatenate(passes) if runner is not None else None,
        np.concatenate(seeing).astype(np.float32) if has_seeing else None,
    )


def score_dataset(models_dir: Path, data_dir: Path, *, epistemic: bool = False) -> Scored:
    """:func:`score_inputs` on a data folder of NPZ shards and ``labels.csv``."""
    dataset = load_dataset(data_dir)
    features, inputs, mc, seeing = score_inputs(models_dir, dataset.images, epistemic=epistemic)
    is_lens = dataset.labels["is_lens"].astype(float) > 0.5
    theta_E = np.where(is_lens, dataset.labels["theta_E"].astype(float), np.nan)
    if mc is None:
        return Scored(features, inputs, is_lens, theta_E, None, None, seeing)
    return Scored(
        features,
        inputs,
        is_lens,
        theta_E,
        mc.means,
        mc.log_variances,
        seeing,
        point_theta_E=mc.point_theta_E,
        signal_to_noise=mc.signal_to_noise,
    )


def _shrunk_precision(centred: NDArray[np.float64], shrinkage: float) -> NDArray[np.float64]:
    """Inverse of the covariance of ``centred`` rows, shrunk towards its diagonal.

    The diagonal target keeps each variable's own variance: a scalar one would
    drown the small variances (the noise correlations) in the large ones.
    """
    covariance = centred.T @ centred / max(len(centred) - 1, 1)
    target = np.diag(np.diag(covariance))
    return np.linalg.pinv((1 - shrinkage) * covariance + shrinkage * target, hermitian=True)


def fit_statistics(
    features: NDArray[np.floating],
    inputs: NDArray[np.floating],
    is_lens: NDArray[np.bool_],
    seeing: NDArray[np.floating] | None = None,
    *,
    tail_quantile: float = TAIL_QUANTILE,
    seeing_offset: float = SEEING_OFFSET,
) -> OodStatistics:
    """Class means and shared covariance of the features; Gaussians of the inputs and, when
    given, of the seeing estimates (log10 arcsec, one column per band).

    The terms' standardisation (median and MAD of log d2) is taken on the fit
    data itself; the threshold, set on other data, absorbs the optimism.
    """
    features = np.asarray(features, dtype=np.float64)
    inputs = np.asarray(inputs, dtype=np.float64)
    classes = [is_lens, ~is_lens]
    means = np.stack([features[c].mean(axis=0) for c in classes])
    centred = np.concatenate([features[c] - means[k] for k, c in enumerate(classes)])
    input_mean = inputs.mean(axis=0)
    seeing_arrays = {}
    if seeing is not None:
        seeing = np.asarray(seeing, dtype=np.float64)
        seeing_mean = seeing.mean(axis=0)
        seeing_arrays = {
            "seeing_mean": seeing_mean,
            "seeing_precision": _shrunk_precision(seeing - seeing_mean, INPUT_SHRINKAGE),
        }
    n_terms = 3 if seeing_arrays else 2
    stats = OodStatistics(
        feature_means=means,
        feature_precision=_shrunk_precision(centred, FEATURE_SHRINKAGE),
        input_mean=input_mean,
        input_precision=_shrunk_precision(inputs - input_mean, INPUT_SHRINKAGE),
        log_d2_median=np.zeros(n_terms),
        log_d2_scale=np.ones(n_terms),
        **seeing_arrays,
    )
    log_d2 = np.log(np.maximum(stats.squared_distances(features, inputs, seeing), 1e-12))
    median = np.median(log_d2, axis=0)
    scale = 1.4826 * np.median(np.abs(log_d2 - median), axis=0)
    if seeing_arrays:
        scale[2] = _tail_matched_scale(log_d2, median, scale, tail_quantile)
        # A hinge: the term counts only past ``seeing_offset`` of its units, so that its
        # in-distribution tail seldom tops the others' (docs/ood.md).
        median[2] += seeing_offset * scale[2]
    # Stored as float32 in models/: round-trip now so that fit and service agree exactly.
    return read_ood_statistics(replace(stats, log_d2_median=median, log_d2_scale=scale).to_bytes())


def _tail_matched_scale(
    log_d2: NDArray[np.float64],
    median: NDArray[np.float64],
    scale: NDArray[np.float64],
    quantile: float,
) -> float:
    """The seeing term's scale, set so that its upper tail on the fit data meets the others'.

    The score is the largest term, so what counts is where each term's in-distribution
    tail lies. Three log-normal-ish seeing estimates have a far lighter tail in
    ``log d2`` than 256 features or 17 statistics, so the median/MAD scale left a PSF
    twice as broad as DES's (d2 ~ 50) below the threshold the other terms set. Here the
    seeing term's ``quantile`` on the fit data is put where the two-term score's is.
    """
    two_terms = ((log_d2[:, :2] - median[:2]) / scale[:2]).max(axis=1)
    seeing_tail = np.quantile(log_d2[:, 2], quantile) - median[2]
    return float(seeing_tail / max(np.quantile(two_terms, quantile), 1e-6))


def fit_ood(
    models_dir: Path,
    fit_dirs: list[Path],
    threshold_dirs: list[Path],
    *,
    flagged_fraction: float = FLAGGED_FRACTION,
    tail_quantile: float = TAIL_QUANTILE,
    seeing_offset: float = SEEING_OFFSET,
) -> dict:
    """Fit the statistics on ``fit_dirs``, set the threshold on ``threshold_dirs``, write both.

    Returns the classifier card's new ``out_of_distribution`` entry.
    """
    fits = [score_dataset(models_dir, d) for d in fit_dirs]
    stats = fit_statistics(
        np.concatenate([s.features for s in fits]),
        np.concatenate([s.inputs for s in fits]),
        np.concatenate([s.is_lens for s in fits]),
        _seeing_of(fits),
        tail_quantile=tail_quantile,
        seeing_offset=seeing_offset,
    )
    held_out = [score_dataset(models_dir, d) for d in threshold_dirs]
    scores = stats.score(
        np.concatenate([s.features for s in held_out]),
        np.concatenate([s.inputs for s in held_out]),
        _seeing_of(held_out),
    )
    threshold = float(np.quantile(scores, 1.0 - flagged_fraction))
    data = stats.to_bytes()
    (models_dir / STATISTICS_FILE).write_bytes(data)
    entry = {
        "method": OOD_METHOD_ID if stats.has_seeing else OOD_METHOD_ID_TWO_TERMS,
        "statistics_file": STATISTICS_FILE,
        "statistics_sha256": hashlib.sha256(data).hexdigest(),
        "threshold": threshold,
        "flagged_fraction": float(np.mean(scores > threshold)),
        "target_flagged_fraction": flagged_fraction,
        "seeing_tail_quantile": tail_quantile if stats.has_seeing else None,
        "seeing_offset": seeing_offset if stats.has_seeing else None,
        "input_statistics": list(INPUT_STATISTIC_NAMES),
        "fit_data": _describe(fit_dirs, fits),
        "threshold_data": _describe(threshold_dirs, held_out),
        "fitted": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    OutOfDistributionSpec.model_validate(entry)
    card_path = models_dir / f"{CLASSIFIER_NAME}.json"
    card = json.loads(card_path.read_text())
    card["out_of_distribution"] = entry
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    read_model_card(card_path)
    return entry


def _seeing_of(scored: list[Scored]) -> NDArray[np.float32] | None:
    """The sets' seeing estimates stacked; None when the classifier gives none."""
    if any(s.seeing is None for s in scored):
        return None
    return np.concatenate([s.seeing for s in scored])


def _describe(dirs: list[Path], scored: list[Scored]) -> list[dict]:
    """Name, size and seed of each data folder, for the card."""
    described = []
    for data_dir, s in zip(dirs, scored, strict=True):
        config_file = data_dir / "simulation.json"
        seed = json.loads(config_file.read_text()).get("seed") if config_file.exists() else None
        described.append({"name": data_dir.name, "n_cutouts": len(s.features), "seed": seed})
    return described


def load_statistics(models_dir: Path) -> tuple[OodStatistics, float]:
    """The shipped statistics and threshold of ``models_dir``'s classifier card."""
    card = read_model_card(models_dir / f"{CLASSIFIER_NAME}.json")
    spec = card.out_of_distribution
    if spec is None:
        raise ValueError(f"{models_dir}: the classifier card has no out_of_distribution entry")
    return read_ood_statistics((models_dir / spec.statistics_file).read_bytes()), spec.threshold


def inflated_summary(
    scored: Scored, factor: NDArray[np.floating], models: ModelSet
) -> MixtureSummary:
    """The served summary with each cutout's pass means spread by ``factor`` about their mean.

    As the service answers (``service.core.inference._summarise``): the pass means
    spread first (which multiplies the epistemic std by ``factor``), then the MC
    card's per-regime table when it has one, else the mixture read at its
    recalibrated levels.
    """
    spread = spread_pass_means(scored.mc_means, factor)
    table = models.mc_regime_table
    levels = None if table is not None else models.mc_mixture_levels
    summary = summarise_mc_samples(spread, scored.mc_log_variances, levels)
    if table is None:
        return summary
    return calibrate_by_regime(
        summary,
        table,
        theta_E_arcsec=scored.point_theta_E,
        signal_to_noise=scored.signal_to_noise,
        num_samples=scored.mc_means.shape[1],
    )


def coverage_68(scored: Scored, factor: NDArray[np.floating], models: ModelSet) -> float:
    """Share of lenses whose true theta_E lies in the served 0.16-0.84 quantiles."""
    lens = scored.is_lens
    quantiles = inflated_summary(scored, factor, models).quantiles[lens]
    low, high = QUANTILE_LEVELS.index(0.16), QUANTILE_LEVELS.index(0.84)
    truth = scored.theta_E[lens]
    return float(np.mean((truth >= quantiles[:, low]) & (truth <= quantiles[:, high])))


def evaluate_ood(
    models_dir: Path, in_dir: Path, ood_dirs: list[Path], *, n_boot: int = 1000, seed: int = 0
) -> dict:
    """AUROC (with 95% bootstrap intervals), flagged shares and epistemic std of each kind.

    Parameters
    ----------
    models_dir : Path
        Models with the fitted statistics.
    in_dir : Path
        In-distribution test cutouts (never the fit data).
    ood_dirs : list of Path
        Out-of-distribution sets (:mod:`training.ood_sets`), one folder per kind.
    n_boot : int
        Bootstrap resamples of each pair of sets (count).
    seed : int
        Seed of the bootstrap resampling.
    """
    stats, threshold = load_statistics(models_dir)
    models = read_model_cards(models_dir)
    rng = np.random.default_rng(seed)
    reference = score_dataset(models_dir, in_dir, epistemic=True)
    ref_terms = stats.terms(reference.features, reference.inputs, reference.seeing)
    ref_scores = ref_terms.max(axis=1)
    ref_flagged = ref_scores > threshold
    ref_epistemic = float(np.median(reference.epistemic_std))
    ref_factor = novelty_factor(ref_scores, threshold)
    ref_inflated = float(np.median(reference.epistemic_std * ref_factor))
    flagged_interval = bootstrap_interval(
        lambda idx: float(np.mean(ref_flagged[idx[0]])), [len(ref_flagged)], rng, n_boot=n_boot
    )
    result = {
        "models": str(models_dir),
        "threshold": threshold,
        "in_distribution": {
            "data": in_dir.name,
            "n": len(ref_scores),
            "flagged_fraction": float(np.mean(ref_flagged)),
            "flagged_fraction_95": flagged_interval,
            "median_epistemic_std_arcsec": ref_epistemic,
            "median_epistemic_std_inflated_arcsec": ref_inflated,
            "coverage_68_lenses": coverage_68(reference, np.ones(len(ref_scores)), models),
            "coverage_68_lenses_inflated": coverage_68(reference, ref_factor, models),
            "median_terms": np.median(ref_terms, axis=0).tolist(),
        },
        "kinds": {},
    }
    for ood_dir in ood_dirs:
        scored = score_dataset(models_dir, ood_dir, epistemic=True)
        terms = stats.terms(scored.features, scored.inputs, scored.seeing)
        scores = terms.max(axis=1)
        labels = np.r_[np.zeros(len(ref_scores)), np.ones(len(scores))]
        both = np.r_[ref_scores, scores]
        n_ref = len(ref_scores)

        def statistic(idx, both=both, labels=labels, n_ref=n_ref):
            rows = np.r_[idx[0], n_ref + idx[1]]
            return auroc(labels[rows], both[rows])

        terms_auroc = [
            auroc(labels, np.r_[ref_terms[:, k], terms[:, k]]) for k in range(terms.shape[1])
        ]
        median_epistemic = float(np.median(scored.epistemic_std))
        inflated = float(np.median(scored.epistemic_std * novelty_factor(scores, threshold)))
        result["kinds"][ood_dir.name] = {
            "n": len(scores),
            "auroc": auroc(labels, both),
            "auroc_95": bootstrap_interval(statistic, [n_ref, len(scores)], rng, n_boot=n_boot),
            "auroc_features_term": terms_auroc[0],
            "auroc_inputs_term": terms_auroc[1],
            "auroc_seeing_term": terms_auroc[2] if len(terms_auroc) > 2 else None,
            "flagged_fraction": float(np.mean(scores > threshold)),
            "median_epistemic_std_arcsec": median_epistemic,
            "epistemic_ratio": median_epistemic / ref_epistemic,
            "median_epistemic_std_inflated_arcsec": inflated,
            "epistemic_ratio_inflated": inflated / ref_inflated,
            "auroc_epistemic_std": auroc(
                labels, np.r_[reference.epistemic_std, scored.epistemic_std]
            ),
        }
    return result


def format_table(result: dict) -> str:
    """The evaluation as a Markdown table (the one in docs/ood.md)."""
    ref = result["in_distribution"]
    low, high = ref["flagged_fraction_95"]
    lines = [
        f"In-distribution ({ref['data']}, n = {ref['n']}): flagged {ref['flagged_fraction']:.2%} "
        f"(95%: {low:.2%}-{high:.2%}); median epistemic std "
        f"{ref['median_epistemic_std_arcsec']:.4f} arcsec "
        f"({ref['median_epistemic_std_inflated_arcsec']:.4f} inflated); "
        f"68% coverage of lenses {ref['coverage_68_lenses']:.3f} "
        f"({ref['coverage_68_lenses_inflated']:.3f} inflated).",
        "",
        "| kind | n | AUROC (95% bootstrap) | AUROC features / inputs term | flagged "
        "| median epistemic std (arcsec) | ratio to in-distribution | AUROC of epistemic std "
        "| ratio, inflated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, row in result["kinds"].items():
        a_low, a_high = row["auroc_95"]
        lines.append(
            f"| {kind} | {row['n']} | {row['auroc']:.3f} ({a_low:.3f}-{a_high:.3f}) | "
            f"{row['auroc_features_term']:.3f} / {row['auroc_inputs_term']:.3f} | "
            f"{row['flagged_fraction']:.1%} | {row['median_epistemic_std_arcsec']:.4f} | "
            f"{row['epistemic_ratio']:.2f} | {row['auroc_epistemic_std']:.3f} | "
            f"{row['epistemic_ratio_inflated']:.2f} |"
        )
    return "\n".join(lines)
