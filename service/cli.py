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

from service.settings import Settings, available_cores

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
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"lensserve: invalid LENSSERVE_* configuration:\n{exc}", file=sys.stderr)
        return 2
    if not settings.models_dir.is_dir():
        print(f"lensserve: models folder {settings.models_dir} does not exist", file=sys.stderr)
        return 2
    uvicorn.run(
        "service.api:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=settings.log_level,
        access_log=not args.no_access_log,
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="lensserve",
        description="Strong-lens finding and Einstein-radius inference for FITS cutouts.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lensserve`` and ``python -m service``; returns the exit status."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return handler(args)
