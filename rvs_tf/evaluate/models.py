"""The model under evaluation as a logits callable: Keras models (through a float32 copy when they compute
in mixed precision), .keras files, exported SavedModel versions, plain callables."""
import os
import warnings

import keras

from rvs_tf import export
from rvs_tf.precision import float32_copy, mixed_policies


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


def search_model(model, precision):
    """(what the attacks search with, its policy, note) for `precision` ("auto", "float32" or
    "mixed_bfloat16", see `rvs_tf.precision.resolve`): `model` itself for float32; for bfloat16 a bfloat16
    copy of a Keras model or an export's `search_bfloat16` signature, or `model` with a note saying why not."""
    from rvs_tf.precision import cast_copy, resolve

    policy, note = resolve(precision)
    note = note if precision == "auto" else ""
    if policy == "float32":
        return model, policy, note
    if policy != "mixed_bfloat16":
        raise ValueError(f"precision: attacks search in float32 or mixed_bfloat16 (float16 gradients "
                         f"underflow, which reads as robustness), got {policy}")
    if isinstance(model, keras.Model):
        try:
            return cast_copy(model, policy), policy, note
        except ValueError as error:
            return model, "float32", f"float32 search: {error}"
    search = getattr(model, "bfloat16_search", None)
    if search is None:
        return model, "float32", ("float32 search: the model offers no bfloat16 computation (an export "
                                  f"written before rvs_tf had the {export.SEARCH_SIGNATURE!r} signature, or "
                                  "a plain callable)")
    return search, policy, note


def _load_version(path):
    """An exported version: its serving signature's logits, its metadata, a warning if not float32."""
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    signature, input_name = export.image_signature(loaded, path)

    def logits_fn(x, _keep=loaded):  # holds the SavedModel, whose variables the signature reads
        return signature(**{input_name: x})[export.LOGITS_OUTPUT]

    if export.SEARCH_SIGNATURE in loaded.signatures:  # see `search_model`
        search = loaded.signatures[export.SEARCH_SIGNATURE]
        logits_fn.bfloat16_search = lambda x, _keep=loaded: search(images=x)[export.LOGITS_OUTPUT]

    metadata = export.read_metadata(path)
    flags = metadata.get("flags") or {}
    policy = metadata.get("serving_precision") or flags.get("mixed_precision", "float32")
    if policy != "float32":  # the export computes as it was trained; its gradients may underflow
        warnings.warn(f"model: {path} computes in {policy}, so attack gradients may underflow and "
                      "overstate robustness; for trustworthy figures evaluate the run's "
                      "best_classifier.keras, which is evaluated through a float32 copy", stacklevel=3)
        path = f"{path} (computes in {policy})"
    return logits_fn, metadata, path
