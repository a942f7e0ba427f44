"""The minimum-norm attack FMN (Fast Minimum-Norm, Pintor et al. 2021) in TensorFlow, L-inf or L2: each
example's smallest perturbation that the model misclassifies clearly (`minimum_norm`), and the same search
as an attack at a radius (`fmn`, the ensembles' counterpart of AutoAttack's FAB-T).

`model` is any callable rvs_tf.attacks takes (images in [0, 1] to logits). Both functions work eagerly and
inside tf.function, and every point they return lies in [0, 1].
"""
import math
import numbers

import tensorflow as tf

from rvs_tf.arguments import check_int
from rvs_tf.attacks import (_check_eps, _clear_margin, _graph_ready, _inputs, _per_example, margin_loss,
                            model_logits)
from rvs_tf.threat_model import ThreatModel

__all__ = ["minimum_norm", "fmn"]


def _fmn_run(model, x, y, target, norm, steps, alphas, gammas):
    """One FMN run -> (smallest adversarial point found, its norm; x and inf where none). `target`: None
    (untargeted: the margin to the best other class), or a class per example whose margin to the true
    class the steps raise (any clear misclassification counts as adversarial either way)."""
    unit = ThreatModel(norm, 1.0)
    size = lambda t: tf.reshape(unit.size(t), [-1])  # noqa: E731 [B]
    largest = size(tf.maximum(x, 1.0 - x))  # the farthest any point of [0, 1]^d is from x
    (alpha_init, alpha_final), (gamma_init, gamma_final) = alphas, gammas

    def evaluate(delta):
        with tf.GradientTape() as tape:
            tape.watch(delta)
            logits = model_logits(model, x + delta)
            margin = margin_loss(logits, y, target)
        threshold = _clear_margin(logits)
        # How far past (> 0) or short of (<= 0) a clear misclassification (toward the target) the point is.
        adversarial = margin_loss(logits, y) > threshold
        return (margin - threshold,
                tape.gradient(margin, delta, unconnected_gradients=tf.UnconnectedGradients.ZERO), adversarial)

    def record(delta, adversarial, best_x, best_norm):
        length = size(delta)
        smaller = adversarial & (length < best_norm)
        return (tf.where(_per_example(smaller, x), x + delta, best_x), tf.where(smaller, length, best_norm),
                length)

    def body(i, delta, radius, best_x, best_norm, found):
        cosine = 0.5 * (1.0 + tf.cos(math.pi * tf.cast(i, tf.float32) / steps))
        alpha = alpha_final + (alpha_init - alpha_final) * cosine
        gamma = gamma_final + (gamma_init - gamma_final) * cosine
        excess, g, adversarial = evaluate(delta)
        # Only the directions the box leaves open: a pixel at 0 (1) cannot move down (up). Without this a
        # gradient concentrated on black background pixels would be clipped away after every step.
        point = x + delta
        g = tf.where(((point <= 0.0) & (g < 0.0)) | ((point >= 1.0) & (g > 0.0)), tf.zeros_like(g), g)
        best_x, best_norm, length = record(delta, adversarial, best_x, best_norm)
        found |= adversarial
        # Before the first adversarial point: just past the linearised boundary (a step that lands on it
        # exactly would stay there, short by rounding, on a locally linear model), and never less than
        # (1 + gamma) times the last radius, so a curved boundary is reached all the same.
        dual = tf.reshape(unit.dual_size(g), [-1])
        boundary = (length + tf.abs(excess) / tf.maximum(dual, 1e-12)) * (1.0 + gamma)
        boundary = tf.where(tf.math.is_finite(radius), tf.maximum(boundary, radius * (1.0 + gamma)), boundary)
        radius = tf.where(adversarial, tf.minimum(radius * (1.0 - gamma), best_norm),
                          tf.where(found, radius * (1.0 + gamma), boundary))
        radius = tf.minimum(radius, largest)
        step = ThreatModel("l2", 1.0).ascent(g)  # a normalised gradient step, in either norm
        delta = ThreatModel(norm, _per_example(radius, x)).project(delta + alpha * step)
        return i + 1, tf.clip_by_value(x + delta, 0.0, 1.0) - x, radius, best_x, best_norm, found

    infinite = tf.fill(tf.shape(y), math.inf)
    _, delta, _, best_x, best_norm, _ = tf.while_loop(
        lambda i, *_: i < steps, body,
        (tf.constant(0), tf.zeros_like(x), infinite, x, infinite, tf.zeros_like(y, tf.bool)))
    _, _, adversarial = evaluate(delta)  # the last step's point
    best_x, best_norm, _ = record(delta, adversarial, best_x, best_norm)
    return best_x, best_norm


@_graph_ready
def minimum_norm(model, x, y, *, norm="linf", steps=100, num_targets=0, alpha_init=1.0, alpha_final=None,
                 gamma_init=0.05, gamma_final=0.001):
    """Fast Minimum-Norm attack (FMN, Pintor et al. 2021): each example's smallest perturbation, in
    `norm`, that the model misclassifies clearly (by CLEAR_MARGIN) -> (x_adv, radius).

    Normalised gradient steps on the margin (best other logit - true logit), projected onto a ball whose
    radius adapts per example: it starts just past the linearised distance to the decision boundary,
    shrinks by a factor (1 - gamma) while the point is adversarial (never above the smallest adversarial
    norm found) and grows by (1 + gamma) while it is not; step alpha and gamma follow cosine schedules
    from their initial to their final values (alpha_final None: alpha_init / 100). One gradient per step,
    whatever the number of classes (FAB needs a Jacobian row per class).

    The untargeted run follows the class that is closest now, which need not be the closest one reachable
    (where [0, 1] stops the pixels that lead to it, say). `num_targets` > 0 adds a run toward each of the
    classes with the highest clean logits other than the true one (as FAB-T and APGD-T do), on every
    example, and keeps the smallest break of all runs.

    radius is 0 where x is already clearly misclassified and inf where no adversarial point was found;
    x_adv is the smallest adversarial point found (x where none). radius bounds the true minimal radius
    from above.
    """
    check_int("steps", steps, 1)
    check_int("num_targets", num_targets, 0)
    alpha_final = alpha_init / 100.0 if alpha_final is None else alpha_final
    for name, value in (("alpha_init", alpha_init), ("alpha_final", alpha_final)):
        if not (isinstance(value, numbers.Real) and value > 0):
            raise ValueError(f"{name}: expected a number > 0, got {value!r}")
    for name, value in (("gamma_init", gamma_init), ("gamma_final", gamma_final)):
        if not (isinstance(value, numbers.Real) and 0 < value < 1):
            raise ValueError(f"{name}: expected a number in (0, 1), got {value!r}")
    x, y = _inputs(x, y)
    norm = ThreatModel.of(norm, 1.0).norm
    run = lambda target: _fmn_run(model, x, y, target, norm, steps, (alpha_init, alpha_final),  # noqa: E731
                                  (gamma_init, gamma_final))
    best_x, best_norm = run(None)
    if num_targets == 0:
        return best_x, best_norm
    logits = model_logits(model, x)
    k = logits.shape[-1]
    if k is None or k < 2:
        raise ValueError(f"logits: expected at least 2 classes for targeted runs, got shape {logits.shape}")
    is_y = tf.one_hot(y, k, on_value=True, off_value=False)
    ranked = tf.argsort(tf.where(is_y, tf.float32.min, logits), axis=-1, direction="DESCENDING", stable=True)

    def one_target(j, best_x, best_norm):
        run_x, run_norm = run(ranked[:, j])
        smaller = run_norm < best_norm
        return j + 1, tf.where(_per_example(smaller, x), run_x, best_x), tf.minimum(run_norm, best_norm)

    # One traced body for every target keeps the graph (and its tracing time) small.
    _, best_x, best_norm = tf.while_loop(lambda j, *_: j < min(num_targets, k - 1), one_target,
                                         (tf.constant(0), best_x, best_norm))
    return best_x, best_norm


@_graph_ready
def fmn(model, x, y, *, eps, norm="linf", steps=100, num_targets=0, alpha_init=1.0, alpha_final=None,
        gamma_init=0.05, gamma_final=0.001):
    """FMN (see `minimum_norm`) as an attack at radius eps: each example's smallest adversarial point
    where it lies within eps, x elsewhere. In an ensemble it adds what a minimum-norm search finds near
    the boundary (AutoAttack's FAB-T plays this part)."""
    _check_eps(eps)
    x_adv, radius = minimum_norm(model, x, y, norm=norm, steps=steps, num_targets=num_targets,
                                 alpha_init=alpha_init, alpha_final=alpha_final, gamma_init=gamma_init,
                                 gamma_final=gamma_final)
    x = tf.cast(tf.convert_to_tensor(x), tf.float32)
    inside = radius <= tf.cast(eps, tf.float32)
    return tf.where(_per_example(inside, x), x_adv, x)
