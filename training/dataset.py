"""Parallel, reproducible generation of simulated cutouts into NPZ shards.

Each shard gets its own seed from ``numpy.random.SeedSequence(config.seed)``,
so the data set is identical whatever the number of worker processes.
A shard holds ``images`` (n, 3, 64, 64) float32 in AB zero point 30 fluxes;
all label rows go to ``labels.csv`` beside the shards.
"""

from __future__ import annotations

import csv
import json
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from training.config import SimulationConfig
from training.simulate import simulate_cutout

LABEL_FILE = "labels.csv"
CONFIG_FILE = "simulation.json"


def _simulate_shard(
    args: tuple[SimulationConfig, int, int, np.random.SeedSequence],
) -> tuple[int, NDArray, list[dict]]:
    config, shard_index, size, seed = args
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k in range(size):
        # The first lens_fraction of each shard are lenses: every shard is balanced.
        is_lens = (
            (k + 0.5) / size <= config.lens_fraction
            if size > 1
            else rng.uniform() < config.lens_fraction
        )
        image, row = simulate_cutout(rng, config, is_lens=bool(is_lens))
        images.append(image)
        labels.append(row)
    return shard_index, np.stack(images), labels


def simulate_dataset(config: SimulationConfig, out_dir: Path, *, workers: int) -> Path:
    """Write ``config.n_cutouts`` cutouts as shards plus a label table; returns ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(config.n_cutouts / config.shard_size)
    seeds = np.random.SeedSequence(config.seed).spawn(n_shards)
    sizes = [
        min(config.shard_size, config.n_cutouts - i * config.shard_size) for i in range(n_shards)
    ]
    jobs = [(config, i, sizes[i], seeds[i]) for i in range(n_shards)]
    all_labels: dict[int, list[dict]] = {}
    with (
        ProcessPoolExecutor(max_workers=workers) as pool,
        tqdm(total=config.n_cutouts, unit="cutout") as bar,
    ):
        for shard_index, images, labels in pool.map(_simulate_shard, jobs):
            np.savez(out_dir / f"shard_{shard_index:04d}.npz", images=images)
            all_labels[shard_index] = labels
            bar.update(len(labels))
    _write_labels(out_dir / LABEL_FILE, [row for i in range(n_shards) for row in all_labels[i]])
    (out_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2, default=str))
    return out_dir


def _write_labels(path: Path, rows: list[dict]) -> None:
    columns = sorted({key for row in rows for key in row})
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["index", *columns], restval="nan")
        writer.writeheader()
        for index, row in enumerate(rows):
            writer.writerow({"index": index, **row})


@dataclass(frozen=True)
class Dataset:
    """Images (n, 3, 64, 64) and label columns as float or string arrays."""

    images: NDArray[np.float32]
    labels: dict[str, NDArray]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: NDArray) -> Dataset:
        return Dataset(self.images[index], {k: v[index] for k, v in self.labels.items()})


def load_dataset(data_dir: Path) -> Dataset:
    """Read every shard and the label table written by :func:`simulate_dataset`."""
    shards = sorted(data_dir.glob("shard_*.npz"))
    images = np.concatenate([np.load(shard)["images"] for shard in shards])
    with (data_dir / LABEL_FILE).open() as handle:
        rows = list(csv.DictReader(handle))
    labels: dict[str, NDArray] = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        try:
            labels[key] = np.array([float(v) for v in values])
        except ValueError:
            labels[key] = np.array(values)
    if len(images) != len(rows):
        raise ValueError(f"{data_dir}: {len(images)} images but {len(rows)} label rows")
    return Dataset(images, labels)
