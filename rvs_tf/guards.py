"""Checks that make training fail loudly instead of silently: non-finite losses or weights, and images
outside [0, 1] (every eps in rvs_tf is read on that scale, so 0-255 images would get a budget 255 times
too small without any error).

`RobustModel.fit` adds a `NonFiniteGuard` and a `FeatureCollapseGuard` to the callbacks by itself and
checks the images it is given (as `RobustModel.unpack` does in the step), so plain `model.fit` users get
all of it.
"""
import keras
import numpy as np
import tensorflow as tf

DIVERGENCE_ADVICE = ("lower the learning rate (rvs-train --lr), use Adam (--optimizer=adam), or under "
                     "mixed_float16 keep loss scaling on (keras.optimizers.LossScaleOptimizer)")


class TrainingHalted(RuntimeError):
    """A guard stopped `fit`: going on would only produce a model that must not be used."""


class NonFiniteError(TrainingHalted):
    """Training produced a NaN or infinite loss or weight: the run diverged and must not be saved."""


class FeatureCollapseError(TrainingHalted):
    """RVS training is collapsing: the classifier kills its features to make the OT term vanish."""


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
        value = float(np.mean(keras.ops.convert_to_numpy(value)))  # a [1] vector under multi-worker
        if not np.isfinite(value):
            raise NonFiniteError(
                f"epoch {self._epoch + 1}, step {batch + 1}: the training {self.monitor} is {value}; "
                "the run diverged: " + DIVERGENCE_ADVICE)

    def on_epoch_end(self, epoch, logs=None):
        check_finite_weights(self.model, f"epoch {epoch + 1}, end")


class FeatureCollapseGuard(keras.callbacks.Callback):
    """Stops `fit` with FeatureCollapseError when RVS training collapses or stalls because the OT term
    outweighs the cross-entropy. Does nothing for models that log no `ot_loss` (the baselines);
    `window=0` turns it off. Values are per step (recovered from Keras's running means), `window` steps
    at a time.

    Why it happens (issue 14): in raw squared feature units (`ot_units="absolute"`, the authors' and the
    default before 2026-12-05) the OT term's weight against the CE depends on the classifier's feature
    scale. The default `ot_units="spread"` divides the term by the clean features' spread, which removes
    the scale (rvs.feature_spread), and the default `ot_share_cap` scales the term's weight down where its
    gradient is still several times the CE's at the start (a BatchNorm + global-pooling classifier
    stalled without it; benchmarks/BN_CLASSIFIERS.md); the guard stays as the net below both. BatchNorm (batch statistics in training mode) puts
    penultimate features at about unit scale per unit, with a larger clean-synthesised gap, so at the
    start the OT term is 1.7-5.7 against 0.014 for the default small CNN, and its gradient on the
    classifier 1.6-2.7 times the smoothed CE's (0.28 times on the default model). Adam follows it:
      * collapse: ReLU'd features die (small_cnn(batch_norm=True): 35% -> 89% -> 100% dead units at
        steps 1, 4, 12) and dead units pass no gradient, so the OT term is 0 and the accuracy 10% for
        good. Caught after `window` steps: accuracy < `accuracy_factor` x chance while the OT term stays
        below `ot_fraction` of its peak.
      * stall: with BatchNorm before the feature ReLU the units cannot all die; the classifier makes its
        features insensitive to the image instead (OT term 1.75 -> 0.14, CE near ln 10, accuracy
        22-33% over 192 steps where NaturalModel reaches 79%). Caught once two windows have run: the
        mean accuracy over the last `window` steps is below `stall_accuracy_factor` x chance (at most a
        third of the way from chance to 1, for few classes) and no more
        than `stall_rise` above that of the `window` steps before, and the mean OT term is below
        `stall_ot_fraction` of its peak.
    BatchNorm's moving statistics, which the generator step and the synthesised batches also update,
    are not the cause: the training step and its logged accuracy use batch statistics.
    Thresholds, from Fashion-MNIST runs (batch 128, Adam 1e-3 / 2e-3, 50-step windows, from step 25
    on): healthy RVS runs at 62-75% (default small CNN, OT term at 45-55% of its peak), 55-70% (a BN+GAP
    classifier that trains) and 57-79% (WRN-10-2, OT term at 9-21% of its peak: the OT test alone does
    not tell); the stalled one at 28-33% and falling, OT at 6-19% of its peak; the collapsed ones at
    10%, OT 0. Accuracy and its rise decide: a classifier near chance that gains more than `stall_rise`
    per window is left alone, a slower one is not (thresholds not yet checked on CIFAR-10; `window=0`
    turns the guard off). NaturalModel and PGD-AT log no OT term.
    """

    def __init__(self, window=50, accuracy_factor=2.0, ot_fraction=0.01, stall_accuracy_factor=4.0,
                 stall_ot_fraction=0.25, stall_rise=0.02):
        super().__init__()
        self.window, self.accuracy_factor = int(window), float(accuracy_factor)
        self.ot_fraction = float(ot_fraction)
        self.stall_accuracy_factor, self.stall_ot_fraction = float(stall_accuracy_factor), float(stall_ot_fraction)
        self.stall_rise = float(stall_rise)
        self._history, self._peak, self._epoch, self._seen = [], 0.0, 0, (0, {})

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._seen = epoch, (0, {})  # Keras resets the running means each epoch

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        if self.window <= 0 or "ot_loss" not in logs or "clean_accuracy" not in logs:
            return
        count, before = self._seen
        now = {key: float(np.mean(keras.ops.convert_to_numpy(logs[key])))
               for key in ("ot_loss", "clean_accuracy")}
        steps = batch + 1 - count
        if steps <= 0:
            return
        # The logs are running means over the epoch; these are the means of the steps since the last call.
        value = {key: (now[key] * (batch + 1) - before.get(key, 0.0) * count) / steps for key in now}
        self._seen = (batch + 1, now)
        self._peak = max(self._peak, value["ot_loss"])
        self._history = (self._history + [value])[-2 * self.window:]
        recent = self._history[-self.window:]
        if len(recent) < self.window:
            return
        chance = 1.0 / max(int(getattr(self.model, "num_classes", 10)), 2)
        accuracy = float(np.mean([v["clean_accuracy"] for v in recent]))
        where = f"epoch {self._epoch + 1}, step {batch + 1}"
        remedies = []  # the defaults the run does not use first, then a lower weight
        if getattr(self.model, "ot_units", None) == "absolute":
            remedies.append("measure the OT term in the clean features' spread (rvs-train --ot_units=spread, "
                            "RVSModel(ot_units='spread'), the default)")
        if getattr(self.model, "ot_share_cap", 0) is None:
            remedies.append("cap the OT term's share of the gradient (rvs-train --ot_share_cap=0.6, "
                            "RVSModel(ot_share_cap=0.6), the default)")
        remedies.append("lower the OT weight (rvs-train --ot_weight=0.1, RVSModel(ot_weight=0.1))")
        advice = ", ".join(remedies[:-1]) + (" or " if len(remedies) > 1 else "") + remedies[-1]
        ot = max(v["ot_loss"] for v in recent)
        if accuracy < self.accuracy_factor * chance and ot < self.ot_fraction * self._peak:
            raise FeatureCollapseError(
                f"{where}: the classifier is collapsing: clean training accuracy {accuracy:.3f} (chance "
                f"{chance:.3f}) over the last {self.window} steps while the OT term fell to {ot:.2g} from "
                f"{self._peak:.2g}, its features killed to make it vanish (seen with BatchNorm "
                f"classifiers); {advice}")
        if len(self._history) < 2 * self.window:
            return
        earlier = float(np.mean([v["clean_accuracy"] for v in self._history[:self.window]]))
        ot = float(np.mean([v["ot_loss"] for v in recent]))
        # With few classes a multiple of chance would reach 1 (a converged binary run would "stall"):
        # never more than a third of the way from chance to perfect.
        stalled_below = min(self.stall_accuracy_factor * chance, chance + (1.0 - chance) / 3.0)
        if (accuracy < stalled_below and accuracy - earlier <= self.stall_rise
                and ot < self.stall_ot_fraction * self._peak):
            raise FeatureCollapseError(
                f"{where}: training has stalled: clean training accuracy {accuracy:.3f} (chance {chance:.3f}) "
                f"over the last {self.window} steps, {earlier:.3f} over the {self.window} before, while the OT "
                f"term fell to {ot:.2g} from {self._peak:.2g}: the OT term outweighs the cross-entropy on "
                f"this classifier's features (seen with BatchNorm classifiers); {advice}")


def with_guard(callbacks):
    """`callbacks` with a NonFiniteGuard and a FeatureCollapseGuard first, unless it holds them."""
    callbacks = list(callbacks or [])
    guards = [guard() for guard in (NonFiniteGuard, FeatureCollapseGuard)
              if not any(isinstance(c, guard) for c in callbacks)]
    return [*guards, *callbacks]


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
    array = data.numpy() if tf.is_tensor(data) and hasattr(data, "numpy") else data  # eager tensors
    if isinstance(array, np.ndarray) and array.size:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{IMAGE_RANGE_ADVICE}, got dtype {array.dtype}; convert pixels with "
                             "x.astype('float32') / 255")
        low, high = float(array.min()), float(array.max())
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
