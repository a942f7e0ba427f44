"""Training under the L2 threat model: every method's examples in the L2 ball and [0, 1], the FGM step
against an independent computation, validation and saving under the norm, and bad input named."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from rvs_tf import baselines, models
from rvs_tf.learned_init import RVSInitModel
from rvs_tf.run_config import RunConfig
from rvs_tf.rvs import RVSModel
from rvs_tf.threat_model import ThreatModelWarning
from test_training import SHAPE, tiny_classifier, tiny_data

EPS = 1.0  # L2, on 12x12 images (diameter 12)


def l2(t):
    return np.sqrt(np.sum(np.square(np.asarray(t)).reshape(len(t), -1), axis=1))


def build(name, **options):
    keras.utils.set_random_seed(0)
    common = dict(eps=EPS, norm="l2", eval_pgd_steps=2, **options)
    if name == "rvs":
        model = RVSModel(tiny_classifier(), models.make_generator(8, SHAPE), ot_max_iters=5, **common)
    elif name == "rvs_init":
        model = RVSInitModel(tiny_classifier(), models.make_init_generator(SHAPE, width=4), noise_ratio=1.0,
                             **common)
    else:
        model = baselines.METHODS[name](tiny_classifier(), **common)
    if name.startswith("rvs"):
        model.compile(classifier_optimizer=keras.optimizers.SGD(0.05), generator_optimizer=keras.optimizers.SGD(0.01))
    else:
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    return model


def cross_entropy(classifier, x, y):
    logits = classifier(x, training=False)
    return float(np.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)))


# N-FGSM's perturbation is U(ball of k eps) + one step of eps, by design not projected: (2 + 1) eps.
@pytest.mark.parametrize("name, reach", [("fgsm_rs", 1), ("pgd", 1), ("trades", 1), ("nfgsm", 3), ("rvs", 1),
                                         ("rvs_init", 1)])
def test_l2_training_examples_stay_in_their_ball_and_the_box(name, reach):
    model = build(name)
    x, y = (tf.constant(a) for a in tiny_data(32))
    x_adv = model.adversarial_examples(x, y, tf.constant(EPS)).numpy()
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert l2(x_adv - x.numpy()).max() <= reach * EPS * (1 + 1e-5)
    assert np.abs(x_adv - x.numpy()).max() > 0.15  # L2 concentrates: pixels move far beyond an L-inf 0.1
    if name in ("fgsm_rs", "pgd", "trades", "nfgsm"):
        assert cross_entropy(model.classifier, x_adv, y) > cross_entropy(model.classifier, x, y)


def test_l2_fgsm_rs_is_one_normalised_gradient_step_from_its_start():
    """From its start (a uniform point of the ball, projected into the box), one step of 1.25 eps along
    Keras's cross-entropy gradient divided by its L2 norm, then projected onto the ball and the box."""
    model = build("fgsm_rs")
    x, y = (tf.constant(a) for a in tiny_data(16))
    x_np = x.numpy()

    def project(point):
        delta = point - x_np
        scale = np.minimum(1.0, EPS / np.maximum(l2(delta), 1e-12)).reshape(-1, 1, 1, 1)
        return np.clip(x_np + delta * scale, 0.0, 1.0)

    start = tf.constant(project(model.uniform_start(x, tf.constant(EPS)).numpy()))
    with tf.GradientTape() as tape:
        tape.watch(start)
        loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(
            y, model.classifier(start, training=False), from_logits=True))
    g = tape.gradient(loss, start).numpy()
    expected = project(start.numpy() + 1.25 * EPS * g / l2(g).reshape(-1, 1, 1, 1))
    np.testing.assert_allclose(model.adversarial_examples(x, y, tf.constant(EPS)).numpy(), expected, atol=1e-5)


def test_l2_training_validates_and_saves_under_its_norm(tmp_path):
    model = build("pgd", steps=3)
    x, y = tiny_data(64)
    history = model.fit(x, y, batch_size=32, epochs=2, validation_data=(x, y), verbose=0).history
    assert 0.0 <= history["val_pgd_accuracy"][-1] <= history["val_clean_accuracy"][-1]
    model.save(tmp_path / "l2.keras")
    loaded = keras.models.load_model(tmp_path / "l2.keras")
    assert loaded.norm == "l2" and loaded.get_config()["norm"] == "l2" and loaded.eps == EPS
    linf = baselines.PGDATModel(tiny_classifier(), eps=0.1, eval_pgd_steps=2)
    assert linf.norm == "linf"  # the default, as before norms existed


def test_bad_norms_and_radii_for_training_are_named():
    with pytest.raises(ValueError, match=r"norm: FGSM-PGI is defined in L-inf only"):
        baselines.FGSMPGIModel(tiny_classifier(), eps=EPS, norm="l2")
    with pytest.raises(ValueError, match=r"eps: expected 0 < eps <= 12 \(l2 radius"):
        baselines.PGDATModel(tiny_classifier(), eps=13.0, norm="l2")
    with pytest.raises(ValueError, match=r"eps: expected 0 < eps <= 1 \(linf radius.*pass norm='l2'"):
        baselines.PGDATModel(tiny_classifier(), eps=1.5)
    with pytest.raises(ValueError, match=r"norm: expected one of linf, l2, got 'l3'"):
        RunConfig(norm="l3")
    with pytest.raises(ValueError, match=r"eps: expected a number in \(0, 1\] for norm linf.*--norm=l2"):
        RunConfig(eps=1.5)
    with pytest.warns(ThreatModelWarning, match=r"eps=0.03 is unusual for norm l2.*reads like a linf radius"):
        RunConfig(eps=0.03, norm="l2")
    assert RunConfig(eps=1.5, norm="l2").record()["norm"] == "l2"
    assert RunConfig.from_record({k: v for k, v in RunConfig().record().items() if k != "norm"}).norm == "linf"
