"""Entropic optimal transport between two point clouds, in TensorFlow (log-domain Sinkhorn).

RVS computes an OT term between the clean and adversarial feature batches twice per training step, so
this module is written to be traced once and run cheaply: log-domain updates, a `tf.while_loop` with a
hard cap and a tolerance, no Python-side data checks inside `tf.function`, XLA-compatible
(`jit_compile=True`), and usable per replica under `tf.distribute` strategies.

Problem. For x [n, d] and y [m, d] with weights a [n], b [m] (uniform when None; non-negative, they are
normalised to sum to one), the cost is C_ij = ||x_i - y_j||^2 in the units of the features, and

    OT_eps(C) = min_{P >= 0, P 1 = a, P^T 1 = b}  <P, C> + eps * KL(P | a b^T).

`entropic_ot` returns the transport cost <P*, C> (the "sharp" value POT's `ot.sinkhorn2` returns and
the RVS authors use); `solve` also returns `reg_cost` = OT_eps (the dual value <f, a> + <g, b>).

epsilon and `cost_scale`. Raw penultimate features have norms that change during training, so an
absolute epsilon means a different problem every step. With `cost_scale` set, the solver uses the
absolute regulariser eps_abs = epsilon * s, where s is a statistic of C taken under `stop_gradient`:
  * None      s = 1: epsilon is absolute, in squared feature units (the authors' setting: 0.01).
  * "mean"    s = a^T C b, the cost of the independent coupling (the default).
  * "max"     s = max_ij C_ij, the squared diameter.
  * a float   s = that number.
Only the solver sees the scaled problem (it iterates on C / s with epsilon, which keeps its numbers
near one). The returned cost is always <P, C> in feature units, never <P, C / s>: dividing the loss by
its own mean (even under stop_gradient) keeps its size however small the features get and was measured
to collapse training (DESIGN.md section 3). s = 0 (all points equal) is replaced by 1, so collapsed
features give a zero cost, not NaN.

Stopping. Each Sinkhorn iteration updates f then g (g last, so column sums equal b exactly); the error
is the L1 violation of the row marginal, sum_i |sum_j P_ij - a_i|, which lies in [0, 2] whatever the
data. It comes for free from the f update (row mass_i = a_i exp((f_old_i - f_new_i) / eps)) and is
tested every `check_every` iterations, the iterations in between being unrolled into one loop body so
a compiled loop pays the condition rarely. `max_iters` is a hard cap: the block length is the largest
divisor of `max_iters` not above `check_every`. The default tolerance, 1e-4, is a float32 choice:
rounding of (f + g - C) / eps alone leaves an error of roughly 1e-7 * max(C) / eps (measured: ~1e-5 at
epsilon = 0.01 relative, ~1e-4 at 1e-3), so a tighter default would only burn the whole budget; at
1e-4 the returned cost is within ~2e-5 (relative) of POT's float64 value in the tests. The reported
`error` and `converged` are recomputed from the returned plan, not copied from the last check.
`epsilon` may also be a scalar tensor (a schedule); it is then not validated.
With `epsilon_scaling=r` in (0, 1), iteration t uses max(epsilon, s_max * r**t) (s_max = largest
entry of C / s): a coarse-to-fine warm start that makes small epsilons converge in far fewer
iterations. Those iterations count towards `max_iters`, and convergence is only declared at the target.

Gradients.
  * "implicit" (default): the loop runs on stop_gradient inputs and the value is differentiated by the
    envelope theorem of the regularised problem: dOT_eps/dC = P* (the plan held fixed), dOT_eps/da = f,
    dOT_eps/db = g. Memory and time do not grow with the iteration count. For the returned sharp cost
    <P*, C> this is not its exact derivative: since OT_eps = <P*, C> + eps KL(P* | ab^T),
        d<P*, C>/dC = P* - eps * dKL(P*)/dC,
    so "implicit" differs from the true derivative of the returned value by the eps-weighted derivative
    of the entropy term; the gap vanishes as eps -> 0 (and is exactly zero for `reg_cost`, which
    `debiased=True` uses). It is the gradient POT's `ot.solve(..., grad="envelope")` gives.
  * "unrolled": automatic differentiation through every iteration of the loop, as the RVS authors did;
    it is the exact derivative of the value actually computed, at a memory cost linear in the number of
    iterations run.
Both agree as the iterations converge and eps shrinks; the tests check each against finite differences
of the quantity it is the derivative of.

Debiasing. `debiased=True` returns the Sinkhorn divergence
    S_eps(x, y) = OT_eps(x, y) - (OT_eps(x, x) + OT_eps(y, y)) / 2
built from the regularised values (`reg_cost`), with one absolute epsilon (from the x-y cost statistic)
for all three problems: that is the quantity that is provably >= 0 with equality iff the two measures
coincide (Feydy et al. 2019); the sharp values carry no such guarantee.

Precision. Inputs of any float dtype (float16 under mixed precision included) are cast to float32 and
the results are float32. The squared distances are computed after centring both clouds on a common
point (exact by translation invariance) to limit cancellation when features are large. On GPUs with
TF32 matmuls enabled (TensorFlow's default on Ampere and later) the cost matrix carries a ~1e-3 relative
error; call `tf.config.experimental.enable_tensor_float_32_execution(False)` when that matters.

Failure to converge. Sinkhorn's contraction slows like exp(-max C / eps), so very small relative
epsilons with few iterations stop at `max_iters` with `converged=False`; the plan is then exact on the
column marginal and approximate on the row marginal, and the cost is still finite.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Union

import numpy as np
import tensorflow as tf

__all__ = ["SinkhornOptions", "SinkhornResult", "solve", "entropic_ot", "transport_plan", "squared_distances"]

DEFAULT_TOLERANCE = 1e-4
GRADIENTS = ("implicit", "unrolled")
COST_SCALES = (None, "mean", "max")


def _positive_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def _number(value):
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SinkhornOptions:
    """The solver's settings in one validated object (as OTT-JAX's `Sinkhorn` solver holds them), so a
    model keeps them together and every entry point refuses bad values alike.

    `entropic_ot(x, y, options=opts)`; keyword arguments override fields (`entropic_ot(x, y, epsilon=0.1)`
    is `entropic_ot(x, y, options=SinkhornOptions(epsilon=0.1))`). The module docstring explains each.

    Args:
      epsilon: regularisation, relative to the `cost_scale` statistic of C, or absolute when
        `cost_scale` is None; a scalar tensor (a schedule) is accepted and not validated.
      cost_scale: None, "mean", "max" or a number > 0.
      max_iters: hard cap on Sinkhorn iterations.
      tolerance: L1 row-marginal error to stop at (>= 0).
      gradient: "implicit" (envelope, constant memory) or "unrolled" (through every iteration).
      debiased: `entropic_ot` returns the Sinkhorn divergence of the regularised values instead.
      epsilon_scaling: None or a decay in (0, 1) for coarse-to-fine epsilon.
      check_every: iterations between convergence tests.
    """

    epsilon: Union[float, tf.Tensor] = 0.01
    cost_scale: Union[str, float, None] = "mean"
    max_iters: int = 100
    tolerance: float = DEFAULT_TOLERANCE
    gradient: str = "implicit"
    debiased: bool = False
    epsilon_scaling: Union[float, None] = None
    check_every: int = 10

    def __post_init__(self):
        checks = (
            (self.gradient in GRADIENTS, "gradient", f"one of {GRADIENTS}", self.gradient),
            (not _number(self.epsilon) or self.epsilon > 0, "epsilon", "a number > 0", self.epsilon),
            (_positive_int(self.max_iters), "max_iters", "an integer >= 1", self.max_iters),
            (_positive_int(self.check_every), "check_every", "an integer >= 1", self.check_every),
            (_number(self.tolerance) and self.tolerance >= 0, "tolerance", "a number >= 0", self.tolerance),
            (self.cost_scale in COST_SCALES if isinstance(self.cost_scale, str) or self.cost_scale is None
             else _number(self.cost_scale) and self.cost_scale > 0,
             "cost_scale", "None, 'mean', 'max' or a number > 0", self.cost_scale),
            (self.epsilon_scaling is None or (isinstance(self.epsilon_scaling, (float, np.floating))
                                              and 0 < self.epsilon_scaling < 1),
             "epsilon_scaling", "None or a float in (0, 1)", self.epsilon_scaling),
        )
        for valid, name, expected, value in checks:
            if not valid:
                raise ValueError(f"{name}: expected {expected}, got {value!r}")

    def replace(self, **changes):
        """A copy with `changes` applied (and validated)."""
        unknown = sorted(set(changes) - {field.name for field in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"Sinkhorn options: unexpected {', '.join(unknown)}; expected some of "
                            f"{', '.join(field.name for field in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes) if changes else self


def _resolve(options, overrides):
    """`options` (default: SinkhornOptions()) with the keyword overrides of a public call applied."""
    if options is None:
        return SinkhornOptions().replace(**overrides)
    if not isinstance(options, SinkhornOptions):
        raise ValueError(f"options: expected a SinkhornOptions, got {type(options).__name__}")
    return options.replace(**overrides)


class SinkhornResult(NamedTuple):
    """Everything `solve` computed; tensors are float32 unless stated, values in feature units.

    cost: <P, C>, the transport cost (what `entropic_ot` returns).
    reg_cost: OT_eps = <f, a> + <g, b> - eps (sum P - 1), the regularised value.
    plan: P [n, m].
    f, g: dual potentials [n], [m] for the absolute epsilon `epsilon`.
    iterations: int32 Sinkhorn iterations run.
    converged: bool, `error <= tolerance` at the target epsilon.
    error: L1 row-marginal violation of `plan`.
    epsilon: the absolute regulariser used, epsilon * s.
    """

    cost: tf.Tensor
    reg_cost: tf.Tensor
    plan: tf.Tensor
    f: tf.Tensor
    g: tf.Tensor
    iterations: tf.Tensor
    converged: tf.Tensor
    error: tf.Tensor
    epsilon: tf.Tensor


def squared_distances(x, y):
    """C_ij = ||x_i - y_j||^2 in float32, centred first so large norms do not cancel away small gaps."""
    x = tf.cast(x, tf.float32)
    y = tf.cast(y, tf.float32)
    centre = tf.stop_gradient((tf.reduce_mean(x, 0) + tf.reduce_mean(y, 0)) / 2.0)
    x = x - centre
    y = y - centre
    cost = (tf.reduce_sum(tf.square(x), 1)[:, None] + tf.reduce_sum(tf.square(y), 1)[None, :]
            - 2.0 * tf.matmul(x, y, transpose_b=True))
    return tf.maximum(cost, 0.0)


# ----------------------------------------------------------------------------------------- checks
def _points(x, name):
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        raise ValueError(f"{name}: expected a float tensor, got dtype {x.dtype.name}")
    if x.shape.rank is not None and x.shape.rank != 2:
        raise ValueError(f"{name}: expected shape [points, features], got shape {x.shape}")
    return tf.cast(x, tf.float32)


def _weights(w, size, name):
    """Normalised float32 weights of length `size` (uniform when None)."""
    if w is None:
        return tf.fill([size], 1.0 / tf.cast(size, tf.float32))
    w = tf.cast(tf.convert_to_tensor(w), tf.float32)
    if w.shape.rank is not None and w.shape.rank != 1:
        raise ValueError(f"{name}: expected a vector of weights, got shape {w.shape}")
    static = tf.get_static_value(size)
    if w.shape[0] is not None and static is not None and w.shape[0] != static:
        raise ValueError(f"{name}: expected one weight per point ({static}), got {w.shape[0]}")
    if tf.executing_eagerly():
        values = w.numpy()
        if not np.all(np.isfinite(values)) or np.any(values < 0) or not values.sum() > 0:
            raise ValueError(f"{name}: expected finite, non-negative weights, not all zero")
    total = tf.reduce_sum(w)
    return w / total


# ----------------------------------------------------------------------------------------- solver
def _log(w):
    """log w with log 0 = -inf and no NaN gradient at zero weights."""
    positive = w > 0
    return tf.where(positive, tf.math.log(tf.where(positive, w, 1.0)), -np.inf)


def _logsumexp(z, axis):
    """log sum exp along `axis`, shifted by the (stop-gradient) maximum: tf.reduce_logsumexp without its
    guard for all -inf rows, which Sinkhorn never has (its weights sum to one and its cost is finite).
    Why: at RVS's sizes (128 x 128) the loop is bound by op dispatch, not arithmetic, so every op counts."""
    top = tf.stop_gradient(tf.reduce_max(z, axis=axis, keepdims=True))
    return tf.squeeze(top, axis) + tf.math.log(tf.reduce_sum(tf.exp(z - top), axis=axis))


def _sinkhorn_loop(cost, log_a, log_b, eps, eps_start, ratio, max_iters, check_every, tolerance):
    """Log-domain Sinkhorn on a (scaled) cost; returns f, g, iterations run, eps of the last one.

    Each update adds a vector to the log kernel -C/eps, computed once when eps is fixed (per iteration
    under epsilon scaling), and takes one shifted logsumexp: five matrix-sized ops per half-iteration."""
    block = max(k for k in range(1, min(check_every, max_iters) + 1) if max_iters % k == 0)
    n_blocks = max_iters // block
    a = tf.exp(log_a)
    fixed_kernel = -cost / eps if ratio is None else None

    def eps_at(t):
        if ratio is None:
            return eps
        return tf.maximum(eps, eps_start * tf.pow(ratio, tf.cast(t, tf.float32)))

    def body(it, f, g, _err):
        for k in range(block):
            e = eps_at(it + k)
            kernel = fixed_kernel if ratio is None else -cost / e
            f_new = -e * _logsumexp(kernel + (g / e + log_b)[None, :], axis=1)
            if k == block - 1:  # row mass of the plan (f, g), free from the f update
                mass = tf.exp(log_a + (f - f_new) / e)
                err = tf.stop_gradient(tf.reduce_sum(tf.abs(mass - a)))
            f = f_new
            g = -e * _logsumexp(kernel + (f / e + log_a)[:, None], axis=0)
        return it + block, f, g, err

    def cond(it, _f, _g, err):
        return tf.logical_or(err > tolerance, eps_at(it) > eps)

    init = (tf.constant(0, tf.int32), tf.zeros_like(log_a), tf.zeros_like(log_b),
            tf.constant(np.inf, tf.float32))
    it, f, g, _ = tf.while_loop(cond, body, init, maximum_iterations=n_blocks, parallel_iterations=1)
    return f, g, it, eps_at(it - 1)


@functools.lru_cache(maxsize=32)
def _traced_loop(ratio, max_iters, check_every, tolerance):
    """The loop as a tf.function, traced once per option set for any problem size, for eager callers
    of the implicit mode (an eager tf.while_loop costs ~1 ms an iteration). Unrolled eager calls stay
    eager: building the backward pass of a traced while loop costs seconds, more than small problems
    spend iterating. Inside a tf.function or under XLA the plain function joins the caller's graph."""
    def loop(cost, log_a, log_b, eps, eps_start):
        return _sinkhorn_loop(cost, log_a, log_b, eps, eps_start, ratio, max_iters, check_every, tolerance)

    vector, scalar = tf.TensorSpec([None], tf.float32), tf.TensorSpec([], tf.float32)
    return tf.function(loop, input_signature=[tf.TensorSpec([None, None], tf.float32), vector, vector,
                                              scalar, scalar])


def _solve_cost(cost, a, b, scale, options):
    """Solve on a feature-unit cost with weights a, b and the (stop-gradient) epsilon scale `scale`."""
    log_a, log_b = _log(a), _log(b)
    scaled = cost / scale
    eps = tf.cast(options.epsilon, tf.float32)
    eps_start = tf.stop_gradient(tf.reduce_max(scaled))
    loop_in = (scaled, log_a, log_b)
    implicit = options.gradient == "implicit"
    if implicit:
        loop_in = tuple(tf.stop_gradient(t) for t in loop_in)
    loop = (options.epsilon_scaling, int(options.max_iters), int(options.check_every), float(options.tolerance))
    if tf.executing_eagerly() and implicit:
        f, g, iterations, last_eps = _traced_loop(*loop)(*loop_in, eps, eps_start)
    else:
        f, g, iterations, last_eps = _sinkhorn_loop(*loop_in, eps, eps_start, *loop)
    log_plan = loop_in[1][:, None] + loop_in[2][None, :] + (f[:, None] + g[None, :] - loop_in[0]) / eps
    # P_ij <= min(a_i, b_j) holds exactly; clamping to it keeps float32 rounding of f + g - C (large when
    # an absolute epsilon is tiny next to C) from overflowing exp.
    plan = tf.exp(tf.minimum(log_plan, tf.minimum(loop_in[1][:, None], loop_in[2][None, :])))
    f_abs, g_abs, eps_abs = f * scale, g * scale, eps * scale
    reg_cost = tf.reduce_sum(a * f_abs) + tf.reduce_sum(b * g_abs) - eps_abs * (tf.reduce_sum(plan) - 1.0)
    if implicit:
        plan, f_abs, g_abs = (tf.stop_gradient(t) for t in (plan, f_abs, g_abs))
        # Envelope theorem: value unchanged, gradients P for C, f for a, g for b.
        envelope = (tf.reduce_sum(f_abs * (a - tf.stop_gradient(a)))
                    + tf.reduce_sum(g_abs * (b - tf.stop_gradient(b))))
        reg_cost = (tf.stop_gradient(reg_cost) + tf.reduce_sum(plan * (cost - tf.stop_gradient(cost)))
                    + envelope)
        sharp = tf.reduce_sum(plan * cost) + envelope
    else:
        sharp = tf.reduce_sum(plan * cost)
    error = tf.stop_gradient(tf.reduce_sum(tf.abs(tf.reduce_sum(plan, 1) - a)))
    converged = tf.logical_and(error <= options.tolerance, last_eps <= eps)
    return SinkhornResult(sharp, reg_cost, plan, f_abs, g_abs, iterations, converged, error, eps_abs)


def _epsilon_scale(cost, a, b, cost_scale):
    """The statistic s of C that epsilon is relative to (1 when None), under stop_gradient, never 0."""
    cost = tf.stop_gradient(cost)
    if cost_scale is None:
        return tf.constant(1.0, tf.float32)
    if cost_scale == "mean":
        s = tf.reduce_sum(a[:, None] * cost * b[None, :])
    elif cost_scale == "max":
        s = tf.reduce_max(cost)
    else:
        return tf.constant(float(cost_scale), tf.float32)
    return tf.where(s > 0, s, 1.0)


def _prepare(x, y, a, b):
    x, y = _points(x, "x"), _points(y, "y")
    if x.shape[-1] is not None and y.shape[-1] is not None and x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x, y: expected the same feature size, got {x.shape} and {y.shape}")
    n = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]
    m = y.shape[0] if y.shape[0] is not None else tf.shape(y)[0]
    return x, y, _weights(a, n, "a"), _weights(b, m, "b")


# ----------------------------------------------------------------------------------------- public API
def solve(x, y, *, a=None, b=None, options=None, **overrides) -> SinkhornResult:
    """Entropic OT between the rows of x [n, d] and y [m, d]; all outputs, see `SinkhornResult`.

    Args:
      x, y: point clouds [n, d] and [m, d] (any float dtype; computed in float32).
      a, b: point weights [n], [m], uniform when None (normalised to sum to one).
      options: a `SinkhornOptions` (default: its defaults); `overrides` replace its fields. `debiased`
        does not apply: this is the x-y problem alone.
    """
    options = _resolve(options, overrides)
    if options.debiased:
        raise ValueError("debiased: expected False for solve (the x-y problem alone); entropic_ot returns "
                         "the debiased divergence")
    x, y, a, b = _prepare(x, y, a, b)
    cost = squared_distances(x, y)
    return _solve_cost(cost, a, b, _epsilon_scale(cost, a, b, options.cost_scale), options)


def entropic_ot(x, y, *, a=None, b=None, options=None, **overrides):
    """Transport cost sum_ij P_ij ||x_i - y_j||^2 (float32 scalar, feature units) of entropic OT, or
    with `debiased` the Sinkhorn divergence OT_eps(x, y) - (OT_eps(x, x) + OT_eps(y, y)) / 2 of the
    regularised values.

    Args:
      x, y, a, b: as `solve`.
      options: a `SinkhornOptions` (default: its defaults); `overrides` (epsilon=, max_iters=, ...)
        replace its fields.
    """
    options = _resolve(options, overrides)
    x, y, a, b = _prepare(x, y, a, b)
    cost = squared_distances(x, y)
    scale = _epsilon_scale(cost, a, b, options.cost_scale)
    result = _solve_cost(cost, a, b, scale, options)
    if not options.debiased:
        return result.cost
    xx = _solve_cost(squared_distances(x, x), a, a, scale, options)
    yy = _solve_cost(squared_distances(y, y), b, b, scale, options)
    return result.reg_cost - (xx.reg_cost + yy.reg_cost) / 2.0


def transport_plan(x, y, *, a=None, b=None, options=None, **overrides):
    """The plan P [n, m] of `entropic_ot` with the same arguments.

    `debiased` does not change the x-y plan and is accepted so both functions share one signature.
    With gradient="implicit" the plan carries no gradient (the envelope gradient is for values only).
    """
    options = _resolve(options, overrides)
    return solve(x, y, a=a, b=b, options=options.replace(debiased=False)).plan
