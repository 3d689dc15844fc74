"""Continue training a run's models on more simulated data, then rebuild its MC model.

Resumes the regressor (and, with ``classifier_epochs``, the classifier) on
another simulated set at a low learning rate, on any backend, CPU included:
the way to teach shipped models new populations (stars, quasars, artefacts)
without training from scratch. The MC head is retrained on the new trunk and
recalibrated, because the MC model must share the regressor's trunk exactly;
with ``classifier_epochs=0`` the classifier is copied unchanged, and with
``epochs=0`` the regressor and the MC model are (a classifier-only round).

``runs_in`` is a training run (``training.json`` beside the .keras files) or a
``models/`` folder, whose MC card carries the same training summary.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import keras

from training.config import PRESETS, ModelConfig, TrainingConfig
from training.train import (
    RUN_FILES,
    TRAINING_SUMMARY,
    Split,
    fit_classifier,
    fit_regressor,
    split_for_training,
    train_mc_model,
)

#: The card whose ``training`` entry is the run summary, when resuming from ``models/``.
_SUMMARY_CARD = "einstein_radius_mc.json"


def load_run_summary(runs_in: Path) -> dict:
    """The training summary of a run folder, or of a ``models/`` folder (from its MC card)."""
    if (runs_in / TRAINING_SUMMARY).exists():
        return json.loads((runs_in / TRAINING_SUMMARY).read_text())
    return dict(json.loads((runs_in / _SUMMARY_CARD).read_text())["training"])


def finetune_run(
    runs_in: Path,
    data_dir: Path,
    runs_out: Path,
    *,
    epochs: int,
    learning_rate: float,
    preset: str = "gpu",
    ema_momentum: float | None = None,
    classifier_epochs: int = 0,
    classifier_learning_rate: float = 3e-4,
) -> dict:
    """Resume ``runs_in``'s models on ``data_dir``; write all three models to ``runs_out``."""
    summary = load_run_summary(runs_in)
    model_config = ModelConfig.from_dict(summary["model_config"])
    # Augmentation threads: the preset's count is for 16 cores; more than the cores only contend.
    config = replace(
        PRESETS[preset][1],
        warmup_epochs=0,
        loader_workers=min(PRESETS[preset][1].loader_workers, os.cpu_count() or 1),
    )
    keras.utils.set_random_seed(config.seed + 10)
    runs_out.mkdir(parents=True, exist_ok=True)
    train, valid, lenses_train, lenses_valid = split_for_training(data_dir, config)

    if epochs > 0:
        summary.update(
            _finetune_regressor_and_mc(
                runs_in,
                runs_out,
                lenses_train,
                lenses_valid,
                model_config,
                config,
                epochs=epochs,
                learning_rate=learning_rate,
                ema_momentum=ema_momentum,
                data_dir=data_dir,
            )
        )
    else:
        for name in ("einstein_radius", "einstein_radius_mc"):
            shutil.copy(runs_in / RUN_FILES[name], runs_out / RUN_FILES[name])
    if classifier_epochs > 0:
        summary.update(
            _finetune_classifier(
                runs_in,
                runs_out,
                train,
                valid,
                config,
                epochs=classifier_epochs,
                learning_rate=classifier_learning_rate,
                ema_momentum=ema_momentum,
                data_dir=data_dir,
            )
        )
    else:
        shutil.copy(runs_in / RUN_FILES["lens_classifier"], runs_out / RUN_FILES["lens_classifier"])
    (runs_out / TRAINING_SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary


def _round_record(
    runs_in: Path, data_dir: Path, epochs: int, learning_rate: float, ema_momentum: float | None
) -> dict:
    """What every fine-tuning round records of its start, data and schedule."""
    return {
        "from_runs": str(runs_in),
        "data_dir": str(data_dir),
        "epochs": epochs,
        "peak_learning_rate": learning_rate,
        "ema_momentum": ema_momentum,
    }


def _finetune_classifier(
    runs_in: Path,
    runs_out: Path,
    train: Split,
    valid: Split,
    config: TrainingConfig,
    *,
    epochs: int,
    learning_rate: float,
    ema_momentum: float | None,
    data_dir: Path,
) -> dict:
    """Resume the classifier on ``train``; returns the summary entry this adds."""
    classifier = keras.saving.load_model(runs_in / RUN_FILES["lens_classifier"], compile=False)
    history = fit_classifier(
        classifier,
        train,
        valid,
        config,
        epochs=epochs,
        peak_learning_rate=learning_rate,
        seed=config.seed + 12,
        ema_momentum=ema_momentum,
    )
    classifier.save(runs_out / RUN_FILES["lens_classifier"])
    return {
        "fine_tuned_classifier": {
            **_round_record(runs_in, data_dir, epochs, learning_rate, ema_momentum),
            "n_train": int(len(train.images)),
            "val_loss": [float(v) for v in history.history["val_loss"]],
            "val_auroc": [float(v) for v in history.history["val_auroc"]],
        }
    }


def _finetune_regressor_and_mc(
    runs_in: Path,
    runs_out: Path,
    lenses_train: Split,
    lenses_valid: Split,
    model_config: ModelConfig,
    config: TrainingConfig,
    *,
    epochs: int,
    learning_rate: float,
    ema_momentum: float | None,
    data_dir: Path,
) -> dict:
    """Resume the regressor, then retrain and recalibrate the MC head on its new trunk.

    Returns the summary entries this changes.
    """
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
    mc_model, scale = train_mc_model(regressor, lenses_train, lenses_valid, model_config, config)
    mc_model.save(runs_out / RUN_FILES["einstein_radius_mc"])
    return {
        "aleatoric_calibration_factor": scale,
        "fine_tuned_regressor": {
            **_round_record(runs_in, data_dir, epochs, learning_rate, ema_momentum),
            "n_train_lenses": int(len(lenses_train.images)),
            "val_loss": [float(v) for v in history.history["val_loss"]],
            "mc_head": "retrained on the fine-tuned trunk and recalibrated",
        },
    }
