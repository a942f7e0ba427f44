"""RVSInitModel: a generator that learns where one FGSM step should start (FGSM-SDI, Jia et al. 2022).

RVS's generator sees only noise, so what it synthesises is bounded noise (benchmarks/FINDINGS.md). Here
the generator sees the image and the sign of its clean input gradient (and noise z), and sets up a
gradient step instead of replacing it:

  s       = sign(d CE(f(x), y) / dx)                                    clean input gradient
  x_0     = clip01(x + eps * tanh(G([x, s, z])))                        a start inside the eps-ball
            [+ noise_ratio * eps * U(-1, 1): N-FGSM's noise under the learned start, if asked]
  x_adv   = proj_eps,[0,1](x_0 + alpha * sign(d CE(f(x_0), y) / dx_0))  one signed step, projected
  f       <- descend CE(f(x_adv), smooth(y)) [+ pairing * mean (f(x_adv) - f(x_0))^2]
                                             [+ ot_weight * OT(h(x), h(x_adv))]
  G       <- ascend CE(f(x_adv(G)), y) through x_0, every `generator_every` classifier steps

The generator's gradient flows through the start (the signed step is piecewise constant). The attacks
run on the classifier in inference mode, so crafting never moves BatchNorm statistics.
"""
import keras
import tensorflow as tf

from rvs_tf.arguments import check
from rvs_tf.baselines import input_gradient
from rvs_tf.rvs import GeneratorGame


@keras.saving.register_keras_serializable(package="rvs_tf")
class RVSInitModel(GeneratorGame):
    """Learned initialisation of one FGSM step: the generator-based method on the single-step front.

    Args:
      classifier: a Keras model from images in [0, 1] to logits (with `feature_layer` if `ot_weight` > 0).
      generator: maps [B, H, W, 2C + noise channels] (image, sign of its input gradient, noise) to a raw
        start [B, H, W, C]; `rvs_tf.models.make_init_generator` builds one.
      eps: the budget in `norm`'s units (L-inf by default; under L2 the start is projected onto the L2
        ball of radius start_ratio * eps, the noise is a uniform point of the ball of radius noise_ratio *
        eps and the step follows the L2-normalised gradient); every training example stays inside the
        eps-ball (with `project`) and [0, 1].
      step_ratio: alpha, the signed step from the start, in units of eps (FGSM-SDI: 1).
      start_ratio: the learned start lies within start_ratio * eps of x (default 1: inside the eps-ball).
      noise_ratio: uniform noise of up to noise_ratio * eps per pixel added to the learned start (default
        0: none). N-FGSM's lesson: wide noise under the start keeps single-step training from overfitting
        catastrophically; the generator learns an offset on top of it. The start then lies within
        (noise_ratio + start_ratio) * eps of x; with `project=False` the training perturbation reaches
        (noise_ratio + start_ratio + step_ratio) * eps by design.
      project: project the final example onto the eps-ball (default). With `project=False` and
        `start_ratio=2` the method is a learned N-FGSM: its training perturbation reaches
        (start_ratio + step_ratio) eps by design, as N-FGSM's; evaluation stays at eps.
      generator_every: k, classifier steps per generator step (FGSM-SDI: 20). Between those steps the
        generator's weights do not move and its step costs nothing.
      pairing_weight: weight of the logit-pairing term between the start and the adversarial example
        (FGSM-PGI's regulariser; 0 turns it off).
      ot_weight: weight of RVS's feature OT term between the clean and adversarial batches (0: off, which
        also saves the clean training-mode forward pass). The other `ot_*` and `feature_distance`
        options are `RVSModel`'s.
      label_smoothing, weight_decay, eps_warmup_steps, eval_pgd_steps, seed: as `RobustModel`.

    Cost per classifier step: three forward-backward passes of the classifier (clean input gradient,
    gradient at the start, training step) and one generator forward pass; every k steps the generator
    step adds one more of each. PGD-10 training costs eleven.
    """

    def __init__(self, classifier, generator, *, eps, step_ratio=1.0, generator_every=20, pairing_weight=0.0,
                 ot_weight=0.0, label_smoothing=0.0, start_ratio=1.0, noise_ratio=0.0, project=True, **kwargs):
        super().__init__(classifier, generator, eps=eps, ot_weight=ot_weight, label_smoothing=label_smoothing,
                         **kwargs)
        check(float(step_ratio) > 0, f"step_ratio: expected > 0, got {step_ratio}")
        check(float(start_ratio) > 0, f"start_ratio: expected > 0, got {start_ratio}")
        check(float(noise_ratio) >= 0, f"noise_ratio: expected >= 0, got {noise_ratio}")
        check(int(generator_every) >= 1, f"generator_every: expected >= 1, got {generator_every}")
        check(float(pairing_weight) >= 0, f"pairing_weight: expected >= 0, got {pairing_weight}")
        image_shape = tuple(classifier.input_shape[1:])
        in_shape, out_shape = tuple(generator.input_shape[1:]), tuple(generator.output_shape[1:])
        check(out_shape == image_shape and len(in_shape) == 3 and in_shape[:2] == image_shape[:2]
              and in_shape[2] >= 2 * image_shape[2],
              f"generator: expected input [H, W, 2C + noise channels] and output [H, W, C] for images "
              f"{image_shape}, got input {in_shape} and output {out_shape} (see models.make_init_generator)")
        self.step_ratio = float(step_ratio)
        self.start_ratio = float(start_ratio)
        self.noise_ratio = float(noise_ratio)
        self.project = bool(project)
        self.generator_every = int(generator_every)
        self.pairing_weight = float(pairing_weight)
        self.noise_channels = int(in_shape[2] - 2 * image_shape[2])
        self.generator_loss_tracker = keras.metrics.Mean(name="generator_ce")

    def _extra_trackers(self):
        return [self.generator_loss_tracker]

    def get_config(self):
        return {**super().get_config(), "step_ratio": self.step_ratio, "generator_every": self.generator_every,
                "start_ratio": self.start_ratio, "noise_ratio": self.noise_ratio, "project": self.project,
                "pairing_weight": self.pairing_weight}

    # -- the perturbation ------------------------------------------------------------------------------
    def gradient_sign(self, x, y):
        return tf.stop_gradient(tf.sign(input_gradient(self.cross_entropy_of(y), x)))

    def start(self, x, gradient_sign, eps, stream, training=True):
        """x_0 = clip01(x [+ noise_ratio * eps * U(-1, 1)] + start_ratio * eps * tanh(G([x, s, z]))): within
        (noise_ratio + start_ratio) * eps of x by construction."""
        noise = tf.random.stateless_normal(tf.concat([tf.shape(x)[:-1], [self.noise_channels]], 0),
                                           seed=self.step_seed(stream))
        raw = tf.cast(self.generator(tf.concat([x, gradient_sign, noise], -1), training=training), tf.float32)
        offset = self.start_ratio * eps * tf.tanh(raw)
        start = x + (offset if self.norm == "linf" else self.threat(self.start_ratio * eps).project(offset))
        if self.noise_ratio:
            start += self.threat(self.noise_ratio * eps).random(tf.shape(x), self.noise(stream + 8))
        return tf.clip_by_value(start, 0.0, 1.0)

    def step_from(self, x, y, start, eps):
        """One steepest-ascent step (L-inf: signed) of alpha from the start, projected onto the eps-ball (if
        `project`) and [0, 1]. The gradient passes through the start only (the direction is held fixed)."""
        threat = self.threat(eps)
        gradient = input_gradient(self.cross_entropy_of(y), tf.stop_gradient(start))
        direction = tf.stop_gradient(threat.ascent(gradient))
        if not self.project:
            return tf.clip_by_value(start + self.step_ratio * eps * direction, 0.0, 1.0)
        return threat.clip(start + self.step_ratio * eps * direction, x)

    def adversarial_examples(self, x, y, eps):
        """The examples the classifier trains on (for summaries and diagnostics)."""
        x, y = tf.cast(x, tf.float32), tf.reshape(tf.cast(y, tf.int64), [-1])
        start = self.start(x, self.gradient_sign(x, y), eps, stream=2, training=False)
        return self.step_from(x, y, start, eps)

    # -- the step --------------------------------------------------------------------------------------
    def generator_gradients(self, x, y, gradient_sign, eps):
        """(CE at the final example, gradients of -CE for the generator): the generator ascends the
        classifier's loss through the start."""
        variables = self.generator.trainable_variables
        with tf.GradientTape() as tape:
            x_adv = self.step_from(x, y, self.start(x, gradient_sign, eps, stream=0), eps)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                y, self.logits(x_adv, training=False)))
            gradient_loss = self.gradient_loss(-loss, self.generator_optimizer)
        return loss, tape.gradient(gradient_loss, variables)

    def generator_step(self, x, y, gradient_sign, eps):
        """One generator step now (outside `fit`'s schedule); returns the CE it ascended."""
        loss, gradients = self.generator_gradients(x, y, gradient_sign, eps)
        self.generator_optimizer.apply_gradients(zip(gradients, self.generator.trainable_variables))
        return loss

    def _apply_when_due(self, strategy, due, gradients):
        """Cross-replica: step the generator only when due. A strategy cannot run an optimizer's
        merge_call inside a tf.cond in replica context, so the cond sits here, in the one unconditional
        merge_call of every step, and re-enters the replicas to apply (as Keras's LossScaleOptimizer)."""
        variables = self.generator.trainable_variables
        due = strategy.experimental_local_results(due)[0]  # the same on every replica

        def apply():
            strategy.extended.call_for_each_replica(
                lambda grads: self.generator_optimizer.apply_gradients(zip(grads, variables)), args=(gradients,))

        tf.cond(due, apply, lambda: None)

    def train_step(self, data):
        x, y, weights = self.unpack(data)
        eps = self.current_eps()
        gradient_sign = self.gradient_sign(x, y)
        variables = self.generator.trainable_variables
        if variables:  # the generator's gradients only every k steps; its step (or none) in cross-replica
            due = tf.equal(self.optimizer.iterations % self.generator_every, 0)
            generator_loss, gradients = tf.cond(
                due, lambda: self.generator_gradients(x, y, gradient_sign, eps),
                lambda: (tf.constant(0.0), [tf.zeros_like(v) for v in variables]))
            tf.distribute.get_replica_context().merge_call(self._apply_when_due, args=(due, gradients))
            self.generator_loss_tracker.update_state(generator_loss, sample_weight=tf.cast(due, tf.float32))
        start = tf.stop_gradient(self.start(x, gradient_sign, eps, stream=2, training=False))
        x_adv = tf.stop_gradient(self.step_from(x, y, start, eps))
        with tf.GradientTape() as tape:
            if self.ot_weight:
                logits, adversarial = self.heads(x_adv)
                loss = self.ot_weight * self.transport_cost(self.heads(x)[1], adversarial)
            else:
                logits, loss = self.logits(x_adv, training=True), 0.0
            loss += self.cross_entropy(self.targets(y), logits, weights)
            if self.pairing_weight:
                start_logits = self.logits(start, training=True)
                loss += self.pairing_weight * self.weighted_mean(
                    tf.reduce_mean(tf.square(logits - start_logits), -1), weights)
            loss = self.regularised(loss)
            gradient_loss = self.gradient_loss(loss, self.optimizer)
        self.descend(tape, gradient_loss, self.optimizer, self.classifier.trainable_variables)
        self.loss_tracker.update_state(loss)
        self.adv_accuracy_tracker.update_state(y, logits)
        return {m.name: m.result() for m in (self.loss_tracker, self.generator_loss_tracker,
                                              self.adv_accuracy_tracker)}
