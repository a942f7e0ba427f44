"""Checks that make training fail loudly instead of silently: non-finite losses or weights, and images
outside [0, 1] (every eps in rvs_tf is read on that scale, so 0-255 images would get a budget 255 times
too small without any error).

`RobustModel.fit` adds a `NonFiniteGuard` to the callbacks by itself, and `RobustModel.unpack` checks the
range of every batch, so plain `model.fit` users get both.
"""
import keras
import numpy as np
import tensorflow as tf

DIVERGENCE_ADVICE = ("lower the learning rate (rvs-train --lr), use Adam (--optimizer=adam), or under "
                     "mixed_float16 keep loss scaling on (keras.optimizers.LossScaleOptimizer)")


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss or weight: the run diverged and must not be saved."""


def non_finite_variables(variables):
    """Paths of the variables holding a NaN or an infinity (one device read per variable)."""
    bad = []
    for variable in variables:
        value = np.asarray(keras.ops.convert_to_numpy(variable))
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            bad.append(getattr(variable, "path", None) or variable.name)
    return bad


def check_finite_weights(model, what):
    """Raise NonFiniteError naming the first bad variables of `model` (`what` says where we are)."""
    bad = non_finite_variables(model.weights)
    if bad:
        raise NonFiniteError(f"{what}: non-finite weights in {', '.join(bad[:3])}"
                             f"{' and %d more' % (len(bad) - 3) if len(bad) > 3 else ''}; the run diverged: "
                             + DIVERGENCE_ADVICE)


class NonFiniteGuard(keras.callbacks.Callback):
    """Stops `fit` with NonFiniteError at the first batch whose loss is not finite, and at an epoch's end
    when a weight is not (the last update can break the weights after the last loss was logged).

    Put it before any checkpoint callback (RobustModel.fit puts it first), so that nothing diverged is
    saved: Keras's TerminateOnNaN only sets stop_training, after which the epoch's end callbacks still run.
    """

    def __init__(self, monitor="loss"):
        super().__init__()
        self.monitor = monitor
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        value = float(keras.ops.convert_to_numpy(value))
        if not np.isfinite(value):
            raise NonFiniteError(
                f"epoch {self._epoch + 1}, step {batch + 1}: the training {self.monitor} is {value}; "
                "the run diverged: " + DIVERGENCE_ADVICE)

    def on_epoch_end(self, epoch, logs=None):
        check_finite_weights(self.model, f"epoch {epoch + 1}, end")


def with_guard(callbacks):
    """`callbacks` with a NonFiniteGuard first, unless it holds one already."""
    callbacks = list(callbacks or [])
    if any(isinstance(c, NonFiniteGuard) for c in callbacks):
        return callbacks
    return [NonFiniteGuard(), *callbacks]


IMAGE_RANGE_ADVICE = "images: expected floats in [0, 1] (eps is read on that scale)"


def checked_data(data):
    """`fit`'s x or validation_data with its images checked before the train step: arrays now, a
    tf.data.Dataset of (images, ...) by a map in its input pipeline. The step's own check
    (`checked_images` in `RobustModel.unpack`) is dropped by XLA, which Keras turns on by itself on GPUs
    (jit_compile="auto"), so this one, outside the compiled step, is what holds there."""
    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        if isinstance(spec, tuple) and len(spec) >= 2 and isinstance(spec[0], tf.TensorSpec):
            return data.map(lambda x, *rest: (checked_images(x), *rest),
                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return data
    if isinstance(data, (tuple, list)) and data and not isinstance(data[0], (int, float)):
        return type(data)([checked_data(data[0]), *data[1:]])
    if isinstance(data, np.ndarray) and data.size:
        if not np.issubdtype(data.dtype, np.floating):
            raise ValueError(f"{IMAGE_RANGE_ADVICE}, got dtype {data.dtype}; convert pixels with "
                             "x.astype('float32') / 255")
        low, high = float(data.min()), float(data.max())
        if not (low >= 0.0 and high <= 1.0):
            raise ValueError(f"{IMAGE_RANGE_ADVICE}; 0-255 pixels must be divided by 255. Got values in "
                             f"[{low:g}, {high:g}]")
    return data


def checked_images(x):
    """`x` as float32, with an in-graph check that its values lie in [0, 1].

    Integer images (uint8 pixels) are refused when traced, float images outside [0, 1] when run: eps
    would otherwise be silently mis-scaled. Convert uint8 pixels yourself: x.astype("float32") / 255.
    """
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        raise ValueError(f"{IMAGE_RANGE_ADVICE}, got dtype {x.dtype.name}; convert pixels with "
                         "x.astype('float32') / 255")
    x = tf.cast(x, tf.float32)
    low, high = tf.reduce_min(x), tf.reduce_max(x)
    check = tf.debugging.Assert(
        tf.logical_and(low >= 0.0, high <= 1.0),
        [f"{IMAGE_RANGE_ADVICE}; 0-255 pixels must be divided by 255. Got values in [min, max] =", low, high])
    with tf.control_dependencies([check]):
        return tf.identity(x)
