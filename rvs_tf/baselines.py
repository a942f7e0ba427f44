"""The defences RVS is compared with, as Keras models sharing `RobustModel`'s plumbing (validation
under PGD, label smoothing, weight decay, eps warm-up, saving), so that only the method differs.

  NaturalModel  cross-entropy on clean images.
  FGSMRSModel   "fast is better than free" (Wong et al. 2020): uniform start in the eps-ball, one signed
                gradient step of 1.25 eps, train on the result.
  PGDATModel    Madry et al. 2018: k signed gradient steps from a uniform random start (default 10 steps
                of 2.5 eps / k, as Madry's paper suggests), train on the result.
  TRADESModel   Zhang et al. 2019: CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising the KL from
                x + 0.001 N(0, 1) by k signed steps (defaults: beta 6, 10 steps of eps / 4).

The training attacks run on the classifier in inference mode (BatchNorm on its moving statistics), so
crafting an example never moves those statistics; the training loss runs in training mode. TRADES's
reference code does the same; Wong et al. and Madry et al. craft their examples in training mode (batch
statistics), which differs only for classifiers with BatchNorm (not the default small CNN).
"""
import keras
import tensorflow as tf

from rvs_tf.training import RobustModel, _check


def signed_ascent(loss_fn, x, start, eps, steps, step_size):
    """`steps` signed-gradient ascent steps on sum(loss_fn(x')) from `start`, each projected onto the
    eps-ball around x and [0, 1]; returns the last iterate, as the training attacks of these papers do
    (rvs_tf.attacks.pgd, an evaluation attack, keeps the worst iterate instead)."""
    lo, hi = tf.maximum(x - eps, 0.0), tf.minimum(x + eps, 1.0)

    def step(i, x_adv):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            loss = tf.reduce_sum(loss_fn(x_adv))
        return i + 1, tf.clip_by_value(x_adv + step_size * tf.sign(tape.gradient(loss, x_adv)), lo, hi)

    _, x_adv = tf.while_loop(lambda i, _: i < steps, step, (tf.constant(0), tf.clip_by_value(start, lo, hi)))
    return x_adv


@keras.saving.register_keras_serializable(package="rvs_tf")
class NaturalModel(RobustModel):
    """Cross-entropy on clean images (label smoothing and weight decay as configured)."""

    def adversarial_examples(self, x, y, eps):
        """The images the classifier is trained on (the clean ones here)."""
        return x

    def inference_logits(self, images):
        return self.logits(images, training=False)

    def train_step(self, data):
        x, y = self.unpack(data)
        x_train = self.adversarial_examples(x, y, self.current_eps())
        accuracy = self.accuracy_tracker if x_train is x else self.adv_accuracy_tracker
        with tf.GradientTape() as tape:
            logits = self.logits(tf.stop_gradient(x_train), training=True)
            loss = self.regularised(self.cross_entropy(self.targets(y), logits))
            gradient_loss = self.gradient_loss(loss, self.optimizer)
        self.descend(tape, gradient_loss, self.optimizer, self.classifier.trainable_variables)
        self.loss_tracker.update_state(loss)
        accuracy.update_state(y, logits)
        return {m.name: m.result() for m in (self.loss_tracker, accuracy)}


@keras.saving.register_keras_serializable(package="rvs_tf")
class FGSMRSModel(NaturalModel):
    """FGSM with a uniform random start (Wong et al. 2020), step `step_ratio` * eps (1.25 in the paper)."""

    def __init__(self, classifier, *, step_ratio=1.25, **kwargs):
        super().__init__(classifier, **kwargs)
        _check(float(step_ratio) > 0, f"step_ratio: expected > 0, got {step_ratio}")
        self.step_ratio = float(step_ratio)

    def get_config(self):
        return {**super().get_config(), "step_ratio": self.step_ratio}

    def uniform_start(self, x, eps):
        return x + eps * tf.random.stateless_uniform(tf.shape(x), self.step_seed(0), -1.0, 1.0)

    def cross_entropy_of(self, y):
        return lambda images: tf.nn.sparse_softmax_cross_entropy_with_logits(y, self.inference_logits(images))

    def adversarial_examples(self, x, y, eps):
        return signed_ascent(self.cross_entropy_of(y), x, self.uniform_start(x, eps), eps, 1,
                             self.step_ratio * eps)


@keras.saving.register_keras_serializable(package="rvs_tf")
class PGDATModel(FGSMRSModel):
    """PGD adversarial training (Madry et al. 2018): `steps` steps of `step_size` (None: 2.5 eps / steps)."""

    def __init__(self, classifier, *, steps=10, step_size=None, **kwargs):
        super().__init__(classifier, **kwargs)
        _check(int(steps) >= 1, f"steps: expected >= 1, got {steps}")
        _check(step_size is None or float(step_size) > 0, f"step_size: expected > 0, got {step_size}")
        self.steps = int(steps)
        self.step_size = None if step_size is None else float(step_size)

    def get_config(self):
        return {**super().get_config(), "steps": self.steps, "step_size": self.step_size}

    def adversarial_examples(self, x, y, eps):
        step_size = 2.5 * eps / self.steps if self.step_size is None else self.step_size
        return signed_ascent(self.cross_entropy_of(y), x, self.uniform_start(x, eps), eps, self.steps,
                             step_size)


@keras.saving.register_keras_serializable(package="rvs_tf")
class TRADESModel(PGDATModel):
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(p(x) || p(x')), x' from a KL ascent."""

    def __init__(self, classifier, *, beta=6.0, steps=10, step_size=None, **kwargs):
        super().__init__(classifier, steps=steps, step_size=step_size, **kwargs)
        _check(float(beta) >= 0, f"beta: expected >= 0, got {beta}")
        self.beta = float(beta)

    def get_config(self):
        return {**super().get_config(), "beta": self.beta}

    def adversarial_examples(self, x, y, eps):
        step_size = eps / 4 if self.step_size is None else self.step_size
        clean = tf.nn.softmax(self.inference_logits(x))
        start = x + 0.001 * tf.random.stateless_normal(tf.shape(x), seed=self.step_seed(0))
        return signed_ascent(lambda images: _kl(clean, self.inference_logits(images)), x, start, eps,
                             self.steps, step_size)

    def train_step(self, data):
        x, y = self.unpack(data)
        x_adv = tf.stop_gradient(self.adversarial_examples(x, y, self.current_eps()))
        with tf.GradientTape() as tape:
            clean_logits = self.logits(x, training=True)
            adv_logits = self.logits(x_adv, training=True)
            loss = self.cross_entropy(self.targets(y), clean_logits)
            loss += self.beta * tf.reduce_mean(_kl(tf.nn.softmax(clean_logits), adv_logits))
            loss = self.regularised(loss)
            gradient_loss = self.gradient_loss(loss, self.optimizer)
        self.descend(tape, gradient_loss, self.optimizer, self.classifier.trainable_variables)
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(y, clean_logits)
        self.adv_accuracy_tracker.update_state(y, adv_logits)
        return {m.name: m.result() for m in (self.loss_tracker, self.accuracy_tracker,
                                              self.adv_accuracy_tracker)}


def _kl(p, logits_q):
    """Per-example KL(p || softmax(logits_q)), computed from log-probabilities for stability."""
    log_q = tf.nn.log_softmax(logits_q)
    return tf.reduce_sum(p * (tf.math.log(tf.maximum(p, 1e-12)) - log_q), axis=-1)


METHODS = {"natural": NaturalModel, "fgsm_rs": FGSMRSModel, "pgd": PGDATModel, "trades": TRADESModel}
