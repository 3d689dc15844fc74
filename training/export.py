"""Export trained Keras models to ONNX (tf2onnx) with a JSON model card each.

The card is the contract with the service: input name, shape, dtype, bands,
pixel scale and preprocessing id; outputs with meaning and units; training
data; metrics; the ONNX file name and its sha256. Each card is built as the
service's :class:`~service.contract.cards.ModelCard`, so a card the service
would refuse is never written.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import keras
import onnx
import tensorflow as tf
import tf2onnx

from service.contract.cards import FEATURES_OUTPUT, ModelCard, dump_model_card, read_model_card
from service.contract.preprocessing import PREPROCESSING_ID
from training.config import BANDS, PIXEL_SCALE_ARCSEC
from training.evaluate import METRICS_FILE, PLOT_FILES
from training.models import (
    PARAMETER_NAMES,
    average_parameters_over_views,
    build_mc_sampler,
    mc_trunk_and_head,
    regressor_point_head,
    rotated_views,
)
from training.symmetry import ROTATIONS
from training.train import RUN_FILES, TRAINING_SUMMARY

MODEL_VERSION = "2.4.0"
ONNX_OPSET = 17

_PARAMETERS_OUTPUT = {
    "name": "parameters",
    "shape": [None, len(PARAMETER_NAMES)],
    "dtype": "float32",
    "meaning": "deflector mass parameters (point estimates, averaged over the cutout's "
    "rotations by 90 degrees), in the order of components",
    "components": list(PARAMETER_NAMES),
    "units": ["arcsec", "", "", "arcsec", "arcsec"],
}

_OUTPUTS = {
    "lens_classifier": [
        {
            "name": "lens_probability",
            "shape": [None, 1],
            "dtype": "float32",
            "meaning": "probability that the cutout is a strong gravitational lens",
            "unit": "probability",
        },
        {
            "name": FEATURES_OUTPUT,
            "shape": [None, None],
            "dtype": "float32",
            "meaning": "the classifier trunk's feature vector (input of its logit layer), "
            "for the out-of-distribution score (service.contract.ood)",
            "unit": "",
        },
    ],
    "einstein_radius": [_PARAMETERS_OUTPUT],
    "einstein_radius_mc": [
        {
            "name": "theta_E_samples",
            "shape": [None, None],
            "dtype": "float32",
            "meaning": "theta_E mean of each MC-dropout pass (batch, num_samples); "
            "pass t sees the cutout rotated by (t mod theta_E_views) x 90 degrees",
            "unit": "arcsec",
        },
        {
            "name": "theta_E_log_variance_samples",
            "shape": [None, None],
            "dtype": "float32",
            "meaning": "aleatoric log-variance of theta_E for each pass (calibrated)",
            "unit": "log(arcsec^2)",
        },
        {
            **_PARAMETERS_OUTPUT,
            "meaning": "the einstein_radius point estimates, from the same trunk passes "
            "(deterministic; equal to einstein_radius.onnx), in the order of components",
        },
    ],
}

_EXTRA_INPUTS = {
    "einstein_radius_mc": [
        {
            "name": "num_samples",
            "shape": [],
            "dtype": "int32",
            "meaning": "MC-dropout passes per cutout (one trunk pass per view, T head passes)",
        }
    ],
}

THETA_E_MODELS = ("einstein_radius", "einstein_radius_mc")
"""The models whose graphs average over the cutout's rotations."""

_DESCRIPTIONS = {
    "lens_classifier": "CNN lens finder: P(strong lens) for a g, r, i DES-like cutout.",
    "einstein_radius": "CNN regressor of the deflector's Einstein radius, ellipticity and centre "
    "(Hezaveh et al. 2017), trained on lenses only.",
    "einstein_radius_mc": "Heteroscedastic MC-dropout model of theta_E "
    "(Perreault Levasseur et al. 2017): "
    "each pass returns a mean and log-variance; the predictive distribution is "
    "their equal-weight Gaussian mixture.",
}


def _check_shared_trunk(trunk: keras.Model, regressor: keras.Model) -> None:
    """Refuse to pair the regressor's head with a trunk other than the one it was trained on."""
    own = regressor.get_layer("einstein_radius_trunk").get_weights()
    same = len(own) == len(trunk.get_weights()) and all(
        a.shape == b.shape and (a == b).all() for a, b in zip(own, trunk.get_weights(), strict=True)
    )
    if not same:
        raise ValueError(
            "the MC model's trunk differs from the einstein_radius trunk; the MC graph "
            "cannot give the regressor's point estimates (retrain the MC head on this regressor)"
        )


def _function_for(
    name: str, model: keras.Model, *, regressor: keras.Model | None = None, views: int = ROTATIONS
):
    """The tf.function exported for each model, with named inputs and outputs.

    The MC graph needs ``regressor``: it also outputs the regressor's point
    estimates from its trunk passes (the trunk the MC head was trained on).
    The theta_E graphs see each cutout in ``views`` rotations by 90 degrees
    (:mod:`training.symmetry`); the classifier sees it once.
    """
    image_spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="image")
    if name == "einstein_radius_mc":
        if regressor is None:
            raise ValueError("exporting einstein_radius_mc needs the einstein_radius model")
        trunk, head = mc_trunk_and_head(model)
        _check_shared_trunk(trunk, regressor)
        return build_mc_sampler(
            trunk,
            head,
            tuple(model.input_shape[1:]),
            point_head=regressor_point_head(regressor),
            views=views,
        )
    if name == "lens_classifier":
        return _classifier_with_features(model, image_spec)
    output_name = _OUTPUTS[name][0]["name"]

    @tf.function(input_signature=[image_spec])
    def predict(image):
        per_view = model(rotated_views(image, views), training=False)
        return tf.identity(average_parameters_over_views(per_view, views), name=output_name)

    return predict


def _classifier_with_features(model: keras.Model, image_spec: tf.TensorSpec):
    """The classifier's probability and its trunk's feature vector, from one trunk pass.

    The head after the trunk is dropout (off at inference), the logit layer and a
    sigmoid (:func:`training.models.build_lens_classifier`); it is applied here to
    the trunk's output so the graph computes the trunk once.
    """
    trunk = model.get_layer("lens_classifier_trunk")
    logit_layer = model.get_layer("lens_classifier_logit")

    @tf.function(input_signature=[image_spec])
    def predict(image):
        features = trunk(image, training=False)
        probability = tf.sigmoid(logit_layer(features))
        return (
            tf.identity(probability, name="lens_probability"),
            tf.identity(features, name=FEATURES_OUTPUT),
        )

    return predict


def _rename_outputs(proto: onnx.ModelProto, names: list[str]) -> None:
    """Give the graph outputs stable names (tf2onnx names them after TF tensors)."""
    for output, new in zip(proto.graph.output, names, strict=True):
        old = output.name
        for node in proto.graph.node:
            node.output[:] = [new if o == old else o for o in node.output]
            node.input[:] = [new if i == old else i for i in node.input]
        output.name = new


def _unseed_random_nodes(proto: onnx.ModelProto) -> None:
    """Drop the ``seed`` tf2onnx writes on random nodes.

    With a fixed seed attribute every session draws the same dropout masks and
    ``onnxruntime.set_seed`` cannot reach them; without it the masks come from
    onnxruntime's global generator, so a request's ``seed`` makes draws
    reproducible and unseeded runs differ.
    """
    for node in proto.graph.node:
        if node.op_type.startswith("RandomUniform") or node.op_type.startswith("RandomNormal"):
            kept = [a for a in node.attribute if a.name != "seed"]
            del node.attribute[:]
            node.attribute.extend(kept)


def export_onnx(
    name: str,
    model: keras.Model,
    path: Path,
    *,
    regressor: keras.Model | None = None,
    views: int = ROTATIONS,
) -> None:
    """Convert one model with tf2onnx and write it to ``path`` (MC needs ``regressor``)."""
    function = _function_for(name, model, regressor=regressor, views=views)
    proto, _ = tf2onnx.convert.from_function(
        function, input_signature=function.input_signature, opset=ONNX_OPSET
    )
    _rename_outputs(proto, [o["name"] for o in _OUTPUTS[name]])
    _unseed_random_nodes(proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def reexport_classifier(models_dir: Path) -> Path:
    """Re-export ``models_dir``'s classifier from its ``.keras`` file with the ``features`` output.

    For models exported before the classifier had a second output: the ONNX file is
    rewritten, and its card gets the new output list and sha256; everything else in
    the card (version, metrics, training) is kept. Returns the card's path.
    """
    name = "lens_classifier"
    card_path = models_dir / f"{name}.json"
    card = json.loads(card_path.read_text())
    read_model_card(card_path)  # refuse to rewrite a card the service would not read
    model = keras.saving.load_model(models_dir / card["keras_file"], compile=False)
    onnx_path = models_dir / card["onnx_file"]
    export_onnx(name, model, onnx_path)
    # Updated in place, so that the card keeps its key order and the diff shows what changed.
    card.update(outputs=_OUTPUTS[name], onnx_sha256=sha256_of(onnx_path))
    ModelCard.model_validate(card)
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return card_path


def reexport_theta_e_models(models_dir: Path, *, views: int, version: str) -> list[Path]:
    """Re-export ``models_dir``'s theta_E graphs from their ``.keras`` files, ``views`` rotations.

    The weights stay; the ONNX files, and in the cards the version, outputs,
    ``theta_E_views`` and sha256, change. The MC card's intervals were fitted
    on the old graph: refit them (``calibrate-regimes``) before serving.
    Returns the cards' paths.
    """
    cards = []
    regressor = keras.saving.load_model(models_dir / RUN_FILES["einstein_radius"], compile=False)
    for name in THETA_E_MODELS:
        card_path = models_dir / f"{name}.json"
        read_model_card(card_path)  # refuse to rewrite a card the service would not read
        card = json.loads(card_path.read_text())
        model = keras.saving.load_model(models_dir / card["keras_file"], compile=False)
        onnx_path = models_dir / card["onnx_file"]
        export_onnx(name, model, onnx_path, regressor=regressor, views=views)
        card.update(
            version=version,
            extra_inputs=_EXTRA_INPUTS.get(name, []),
            outputs=_OUTPUTS[name],
            theta_E_views=views,
            onnx_sha256=sha256_of(onnx_path),
        )
        ModelCard.model_validate(card)
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        cards.append(card_path)
    return cards


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _training_data(data_dirs: list[Path]) -> dict:
    described = {}
    for data_dir in data_dirs:
        config_file = data_dir / "simulation.json"
        if config_file.exists():
            config = json.loads(config_file.read_text())
            described[data_dir.name] = {
                "simulator": "training.simulate (lenstronomy)",
                "n_cutouts": config["n_cutouts"],
                "seed": config["seed"],
                "config": config,
            }
    return described


def model_card(
    name: str,
    model: keras.Model,
    *,
    onnx_path: Path,
    keras_file: str,
    metrics: dict,
    training: dict,
    data_dirs: list[Path],
    version: str = MODEL_VERSION,
) -> ModelCard:
    """The card of model ``name``, validated by the schema the service reads cards with.

    Keys beyond the schema's fields (``training``, ``training_data``,
    ``keras_file``, the MC model's ``default_num_samples`` and
    ``aleatoric_calibration_factor``) are kept as the card's extra fields.
    """
    card = {
        "name": name,
        "version": version,
        "description": _DESCRIPTIONS[name],
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "input": {
            "name": "image",
            "shape": [None, *model.input_shape[1:]],
            "dtype": "float32",
            "layout": "NHWC",
            "bands": list(BANDS),
            "pixel_scale_arcsec": PIXEL_SCALE_ARCSEC,
            "preprocessing": PREPROCESSING_ID,
        },
        "extra_inputs": _EXTRA_INPUTS.get(name, []),
        "outputs": _OUTPUTS[name],
        "training": training,
        "training_data": _training_data(data_dirs),
        "metrics": metrics.get(name, {}),
        "onnx_file": onnx_path.name,
        "onnx_sha256": sha256_of(onnx_path),
        "onnx_opset": ONNX_OPSET,
        "keras_file": keras_file,
    }
    if name in THETA_E_MODELS:
        card["theta_E_views"] = ROTATIONS
    if name == "einstein_radius_mc":
        card["default_num_samples"] = int(training.get("model_config", {}).get("mc_samples", 100))
        card["aleatoric_calibration_factor"] = training.get("aleatoric_calibration_factor")
        if training.get("interval_calibration") is not None:
            card["interval_calibration"] = training["interval_calibration"]
    return ModelCard.model_validate(card)


def export_all(
    runs_dir: Path,
    models_dir: Path,
    *,
    data_dirs: list[Path],
    names: tuple[str, ...] = tuple(RUN_FILES),
    version: str | None = None,
) -> list[Path]:
    """Write ``<name>.onnx``, ``<name>.keras`` and ``<name>.json`` for each of ``names``.

    A subset replaces those models and leaves the others' files as they are (a
    classifier-only round gives the classifier a new ``version``, not the others).
    ``version`` None: :data:`MODEL_VERSION`.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = runs_dir / METRICS_FILE
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    summary_file = runs_dir / TRAINING_SUMMARY
    training = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    cards = []
    regressor = keras.saving.load_model(runs_dir / RUN_FILES["einstein_radius"], compile=False)
    for name in names:
        keras_file = RUN_FILES[name]
        model = keras.saving.load_model(runs_dir / keras_file, compile=False)
        onnx_path = models_dir / f"{name}.onnx"
        export_onnx(name, model, onnx_path, regressor=regressor)
        # Re-saved uncompiled: the shipped file carries weights, not optimizer state.
        model.save(models_dir / keras_file)
        card = model_card(
            name,
            model,
            onnx_path=onnx_path,
            keras_file=keras_file,
            metrics=metrics,
            training=training,
            data_dirs=data_dirs,
            version=version or MODEL_VERSION,
        )
        card_path = models_dir / f"{name}.json"
        card_path.write_text(dump_model_card(card))
        cards.append(card_path)
        for plot in PLOT_FILES[name]:
            if (runs_dir / plot).exists():
                shutil.copyfile(runs_dir / plot, models_dir / plot)
    return cards
