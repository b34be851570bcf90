"""PtychoPINN-XLA: physics-informed neural network ptychography with an XLA-compilable warp.

Importing the package registers its Keras layers and loss, so saved ``.keras`` models
load with plain ``keras.saving.load_model(path)`` (``safe_mode`` on).
"""

__version__ = "0.1.0"

from ptycho import layers, model  # noqa: E402,F401  (registers serializable classes)
