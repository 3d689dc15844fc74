"""The MC graph run over a set batch by batch, as the service runs it.

``training report`` and ``training ood-evaluate`` both need, per cutout, the T
passes (theta_E mean and log-variance), the regressor's point theta_E (from the
MC graph's ``parameters`` output, or from the regressor when an older MC graph
lacks it) and the signal-to-noise: the last two place a cutout in the MC card's
per-regime table, as :func:`service.core.inference._summarise` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from service.contract.cards import (
    MC_NAME,
    MC_PARAMETERS_OUTPUT,
    NUM_SAMPLES_INPUT,
    REGRESSOR_NAME,
    ModelSet,
)
from service.contract.preprocessing import signal_to_noise

_PASS_OUTPUTS = ["theta_E_samples", "theta_E_log_variance_samples"]


@dataclass(frozen=True)
class McPasses:
    """The MC model's passes over some cutouts, and what places each in a regime."""

    means: NDArray[np.float32]
    """(n, T) theta_E of each pass (arcsec)."""
    log_variances: NDArray[np.float32]
    point_theta_E: NDArray[np.float64]
    """(n,) the regressor's point theta_E (arcsec)."""
    signal_to_noise: NDArray[np.float64]

    @classmethod
    def concatenate(cls, parts: list[McPasses]) -> McPasses:
        return cls(*(np.concatenate(column) for column in zip(*map(_fields, parts), strict=True)))


def _fields(passes: McPasses) -> tuple[NDArray, ...]:
    return passes.means, passes.log_variances, passes.point_theta_E, passes.signal_to_noise


def cpu_session(onnx_bytes: bytes, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session with ``threads`` intra-op threads (None: every core)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


class McRunner:
    """The MC graph (and the regressor when that graph lacks the point output) on batches.

    Create it after ``onnxruntime.set_seed`` for reproducible dropout masks.
    """

    def __init__(self, models: ModelSet, *, num_samples: int, threads: int | None = None):
        self._mc = cpu_session(models.onnx_bytes[MC_NAME], threads)
        self._regressor = (
            None
            if models.mc_gives_parameters
            else cpu_session(models.onnx_bytes[REGRESSOR_NAME], threads)
        )
        self._feeds = {NUM_SAMPLES_INPUT: np.asarray(num_samples, dtype=np.int32)}

    def run(self, images: NDArray[np.float32]) -> McPasses:
        """The passes over preprocessed ``images`` (n, 64, 64, 3)."""
        outputs = _PASS_OUTPUTS if self._regressor else [*_PASS_OUTPUTS, MC_PARAMETERS_OUTPUT]
        values = self._mc.run(outputs, {"image": images, **self._feeds})
        if self._regressor is None:
            means, log_variances, parameters = values
        else:
            means, log_variances = values
            (parameters,) = self._regressor.run(None, {"image": images})
        return McPasses(
            means,
            log_variances,
            np.asarray(parameters, dtype=np.float64)[:, 0],
            np.asarray(signal_to_noise(images), dtype=np.float64),
        )
