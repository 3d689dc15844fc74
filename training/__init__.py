"""Offline pipeline: simulate DES-like cutouts, train, evaluate and export the models.

Importing this package registers the custom Keras layers and losses, so the
shipped ``models/*.keras`` files load with ``keras.saving.load_model``.
"""

import os

# TensorFlow's C++ start-up chatter hides the pipeline's own progress output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from training import losses as _losses  # noqa: E402,F401  (registers custom objects)
from training import models as _models  # noqa: E402,F401
