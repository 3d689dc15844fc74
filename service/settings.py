"""The service's one configuration object, read from ``LENSSERVE_*`` environment variables.

Nothing here runs at import time: :func:`service.api.app.create_app` builds a
:class:`Settings` when it is not handed one, so tests and the command line can
inject their own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.core.cpu import available_cores
from service.fits.raw import DEFAULT_LIMITS, FitsLimits

#: The ``models/`` folder next to the ``service/`` package in a source checkout.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[1] / "models"

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Configuration of one lensserve process; every field reads ``LENSSERVE_<FIELD>``."""

    # Inputs stay out of validation errors: one of them may be an API key.
    model_config = SettingsConfigDict(
        env_prefix="LENSSERVE_",
        extra="ignore",
        frozen=True,
        use_attribute_docstrings=True,
        hide_input_in_errors=True,
    )

    models_dir: Path = DEFAULT_MODELS_DIR
    """Folder holding the ONNX models and their JSON cards (a path)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where onnxruntime runs: ``cuda`` requires the CUDA provider, ``auto`` uses it
    only when a CUDA session can really be created, ``cpu`` never asks for it (no unit)."""

    intra_op_threads: int = Field(default=0, ge=0, le=1024)
    """Threads onnxruntime uses inside one operator of one batch (count); 0 shares the
    available cores among the ``model_instances``. With several uvicorn workers,
    ``lensserve serve`` divides the cores among them."""

    model_instances: int = Field(default=0, ge=0, le=64)
    """Batches that run at once, each on its own thread, like Triton's ``instance_group``
    count (count); 0 means two where at least two cores are available, else one. Two
    batches on one thread each keep two cores busier than one batch split over both,
    whose operators wait for their slowest thread (docs/performance.md)."""

    decode_threads: int = Field(default=0, ge=0, le=1024)
    """Threads, or worker processes with ``decode_isolation=process``, that decode and
    preprocess FITS files off the event loop (count); 0 means one per available core. With
    ``decode_isolation=thread`` use 1: astropy holds the GIL, and a second thread only
    contends with the event loop (docs/performance.md)."""

    decode_isolation: Literal["process", "thread"] = "process"
    """Where FITS files are decoded: ``process`` runs them in worker processes, so a crash in
    astropy's native code (tile decompression, wcslib) loses one file, not the server (plain
    float cubes, read without astropy, stay in this process's threads); ``thread`` runs them
    all in this process (no unit)."""

    decode_niceness: int = Field(default=0, ge=0, le=19)
    """Added to the nice value of the decode threads and worker processes (Linux; no unit).
    0, the default, leaves them at the server's priority: with one operator thread per
    model instance no operator waits for a slow thread, and single-cutout requests need
    their decoding as soon as it is ready (docs/performance.md). A higher value makes
    decoding yield the cores to onnxruntime, e.g. with ``intra_op_threads`` above 1."""

    decode_worker_max_bytes: int = Field(default=2 * 1024 * MiB, ge=256 * MiB)
    """Address-space limit of each decode worker process; past it the file fails with a
    400 (bytes)."""

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

    max_queue_wait_s: float = Field(default=2.0, gt=0.0, le=3600.0)
    """Admission deadline: a POST request under ``/v1`` or ``/v2`` is admitted while the
    expected wait of the work already admitted (its cutouts times the measured service time
    per cutout) stays under it, else refused with 503 ``overloaded`` before its body is read,
    with a ``Retry-After`` of that wait (seconds)."""

    refusal_delay_s: float = Field(default=0.25, ge=0.0, le=10.0)
    """How long an admission refusal waits before its 503 is sent. A client that retries
    at once otherwise sends thousands of requests a second that the event loop must read
    and refuse, which slows the admitted work, raises the measured service time and so
    refuses more; a sleeping refusal costs no CPU (seconds; 0 answers at once)."""

    max_body_bytes_in_flight: int = Field(default=256 * MiB, ge=1024)
    """Memory guard: most request-body bytes admitted at once, each request counted by its
    ``Content-Length`` or, without one, by ``max_body_bytes``; beyond it requests are refused
    with 503 ``overloaded`` before their body is read (bytes)."""

    max_concurrent_requests: int = Field(default=1024, ge=1)
    """POST requests under ``/v1`` and ``/v2`` handled at once; more are refused with 503
    ``overloaded`` before their body is read. A backstop for the connections a process
    holds: the queue-wait deadline limits work, ``max_body_bytes_in_flight`` memory
    (requests)."""

    request_timeout_s: float = Field(default=60.0, gt=0.0, le=3600.0)
    """Longest time a request under ``/v1`` or ``/v2`` may take from its first byte to its
    answer: a body still arriving is then refused with 408, work still waiting with 503
    (seconds)."""

    shutdown_grace_s: float = Field(default=2.0, ge=0.0, le=300.0)
    """After SIGTERM, how long ``/health/ready`` answers 503 while requests are still
    accepted, so load balancers stop sending new ones before the port closes (seconds)."""

    drain_timeout_s: int = Field(default=30, ge=1, le=3600)
    """After the port closes, how long requests in flight may take to finish before the
    process exits anyway (seconds)."""

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    """Keys that open ``/v1/*`` and ``/v2/*`` (``Authorization: Bearer <key>`` or
    ``X-API-Key``), comma-separated or a JSON list; none means no key is needed (secrets)."""

    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Browser origins allowed to call the API cross-origin, comma-separated or a JSON
    list; none by default (origins, e.g. ``https://lenses.example.org``)."""

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        """Accept ``a,b`` as well as ``["a", "b"]`` from the environment."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for key in keys:
            # The value itself never goes into the message: it is a secret.
            if len(key.get_secret_value()) < 16 or not key.get_secret_value().isprintable():
                raise ValueError("every API key must be at least 16 printable characters")
        return keys

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
        if self.max_body_bytes_in_flight < self.max_body_bytes:
            raise ValueError(
                f"max_body_bytes_in_flight ({self.max_body_bytes_in_flight}) is smaller than "
                f"max_body_bytes ({self.max_body_bytes}): the largest body could never be admitted"
            )
        if self.max_queue_cutouts < self.max_batch_size:
            raise ValueError(
                f"max_queue_cutouts ({self.max_queue_cutouts}) is smaller than "
                f"max_batch_size ({self.max_batch_size})"
            )
        return self

    @property
    def resolved_model_instances(self) -> int:
        """Concurrent batches after resolving 0 to two, or one on a single core (count)."""
        return self.model_instances or min(2, available_cores())

    @property
    def resolved_intra_op_threads(self) -> int:
        """onnxruntime intra-op threads after resolving 0 to the cores per instance (count)."""
        return self.intra_op_threads or max(1, available_cores() // self.resolved_model_instances)

    @property
    def fits_limits(self) -> FitsLimits:
        """The limits every FITS file is decoded under, from the four ``max_*`` fields above."""
        return FitsLimits(
            max_decompressed_bytes=self.max_decompressed_bytes,
            max_pixels=self.max_pixels,
            max_header_cards=self.max_header_cards,
            max_masked_fraction=self.max_masked_fraction,
        )

    @property
    def resolved_decode_threads(self) -> int:
        """Decode threads after resolving 0 to the available cores (count)."""
        return self.decode_threads or available_cores()
