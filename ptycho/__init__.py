"""PtychoPINN-XLA: physics-informed neural network ptychography with an XLA-compilable warp.

Importing the package registers its Keras layers and loss, so saved ``.keras`` models
load with plain ``keras.saving.load_model(path)`` (``safe_mode`` on).
"""

__version__ = "0.1.0"

import os  # noqa: E402

from ptycho.quiet import native_notices_filtered  # noqa: E402

if os.environ.get("PTYCHO_VERBOSE") != "1" and not os.environ.get("TF_CPP_MIN_LOG_LEVEL"):
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "1"  # TensorFlow's INFO lines (XLA service, ...)

with native_notices_filtered():  # TensorFlow's native start-up notices (ptycho/quiet.py)
    from ptycho import layers, model  # noqa: E402,F401  (registers serializable classes)
