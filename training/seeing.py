"""A small network that estimates each band's seeing FWHM from a cutout, for the OOD score.

No statistic of the pixels measured the PSF where a cutout holds no point
source (docs/ood.md): a PSF twice as sharp or broad as DES's went unflagged.
The simulator knows each cutout's seeing, so a small convolutional network
learns it from the network input (the asinh-stretched cutout) and the score
gets a third term, the Mahalanobis distance of the estimates to the training
data's (:mod:`service.contract.ood`).

The network is grafted into the classifier's ONNX graph as the output
``psf_fwhm_log10_arcsec``: the service runs no extra session and the
classifier's own nodes stay bit for bit as they were.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import onnx
import tensorflow as tf
import tf2onnx
from keras import layers
from numpy.typing import NDArray

from service.contract.cards import CLASSIFIER_NAME, SEEING_OUTPUT, ModelCard, read_model_card
from service.contract.preprocessing import preprocess_batch
from training.dataset import Dataset, load_dataset
from training.export import ONNX_OPSET, sha256_of

BANDS = ("g", "r", "i")
#: The Keras source of the grafted network, next to the classifier's.
KERAS_FILE = "lens_classifier_seeing.keras"
_PREFIX = "seeing/"
_PREPROCESS_CHUNK = 2000


def seeing_targets(labels: dict[str, NDArray]) -> NDArray[np.float32]:
    """(n, 3) log10 of each band's seeing FWHM (arcsec) from a label table."""
    return np.log10(
        np.stack([labels[f"seeing_fwhm_arcsec_{band}"].astype(float) for band in BANDS], axis=1)
    ).astype(np.float32)


def network_inputs(images: NDArray[np.floating]) -> NDArray[np.float32]:
    """The service's preprocessing of (n, 3, 64, 64) cutouts, in chunks (memory)."""
    return np.concatenate(
        [
            preprocess_batch(images[start : start + _PREPROCESS_CHUNK])
            for start in range(0, len(images), _PREPROCESS_CHUNK)
        ]
    )


def build_seeing_estimator(
    input_shape: tuple[int, int, int], mean_log10_fwhm: NDArray
) -> keras.Model:
    """Five small convolutions, average and max pooling, two dense layers: ~30 M MAC a cutout.

    Full resolution first, since the PSF is a few pixels wide; max pooling keeps the
    sharpest object in the field, which bounds the PSF from above. The last bias starts
    at the training mean, so the network learns the deviations.
    """
    image = keras.Input(input_shape, name="image")
    h = layers.Conv2D(16, 3, padding="same", activation="relu")(image)
    h = layers.Conv2D(16, 3, padding="same", activation="relu")(h)
    h = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(h)
    h = layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(h)
    h = layers.Concatenate()([layers.GlobalAveragePooling2D()(h), layers.GlobalMaxPooling2D()(h)])
    h = layers.Dense(64, activation="relu")(h)
    out = layers.Dense(
        len(BANDS),
        bias_initializer=keras.initializers.Constant(np.asarray(mean_log10_fwhm, dtype=float)),
        name=SEEING_OUTPUT,
    )(h)
    return keras.Model(image, out, name="seeing_estimator")


def train_seeing_estimator(
    train_dirs: list[Path],
    val_dir: Path | None = None,
    *,
    epochs: int = 6,
    batch_size: int = 128,
    seed: int = 0,
) -> tuple[keras.Model, dict]:
    """Fit on the cutouts of ``train_dirs``; the learning-rate schedule watches ``val_dir``'s
    (without one, a random tenth of the training cutouts held out).

    The survey's own seeing spans a factor of about 2; an estimator trained on that
    alone pulls every estimate into it, and a PSF twice as broad comes out ~1.2 arcsec
    instead of ~1.9 (docs/ood.md). One of ``train_dirs`` should therefore be simulated
    with a wide seeing range (``simulate --seeing-factor-range 0.3 3.3``): the
    estimator must measure seeing beyond the survey's so that the score can see it
    there. The score's Gaussian is fitted on the survey's training data alone.

    Returns the network and what the card records: data, epochs and the validation
    RMSE of log10 FWHM per band.
    """
    keras.utils.set_random_seed(seed)
    train = _joined([load_dataset(d) for d in train_dirs])
    if val_dir is None:
        order = np.random.default_rng(seed).permutation(len(train))
        cut = len(train) // 10
        train, val = train.subset(np.sort(order[cut:])), train.subset(np.sort(order[:cut]))
    else:
        val = load_dataset(val_dir)
    x_train, y_train = network_inputs(train.images), seeing_targets(train.labels)
    x_val, y_val = network_inputs(val.images), seeing_targets(val.labels)
    model = build_seeing_estimator(x_train.shape[1:], y_train.mean(axis=0))
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    model.fit(
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        epochs=epochs,
        batch_size=batch_size,
        verbose=2,
        callbacks=[keras.callbacks.ReduceLROnPlateau(patience=1, factor=0.3)],
    )
    predicted = model.predict(x_val, batch_size=512, verbose=0)
    rmse = np.sqrt(np.mean((predicted - y_val) ** 2, axis=0))
    record = {
        "output": SEEING_OUTPUT,
        "meaning": "each band's seeing FWHM (log10 arcsec) estimated from the cutout",
        "train_data": [_described(d) for d in train_dirs],
        "validation_data": str(val_dir) if val_dir else "a tenth of the training cutouts",
        "epochs": epochs,
        "validation_rmse_log10": dict(zip(BANDS, map(float, rmse), strict=True)),
    }
    return model, record


def _joined(datasets: list[Dataset]) -> Dataset:
    """One dataset of the images and the seeing labels of several."""
    keys = [f"seeing_fwhm_arcsec_{band}" for band in BANDS]
    return Dataset(
        np.concatenate([d.images for d in datasets]),
        {k: np.concatenate([d.labels[k] for d in datasets]) for k in keys},
    )


def _described(data_dir: Path) -> dict:
    """A data folder's name, size and simulation seed and seeing range, for the card."""
    config_file = data_dir / "simulation.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    return {
        "data": data_dir.name,
        "n_cutouts": config.get("n_cutouts"),
        "seed": config.get("seed"),
        "seeing_factor_range": config.get("seeing_factor_range"),
        "seeing_log_sigma": config.get("seeing_log_sigma"),
    }


def grafted_estimator(models_dir: Path) -> tuple[keras.Model, dict] | None:
    """The estimator grafted into ``models_dir``'s classifier and its card record; None if none.

    For a new classifier that keeps the estimator: the seeing network does not
    depend on the classifier's weights, so it is grafted again, not retrained.
    """
    card_path = models_dir / f"{CLASSIFIER_NAME}.json"
    if not card_path.exists():
        return None
    card = json.loads(card_path.read_text())
    if "seeing_estimator" not in card or not (models_dir / KERAS_FILE).exists():
        return None
    record = {k: v for k, v in card["seeing_estimator"].items() if k != "keras_file"}
    return keras.saving.load_model(models_dir / KERAS_FILE, compile=False), record


def graft_into_classifier(
    models_dir: Path, model: keras.Model, record: dict, *, save_keras: bool = True
) -> Path:
    """Add ``model`` to the classifier's ONNX graph as output ``psf_fwhm_log10_arcsec``.

    The classifier's nodes are kept; the card gets the new output, sha256 and a
    ``seeing_estimator`` entry, and the Keras source is saved next to it (unless
    ``save_keras`` is False: the estimator already there). A classifier that already has
    the output has it replaced. Returns the card's path.
    """
    card_path = models_dir / f"{CLASSIFIER_NAME}.json"
    card = json.loads(card_path.read_text())
    read_model_card(card_path)  # refuse to rewrite a card the service would not read
    onnx_path = models_dir / card["onnx_file"]
    classifier = _without_seeing(onnx.load(str(onnx_path)))
    function = _exported_function(model)
    seeing, _ = tf2onnx.convert.from_function(
        function, input_signature=function.input_signature, opset=ONNX_OPSET
    )
    onnx.save(_grafted(classifier, seeing), str(onnx_path))
    if save_keras:  # False for the estimator already saved there (no new bytes for old weights)
        model.save(models_dir / KERAS_FILE)
    outputs = [o for o in card["outputs"] if o["name"] != SEEING_OUTPUT]
    outputs.append(
        {
            "name": SEEING_OUTPUT,
            "shape": [None, len(BANDS)],
            "dtype": "float32",
            "meaning": "seeing FWHM of the g, r and i bands estimated from the cutout, for "
            "the out-of-distribution score's seeing term (service.contract.ood)",
            "unit": "log10 arcsec",
        }
    )
    card.update(
        outputs=outputs,
        onnx_sha256=sha256_of(onnx_path),
        seeing_estimator={**record, "keras_file": KERAS_FILE},
    )
    ModelCard.model_validate(card)
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return card_path


def _exported_function(model: keras.Model):
    """The network as a tf.function of the classifier's ``image`` input."""
    image_spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="image")

    @tf.function(input_signature=[image_spec])
    def estimate(image):
        return tf.identity(model(image, training=False), name=SEEING_OUTPUT)

    return estimate


def _without_seeing(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The classifier graph without an earlier grafted network (its prefixed nodes)."""
    graph = proto.graph
    kept_nodes = [n for n in graph.node if not n.name.startswith(_PREFIX)]
    kept_init = [t for t in graph.initializer if not t.name.startswith(_PREFIX)]
    kept_outputs = [o for o in graph.output if o.name != SEEING_OUTPUT]
    del graph.node[:], graph.initializer[:], graph.output[:]
    graph.node.extend(kept_nodes)
    graph.initializer.extend(kept_init)
    graph.output.extend(kept_outputs)
    return proto


def _grafted(classifier: onnx.ModelProto, seeing: onnx.ModelProto) -> onnx.ModelProto:
    """``seeing``'s nodes, prefixed, appended to ``classifier``'s graph on its ``image`` input."""
    image = classifier.graph.input[0].name
    seeing_input = seeing.graph.input[0].name
    seeing_output = seeing.graph.output[0].name

    def renamed(name: str) -> str:
        if name == seeing_input:
            return image
        if name == seeing_output:
            return SEEING_OUTPUT
        return _PREFIX + name if name else name

    for node in seeing.graph.node:
        node.name = _PREFIX + (node.name or node.op_type)
        node.input[:] = [renamed(name) for name in node.input]
        node.output[:] = [renamed(name) for name in node.output]
    for tensor in seeing.graph.initializer:
        tensor.name = renamed(tensor.name)
    classifier.graph.node.extend(seeing.graph.node)
    classifier.graph.initializer.extend(seeing.graph.initializer)
    output = onnx.helper.make_tensor_value_info(
        SEEING_OUTPUT, onnx.TensorProto.FLOAT, [None, len(BANDS)]
    )
    classifier.graph.output.append(output)
    onnx.checker.check_model(classifier)
    return classifier
