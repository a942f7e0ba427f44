"""The minimum-norm attack FMN: each example's radius against closed forms on linear models (with and
without the box binding), its points at a radius, and the radii in the robustness report."""
import numpy as np
import pytest
import tensorflow as tf

from rvs_tf import evaluate, min_norm
from rvs_tf.attacks import CLEAR_MARGIN
from rvs_tf.evaluate import attack_spec

D, K = 20, 4


def linear_model(seed, scale=0.05):
    rng = np.random.default_rng(seed)
    w = (rng.normal(size=(D, K)) * scale).astype(np.float32)
    b = (rng.normal(size=K) * 0.01).astype(np.float32)
    return (lambda x: tf.matmul(tf.reshape(x, [-1, D]), w) + b), w, b


def clear(logits):
    """The margin past which an attack counts a misclassification (rvs_tf.attacks.CLEAR_MARGIN)."""
    return CLEAR_MARGIN * max(1.0, float(np.abs(logits).max()))


def closed_form(x, logits, y, w, norm):
    """Smallest perturbation making some other class's logit exceed y's by the clear margin, without the
    box: margin / dual norm of the weight difference (L1 for L-inf, L2 for L2)."""
    best = np.full(len(x), np.inf)
    for i in range(len(x)):
        for j in set(range(K)) - {y[i]}:
            diff = w[:, j] - w[:, y[i]]
            dual = np.abs(diff).sum() if norm == "linf" else np.linalg.norm(diff)
            best[i] = min(best[i], (logits[i, y[i]] - logits[i, j] + clear(logits[i])) / dual)
    return best


def linf_with_box(x, logits, y, w):
    """The exact L-inf radius inside [0, 1]: for each other class, the smallest eps whose best box-feasible
    perturbation (each pixel moved by eps toward the class, stopped at 0 or 1) reaches the clear margin,
    by bisection (the reachable margin grows monotonically with eps)."""
    flat = x.reshape(len(x), -1)
    best = np.full(len(x), np.inf)
    for i in range(len(x)):
        for j in set(range(K)) - {y[i]}:
            diff = w[:, j] - w[:, y[i]]
            room = np.where(diff > 0, 1.0 - flat[i], flat[i])
            need = logits[i, y[i]] - logits[i, j] + clear(logits[i])
            if np.sum(np.abs(diff) * room) < need:
                continue
            low, high = 0.0, 1.0
            for _ in range(60):
                mid = (low + high) / 2
                low, high = (low, mid) if np.sum(np.abs(diff) * np.minimum(mid, room)) >= need else (mid, high)
            best[i] = min(best[i], high)
    return best


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_radius_of_a_linear_model_is_the_closed_form(norm):
    model, w, _ = linear_model(0)
    rng = np.random.default_rng(1)
    x = rng.uniform(0.3, 0.7, size=(128, 4, 5, 1)).astype(np.float32)
    logits = model(x).numpy()
    y = logits.argmax(1)
    exact = closed_form(x, logits, y, w, norm)
    free = exact < 0.3  # the box cannot bind: every pixel is at least 0.3 from 0 and 1
    assert free.sum() > 100
    x_adv, radius = min_norm.minimum_norm(model, x, y, norm=norm, steps=100)
    radius = radius.numpy()[free]
    # Never below the true minimum (the points are adversarial), and within 1% of it.
    assert np.all(radius >= exact[free] * (1 - 1e-4))
    np.testing.assert_allclose(radius, exact[free], rtol=0.01)
    delta = (x_adv.numpy() - x).reshape(len(x), -1)[free]
    size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    np.testing.assert_allclose(size, radius, rtol=1e-5)
    assert np.all(model(x_adv).numpy().argmax(1)[free] != y[free])


def test_linf_radius_where_the_box_binds():
    """Pixels near 0 and 1 cannot move toward them: the radius grows beyond the unconstrained one."""
    model, w, _ = linear_model(2, scale=0.04)
    rng = np.random.default_rng(3)
    x = rng.choice([0.02, 0.5, 0.98], size=(96, 4, 5, 1)).astype(np.float32)
    logits = model(x).numpy()
    y = logits.argmax(1)
    exact = linf_with_box(x, logits, y, w)
    binds = exact > closed_form(x, logits, y, w, "linf") * 1.05
    assert binds.sum() > 20
    reachable = np.isfinite(exact)
    # Untargeted, it follows the class closest now, which the box may block: never below the true radius,
    # sometimes above it. With a run toward every other class it finds the true radius.
    _, untargeted = min_norm.minimum_norm(model, x, y, norm="linf", steps=100)
    assert np.all(untargeted.numpy()[reachable] >= exact[reachable] * (1 - 1e-4))
    x_adv, radius = min_norm.minimum_norm(model, x, y, norm="linf", steps=100, num_targets=K - 1)
    radius = radius.numpy()
    assert max(np.abs(logits).max(), np.abs(model(x_adv)).max()) < 1  # the clear margin is 0.01 throughout
    assert np.all(radius[reachable] >= exact[reachable] * (1 - 1e-4))
    np.testing.assert_allclose(radius[reachable], exact[reachable], rtol=0.01)
    assert x_adv.numpy().min() >= 0.0 and x_adv.numpy().max() <= 1.0


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_what_no_point_of_the_box_breaks_stays_unbroken(norm):
    """Two classes and a bias larger than anything the weights can take away inside [0, 1]^d: no point of
    the box changes the label, so the radius is inf and the point returned is the image itself."""
    rng = np.random.default_rng(9)
    w = rng.normal(size=(D, 2)).astype(np.float32)
    b = np.array([np.abs(w[:, 0] - w[:, 1]).sum() + 0.5, 0.0], np.float32)
    model = lambda x: tf.matmul(tf.reshape(x, [-1, D]), w) + b  # noqa: E731
    x = rng.uniform(0, 1, size=(8, 4, 5, 1)).astype(np.float32)
    y = np.zeros(8, np.int64)
    x_adv, radius = min_norm.minimum_norm(model, x, y, norm=norm, steps=50, num_targets=1)
    assert np.all(np.isinf(radius.numpy()))
    np.testing.assert_array_equal(x_adv.numpy(), x)


def test_l2_radius_where_the_pull_is_on_black_pixels():
    """Fashion-MNIST's background is 0: where the class boundary lies mostly through pixels that would have
    to go below 0, the steps must use the pixels the box leaves open (found by FMN on a natural model: 24
    of 857 images never broken before its steps did). Exact L2 radius: the margin over the norm of the
    weight difference restricted to the movable pixels."""
    rng = np.random.default_rng(8)
    w = (rng.normal(size=(D, K)) * 0.05).astype(np.float32)
    black = np.arange(D) < D // 2
    w[black] -= 0.5 * np.abs(rng.normal(size=(D // 2, K))).astype(np.float32) * (np.arange(K) > 0)
    w[black, 0] += 0.5  # class 0 is the black-pixel class: every other class pulls black pixels down
    model = lambda x: tf.matmul(tf.reshape(x, [-1, D]), w)  # noqa: E731
    x = np.where(black, 0.0, rng.uniform(0.4, 0.6, size=(64, D))).astype(np.float32).reshape(64, 4, 5, 1)
    logits = model(x).numpy()
    y = logits.argmax(1)
    assert np.mean(y == 0) > 0.5
    exact = np.full(len(x), np.inf)
    for i in range(len(x)):
        for j in set(range(K)) - {y[i]}:
            diff = w[:, j] - w[:, y[i]]
            movable = np.where(black & (diff < 0), 0.0, diff)
            need = logits[i, y[i]] - logits[i, j] + clear(logits[i])
            exact[i] = min(exact[i], need / np.linalg.norm(movable))
    assert np.all(exact < 0.38)  # small enough that no other pixel reaches 0 or 1
    _, untargeted = min_norm.minimum_norm(model, x, y, norm="l2", steps=100)
    assert np.all(np.isfinite(untargeted.numpy()))
    assert np.all(untargeted.numpy() >= exact * (1 - 1e-4))
    _, radius = min_norm.minimum_norm(model, x, y, norm="l2", steps=100, num_targets=K - 1)
    np.testing.assert_allclose(radius.numpy(), exact, rtol=0.01)


@pytest.mark.parametrize("norm, eps", [("linf", 0.17), ("l2", 0.55)])
def test_at_a_radius_it_breaks_what_is_within_reach_and_stays_in_the_ball(norm, eps):
    model, w, _ = linear_model(4)
    rng = np.random.default_rng(5)
    x = rng.uniform(0.3, 0.7, size=(64, 4, 5, 1)).astype(np.float32)
    logits = model(x).numpy()
    y = logits.argmax(1)
    y[:4] = (y[:4] + 1) % K  # misclassified already: radius 0
    exact = closed_form(x, model(x).numpy(), logits.argmax(1), w, norm)
    x_adv = min_norm.fmn(model, x, y, eps=eps, norm=norm, steps=100).numpy()
    delta = (x_adv - x).reshape(len(x), -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert np.all(size <= eps * (1 + 1e-5)) and x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    wrong = model(x_adv).numpy().argmax(1) != y
    assert np.all(wrong[:4]) and np.all(size[:4] == 0)
    clear_cut = np.abs(exact[4:] - eps) > 0.02 * eps  # away from the radius, where 1% matters
    np.testing.assert_array_equal(wrong[4:][clear_cut], (exact[4:] <= eps)[clear_cut])
    assert 5 < wrong[4:].sum() < 55


def test_bad_arguments_are_named():
    model, _, _ = linear_model(0)
    x, y = np.full((2, 4, 5, 1), 0.5, np.float32), np.array([0, 1])
    with pytest.raises(ValueError, match="steps"):
        min_norm.minimum_norm(model, x, y, steps=0)
    with pytest.raises(ValueError, match=r"gamma_init: expected a number in \(0, 1\)"):
        min_norm.minimum_norm(model, x, y, gamma_init=1.5)
    with pytest.raises(ValueError, match="alpha_init: expected a number > 0"):
        min_norm.minimum_norm(model, x, y, alpha_init=0)
    with pytest.raises(ValueError, match="norm: expected one of linf, l2"):
        min_norm.minimum_norm(model, x, y, norm="l1")


def test_report_reads_robust_accuracy_against_eps_from_the_radii(tmp_path):
    """One FMN run gives every example's radius: the curve read from them at eps agrees with FMN's breaks
    in the ensemble at eps."""
    model, _, _ = linear_model(6)
    rng = np.random.default_rng(7)
    x = rng.uniform(0.3, 0.7, size=(80, 4, 5, 1)).astype(np.float32)
    y = model(x).numpy().argmax(1)
    specs = [attack_spec("FMN", "fmn", steps=100)]
    report = evaluate.robustness_report(model, (x, y), eps=0.1, norm="l2", attacks=specs, batch_size=40,
                                        sweep_examples=40, sweep_eps=[0.05, 0.1, 0.2], output_dir=str(tmp_path),
                                        progress=False)
    radius = report["radius"]
    assert radius["num_examples"] == 80 and radius["attack"].startswith("FMN (100 steps")
    values = np.array([np.inf if r is None else r for r in radius["radii"]])
    assert radius["median"] == pytest.approx(np.median(values), rel=1e-5)
    assert radius["robust_at_eps"] == pytest.approx(np.mean(values > 0.1))
    assert 0.2 < radius["robust_at_eps"] < 0.8
    # The radius run and the ensemble's FMN at eps are the same search: the same breaks.
    assert report["worst_case"]["accuracy"] == pytest.approx(radius["robust_at_eps"], abs=1 / 80)
    assert evaluate.accuracy_at(radius["radii"], [0.0, 0.1, 100.0]) == [1.0, radius["robust_at_eps"], 0.0]
    md = (tmp_path / "report.md").read_text()
    assert "radius (FMN (100 steps, minimum norm, loss=margin, L2), 80 examples): median" in md
    assert (tmp_path / "accuracy_vs_eps.png").read_bytes()[:4] == b"\x89PNG"
    # Without FMN in the ensemble there are no radii unless asked for.
    plain = evaluate.robustness_report(model, (x[:20], y[:20]), eps=0.3, norm="l2", attacks="pgd20",
                                       sweep_examples=0, progress=False)
    assert plain["radius"] is None
    asked = evaluate.robustness_report(model, (x[:20], y[:20]), eps=0.3, norm="l2", attacks="pgd20",
                                       sweep_examples=0, progress=False, radius_examples=10)
    assert asked["radius"]["num_examples"] == 10
    with pytest.raises(ValueError, match="radius_examples"):
        evaluate.robustness_report(model, (x, y), eps=0.3, norm="l2", attacks="pgd20", radius_examples=-1)
