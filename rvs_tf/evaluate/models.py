"""The model under evaluation as a logits callable: Keras models (through a float32 copy when they compute
in mixed precision), .keras files, exported SavedModel versions, plain callables."""
import os
import warnings

import keras

from rvs_tf import export


def mixed_policies(model):
    """Names of the mixed-precision dtype policies among the model's layers."""
    return sorted({layer.dtype_policy.name for layer in model._flatten_layers()
                   if layer.dtype_policy.name.startswith("mixed")})


def float32_copy(model):
    """(model, note): a float32 twin of a mixed-precision Keras model (same weights) and a note saying so
    for the report, or the model itself and "" if it already computes in float32.

    Attacks need float32 gradients: in float16, small input gradients underflow to zero and a white-box
    attack fails where it would succeed, which reads as robustness (a form of gradient masking).
    """
    mixed = mixed_policies(model)
    if not mixed:
        return model, ""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")  # for sublayers that layers create in their constructors
    try:
        copy = keras.models.clone_model(
            model, clone_function=lambda layer: layer.__class__.from_config({**layer.get_config(),
                                                                             "dtype": "float32"}))
    except Exception as error:  # e.g. a subclassed model that clone_model cannot rebuild
        raise ValueError(f"model: computes in {mixed}; attacks need a float32 copy, which "
                         f"keras.models.clone_model could not build ({error}). Rebuild the model under "
                         f"the float32 policy, load its weights, and evaluate that.") from error
    finally:
        keras.config.set_dtype_policy(previous)
    copy.set_weights(model.get_weights())
    return copy, f" (float32 copy of its {'/'.join(mixed)} weights)"


def load_model(model):
    """Keras model or model path -> (logits callable, metadata dict, description string).

    A mixed-precision Keras model is evaluated through its float32 copy (see `float32_copy`)."""
    if isinstance(model, keras.Model):
        from rvs_tf.training import RobustModel
        if isinstance(model, RobustModel) and mixed_policies(model):
            model = model.classifier  # the classifier is what is attacked; it is functional, so it clones
        copy, note = float32_copy(model)
        return copy, {}, f"Keras model '{model.name}'{note}"
    if callable(model) and not isinstance(model, (str, os.PathLike)):
        return model, {}, getattr(model, "__name__", type(model).__name__)
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"model: expected a Keras model, a callable returning logits or a path, "
                         f"got {model!r}")
    path, _ = export.resolve_model_path(model)
    path = os.path.realpath(path)  # one name however it is spelled: a resumed evaluation finds its state
    if path.endswith(".keras"):
        try:  # registers rvs_tf's custom layers and models with Keras, if they are there
            import rvs_tf.models  # noqa: F401
        except ImportError:
            pass
        copy, note = float32_copy(keras.saving.load_model(path, compile=False))
        return copy, {}, path + note
    return _load_version(path)


def _load_version(path):
    """An exported version: its serving signature's logits, its metadata, a warning if not float32."""
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    signature, input_name = export.image_signature(loaded, path)

    def logits_fn(x, _keep=loaded):  # holds the SavedModel, whose variables the signature reads
        return signature(**{input_name: x})[export.LOGITS_OUTPUT]

    metadata = export.read_metadata(path)
    policy = (metadata.get("flags") or {}).get("mixed_precision", "float32")
    if policy != "float32":  # the export computes as it was trained; its gradients may underflow
        warnings.warn(f"model: {path} computes in {policy}, so attack gradients may underflow and "
                      "overstate robustness; for trustworthy figures evaluate the run's "
                      "best_classifier.keras, which is evaluated through a float32 copy", stacklevel=3)
        path = f"{path} (computes in {policy})"
    return logits_fn, metadata, path
