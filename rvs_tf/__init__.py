"""rvs_tf: Robustness-via-Synthesis adversarial training for Keras 3 / TensorFlow.

Heavy submodules load on first use, so `import rvs_tf.sinkhorn` does not build models.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "RVSModel": "rvs_tf.training",
    "robustness_report": "rvs_tf.evaluate",
    "entropic_ot": "rvs_tf.sinkhorn",
    "transport_plan": "rvs_tf.sinkhorn",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rvs_tf' has no attribute {name!r}")


__all__ = list(_LAZY)
