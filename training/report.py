"""Evaluation of the exported ONNX models on a simulated set, with bootstrap intervals.

This measures what is served: the ONNX files of a models folder, run with
onnxruntime on the CPU, inputs from :func:`service.contract.preprocessing.preprocess_batch`
and the MC quantiles read exactly as the service reads them
(:func:`service.contract.uncertainty.summarise_mc_samples` at the MC card's
recalibrated mixture levels). It is the one evaluation of the sealed test set
of issue 14 (``docs/evaluation.md``) and of the second generator's set.

Every metric comes with a seeded percentile-bootstrap 95% interval over
resampled cutouts (:func:`training.metrics.bootstrap`); a target counts as
met only when the interval's bound is on the right side of it. The report
also records the set's simulation seed and a SHA-256 of its bytes, which
:func:`add_report_to_cards` writes into the cards with the metrics.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from service.contract.cards import (
    CLASSIFIER_NAME,
    MC_NAME,
    REGRESSOR_NAME,
    ModelCard,
    dump_model_card,
    read_model_cards,
)
from service.contract.preprocessing import preprocess_batch
from service.contract.uncertainty import (
    QUANTILE_LEVELS,
    calibrate_by_regime,
    summarise_mc_samples,
)
from training import metrics as m
from training.dataset import CONFIG_FILE, LABEL_FILE
from training.mc_passes import McRunner, cpu_session

REPORT_JSON = "report.json"
REPORT_MARKDOWN = "report.md"
#: Roles a set can have; only the sealed test set is judged against issue 14's targets.
ROLES = ("sealed_test", "second_generator")
#: False-positive rates whose score thresholds are taken from the set's negatives.
FPR_LEVELS: tuple[float, ...] = (0.01, 0.001)
#: Lens prevalences (lenses per cutout searched) for the purity of the candidates.
PREVALENCES: dict[str, float] = {"1:1000": 1e-3, "1:10000": 1e-4}
THETA_E_BIN_WIDTH_ARCSEC = 0.4
#: Served central intervals: name -> (lower, upper) positions in QUANTILE_LEVELS.
INTERVALS: dict[str, tuple[int, int]] = {"68": (1, 3), "95": (0, 4)}
_ESTIMATORS = (REGRESSOR_NAME, MC_NAME)
_BATCH = 256

# Issue 14's acceptance points, judged on the sealed set.
_AUROC_MIN = 0.995
_TPR_MIN = {0.01: 0.90, 0.001: 0.70}
_KIND_FPR_MAX = 0.015
_POINT_SOURCE_FPR_MAX = {"star": 0.01, "quasar": 0.01}
_RMSE_MAX_ARCSEC = {"lens": 0.13, "lensed_quasar": 0.10}
_BIN_BIAS_MAX_ARCSEC = 0.03
_COVERAGE_RANGE = {"68": (0.64, 0.72), "95": (0.92, 0.975)}
#: Negative groups reported beside the kinds that are not kinds themselves (no target).
_POOLED_GROUPS = ("blends", "with_artefacts")
_MISSING: dict[str, float | None] = {"value": None, "low": None, "high": None}
#: Composition the sealed set must have (issue 14): kind (or group) -> least count.
SEALED_COMPOSITION: dict[str, int] = {
    "all": 20_000,
    "lens": 5_000,
    "lensed_quasar": 1_000,
    "star": 2_000,
    "quasar": 1_000,
    "blends": 2_000,
    "with_artefacts": 1_000,
}


@dataclass(frozen=True)
class Labels:
    """The label columns the report reads, one entry per cutout."""

    is_lens: NDArray[np.bool_]
    kind: NDArray[np.str_]
    theta_e_arcsec: NDArray[np.float64]
    arc_snr: NDArray[np.float64] | None
    has_artefacts: NDArray[np.bool_]


@dataclass(frozen=True)
class Predictions:
    """Model outputs for a set: every cutout's probability, the lenses' theta_E."""

    lens_probability: NDArray[np.float64]
    """Shape (n,)."""
    regressor_theta_e_arcsec: NDArray[np.float64]
    """Point theta_E of each lens, shape (n_lenses,), lenses in set order."""
    mc_quantiles_arcsec: NDArray[np.float64]
    """Served quantiles at QUANTILE_LEVELS, shape (n_lenses, 5)."""
    mc_mean_arcsec: NDArray[np.float64]
    """Predictive mean of each lens, shape (n_lenses,)."""


def _no_artefact(value: str) -> bool:
    return value.strip().lower() in {"", "none", "nan", "0", "0.0", "[]", "false"}


def read_labels(data_dir: Path) -> Labels:
    """The label table of a set written by ``python -m training simulate`` or
    ``second-generator``: ``is_lens``, ``kind``, ``theta_E`` and, when present,
    ``arc_snr`` and ``artefacts`` (empty, ``none`` or 0 for a clean cutout)."""
    with (data_dir / LABEL_FILE).open() as handle:
        rows = list(csv.DictReader(handle))
    columns = rows[0].keys() if rows else ()
    return Labels(
        is_lens=np.array([float(r["is_lens"]) == 1 for r in rows]),
        kind=np.array([r["kind"] for r in rows]),
        theta_e_arcsec=np.array([float(r["theta_E"]) for r in rows]),
        arc_snr=np.array([float(r["arc_snr"]) for r in rows]) if "arc_snr" in columns else None,
        has_artefacts=np.array(
            [not _no_artefact(r.get("artefacts", "")) for r in rows], dtype=bool
        ),
    )


def _shards(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("shard_*.npz"))


def dataset_fingerprint(data_dir: Path) -> dict[str, Any]:
    """Seed and content hash of a simulated set.

    The SHA-256 runs over the bytes of the shards in name order
    (``shard_0000.npz``, ...) followed by ``labels.csv``; the seed is the one
    its ``simulation.json`` records.
    """
    digest = hashlib.sha256()
    files = [*_shards(data_dir), data_dir / LABEL_FILE]
    for path in files:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    config_path = data_dir / CONFIG_FILE
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    return {
        "seed": config.get("seed"),
        "generator": config.get("generator", "training.simulate"),
        "sha256": digest.hexdigest(),
        "hashed_files": [path.name for path in files],
    }


def predict_set(
    models_dir: Path,
    data_dir: Path,
    labels: Labels,
    *,
    num_samples: int,
    seed: int,
    threads: int | None = None,
) -> Predictions:
    """Run the exported models on every shard of ``data_dir``, one shard in memory at a time.

    The classifier sees every cutout; the MC graph (or, when its card lacks the
    point ``parameters`` output, the regressor too) sees the lenses only.

    Parameters
    ----------
    models_dir : Path
        Folder of the three ONNX models and their cards (checked as the service checks them).
    data_dir : Path
        A set of ``shard_*.npz`` files (``images`` of shape (n, 3, 64, 64), AB zero
        point 30 fluxes) with its ``labels.csv``.
    labels : Labels
        The set's labels (:func:`read_labels`).
    num_samples : int
        MC-dropout passes per lens (samples), as the service's ``num_samples``.
    seed : int
        Seed of onnxruntime's dropout generator, so the report is reproducible.
    threads : int or None
        onnxruntime intra-op threads; None: every core.
    """
    models = read_model_cards(models_dir)
    classifier = cpu_session(models.onnx_bytes[CLASSIFIER_NAME], threads)
    ort.set_seed(seed)
    runner = McRunner(models, num_samples=num_samples, threads=threads)

    probabilities, point, quantiles, means = [], [], [], []
    start = 0
    for shard in _shards(data_dir):
        with np.load(shard) as archive:
            cubes = archive["images"]
        stop = start + len(cubes)
        shard_lenses = labels.is_lens[start:stop]
        for first in range(0, len(cubes), _BATCH):
            images = preprocess_batch(cubes[first : first + _BATCH])
            (p,) = classifier.run(["lens_probability"], {"image": images})
            probabilities.append(np.asarray(p, dtype=np.float64).reshape(-1))
            lens_images = images[shard_lenses[first : first + _BATCH]]
            if not len(lens_images):
                continue
            passes = runner.run(lens_images)
            # As the service answers (service.core.inference._summarise, less the widening
            # of the <= 1% of cutouts flagged out of distribution): the card's per-regime
            # table when it has one, else the mixture read at its recalibrated levels.
            table = models.mc_regime_table
            levels = None if table is not None else models.mc_mixture_levels
            summary = summarise_mc_samples(passes.means, passes.log_variances, levels)
            if table is not None:
                summary = calibrate_by_regime(
                    summary,
                    table,
                    theta_E_arcsec=passes.point_theta_E,
                    signal_to_noise=passes.signal_to_noise,
                    num_samples=int(num_samples),
                )
            point.append(passes.point_theta_E)
            quantiles.append(summary.quantiles)
            means.append(summary.mean)
        start = stop
    if start != len(labels.is_lens):
        raise ValueError(f"{data_dir}: {start} images but {len(labels.is_lens)} label rows")
    empty = np.zeros(0)
    return Predictions(
        lens_probability=np.concatenate(probabilities),
        regressor_theta_e_arcsec=np.concatenate(point) if point else empty,
        mc_quantiles_arcsec=(
            np.concatenate(quantiles) if quantiles else np.zeros((0, len(QUANTILE_LEVELS)))
        ),
        mc_mean_arcsec=np.concatenate(means) if means else empty,
    )


def _intervals(
    statistic: Callable[[NDArray], dict[str, NDArray]],
    n_items: int,
    *,
    n_resamples: int,
    seed: np.random.SeedSequence,
) -> dict[str, Any]:
    """Bootstrap every named statistic on the same resamples, as a nested dict of intervals.

    ``statistic`` maps (B, n_items) resample counts to named (B,) arrays; a name
    ``a/b/c`` becomes ``result["a"]["b"]["c"]``.
    """
    if n_items == 0:
        return {}
    names = list(statistic(np.ones((1, n_items))))
    found = m.bootstrap(
        lambda counts: np.stack(list(statistic(counts).values()), axis=1),
        n_items,
        n_resamples=n_resamples,
        seed=seed,
    )
    nested: dict[str, Any] = {}
    for name, interval in zip(names, found, strict=True):
        node = nested
        *path, leaf = name.split("/")
        for part in path:
            node = node.setdefault(part, {})
        # Undefined statistics (no resample had the group) are null, not NaN, in JSON.
        node[leaf] = {k: v if math.isfinite(v) else None for k, v in interval.to_dict().items()}
    return nested


def _negative_groups(labels: Labels) -> dict[str, NDArray[np.bool_]]:
    """Every negative kind, all blends together, and negatives with artefacts."""
    negative = ~labels.is_lens
    groups = {str(k): negative & (labels.kind == k) for k in np.unique(labels.kind[negative])}
    blends = negative & (np.char.find(labels.kind.astype(str), "blend") >= 0)
    # All blends together, unless they are a single kind already listed.
    if blends.any() and not any(np.array_equal(blends, mask) for mask in groups.values()):
        groups["blends"] = blends
    if (negative & labels.has_artefacts).any():
        groups["with_artefacts"] = negative & labels.has_artefacts
    return groups


def classification_section(
    labels: Labels, probability: NDArray, *, n_resamples: int, seed: np.random.SeedSequence
) -> dict[str, Any]:
    """AUROC, and at each FPR level: TPR, FPR of each negative group, TPR of each positive
    kind and purity at each prevalence, thresholds taken from each resample's negatives."""
    truth = labels.is_lens.astype(float)
    groups = _negative_groups(labels)
    positive_kinds = {str(k): labels.kind == k for k in np.unique(labels.kind[labels.is_lens])}
    masks = {"fpr_by_kind": groups, "tpr_by_kind": positive_kinds}

    def statistic(counts: NDArray) -> dict[str, NDArray]:
        values = {"auroc": m.weighted_auroc(counts, truth, probability)}
        for level in FPR_LEVELS:
            prefix = f"fpr_{level:g}"
            tpr, fpr, threshold = m.weighted_operating_point(counts, truth, probability, level)
            values[f"{prefix}/tpr"], values[f"{prefix}/fpr"] = tpr, fpr
            for rate, members in masks.items():
                for name, mask in members.items():
                    values[f"{prefix}/{rate}/{name}"] = m.weighted_rate_above(
                        counts, mask, probability, threshold
                    )
            for name, prevalence in PREVALENCES.items():
                values[f"{prefix}/purity/{name}"] = m.purity(tpr, fpr, prevalence)
        return values

    section = _intervals(statistic, len(truth), n_resamples=n_resamples, seed=seed)
    everything = np.ones((1, len(truth)))
    for level in FPR_LEVELS:
        threshold = m.weighted_operating_point(everything, truth, probability, level)[2][0]
        # +inf: no threshold keeps the FPR at the level (a tiny set); null in JSON.
        section[f"fpr_{level:g}"]["threshold"] = (
            float(threshold) if np.isfinite(threshold) else None
        )
    section["counts"] = {
        "lenses": int(labels.is_lens.sum()),
        "non_lenses": int((~labels.is_lens).sum()),
        **{f"negatives/{k}": int(v.sum()) for k, v in groups.items()},
        **{f"positives/{k}": int(v.sum()) for k, v in positive_kinds.items()},
    }
    return section


def _bin_names(theta_e: NDArray) -> NDArray[np.str_]:
    index = np.floor(theta_e / THETA_E_BIN_WIDTH_ARCSEC + 1e-9).astype(int)
    width = THETA_E_BIN_WIDTH_ARCSEC
    return np.array([f"{k * width:.1f}-{(k + 1) * width:.1f}" for k in index])


def _tercile_names(snr: NDArray) -> NDArray[np.str_]:
    low, high = np.quantile(snr, [1 / 3, 2 / 3])
    return np.where(
        snr < low,
        f"<{low:.0f}",
        np.where(snr < high, f"{low:.0f}-{high:.0f}", f">={high:.0f}"),
    )


def regression_section(
    theta_e: NDArray,
    estimates: dict[str, NDArray],
    quantiles: NDArray,
    arc_snr: NDArray | None,
    *,
    n_resamples: int,
    seed: np.random.SeedSequence,
) -> dict[str, Any]:
    """theta_E errors of each estimator overall and per 0.4-arcsec bin; served interval
    coverage overall, per bin and per arc-SNR tercile (all arcsec, fractions)."""
    bins = _bin_names(theta_e)
    bin_masks = {name: bins == name for name in sorted(set(bins), key=lambda b: float(b[:3]))}
    covered = {
        name: ((theta_e >= quantiles[:, lo]) & (theta_e <= quantiles[:, hi])).astype(float)
        for name, (lo, hi) in INTERVALS.items()
    }
    groups: dict[str, dict[str, NDArray]] = {"theta_E_bins": bin_masks}
    if arc_snr is not None and np.isfinite(arc_snr).all():
        terciles = _tercile_names(arc_snr)
        groups["arc_snr_terciles"] = {name: terciles == name for name in dict.fromkeys(terciles)}
        order = {
            name: float(np.median(arc_snr[mask]))
            for name, mask in groups["arc_snr_terciles"].items()
        }
        groups["arc_snr_terciles"] = dict(
            sorted(groups["arc_snr_terciles"].items(), key=lambda item: order[item[0]])
        )

    def statistic(counts: NDArray) -> dict[str, NDArray]:
        values = {}
        for model, estimate in estimates.items():
            error = estimate - theta_e
            values[f"{model}/rmse_arcsec"] = np.sqrt(m.weighted_mean(counts, error**2))
            values[f"{model}/bias_arcsec"] = m.weighted_mean(counts, error)
            values[f"{model}/mae_arcsec"] = m.weighted_mean(counts, np.abs(error))
            for name, mask in bin_masks.items():
                values[f"{model}/theta_E_bins/{name}/mean_error_arcsec"] = m.weighted_mean(
                    counts[:, mask], error[mask]
                )
        for level, hits in covered.items():
            values[f"coverage/all/{level}"] = m.weighted_mean(counts, hits)
            for group, masks in groups.items():
                for name, mask in masks.items():
                    values[f"coverage/{group}/{name}/{level}"] = m.weighted_mean(
                        counts[:, mask], hits[mask]
                    )
        return values

    section = {
        "n": int(len(theta_e)),
        **_intervals(statistic, len(theta_e), n_resamples=n_resamples, seed=seed),
    }
    for model in estimates:
        for name, mask in bin_masks.items():
            section[model]["theta_E_bins"][name]["n"] = int(mask.sum())
    for group, masks in groups.items():
        for name, mask in masks.items():
            section["coverage"][group][name]["n"] = int(mask.sum())
    return section


def _target(
    name: str,
    model: str,
    statistic: dict,
    *,
    at_least: float | None = None,
    at_most: float | None = None,
) -> dict[str, Any]:
    """One acceptance point, met only when the whole 95% interval satisfies it."""
    low, high = statistic["low"], statistic["high"]
    met = low is not None and high is not None
    if met and at_least is not None:
        met = low >= at_least
    if met and at_most is not None:
        met = high <= at_most
    bound = {"at_least": at_least, "at_most": at_most}
    return {
        "name": name,
        "model": model,
        **{k: v for k, v in bound.items() if v is not None},
        **statistic,
        "met": bool(met),
    }


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 14's acceptance points, judged on the 95% intervals of ``report``."""
    cls = report["classification"]
    targets = [
        _target("AUROC against all negatives", CLASSIFIER_NAME, cls["auroc"], at_least=_AUROC_MIN)
    ]
    for level, minimum in _TPR_MIN.items():
        targets.append(
            _target(
                f"TPR at FPR {level:g}",
                CLASSIFIER_NAME,
                cls[f"fpr_{level:g}"]["tpr"],
                at_least=minimum,
            )
        )
    rates = {
        kind: rate
        for kind, rate in cls["fpr_0.01"].get("fpr_by_kind", {}).items()
        if kind not in _POOLED_GROUPS
    }
    # An acceptance point whose population is missing from the set is listed, unmet.
    rates.update({kind: _MISSING for kind in _POINT_SOURCE_FPR_MAX if kind not in rates})
    for kind, rate in rates.items():
        limit = _POINT_SOURCE_FPR_MAX.get(kind, _KIND_FPR_MAX)
        targets.append(
            _target(
                f"FPR of {kind} at the FPR-0.01 threshold", CLASSIFIER_NAME, rate, at_most=limit
            )
        )
    for kind in _RMSE_MAX_ARCSEC:
        if kind not in report["regression"]:
            limit = _RMSE_MAX_ARCSEC[kind]
            name = f"theta_E RMSE (arcsec), {kind}"
            targets += [_target(name, model, _MISSING, at_most=limit) for model in _ESTIMATORS]
    for kind, section in report["regression"].items():
        for model in _ESTIMATORS:
            if kind in _RMSE_MAX_ARCSEC:
                targets.append(
                    _target(
                        f"theta_E RMSE (arcsec), {kind}",
                        model,
                        section[model]["rmse_arcsec"],
                        at_most=_RMSE_MAX_ARCSEC[kind],
                    )
                )
            if kind == "all":
                continue
            for name, bin_stats in section[model]["theta_E_bins"].items():
                targets.append(
                    _target(
                        f"mean theta_E error (arcsec), {kind}, theta_E {name}",
                        model,
                        bin_stats["mean_error_arcsec"],
                        at_least=-_BIN_BIAS_MAX_ARCSEC,
                        at_most=_BIN_BIAS_MAX_ARCSEC,
                    )
                )
    coverage = report["regression"]["all"]["coverage"]["all"]
    for level, (low, high) in _COVERAGE_RANGE.items():
        targets.append(
            _target(
                f"served {level}% interval coverage, all lenses",
                MC_NAME,
                coverage[level],
                at_least=low,
                at_most=high,
            )
        )
    return targets


def composition(labels: Labels) -> list[dict[str, Any]]:
    """The sealed set's counts against issue 14's least counts per kind."""
    have = {
        "all": len(labels.kind),
        "blends": int(np.sum(np.char.find(labels.kind.astype(str), "blend") >= 0)),
        "with_artefacts": int(labels.has_artefacts.sum()),
    }
    rows = []
    for name, needed in SEALED_COMPOSITION.items():
        count = have.get(name, int(np.sum(labels.kind == name)))
        rows.append({"group": name, "needed": needed, "have": count, "met": count >= needed})
    return rows


def build_report(
    data_dir: Path,
    models_dir: Path,
    *,
    role: str = "sealed_test",
    num_samples: int = 100,
    n_resamples: int = 1000,
    seed: int = 14,
    threads: int | None = None,
) -> dict[str, Any]:
    """Evaluate the exported models of ``models_dir`` on the set in ``data_dir``.

    Parameters
    ----------
    data_dir : Path
        Simulated set (shards and ``labels.csv``).
    models_dir : Path
        The three ONNX models and cards.
    role : str
        ``sealed_test`` (judged against issue 14's targets) or ``second_generator``
        (reported, not judged).
    num_samples : int
        MC-dropout passes per lens (samples).
    n_resamples : int
        Bootstrap resamples (at least 1000).
    seed : int
        Seed of the dropout masks and of the bootstrap.
    threads : int or None
        onnxruntime threads; None: every core.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    started = time.perf_counter()
    labels = read_labels(data_dir)
    predictions = predict_set(
        models_dir, data_dir, labels, num_samples=num_samples, seed=seed, threads=threads
    )
    inference_s = time.perf_counter() - started
    cards = read_model_cards(models_dir).cards
    seeds = np.random.SeedSequence(seed).spawn(2)
    report: dict[str, Any] = {
        "role": role,
        "set": {
            "data_dir": data_dir.name,
            **dataset_fingerprint(data_dir),
            "n_cutouts": int(len(labels.kind)),
            "counts_by_kind": {
                str(k): int(n)
                for k, n in zip(*np.unique(labels.kind, return_counts=True), strict=True)
            },
            "n_with_artefacts": int(labels.has_artefacts.sum()),
        },
        "models": {
            name: {"version": card.version, "onnx_sha256": card.onnx_sha256}
            for name, card in cards.items()
        },
        "evaluation": {
            "runtime": f"onnxruntime {ort.__version__}, CPUExecutionProvider",
            "num_samples": num_samples,
            "mc_mixture_levels": list(read_model_cards(models_dir).mc_mixture_levels),
            "bootstrap": {
                "n_resamples": n_resamples,
                "seed": seed,
                "level": 0.95,
                "method": "percentile, cutouts resampled with replacement",
            },
        },
        "classification": classification_section(
            labels, predictions.lens_probability, n_resamples=n_resamples, seed=seeds[0]
        ),
    }
    lens_rows = np.flatnonzero(labels.is_lens)
    lens_kind = labels.kind[lens_rows]
    populations = {"all": np.ones(len(lens_rows), dtype=bool)}
    populations.update({str(k): lens_kind == k for k in np.unique(lens_kind)})
    regression_seeds = seeds[1].spawn(len(populations))
    report["regression"] = {}
    for (name, mask), population_seed in zip(populations.items(), regression_seeds, strict=True):
        if not mask.any():
            continue
        report["regression"][name] = regression_section(
            labels.theta_e_arcsec[lens_rows][mask],
            {
                REGRESSOR_NAME: predictions.regressor_theta_e_arcsec[mask],
                MC_NAME: predictions.mc_mean_arcsec[mask],
            },
            predictions.mc_quantiles_arcsec[mask],
            None if labels.arc_snr is None else labels.arc_snr[lens_rows][mask],
            n_resamples=n_resamples,
            seed=population_seed,
        )
    if role == "sealed_test":
        report["set"]["composition"] = composition(labels)
        report["targets"] = evaluate_targets(report)
    else:
        report["targets"] = []
    report["evaluation"]["inference_s"] = round(inference_s, 1)
    report["evaluation"]["total_s"] = round(time.perf_counter() - started, 1)
    return report


def _fmt(interval: dict[str, float | None], digits: int = 4) -> tuple[str, str]:
    if interval["value"] is None or interval["low"] is None or interval["high"] is None:
        return ("n/a", "n/a")
    return (
        f"{interval['value']:.{digits}f}",
        f"[{interval['low']:.{digits}f}, {interval['high']:.{digits}f}]",
    )


def _threshold_text(threshold: float | None) -> str:
    return "none (no threshold reaches the FPR)" if threshold is None else f"{threshold:.4f}"


def report_markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables (value, bootstrap 95% interval, target, met)."""
    data = report["set"]
    cls = report["classification"]
    lines = [
        f"# Evaluation of the exported models on `{data['data_dir']}` ({report['role']})",
        "",
        f"{data['n_cutouts']} cutouts from {data['generator']}, seed {data['seed']}, "
        f"sha256 `{data['sha256']}`; models "
        + ", ".join(f"{k} {v['version']}" for k, v in report["models"].items())
        + f"; {report['evaluation']['num_samples']} MC samples; intervals: bootstrap 95% "
        f"({report['evaluation']['bootstrap']['n_resamples']} resamples of the cutouts).",
        "",
        "| metric | value | 95% interval |",
        "|---|---|---|",
        "| AUROC (all negatives) | {} | {} |".format(*_fmt(cls["auroc"])),
    ]
    for level in FPR_LEVELS:
        point = cls[f"fpr_{level:g}"]
        lines.append(f"| TPR at FPR {level:g} | {' | '.join(_fmt(point['tpr']))} |")
        for name, purity in point["purity"].items():
            lines.append(
                f"| purity at prevalence {name}, FPR-{level:g} threshold | "
                f"{' | '.join(_fmt(purity))} |"
            )
    for kind, section in report["regression"].items():
        for model in _ESTIMATORS:
            for stat in ("rmse_arcsec", "bias_arcsec", "mae_arcsec"):
                lines.append(
                    f"| theta_E {stat.removesuffix('_arcsec')} (arcsec), {kind}, {model} | "
                    f"{' | '.join(_fmt(section[model][stat]))} |"
                )
        for level in INTERVALS:
            lines.append(
                f"| served {level}% coverage, {kind} | "
                f"{' | '.join(_fmt(section['coverage']['all'][level]))} |"
            )
    point = cls["fpr_0.01"]
    lines += [
        "",
        f"Rates at the FPR-0.01 threshold (P(lens) >= {_threshold_text(point['threshold'])}):",
        "",
        "| group | n | rate | 95% interval |",
        "|---|---|---|---|",
    ]
    counts = cls["counts"]
    for rate, side in (("fpr_by_kind", "negatives"), ("tpr_by_kind", "positives")):
        for name, interval in point.get(rate, {}).items():
            label = "FPR" if side == "negatives" else "TPR"
            lines.append(
                f"| {label} {name} | {counts[f'{side}/{name}']} | {' | '.join(_fmt(interval))} |"
            )
    for kind, section in report["regression"].items():
        if kind == "all" and len(report["regression"]) == 2:
            continue  # one kind of lens: its table is the same
        lines += [
            "",
            f"theta_E per bin, {kind} (mean error in arcsec; served coverage):",
            "",
            "| theta_E bin (arcsec) | n | mean error, einstein_radius | mean error, "
            "einstein_radius_mc | 68% coverage | 95% coverage |",
            "|---|---|---|---|---|---|",
        ]
        for name, stats in section[REGRESSOR_NAME]["theta_E_bins"].items():
            mc = section[MC_NAME]["theta_E_bins"][name]
            cover = section["coverage"]["theta_E_bins"][name]
            cells = [
                " ".join(_fmt(stats["mean_error_arcsec"], 3)),
                " ".join(_fmt(mc["mean_error_arcsec"], 3)),
                " ".join(_fmt(cover["68"], 3)),
                " ".join(_fmt(cover["95"], 3)),
            ]
            lines.append(f"| {name} | {stats['n']} | {' | '.join(cells)} |")
        for name, cover in section["coverage"].get("arc_snr_terciles", {}).items():
            lines.append(
                f"| arc SNR {name} | {cover['n']} | | | {' '.join(_fmt(cover['68'], 3))} | "
                f"{' '.join(_fmt(cover['95'], 3))} |"
            )
    if report["targets"]:
        met = sum(t["met"] for t in report["targets"])
        lines += [
            "",
            f"Targets of issue 14 ({met} of {len(report['targets'])} met; met only when the "
            "95% interval's bound is on the right side):",
            "",
            "| target | model | bound | value | 95% interval | met |",
            "|---|---|---|---|---|---|",
        ]
        for t in report["targets"]:
            bound = " and ".join(
                f"{'>=' if key == 'at_least' else '<='} {t[key]:g}"
                for key in ("at_least", "at_most")
                if key in t
            )
            lines.append(
                f"| {t['name']} | {t['model']} | {bound} | {' | '.join(_fmt(t))} | "
                f"{'yes' if t['met'] else 'no'} |"
            )
    if "composition" in data:
        lines += ["", "| group | needed | have | met |", "|---|---|---|---|"]
        for row in data["composition"]:
            lines.append(
                f"| {row['group']} | {row['needed']} | {row['have']} | "
                f"{'yes' if row['met'] else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out_dir / REPORT_JSON, out_dir / REPORT_MARKDOWN
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    markdown_path.write_text(report_markdown(report))
    return json_path, markdown_path


def card_metrics(report: dict[str, Any], model: str) -> dict[str, Any]:
    """The part of ``report`` that concerns ``model``, with the set's seed and hash."""
    entry: dict[str, Any] = {
        "set": {
            key: report["set"][key]
            for key in ("generator", "seed", "sha256", "n_cutouts", "counts_by_kind")
        },
        "evaluation": {
            key: report["evaluation"][key] for key in ("num_samples", "bootstrap", "runtime")
        },
    }
    if model == CLASSIFIER_NAME:
        entry["classification"] = report["classification"]
    else:
        entry["regression"] = {
            kind: {
                "n": section["n"],
                **({model: section[model]} if model in section else {}),
                **({"coverage": section["coverage"]} if model == MC_NAME else {}),
            }
            for kind, section in report["regression"].items()
        }
    targets = [t for t in report["targets"] if t["model"] == model]
    if report["role"] == "sealed_test":
        entry["targets"] = targets
        entry["all_targets_met"] = all(t["met"] for t in targets)
    return entry


def add_report_to_cards(report: dict[str, Any], models_dir: Path) -> list[Path]:
    """Put ``card_metrics`` under ``metrics[report["role"]]`` in each of the three cards.

    The cards stay valid :class:`~service.contract.cards.ModelCard` documents (``metrics``
    is an open mapping) and keep their ONNX hashes; the cards' models must be the
    ones the report evaluated.
    """
    written = []
    for name, evaluated in report["models"].items():
        path = models_dir / f"{name}.json"
        card = json.loads(path.read_text())
        if card["onnx_sha256"] != evaluated["onnx_sha256"]:
            raise ValueError(
                f"{path} vouches for ONNX {card['onnx_sha256']}, the report evaluated "
                f"{evaluated['onnx_sha256']}"
            )
        card.setdefault("metrics", {})[report["role"]] = card_metrics(report, name)
        path.write_text(dump_model_card(ModelCard.model_validate(card)))
        written.append(path)
    return written
