"""rvs_tf: Robustness-via-Synthesis adversarial training for Keras 3 / TensorFlow.

Importing the package registers its Keras classes, so `keras.models.load_model` reads saved rvs_tf
models (an `RVSModel`, or a classifier with rvs_tf layers) after a plain `import rvs_tf`.
"""
__version__ = "0.1.0"

import os as _os
import sys as _sys

CLI_NAMES = ("rvs-train", "rvs-evaluate", "rvs-export")
_CLI_MODULES = ("rvs_tf.train", "rvs_tf.evaluate", "rvs_tf.export")


def _quiet_tensorflow_start_for_the_clis():
    """TF's C++ start-up notes (oneDNN, CPU instructions, "failed call to cuInit" without a GPU) come
    before every command-line run and hide its messages, and TF 2.21 prints them before its logging
    reads TF_CPP_MIN_LOG_LEVEL. So in our console scripts (and `python -m rvs_tf.<cli>`), unless the
    user set TF_CPP_MIN_LOG_LEVEL, set it to 2 and send C++ stderr to /dev/null while TensorFlow loads
    and lists its devices (no TF context is created). Python errors still show; a library import is
    left alone."""
    argv = getattr(_sys, "orig_argv", _sys.argv)
    cli = _os.path.basename(_sys.argv[0]) in CLI_NAMES or any(
        argv[i] == "-m" and argv[i + 1] in _CLI_MODULES for i in range(len(argv) - 1))
    if not cli or "TF_CPP_MIN_LOG_LEVEL" in _os.environ or "tensorflow" in _sys.modules:
        return
    _os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    _sys.stderr.flush()
    saved, null = _os.dup(2), _os.open(_os.devnull, _os.O_WRONLY)
    _os.dup2(null, 2)
    try:
        import tensorflow

        tensorflow.config.list_physical_devices()
    finally:
        _os.dup2(saved, 2)
        _os.close(saved)
        _os.close(null)


_quiet_tensorflow_start_for_the_clis()

from rvs_tf import models  # noqa: E402  (registers the classifier layers)
from rvs_tf.sinkhorn import entropic_ot, transport_plan  # noqa: E402
from rvs_tf.training import RVSModel  # noqa: E402

__all__ = ["RVSModel", "entropic_ot", "models", "transport_plan"]
