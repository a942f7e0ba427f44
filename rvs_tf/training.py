"""Robust training as Keras models: `RobustModel`, the base class every method shares.

Every method is a `keras.Model` that wraps a user's classifier (images in [0, 1] -> logits), so `fit`,
`evaluate`, `predict`, `save` and `keras.models.load_model` behave as Keras users expect, `call` returns the
classifier's logits, and the datasets are plain `(images, labels)` pairs with integer labels. The methods:
`rvs_tf.rvs.RVSModel` (re-exported here), `rvs_tf.baselines`, `rvs_tf.learned_init.RVSInitModel`.
"""
import math
import os

import keras
import tensorflow as tf

from rvs_tf import attacks, guards
from rvs_tf.arguments import check
from rvs_tf.threat_model import ThreatModel, parse_norm
from rvs_tf.guards import FeatureCollapseError, NonFiniteError, NonFiniteGuard  # noqa: F401  (API)


def smooth_labels(labels, num_classes, smoothing):
    """One-hot targets where the true class keeps 1 - smoothing and the rest share `smoothing` equally.

    This is the authors' convention (0.5 -> true class 0.5, others 0.5/9), not Keras's (which also gives
    the true class its share of the uniform part).
    """
    one_hot = tf.one_hot(tf.cast(tf.reshape(labels, [-1]), tf.int32), num_classes, dtype=tf.float32)
    if num_classes < 2 or smoothing == 0:
        return one_hot
    return one_hot * (1.0 - smoothing) + (1.0 - one_hot) * (smoothing / (num_classes - 1))


def kernel_l2(variables):
    """sum ||W||^2 / 2 over conv and dense kernels only (no biases, no BatchNorm), as the authors decay."""
    kernels = [tf.cast(v, tf.float32) for v in variables if v.path.endswith("kernel")]
    if not kernels:
        return tf.constant(0.0)
    return 0.5 * tf.add_n([tf.reduce_sum(tf.square(k)) for k in kernels])


def _replica_count():
    return tf.distribute.get_strategy().num_replicas_in_sync


def _replica_id():
    context = tf.distribute.get_replica_context()
    if context is None:
        return tf.constant(0, tf.int32)
    return tf.cast(context.replica_id_in_sync_group, tf.int32)


class RobustModel(keras.Model):
    """Base of every training method: a classifier, an eps budget, validation under PGD, saving.

    Subclasses implement `train_step` and list their extra trackers. `test_step` reports clean accuracy
    and accuracy under a short PGD (`eval_pgd_steps` steps, cross-entropy, random start, step 2.5 eps/steps):
    a validation signal for choosing checkpoints, never a robustness claim (use `rvs_tf.evaluate`).
    `norm` ("linf" or "l2") is the threat model of training and validation; eps is in its units.
    """

    def __init__(self, classifier, *, eps, label_smoothing=0.0, weight_decay=0.0, eps_warmup_steps=0,
                 eval_pgd_steps=10, seed=0, norm="linf", **kwargs):
        super().__init__(**kwargs)
        check(isinstance(classifier, keras.Model),
              f"classifier: expected a keras.Model, got {type(classifier).__name__}")
        check(hasattr(classifier, "output_shape"),
              "classifier: expected a functional or Sequential Keras model (its input and output shapes "
              "must be known); wrap a subclassed model in keras.Model(inputs, outputs)")
        self.norm = parse_norm(norm)
        largest = 1.0 if self.norm == "linf" else math.sqrt(math.prod(classifier.input_shape[1:]))
        check(0.0 < float(eps) <= largest, f"eps: expected 0 < eps <= {largest:.4g} ({self.norm} radius for images "
                                           f"in [0, 1] of shape {tuple(classifier.input_shape[1:])}), got {eps}"
                                           + (" (an L2 radius? pass norm='l2')" if self.norm == "linf" else ""))
        check(0.0 <= float(label_smoothing) < 1.0,
              f"label_smoothing: expected 0 <= value < 1, got {label_smoothing}")
        check(float(weight_decay) >= 0.0, f"weight_decay: expected >= 0, got {weight_decay}")
        check(int(eps_warmup_steps) >= 0, f"eps_warmup_steps: expected >= 0, got {eps_warmup_steps}")
        check(int(eval_pgd_steps) >= 1, f"eval_pgd_steps: expected >= 1, got {eval_pgd_steps}")
        self.classifier = classifier
        self.eps = float(eps)
        self.label_smoothing = float(label_smoothing)
        self.weight_decay = float(weight_decay)
        self.eps_warmup_steps = int(eps_warmup_steps)
        self.eval_pgd_steps = int(eval_pgd_steps)
        self.seed = int(seed)
        self.num_classes = int(classifier.output_shape[-1])
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="clean_accuracy")
        self.adv_accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="adv_accuracy")
        self.pgd_accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="pgd_accuracy")
        self.fgsm_accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="fgsm_accuracy")
        self.built = True

    # -- Keras plumbing ---------------------------------------------------------------------------------
    def call(self, inputs, training=False):
        return self.classifier(inputs, training=training)

    def _extra_trackers(self):
        return []

    def fit(self, x=None, *args, callbacks=None, validation_data=None, **kwargs):
        """Keras fit, with a NonFiniteGuard and a FeatureCollapseGuard first among the callbacks unless
        given (a diverged or collapsing run stops at once, before any callback saves its weights), and
        images outside [0, 1] refused (guards.checked_data)."""
        return super().fit(guards.checked_data(x), *args, callbacks=guards.with_guard(callbacks),
                           validation_data=guards.checked_data(validation_data), **kwargs)

    def export(self, filepath, format="tf_saved_model", verbose=True, input_signature=None, **kwargs):
        """Keras 3's way to write a SavedModel for TF Serving: here the classifier alone, with the
        signatures of `rvs-export` (`rvs_tf.export`; no generator, no optimizer state). `filepath` must
        not exist. Keyword `metadata` and `serving_precision` go to `rvs_tf.export.write_savedmodel`."""
        from rvs_tf import export as export_lib

        if format != "tf_saved_model":
            raise ValueError(f"format: rvs_tf models export the classifier as 'tf_saved_model' (what TF Serving "
                             f"loads), got {format!r}; for other formats export `model.classifier` with Keras")
        if input_signature is not None:
            raise ValueError("input_signature: the serving signature is fixed (float32 images [batch, H, W, C] "
                             "in [0, 1]); got one")
        path = export_lib.write_savedmodel(self.classifier, os.fspath(filepath), **kwargs)
        if verbose:
            print(f"Saved the classifier's serving SavedModel at {path} (signatures "
                  f"{export_lib.SERVING_SIGNATURE}, {export_lib.BYTES_SIGNATURE})")
        return path

    def evaluate(self, x=None, *args, **kwargs):
        """Keras evaluate, with images outside [0, 1] refused (its PGD accuracy reads eps on that scale)."""
        return super().evaluate(guards.checked_data(x), *args, **kwargs)

    @property
    def metrics(self):
        return [self.loss_tracker, *self._extra_trackers(), self.accuracy_tracker,
                self.adv_accuracy_tracker, self.pgd_accuracy_tracker, self.fgsm_accuracy_tracker]

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras reads a batch here to build what `compile` left unbuilt. Everything of ours is built in
        `__init__` and `compile`, and under MultiWorkerMirroredStrategy that read fails ("Attempt to
        convert a value (PerReplica...)": Keras passes the (x, y) tuple of per-replica batches to
        `strategy.reduce`), so skip it when there is nothing to build."""
        if (all(layer.built for layer in self._flatten_layers()) and self.optimizer.built
                and getattr(self, "_compile_loss", None) is None
                and getattr(self, "_compile_metrics", None) is None):
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _make_function(self, step_function):
        """Under MultiWorkerMirroredStrategy Keras averages a step's outputs with
        `strategy.reduce("MEAN", value, axis=0)`, which fails on scalars ("Invalid reduction dimension 0
        for input with 0 dimensions"); hand it each scalar as a [1] vector, which that reduce averages
        back to a scalar."""
        if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            step = step_function

            def step_function(data):
                return tf.nest.map_structure(
                    lambda t: tf.reshape(t, [1]) if t.shape.rank == 0 else t, step(data))
        return super()._make_function(step_function)

    def _get_metrics_result_or_logs(self, logs):
        """Epoch logs read from the metrics themselves for every name the step reported. Keras does this
        only when a step reports all of `metrics`; otherwise it keeps the step's values, which under a
        strategy are a plain mean of per-replica results, wrong whenever a batch splits unevenly (the
        last validation batch)."""
        if not isinstance(logs, dict):
            return logs
        results = self.get_metrics_result()
        return {key: results.get(key, value) for key, value in logs.items()}

    def get_config(self):
        return {
            "classifier": keras.saving.serialize_keras_object(self.classifier),
            "eps": self.eps, "label_smoothing": self.label_smoothing, "weight_decay": self.weight_decay,
            "eps_warmup_steps": self.eps_warmup_steps, "eval_pgd_steps": self.eval_pgd_steps, "norm": self.norm,
            "seed": self.seed, "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("classifier", "generator"):
            if key in config:
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)

    def _optimizers(self):
        return {"optimizer": self.optimizer}

    def compile(self, optimizer="sgd", **kwargs):
        """Compile with the classifier's optimizer; it is built on its variables now, so that `fit` under
        a strategy never creates optimizer slots inside the step (the 'placeholder ... cond' failure)."""
        if kwargs.get("jit_compile") is True and self.distribute_strategy.num_replicas_in_sync > 1:
            from rvs_tf.distribute import resolve_jit_compile  # warns; XLA cannot place a mirrored step
            kwargs["jit_compile"] = resolve_jit_compile(True, self.distribute_strategy)
        super().compile(optimizer=optimizer, **kwargs)
        self._build_optimizers()

    def _build_optimizers(self):
        with self.distribute_strategy.scope():
            self.optimizer.build(self.classifier.trainable_variables)

    def get_compile_config(self):
        return {key: keras.saving.serialize_keras_object(opt) for key, opt in self._optimizers().items()}

    def compile_from_config(self, config):
        self.compile(**{key: keras.saving.deserialize_keras_object(value) for key, value in config.items()})

    # -- shared pieces of a step ----------------------------------------------------------------------
    def current_eps(self):
        """eps, ramped linearly from 0 over the first `eps_warmup_steps` classifier steps."""
        if self.eps_warmup_steps == 0:
            return tf.constant(self.eps, tf.float32)
        step = tf.cast(self.optimizer.iterations + 1, tf.float32)
        return self.eps * tf.minimum(1.0, step / float(self.eps_warmup_steps))

    def step_seed(self, stream):
        """A stateless seed per (step, stream, replica): reproducible, resumes exactly from a checkpoint
        (the step counter is the optimizer's), and differs between replicas."""
        step = tf.cast(self.optimizer.iterations, tf.int32)
        return tf.stack([self.seed * 1_000_003 + _replica_id(), step * 16 + stream])

    def threat(self, eps):
        """The threat model of training and validation at radius `eps` (see rvs_tf.threat_model)."""
        return ThreatModel.of(self.norm, eps)

    def noise(self, stream):
        """The uniform draws `ThreatModel.random` takes, stateless from `step_seed(stream)`: salt 0 draws
        with that seed itself (what the L-inf methods always drew), other salts with a fold-in of it."""
        seed = self.step_seed(stream)

        def draw(shape, low, high, salt):
            key = seed if salt == 0 else tf.random.experimental.stateless_fold_in(seed, salt)
            return tf.random.stateless_uniform(shape, key, low, high)
        return draw

    def logits(self, x, training):
        return tf.cast(self.classifier(x, training=training), tf.float32)

    def cross_entropy_of(self, y):
        """images -> per-example CE of the classifier in inference mode: what the training attacks ascend."""
        return lambda images: tf.nn.sparse_softmax_cross_entropy_with_logits(
            y, self.logits(images, training=False))

    def targets(self, y):
        return smooth_labels(y, self.num_classes, self.label_smoothing)

    @staticmethod
    def cross_entropy(targets, logits, weights=None):
        """Mean over the batch of each example's CE, times its weight (fit's sample_weight or class_weight)
        when given: Keras's sum_over_batch_size convention. (Scaling the targets instead would be wrong:
        TF's fused CE gradient assumes targets that sum to 1.)"""
        return RobustModel.weighted_mean(keras.losses.categorical_crossentropy(targets, logits, from_logits=True),
                                         weights)

    @staticmethod
    def weighted_mean(per_example, weights=None):
        """Mean over the batch of a per-example term [B], each times its weight when `weights` is given."""
        return tf.reduce_mean(per_example if weights is None else per_example * weights)

    def regularised(self, loss):
        """Adds the kernel weight decay and any regularisation losses of the classifier's own layers."""
        if self.weight_decay:
            loss += self.weight_decay * kernel_l2(self.classifier.trainable_variables)
        if self.classifier.losses:
            loss += tf.add_n([tf.cast(extra, tf.float32) for extra in self.classifier.losses])
        return loss

    @staticmethod
    def gradient_loss(loss, optimizer):
        """The loss to differentiate (call it inside the tape): divided by the replica count because
        the optimizer sums gradients across replicas, and scaled when the optimizer scales losses
        (mixed precision)."""
        return optimizer.scale_loss(loss / _replica_count())

    @staticmethod
    def descend(tape, gradient_loss, optimizer, variables):
        optimizer.apply_gradients(zip(tape.gradient(gradient_loss, variables), variables))

    @staticmethod
    def unpack(data):
        """(images, integer labels [B], per-example weights [B] float32 or None) of a batch."""
        if not isinstance(data, (tuple, list)) or len(data) < 2:
            raise ValueError("Expected batches of (images, labels) with integer labels; "
                             f"got {type(data).__name__}")
        weights = data[2] if len(data) > 2 else None  # Keras passes (x, y, None) without weights
        if weights is not None:
            weights = tf.reshape(tf.cast(weights, tf.float32), [-1])
        x, y = data[0], data[1]
        if y.shape.rank is not None and y.shape.rank > 1 and y.shape[-1] not in (1, None):
            raise ValueError(f"labels: expected integer class indices of shape [batch], got shape {y.shape} "
                             "(one-hot labels? pass tf.argmax(labels, -1))")
        return guards.checked_images(x), tf.reshape(tf.cast(y, tf.int64), [-1]), weights

    def test_step(self, data):
        """Clean accuracy, and accuracy under FGSM and PGD (`eval_pgd_steps`, CE, random start) at eps.
        A large FGSM-PGD gap is the signature of catastrophic overfitting (`rvs_tf.monitors`). The PGD's
        random start is a function of the step count (stream 15), so a resumed run validates exactly as an
        uninterrupted one, and the best epoch is not picked by the draw of the noise."""
        x, y, weights = self.unpack(data)
        clean_logits = self.logits(x, training=False)
        inference = lambda images: self.logits(images, training=False)  # noqa: E731
        x_pgd = attacks.pgd(inference, x, y, eps=self.eps, steps=self.eval_pgd_steps, seed=self.step_seed(15),
                            norm=self.norm)
        x_fgsm = attacks.fgsm(inference, x, y, eps=self.eps, norm=self.norm)
        self.loss_tracker.update_state(self.cross_entropy(self.targets(y), clean_logits, weights))
        self.accuracy_tracker.update_state(y, clean_logits, sample_weight=weights)
        self.pgd_accuracy_tracker.update_state(y, self.logits(x_pgd, training=False), sample_weight=weights)
        self.fgsm_accuracy_tracker.update_state(y, self.logits(x_fgsm, training=False), sample_weight=weights)
        return {m.name: m.result() for m in (self.loss_tracker, self.accuracy_tracker,
                                              self.pgd_accuracy_tracker, self.fgsm_accuracy_tracker)}


# The RVS model lives in rvs_tf.rvs; imported last (it builds on RobustModel) so that
# `from rvs_tf.training import RVSModel` keeps working.
from rvs_tf.rvs import (BOUNDS, FEATURE_DISTANCES, OT_TARGETS, RVS_UPDATES, GeneratorGame,  # noqa: E402,F401
                        RVSModel)
