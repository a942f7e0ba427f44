"""Imported first by rvs_tf/__init__.py: quiets TensorFlow's C++ start-up notes in the console scripts."""
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
