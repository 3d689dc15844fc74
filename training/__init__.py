"""Offline pipeline: simulate DES-like cutouts, train, evaluate and export the models.

Importing this package registers the custom Keras layers and losses, so the
shipped ``models/*.keras`` files load with ``keras.saving.load_model``.
"""

from training import losses as _losses  # noqa: F401  (registers custom objects)
from training import models as _models  # noqa: F401
