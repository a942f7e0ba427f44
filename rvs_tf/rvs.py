"""RVSModel (Robustness-via-Synthesis) and GeneratorGame, the base of the methods where a generator plays
against the classifier.

The RVS step (DESIGN.md section 1), per batch (x, y) with budget eps:
  generator step:  x_adv = proj(clip01(x + U(-eps, eps)) + bound(G(z)))   z ~ N(0, I), G never sees x
                   G <- G - lr_g * d(-OT(h(x), h(x_adv)))/dG                h = penultimate features
  classifier step: fresh z, x_adv as above (no gradient into G)
                   f <- f - lr * d(CE(f(x_adv), smooth(y)) + lambda * OT(h(x), h(x_adv)) + wd)/df
"""
from typing import NamedTuple

import keras
import tensorflow as tf

from rvs_tf import sinkhorn
from rvs_tf.arguments import check
from rvs_tf.models import FEATURES_LAYER
from rvs_tf.training import RobustModel

BOUNDS = ("clip", "tanh")
OT_TARGETS = ("features", "logits")
FEATURE_DISTANCES = ("sinkhorn", "paired_mse")
# What the feature term is measured in: raw squared feature units up to a reference spread of the clean
# features and relative to their spread beyond it ("spread"), or raw units always (the authors').
OT_UNITS = ("spread", "absolute")
# The reference spread: above the largest the default small CNN reaches (5.0, Fashion-MNIST, RVS), so the
# default CNN trains in raw units exactly as the authors'; BatchNorm features are 6-8x larger in scale.
REFERENCE_SPREAD = 8.0
RVS_UPDATES = ("alternating", "simultaneous")
# The OT term's start-share cap (`RVSModel(ot_share_cap=...)`): measured over this many classifier steps
# once eps has reached its value, then held. The default cap sits above the default small CNN's share at
# the quick start's settings (0.27-0.35 at eps 0.1, seeds 0-2, Fashion-MNIST), so the cap never binds
# there, and below the share of the BatchNorm + global-pooling classifier whose ReLU embedding the term
# made blind to the image (1.76-1.88; benchmarks/BN_CLASSIFIERS.md).
OT_SHARE_STEPS = 8
DEFAULT_OT_SHARE_CAP = 0.6
# The Sinkhorn options a model takes as `ot_<name>` keyword arguments (the rest keep their defaults).
OT_KEYWORDS = ("epsilon", "cost_scale", "max_iters", "gradient", "debiased")


class RVSStep(NamedTuple):
    """What one RVS update reports, by name (the step's trackers read these).

    loss: the classifier's total objective. ce, ot: its cross-entropy and transport terms.
    generator_ot: the transport cost the generator ascended (`ot` when both players share one value).
    clean_logits, logits: the classifier's logits on the clean and the synthesised batch.
    """

    loss: tf.Tensor
    ce: tf.Tensor
    ot: tf.Tensor
    generator_ot: tf.Tensor
    clean_logits: tf.Tensor
    logits: tf.Tensor


class GeneratorGame(RobustModel):
    """Base of the methods where a generator plays against the classifier: one optimizer per player,
    both built in the strategy scope at `compile`, loss scaling for each under mixed precision, the
    generator saved with the model, and the feature-matching term (entropic OT between the clean and
    perturbed batches' features, or its paired-MSE ablation) that either player may use.

    Args:
      classifier, eps, label_smoothing, weight_decay, ...: as `RobustModel`.
      generator: the perturbation generator (a Keras model); `trainable = False` freezes it.
      feature_layer: the classifier's layer whose output the feature term compares.
      ot_weight, ot_on, ot_epsilon, ot_cost_scale, ot_max_iters, ot_gradient, ot_debiased,
        feature_distance: the feature term (see `RVSModel`); the `ot_*` Sinkhorn options are kept as one
        `sinkhorn.SinkhornOptions`, `ot_options`.
    """

    def __init__(self, classifier, generator, *, eps, feature_layer=FEATURES_LAYER, ot_weight=1.0,
                 ot_on="features", ot_epsilon=0.01, ot_cost_scale="mean", ot_max_iters=100,
                 ot_gradient="implicit", ot_debiased=False, feature_distance="sinkhorn", ot_units="spread",
                 **kwargs):
        super().__init__(classifier, eps=eps, **kwargs)
        check(isinstance(generator, keras.Model),
              f"generator: expected a keras.Model, got {type(generator).__name__}")
        check(ot_on in OT_TARGETS, f"ot_on: expected one of {OT_TARGETS}, got {ot_on!r}")
        check(float(ot_weight) >= 0, f"ot_weight: expected >= 0, got {ot_weight}")
        check(feature_distance in FEATURE_DISTANCES,
              f"feature_distance: expected one of {FEATURE_DISTANCES}, got {feature_distance!r}")
        check(ot_units in OT_UNITS, f"ot_units: expected one of {OT_UNITS}, got {ot_units!r}")
        self.generator = generator
        self.feature_layer = feature_layer
        self.ot_weight = float(ot_weight)
        self.ot_on = ot_on
        self.feature_distance = feature_distance
        self.ot_units = ot_units
        self.ot_options = sinkhorn.SinkhornOptions(  # validated here, before any step
            epsilon=float(ot_epsilon), cost_scale=ot_cost_scale, max_iters=int(ot_max_iters),
            gradient=ot_gradient, debiased=bool(ot_debiased))
        # A two-headed view of the classifier (logits, features) sharing its layers. It is not tracked as
        # a sub-layer, so saving stores the classifier's weights once, under `classifier`.
        object.__setattr__(self, "_two_headed", self._make_two_headed(classifier, feature_layer))

    @staticmethod
    def _make_two_headed(classifier, feature_layer):
        try:
            features = classifier.get_layer(feature_layer).output
        except ValueError:
            names = [layer.name for layer in classifier.layers]
            raise ValueError(f"feature_layer: classifier {classifier.name!r} has no layer "
                             f"{feature_layer!r}; its layers are {names}") from None
        except AttributeError:
            raise ValueError("feature_layer: the classifier must be a functional or Sequential Keras "
                             "model so that a named layer's output can be read") from None
        return keras.Model(classifier.inputs, [classifier.outputs[0], features])

    def get_config(self):
        config = super().get_config()
        config.update(
            generator=keras.saving.serialize_keras_object(self.generator),
            feature_layer=self.feature_layer, ot_weight=self.ot_weight, ot_on=self.ot_on,
            feature_distance=self.feature_distance, ot_units=self.ot_units,
            **{f"ot_{key}": getattr(self.ot_options, key) for key in OT_KEYWORDS})
        return config

    @classmethod
    def from_config(cls, config):
        # A model saved before `ot_units` existed trained in raw squared feature units: keep them.
        return super().from_config({"ot_units": "absolute", **config})

    def _optimizers(self):
        return {"classifier_optimizer": self.optimizer, "generator_optimizer": self.generator_optimizer}

    def compile(self, classifier_optimizer="sgd", generator_optimizer="sgd", **kwargs):
        """Compile with one optimizer per player. Both are built on their variables here, inside the
        model's strategy scope, which is what makes a two-optimizer step work under MirroredStrategy."""
        if "optimizer" in kwargs or "loss" in kwargs or "metrics" in kwargs:
            raise ValueError(f"{type(self).__name__}.compile takes classifier_optimizer= and "
                             "generator_optimizer= (its losses and metrics are built in), got "
                             + ", ".join(sorted(kwargs)))
        self.generator_optimizer = keras.optimizers.get(generator_optimizer)
        if keras.config.dtype_policy().name == "mixed_float16" and not isinstance(
                self.generator_optimizer, keras.optimizers.LossScaleOptimizer):
            self.generator_optimizer = keras.optimizers.LossScaleOptimizer(self.generator_optimizer)
        super().compile(optimizer=classifier_optimizer, **kwargs)

    def _build_optimizers(self):
        super()._build_optimizers()
        with self.distribute_strategy.scope():
            self.generator_optimizer.build(self.generator.trainable_variables)

    def heads(self, x, training=True):
        """(logits, feature-term inputs) of the classifier, in float32."""
        logits, features = self._two_headed(x, training=training)
        logits = tf.cast(logits, tf.float32)
        return logits, (logits if self.ot_on == "logits" else tf.cast(features, tf.float32))

    def transport_cost(self, clean, adversarial):
        """The feature distance: entropic OT between the two batches (RVS), or the ablation control
        "paired_mse", the mean squared distance between h(x_i) and h(x_adv_i); with `ot_units="spread"`
        scaled by `spread_factor(clean)`."""
        if self.feature_distance == "paired_mse":
            distance = tf.reduce_mean(tf.reduce_sum(tf.square(clean - adversarial), axis=-1))
        else:
            distance = sinkhorn.entropic_ot(clean, adversarial, options=self.ot_options)
        if self.ot_units == "spread":
            distance *= spread_factor(clean)
        return distance


def feature_spread(features):
    """The mean squared distance of a batch's feature vectors from their mean (the trace of their
    covariance), in squared feature units."""
    centred = features - tf.reduce_mean(features, axis=0, keepdims=True)
    return tf.reduce_mean(tf.reduce_sum(tf.square(centred), axis=-1))


def spread_factor(clean, reference=REFERENCE_SPREAD):
    """min(1, reference / spread of the clean features), gradient included.

    Why: in raw squared feature units the OT term's pull on the classifier grows with the feature scale.
    BatchNorm puts features at 6-8x the default CNN's scale, so the term outweighs the cross-entropy and
    the classifier kills its features or makes them blind to the image (guards.FeatureCollapseGuard).
    Above the reference spread the term is measured relative to the spread, so shrinking the features no
    longer lowers it (with the factor held fixed, measured: BatchNorm classifiers still collapse). Below
    the reference the factor is 1 with no gradient: the default small CNN, whose spread stays under 5.1,
    trains exactly as in raw units. Relative units everywhere would not do: the classifier then lowers
    the term by inflating its features (measured on the default CNN: spread 0.4 -> 50 in 450 steps, and
    8 points of validation PGD-10 lost).
    """
    return tf.minimum(1.0, reference / tf.maximum(feature_spread(clean), 1e-12))


@keras.saving.register_keras_serializable(package="rvs_tf")
class RVSModel(GeneratorGame):
    """Robustness-via-Synthesis: a generator of bounded perturbations trained against the classifier.

    Args:
      classifier: a Keras model from images in [0, 1] to logits, with a layer named `feature_layer`
        whose output is the penultimate feature vector (the OT term compares those).
      generator: a Keras model from noise [B, noise_dim] to a raw perturbation [B, H, W, C].
      eps: L-inf budget. `bound`: "clip" (authors: hard clip of G(z) to [-eps, eps]) or "tanh"
        (eps * tanh(G(z)), gradients everywhere).
      ot_weight: lambda of the classifier loss. `ot_on`: "features" (authors) or "logits".
      ot_epsilon, ot_cost_scale, ot_max_iters, ot_gradient, ot_debiased: passed to
        `rvs_tf.sinkhorn.entropic_ot` (see there). Default: epsilon 0.01 relative to the mean cost, which
        converges in tens of iterations; the authors' absolute 0.01 (`ot_cost_scale=None`) on raw
        features does not converge in 100 iterations, so most of the mass goes missing from the plan
        and the term comes out far below the transport cost (flags/cifar10_paper.cfg keeps it).
        `feature_distance`: "sinkhorn" (RVS) or "paired_mse" (the ablation that replaces OT by the mean
        squared distance of paired features).
      ot_units: "spread" (default): raw squared feature units while the clean batch's feature spread is
        under REFERENCE_SPREAD, relative to the spread above it (`spread_factor`), so that the term's pull
        does not grow with the feature scale: BatchNorm classifiers train with the defaults, and the
        default small CNN trains exactly as in raw units. "absolute": raw units always, the authors'
        (their flag files name it), under which BatchNorm classifiers stall or collapse.
      ot_share_cap: a cap on the OT term's pull at the start of training: the mean over the first
        OT_SHARE_STEPS classifier steps at full eps of |d(ot_weight * OT)/dw| / |d CE/dw|
        (`ot_start_share`, saved with the weights) is measured, and where it exceeds the cap the term's
        weight is multiplied by cap / share from then on (`ot_scale()`; the first measured step runs at
        full weight). Default 0.6: the default small CNN at eps 0.1 measures 0.27-0.35 and trains
        exactly as without it (at eps 0.2 it measures about 0.95, and the cap binds); a BatchNorm +
        global-pooling classifier measured 1.76-1.88 and stalled at full weight (47% against natural
        training's 81% clean after 600 steps, 77% with the cap). None: no cap, the authors' (their flag
        files name it). Two extra backward passes on each measured step.
      label_smoothing: authors' 0.5 (true class keeps 1 - s). `clean_ce_weight`: an optional CE term on
        the clean batch (authors: 0). `random_start`: the uniform start of step 3 (authors: on).
      weight_decay: 2e-4 in the authors' recipe, on the classifier's kernels.
      A generator with `trainable = False` stays at its initialisation (bounded noise of the same form,
      no synthesis: the ablation control); its step is skipped.
      rvs_update: how the two players move each step.
        "alternating" (the authors'): a generator step on -OT, then a classifier step on a fresh z
          against the updated generator: a sequential game in which the classifier answers the
          generator's latest move. Cost: the clean forward pass is shared by both players (the weights do
          not change in between), so three forward passes of the classifier and a backward pass for each
          player: about 9 forward-pass units plus the generator twice, natural training being 3.
        "simultaneous": one forward pass of x and x_adv under one tape; the classifier's gradient of
          CE + lambda * OT and the generator's gradient of -OT are both taken at the same point and
          applied together (simultaneous gradient descent-ascent). Both players react to the other's
          previous move, which can oscillate where the alternating game settles, but the forward pass is
          shared. Because the two losses differ, the generator's gradient needs its own backward pass
          through the classifier at x_adv (the backward of CE + lambda * OT cannot be split into its OT
          part), so the cost is about 8 units plus the generator once, not 6.

    Under data parallelism (MirroredStrategy, MultiWorkerMirroredStrategy) each replica computes the OT
    term between the clean and synthesised measures of its own per-replica batch, and the loss that is
    optimised is the mean over replicas of those terms (plus the mean cross-entropy, which equals the
    cross-entropy of the global batch). This is deliberate: the authors tuned the term on batches of 64,
    so a per-replica batch of 64 keeps the problem they studied however many devices there are; each
    Sinkhorn solve stays a local B/k x B/k problem (no all-gather of features and no collective inside
    the loop, memory O((B/k)^2) per device); and the generator gets one perturbation per z on every
    replica. The price: a run on k replicas optimises mean_r OT(batch_r), not OT(global batch), so it
    matches a single-device run with batch B/k in its OT term, and a single-device run with batch B only
    in the terms that are means over examples (cross-entropy, weight decay, accuracies).
    `RobustModel.compile` turns `jit_compile=True` off (with a warning) when there are several replicas.
    Mixed precision: under `mixed_float16` the logits, losses and OT are computed in float32 and both
    optimizers are `LossScaleOptimizer`s.
    """

    def __init__(self, classifier, generator, *, eps, bound="clip", random_start=True, ot_weight=1.0,
                 clean_ce_weight=0.0, label_smoothing=0.5, rvs_update="alternating",
                 ot_share_cap=DEFAULT_OT_SHARE_CAP, **kwargs):
        super().__init__(classifier, generator, label_smoothing=label_smoothing, eps=eps, ot_weight=ot_weight,
                         **kwargs)
        check(bound in BOUNDS, f"bound: expected one of {BOUNDS}, got {bound!r}")
        check(float(clean_ce_weight) >= 0, f"clean_ce_weight: expected >= 0, got {clean_ce_weight}")
        check(rvs_update in RVS_UPDATES, f"rvs_update: expected one of {RVS_UPDATES}, got {rvs_update!r}")
        check(ot_share_cap is None or float(ot_share_cap) > 0,
              f"ot_share_cap: expected a number > 0, or None for no cap, got {ot_share_cap}")
        image_shape = tuple(classifier.input_shape[1:])
        check(tuple(generator.output_shape[1:]) == image_shape,
              f"generator: output shape {tuple(generator.output_shape[1:])} does not match the "
              f"classifier's input shape {image_shape}")
        self.bound = bound
        self.random_start = bool(random_start)
        self.clean_ce_weight = float(clean_ce_weight)
        self.rvs_update = rvs_update
        self.ot_share_cap = None if ot_share_cap is None else float(ot_share_cap)
        # [sum, count] of |d(ot_weight * OT)/dw| / |d CE/dw| over the steps measured so far (a counter of
        # its own: a loss-scaled step that is skipped does not advance the optimizer's). Saved with the
        # weights, so a resumed run keeps the scale it started with.
        self.ot_share_state = self.add_weight(shape=(2,), initializer="zeros", trainable=False,
                                              name="ot_share_state", aggregation="only_first_replica")
        self.noise_dim = int(generator.input_shape[-1])
        self.ce_tracker = keras.metrics.Mean(name="ce_loss")
        self.ot_tracker = keras.metrics.Mean(name="ot_loss")
        self.generator_ot_tracker = keras.metrics.Mean(name="generator_ot")

    def _extra_trackers(self):
        return [self.ce_tracker, self.ot_tracker, self.generator_ot_tracker]

    def get_config(self):
        config = super().get_config()
        config.update(bound=self.bound, random_start=self.random_start, clean_ce_weight=self.clean_ce_weight,
                      rvs_update=self.rvs_update, ot_share_cap=self.ot_share_cap)
        return config

    @classmethod
    def from_config(cls, config):
        # A model saved before `ot_share_cap` existed trained without it: keep it so.
        return super().from_config({"ot_share_cap": None, **config})

    def load_own_variables(self, store):
        """Weights saved before the start share existed have none of RVSModel's own: the share is then
        marked as measured at 0, so the term keeps the full weight it trained with."""
        if len(store.keys()) == 0:
            self.ot_share_state.assign([0.0, float(OT_SHARE_STEPS)])
            return
        super().load_own_variables(store)

    @property
    def ot_start_share(self):
        """The mean of |d(ot_weight * OT)/dw| / |d CE/dw| over the classifier's weights on the steps
        measured so far (the first OT_SHARE_STEPS once eps has reached its value); 0 before any."""
        state = tf.convert_to_tensor(self.ot_share_state)
        return state[0] / tf.maximum(state[1], 1.0)

    def ot_scale(self):
        """The factor on the OT term's weight: min(1, ot_share_cap / the share measured at the start),
        1 when there is no cap or nothing is measured yet."""
        share = self.ot_start_share
        if self.ot_share_cap is None:
            return tf.ones_like(share)
        return tf.where(share > self.ot_share_cap, self.ot_share_cap / tf.maximum(share, 1e-12), 1.0)

    def measure_ot_share(self, tape, ce, ot):
        """On the first OT_SHARE_STEPS classifier steps at full eps (after `eps_warmup_steps`: the share
        grows with eps), add this batch's gradient share of the OT term to `ot_share_state` (two extra
        backward passes on those steps only; the replicas' mean under a strategy). Why: the OT term's pull
        against the CE's depends on the classifier (features BatchNorm puts at unit scale, global
        pooling); where it is several times the CE's at the start, the classifier makes its features
        blind to the image and stalls (guards.FeatureCollapseGuard). `tape` must be persistent and have
        recorded `ce` and `ot`."""
        if self.ot_share_cap is None or not self.ot_weight:
            return
        state = tf.convert_to_tensor(self.ot_share_state)
        measuring = tf.logical_and(self.optimizer.iterations >= self.eps_warmup_steps,
                                   state[1] < OT_SHARE_STEPS)

        def measure():
            variables = self.classifier.trainable_variables
            ce_norm = tf.linalg.global_norm(tape.gradient(ce, variables))
            ot_norm = tf.linalg.global_norm(tape.gradient(ot, variables))
            return self.ot_weight * ot_norm / tf.maximum(ce_norm, 1e-12)

        share = tf.cond(measuring, measure, lambda: tf.constant(0.0))
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:  # a sync point: never inside the cond
            share = context.all_reduce("MEAN", share)
        self.ot_share_state.assign(state + tf.cast(measuring, tf.float32) * tf.stack([share, 1.0]))

    # -- the RVS step ---------------------------------------------------------------------------------
    def synthesize(self, x, eps, stream):
        """x_adv = clip01(proj_eps(clip01(x + U(ball)) + bound(G(z)))): under L-inf bound(G) is eps * tanh(G)
        or G clipped to +-eps; under L2 the same, then projected onto the L2 ball."""
        threat = self.threat(eps)
        z = tf.random.stateless_normal([tf.shape(x)[0], self.noise_dim], seed=self.step_seed(stream))
        raw = tf.cast(self.generator(z, training=True), tf.float32)
        delta = eps * tf.tanh(raw) if self.bound == "tanh" else tf.clip_by_value(raw, -eps, eps)
        if threat.norm != "linf":
            delta = threat.project(delta)
        start = x
        if self.random_start:
            start = tf.clip_by_value(x + threat.random(tf.shape(x), self.noise(stream + 1)), 0.0, 1.0)
        return threat.clip(start + delta, x)

    def adversarial_examples(self, x, y, eps):
        """A synthesised batch, as the classifier step sees it (for summaries and diagnostics)."""
        del y  # the generator never sees the labels (nor the images)
        return self.synthesize(tf.cast(x, tf.float32), eps, stream=0)

    def classifier_objective(self, targets, clean_logits, clean, logits, adversarial, weights=None):
        """(total, CE, OT) of the classifier: CE on the synthesised batch + lambda * OT (+ clean CE, wd)."""
        ce = self.cross_entropy(targets, logits, weights)
        ot = self.transport_cost(clean, adversarial)
        loss = ce + self.ot_weight * self.ot_scale() * ot
        if self.clean_ce_weight:
            loss += self.clean_ce_weight * self.cross_entropy(targets, clean_logits, weights)
        return self.regularised(loss), ce, ot

    def train_step(self, data):
        x, y, weights = self.unpack(data)
        step = self.simultaneous_step if self.rvs_update == "simultaneous" else self.alternating_step
        result = step(x, y, self.current_eps(), weights)
        self.loss_tracker.update_state(result.loss)
        self.ce_tracker.update_state(result.ce)
        self.ot_tracker.update_state(result.ot)
        self.generator_ot_tracker.update_state(result.generator_ot)
        self.accuracy_tracker.update_state(y, result.clean_logits)
        self.adv_accuracy_tracker.update_state(y, result.logits)
        validation_only = (self.pgd_accuracy_tracker, self.fgsm_accuracy_tracker)
        return {m.name: m.result() for m in self.metrics if all(m is not v for v in validation_only)}

    def alternating_step(self, x, y, eps, weights=None):
        """The authors' update: a generator step, then a classifier step on a fresh z; an `RVSStep`.

        The generator step leaves the classifier's weights unchanged, so the clean forward pass is run
        once, under the classifier's tape, and its features serve both players: the authors run it twice.
        The gradients are the same; only BatchNorm's moving averages see one clean batch a step instead
        of two (one pass cheaper)."""
        generator_variables = self.generator.trainable_variables  # empty when frozen: no generator step
        targets = self.targets(y)
        with tf.GradientTape(persistent=True) as classifier_tape:
            clean_logits, clean = self.heads(x)
            if generator_variables:
                with tf.GradientTape() as tape:  # generator: maximise the transport cost
                    _, adversarial = self.heads(self.synthesize(x, eps, stream=0))
                    generator_ot = self.transport_cost(tf.stop_gradient(clean), adversarial)
                    generator_loss = self.gradient_loss(-generator_ot, self.generator_optimizer)
                self.descend(tape, generator_loss, self.generator_optimizer, generator_variables)
            x_adv = tf.stop_gradient(self.synthesize(x, eps, stream=2))  # fresh z, the updated generator
            logits, adversarial = self.heads(x_adv)  # classifier: fit it, pull the features together
            loss, ce, ot = self.classifier_objective(targets, clean_logits, clean, logits, adversarial, weights)
            classifier_loss = self.gradient_loss(loss, self.optimizer)
        self.measure_ot_share(classifier_tape, ce, ot)
        self.descend(classifier_tape, classifier_loss, self.optimizer, self.classifier.trainable_variables)
        del classifier_tape
        return RVSStep(loss, ce, ot, generator_ot if generator_variables else ot, clean_logits, logits)

    def simultaneous_step(self, x, y, eps, weights=None):
        """Both players' gradients at the same point, from one forward pass, applied together; an
        `RVSStep`."""
        with tf.GradientTape(persistent=True) as tape:
            clean_logits, clean = self.heads(x)
            logits, adversarial = self.heads(self.synthesize(x, eps, stream=0))
            loss, ce, ot = self.classifier_objective(self.targets(y), clean_logits, clean, logits,
                                                     adversarial, weights)
            classifier_loss = self.gradient_loss(loss, self.optimizer)
            generator_loss = self.gradient_loss(-ot, self.generator_optimizer)
        self.measure_ot_share(tape, ce, ot)
        classifier_variables = self.classifier.trainable_variables
        generator_variables = self.generator.trainable_variables
        classifier_grads = tape.gradient(classifier_loss, classifier_variables)
        generator_grads = tape.gradient(generator_loss, generator_variables) if generator_variables else []
        del tape
        self.optimizer.apply_gradients(zip(classifier_grads, classifier_variables))
        if generator_variables:
            self.generator_optimizer.apply_gradients(zip(generator_grads, generator_variables))
        return RVSStep(loss, ce, ot, ot, clean_logits, logits)
