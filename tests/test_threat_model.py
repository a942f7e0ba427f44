"""The threat model (norm and eps) and the L2 attacks built on it, against closed forms."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from rvs_tf import attacks
from rvs_tf.threat_model import ThreatModel, eps_warning, parse_norm


def stateless(seed):
    return lambda shape, low, high, salt: tf.random.stateless_uniform(shape, [seed, salt], low, high)


def l2(t):
    return np.sqrt(np.sum(np.square(np.asarray(t)).reshape(len(t), -1), axis=1))


def test_l2_projection_keeps_short_perturbations_and_rescales_long_ones():
    rng = np.random.default_rng(0)
    delta = rng.normal(0, 1, (64, 6, 6, 2)).astype("float32") * rng.uniform(0.1, 3, (64, 1, 1, 1)).astype("float32")
    projected = ThreatModel.of("l2", 1.5).project(tf.constant(delta)).numpy()
    norms = l2(delta)
    inside = norms <= 1.5
    np.testing.assert_allclose(projected[inside], delta[inside], rtol=1e-6)
    np.testing.assert_allclose(l2(projected[~inside]), 1.5, rtol=1e-5)
    cosine = np.sum((projected * delta).reshape(64, -1), 1) / (l2(projected) * norms)
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-5)  # the same direction
    np.testing.assert_array_equal(ThreatModel.of("linf", 0.3).project(tf.constant(delta)).numpy(),
                                  np.clip(delta, -0.3, 0.3))


def test_ascent_direction_attains_the_dual_norm():
    """The unit-norm maximiser of <g, d>: L2 gives ||g||_2, L-inf gives ||g||_1 (Hoelder)."""
    g = tf.random.stateless_normal([8, 5, 5, 3], [1, 2])
    flat = g.numpy().reshape(8, -1)
    for norm, unit, dual in (("l2", l2, np.linalg.norm(flat, axis=1)), ("linf", None, np.abs(flat).sum(1))):
        d = ThreatModel.of(norm, 1.0).ascent(g).numpy()
        np.testing.assert_allclose(np.sum(d.reshape(8, -1) * flat, 1), dual, rtol=1e-5)
        if unit:
            np.testing.assert_allclose(unit(d), 1.0, rtol=1e-5)
    assert np.all(ThreatModel.of("l2", 1.0).ascent(tf.zeros([2, 3])).numpy() == 0)  # no NaN at g = 0


def test_random_points_fill_the_l2_ball_uniformly():
    """In d dimensions a uniform point of the ball lies within r * eps with probability r^d."""
    points = ThreatModel.of("l2", 2.0).random(tf.constant([40000, 2]), stateless(3)).numpy()
    radius = l2(points) / 2.0
    assert radius.max() <= 1.0 + 1e-6
    for r in (0.3, 0.5, 0.8):
        assert np.mean(radius <= r) == pytest.approx(r ** 2, abs=0.01)
    assert np.abs(points.mean(0)).max() < 0.02  # no preferred direction
    images = ThreatModel.of("l2", 1.0).random(tf.constant([256, 8, 8, 3]), stateless(4)).numpy()
    assert l2(images).max() <= 1.0 + 1e-5 and np.median(l2(images)) > 0.97  # mass near the sphere in 192-d


@pytest.mark.parametrize("eps", [0.5, 3.0, 40.0])  # 40: the box binds everywhere, the ball nowhere
def test_clip_stays_in_the_ball_and_the_box(eps):
    rng = np.random.default_rng(1)
    x = rng.choice([0.0, 0.02, 0.5, 0.98, 1.0], (32, 7, 7, 3)).astype("float32")
    x_adv = x + rng.normal(0, 2.0, x.shape).astype("float32")
    clipped = ThreatModel.of("l2", eps).clip(tf.constant(x_adv), tf.constant(x)).numpy()
    assert clipped.min() >= 0.0 and clipped.max() <= 1.0
    assert l2(clipped - x).max() <= eps * (1 + 1e-5)


def linear_model(weights):
    return lambda x: tf.reshape(x, [tf.shape(x)[0], -1]) @ tf.constant(weights)


def test_fgm_is_one_l2_step_along_the_cross_entropy_gradient():
    """On a linear model the CE gradient is W (softmax - onehot): FGM moves eps along it, normalised."""
    rng = np.random.default_rng(2)
    weights = rng.normal(0, 1, (48, 4)).astype("float32")
    x = rng.uniform(0.4, 0.6, (16, 4, 4, 3)).astype("float32")
    y = rng.integers(0, 4, 16)
    logits = x.reshape(16, -1) @ weights
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = (p - np.eye(4)[y]) @ weights.T
    expected = x + 0.1 * (grad / np.linalg.norm(grad, axis=1, keepdims=True)).reshape(x.shape)
    np.testing.assert_allclose(attacks.fgsm(linear_model(weights), x, y, eps=0.1, norm="l2").numpy(),
                               expected, atol=1e-5)


def test_pgd_l2_reaches_the_closed_form_worst_case_of_a_linear_binary_model():
    """For logits W x with two classes the largest margin loss in the L2 ball is reached at
    x - eps * w / ||w||, w = w_y - w_other, lowering the true class's margin by eps * ||w||."""
    rng = np.random.default_rng(5)
    weights = rng.normal(0, 0.3, (75, 2)).astype("float32")
    x = rng.uniform(0.3, 0.7, (20, 5, 5, 3)).astype("float32")  # far enough from the box
    y = np.zeros(20, "int64")
    w = weights[:, 0] - weights[:, 1]
    margin = lambda images: np.asarray(images).reshape(len(images), -1) @ w  # noqa: E731
    x_adv = attacks.pgd(linear_model(weights), x, y, eps=0.5, steps=60, step_size=0.1, loss="margin", seed=0,
                        norm="l2")  # on the sphere the tangential error shrinks by eps / (eps + step) a step
    # the kept point is the worst one visited: misclassified ones stop counting as "higher loss" once wrong
    drop = margin(x) - margin(x_adv.numpy())
    reachable = 0.5 * np.linalg.norm(w)
    still_right = margin(x_adv.numpy()) > 0
    assert still_right.sum() >= 3
    np.testing.assert_allclose(drop[still_right], reachable, rtol=1e-3)
    assert np.all(drop <= reachable * (1 + 1e-4)) and l2(x_adv.numpy() - x).max() <= 0.5 * (1 + 1e-5)


def test_l2_attacks_never_leave_the_ball_or_the_box_on_random_batches():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(5)])
    rng = np.random.default_rng(6)
    for eps in (0.3, 2.0, 10.0):  # 10: the box binds (an 8x8 image's L2 diameter is 8)
        x = rng.choice([0.0, 0.01, 0.5, 0.99, 1.0], (32, 8, 8, 1)).astype("float32")
        y = rng.integers(0, 5, 32)
        for x_adv in (attacks.pgd(model, x, y, eps=eps, steps=5, restarts=2, seed=1, norm="l2"),
                      attacks.fgsm(model, x, y, eps=eps, norm="l2"),
                      attacks.square(model, x, y, eps=eps, queries=30, seed=1, norm="l2")):
            x_adv = x_adv.numpy()
            assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
            assert l2(x_adv - x).max() <= eps * (1 + 1e-5)


def test_linf_attacks_are_unchanged_by_the_threat_model():
    """The default norm is L-inf, with the very same random start as before the threat model existed."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    x = np.random.default_rng(7).uniform(0, 1, (8, 6, 6, 1)).astype("float32")
    y = np.arange(8) % 3
    default = attacks.pgd(model, x, y, eps=0.1, steps=1, step_size=1e-9, seed=3).numpy()
    noise = tf.random.stateless_uniform([8, 6, 6, 1], tf.random.experimental.stateless_fold_in(
        tf.constant([3, 0], tf.int64), tf.constant(0, tf.int64)), -1.0, 1.0).numpy()
    np.testing.assert_allclose(default, np.clip(x + 0.1 * noise, np.maximum(x - 0.1, 0), np.minimum(x + 0.1, 1)),
                               atol=1e-6)
    np.testing.assert_array_equal(attacks.pgd(model, x, y, eps=0.1, seed=3, norm="linf").numpy(),
                                  attacks.pgd(model, x, y, eps=0.1, seed=3).numpy())


def test_bad_norms_and_implausible_radii_are_named():
    assert parse_norm("Linf") == "linf" and parse_norm("L2") == "l2"
    with pytest.raises(ValueError, match=r"norm: expected one of linf, l2, got 'l3'"):
        parse_norm("l3")
    with pytest.raises(ValueError, match="norm: expected"):
        attacks.pgd(lambda x: x, np.zeros((1, 2), "float32"), [0], eps=0.1, norm="l1")
    assert "reads like a l2 radius" in eps_warning("linf", 1.5)
    assert "reads like a linf radius" in eps_warning("l2", 8 / 255)
    assert eps_warning("linf", 8 / 255) is None and eps_warning("l2", 0.5) is None


def test_apgd_l2_breaks_exactly_what_the_closed_form_says_and_stays_feasible():
    """APGD's L2 form on the linear binary model, no step size set by hand: an example is breakable in
    the ball exactly when its margin is below eps * ||w||; APGD breaks every such one and no other, and
    every point it returns is feasible."""
    rng = np.random.default_rng(5)
    weights = rng.normal(0, 0.3, (75, 2)).astype("float32")
    x = rng.uniform(0.3, 0.7, (20, 5, 5, 3)).astype("float32")
    y = np.zeros(20, "int64")
    w = weights[:, 0] - weights[:, 1]
    margin = lambda images: np.asarray(images).reshape(len(images), -1) @ w  # noqa: E731
    reachable = 0.5 * np.linalg.norm(w)
    x_adv = attacks.apgd(linear_model(weights), x, y, eps=0.5, steps=100, loss="ce", seed=0, norm="l2").numpy()
    robust, breakable = margin(x) > reachable * 1.01, (margin(x) > 0) & (margin(x) < reachable * 0.99)
    assert robust.sum() >= 3 and breakable.sum() >= 3 and l2(x_adv - x).max() <= 0.5 * (1 + 1e-5)
    assert np.all(margin(x_adv[breakable]) < 0) and np.all(margin(x_adv[robust]) > 0)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(5)])
    x = rng.choice([0.0, 0.01, 0.5, 0.99, 1.0], (32, 8, 8, 1)).astype("float32")
    labels = rng.integers(0, 5, 32)
    for eps in (0.3, 10.0):
        for targeted in (False, True):
            x_adv = attacks.apgd(model, x, labels, eps=eps, steps=10, loss="dlr" if targeted else "ce",
                                 targeted=targeted, num_targets=2, seed=2, norm="l2").numpy()
            assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0 and l2(x_adv - x).max() <= eps * (1 + 1e-5)



def test_square_l2_breaks_what_is_close_and_nothing_out_of_reach():
    """Square's L2 random search on a linear binary model of 28x28 images: within 500 queries it breaks
    every example whose margin is under 0.2 of the most the ball can remove (eps * ||w||), never one whose
    margin is above it (none can be), and every point it returns is in the ball and the box."""
    rng = np.random.default_rng(8)
    weights = rng.normal(0, 0.3, (784, 2)).astype("float32")
    w = weights[:, 0] - weights[:, 1]
    margin = lambda images: np.asarray(images).reshape(len(images), -1) @ w  # noqa: E731
    reachable = 0.5 * np.linalg.norm(w)
    x = rng.uniform(0.3, 0.7, (24, 784))  # moved along w to margins from -0.1 to 1.5 times `reachable`
    x = (x + np.outer(np.linspace(-0.1, 1.5, 24) * reachable - x @ w, w / (w @ w))).reshape(24, 28, 28, 1)
    x = x.astype("float32")
    x_adv = attacks.square(linear_model(weights), x, np.zeros(24, "int64"), eps=0.5, queries=500, seed=0,
                           norm="l2").numpy()
    close, out_of_reach = (margin(x) > 0) & (margin(x) < 0.2 * reachable), margin(x) > reachable
    assert close.sum() >= 2 and out_of_reach.sum() >= 5
    assert np.all(margin(x_adv[close]) < 0) and np.all(margin(x_adv[out_of_reach]) > 0)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0 and l2(x_adv - x).max() <= 0.5 * (1 + 1e-5)
    linf = attacks.square(linear_model(weights), x, np.zeros(24, "int64"), eps=0.05, queries=20, seed=0).numpy()
    assert np.abs(linf - x).max() <= 0.05 + 1e-6 and l2(linf - x).max() > 0.5  # L-inf by default
