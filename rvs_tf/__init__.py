"""rvs_tf: Robustness-via-Synthesis adversarial training for Keras 3 / TensorFlow.

Importing the package registers its Keras classes, so `keras.models.load_model` reads saved rvs_tf
models (an `RVSModel`, or a classifier with rvs_tf layers) after a plain `import rvs_tf`.
"""
from rvs_tf import _quiet_cli  # noqa: F401  (first, before TensorFlow loads: see there)

__version__ = "0.1.0"

from rvs_tf import models, monitors  # noqa: E402  (models registers the classifier layers)
from rvs_tf.sinkhorn import entropic_ot, transport_plan  # noqa: E402
from rvs_tf.training import RVSModel  # noqa: E402
from rvs_tf.baselines import FGSMPGIModel, NFGSMModel  # noqa: E402
from rvs_tf.learned_init import RVSInitModel  # noqa: E402

__all__ = ["FGSMPGIModel", "NFGSMModel", "RVSInitModel", "RVSModel", "entropic_ot", "models",
           "monitors", "transport_plan"]
