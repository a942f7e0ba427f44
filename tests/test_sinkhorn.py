"""rvs_tf.sinkhorn against independent references: POT (NumPy float64 and its TensorFlow backend), exact
OT (`ot.emd2`), and float64 finite differences.

Data scale: points are N(0, I / d), so C_ij = ||x_i - y_j||^2 has mean ~2 and the absolute epsilons
{1, 0.1, 0.01} range from a blurry plan to a nearly sharp one; our float32 solver then reaches a
relative error far below the 1e-4 asked for, against POT run in float64 to a 1e-12 marginal error.
"""
import numpy as np
import ot
import pytest
import tensorflow as tf

from rvs_tf import sinkhorn as sk

pytestmark = pytest.mark.filterwarnings("ignore:To use TensorflowBackend")


def _cloud(seed, n, d, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return scale * (rng.normal(size=(n, d)) / np.sqrt(d) + shift)


def _weights(seed, n):
    w = np.random.default_rng(seed).uniform(0.2, 1.0, n)
    return w / w.sum()


def _pot_reference(x, y, a, b, eps):
    """Converged float64 POT log-domain Sinkhorn: (sharp cost <P, C>, regularised value OT_eps, plan)."""
    cost = ot.dist(x, y)
    plan, log = ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=200000,
                            stopThr=1e-13, log=True, warn=False)
    f = eps * (log["log_u"] - np.log(a))  # POT's log_u includes log a
    g = eps * (log["log_v"] - np.log(b))
    return float(np.sum(plan * cost)), float(f @ a + g @ b), plan


def _finite_difference(fun, x, h=1e-5):
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        step = np.zeros_like(x)
        step[idx] = h
        grad[idx] = (fun(x + step) - fun(x - step)) / (2 * h)
    return grad


def _value_and_grad(fn, x, y, **kwargs):
    x = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = fn(x, tf.constant(y, tf.float32), **kwargs)
    return value, tape.gradient(value, x).numpy()


def _rel(a, b):
    return np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))


# ----------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("epsilon", [1.0, 0.1, 0.01])
def test_matches_pot_sinkhorn2(epsilon):
    x, y = _cloud(0, 30, 5), _cloud(1, 20, 5, shift=0.3)
    a, b = _weights(2, 30), _weights(3, 20)
    pot_value = ot.sinkhorn2(a, b, ot.dist(x, y), epsilon, method="sinkhorn_log", numItermax=200000,
                             stopThr=1e-12)
    _, _, pot_plan = _pot_reference(x, y, a, b, epsilon)
    res = sk.solve(x.astype(np.float32), y.astype(np.float32), a=a, b=b, epsilon=epsilon,
                   cost_scale=None, tolerance=3e-5, max_iters=3000)
    assert bool(res.converged) and float(res.error) <= 3e-5  # float32 floor ~1e-5 at C / eps ~ 400
    assert abs(float(res.cost) - pot_value) / pot_value <= 1e-4
    assert np.sum(np.abs(res.plan.numpy() - pot_plan)) <= 3e-4  # total variation between the plans
    assert res.cost.dtype == tf.float32 and res.plan.shape == (30, 20)


def test_approaches_emd2_as_epsilon_shrinks():
    x, y = _cloud(4, 24, 4), _cloud(5, 24, 4, shift=0.5)
    exact = ot.emd2([], [], ot.dist(x, y))
    gaps = []
    for epsilon in [0.3, 0.1, 0.03, 0.01, 0.003]:
        value = sk.entropic_ot(x, y, epsilon=epsilon, cost_scale="mean", epsilon_scaling=0.5,
                               max_iters=3000, tolerance=1e-5)
        gaps.append(float(value) - exact)
    assert all(g1 < g0 for g0, g1 in zip(gaps, gaps[1:])), gaps
    assert 0 <= gaps[-1] / exact < 2e-3, gaps  # entropic plans cost more than the exact one


def test_cost_scale_changes_epsilon_not_units():
    x, y = _cloud(6, 16, 8), _cloud(7, 12, 8, shift=0.2)
    mean_cost = float(np.mean(ot.dist(x, y)))
    relative = float(sk.entropic_ot(x, y, epsilon=0.05, cost_scale="mean", tolerance=1e-6, max_iters=2000))
    absolute = float(sk.entropic_ot(x, y, epsilon=0.05 * mean_cost, cost_scale=None, tolerance=1e-6,
                                    max_iters=2000))
    assert abs(relative - absolute) <= 1e-5 * absolute
    # The value stays in feature units: scaling the features by k scales the cost by k^2.
    scaled = float(sk.entropic_ot(10 * x, 10 * y, epsilon=0.05, cost_scale="mean", tolerance=1e-6,
                                  max_iters=2000))
    assert abs(scaled - 100 * relative) <= 1e-4 * scaled
    by_max = sk.solve(x, y, epsilon=0.05, cost_scale="max")
    assert np.isclose(float(by_max.epsilon), 0.05 * ot.dist(x, y).max(), rtol=1e-5)
    assert np.isclose(float(sk.solve(x, y, epsilon=0.05, cost_scale=2.0).epsilon), 0.1)


def test_zero_weights_drop_points():
    x, y = _cloud(8, 10, 3), _cloud(9, 7, 3)
    a = _weights(10, 10)
    a[[2, 7]] = 0.0
    a /= a.sum()
    keep = a > 0
    ref, _, _ = _pot_reference(x[keep], y, a[keep], np.full(7, 1 / 7), 0.1)
    value, grad = _value_and_grad(sk.entropic_ot, x, y, a=a, epsilon=0.1, cost_scale=None,
                                  tolerance=1e-6, max_iters=2000)
    plan = sk.transport_plan(x, y, a=a, epsilon=0.1, cost_scale=None)
    assert abs(float(value) - ref) <= 1e-4 * ref
    assert np.all(plan.numpy()[~keep] == 0) and np.all(np.isfinite(grad))
    assert np.all(grad[~keep] == 0)


# ----------------------------------------------------------------------------------------- gradients
def test_implicit_gradient_is_the_envelope_gradient_of_the_regularised_value():
    """Finite differences of OT_eps(x) (float64 POT, dual value) match the implicit gradient."""
    x, y = _cloud(11, 6, 3), _cloud(12, 5, 3, shift=0.3)
    a, b, eps = _weights(13, 6), _weights(14, 5), 0.1
    expected = _finite_difference(lambda z: _pot_reference(z, y, a, b, eps)[1], x)
    _, grad = _value_and_grad(sk.entropic_ot, x, y, a=a, b=b, epsilon=eps, cost_scale=None,
                              tolerance=1e-6, max_iters=2000)
    assert _rel(grad, expected) <= 1e-3


def test_unrolled_gradient_is_the_derivative_of_the_sharp_cost():
    """Unrolling a converged loop differentiates <P*, C> itself: compare with its finite differences."""
    x, y = _cloud(15, 6, 3), _cloud(16, 5, 3, shift=0.3)
    a, b, eps = _weights(17, 6), _weights(18, 5), 0.1
    expected = _finite_difference(lambda z: _pot_reference(z, y, a, b, eps)[0], x)
    _, grad = _value_and_grad(sk.entropic_ot, x, y, a=a, b=b, epsilon=eps, cost_scale=None,
                              tolerance=0.0, max_iters=300, gradient="unrolled")
    assert _rel(grad, expected) <= 1e-3
    _, implicit = _value_and_grad(sk.entropic_ot, x, y, a=a, b=b, epsilon=eps, cost_scale=None,
                                  tolerance=1e-6, max_iters=2000)
    assert _rel(implicit, expected) > 1e-2  # the eps * dKL term the envelope gradient leaves out


def test_implicit_and_unrolled_agree_when_converged():
    x, y = _cloud(19, 12, 4), _cloud(20, 10, 4, shift=0.2)
    opts = dict(cost_scale="mean", tolerance=0.0, max_iters=400)

    def reg_cost(x, y, **kw):
        return sk.solve(x, y, **kw).reg_cost

    _, implicit = _value_and_grad(reg_cost, x, y, epsilon=0.1, gradient="implicit", **opts)
    _, unrolled = _value_and_grad(reg_cost, x, y, epsilon=0.1, gradient="unrolled", **opts)
    assert _rel(implicit, unrolled) <= 1e-4  # envelope theorem, exact at convergence
    # On the sharp cost they differ by eps * dKL/dx, which vanishes as epsilon shrinks.
    gaps = []
    for eps in [0.3, 0.03]:
        _, implicit = _value_and_grad(sk.entropic_ot, x, y, epsilon=eps, gradient="implicit",
                                      epsilon_scaling=0.5, **opts)
        _, unrolled = _value_and_grad(sk.entropic_ot, x, y, epsilon=eps, gradient="unrolled",
                                      epsilon_scaling=0.5, **opts)
        gaps.append(_rel(implicit, unrolled))
    assert gaps[1] < gaps[0] / 3, gaps


def test_unrolled_gradient_matches_pot_tensorflow_backend():
    """Autodiff through POT's own TF-backend loop (ot.sinkhorn2, log method) equals our "unrolled"."""
    x, y = _cloud(21, 9, 4), _cloud(22, 7, 4, shift=0.3)
    a, b, eps = _weights(23, 9), _weights(24, 7), 0.1
    x_tf = tf.constant(x, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x_tf)
        pot_value = ot.sinkhorn2(tf.constant(a), tf.constant(b), ot.dist(x_tf, tf.constant(y)), eps,
                                 method="sinkhorn_log", numItermax=300, stopThr=0.0)
    pot_grad = tape.gradient(pot_value, x_tf).numpy()
    value, unrolled = _value_and_grad(sk.entropic_ot, x, y, a=a, b=b, epsilon=eps, cost_scale=None,
                                      tolerance=0.0, max_iters=300, gradient="unrolled")
    assert abs(float(value) - float(pot_value)) <= 1e-5 * float(pot_value)
    assert _rel(unrolled, pot_grad) <= 1e-3


# ----------------------------------------------------------------------------------------- debiasing
def test_debiased_divergence_zero_for_same_measure_positive_otherwise():
    x = _cloud(25, 16, 6)
    scale = float(np.mean(ot.dist(x, x)))
    same = sk.entropic_ot(x, x, debiased=True, epsilon=0.05, tolerance=1e-6, max_iters=2000)
    permuted = sk.entropic_ot(x, x[::-1], debiased=True, epsilon=0.05, tolerance=1e-6, max_iters=2000)
    assert abs(float(same)) <= 1e-5 * scale and abs(float(permuted)) <= 1e-5 * scale
    for y in [x + 0.05, _cloud(26, 16, 6), _cloud(27, 11, 6, shift=1.0)]:
        for eps in [1.0, 0.05]:
            value = sk.entropic_ot(x, y, debiased=True, epsilon=eps, tolerance=1e-5, max_iters=2000)
            assert float(value) > 1e-4 * scale, (eps, float(value))


# ----------------------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("gradient", ["implicit", "unrolled"])
def test_finite_at_large_norms_and_small_epsilon(gradient):
    x = _cloud(28, 32, 64, scale=1e3)  # row norms ~1e3
    y = _cloud(29, 24, 64, scale=1e3, shift=0.1)
    collapsed = np.zeros((8, 64))  # all features equal: zero cost, no 0/0
    cases = [(x, y, "mean"), (collapsed, collapsed, "mean")]
    if gradient == "implicit":  # the unrolled backward pass is slow to build eagerly: fewer cases
        cases += [(x, y, "max"), (x, x + 1e-2, "mean")]
    for x_, y_, cost_scale in cases:
        for debiased in [False, True]:
            value, grad = _value_and_grad(sk.entropic_ot, x_, y_, epsilon=1e-3, cost_scale=cost_scale,
                                          debiased=debiased, gradient=gradient, max_iters=50)
            assert np.isfinite(float(value)) and np.all(np.isfinite(grad)), (cost_scale, debiased)
    # The authors' setting, an absolute epsilon 0.01 on raw costs ~1e6 (relative 1e-8): finite, if crude.
    value, grad = _value_and_grad(sk.entropic_ot, x, y, epsilon=0.01, cost_scale=None, gradient=gradient)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
    assert float(sk.entropic_ot(collapsed, collapsed)) == 0.0


def test_float16_inputs_give_float32_results():
    x, y = _cloud(30, 16, 8), _cloud(31, 12, 8, shift=0.2)
    x16 = tf.constant(x, tf.float16)
    with tf.GradientTape() as tape:
        tape.watch(x16)
        value = sk.entropic_ot(x16, tf.constant(y, tf.float16))
    grad = tape.gradient(value, x16)
    assert value.dtype == tf.float32 and grad.dtype == tf.float16
    assert np.all(np.isfinite(grad.numpy()))
    rounded = [z.astype(np.float16).astype(np.float32) for z in (x, y)]
    full = float(sk.entropic_ot(*rounded))
    assert abs(float(value) - full) <= 1e-5 * full


def test_convergence_flags_and_hard_cap():
    x, y = _cloud(32, 20, 5), _cloud(33, 20, 5, shift=0.3)
    capped = sk.solve(x, y, epsilon=1e-3, max_iters=3, tolerance=1e-6)
    assert int(capped.iterations) == 3 and not bool(capped.converged)
    assert float(capped.error) > 1e-6
    odd = sk.solve(x, y, epsilon=1e-3, max_iters=37, check_every=10, tolerance=0.0)
    assert int(odd.iterations) == 37
    done = sk.solve(x, y, epsilon=0.1, max_iters=1000, tolerance=1e-5)
    assert bool(done.converged) and int(done.iterations) < 1000
    assert float(done.error) == pytest.approx(
        np.abs(done.plan.numpy().sum(1) - 1 / 20).sum(), abs=1e-7)
    annealed = sk.solve(x, y, epsilon=1e-3, max_iters=4, epsilon_scaling=0.5, tolerance=1.0)
    assert not bool(annealed.converged)  # tolerance met, but epsilon not yet at its target


# ----------------------------------------------------------------------------------------- graph modes
@pytest.mark.parametrize("gradient", ["implicit", "unrolled"])
def test_runs_under_xla(gradient):
    x = tf.constant(_cloud(34, 16, 8), tf.float32)
    y = tf.constant(_cloud(35, 12, 8, shift=0.2), tf.float32)
    kwargs = dict(gradient=gradient, epsilon_scaling=0.5, max_iters=60, check_every=2)  # quick to compile

    def value_and_grad(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = sk.entropic_ot(x, y, **kwargs)
        return value, tape.gradient(value, x)

    compiled = tf.function(value_and_grad, jit_compile=True)(x, y)
    eager = value_and_grad(x, y)
    np.testing.assert_allclose(compiled[0].numpy(), eager[0].numpy(), rtol=1e-5)
    # XLA's exp and log round differently from Eigen's; through 60 unrolled iterations that leaves
    # ~1e-5 of the largest entry on the smallest ones.
    scale = np.abs(eager[1].numpy()).max()
    np.testing.assert_allclose(compiled[1].numpy(), eager[1].numpy(), rtol=1e-4, atol=1e-4 * scale)


def test_runs_per_replica_under_mirrored_strategy():
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    assert len(devices) == 2, "conftest.py should split the CPU into two logical devices"
    strategy = tf.distribute.MirroredStrategy(devices)
    x = tf.constant(_cloud(36, 16, 8), tf.float32)
    y = tf.constant(_cloud(37, 16, 8, shift=0.2), tf.float32)

    @tf.function
    def replica_step(x, y):
        ctx = tf.distribute.get_replica_context()
        shard = 8 * ctx.replica_id_in_sync_group
        xs, ys = x[shard:shard + 8], y[shard:shard + 8]
        with tf.GradientTape() as tape:
            tape.watch(xs)
            value = sk.entropic_ot(xs, ys, debiased=True, check_every=2)
        return value, tape.gradient(value, xs)

    with strategy.scope():
        values, grads = strategy.run(replica_step, args=(x, y))
    per_replica = strategy.experimental_local_results(values)
    for i, value in enumerate(per_replica):
        expected = sk.entropic_ot(x[8 * i:8 * i + 8], y[8 * i:8 * i + 8], debiased=True, check_every=2)
        assert abs(float(value) - float(expected)) <= 1e-5 * abs(float(expected))
    assert all(np.all(np.isfinite(g.numpy())) for g in strategy.experimental_local_results(grads))


# ----------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, match", [
    (dict(epsilon=0.0), "epsilon"),
    (dict(epsilon=-1.0), "epsilon"),
    (dict(gradient="backprop"), "gradient"),
    (dict(max_iters=0), "max_iters"),
    (dict(tolerance=-1.0), "tolerance"),
    (dict(cost_scale="median"), "cost_scale"),
    (dict(cost_scale=0.0), "cost_scale"),
    (dict(epsilon_scaling=1.5), "epsilon_scaling"),
    (dict(check_every=0), "check_every"),
    (dict(a=np.ones(3)), "a"),
    (dict(b=-np.ones(4)), "b"),
    (dict(a=np.zeros(5)), "a"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sk.entropic_ot(np.ones((5, 2)), np.zeros((4, 2)), **kwargs)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="same feature size"):
        sk.entropic_ot(np.ones((5, 2)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="x: expected shape"):
        sk.transport_plan(np.ones(5), np.ones((4, 3)))
    with pytest.raises(ValueError, match="float"):
        sk.solve(np.ones((5, 2), np.int32), np.ones((4, 2), np.int32))
