"""Command line for the offline pipeline: simulate, train, evaluate, export; the samples."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

from service.contract.cards import CLASSIFIER_NAME, MC_NAME, REGRESSOR_NAME
from training.config import (
    FLAGGED_FRACTION,
    PRESETS,
    SAMPLES_SEED,
    SEEING_OFFSET,
    TAIL_QUANTILE,
    SimulationConfig,
)
from training.symmetry import ROTATIONS

_MODEL_NAMES = (CLASSIFIER_NAME, REGRESSOR_NAME, MC_NAME)


def simulation_config(args: argparse.Namespace) -> SimulationConfig:
    """The simulator's settings that ``simulate``'s options ask for."""
    config = replace(SimulationConfig(), seed=args.seed, n_cutouts=args.n)
    if args.negative_kinds:
        known = [kind for kind, _ in config.negative_kinds]
        config = replace(config, negative_kinds=parse_kind_weights(args.negative_kinds, known))
    if args.lens_kinds:
        known = [kind for kind, _ in config.lens_kinds]
        config = replace(config, lens_kinds=parse_kind_weights(args.lens_kinds, known))
    if args.seeing_factor_range is not None:
        config = replace(config, seeing_factor_range=tuple(args.seeing_factor_range))
    if args.seeing_log_sigma is not None:
        config = replace(config, seeing_log_sigma=args.seeing_log_sigma)
    if args.lens_fraction is not None:
        config = replace(config, lens_fraction=args.lens_fraction)
    if args.theta_e_range is not None:
        config = replace(config, theta_E_arcsec=tuple(args.theta_e_range))
    if args.unresolved_lenses:
        config = replace(config, require_resolved=False)
    if args.ring_radius_range is not None:
        low, high = args.ring_radius_range
        if not 0.0 < low < high:
            raise SystemExit("--ring-radius-range needs 0 < LOW < HIGH (arcsec)")
        config = replace(config, ring_radius_arcsec=(low, high))
    if args.artefact_probability is not None:
        if not 0.0 <= args.artefact_probability <= 1.0:
            raise SystemExit("--artefact-probability must lie in [0, 1]")
        config = replace(config, artefact_probability=args.artefact_probability)
    return config


def _simulate(args: argparse.Namespace) -> None:
    from training.dataset import simulate_dataset

    config = simulation_config(args)
    started = time.perf_counter()
    simulate_dataset(config, Path(args.out), workers=args.workers)
    print(f"simulated {args.n} cutouts into {args.out} in {time.perf_counter() - started:.0f} s")


def _samples(args: argparse.Namespace) -> None:
    from training.samples import write_samples

    written = write_samples(Path(args.out), seed=args.seed)
    size_kb = sum(path.stat().st_size for path in written) / 1024
    print(f"wrote {len(written)} files ({size_kb:.0f} KiB) into {args.out}")


def parse_kind_weights(text: str, known: list[str]) -> tuple[tuple[str, float], ...]:
    """``'star=0.2,quasar=0.1'`` -> ``(("star", 0.2), ("quasar", 0.1))`` (relative weights)."""
    pairs = []
    for item in text.split(","):
        kind, sep, weight = item.partition("=")
        kind = kind.strip()
        if not sep or kind not in known:
            raise SystemExit(
                f"expected kind=weight with a kind among {', '.join(known)}; got {item!r}"
            )
        pairs.append((kind, float(weight)))
    return tuple(pairs)


def _train(args: argparse.Namespace) -> None:
    from training.train import train_all

    model_config, config = PRESETS[args.preset]
    train_all(
        Path(args.data),
        Path(args.runs),
        quick=args.quick,
        model_config=model_config,
        config=config,
    )


def _finetune(args: argparse.Namespace) -> None:
    from training.finetune import finetune_run

    finetune_run(
        Path(args.runs),
        Path(args.data),
        Path(args.out),
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        preset=args.preset,
        ema_momentum=args.ema_momentum,
        classifier_epochs=args.classifier_epochs,
        classifier_learning_rate=args.classifier_learning_rate,
    )


def _recalibrate(args: argparse.Namespace) -> None:
    from training.calibrate import recalibrate_mc_model

    scale = recalibrate_mc_model(Path(args.runs), [Path(d) for d in args.data])
    print(f"aleatoric calibration factor: {scale:.4f}")


def _calibrate_regimes(args: argparse.Namespace) -> None:
    from training.regimes import calibrate_regimes

    provenance = calibrate_regimes(
        Path(args.models), [Path(d) for d in args.data], num_samples=tuple(args.num_samples)
    )
    print(f"regime table written into {args.models}: lenses per regime {provenance['n_lenses']}")
    for note in provenance["notes"]:
        print(f"  {note}")


def _check_regimes(args: argparse.Namespace) -> None:
    import json

    from training.regimes import check_regimes, format_report, within_targets

    report = check_regimes(
        Path(args.models), [Path(d) for d in args.data], num_samples=tuple(args.num_samples)
    )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name in ("mixture", "calibrated"):
        if name in report:
            print(f"\n{name}: coverage (bootstrap 95% interval); bins {report[name]['bins']}")
            for note in report[name]["notes"]:
                print(f"  {note}")
            print(format_report(report[name]))
    misses = within_targets(report.get("calibrated", report["mixture"]))
    print("\nall within 0.64-0.72 (68%) and 0.92-0.975 (95%)" if not misses else "\n".join(misses))


def _evaluate(args: argparse.Namespace) -> None:
    from training.evaluate import evaluate_all

    evaluate_all(Path(args.data), Path(args.runs))


def _report(args: argparse.Namespace) -> None:
    from training.report import add_report_to_cards, build_report, write_report

    report = build_report(
        Path(args.data),
        Path(args.models),
        role=args.role,
        num_samples=args.num_samples,
        n_resamples=args.resamples,
        seed=args.seed,
    )
    json_path, markdown_path = write_report(report, Path(args.out))
    met = sum(t["met"] for t in report["targets"])
    print(
        f"evaluated {report['set']['n_cutouts']} cutouts in {report['evaluation']['total_s']} s;"
        f" {met} of {len(report['targets'])} targets met; wrote {json_path}, {markdown_path}"
    )
    if args.write_cards:
        for path in add_report_to_cards(report, Path(args.models)):
            print(f"added metrics[{report['role']!r}] to {path}")


def _second_generator(args: argparse.Namespace) -> None:
    from training.second_generator import generate

    started = time.perf_counter()
    generate(Path(args.out), n_cutouts=args.n, seed=args.seed, workers=args.workers)
    print(f"generated {args.n} cutouts into {args.out} in {time.perf_counter() - started:.0f} s")


def _export(args: argparse.Namespace) -> None:
    from training.export import export_all
    from training.seeing import graft_into_classifier, grafted_estimator

    models = Path(args.models)
    # A new classifier keeps the seeing estimator the old one had (read before the card goes).
    kept_seeing = grafted_estimator(models) if CLASSIFIER_NAME in args.only else None
    export_all(
        Path(args.runs),
        models,
        data_dirs=[Path(d) for d in args.data],
        names=tuple(args.only),
        version=args.version,
    )
    if kept_seeing is not None:
        card = graft_into_classifier(models, *kept_seeing, save_keras=False)
        print(f"grafted the classifier's seeing estimator into the new one; updated {card}")


def _reexport_theta_e(args: argparse.Namespace) -> None:
    from training.export import reexport_theta_e_models

    cards = reexport_theta_e_models(Path(args.models), views=args.views, version=args.version)
    print(f"re-exported with {args.views} views: {', '.join(str(c) for c in cards)}")
    print("refit the MC model's intervals before serving: python -m training calibrate-regimes")


def _ood(args: argparse.Namespace) -> None:
    from training.ood import fit_ood

    if args.reexport_classifier:
        from training.export import reexport_classifier

        card = reexport_classifier(Path(args.models))
        print(f"re-exported the classifier with its features output; updated {card}")
    entry = fit_ood(
        Path(args.models),
        [Path(d) for d in args.fit_data],
        [Path(d) for d in args.threshold_data],
        flagged_fraction=args.flagged_fraction,
        tail_quantile=args.seeing_tail_quantile,
        seeing_offset=args.seeing_offset,
    )
    print(
        f"threshold {entry['threshold']:.4f} flags {entry['flagged_fraction']:.2%} of the "
        f"threshold data; wrote {Path(args.models) / entry['statistics_file']}"
    )


def _seeing(args: argparse.Namespace) -> None:
    from training.seeing import graft_into_classifier, train_seeing_estimator

    model, record = train_seeing_estimator(
        [Path(d) for d in args.data],
        Path(args.val) if args.val else None,
        epochs=args.epochs,
        seed=args.seed,
    )
    card = graft_into_classifier(Path(args.models), model, record)
    rmse = ", ".join(f"{b} {v:.4f}" for b, v in record["validation_rmse_log10"].items())
    print(f"seeing estimator: validation RMSE (log10 FWHM) {rmse}; updated {card}")


def _ood_sets(args: argparse.Namespace) -> None:
    from training.ood_sets import OOD_KINDS, write_ood_sets

    kinds = tuple(args.kinds) if args.kinds else OOD_KINDS
    written = write_ood_sets(Path(args.data), Path(args.out), n=args.n, seed=args.seed, kinds=kinds)
    print(f"wrote {len(written)} out-of-distribution sets into {args.out}")


def _ood_evaluate(args: argparse.Namespace) -> None:
    import json

    from training.ood import evaluate_ood, format_table

    ood_root = Path(args.ood)
    ood_dirs = sorted(d for d in ood_root.iterdir() if (d / "labels.csv").exists())
    result = evaluate_ood(Path(args.models), Path(args.data), ood_dirs, n_boot=args.n_boot)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))


def _add_range_option(parser: argparse.ArgumentParser, flag: str, help_text: str) -> None:
    """A ``flag LOW HIGH`` option of two floats, None when not given."""
    parser.add_argument(
        flag, type=float, nargs=2, metavar=("LOW", "HIGH"), default=None, help=help_text
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    simulate = commands.add_parser("simulate", help="simulate cutouts into NPZ shards")
    simulate.add_argument("--out", required=True, help="output directory")
    simulate.add_argument("--n", type=int, default=1000, help="number of cutouts")
    simulate.add_argument("--seed", type=int, default=SimulationConfig.seed)
    simulate.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    simulate.add_argument(
        "--negative-kinds",
        default=None,
        help="kind=weight,... replacing SimulationConfig.negative_kinds (e.g. a test set "
        "with more stars); default: the training mix",
    )
    simulate.add_argument(
        "--lens-kinds", default=None, help="kind=weight,... replacing SimulationConfig.lens_kinds"
    )
    simulate.add_argument(
        "--lens-fraction",
        type=float,
        default=None,
        help="share of lenses (default 0.5); 1 for a regressor's set",
    )
    _add_range_option(
        simulate,
        "--theta-e-range",
        "Einstein radius range of the lenses, arcsec (default 0.45 3.2); wider for "
        "training, so that the evaluated range's ends are not the prior's",
    )
    _add_range_option(
        simulate,
        "--seeing-factor-range",
        "range of the per-object factor on DES's median seeing (default 0.72 1.6); "
        "wide for the seeing estimator's data (training.seeing)",
    )
    simulate.add_argument(
        "--seeing-log-sigma",
        type=float,
        default=None,
        help="spread (natural log) of that factor before clipping (default 0.12)",
    )
    simulate.add_argument(
        "--unresolved-lenses",
        action="store_true",
        help="keep lenses whose arcs the seeing does not resolve (Collett's rule off): a "
        "regressor's training set whose prior reaches below the smallest evaluated lenses",
    )
    _add_range_option(
        simulate,
        "--ring-radius-range",
        "radius range of the ring negatives, arcsec (default 1.2 3.5); narrower for a "
        "training set aimed at the small rings that pass for lenses",
    )
    simulate.add_argument(
        "--artefact-probability",
        type=float,
        default=None,
        help="share of cutouts with artefacts (default 0.18, the evaluated mix); higher for "
        "a training set that teaches robustness to them",
    )
    simulate.set_defaults(handler=_simulate)

    samples = commands.add_parser(
        "samples", help="simulate the sample cutouts of examples/cutouts (FITS, truth.csv)"
    )
    samples.add_argument("--out", default="examples/cutouts", help="output directory")
    samples.add_argument("--seed", type=int, default=SAMPLES_SEED)
    samples.set_defaults(handler=_samples)

    train = commands.add_parser("train", help="train the three models")
    train.add_argument("--data", required=True, help="training data directory")
    train.add_argument("--runs", required=True, help="directory for trained Keras models")
    train.add_argument("--quick", action="store_true", help="one epoch each (tests)")
    train.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="model and training sizes (training/config.py PRESETS); gpu: JAX on one H100",
    )
    train.set_defaults(handler=_train)

    finetune = commands.add_parser(
        "finetune", help="resume a run's models on more data; rebuild its MC model"
    )
    finetune.add_argument(
        "--runs", required=True, help="run (or models/ folder) whose models to start from"
    )
    finetune.add_argument("--data", required=True, help="training data directory")
    finetune.add_argument("--out", required=True, help="directory for the new run")
    finetune.add_argument(
        "--epochs",
        type=int,
        default=8,
        help="regressor epochs (0: keep the regressor and the MC model, a classifier-only round)",
    )
    finetune.add_argument("--learning-rate", type=float, default=2e-4, help="peak (cosine)")
    finetune.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    finetune.add_argument(
        "--ema-momentum",
        type=float,
        default=None,
        help="keep the moving average of the weights over the steps (e.g. 0.998)",
    )
    finetune.add_argument(
        "--classifier-epochs",
        type=int,
        default=0,
        help="also resume the classifier for this many epochs (0: copy it unchanged)",
    )
    finetune.add_argument(
        "--classifier-learning-rate", type=float, default=3e-4, help="peak (cosine)"
    )
    finetune.set_defaults(handler=_finetune)

    recalibrate = commands.add_parser(
        "recalibrate", help="recalibrate the MC model's aleatoric scale on held-out lenses"
    )
    recalibrate.add_argument("--runs", required=True, help="run whose MC model to recalibrate")
    recalibrate.add_argument(
        "--data", required=True, nargs="+", help="simulated sets no model was trained on"
    )
    recalibrate.set_defaults(handler=_recalibrate)

    regimes = commands.add_parser(
        "calibrate-regimes",
        help="fit the MC card's per-regime interval table (theta_E bin x signal-to-noise)",
    )
    regimes.add_argument("--models", default="models", help="folder of the cards to update")
    regimes.add_argument(
        "--data", required=True, nargs="+", help="simulated sets no model was trained on"
    )
    regimes.add_argument(
        "--num-samples",
        type=int,
        nargs="+",
        default=[10, 100, 1000],
        help="MC passes whose residuals are pooled into the one table",
    )
    regimes.set_defaults(handler=_calibrate_regimes)

    check = commands.add_parser(
        "check-regimes",
        help="coverage per theta_E bin and noise tercile, per number of MC passes",
    )
    check.add_argument("--models", default="models")
    check.add_argument(
        "--data", required=True, nargs="+", help="held-out sets other than the fitting set"
    )
    check.add_argument("--num-samples", type=int, nargs="+", default=[10, 100, 1000])
    check.add_argument("--out", default=None, help="write the full report as JSON here")
    check.set_defaults(handler=_check_regimes)

    evaluate = commands.add_parser("evaluate", help="metrics and plots on a test split")
    evaluate.add_argument("--data", required=True, help="test data directory")
    evaluate.add_argument("--runs", required=True)
    evaluate.set_defaults(handler=_evaluate)

    report = commands.add_parser(
        "report",
        help="evaluate the exported ONNX models on a simulated set, with bootstrap intervals",
    )
    report.add_argument("--data", required=True, help="simulated set (shards, labels.csv)")
    report.add_argument("--models", default="models", help="ONNX models and their cards")
    report.add_argument("--out", required=True, help="directory for report.json and report.md")
    report.add_argument(
        "--role", choices=["sealed_test", "second_generator"], default="sealed_test"
    )
    report.add_argument("--num-samples", type=int, default=100, help="MC passes per lens")
    report.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    report.add_argument("--seed", type=int, default=14, help="dropout and bootstrap seed")
    report.add_argument(
        "--write-cards", action="store_true", help="add the report to the cards' metrics"
    )
    report.set_defaults(handler=_report)

    second = commands.add_parser(
        "second-generator",
        help="GalSim-rendered DES DR2-like cutouts that training never uses (evaluation only)",
    )
    second.add_argument("--out", required=True, help="output directory")
    second.add_argument("--n", type=int, default=4000, help="number of cutouts")
    second.add_argument("--seed", type=int, required=True)
    second.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    second.set_defaults(handler=_second_generator)

    export = commands.add_parser("export", help="ONNX + Keras + model cards into models/")
    export.add_argument("--runs", required=True)
    export.add_argument("--models", default="models")
    export.add_argument(
        "--data", nargs="+", default=[], help="train/test data dirs (for the cards)"
    )
    export.add_argument(
        "--only",
        nargs="+",
        choices=_MODEL_NAMES,
        default=list(_MODEL_NAMES),
        help="export these models only; the others' files in --models stay as they are",
    )
    export.add_argument(
        "--version", default=None, help="the cards' version (default: training.export's)"
    )
    export.set_defaults(handler=_export)

    reexport = commands.add_parser(
        "reexport-theta-e",
        help="re-export the theta_E graphs (einstein_radius, einstein_radius_mc) from their "
        ".keras files, averaging over the cutout's rotations (models/ in place)",
    )
    reexport.add_argument("--models", default="models")
    reexport.add_argument(
        "--views",
        type=int,
        choices=(1, 2, 4),
        default=ROTATIONS,
        help="rotations by 90 degrees averaged over (2: 0 and 90 degrees)",
    )
    reexport.add_argument("--version", required=True, help="the two cards' new version")
    reexport.set_defaults(handler=_reexport_theta_e)

    ood = commands.add_parser(
        "ood",
        help="fit the out-of-distribution statistics and set their threshold (models/ in place)",
    )
    ood.add_argument("--models", default="models", help="models folder (classifier with features)")
    ood.add_argument("--fit-data", required=True, nargs="+", help="training data folders")
    ood.add_argument(
        "--threshold-data",
        required=True,
        nargs="+",
        help="in-distribution test folders the threshold is set on (the sealed set)",
    )
    ood.add_argument(
        "--flagged-fraction",
        type=float,
        default=FLAGGED_FRACTION,
        help="share of the threshold data flagged",
    )
    ood.add_argument(
        "--seeing-tail-quantile",
        type=float,
        default=TAIL_QUANTILE,
        help="quantile of the fit data at which the seeing term's tail meets the others'",
    )
    ood.add_argument(
        "--seeing-offset",
        type=float,
        default=SEEING_OFFSET,
        help="score units the seeing term is lowered by, so it counts only far out",
    )
    ood.add_argument(
        "--reexport-classifier",
        action="store_true",
        help="first re-export the classifier from its .keras file with the features output "
        "(for models exported before it had one)",
    )
    ood.set_defaults(handler=_ood)

    seeing = commands.add_parser(
        "seeing",
        help="train the seeing estimator of the OOD score and graft it into the classifier",
    )
    seeing.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="training data folders: the survey's, and one simulated with a wide seeing range",
    )
    seeing.add_argument(
        "--val", help="validation folder (learning-rate schedule); default: a tenth of --data"
    )
    seeing.add_argument("--models", default="models", help="models folder (classifier in place)")
    seeing.add_argument("--epochs", type=int, default=6)
    seeing.add_argument("--seed", type=int, default=0)
    seeing.set_defaults(handler=_seeing)

    ood_sets = commands.add_parser(
        "ood-sets", help="out-of-distribution test sets derived from simulated cutouts"
    )
    ood_sets.add_argument("--data", required=True, help="in-distribution simulated cutouts")
    ood_sets.add_argument("--out", required=True, help="one folder per kind is written here")
    ood_sets.add_argument("--n", type=int, default=1000, help="cutouts per kind")
    ood_sets.add_argument("--seed", type=int, default=0)
    ood_sets.add_argument("--kinds", nargs="*", help="a subset of the kinds (default: all)")
    ood_sets.set_defaults(handler=_ood_sets)

    ood_evaluate = commands.add_parser(
        "ood-evaluate", help="AUROC and flagged shares of the out-of-distribution score"
    )
    ood_evaluate.add_argument("--models", default="models")
    ood_evaluate.add_argument("--data", required=True, help="in-distribution test cutouts")
    ood_evaluate.add_argument("--ood", required=True, help="folder written by ood-sets")
    ood_evaluate.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    ood_evaluate.add_argument("--out", help="also write the results as JSON here")
    ood_evaluate.set_defaults(handler=_ood_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.handler(args)
    return 0
