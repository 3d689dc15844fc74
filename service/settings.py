"""The service's one configuration object, read from ``LENSSERVE_*`` environment variables.

Nothing here runs at import time: :func:`service.api.create_app` builds a
:class:`Settings` when it is not handed one, so tests and the command line can
inject their own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.fits_codec import DEFAULT_LIMITS

#: The ``models/`` folder next to the ``service/`` package in a source checkout.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[1] / "models"

MiB = 1024 * 1024


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and cgroup pinning)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - sched_getaffinity is Linux-only
        return max(os.cpu_count() or 1, 1)


class Settings(BaseSettings):
    """Configuration of one lensserve process; every field reads ``LENSSERVE_<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix="LENSSERVE_", extra="ignore", frozen=True, use_attribute_docstrings=True
    )

    models_dir: Path = DEFAULT_MODELS_DIR
    """Folder holding the ONNX models and their JSON cards (a path)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where onnxruntime runs: ``cuda`` requires the CUDA provider, ``auto`` uses it
    only when a CUDA session can really be created, ``cpu`` never asks for it (no unit)."""

    intra_op_threads: int = Field(default=0, ge=0, le=1024)
    """Threads onnxruntime uses inside one operator (count); 0 means one per available
    core. With several uvicorn workers, ``lensserve serve`` divides the cores among them."""

    decode_threads: int = Field(default=1, ge=0, le=1024)
    """Threads that decode and preprocess FITS files off the event loop (count); 0 means
    one per available core. Decoding is mostly Python (astropy) holding the GIL, so more
    threads only contend with the event loop: 1 served 20-25% more cutouts/s than 2 on a
    2-core machine (docs/performance.md)."""

    max_batch_size: int = Field(default=64, ge=1, le=4096)
    """Largest number of cutouts merged into one onnxruntime call (cutouts)."""

    max_batch_wait_s: float = Field(default=0.002, ge=0.0, le=1.0)
    """Longest time the first request of a batch waits for others to join it, like
    Triton's ``max_queue_delay_microseconds`` (seconds)."""

    max_queue_cutouts: int = Field(default=2048, ge=1)
    """Cutouts allowed to wait for inference; beyond it requests are refused with 503
    ``overloaded`` (cutouts)."""

    overload_retry_after_s: int = Field(default=1, ge=0, le=3600)
    """Value of the ``Retry-After`` header sent with 503 answers (seconds)."""

    max_body_bytes: int = Field(default=32 * MiB, ge=1024)
    """Largest request body accepted, counted while it streams in (bytes, before any
    Content-Encoding is undone)."""

    max_files: int = Field(default=256, ge=1)
    """Most FITS files in one multipart request (files)."""

    max_decompressed_bytes: int = Field(default=DEFAULT_LIMITS.max_decompressed_bytes, ge=1024)
    """Largest size one file may reach once gunzipped or tile-decompressed, and largest
    image data its header may declare (bytes)."""

    max_pixels: int = Field(default=DEFAULT_LIMITS.max_pixels, ge=1)
    """Most pixels (all bands together) one file's image data may declare (pixels)."""

    max_header_cards: int = Field(default=DEFAULT_LIMITS.max_header_cards, ge=1)
    """Most header cards read from one HDU (cards)."""

    max_masked_fraction: float = Field(default=DEFAULT_LIMITS.max_masked_fraction, ge=0.0, le=1.0)
    """Largest fraction of masked (NaN or BLANK) pixels a cutout may have (fraction 0-1)."""

    default_samples: int = Field(default=100, ge=1)
    """MC-dropout samples per cutout when a request does not say (samples)."""

    max_samples: int = Field(default=1000, ge=1, le=100_000)
    """Most MC-dropout samples a request may ask for per cutout (samples)."""

    warmup: bool = True
    """Run the models on blank batches of 1 and ``max_batch_size`` cutouts before reporting
    ready, so the first real requests do not pay for lazy initialisation (flag)."""

    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """Verbosity of the ``lensserve`` loggers and of uvicorn (level name)."""

    @model_validator(mode="after")
    def _check_consistency(self) -> Self:
        if self.default_samples > self.max_samples:
            raise ValueError(
                f"default_samples ({self.default_samples}) exceeds max_samples ({self.max_samples})"
            )
        if self.max_queue_cutouts < self.max_files:
            raise ValueError(
                f"max_queue_cutouts ({self.max_queue_cutouts}) is smaller than max_files "
                f"({self.max_files}): a full multipart request could never be queued"
            )
        if self.max_queue_cutouts < self.max_batch_size:
            raise ValueError(
                f"max_queue_cutouts ({self.max_queue_cutouts}) is smaller than "
                f"max_batch_size ({self.max_batch_size})"
            )
        return self

    @property
    def resolved_intra_op_threads(self) -> int:
        """onnxruntime intra-op threads after resolving 0 to the available cores (count)."""
        return self.intra_op_threads or available_cores()

    @property
    def resolved_decode_threads(self) -> int:
        """Decode threads after resolving 0 to the available cores (count)."""
        return self.decode_threads or available_cores()
