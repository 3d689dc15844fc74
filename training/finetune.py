"""Continue training a run's regressor on more simulated data, then rebuild its MC model.

The regressor's validation loss was still falling when a GPU run ended; this
resumes it on another simulated set at a low learning rate (on any backend,
CPU included). The MC head is retrained on the new trunk and recalibrated,
because the MC model must share the regressor's trunk exactly; the classifier
is copied unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import keras

from training.config import PRESETS, ModelConfig
from training.train import (
    RUN_FILES,
    TRAINING_SUMMARY,
    fit_regressor,
    split_for_training,
    train_mc_model,
)


def finetune_regressor(
    runs_in: Path,
    data_dir: Path,
    runs_out: Path,
    *,
    epochs: int,
    learning_rate: float,
    preset: str = "gpu",
    ema_momentum: float | None = None,
) -> dict:
    """Resume ``runs_in``'s regressor on ``data_dir``; write all three models to ``runs_out``."""
    summary = json.loads((runs_in / TRAINING_SUMMARY).read_text())
    model_config = ModelConfig.from_dict(summary["model_config"])
    # Augmentation threads: the preset's count is for 16 cores; more than the cores only contend.
    config = replace(
        PRESETS[preset][1],
        warmup_epochs=0,
        loader_workers=min(PRESETS[preset][1].loader_workers, os.cpu_count() or 1),
    )
    keras.utils.set_random_seed(config.seed + 10)
    runs_out.mkdir(parents=True, exist_ok=True)
    _, _, lenses_train, lenses_valid = split_for_training(data_dir, config)

    regressor = keras.saving.load_model(runs_in / RUN_FILES["einstein_radius"], compile=False)
    history = fit_regressor(
        regressor,
        lenses_train,
        lenses_valid,
        config,
        epochs=epochs,
        peak_learning_rate=learning_rate,
        seed=config.seed + 11,
        ema_momentum=ema_momentum,
    )
    regressor.save(runs_out / RUN_FILES["einstein_radius"])
    shutil.copy(runs_in / RUN_FILES["lens_classifier"], runs_out / RUN_FILES["lens_classifier"])
    mc_model, scale = train_mc_model(regressor, lenses_train, lenses_valid, model_config, config)
    mc_model.save(runs_out / RUN_FILES["einstein_radius_mc"])

    summary["aleatoric_calibration_factor"] = scale
    summary["fine_tuned_regressor"] = {
        "from_runs": str(runs_in),
        "data_dir": str(data_dir),
        "epochs": epochs,
        "peak_learning_rate": learning_rate,
        "ema_momentum": ema_momentum,
        "n_train_lenses": int(len(lenses_train.images)),
        "val_loss": [float(v) for v in history.history["val_loss"]],
        "mc_head": "retrained on the fine-tuned trunk and recalibrated",
    }
    (runs_out / TRAINING_SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary
