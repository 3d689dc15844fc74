"""The ``lensserve`` command line.

Each subcommand is a ``_add_<name>_parser`` function that registers its
arguments and a handler taking the parsed arguments and returning an exit
status; :func:`main` dispatches to it. New subcommands plug in the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from service.core.cpu import available_cores
from service.fits.band_files import DEFAULT_BAND_PATTERN
from service.settings import Settings

Handler = Callable[[argparse.Namespace], int]


def _positive_int(text: str) -> int:
    """argparse type for counts that must be at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _serve(args: argparse.Namespace) -> int:
    """Run the HTTP service on uvicorn with the app factory."""
    import uvicorn

    # uvicorn builds the app with ``create_app()`` in each worker process, which reads the
    # settings from the environment; command-line choices travel to the workers that way.
    if args.models_dir is not None:
        os.environ["LENSSERVE_MODELS_DIR"] = str(args.models_dir.resolve())
    if args.workers > 1 and "LENSSERVE_INTRA_OP_THREADS" not in os.environ:
        # Share the cores among the workers instead of oversubscribing them.
        os.environ["LENSSERVE_INTRA_OP_THREADS"] = str(max(available_cores() // args.workers, 1))
        os.environ.setdefault("LENSSERVE_MODEL_INSTANCES", "1")
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"lensserve: invalid LENSSERVE_* configuration:\n{exc}", file=sys.stderr)
        return 2
    if not settings.models_dir.is_dir():
        print(f"lensserve: models folder {settings.models_dir} does not exist", file=sys.stderr)
        return 2
    uvicorn.run(
        "service.api.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=settings.log_level,
        access_log=not args.no_access_log,
        # After SIGTERM and the grace period: how long requests in flight may still take.
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )
    return 0


def _add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the HTTP service",
        description="Serve the models in --models-dir (or LENSSERVE_MODELS_DIR) over HTTP. "
        "Other settings come from LENSSERVE_* environment variables.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="uvicorn worker processes, each with its own models and batcher (default: 1)",
    )
    parser.add_argument(
        "--models-dir", type=Path, default=None, help="folder with the ONNX models and cards"
    )
    parser.add_argument("--no-access-log", action="store_true", help="do not log every request")
    parser.set_defaults(handler=_serve)


def _batch(args: argparse.Namespace) -> int:
    """Score a catalogue of FITS files on Dask and write one table row per file."""
    try:
        from service.batch.run import run_batch
        from service.batch.worker import WorkerConfig
    except ImportError as exc:
        print(
            f"lensserve batch needs Dask and pyarrow ({exc}); pip install 'lensserve[batch]'",
            file=sys.stderr,
        )
        return 2
    from service.errors import LensServeError

    if args.models_dir is not None:
        os.environ["LENSSERVE_MODELS_DIR"] = str(args.models_dir.resolve())
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"lensserve: invalid LENSSERVE_* configuration:\n{exc}", file=sys.stderr)
        return 2
    samples = args.samples or settings.default_samples
    if samples > settings.max_samples:
        print(f"lensserve: --samples {samples} exceeds {settings.max_samples}", file=sys.stderr)
        return 2
    config = WorkerConfig(
        models_dir=str(settings.models_dir),
        device=settings.device,
        # Parallelism comes from the workers: one operator thread each unless configured.
        intra_op_threads=settings.intra_op_threads or 1,
        limits=settings.fits_limits,
        num_samples=samples,
        seed=args.seed,
    )
    try:
        summary = run_batch(
            args.inputs,
            out=args.out,
            config=config,
            partition_size=args.partition_size,
            scheduler=args.scheduler,
            n_workers=args.workers or available_cores(),
            overwrite=args.overwrite,
            progress=not args.no_progress,
            group_bands=args.group_bands,
            bands=args.bands,
        )
    except (LensServeError, ValueError) as exc:
        print(f"lensserve batch: {exc}", file=sys.stderr)
        return 2
    print(
        f"lensserve batch: wrote {summary.rows} rows ({summary.error_rows} with errors) to "
        f"{args.out}; partitions scored {summary.partitions_scored}, resumed "
        f"{summary.partitions_resumed}, failed {summary.partitions_failed}",
        file=sys.stderr,
    )
    if summary.partitions_failed:
        print(
            "lensserve batch: rerun the same command to retry the failed partitions",
            file=sys.stderr,
        )
        return 1
    return 0


def _add_batch_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="score a catalogue of FITS files on Dask",
        description="Run the models on every input file, on a local Dask cluster or on the "
        "scheduler given, and write one row per file (predictions or error). Rerunning an "
        "interrupted command resumes it. Other settings come from LENSSERVE_* variables.",
    )
    parser.add_argument(
        "inputs", nargs="+", help="FITS files, globs, folders, or .txt/.lst lists of paths"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output table: .parquet, .csv or .fits"
    )
    parser.add_argument(
        "--scheduler", default=None, help="Dask scheduler address, e.g. tcp://host:8786"
    )
    parser.add_argument(
        "--partition-size",
        type=_positive_int,
        default=256,
        help="files per Dask task and per model call (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="worker processes of the local cluster (default: one per core)",
    )
    parser.add_argument(
        "--samples", type=_positive_int, default=None, help="MC-dropout samples per cutout"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="makes the MC-dropout results reproducible"
    )
    parser.add_argument(
        "--models-dir", type=Path, default=None, help="folder with the ONNX models and cards"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_band_grouping_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_batch)


def _predict(args: argparse.Namespace) -> int:
    """Send FITS files to a running service and write one table row per file."""
    from service.client.predict import predict_command

    return predict_command(
        args.inputs,
        url=args.url,
        out=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        files_per_request=args.files_per_request,
        concurrency=args.concurrency,
        max_retries=args.max_retries,
        samples=args.samples,
        seed=args.seed,
        progress=not args.no_progress,
        checkpoint_s=args.checkpoint_s,
        group_bands=args.group_bands,
        bands=args.bands,
    )


def _add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="send FITS files to a running service and write a table",
        description="POST the files to URL/v1/predict in batches, with retries on 503/429 "
        "and connection errors, and write one row per file (predictions or error). "
        "Exits 1 if any file failed, listing the failures.",
    )
    parser.add_argument("inputs", nargs="+", help="FITS files or folders of them")
    parser.add_argument(
        "--url", default="http://127.0.0.1:8000", help="service base URL (default: %(default)s)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output table: .csv, .ecsv, .fits or .vot"
    )
    parser.add_argument(
        "--resume", action="store_true", help="keep --out's successful rows and skip their files"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--files-per-request",
        type=_positive_int,
        default=16,
        help="files per multipart request (default: %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=4,
        help="requests in flight at once (default: %(default)s)",
    )
    parser.add_argument(
        "--max-retries",
        type=int,
        default=8,
        help="retries per request on 503/429/connection errors (default: %(default)s)",
    )
    parser.add_argument(
        "--samples", type=_positive_int, default=None, help="MC-dropout samples per cutout"
    )
    parser.add_argument("--seed", type=int, default=None, help="reproducible MC-dropout draws")
    parser.add_argument(
        "--checkpoint-s",
        type=float,
        default=1.0,
        help="longest time between two rewrites of --out, in seconds; 0 rewrites it after "
        "every file (default: %(default)s)",
    )
    _add_band_grouping_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_predict)


def _band_list(text: str) -> tuple[str, ...]:
    bands = tuple(band.strip().lower() for band in text.split(",") if band.strip())
    if not bands or len(set(bands)) != len(bands):
        raise argparse.ArgumentTypeError(f"expected distinct bands such as g,r,i, got {text!r}")
    return bands


def _add_band_grouping_arguments(parser: argparse.ArgumentParser) -> None:
    """``--group-bands [PATTERN]`` and ``--bands``, shared by predict and batch."""
    parser.add_argument(
        "--group-bands",
        nargs="?",
        const=DEFAULT_BAND_PATTERN,
        default=None,
        metavar="PATTERN",
        help="send files of one object, one per band, as one object, grouped by the name "
        "pattern ({stem}, {band}, [optional text]; default: %(const)s); one row per object",
    )
    parser.add_argument(
        "--bands",
        type=_band_list,
        default=("g", "r", "i"),
        help="with --group-bands, the bands of an object, comma-separated; files of other "
        "bands are left out (default: g,r,i, the shipped models' bands)",
    )


def _bench(args: argparse.Namespace) -> int:
    """Measure the table of ``service.bench.run`` and print it."""
    from service.bench.run import BenchConfig, format_report, run_bench
    from service.settings import DEFAULT_MODELS_DIR

    config = BenchConfig(
        models_dir=args.models_dir or DEFAULT_MODELS_DIR,
        cutouts_dir=args.cutouts or _default_bench_cutouts(),
        device=args.device,
        batch_size=args.batch_size,
        num_samples=args.samples,
        concurrencies=tuple(args.concurrency),
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        rounds=args.rounds,
        keras_cutouts=args.keras_cutouts,
        flood_connections=args.flood_connections,
    )
    report = run_bench(config, progress=lambda step: print(f"bench: {step}", file=sys.stderr))
    print(format_report(report))
    return 0


#: The repository's own sample cutouts, as seen from its root (where the README runs commands).
SAMPLE_CUTOUTS_DIR = Path("examples/cutouts/clean")


def _default_bench_cutouts() -> Path | None:
    """The sample cutouts when run from a checkout; None (noise cubes) from an installed wheel."""
    return SAMPLE_CUTOUTS_DIR if SAMPLE_CUTOUTS_DIR.is_dir() else None


def _add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure throughput in-process, over HTTP and against plain Keras",
        description="Print cutouts/s and latency for the models in --models-dir, all rows "
        "measured in one run. The HTTP rows need wrk; the Keras row needs the bench extra.",
    )
    parser.add_argument("--models-dir", type=Path, default=None, help="folder with the cards")
    parser.add_argument(
        "--cutouts",
        type=Path,
        default=None,
        help="folder of FITS cutouts (default: examples/cutouts/clean when run from the "
        "repository root, else synthesised noise cubes)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="cutouts per batch")
    parser.add_argument("--samples", type=_positive_int, default=100, help="MC samples/cutout")
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        nargs="+",
        default=[1, 8, 64],
        help="single-cutout clients for row (d) (default: 1 8 64)",
    )
    parser.add_argument("--duration-s", type=float, default=10.0, help="seconds per row")
    parser.add_argument(
        "--rounds",
        type=_positive_int,
        default=3,
        help="alternating rounds of (a), (b), (c) and (d@max), each --duration-s long (default: 3)",
    )
    parser.add_argument(
        "--warmup-s",
        type=float,
        default=2.0,
        help="untimed load before each HTTP row, seconds (default: 2; 0 skips it)",
    )
    parser.add_argument(
        "--keras-cutouts",
        type=int,
        default=20,
        help="cutouts for the Keras row (e); 0 skips it (default: 20)",
    )
    parser.add_argument(
        "--flood-connections",
        type=int,
        default=256,
        help="clients of row (g), which never back off; 0 skips it (default: 256)",
    )
    parser.set_defaults(handler=_bench)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="lensserve",
        description="Strong-lens finding and Einstein-radius inference for FITS cutouts.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve_parser(subparsers)
    _add_batch_parser(subparsers)
    _add_predict_parser(subparsers)
    _add_bench_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lensserve`` and ``python -m service``; returns the exit status."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return handler(args)
