"""Row (e) of ``lensserve bench``: the ``.keras`` models, one ``model.predict`` per cutout.

This is what a user without lensserve would write, and the only place in
``service/`` that touches TensorFlow: it is imported by :func:`service.bench.run.run_bench`
only when that row runs, and needs the ``bench`` extra (``pip install -e '.[bench]'``).
Serving never imports it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from service.contract.cards import read_model_cards
from service.core.inference import prepare_cutout
from service.fits.raw import DEFAULT_LIMITS


def _keras_file_and_views(models_dir: Path, name: str) -> tuple[str, int]:
    """The card's ``keras_file`` and ``theta_E_views`` (1 when absent), which the service's
    card schema does not keep."""
    card = json.loads((models_dir / f"{name}.json").read_text(encoding="utf-8"))
    return str(card.get("keras_file", f"{name}.keras")), int(card.get("theta_E_views", 1))


def measure_keras_per_cutout(models_dir: Path, files: Sequence[bytes]) -> float:
    """Cutouts/s of decode + three ``model.predict`` calls per cutout (a batch of its views).

    Parameters
    ----------
    models_dir : Path
        Folder with the cards and the ``<name>.keras`` files next to the ONNX ones.
    files : sequence of bytes
        FITS cutouts, each handled as its own request.
    """
    try:
        import keras

        import training  # noqa: F401  (registers the custom layers the .keras files use)
    except ImportError as exc:
        raise RuntimeError(
            "row (e) needs TensorFlow and Keras: pip install -e '.[bench]' "
            "(or run lensserve bench --keras-cutouts 0 to skip it)"
        ) from exc
    models = read_model_cards(models_dir)
    nets = []
    for name in models.cards:
        keras_file, views = _keras_file_and_views(models_dir, name)
        nets.append((keras.saving.load_model(models_dir / keras_file, compile=False), views))

    def answer(data: bytes) -> None:
        cutout = prepare_cutout(data, filename="x.fits", models=models, limits=DEFAULT_LIMITS)
        for net, views in nets:
            # The same answer as the ONNX graph: the theta_E models see the cutout's rotations.
            net.predict(np.stack([np.rot90(cutout.image, k) for k in range(views)]), verbose=0)

    answer(files[0])  # the first predict builds TensorFlow's graph; a user pays it once
    started = time.perf_counter()
    for data in files:
        answer(data)
    return len(files) / (time.perf_counter() - started)
