"""Catalogue-scale scoring on Dask: ``lensserve batch`` without HTTP.

The inputs are cut into partitions of ``partition_size`` files; each is one
Dask task, :func:`service.batch.worker.score_partition`, which runs the API's
decoding, models and result building on a worker that keeps its sessions.
This module is the client side: it keeps a bounded number of tasks in flight,
writes each finished partition, and merges them into the output table.

One file per band
    With ``group_bands`` (``--group-bands``), files named by the pattern
    (``{stem}_{band}.fits[.gz]``, :mod:`service.fits.band_files`) are grouped
    into objects; each object is one item of a partition and one row, keyed by
    its folder and stem, and the files matching no pattern stay whole objects.

Resuming
    The client writes each finished partition to ``<out>.parts/part-NNNNNN.parquet``
    next to a manifest of the run (inputs, partition size, samples, seed). Run
    the same command again after an interruption and only the missing
    partitions are scored; the folder is removed once the table is complete.
    Partitions are fixed by the manifest, so a seeded run draws the same
    dropout masks whether or not it was interrupted.

Nothing is lost
    A file that cannot be read or decoded, or whose outputs are not finite,
    gets a row with its error. A partition whose task fails as a whole (a
    worker killed, or unable to load the models) gets one error row per file
    in the table, is not written to the parts folder, and is scored again by
    the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from distributed import Client, LocalCluster, as_completed
from tqdm import tqdm

from service.batch import table as batch_table
from service.batch.inputs import resolve_inputs
from service.batch.worker import (
    BatchItem,
    PartitionResult,
    WorkerConfig,
    item_path,
    result_rows,
    score_partition,
)
from service.errors import InferenceError, InvalidBatchInputError, LensServeError
from service.fits.band_files import BandGroup, group_band_files

logger = logging.getLogger("lensserve.batch")

MANIFEST_NAME = "manifest.json"
#: Partitions kept in flight per worker thread: enough to hide scheduling gaps, few enough
#: that a catalogue of 10^8 files never becomes 10^5 pending tasks on the scheduler.
IN_FLIGHT_PER_THREAD = 2


@dataclass(frozen=True)
class RunManifest:
    """What fixes the partitions of a run, so a resumed run continues the same one."""

    inputs_sha256: str
    n_inputs: int
    partition_size: int
    num_samples: int
    seed: int | None

    @classmethod
    def for_run(
        cls, paths: Sequence[BatchItem], *, partition_size: int, config: WorkerConfig
    ) -> RunManifest:
        digest = hashlib.sha256("\n".join(map(_manifest_line, paths)).encode()).hexdigest()
        return cls(digest, len(paths), partition_size, config.num_samples, config.seed)


@dataclass(frozen=True)
class BatchSummary:
    """How a run went (counts of rows and partitions)."""

    rows: int
    error_rows: int
    partitions_scored: int
    partitions_resumed: int
    partitions_failed: int


def _manifest_line(item: BatchItem) -> str:
    """A file's path; a band group's name and its files (a plain run's lines are unchanged)."""
    if isinstance(item, BandGroup):
        return "\t".join([item.name, *(f"{band}={path}" for band, path in item.files)])
    return item


def parts_dir_for(out: Path) -> Path:
    """Folder that holds the finished partitions of a run writing ``out``."""
    return out.with_name(out.name + ".parts")


def _part_path(parts_dir: Path, index: int) -> Path:
    return parts_dir / f"part-{index:06d}.parquet"


def _open_parts_dir(out: Path, manifest: RunManifest, *, overwrite: bool) -> tuple[Path, set[int]]:
    """The parts folder of this run and the partitions already finished in it."""
    parts_dir = parts_dir_for(out)
    manifest_path = parts_dir / MANIFEST_NAME
    if manifest_path.exists():
        found = json.loads(manifest_path.read_text(encoding="utf-8"))
        if found != asdict(manifest):
            raise InvalidBatchInputError(
                f"{parts_dir} holds an unfinished run with other inputs or settings "
                f"({found}); rerun that command to finish it, or delete the folder"
            )
        done = {i for i in range(_partition_count(manifest)) if _part_path(parts_dir, i).exists()}
        return parts_dir, done
    if out.exists() and not overwrite:
        raise InvalidBatchInputError(f"{out} exists; pass --overwrite to replace it")
    parts_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(asdict(manifest), indent=2), encoding="utf-8")
    return parts_dir, set()


def _partition_count(manifest: RunManifest) -> int:
    return math.ceil(manifest.n_inputs / manifest.partition_size)


@contextmanager
def dask_client(scheduler: str | None, *, n_workers: int) -> Iterator[Client]:
    """A client of ``scheduler``, or of a local cluster of ``n_workers`` processes.

    Local workers get one thread each: the partitions, not onnxruntime's
    operators, are what runs in parallel.
    """
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _failed_rows(paths: Sequence[BatchItem], exc: BaseException) -> list[dict[str, Any]]:
    """Rows for the files of a failed task: its own service error, or inference_failed."""
    error = (
        exc
        if isinstance(exc, LensServeError)
        else InferenceError(
            f"the task scoring this file's partition failed: {type(exc).__name__}: {exc}"
        )
    )
    return result_rows(paths, [error] * len(paths))


def _score_all(
    client: Client,
    partitions: dict[int, list[BatchItem]],
    *,
    config: WorkerConfig,
    parts_dir: Path,
    on_rows: Callable[[int], object],
) -> tuple[dict[int, pa.Table], set[str]]:
    """Score the partitions with a bounded number in flight; write each as it finishes.

    Returns the tables of partitions that failed as a whole (kept in memory,
    never written, so that a rerun scores them again) and the model versions seen.
    """
    token = uuid.uuid4().hex[:8]
    pending = iter(sorted(partitions))
    futures = as_completed()
    index_of: dict[object, int] = {}  # partition of each future, by task key
    failed: dict[int, pa.Table] = {}
    versions: set[str] = set()

    def submit_next() -> None:
        index = next(pending, None)
        if index is None:
            return
        future = client.submit(
            score_partition,
            partitions[index],
            index=index,
            config=config,
            key=f"lensserve-batch-{token}-{index}",
            retries=1,
            pure=False,
        )
        index_of[future.key] = index
        futures.add(future)

    threads = max(sum(client.nthreads().values()), 1)
    for _ in range(threads * IN_FLIGHT_PER_THREAD):
        submit_next()
    for future in futures:
        index = index_of.pop(future.key)
        try:
            result: PartitionResult = future.result()
        except Exception as exc:  # whatever killed the task, its files keep their rows
            logger.error("partition %d failed: %s", index, exc)
            failed[index] = batch_table.rows_to_arrow(_failed_rows(partitions[index], exc))
        else:
            versions.add(json.dumps(result.model_versions, sort_keys=True))
            batch_table.write_part(
                batch_table.rows_to_arrow(result.rows, model_versions=result.model_versions),
                _part_path(parts_dir, index),
            )
        future.release()
        on_rows(len(partitions[index]))
        submit_next()
    return failed, versions


def _model_versions(parts_dir: Path, done: Sequence[int], seen: set[str]) -> dict[str, str]:
    """The one set of model versions every scored partition used."""
    found = set(seen)
    found.update(
        json.dumps(batch_table.read_model_versions(_part_path(parts_dir, i)), sort_keys=True)
        for i in done
    )
    if len(found) > 1:
        raise InvalidBatchInputError(
            f"the partitions in {parts_dir} were scored by different model versions "
            f"({sorted(found)}); delete the folder and score the catalogue again"
        )
    return json.loads(found.pop()) if found else {}


def run_batch(
    inputs: Sequence[str],
    *,
    out: Path,
    config: WorkerConfig,
    partition_size: int,
    scheduler: str | None = None,
    n_workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    group_bands: str | None = None,
    bands: Sequence[str] = ("g", "r", "i"),
) -> BatchSummary:
    """Score every input file on Dask and write one table row per file.

    Parameters
    ----------
    inputs : sequence of str
        FITS files, globs, folders or lists of paths (see :mod:`service.batch.inputs`).
    out : Path
        Table to write: ``.parquet``, ``.csv`` or ``.fits``.
    config : WorkerConfig
        What the workers need: models, device, threads, limits, samples, seed.
    partition_size : int
        Files per Dask task and per model call (files).
    scheduler : str or None
        Address of a Dask scheduler (``tcp://host:8786``); None starts a
        local cluster of ``n_workers`` processes.
    n_workers : int
        Worker processes of the local cluster (count).
    overwrite : bool
        Replace an existing ``out`` (an unfinished run is always resumed).
    progress : bool
        Show a progress bar on stderr, in files.
    group_bands : str or None
        A name pattern such as ``{stem}_{band}.fits[.gz]`` (:mod:`service.fits.band_files`)
        that groups the files into objects of one file per band, one row each; None
        scores each file as a whole object.
    bands : sequence of str
        With ``group_bands``, the bands of an object (the models' bands).

    Raises
    ------
    InvalidBatchInputError
        Nothing to score, ``out`` exists, or the parts folder belongs to
        another run.
    """
    batch_table.table_format(out)  # refuse an unknown ending before any work
    paths: list[BatchItem] = list(resolve_inputs(inputs))
    if group_bands is not None:
        try:
            paths = group_band_files(map(item_path, paths), bands=bands, pattern=group_bands)
        except ValueError as exc:
            raise InvalidBatchInputError(str(exc)) from exc
    manifest = RunManifest.for_run(paths, partition_size=partition_size, config=config)
    parts_dir, done = _open_parts_dir(out, manifest, overwrite=overwrite)
    count = _partition_count(manifest)
    todo = {
        i: paths[i * partition_size : (i + 1) * partition_size]
        for i in range(count)
        if i not in done
    }
    resumed_files = len(paths) - sum(len(p) for p in todo.values())
    with tqdm(
        total=len(paths),
        initial=resumed_files,
        unit="file",
        desc="lensserve batch",
        disable=not progress,
    ) as bar:
        if todo:
            with dask_client(scheduler, n_workers=n_workers) as client:
                failed, seen = _score_all(
                    client, todo, config=config, parts_dir=parts_dir, on_rows=bar.update
                )
        else:
            failed, seen = {}, set()
    finished = sorted(set(range(count)) - set(failed))
    versions = _model_versions(parts_dir, finished, seen)
    errors = _ErrorCounter()
    tables = errors.count(_tables_in_order(parts_dir, count, failed))
    rows = batch_table.write_table(tables, out, model_versions=versions)
    if not failed:
        shutil.rmtree(parts_dir)
    return BatchSummary(
        rows=rows,
        error_rows=errors.rows,
        partitions_scored=len(todo) - len(failed),
        partitions_resumed=len(done),
        partitions_failed=len(failed),
    )


def _tables_in_order(
    parts_dir: Path, count: int, failed: dict[int, pa.Table]
) -> Iterator[pa.Table]:
    for index in range(count):
        yield failed[index] if index in failed else pq.read_table(_part_path(parts_dir, index))


class _ErrorCounter:
    """Counts the error rows of the tables that stream through it."""

    def __init__(self) -> None:
        self.rows = 0

    def count(self, tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
        for table in tables:
            self.rows += table.num_rows - table.column("error_code").null_count
            yield table
