"""The Dask task of ``lensserve batch``: score one partition of files on a worker.

A task runs the service's own steps on its files:
:func:`~service.core.inference.prepare_cutout` (FITS decoding and preprocessing),
:func:`~service.core.inference.predict_chunk` (the engine's model call and MC
summary) and :func:`~service.schemas.encode_result` (the API's result), and
flattens each result into a table row (:mod:`service.batch.table`). Each
worker process loads the models on its first task and reuses the onnxruntime
sessions for every later one.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.batch.table import flatten_result
from service.core.inference import (
    CutoutOutcome,
    PreparedCutout,
    predict_chunk,
    prepare_band_files_for_input,
    prepare_cutout,
)
from service.core.runtime import Device, OnnxModelRuntime
from service.errors import (
    BandMismatchError,
    InvalidFitsError,
    LensServeError,
    UnreadableFileError,
)
from service.fits.band_files import BandGroup
from service.fits.decode import BandFile
from service.fits.raw import FitsLimits
from service.schemas import encode_result

logger = logging.getLogger("lensserve.batch")

#: What a partition holds: a file path (one whole object), or one object's band files.
BatchItem = str | BandGroup


def item_path(item: BatchItem) -> str:
    """The file of an item, or the name (folder and stem) of a band group: its row's key."""
    return item.name if isinstance(item, BandGroup) else item


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker needs to score a partition (pickled to the workers)."""

    models_dir: str
    """Folder with the ONNX models and cards, as seen from the workers (a path)."""
    device: Device
    """onnxruntime device: auto, cpu or cuda (no unit)."""
    intra_op_threads: int
    """onnxruntime threads per operator on each worker (count)."""
    limits: FitsLimits
    """Caps on decompressed size (bytes), pixels, header cards and masked fraction."""
    num_samples: int
    """MC-dropout passes per cutout (samples)."""
    seed: int | None
    """Seed of the run; partition i draws its dropout masks from (seed, i)."""


@dataclass(frozen=True)
class PartitionResult:
    """What one task returns: the rows of its files, in order."""

    index: int
    rows: list[dict[str, Any]]
    model_versions: dict[str, str]


_RUNTIMES: dict[tuple[str, str, int], OnnxModelRuntime] = {}
_RUNTIMES_LOCK = threading.Lock()
_loads = 0


def worker_runtime(config: WorkerConfig) -> OnnxModelRuntime:
    """This process's runtime for ``config``, loaded on first use and reused after.

    A Dask worker runs many partitions in one process: loading the models and
    creating the onnxruntime sessions once per process, not per task, is what
    keeps small partitions cheap.
    """
    global _loads
    key = (config.models_dir, config.device, config.intra_op_threads)
    with _RUNTIMES_LOCK:
        runtime = _RUNTIMES.get(key)
        if runtime is None:
            runtime = OnnxModelRuntime(
                Path(config.models_dir),
                device=config.device,
                intra_op_threads=config.intra_op_threads,
                warmup_batch_sizes=(),
            )
            runtime.load()
            _RUNTIMES[key] = runtime
            _loads += 1
        return runtime


def runtime_loads() -> int:
    """Times this process has loaded the models for batch work, successfully (count)."""
    with _RUNTIMES_LOCK:
        return _loads


def _read(path: str) -> bytes | UnreadableFileError:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        unreadable = UnreadableFileError(f"cannot read {path!r}: {exc.strerror or exc}")
        unreadable.__cause__ = exc
        return unreadable


def _prepare_file(
    item: BatchItem, *, runtime: OnnxModelRuntime, limits: FitsLimits
) -> PreparedCutout | LensServeError:
    """Read, decode and preprocess one file (or one object's band files); errors are
    returned, as the API's decoder does."""
    path = item_path(item)
    name = os.path.basename(path)
    if isinstance(item, BandGroup) and item.problem is not None:
        return BandMismatchError(item.problem)
    try:
        if isinstance(item, BandGroup):
            files: dict[str, BandFile] = {}
            for band, band_path in item.files:
                data = _read(band_path)
                if isinstance(data, UnreadableFileError):
                    return data
                files[band] = BandFile(data, os.path.basename(band_path))
            return prepare_band_files_for_input(
                files, filename=name, spec=runtime.models.input, limits=limits
            )
        data = _read(path)
        if isinstance(data, UnreadableFileError):
            return data
        return prepare_cutout(data, filename=name, models=runtime.models, limits=limits)
    except LensServeError as exc:
        return exc
    except Exception as exc:  # a file the codec did not foresee must not take the partition down
        logger.exception("unexpected failure decoding %r", path)
        error = InvalidFitsError(f"{name!r} could not be decoded ({type(exc).__name__}: {exc})")
        error.__cause__ = exc
        return error


def result_rows(
    paths: Sequence[BatchItem], outcomes: Sequence[CutoutOutcome]
) -> list[dict[str, Any]]:
    """One table row per file (or band group): the API's result for its outcome, flattened."""
    return [
        flatten_result(
            encode_result(outcome, filename=os.path.basename(item_path(item))),
            path=item_path(item),
        )
        for item, outcome in zip(paths, outcomes, strict=True)
    ]


def score_partition(
    paths: Sequence[BatchItem], *, index: int, config: WorkerConfig
) -> PartitionResult:
    """Score one partition of files on this worker (the Dask task).

    Parameters
    ----------
    paths : sequence of str or BandGroup
        The partition's files (or objects of one file per band), as the workers see them.
    index : int
        Position of the partition in the run (count from 0); with a seed, it
        selects the partition's dropout seed as a chunk index does in the API.
    config : WorkerConfig
        Models, device, limits, samples and seed.

    Returns
    -------
    PartitionResult
        One row per path, in order: predictions or the error that stopped the file.

    Raises
    ------
    ModelUnavailableError
        This worker cannot load the models: the whole task fails, so that the
        partition is retried rather than recorded as scored.
    """
    runtime = worker_runtime(config)
    outcomes: list[CutoutOutcome | PreparedCutout] = [
        _prepare_file(path, runtime=runtime, limits=config.limits) for path in paths
    ]
    prepared = [o for o in outcomes if isinstance(o, PreparedCutout)]
    predictions: list[CutoutOutcome]
    try:
        predictions = predict_chunk(
            runtime, prepared, num_samples=config.num_samples, seed=config.seed, chunk_index=index
        )
    except LensServeError as exc:
        # A failed model call fails every file that was in it.
        predictions = [exc] * len(prepared)
    answers = iter(predictions)
    final = [next(answers) if isinstance(o, PreparedCutout) else o for o in outcomes]
    return PartitionResult(index, result_rows(paths, final), runtime.models.versions)
