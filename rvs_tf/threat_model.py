"""The threat model: which perturbations count (a norm and its radius eps, on images in [0, 1]).

One place owns what differs between norms, so that attacks and training methods are written once:
  * `project(delta)`: the nearest perturbation of at most eps (L-inf: clip each pixel; L2: rescale the
    whole perturbation when its Euclidean norm exceeds eps);
  * `ascent(g)`: the steepest-ascent direction of unit norm for a gradient g (the dual norm's maximiser:
    L-inf: sign(g); L2: g / ||g||_2), so a step of size alpha moves the point by alpha in the norm;
  * `random(shape)`: a point drawn uniformly from the ball (L2: a Gaussian direction scaled by
    eps * u^(1/d), the standard way to sample a d-dimensional ball uniformly);
  * `clip(x_adv, x)`: into the ball around x, then into [0, 1]. For L2 this is the rescaling followed by
    the box clip, as AutoAttack and torchattacks do: the box clip only shrinks each coordinate of the
    perturbation toward 0, so the result stays in the ball as well as in the box.
Per-example quantities are over every axis but the first (the batch).
"""
import math
import numbers
from typing import NamedTuple, Union

import numpy as np
import tensorflow as tf

NORMS = ("linf", "l2")
# Radii that are only plausible for one norm on [0, 1] images: an L-inf eps above 0.5 changes every pixel
# by half the range; an L2 eps below 0.05 is below the smallest L-inf budget in use (8/255) on one pixel.
PLAUSIBLE_EPS = {"linf": (0.0, 0.5), "l2": (0.05, math.inf)}
_TINY = 1e-12


class ThreatModelWarning(UserWarning):
    """A radius that reads like the other norm's (the command lines print it as one line)."""


def parse_norm(norm):
    """The canonical name of `norm` ("linf" or "l2"; "Linf", "inf", "L2" are accepted)."""
    text = str(norm).strip().lower()
    text = {"inf": "linf", "l_inf": "linf", "l-inf": "linf", "l_2": "l2", "2": "l2"}.get(text, text)
    if text not in NORMS:
        raise ValueError(f"norm: expected one of {', '.join(NORMS)}, got {norm!r}")
    return text


def eps_warning(norm, eps):
    """A one-line warning when `eps` is plausible only for the other norm, else None."""
    norm = parse_norm(norm)
    low, high = PLAUSIBLE_EPS[norm]
    if isinstance(eps, numbers.Real) and eps > 0 and not low <= eps <= high:
        other = "l2" if norm == "linf" else "linf"
        return (f"eps={eps:g} is unusual for norm {norm} on images in [0, 1] (expected {low:g} to {high:g}); it "
                f"reads like a {other} radius: check --norm and --eps")
    return None


def _per_example_norm(t, norm):
    axes = list(range(1, t.shape.rank))
    if norm == "linf":
        return tf.reduce_max(tf.abs(t), axis=axes, keepdims=True)
    if norm == "l1":  # only as a dual norm (ThreatModel.dual_size)
        return tf.reduce_sum(tf.abs(t), axis=axes, keepdims=True)
    return tf.sqrt(tf.reduce_sum(tf.square(t), axis=axes, keepdims=True))


def per_example_size(delta, norm):
    """NumPy twin of ThreatModel.size for arrays [B, ...] -> [B]: each example's norm of delta."""
    flat = delta.reshape(len(delta), int(np.prod(delta.shape[1:])))  # -1 cannot be inferred for 0 examples
    return np.abs(flat).max(1, initial=0.0) if norm == "linf" else np.linalg.norm(flat, axis=1)


class ThreatModel(NamedTuple):
    """A norm ("linf" or "l2") and its radius eps (a number or a scalar tensor) on images in [0, 1].

    Args:
        norm: "linf" or "l2".
        eps: the radius, in the norm's units on the [0, 1] pixel scale.
    """

    norm: str
    eps: Union[float, tf.Tensor]

    @classmethod
    def of(cls, norm, eps):
        return cls(parse_norm(norm), eps)

    def _eps(self):
        return tf.cast(self.eps, tf.float32)

    def size(self, delta):
        """Per-example norm of `delta`, shape [B, 1, ...] (broadcasts against delta)."""
        return _per_example_norm(delta, self.norm)

    def dual_size(self, g):
        """Per-example dual norm of a gradient g, shape [B, 1, ...]: L1 for L-inf, L2 for L2, so that
        |margin| / dual_size(grad margin) is the linearised distance to the boundary in this norm."""
        return _per_example_norm(g, "l1" if self.norm == "linf" else "l2")

    def project(self, delta):
        """The nearest perturbation of norm at most eps."""
        eps = self._eps()
        if self.norm == "linf":
            return tf.clip_by_value(delta, -eps, eps)
        return delta * tf.minimum(1.0, eps / tf.maximum(self.size(delta), _TINY))

    def clip(self, x_adv, x):
        """x_adv moved into the ball around x, then into [0, 1] (which keeps it in the ball)."""
        if self.norm == "linf":  # one clip to the box's and the ball's common bounds
            eps = self._eps()
            return tf.clip_by_value(x_adv, tf.maximum(x - eps, 0.0), tf.minimum(x + eps, 1.0))
        return tf.clip_by_value(x + self.project(x_adv - x), 0.0, 1.0)

    def ascent(self, g):
        """The unit-norm direction of steepest ascent for gradient g (zero where g is zero)."""
        if self.norm == "linf":
            return tf.sign(g)
        return g / tf.maximum(self.size(g), _TINY)

    def random(self, shape, uniform):
        """A point of the ball drawn uniformly. `uniform(shape, low, high, salt)` draws the noise (so the
        caller decides between fresh and stateless randomness); L-inf uses salt 0, L2 salts 0, 1 and 2."""
        eps = self._eps()
        if self.norm == "linf":
            return eps * uniform(shape, -1.0, 1.0, 0)
        # A Gaussian direction from uniforms (Box-Muller), and a radius eps * u^(1/d).
        u1 = uniform(shape, 1e-7, 1.0, 0)
        u2 = uniform(shape, 0.0, 1.0, 1)
        gaussian = tf.sqrt(-2.0 * tf.math.log(u1)) * tf.cos(2.0 * math.pi * u2)
        direction = gaussian / tf.maximum(self.size(gaussian), _TINY)
        dims = tf.cast(tf.reduce_prod(shape[1:]), tf.float32)
        batch_shape = tf.concat([shape[:1], tf.ones_like(shape[1:])], 0)
        radius = eps * uniform(batch_shape, 0.0, 1.0, 2) ** (1.0 / dims)
        return direction * radius

    def random_on_sphere(self, shape, uniform):
        """A random point on the ball's boundary, where APGD starts (L-inf: uniform noise rescaled so its
        largest pixel is eps, as AutoAttack; L2: a uniform direction of length eps). `uniform` as in
        `random`."""
        eps = self._eps()
        if self.norm == "linf":
            u = uniform(shape, -1.0, 1.0, 0)
            return eps * u / tf.maximum(self.size(u), _TINY)
        point = self.random(shape, uniform)
        return eps * point / tf.maximum(self.size(point), _TINY)

    def describe(self):
        """How reports name it: 'eps=0.1, L-inf' or 'eps=1.5, L2'."""
        eps = float(self.eps) if not tf.is_tensor(self.eps) else float(self.eps.numpy())
        return f"eps={eps:g}, {'L-inf' if self.norm == 'linf' else 'L2'}"
