"""The defences RVS is compared with, as Keras models sharing `RobustModel`'s plumbing (validation
under PGD, label smoothing, weight decay, eps warm-up, saving), so that only the method differs.

  NaturalModel  cross-entropy on clean images.
  FGSMRSModel   "fast is better than free" (Wong et al. 2020): uniform start in the eps-ball, one signed
                gradient step of 1.25 eps, train on the result.
  PGDATModel    Madry et al. 2018: k signed gradient steps from a uniform random start (default 10 steps
                of 2.5 eps / k, as Madry's paper suggests), train on the result.
  TRADESModel   Zhang et al. 2019: CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising the KL from
                x + 0.001 N(0, 1) by k signed steps (defaults: beta 6, 10 steps of eps / 4).
  NFGSMModel    N-FGSM (de Jorge et al. 2022): noise U(-k eps, k eps), one signed step of eps, clipped to
                [0, 1] only (no projection back onto the eps-ball).
  FGSMPGIModel  FGSM-PGI (Jia et al. 2022), its batch-prior form: one signed step from the previous batch's
                perturbation, plus a logit-pairing term between the start and the adversarial example.

Every method but FGSM-PGI also trains under L2 (`norm="l2"`): signed steps become steps along the L2-normalised
gradient, uniform noise becomes a uniform point of the L2 ball (N-FGSM: of radius k eps), projections are
onto the L2 ball and [0, 1] (see rvs_tf.threat_model).

The training attacks run on the classifier in inference mode (BatchNorm on its moving statistics), so
crafting an example never moves those statistics; the training loss runs in training mode. TRADES's
reference code does the same; Wong et al. and Madry et al. craft their examples in training mode (batch
statistics), which differs only for classifiers with BatchNorm (not the default small CNN). FGSMPGIModel
crafts in training mode, as its authors: the pass at the start serves the input gradient and the pairing
term at once.
"""
import keras
import tensorflow as tf

from rvs_tf.arguments import check
from rvs_tf.attacks import ball
from rvs_tf.threat_model import ThreatModel
from rvs_tf.training import RobustModel


def input_gradient(loss_fn, images):
    """d sum(loss_fn(images)) / d images."""
    with tf.GradientTape() as tape:
        tape.watch(images)
        loss = tf.reduce_sum(loss_fn(images))
    return tape.gradient(loss, images)


def signed_ascent(loss_fn, x, start, eps, steps, step_size, norm="linf"):
    """`steps` steepest-ascent steps on sum(loss_fn(x')) from `start` (L-inf: signed gradient; L2: the
    gradient normalised to unit L2 norm), each projected onto the eps-ball around x and [0, 1]; returns
    the last iterate, as the training attacks of these papers do (rvs_tf.attacks.pgd, an evaluation
    attack, keeps the worst iterate instead)."""
    threat = ThreatModel.of(norm, eps)

    def step(i, x_adv):
        return i + 1, threat.clip(x_adv + step_size * threat.ascent(input_gradient(loss_fn, x_adv)), x)

    _, x_adv = tf.while_loop(lambda i, _: i < steps, step, (tf.constant(0), threat.clip(start, x)))
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
        x, y, weights = self.unpack(data)
        x_train = self.adversarial_examples(x, y, self.current_eps())
        accuracy = self.accuracy_tracker if x_train is x else self.adv_accuracy_tracker
        with tf.GradientTape() as tape:
            logits = self.logits(tf.stop_gradient(x_train), training=True)
            loss = self.regularised(self.cross_entropy(self.targets(y), logits, weights))
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
        check(float(step_ratio) > 0, f"step_ratio: expected > 0, got {step_ratio}")
        self.step_ratio = float(step_ratio)

    def get_config(self):
        return {**super().get_config(), "step_ratio": self.step_ratio}

    def uniform_start(self, x, eps):
        """x plus a point drawn uniformly from the eps-ball (of the model's norm)."""
        return x + self.threat(eps).random(tf.shape(x), self.noise(0))

    def adversarial_examples(self, x, y, eps):
        return signed_ascent(self.cross_entropy_of(y), x, self.uniform_start(x, eps), eps, 1,
                             self.step_ratio * eps, self.norm)


@keras.saving.register_keras_serializable(package="rvs_tf")
class PGDATModel(FGSMRSModel):
    """PGD adversarial training (Madry et al. 2018): `steps` steps of `step_size` (None: 2.5 eps / steps)."""

    def __init__(self, classifier, *, steps=10, step_size=None, **kwargs):
        super().__init__(classifier, **kwargs)
        check(int(steps) >= 1, f"steps: expected >= 1, got {steps}")
        check(step_size is None or float(step_size) > 0, f"step_size: expected > 0, got {step_size}")
        self.steps = int(steps)
        self.step_size = None if step_size is None else float(step_size)

    def get_config(self):
        return {**super().get_config(), "steps": self.steps, "step_size": self.step_size}

    def adversarial_examples(self, x, y, eps):
        step_size = 2.5 * eps / self.steps if self.step_size is None else self.step_size
        return signed_ascent(self.cross_entropy_of(y), x, self.uniform_start(x, eps), eps, self.steps,
                             step_size, self.norm)


@keras.saving.register_keras_serializable(package="rvs_tf")
class TRADESModel(PGDATModel):
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(p(x) || p(x')), x' from a KL ascent."""

    def __init__(self, classifier, *, beta=6.0, steps=10, step_size=None, **kwargs):
        super().__init__(classifier, steps=steps, step_size=step_size, **kwargs)
        check(float(beta) >= 0, f"beta: expected >= 0, got {beta}")
        self.beta = float(beta)

    def get_config(self):
        return {**super().get_config(), "beta": self.beta}

    def adversarial_examples(self, x, y, eps):
        step_size = eps / 4 if self.step_size is None else self.step_size
        clean = tf.nn.softmax(self.inference_logits(x))
        start = x + 0.001 * tf.random.stateless_normal(tf.shape(x), seed=self.step_seed(0))
        return signed_ascent(lambda images: _kl(clean, self.inference_logits(images)), x, start, eps,
                             self.steps, step_size, self.norm)

    def train_step(self, data):
        x, y, weights = self.unpack(data)
        x_adv = tf.stop_gradient(self.adversarial_examples(x, y, self.current_eps()))
        with tf.GradientTape() as tape:
            clean_logits = self.logits(x, training=True)
            adv_logits = self.logits(x_adv, training=True)
            loss = self.cross_entropy(self.targets(y), clean_logits, weights)
            loss += self.beta * self.weighted_mean(_kl(tf.nn.softmax(clean_logits), adv_logits), weights)
            loss = self.regularised(loss)
            gradient_loss = self.gradient_loss(loss, self.optimizer)
        self.descend(tape, gradient_loss, self.optimizer, self.classifier.trainable_variables)
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(y, clean_logits)
        self.adv_accuracy_tracker.update_state(y, adv_logits)
        return {m.name: m.result() for m in (self.loss_tracker, self.accuracy_tracker,
                                              self.adv_accuracy_tracker)}


@keras.saving.register_keras_serializable(package="rvs_tf")
class NFGSMModel(FGSMRSModel):
    """N-FGSM (de Jorge et al., NeurIPS 2022): start at x + U(-k eps, k eps), take one signed step of
    `step_ratio` * eps from there, and clip to [0, 1] only.

    The training perturbation is *not* projected back onto the eps-ball: it reaches (k + step_ratio) eps
    by design (3 eps with the paper's k = 2, step 1), which is what keeps single-step training from
    catastrophic overfitting without extra passes. Validation (`test_step`) and `rvs_tf.evaluate` still
    attack at eps.

    Args:
      noise_ratio: k, the half-width of the uniform noise in units of eps (paper: 2).
      step_ratio: the signed step in units of eps (paper: 1).
    """

    def __init__(self, classifier, *, noise_ratio=2.0, step_ratio=1.0, **kwargs):
        super().__init__(classifier, step_ratio=step_ratio, **kwargs)
        check(float(noise_ratio) >= 0, f"noise_ratio: expected >= 0, got {noise_ratio}")
        self.noise_ratio = float(noise_ratio)

    def get_config(self):
        return {**super().get_config(), "noise_ratio": self.noise_ratio}

    def adversarial_examples(self, x, y, eps):
        start = tf.clip_by_value(x + self.noise_ratio * (self.uniform_start(x, eps) - x), 0.0, 1.0)
        gradient = input_gradient(self.cross_entropy_of(y), start)
        return tf.clip_by_value(start + self.step_ratio * eps * self.threat(eps).ascent(gradient), 0.0, 1.0)


@keras.saving.register_keras_serializable(package="rvs_tf")
class FGSMPGIModel(FGSMRSModel):
    """FGSM-PGI (Jia et al., ECCV 2022) with the batch prior: one signed step from a prior start eta,
    trained on CE(f(x + delta), smooth(y)) + pairing_weight * mean_k (f(x + delta) - f(x + eta))_k^2.

    The paper's best prior is per example (the perturbation of the same image in the previous epoch, with
    gradient momentum), which needs example indices in every batch. This model keeps the plain
    `(images, labels)` data that `fit` users pass and uses the paper's batch prior instead: the start of
    batch t is the perturbation prepared from batch t - 1 at the same position (its signed step along the
    momentum of L1-normalised input gradients, decay `prior_momentum`), clipped to the eps-ball of the
    new images. Prior and momentum are non-trainable weights (per replica under a strategy), so
    checkpoints resume them exactly. The pairing term is the mean squared difference of the logits, as
    the authors' code computes it (MSELoss), with gradients through both forward passes.

    Args:
      step_ratio: the signed step in units of eps (paper: 1).
      pairing_weight: lambda of the logit-pairing term (paper: 10).
      prior_momentum: decay of the gradient momentum that moves the prior (authors' code: 0.3).
      prior_capacity: the largest per-replica batch the prior holds (smaller batches use its first rows).
    """

    def __init__(self, classifier, *, step_ratio=1.0, pairing_weight=10.0, prior_momentum=0.3,
                 prior_capacity=512, **kwargs):
        super().__init__(classifier, step_ratio=step_ratio, **kwargs)
        check(self.norm == "linf", f"norm: FGSM-PGI is defined in L-inf only (its prior is a sign pattern of "
                                   f"+-eps), got {self.norm!r}; under L2 use nfgsm, fgsm_rs or pgd")
        check(float(pairing_weight) >= 0, f"pairing_weight: expected >= 0, got {pairing_weight}")
        check(0.0 <= float(prior_momentum) < 1.0,
              f"prior_momentum: expected 0 <= value < 1, got {prior_momentum}")
        check(int(prior_capacity) >= 1, f"prior_capacity: expected >= 1, got {prior_capacity}")
        self.pairing_weight = float(pairing_weight)
        self.prior_momentum = float(prior_momentum)
        self.prior_capacity = int(prior_capacity)
        shape = (self.prior_capacity, *classifier.input_shape[1:])
        # On read: each replica keeps the prior of its own share of the batch.
        prior = dict(shape=shape, trainable=False, synchronization="on_read", aggregation="only_first_replica")
        # First start: +-eps at random (the authors' sign of uniform noise), scaled by eps at use.
        self.prior = keras.Variable(_random_sign(self.seed), name="prior", **prior)
        self.prior_gradient = keras.Variable("zeros", name="prior_momentum", **prior)
        self.pairing_tracker = keras.metrics.Mean(name="pairing_loss")

    def _extra_trackers(self):
        return [self.pairing_tracker]

    def get_config(self):
        return {**super().get_config(), "pairing_weight": self.pairing_weight,
                "prior_momentum": self.prior_momentum, "prior_capacity": self.prior_capacity}

    def prior_start(self, x, eps):
        """x + eta, eta the stored prior (in units of eps) for the first len(x) positions."""
        batch = tf.shape(x)[0]
        tf.debugging.assert_less_equal(
            batch, self.prior_capacity,
            message=f"FGSMPGIModel: a per-replica batch exceeds prior_capacity={self.prior_capacity}; "
                    "pass prior_capacity >= the per-replica batch size")
        lo, hi = ball(x, eps)
        return tf.clip_by_value(x + eps * self.prior[:batch], lo, hi), (lo, hi)

    def adversarial_examples(self, x, y, eps):
        start, (lo, hi) = self.prior_start(x, eps)
        gradient = input_gradient(self.cross_entropy_of(y), start)
        return tf.clip_by_value(start + self.step_ratio * eps * tf.sign(gradient), lo, hi)

    def update_prior(self, x, start, gradient, eps, bounds):
        """The next batch's start: this start moved one signed step along the gradient momentum."""
        batch = tf.shape(x)[0]
        normalised = gradient / (tf.reduce_sum(tf.abs(gradient)) + 1e-12)  # one L1 norm per batch, as the authors
        momentum = normalised + self.prior_momentum * self.prior_gradient[:batch]
        following = tf.clip_by_value(start + self.step_ratio * eps * tf.sign(momentum), *bounds)
        eta = (following - x) / tf.maximum(eps, 1e-12)
        self.prior.assign(tf.tensor_scatter_nd_update(self.prior, tf.range(batch)[:, None], eta))
        self.prior_gradient.assign(
            tf.tensor_scatter_nd_update(self.prior_gradient, tf.range(batch)[:, None], momentum))

    def train_step(self, data):
        """Two forward and two backward passes, as the authors: the training-mode pass at the start gives
        both the input gradient and the pairing term's logits."""
        x, y, weights = self.unpack(data)
        eps = self.current_eps()
        start, bounds = self.prior_start(x, eps)
        targets = self.targets(y)
        with tf.GradientTape() as tape:
            with tf.GradientTape() as input_tape:
                input_tape.watch(start)
                start_logits = self.logits(start, training=True)
                start_loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, start_logits))
            gradient = tf.stop_gradient(input_tape.gradient(start_loss, start))
            x_adv = tf.stop_gradient(tf.clip_by_value(start + self.step_ratio * eps * tf.sign(gradient), *bounds))
            logits = self.logits(x_adv, training=True)
            pairing = self.weighted_mean(tf.reduce_mean(tf.square(logits - start_logits), -1), weights)
            loss = self.regularised(self.cross_entropy(targets, logits, weights) + self.pairing_weight * pairing)
            gradient_loss = self.gradient_loss(loss, self.optimizer)
        self.descend(tape, gradient_loss, self.optimizer, self.classifier.trainable_variables)
        self.update_prior(x, start, gradient, eps, bounds)
        self.loss_tracker.update_state(loss)
        self.pairing_tracker.update_state(pairing)
        self.adv_accuracy_tracker.update_state(y, logits)
        return {m.name: m.result() for m in (self.loss_tracker, self.pairing_tracker, self.adv_accuracy_tracker)}


def _random_sign(seed):
    """Initializer: +-1 at random (seeded), the authors' first prior."""
    def initializer(shape, dtype=None):
        return tf.sign(tf.random.stateless_uniform(shape, [seed, 7], -1.0, 1.0, dtype=dtype or tf.float32))
    return initializer


def _kl(p, logits_q):
    """Per-example KL(p || softmax(logits_q)), computed from log-probabilities for stability."""
    log_q = tf.nn.log_softmax(logits_q)
    return tf.reduce_sum(p * (tf.math.log(tf.maximum(p, 1e-12)) - log_q), axis=-1)


METHODS = {"natural": NaturalModel, "fgsm_rs": FGSMRSModel, "pgd": PGDATModel, "trades": TRADESModel,
           "nfgsm": NFGSMModel, "fgsm_pgi": FGSMPGIModel}
