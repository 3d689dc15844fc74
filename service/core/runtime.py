"""onnxruntime sessions for the three shipped models, behind a load/predict/close protocol.

Provider choice
    ``device="cpu"`` never asks for CUDA. ``device="cuda"`` requires
    onnxruntime's ``CUDAExecutionProvider`` and refuses to start without it.
    ``device="auto"`` asks for CUDA only when onnxruntime lists it among its
    available providers *and* a session created with it really runs on it
    (onnxruntime silently falls back to CPU when the CUDA or cuDNN libraries
    cannot be loaded); otherwise it uses the CPU. One log line names the
    provider in use.

Reproducible Monte Carlo dropout
    The MC graph draws its dropout masks with ``RandomUniformLike`` nodes that
    carry no ``seed`` attribute. onnxruntime seeds such a node's generator from
    the process-wide value of :func:`onnxruntime.set_seed` when the session is
    created, and the generator then advances with every call. A request with a
    ``seed`` therefore gets a fresh MC session, created under a lock right
    after ``set_seed(seed)``, and runs alone on it: the same request with the
    same seed gives the same dropout masks. Requests without a seed share one
    long-lived MC session seeded from the operating system's entropy at load.

    This only works when the exported graph leaves out the ``seed`` attribute:
    tf2onnx writes ``seed=0.0`` on the ``RandomUniformLike`` nodes of a Keras
    dropout layer, and onnxruntime then starts every new session from that
    fixed seed, whatever :func:`onnxruntime.set_seed` says. :meth:`load` probes
    this (two sessions, two seeds, one input) and logs a warning when the seed
    has no effect; seeded requests then stay reproducible, but every seed gives
    the same dropout masks (the predictive draws still follow the seed).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from service.contract.cards import (
    CLASSIFIER_NAME,
    FEATURES_OUTPUT,
    MC_NAME,
    MC_PARAMETERS_OUTPUT,
    NUM_SAMPLES_INPUT,
    REGRESSOR_NAME,
    REQUIRED_OUTPUTS,
    SEEING_OUTPUT,
    ModelSet,
    read_model_cards,
)
from service.core.cpu import available_cores
from service.errors import InferenceError, ModelUnavailableError

logger = logging.getLogger("lensserve.runtime")

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

Device = Literal["auto", "cpu", "cuda"]

#: Largest seed onnxruntime's ``set_seed`` accepts (a signed 64-bit integer).
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class RawPredictions:
    """What the three models return for a batch of n cutouts."""

    lens_probability: NDArray[np.float32]
    """Shape (n,): probability (0-1) that each cutout is a strong lens."""
    parameters: NDArray[np.float32]
    """Shape (n, 5): theta_E (arcsec), e1, e2, center_x, center_y (arcsec)."""
    theta_E_samples: NDArray[np.float32]
    """Shape (n, T): theta_E mean of each MC-dropout pass (arcsec)."""
    theta_E_log_variance_samples: NDArray[np.float32]
    """Shape (n, T): aleatoric log-variance of each pass (log arcsec^2)."""
    features: NDArray[np.float32] | None = None
    """Shape (n, F): the classifier trunk's features, when its card lists them."""
    seeing: NDArray[np.float32] | None = None
    """Shape (n, bands): estimated seeing FWHM (log10 arcsec), when the card lists it."""

    def __len__(self) -> int:
        return int(self.lens_probability.shape[0])

    def select(
        self, rows: slice | NDArray[np.integer], *, num_samples: int | None = None
    ) -> RawPredictions:
        """The predictions of some cutouts (a slice or row indices), keeping the first
        ``num_samples`` passes.

        Dropout passes are independent and identically distributed, so the
        first T of a larger set of passes are a valid set of T passes.
        """
        columns = slice(None, num_samples)
        return RawPredictions(
            lens_probability=self.lens_probability[rows],
            parameters=self.parameters[rows],
            theta_E_samples=self.theta_E_samples[rows, columns],
            theta_E_log_variance_samples=self.theta_E_log_variance_samples[rows, columns],
            features=None if self.features is None else self.features[rows],
            seeing=None if self.seeing is None else self.seeing[rows],
        )


def _rows_of(values: NDArray | None, n: int) -> NDArray[np.float32] | None:
    """An optional output as (n, k) float32 rows; None when the model does not give it."""
    return None if values is None else np.asarray(values, dtype=np.float32).reshape(n, -1)


class ModelRuntime(Protocol):
    """What the inference layer needs from a model runtime.

    ``predict`` may be called from several threads at once (``model_instances``).
    """

    @property
    def models(self) -> ModelSet:
        """The cards of the loaded models."""
        ...

    @property
    def provider(self) -> str:
        """Name of the execution provider in use."""
        ...

    def load(self) -> None:
        """Read the models, create the sessions and warm them up."""
        ...

    def predict(
        self, images: NDArray[np.float32], *, num_samples: int, seed: int | None = None
    ) -> RawPredictions:
        """Run the models (two or three calls) on a batch of preprocessed cutouts."""
        ...

    def run_model(
        self,
        name: str,
        feeds: Mapping[str, NDArray[Any]],
        *,
        seed: int | None = None,
        outputs: Sequence[str] | None = None,
    ) -> dict[str, NDArray[Any]]:
        """Run one model on ready-made input tensors; its ``outputs`` (None: every output),
        keyed by name."""
        ...

    def close(self) -> None:
        """Release the sessions."""
        ...


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers."""
    return list(ort.get_available_providers())


def _preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries of NVIDIA's pip packages (or PyTorch's), if any.

    ``onnxruntime-gpu[cuda,cudnn]`` installs them as ``nvidia-*`` wheels, which the
    dynamic loader does not search; ``preload_dlls`` (onnxruntime >= 1.21) loads them so
    the CUDA provider finds them without a system CUDA toolkit or ``LD_LIBRARY_PATH``.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # missing packages: the probe session then says what is wrong
        logger.info("onnxruntime.preload_dlls() did not load the CUDA libraries: %s", exc)


def choose_providers(device: Device, available: list[str]) -> list[str]:
    """Execution providers to request, most preferred first.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"}
        The configured device.
    available : list of str
        ``onnxruntime.get_available_providers()``.

    Raises
    ------
    ModelUnavailableError
        ``device="cuda"`` but onnxruntime offers no CUDA provider.
    """
    if device == "cpu":
        return [CPU_PROVIDER]
    if CUDA_PROVIDER in available:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    if device == "cuda":
        raise ModelUnavailableError(
            f"LENSSERVE_DEVICE=cuda, but this onnxruntime offers only {available}; install "
            "onnxruntime-gpu (pip install 'lensserve[gpu]') or set LENSSERVE_DEVICE=auto or cpu"
        )
    return [CPU_PROVIDER]


class OnnxModelRuntime:
    """The lens classifier, the point regressor and the MC-dropout model on onnxruntime.

    Parameters
    ----------
    models_dir : Path
        Folder with the ONNX files and their JSON cards.
    device : {"auto", "cpu", "cuda"}
        Where to run; see the module docstring.
    intra_op_threads : int
        Threads per operator (count); 0 means one per available core.
    warmup_batch_sizes : tuple of int
        Batch sizes (cutouts) run once each on blank inputs by :meth:`load`.
    warmup_samples : int
        MC-dropout passes per cutout during warm-up (samples).
    """

    def __init__(
        self,
        models_dir: Path,
        *,
        device: Device = "auto",
        intra_op_threads: int = 0,
        warmup_batch_sizes: tuple[int, ...] = (1,),
        warmup_samples: int = 100,
    ) -> None:
        self._models_dir = Path(models_dir)
        self._device: Device = device
        self._intra_op_threads = intra_op_threads or available_cores()
        self._warmup_batch_sizes = warmup_batch_sizes
        self._warmup_samples = warmup_samples
        self._models: ModelSet | None = None
        self._providers: list[str] = []
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._seed_controls_dropout = False
        # onnxruntime's seed is process-wide: creating a seeded session must not interleave
        # with another set_seed.
        self._seed_lock = threading.Lock()

    @property
    def models(self) -> ModelSet:
        """The verified cards of the loaded models."""
        if self._models is None:
            raise ModelUnavailableError("the models are not loaded yet")
        return self._models

    @property
    def provider(self) -> str:
        """Execution provider the sessions run on, e.g. ``CPUExecutionProvider``."""
        if not self._providers:
            raise ModelUnavailableError("the models are not loaded yet")
        return self._providers[0]

    @property
    def intra_op_threads(self) -> int:
        """Threads onnxruntime uses inside one operator (count)."""
        return self._intra_op_threads

    @property
    def seed_controls_dropout(self) -> bool:
        """Whether a request's seed changes the MC-dropout masks (see the module docstring)."""
        return self._seed_controls_dropout

    @property
    def loaded(self) -> bool:
        """Whether :meth:`load` has finished (sessions created and warmed up)."""
        return bool(self._sessions)

    def _session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._intra_op_threads
        # The three models run one after the other; parallelism lives inside operators.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning worker threads would keep every core busy between batches and starve the
        # threads that decode FITS files for the next batch.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Memory patterns keep a planned block per input shape; the dynamic batcher makes many
        # shapes and the theta_E graphs run four views of each batch, so they held ~40% of the
        # RSS (one classifier + MC pair at batch 64: 587 -> 362 MiB, cutouts/s within 1%).
        options.enable_mem_pattern = False
        options.log_severity_level = 3
        return options

    def _create_session(self, name: str, providers: list[str]) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(
                self.models.onnx_bytes[name],
                sess_options=self._session_options(),
                providers=providers,
            )
        except Exception as exc:  # onnxruntime raises its own pybind11 exception types
            raise ModelUnavailableError(
                f"onnxruntime could not load model {name!r} with {providers}: {exc}"
            ) from exc

    def _resolve_providers(self) -> list[str]:
        """Providers that really work here, probing CUDA with a real session."""
        available = available_providers()
        requested = choose_providers(self._device, available)
        if requested[0] != CUDA_PROVIDER:
            return requested
        _preload_cuda_libraries()
        try:
            probe = ort.InferenceSession(
                self.models.onnx_bytes[CLASSIFIER_NAME],
                sess_options=self._session_options(),
                providers=requested,
            )
            granted = probe.get_providers()
        except Exception as exc:  # a broken CUDA install raises from deep in onnxruntime
            granted, reason = [], str(exc)
        else:
            reason = f"onnxruntime granted only {granted}"
        if granted and granted[0] == CUDA_PROVIDER:
            return requested
        if self._device == "cuda":
            raise ModelUnavailableError(
                f"LENSSERVE_DEVICE=cuda, but no CUDA session could be created ({reason}); check "
                "that the CUDA and cuDNN libraries onnxruntime-gpu needs can be loaded"
            )
        logger.warning("CUDA provider listed but unusable (%s); falling back to CPU", reason)
        return [CPU_PROVIDER]

    def load(self) -> None:
        """Read and verify the cards, create the sessions and warm them up.

        Raises
        ------
        ModelUnavailableError
            A card or model is missing, corrupt or inconsistent, or the
            configured device cannot be used.
        """
        self._models = read_model_cards(self._models_dir)
        self._providers = self._resolve_providers()
        sessions = {
            name: self._create_session(name, self._providers)
            for name in (CLASSIFIER_NAME, REGRESSOR_NAME)
        }
        sessions[MC_NAME] = self._create_mc_session(seed=None)
        self._sessions = sessions
        self._seed_controls_dropout = self._probe_seed_control()
        if not self._seed_controls_dropout:
            logger.warning(
                "the dropout nodes of %r carry a fixed seed attribute, so onnxruntime.set_seed "
                "cannot change their masks: seeded requests are reproducible but every seed "
                "gives the same masks; export the model without the RandomUniformLike 'seed' "
                "attribute to fix this",
                MC_NAME,
            )
        logger.info(
            "onnxruntime %s: running on %s (LENSSERVE_DEVICE=%s, available: %s, "
            "intra-op threads: %d)",
            ort.__version__,
            self.provider,
            self._device,
            ", ".join(available_providers()),
            self._intra_op_threads,
        )
        self._warm_up()

    def _create_mc_session(self, *, seed: int | None) -> ort.InferenceSession:
        """A new MC session whose dropout generator starts from ``seed`` (fresh entropy if None)."""
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") & MAX_SEED
        with self._seed_lock:
            ort.set_seed(seed)
            return self._create_session(MC_NAME, self._providers)

    def _probe_seed_control(self) -> bool:
        """Whether two MC sessions created after different ``set_seed`` calls draw differently."""
        spec = self.models.input
        probe = np.random.default_rng(0).normal(0.0, 1.5, (1, *spec.image_shape)).astype(np.float32)
        feeds = {"image": probe, NUM_SAMPLES_INPUT: np.asarray(8, dtype=np.int32)}
        first, second = (
            self._run(self._create_mc_session(seed=seed), MC_NAME, feeds)[0] for seed in (1, 2)
        )
        return not np.array_equal(first, second)

    def _warm_up(self) -> None:
        spec = self.models.input
        for batch_size in self._warmup_batch_sizes:
            blank = np.zeros((batch_size, *spec.image_shape), dtype=np.float32)
            self.predict(blank, num_samples=self._warmup_samples)

    def _run(
        self,
        session: ort.InferenceSession,
        name: str,
        feeds: Mapping[str, NDArray[Any]],
        outputs: list[str] | None = None,
    ) -> list[NDArray[np.float32]]:
        """``outputs`` (names) in that order; None: every output, in graph order."""
        try:
            return session.run(outputs, feeds)
        except Exception as exc:  # onnxruntime raises its own pybind11 exception types
            raise InferenceError(
                f"model {name!r} failed on a batch of {len(feeds['image'])} cutouts: {exc}"
            ) from exc

    def predict(
        self, images: NDArray[np.float32], *, num_samples: int, seed: int | None = None
    ) -> RawPredictions:
        """Run the models on a batch of preprocessed cutouts.

        Two onnxruntime calls (classifier, MC graph) when the MC card lists the
        point ``parameters`` output; otherwise three (classifier, regressor, MC).

        Parameters
        ----------
        images : ndarray, shape (n, 64, 64, 3), float32
            Network inputs from :func:`service.contract.preprocessing.preprocess_batch`.
        num_samples : int
            MC-dropout passes per cutout, T (samples).
        seed : int or None
            Seed of the dropout masks (0 to 2**63 - 1); ``None`` draws from the
            shared, unseeded MC session. See the module docstring.

        Returns
        -------
        RawPredictions
            Arrays of length n (MC arrays of shape (n, T)).

        Raises
        ------
        ModelUnavailableError
            :meth:`load` has not run, or :meth:`close` has.
        InferenceError
            onnxruntime failed, or a model returned an unexpected shape.
        """
        if not self._sessions:
            raise ModelUnavailableError("the models are not loaded")
        expected = self.models.input.image_shape
        if images.ndim != 4 or images.shape[1:] != expected or images.dtype != np.float32:
            raise InferenceError(
                f"got a {images.dtype} batch of shape {images.shape}; the models take float32 "
                f"(n, {', '.join(map(str, expected))})"
            )
        if num_samples < 1:
            raise InferenceError(f"got num_samples={num_samples}; it must be at least 1")
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise InferenceError(f"got seed={seed}; seeds run from 0 to {MAX_SEED}")
        n = len(images)
        if n == 0:
            return RawPredictions(
                lens_probability=np.zeros(0, np.float32),
                parameters=np.zeros((0, 5), np.float32),
                theta_E_samples=np.zeros((0, num_samples), np.float32),
                theta_E_log_variance_samples=np.zeros((0, num_samples), np.float32),
            )
        images = np.ascontiguousarray(images)
        classifier_outputs = list(REQUIRED_OUTPUTS[CLASSIFIER_NAME])
        optional = [
            name
            for name in (FEATURES_OUTPUT, SEEING_OUTPUT)
            if name in self.models.classifier.output_names
        ]
        probability, *optional_values = self._run(
            self._sessions[CLASSIFIER_NAME],
            CLASSIFIER_NAME,
            {"image": images},
            [*classifier_outputs, *optional],
        )
        extra = dict(zip(optional, optional_values, strict=True))
        mc_session = self._sessions[MC_NAME] if seed is None else self._create_mc_session(seed=seed)
        mc_feeds = {"image": images, NUM_SAMPLES_INPUT: np.asarray(num_samples, dtype=np.int32)}
        mc_outputs = list(REQUIRED_OUTPUTS[MC_NAME])
        if self.models.mc_gives_parameters:
            # The same trunk passes give the distribution and the point estimates: two model
            # calls, not three (the regressor's session still serves the OIP endpoint).
            means, log_variances, parameters = self._run(
                mc_session, MC_NAME, mc_feeds, [*mc_outputs, MC_PARAMETERS_OUTPUT]
            )
        else:
            (parameters,) = self._run(
                self._sessions[REGRESSOR_NAME], REGRESSOR_NAME, {"image": images}
            )
            means, log_variances = self._run(mc_session, MC_NAME, mc_feeds, mc_outputs)
        result = RawPredictions(
            lens_probability=np.asarray(probability, dtype=np.float32).reshape(-1),
            parameters=np.asarray(parameters, dtype=np.float32),
            theta_E_samples=np.asarray(means, dtype=np.float32),
            theta_E_log_variance_samples=np.asarray(log_variances, dtype=np.float32),
            features=_rows_of(extra.get(FEATURES_OUTPUT), n),
            seeing=_rows_of(extra.get(SEEING_OUTPUT), n),
        )
        shapes = {
            "lens_probability": (result.lens_probability.shape, (n,)),
            "parameters": (result.parameters.shape, (n, 5)),
            "theta_E_samples": (result.theta_E_samples.shape, (n, num_samples)),
            "theta_E_log_variance_samples": (
                result.theta_E_log_variance_samples.shape,
                (n, num_samples),
            ),
        }
        for output, (got, want) in shapes.items():
            if got != want:
                raise InferenceError(f"output {output!r} has shape {got}; expected {want}")
        return result

    def run_model(
        self,
        name: str,
        feeds: Mapping[str, NDArray[Any]],
        *,
        seed: int | None = None,
        outputs: Sequence[str] | None = None,
    ) -> dict[str, NDArray[Any]]:
        """Run one model on ready-made input tensors (the Open Inference Protocol's view).

        Parameters
        ----------
        name : str
            A model name from the cards, e.g. ``lens_classifier``.
        feeds : mapping of str to ndarray
            Every input the model's card names, already checked against it:
            ``image`` of shape (n, 64, 64, 3) float32 in preprocessed units,
            and for the MC model ``num_samples`` (int32 scalar, samples).
        seed : int or None
            Seed of the MC model's dropout masks (0 to 2**63 - 1); ignored by
            the other models. See the module docstring.
        outputs : sequence of str or None
            The outputs wanted (names); onnxruntime runs only the nodes they need. None:
            every output.

        Returns
        -------
        dict of str to ndarray
            The outputs, keyed by their names.

        Raises
        ------
        ModelUnavailableError
            The models are not loaded, or ``name`` is not one of them.
        InferenceError
            onnxruntime failed on the inputs.
        """
        if not self._sessions:
            raise ModelUnavailableError("the models are not loaded")
        if name not in self._sessions:
            raise ModelUnavailableError(
                f"no model named {name!r}; loaded: {sorted(self._sessions)}"
            )
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise InferenceError(f"got seed={seed}; seeds run from 0 to {MAX_SEED}")
        session = self._sessions[name]
        if name == MC_NAME and seed is not None:
            session = self._create_mc_session(seed=seed)
        names = [o.name for o in session.get_outputs()] if outputs is None else list(outputs)
        values = self._run(session, name, feeds, names)
        return {output: np.asarray(value) for output, value in zip(names, values, strict=True)}

    def close(self) -> None:
        """Drop the sessions; :meth:`predict` raises until :meth:`load` runs again."""
        self._sessions = {}
