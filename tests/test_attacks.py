"""Attacks against closed forms on linear models, a saturated-softmax model, and the eps-ball contract."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from rvs_tf import attacks, min_norm

SHAPE = (6, 6, 1)
DIM = int(np.prod(SHAPE))


def linear_model(w, b, scale=1.0):
    """Keras logits = scale * (flatten(x) @ w + b)."""
    model = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(),
                              keras.layers.Dense(w.shape[1])])
    model.layers[-1].set_weights([(scale * w).astype(np.float32), (scale * b).astype(np.float32)])
    return model


def closed_form_margin(w, b, x, y, eps):
    """max over the eps-ball within [0, 1] of z_j - z_y, per example and class j (separable: each pixel
    goes to the end of its interval that the sign of w_j - w_y prefers)."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    lo, hi = np.maximum(flat - eps, 0), np.minimum(flat + eps, 1)
    d = w[None, :, :] - w[:, y].T[:, :, None]                      # [B, D, K]
    best = np.maximum(d * lo[:, :, None], d * hi[:, :, None]).sum(1)
    return best + b[None, :] - b[y][:, None]                       # [B, K], 0 at j = y


def margins(model, x, y):
    z = model(x, training=False).numpy().astype(np.float64)
    return z - z[np.arange(len(y)), y][:, None]


def assert_in_ball(x_adv, x, eps):
    x_adv, x = np.asarray(x_adv), np.asarray(x)
    assert x_adv.shape == x.shape
    assert np.all(np.abs(x_adv - x) <= eps + 1e-6), np.abs(x_adv - x).max()
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


@pytest.fixture(scope="module")
def binary():
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(DIM, 2)), rng.normal(size=2) * 0.1
    x = rng.uniform(size=(32, *SHAPE)).astype(np.float32)
    x[:, 0, :3] = 0.0  # pixels on the box edges, where the ball is clipped
    x[:, 1, :3] = 1.0
    y = rng.integers(0, 2, size=32)
    return w, b, x, y


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_pgd_reaches_closed_form_worst_case_on_linear_model(binary, loss):
    w, b, x, y = binary
    model, eps = linear_model(w, b), 0.05
    x_adv = attacks.pgd(model, x, y, eps=eps, steps=10, loss=loss, seed=1)
    assert_in_ball(x_adv, x, eps)
    expected = closed_form_margin(w, b, x, y, eps)[np.arange(32), 1 - y]
    np.testing.assert_allclose(margins(model, x_adv, y)[np.arange(32), 1 - y], expected, rtol=1e-5, atol=1e-5)
    # FGSM's single step of size eps lands exactly on the optimal corner of a linear model.
    x_f = attacks.fgsm(model, x, y, eps=eps)
    np.testing.assert_allclose(margins(model, x_f, y)[np.arange(32), 1 - y], expected, rtol=1e-5, atol=1e-5)


def test_losses_match_numpy():
    rng = np.random.default_rng(1)
    z, y, t = rng.normal(size=(8, 10)).astype(np.float32), rng.integers(0, 10, 8), rng.integers(0, 10, 8)
    s = -np.sort(-z, axis=1)
    zy = z[np.arange(8), y]
    other = np.where(np.eye(10, dtype=bool)[y], -np.inf, z).max(1)
    np.testing.assert_allclose(attacks.margin_loss(z, y).numpy(), other - zy, rtol=1e-6)
    np.testing.assert_allclose(attacks.dlr_loss(z, y).numpy(), (other - zy) / (s[:, 0] - s[:, 2]), rtol=1e-5)
    zt = z[np.arange(8), t]
    np.testing.assert_allclose(attacks.dlr_loss(z, y, t).numpy(),
                               (zt - zy) / (s[:, 0] - (s[:, 2] + s[:, 3]) / 2), rtol=1e-5)
    # DLR ignores the logit scale (why it sees through saturated softmax); cross-entropy does not.
    np.testing.assert_allclose(attacks.dlr_loss(1e3 * z, y).numpy(), attacks.dlr_loss(z, y).numpy(),
                               rtol=1e-4)


def test_apgd_checkpoints_follow_the_paper():
    # p = 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (Croce & Hein 2020), times 100 steps
    assert attacks.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert attacks.apgd_checkpoints(10) == [3, 5, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def saturated():
    """10-class linear model, logits x 1e4: float32 softmax is exactly one-hot, CE gradients are 0."""
    rng = np.random.default_rng(2)
    w, b = rng.normal(size=(DIM, 10)), np.zeros(10)
    x = rng.uniform(0.3, 0.7, size=(64, *SHAPE)).astype(np.float32)  # interior: the box never binds
    z = x.reshape(64, -1) @ w
    y = z.argmax(1)
    gap = z[np.arange(64), y][:, None] - z
    l1 = np.abs(w[:, :, None] - w[:, None, :]).sum(0)[y]            # ||w_y - w_j||_1, [B, K]
    # the smallest eps that breaks each example
    critical = np.where(np.eye(10, dtype=bool)[y], np.inf, gap / np.maximum(l1, 1e-12)).min(1)
    eps = float(np.median(critical))
    robust = closed_form_margin(w, b, x, y, eps)
    robust[np.arange(64), y] = -np.inf
    return linear_model(w, b, scale=1e4), x, y, eps, float(np.mean(robust.max(1) < 0))


def accuracy(model, x, y):
    return float(np.mean(np.argmax(model(x, training=False), -1) == y))


def test_ensemble_catches_what_pgd_ce_misses_under_saturated_softmax(saturated):
    model, x, y, eps, truth = saturated
    assert 0.4 <= truth <= 0.6 and accuracy(model, x, y) == 1.0
    def compiled(attack, **kwargs):
        return tf.function(lambda: attack(model, x, y, eps=eps, seed=0, **kwargs), autograph=False)()

    x_pgd = compiled(attacks.pgd, steps=20)
    x_apgd = compiled(attacks.apgd, steps=20, loss="dlr", targeted=True, num_targets=9)
    x_sq = compiled(attacks.square, queries=300)
    x_cw = compiled(attacks.pgd, steps=20, loss="margin")
    for x_adv in (x_pgd, x_apgd, x_sq, x_cw):
        assert_in_ball(x_adv, x, eps)
    pgd_acc, apgd_acc, sq_acc = (accuracy(model, a, y) for a in (x_pgd, x_apgd, x_sq))
    # Every attack is sound (never below the true robust accuracy); PGD-CE overstates it badly.
    assert min(pgd_acc, apgd_acc, sq_acc, accuracy(model, x_cw, y)) >= truth - 1e-9
    assert pgd_acc >= truth + 0.3
    assert apgd_acc <= truth + 0.05 and sq_acc <= truth + 0.1, (truth, pgd_acc, apgd_acc, sq_acc)


@pytest.fixture(scope="module")
def tiny_cnn():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(10)])
    rng = np.random.default_rng(3)
    x = rng.uniform(size=(24, 8, 8, 1)).astype(np.float32)
    x[:, :2] = np.round(x[:, :2])  # pixels at 0 and 1
    y = np.argmax(model(x), -1)    # all correct, so every attack has work to do
    return model, x, y


@pytest.mark.parametrize("name", ["fgsm", "pgd", "apgd-ce", "apgd-t", "square", "fmn"])
def test_every_attack_stays_in_the_ball_inside_tf_function(tiny_cnn, name):
    model, x, y = tiny_cnn
    run = {"fgsm": lambda x, y, e: attacks.fgsm(model, x, y, eps=e),
           "pgd": lambda x, y, e: attacks.pgd(model, x, y, eps=e, steps=3, restarts=2),
           "apgd-ce": lambda x, y, e: attacks.apgd(model, x, y, eps=e, steps=5, seed=tf.constant([1, 2])),
           "apgd-t": lambda x, y, e: attacks.apgd(model, x, y, eps=e, steps=4, loss="dlr", targeted=True,
                                                  num_targets=3),
           "square": lambda x, y, e: attacks.square(model, x, y, eps=e, queries=30),
           "fmn": lambda x, y, e: min_norm.fmn(model, x, y, eps=e, steps=20)}[name]
    compiled = tf.function(run)
    for eps in (0.03, 0.2):  # eps as a tensor: one trace for both
        x_adv = compiled(tf.constant(x), tf.constant(y), tf.constant(eps))
        assert_in_ball(x_adv, x, eps)
        assert accuracy(model, x_adv.numpy(), y) < 1.0  # it did attack
    assert len(compiled.get_concrete_function(tf.constant(x), tf.constant(y), tf.constant(0.1))
               .graph.get_operations()) > 0


def test_seeded_attacks_are_reproducible(tiny_cnn):
    model, x, y = tiny_cnn
    a = attacks.square(model, x, y, eps=0.1, queries=20, seed=5)
    b = attacks.square(model, x, y, eps=0.1, queries=20, seed=5)
    np.testing.assert_array_equal(a, b)
    c = attacks.pgd(model, x, y, eps=0.1, steps=2, seed=5)
    np.testing.assert_array_equal(c, attacks.pgd(model, x, y, eps=0.1, steps=2, seed=5))


def test_dict_outputs_and_mixed_precision_logits_are_float32():
    x = tf.random.uniform((3, *SHAPE))
    out = attacks.model_logits(lambda v: {"logits": tf.cast(tf.ones((3, 10)), tf.float16)}, x)
    assert out.dtype == tf.float32
    with pytest.raises(ValueError, match="logits"):
        attacks.model_logits(lambda v: {"probabilities": tf.ones((3, 10))}, x)


@pytest.mark.parametrize("kwargs, match", [({"eps": -0.1}, "eps"), ({"eps": 0.1, "steps": 0}, "steps"),
                                           ({"eps": 0.1, "loss": "hinge"}, "loss"),
                                           ({"eps": 0.1, "restarts": 2, "random_start": False}, "restarts")])
def test_bad_arguments_raise(tiny_cnn, kwargs, match):
    model, x, y = tiny_cnn
    with pytest.raises(ValueError, match=match):
        attacks.pgd(model, x, y, **kwargs)
    with pytest.raises(ValueError, match=r"x: expected images \[B, H, W, C\].*for square"):
        attacks.square(model, x.reshape(24, -1), y, eps=0.1)


@pytest.mark.parametrize("targeted", [False, True])
def test_apgd_examples_that_leave_the_loop_do_not_change_the_others(targeted):
    """APGD drops an example from its loop once misclassified: that must not move any other example's path.

    Examples appended at the end keep the first ones' random starts (stateless draws are prefix-stable),
    and these ones sit next to the decision boundary, so they break and leave early: the first batch must
    get exactly the images and outcomes it gets alone."""
    rng = np.random.default_rng(3)
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(),
                              keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(5)])
    pool = rng.uniform(size=(400, *SHAPE)).astype(np.float32)
    logits = model(pool).numpy()
    y_pool = logits.argmax(1)  # the model's own labels: every example starts correctly classified
    gap = logits.max(1) - np.sort(logits, 1)[:, -2]
    x, y = pool[:24], y_pool[:24]
    near = np.argsort(gap[24:])[:12] + 24  # the closest to the boundary: broken after a step or two
    kwargs = dict(eps=0.03, steps=20, seed=tf.constant([4, 2], tf.int64),
                  **(dict(loss="dlr", targeted=True, num_targets=3) if targeted else {}))
    alone = attacks.apgd(model, x, y, **kwargs).numpy()
    both = attacks.apgd(model, np.concatenate([x, pool[near]]), np.concatenate([y, y_pool[near]]),
                        **kwargs).numpy()
    wrong_alone = model(alone).numpy().argmax(1) != y
    wrong_near = model(both[24:]).numpy().argmax(1) != y_pool[near]
    assert 0 < wrong_alone.sum() < 24 and wrong_near.mean() > 0.5, (wrong_alone.sum(), wrong_near.mean())
    np.testing.assert_array_equal(both[:24], alone)
    # Broken examples return a misclassified point; the others their clean image.
    np.testing.assert_array_equal(alone[~wrong_alone], x[~wrong_alone])
    assert_in_ball(alone, x, 0.03)
    # The examples next to the boundary cross it at once, and go on until misclassified clearly, where
    # another batch's rounding (other kernels, TF32) cannot read them as correct.
    out = model(both[24:]).numpy()
    margin = np.where(np.eye(5, dtype=bool)[y_pool[near]], -np.inf, out).max(1) - out[np.arange(12), y_pool[near]]
    floor = attacks.CLEAR_MARGIN * np.maximum(1.0, np.abs(out).max(1))
    assert np.all(margin[wrong_near] > floor[wrong_near]), np.sort(margin[wrong_near] / floor[wrong_near])[:3]
