"""Evasion attacks in TensorFlow: FGSM, PGD, APGD-CE / APGD-T (DLR) and Square, L-inf; each also under L2
(`norm="l2"`, see rvs_tf.threat_model; FGSM becomes FGM, Square takes its own L2 form). The minimum-norm
attack FMN, which finds each example's smallest breaking perturbation, is in rvs_tf.min_norm.

Every attack takes `model`, any callable mapping float32 images in [0, 1] ([B, ...]) to logits [B, K]: a
Keras model (called with `training=False`), a SavedModel signature wrapper, or a plain function; a dict
output is read at its "logits" key. Logits are cast to float32, so mixed-precision models are attacked in
full precision. Each attack returns `x_adv` with the shape of `x`, inside the eps-ball around `x` and
inside [0, 1], and keeps, per example, the strongest point it visited (misclassified first, then highest
loss; APGD stops at the first misclassified point), so more steps or restarts never make it weaker.

All loops are `tf.while_loop`s with no Python side effects, so the functions trace inside a caller's
`tf.function` (e.g. a `test_step`) and run eagerly too. `eps` may be a Python number or a scalar tensor,
so one trace serves every eps. `seed` is None (op-level randomness, fresh on every call), an int, or an
int tensor of shape [2] (stateless and reproducible; `rvs_tf.evaluate` passes one per batch).

Why this set (see DESIGN.md section 2): PGD with cross-entropy is what the literature reports but is
fooled by saturated softmax and masked gradients; APGD (Croce & Hein 2020) removes the step-size tuning
and its targeted DLR loss is invariant to logit scaling; Square (Andriushchenko et al. 2020) uses no
gradient at all, so it sees through gradient masking.
"""
import math
import numbers

import keras
import numpy as np
import tensorflow as tf

from rvs_tf.arguments import check_int
from rvs_tf.threat_model import ThreatModel

__all__ = ["model_logits", "LOSSES", "fgsm", "pgd", "apgd", "apgd_checkpoints", "square"]


# ----------------------------------------------------------------------------------------------- helpers
def model_logits(model, x):
    """float32 logits of `model` at `x`; Keras models run in inference mode (BatchNorm, dropout off)."""
    out = model(x, training=False) if isinstance(model, keras.Layer) else model(x)
    if isinstance(out, dict):
        if "logits" not in out:
            raise ValueError(f"model: expected logits [B, K] or a dict with 'logits', got a dict with keys "
                             f"{sorted(out)}")
        out = out["logits"]
    return tf.cast(out, tf.float32)


def _check_eps(eps):
    if isinstance(eps, numbers.Real) and not isinstance(eps, bool):
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps: expected a finite number >= 0 (L-inf radius in [0, 1] pixel units), "
                             f"got {eps!r}")
    elif not (tf.is_tensor(eps) and eps.shape.rank == 0):
        raise ValueError(f"eps: expected a number or a scalar tensor, got {eps!r}")


def _inputs(x, y):
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        raise ValueError(f"x: expected float images in [0, 1], got dtype {x.dtype.name}")
    x = tf.cast(x, tf.float32)
    y = tf.convert_to_tensor(y)
    if not y.dtype.is_integer:
        raise ValueError(f"y: expected integer class labels, got dtype {y.dtype.name}")
    if x.shape.rank is None or x.shape.rank < 2:
        raise ValueError(f"x: expected a batch [B, ...] of images, got shape {x.shape}")
    if y.shape.rank is not None and y.shape.rank != 1:
        raise ValueError(f"y: expected a vector [B] of class indices, got shape {y.shape}")
    return x, tf.cast(y, tf.int32)


def ball(x, eps):
    """Bounds of the eps-ball around x intersected with [0, 1]: projection is one clip."""
    eps = tf.cast(eps, tf.float32)
    return tf.maximum(x - eps, 0.0), tf.minimum(x + eps, 1.0)


def _seed_pair(seed):
    """None, or `seed` (an int or an int tensor of shape [2]) as the int64 [2] key of stateless ops."""
    if seed is None:
        return None
    key = tf.cast(tf.stack([seed, 0]) if isinstance(seed, numbers.Integral) else seed, tf.int64)
    if key.shape != (2,):
        raise ValueError(f"seed: expected None, an int or an int tensor of shape [2], got {seed!r}")
    return key


def _uniform(shape, low, high, seed, salt):
    """Uniform noise: fresh on every call without a seed, else a function of (seed, salt)."""
    key = _seed_pair(seed)
    if key is None:
        return tf.random.uniform(shape, low, high)
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(salt, tf.int64))
    return tf.random.stateless_uniform(shape, key, low, high)


def _per_example(mask, x):
    """Reshape a [B] mask or vector so it broadcasts against x [B, ...]."""
    return tf.reshape(mask, [-1] + [1] * (x.shape.rank - 1))


def _keep_best(best_x, best_score, best_wrong, x, score, wrong):
    """Per example, keep the candidate that is misclassified, or else has the higher loss."""
    better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (score > best_score))
    return (tf.where(_per_example(better, x), x, best_x), tf.where(better, score, best_score),
            best_wrong | wrong)


# ------------------------------------------------------------------------------------------------ losses
def _true_logit(logits, y):
    return tf.gather(logits, y, axis=1, batch_dims=1)


def _top_other(logits, y):
    """Largest logit among the classes other than y."""
    is_y = tf.one_hot(y, tf.shape(logits)[-1], on_value=True, off_value=False)
    return tf.reduce_max(tf.where(is_y, tf.float32.min, logits), axis=-1)


def ce_loss(logits, y, target=None):
    """Cross-entropy of the true class (to raise), or minus that of `target` (targeted)."""
    if target is None:
        return tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
    return -tf.nn.sparse_softmax_cross_entropy_with_logits(target, logits)


def margin_loss(logits, y, target=None):
    """CW margin: best other (or target) logit minus the true one; > 0 means misclassified."""
    other = _top_other(logits, y) if target is None else _true_logit(logits, target)
    return other - _true_logit(logits, y)


def dlr_loss(logits, y, target=None):
    """Difference of logits ratio (Croce & Hein 2020): the margin divided by a logit spread, so it does not
    change when the logits are scaled (the usual way softmax saturation hides gradients)."""
    z = tf.sort(logits, axis=-1, direction="DESCENDING")
    if target is None:
        return margin_loss(logits, y) / (z[:, 0] - z[:, 2] + 1e-12)
    return margin_loss(logits, y, target) / (z[:, 0] - 0.5 * (z[:, 2] + z[:, 3]) + 1e-12)


LOSSES = {"ce": ce_loss, "margin": margin_loss, "cw": margin_loss, "dlr": dlr_loss}


def _loss_fn(loss):
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {sorted(LOSSES)}, got {loss!r}")
    return LOSSES[loss]


def _evaluate(model, x, y, loss_fn, target=None, grad=True, margins=False):
    """(per-example loss, d loss / d x or None, misclassified?) at x; with `margins`, the third is the
    margin (best other logit - true logit, > 0 when misclassified) and a fourth says where it is clear."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = model_logits(model, x)
        loss = loss_fn(logits, y, target)
    g = tape.gradient(loss, x, unconnected_gradients=tf.UnconnectedGradients.ZERO) if grad else None
    if margins:
        margin = margin_loss(logits, y)
        return loss, g, margin, margin > _clear_margin(logits)
    wrong = tf.not_equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y)
    return loss, g, wrong


# An attack may stop on an example once it is misclassified by this fraction of its largest logit (at
# least 1): a point closer to the boundary can read as correct in another batch (other kernels, TF32).
CLEAR_MARGIN = 0.01


def _clear_margin(logits):
    """Per example, the margin (`margin_loss`) past which it is misclassified clearly."""
    return CLEAR_MARGIN * tf.maximum(1.0, tf.reduce_max(tf.abs(logits), -1))


# ----------------------------------------------------------------------------------------------- attacks
# The loops are explicit tf.while_loop/tf.cond, so AutoGraph has nothing to convert (and warns if it tries).
_graph_ready = tf.autograph.experimental.do_not_convert


@_graph_ready
def fgsm(model, x, y, *, eps, norm="linf"):
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size eps on the cross-entropy;
    under `norm="l2"` the fast gradient method (FGM): a step of L2 length eps along the gradient."""
    _check_eps(eps)
    threat = ThreatModel.of(norm, eps)
    x, y = _inputs(x, y)
    _, g, _ = _evaluate(model, x, y, ce_loss)
    return threat.clip(x + tf.cast(eps, tf.float32) * threat.ascent(g), x)


@_graph_ready
def pgd(model, x, y, *, eps, steps=10, step_size=None, restarts=1, loss="ce", random_start=True,
        seed=None, norm="linf"):
    """Projected gradient ascent (Madry et al. 2018): L-inf sign steps, or under `norm="l2"` steps of L2
    length step_size along the normalised gradient, projected onto the L2 ball and [0, 1]; the random
    start is drawn uniformly from the ball.

    step_size None is 2.5 * eps / steps (enough to cross the ball from a random start). loss "ce" or
    "margin"/"cw" (Carlini-Wagner margin, immune to softmax saturation) or "dlr". Returns, per example,
    the worst point over all steps and restarts (a misclassified one if any).
    """
    _check_eps(eps)
    check_int("steps", steps, 1)
    check_int("restarts", restarts, 1)
    if restarts > 1 and not random_start:
        raise ValueError(f"restarts: expected 1 without random_start (every restart would be the same), "
                         f"got {restarts}")
    loss_fn = _loss_fn(loss)
    threat = ThreatModel.of(norm, eps)
    x, y = _inputs(x, y)
    alpha = tf.cast(2.5 * eps / steps if step_size is None else step_size, tf.float32)
    best = (x, tf.fill(tf.shape(y), -math.inf), tf.zeros_like(y, tf.bool))
    for r in range(restarts):
        # Restart r draws with salt r (L2 also with r + 1000 and r + 2000), as L-inf always has.
        draw = lambda shape, low, high, salt, r=r: _uniform(shape, low, high, seed, r + 1000 * salt)  # noqa: E731
        start = x + threat.random(tf.shape(x), draw) if random_start else x

        def body(i, xa, bx, bs, bw):
            score, g, wrong = _evaluate(model, xa, y, loss_fn)
            bx, bs, bw = _keep_best(bx, bs, bw, xa, score, wrong)
            return i + 1, threat.clip(xa + alpha * threat.ascent(g), x), bx, bs, bw

        _, xa, *best = tf.while_loop(lambda i, *_: i < steps, body,
                                     (tf.constant(0), threat.clip(start, x), *best))
        score, _, wrong = _evaluate(model, xa, y, loss_fn, grad=False)
        best = _keep_best(*best, xa, score, wrong)
    return best[0]


def apgd_checkpoints(steps):
    """Iterations at which APGD may halve its step: w_j = ceil(p_j * steps) with p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (Croce & Hein 2020, section 3.2)."""
    check_int("steps", steps, 1)
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({min(math.ceil(v * steps - 1e-9), steps) for v in p[1:]} - {0})


def _shrink(tensors, keep):
    """Each [B, ...] tensor of `tensors` restricted to the examples where `keep` is True."""
    return tuple(tf.boolean_mask(t, keep) for t in tensors)


def _any_batch(t):
    """t's shape with the batch dimension unknown: a while-loop invariant for a shrinking batch."""
    return tf.TensorShape([None]).concatenate(t.shape[1:])


def _apgd_run(model, x, y, target, threat, steps, loss_fn, rho, seed):
    """One APGD run (Croce & Hein 2020, Algorithm 1) with per-example step sizes -> (x_adv, wrong).

    An example leaves the loop at the first point the model misclassifies clearly (by CLEAR_MARGIN); it
    returns the point with the largest margin found (x where none was misclassified), and `wrong` from a
    forward pass of the whole batch. Step sizes, momentum and checkpoints are per example and the model
    runs in inference mode, so no example's path depends on another's: dropping broken examples finds the
    same broken set as running all of them for every step, at the cost of the survivors only.
    """
    eps = tf.cast(threat.eps, tf.float32)
    x0 = threat.clip(x + threat.random_on_sphere(tf.shape(x), lambda *a: _uniform(*a[:3], seed, a[3])), x)
    targets = y if target is None else target  # a placeholder the loss ignores when untargeted
    l0, g0, m0, c0 = _evaluate(model, x0, y, loss_fn, target, margins=True)
    interval = [0] * (steps + 1)  # interval[w_j] = w_j - w_{j-1}, 0 elsewhere
    previous = 0
    for w in apgd_checkpoints(steps):
        interval[w], previous = w - previous, w
    interval = tf.constant(interval, tf.float32)

    def body(k, out_x, where, live):
        xc, xp, gc, lc, xm, gm, fm, eta, n_up, fm_ck, red_ck, mb, xs, ys, ts = live
        a = tf.where(k == 0, 1.0, 0.75)  # no momentum on the first step
        z = threat.clip(xc + eta * threat.ascent(gc), xs)
        xn = threat.clip(xc + a * (z - xc) + (1.0 - a) * (xc - xp), xs)
        ln, gn, mn, clear = _evaluate(model, xn, ys, loss_fn, None if target is None else ts, margins=True)
        wider = (mn > 0.0) & (mn > mb)  # misclassified, and by more than the point kept so far
        out_x = tf.tensor_scatter_nd_update(out_x, tf.boolean_mask(where, wider)[:, None],
                                            tf.boolean_mask(xn, wider))
        n_up += tf.cast(ln > lc, tf.float32)
        up = _per_example(ln > fm, xn)
        xm, gm, fm = tf.where(up, xn, xm), tf.where(up, gn, gm), tf.maximum(ln, fm)
        length = interval[k + 1]
        at_ck = length > 0
        # At a checkpoint, halve the step where too few steps raised the loss since the last one, or
        # where neither the step nor the best loss changed; those examples restart from their best
        # point with zero momentum.
        halve = at_ck & ((n_up < rho * length) | (~red_ck & (fm <= fm_ck)))
        h = _per_example(halve, xn)
        live = (tf.where(h, xm, xn), tf.where(h, xm, xc), tf.where(h, gm, gn), tf.where(halve, fm, ln),
                xm, gm, fm, tf.where(h, eta / 2.0, eta), tf.where(at_ck, 0.0, n_up),
                tf.where(at_ck, fm, fm_ck), tf.where(at_ck, halve, red_ck), tf.maximum(mn, mb), xs, ys, ts)
        return k + 1, out_x, tf.boolean_mask(where, ~clear), _shrink(live, ~clear)

    eta = _per_example(tf.fill(tf.shape(l0), 2.0 * eps), x)
    zeros = tf.zeros_like(l0)
    live = (x0, x0, g0, l0, x0, g0, l0, eta, zeros, l0, tf.zeros_like(c0), m0, x, y, targets)
    where = tf.boolean_mask(tf.range(tf.shape(y, out_type=tf.int64)[0]), ~c0)
    state = (tf.constant(0), tf.where(_per_example(m0 > 0.0, x), x0, x), where, _shrink(live, ~c0))
    invariants = (tf.TensorShape([]), x.shape, tf.TensorShape([None]), tuple(_any_batch(t) for t in live))
    _, out_x, _, _ = tf.while_loop(lambda k, _x, where, _l: (k < steps) & (tf.size(where) > 0),
                                   body, state, shape_invariants=invariants)
    # Re-check on the whole batch: a point found in a smaller batch must still be misclassified here, or
    # the cascade would skip an example this run did not really break.
    wrong = tf.not_equal(tf.argmax(model_logits(model, out_x), -1, output_type=tf.int32), y)
    return out_x, wrong


@_graph_ready
def apgd(model, x, y, *, eps, steps=100, loss="ce", restarts=1, targeted=False, num_targets=9, seed=None,
         rho=0.75, norm="linf"):
    """Auto-PGD (Croce & Hein 2020): momentum 0.75, step 2*eps halved at checkpoints, restart from best.
    Under `norm="l2"` (AutoAttack's L2 form) the steps follow the L2-normalised gradient, each point is
    projected onto the L2 ball and [0, 1], and a run starts on the ball's sphere.

    loss "ce" (APGD-CE) or "dlr" (APGD-DLR); with targeted=True each of the `num_targets` classes with the
    highest clean logits other than the true one is tried in turn (APGD-T; num_targets is capped at K-1),
    `restarts` runs per target. Later runs only attack examples no earlier run has broken (cascade).
    """
    _check_eps(eps)
    check_int("steps", steps, 1)
    check_int("restarts", restarts, 1)
    check_int("num_targets", num_targets, 1)
    if not 0.0 < rho < 1.0:
        raise ValueError(f"rho: expected a number in (0, 1), got {rho!r}")
    loss_fn = _loss_fn(loss)
    threat = ThreatModel.of(norm, eps)
    x, y = _inputs(x, y)
    logits = model_logits(model, x)
    ranked, num_runs = None, restarts
    if targeted:
        k = logits.shape[-1]
        if k is None or k < 4:
            raise ValueError(f"logits: expected at least 4 classes for targeted APGD (DLR-targeted), "
                             f"got shape {logits.shape}")
        is_y = tf.one_hot(y, k, on_value=True, off_value=False)
        ranked = tf.argsort(tf.where(is_y, tf.float32.min, logits), axis=-1, direction="DESCENDING",
                            stable=True)
        num_runs = min(num_targets, k - 1) * restarts
    base_seed = _seed_pair(seed)

    def one_run(j, best_x, best_wrong):
        """Run j (target j // restarts) on the examples no earlier run has broken."""
        idx = tf.where(~best_wrong)[:, 0]
        xs, ys = tf.gather(x, idx), tf.gather(y, idx)
        ts = None if ranked is None else tf.gather(ranked[:, j // restarts], idx)
        run_seed = None if base_seed is None else tf.random.experimental.stateless_fold_in(base_seed, j)
        # Keras layers such as Flatten cannot take an empty batch, so skip a run with nothing left.
        xr, wrong = tf.cond(tf.size(idx) > 0,
                            lambda: _apgd_run(model, xs, ys, ts, threat, steps, loss_fn, rho, run_seed),
                            lambda: (xs, tf.zeros_like(ys, tf.bool)))
        # Examples this run broke take its point; robust ones keep the clean point.
        best_x = tf.tensor_scatter_nd_update(best_x, idx[:, None], xr)
        return j + 1, best_x, tf.tensor_scatter_nd_update(best_wrong, idx[:, None], wrong)

    # One traced body for every target and restart keeps the graph (and its tracing time) small.
    _, best_x, _ = tf.while_loop(
        lambda j, *_: j < num_runs, one_run,
        (tf.constant(0), x, tf.not_equal(tf.argmax(logits, -1, output_type=tf.int32), y)))
    return best_x


def _square_window(u, size, height, width):
    """[n, H, W, 1] masks of a size x size square per example, placed by u[:, 0] (top) and u[:, 1] (left)."""
    top = tf.cast(u[:, 0] * tf.cast(height - size + 1, tf.float32), tf.int32)
    left = tf.cast(u[:, 1] * tf.cast(width - size + 1, tf.float32), tf.int32)
    rows, cols = tf.range(height)[None, :], tf.range(width)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)
    return in_rows[:, :, None, None] & in_cols[:, None, :, None]


_P_HALVING = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # a tuple: no TF op at import (MultiWorker needs that)


def _square_fraction(i, queries, p_init):
    """The fraction p of the image query i's square covers: p_init halved at _P_HALVING (rescaled from a
    10k budget to `queries`)."""
    return p_init / 2.0 ** tf.reduce_sum(tf.cast(i * 10000 // queries > _P_HALVING, tf.float32))


def _square_side(i, queries, p_init, height, width):
    """The side of query i's L-inf square: covering a fraction `_square_fraction` of the image."""
    p = _square_fraction(i, queries, p_init)
    return tf.clip_by_value(tf.cast(tf.round(tf.sqrt(p * height * width)), tf.int32), 1, min(height, width) - 1)


def _pseudo_gaussian(rows, cols):
    """[rows, cols]: concentric squares around the centre, the one of Chebyshev radius k weighted
    1 / (k + 1)^2, summed and scaled to unit L2 norm (Square's L2 building block)."""
    if rows == 0:
        return np.zeros([0, cols])
    distance = np.maximum(np.abs(np.arange(rows) - rows // 2)[:, None], np.abs(np.arange(cols) - cols // 2)[None, :])
    rings = max(rows // 2, cols // 2) + 1
    tail_sums = np.cumsum([1.0 / (k + 1) ** 2 for k in range(rings)][::-1])[::-1]  # sum over k >= d
    block = tail_sums[np.minimum(distance, rings - 1)]
    return block / np.sqrt(np.sum(block ** 2))


def _square_l2_block(side):
    """Square's L2 proposal of side x side pixels: a pseudo-Gaussian bump on the top half and its negative
    on the bottom half, unit L2 norm (the caller transposes it at random)."""
    block = np.concatenate([_pseudo_gaussian(side // 2, side), -_pseudo_gaussian(side - side // 2, side)])
    return block / np.sqrt(np.sum(block ** 2))


def _square_l2_blocks(largest):
    """[largest + 1, largest, largest]: entry s holds the side-s block, zero-padded (a lookup table, as the
    side is a tensor inside the query loop)."""
    table = np.zeros([largest + 1, largest, largest], np.float32)
    for side in range(1, largest + 1):
        table[side, :side, :side] = _square_l2_block(side)
    return tf.constant(table)


def _place(blocks, top, left, height, width):
    """[n, H, W] canvases with blocks [n, S, S] placed at (top, left), zero elsewhere (blocks are
    zero-padded beyond their side)."""
    largest = blocks.shape[1]
    rows = tf.range(height)[None, :] - top[:, None]
    cols = tf.range(width)[None, :] - left[:, None]
    inside = ((rows >= 0) & (rows < largest))[:, :, None] & ((cols >= 0) & (cols < largest))[:, None, :]
    placed = tf.gather(blocks, tf.clip_by_value(rows, 0, largest - 1), axis=1, batch_dims=1)
    placed = tf.gather(placed, tf.clip_by_value(cols, 0, largest - 1), axis=2, batch_dims=1)
    return tf.where(inside, placed, 0.0)


def _channel_norm(t):
    """Per example and channel L2 norm over the image plane, [n, 1, 1, C]."""
    return tf.sqrt(tf.reduce_sum(tf.square(t), axis=[1, 2], keepdims=True))


def _square_l2_start(x, eps, seed):
    """The L2 start: a grid of side-(H // 5) blocks, each with a random sign per channel and a random
    orientation, rescaled to L2 norm eps (before the box clip)."""
    n, (height, width, channels) = tf.shape(x)[0], x.shape[1:]
    side = max(min(height, width) // 5, 1)
    offset = (min(height, width) - 5 * side) // 2 if min(height, width) >= 5 else 0
    tiles_h, tiles_w = (height - offset) // side, (width - offset) // side
    block = _square_l2_block(side).astype(np.float32)
    tiled = lambda b: tf.constant(np.tile(b, [tiles_h, tiles_w]))  # noqa: E731
    u = _uniform(tf.stack([n, tiles_h, tiles_w, 1 + channels]), 0.0, 1.0, seed, 0)
    grow = lambda t: tf.repeat(tf.repeat(t, side, axis=1), side, axis=2)  # noqa: E731 tile -> its pixels
    pattern = tf.where(grow(u[..., :1]) < 0.5, tiled(block)[None, :, :, None], tiled(block.T)[None, :, :, None])
    delta = pattern * grow(tf.where(u[..., 1:] < 0.5, -1.0, 1.0))
    delta = tf.pad(delta, [[0, 0], [offset, height - offset - tiles_h * side],
                           [offset, width - offset - tiles_w * side], [0, 0]])
    return eps * delta / tf.maximum(ThreatModel.of("l2", 1.0).size(delta), 1e-12)


def _random_search(model, x, y, x_start, queries, propose):
    """Square's loop: from `x_start`, each query i offers the examples not yet clearly misclassified
    (CLEAR_MARGIN) the images `propose(i, idx, clean, current)` returns for them, kept where the margin
    z_y - max_{j!=y} z_j falls; `queries` counts model calls per example."""
    logits = model_logits(model, x_start)
    m_best = -margin_loss(logits, y)
    tol = -_clear_margin(logits)  # query on until an example is misclassified clearly, not at the boundary

    def body(i, x_best, m_best):
        idx = tf.where(m_best > tol)[:, 0]
        xs, xb, ys = tf.gather(x, idx), tf.gather(x_best, idx), tf.gather(y, idx)
        x_new = propose(i, idx, xs, xb)
        m_new = -margin_loss(model_logits(model, x_new), ys)
        better = m_new < tf.gather(m_best, idx)
        x_best = tf.tensor_scatter_nd_update(x_best, idx[:, None],
                                             tf.where(better[:, None, None, None], x_new, xb))
        m_best = tf.tensor_scatter_nd_update(m_best, idx[:, None],
                                             tf.where(better, m_new, tf.gather(m_best, idx)))
        return i + 1, x_best, m_best

    _, x_best, _ = tf.while_loop(lambda i, _, m: (i < queries) & tf.reduce_any(m > tol), body,
                                 (tf.constant(1), x_start, m_best))
    return x_best


def _square_l2(model, x, y, eps, queries, p_init, seed):
    """Square's L2 form (Andriushchenko et al. 2020, section 3.2; AutoAttack's L2 Square). Each query picks
    two windows of an odd side s (s^2 ~ p * H * W, p on the L-inf schedule): the perturbation's mass in
    both moves into the first, as the old window's direction plus a new pseudo-Gaussian block with a random
    sign per channel, topped up with the unspent budget; the second is zeroed; the whole perturbation is
    rescaled to L2 norm eps, then clipped to [0, 1]. Kept when the margin falls."""
    _, height, width, channels = x.shape
    eps = tf.cast(eps, tf.float32)
    size = ThreatModel.of("l2", eps).size
    largest = min(height, width) - (1 - min(height, width) % 2)  # the largest odd side that fits
    blocks = _square_l2_blocks(largest)

    def propose(i, idx, xs, xb):
        n = tf.shape(idx)[0]
        fraction = _square_fraction(i, queries, p_init)
        side = tf.maximum(tf.cast(tf.round(tf.sqrt(fraction * height * width)), tf.int32), 3)
        side = tf.minimum(side + 1 - side % 2, largest)
        u = _uniform(tf.stack([n, 5 + channels]), 0.0, 1.0, seed, i)
        top1, left1 = (tf.cast(u[:, k] * tf.cast(extent - side + 1, tf.float32), tf.int32)
                       for k, extent in enumerate((height, width)))
        first = _square_window(u[:, 0:2], side, height, width)
        both = first | _square_window(u[:, 2:4], side, height, width)
        block = tf.gather(blocks, tf.fill([n], side))
        block = tf.where(u[:, 4, None, None] < 0.5, block, tf.transpose(block, [0, 2, 1]))
        proposal = _place(block, top1, left1, height, width)[..., None] * tf.where(
            u[:, None, None, 5:] < 0.5, -1.0, 1.0)
        delta = xb - xs
        old = tf.where(first, delta, 0.0)
        proposal += old / (1e-12 + _channel_norm(old))
        spare = tf.maximum(tf.square(eps) - tf.square(size(delta)), 0.0) / channels
        proposal *= tf.sqrt(spare + tf.square(_channel_norm(tf.where(both, delta, 0.0)))) / (
            1e-12 + _channel_norm(proposal))
        delta = tf.where(first, proposal, tf.where(both, 0.0, delta))
        return tf.clip_by_value(xs + eps * delta / (1e-12 + size(delta)), 0.0, 1.0)

    x_start = tf.clip_by_value(x + _square_l2_start(x, eps, seed), 0.0, 1.0)
    return _random_search(model, x, y, x_start, queries, propose)


@_graph_ready
def square(model, x, y, *, eps, queries=5000, p_init=0.8, seed=None, norm="linf"):
    """Square attack (Andriushchenko et al. 2020), untargeted, gradient-free; L-inf, or its own L2 form
    under `norm="l2"` (see `_square_l2`).

    Starts from random vertical stripes of +-eps, then proposes a random square window set to +-eps (one
    sign per channel), kept if it lowers the margin z_y - max_{j!=y} z_j. The window covers a fraction p of
    the image, p_init halved at query 10, 50, 200, 500, 1k, 2k, 4k, 6k, 8k (rescaled to a 10k budget).
    Only examples not yet clearly misclassified (CLEAR_MARGIN) are queried; `queries` counts model calls
    per example.
    """
    _check_eps(eps)
    check_int("queries", queries, 1)
    if not 0.0 < p_init <= 1.0:
        raise ValueError(f"p_init: expected a number in (0, 1], got {p_init!r}")
    x, y = _inputs(x, y)
    if x.shape.rank != 4 or x.shape[1] is None or x.shape[2] is None or x.shape[3] is None:
        raise ValueError(f"x: expected images [B, H, W, C] with static H, W, C for square, got shape {x.shape}")
    _, height, width, channels = x.shape
    if min(height, width) < 2:
        raise ValueError(f"x: expected images of at least 2x2 pixels for square, got shape {x.shape}")
    if ThreatModel.of(norm, eps).norm == "l2":
        if min(height, width) < 3:
            raise ValueError(f"x: expected images of at least 3x3 pixels for square under L2, got shape {x.shape}")
        return _square_l2(model, x, y, eps, queries, p_init, seed)
    lo, hi = ball(x, eps)
    eps = tf.cast(eps, tf.float32)

    stripes = tf.where(_uniform(tf.stack([tf.shape(x)[0], 1, width, channels]), 0.0, 1.0, seed, 0) < 0.5,
                       -eps, eps)

    def propose(i, idx, xs, xb):
        los, his = tf.gather(lo, idx), tf.gather(hi, idx)
        s = _square_side(i, queries, p_init, height, width)
        u = _uniform(tf.stack([tf.shape(idx)[0], 2 + channels]), 0.0, 1.0, seed, i)
        window = _square_window(u, s, height, width)
        step = tf.where(u[:, 2:] < 0.5, -eps, eps)[:, None, None, :]
        # A proposal equal to the current window wastes a query: flip its signs instead.
        unchanged = tf.reduce_all(~window | (tf.abs(tf.clip_by_value(xs + step, los, his) - xb) < 1e-7),
                                  axis=[1, 2, 3])
        step = tf.where(unchanged[:, None, None, None], -step, step)
        return tf.where(window, tf.clip_by_value(xs + step, los, his), xb)

    return _random_search(model, x, y, tf.clip_by_value(x + stripes, lo, hi), queries, propose)

