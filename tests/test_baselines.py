"""Baseline defences: each trains under model.fit, crafts examples inside the eps-ball, and saves."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from rvs_tf import baselines
from test_training import tiny_classifier, tiny_data


def compiled(cls, **kwargs):
    keras.utils.set_random_seed(0)
    model = cls(tiny_classifier(), eps=0.1, eval_pgd_steps=2, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    return model


def clean_cross_entropy(classifier, x, y):
    """Mean CE of the classifier in inference mode, computed with Keras alone (not the model's helpers)."""
    logits = classifier(x, training=False)
    return float(np.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)))


@pytest.mark.parametrize("name", sorted(baselines.METHODS))
def test_each_method_trains_saves_and_reloads(name, tmp_path):
    model = compiled(baselines.METHODS[name])
    x, y = tiny_data(64)
    before = clean_cross_entropy(model.classifier, x, y)
    history = model.fit(x, y, batch_size=32, epochs=3, validation_data=(x, y), verbose=0)
    assert clean_cross_entropy(model.classifier, x, y) < before - 0.05  # it learned the fixed batch
    logs = {key: values[-1] for key, values in history.history.items()}
    assert 0.0 <= logs["val_pgd_accuracy"] <= logs["val_clean_accuracy"] <= 1.0
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    strip = lambda config: {k: v for k, v in config.items() if k != "classifier"}
    assert type(loaded) is type(model) and strip(loaded.get_config()) == strip(model.get_config())
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


@pytest.mark.parametrize("name", ["fgsm_rs", "pgd", "trades", "fgsm_pgi"])
def test_training_examples_stay_in_the_ball_and_raise_the_loss(name):
    model = compiled(baselines.METHODS[name])
    x, y = (tf.constant(a) for a in tiny_data(32))
    x_adv = model.adversarial_examples(x, y, tf.constant(0.1)).numpy()
    assert np.abs(x_adv - x.numpy()).max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert clean_cross_entropy(model.classifier, x_adv, y) > clean_cross_entropy(model.classifier, x, y)


def test_fgsm_rs_example_is_one_signed_step_from_its_start():
    """FGSM-RS's example against an independent computation: from its uniform start (clipped to the ball),
    one step of 1.25 eps along the sign of Keras's cross-entropy gradient, projected onto the ball."""
    model = compiled(baselines.FGSMRSModel)
    x, y = (tf.constant(a) for a in tiny_data(16))
    eps = 0.1
    lo, hi = np.maximum(x.numpy() - eps, 0.0), np.minimum(x.numpy() + eps, 1.0)
    start = tf.constant(np.clip(model.uniform_start(x, tf.constant(eps)).numpy(), lo, hi))
    with tf.GradientTape() as tape:
        tape.watch(start)
        loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(
            y, model.classifier(start, training=False), from_logits=True))
    expected = np.clip(start.numpy() + 1.25 * eps * np.sign(tape.gradient(loss, start).numpy()), lo, hi)
    np.testing.assert_allclose(model.adversarial_examples(x, y, tf.constant(eps)).numpy(), expected, atol=1e-6)


def test_pgd_training_attack_uses_its_step_size():
    """One PGD step of a given size from no random start moves every free pixel by exactly that size."""
    model = compiled(baselines.PGDATModel, steps=1, step_size=0.03)
    x, y = (tf.constant(a) for a in tiny_data(8))
    x = tf.clip_by_value(x, 0.2, 0.8)  # no pixel at the [0, 1] border
    x_adv = baselines.signed_ascent(model.cross_entropy_of(y), x, x, 0.1, 1, 0.03).numpy()
    moved = np.abs(x_adv - x.numpy())
    assert np.allclose(moved[moved > 0], 0.03, atol=1e-6) and (moved > 0).mean() > 0.5


def test_natural_training_ignores_eps_and_reports_clean_accuracy():
    x, y = tiny_data(32)
    steps = {}
    for eps in (0.1, 0.5):
        keras.utils.set_random_seed(0)
        model = baselines.NaturalModel(tiny_classifier(), eps=eps, eval_pgd_steps=2)
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
        assert model.adversarial_examples(x, y, tf.constant(eps)) is x
        predictions = model.classifier(x, training=False).numpy().argmax(-1)
        before = clean_cross_entropy(model.classifier, x, y)
        logs = model.train_on_batch(x, y, return_dict=True)
        assert "adv_accuracy" not in logs
        assert logs["clean_accuracy"] == pytest.approx(np.mean(predictions == y))  # of the batch it trained on
        assert logs["loss"] == pytest.approx(before, rel=1e-5)  # plain CE at the step's weights
        steps[eps] = logs, [v.numpy() for v in model.classifier.trainable_variables]
    assert steps[0.1][0] == steps[0.5][0]
    for small, large in zip(steps[0.1][1], steps[0.5][1]):
        np.testing.assert_array_equal(small, large)


def test_trades_beta_and_bad_arguments():
    with pytest.raises(ValueError, match="beta"):
        baselines.TRADESModel(tiny_classifier(), eps=0.1, beta=-1)
    with pytest.raises(ValueError, match="steps"):
        baselines.PGDATModel(tiny_classifier(), eps=0.1, steps=0)
    with pytest.raises(ValueError, match="step_ratio"):
        baselines.FGSMRSModel(tiny_classifier(), eps=0.1, step_ratio=0)


@pytest.mark.parametrize("name", sorted(baselines.METHODS) + ["rvs"])
def test_label_smoothing_reaches_every_methods_loss(name):
    from rvs_tf import models
    from rvs_tf.training import RVSModel, smooth_labels

    x, y = tiny_data(32)

    def first_loss(smoothing):
        keras.utils.set_random_seed(0)
        if name == "rvs":
            model = RVSModel(tiny_classifier(), models.make_generator(8, (12, 12, 1)), eps=0.1,
                             label_smoothing=smoothing)
            model.compile(classifier_optimizer="sgd", generator_optimizer="sgd")
        else:
            model = baselines.METHODS[name](tiny_classifier(), eps=0.1, label_smoothing=smoothing)
            model.compile(optimizer="sgd")
        before = model.classifier(x).numpy()
        return model.train_on_batch(x, y, return_dict=True)["loss"], before

    plain, logits = first_loss(0.0)
    smoothed, _ = first_loss(0.5)
    assert smoothed != pytest.approx(plain, rel=1e-3)
    if name == "natural":  # the first step's loss is the smoothed cross-entropy at the initial weights
        expected = keras.losses.categorical_crossentropy(smooth_labels(y, 4, 0.5), logits, from_logits=True)
        assert smoothed == pytest.approx(float(np.mean(expected)), rel=1e-5)
