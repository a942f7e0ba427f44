"""The single-step front: N-FGSM, FGSM-PGI, the learned initialisation (RVSInitModel) and the catastrophic
overfitting monitor. Each crafts where its paper says, trains, saves, reloads and exports."""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import logging

from rvs_tf import baselines, export, models
from rvs_tf.learned_init import RVSInitModel
from rvs_tf.monitors import CatastrophicOverfittingMonitor
from test_training import SHAPE, tiny_classifier, tiny_data

EPS = 0.1


def init_model(generator_every=3, **kwargs):
    keras.utils.set_random_seed(0)
    model = RVSInitModel(tiny_classifier(), models.make_init_generator(SHAPE, width=4), eps=EPS,
                         generator_every=generator_every, eval_pgd_steps=2, **kwargs)
    model.compile(classifier_optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  generator_optimizer=keras.optimizers.Adam(1e-2))
    return model


def baseline(cls, **kwargs):
    keras.utils.set_random_seed(0)
    model = cls(tiny_classifier(), eps=EPS, eval_pgd_steps=2, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    return model


def batch(n=32):
    x, y = tiny_data(n)
    return tf.constant(x), tf.constant(y)


def test_nfgsm_leaves_the_ball_by_design_but_stays_in_the_image_range():
    model = baseline(baselines.NFGSMModel)
    x, y = batch()
    x_adv = model.adversarial_examples(x, y, tf.constant(EPS)).numpy()
    distance = np.abs(x_adv - x.numpy())
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert distance.max() > EPS + 1e-3 and distance.max() <= 3 * EPS + 1e-6  # k eps noise + one eps step
    plain = baseline(baselines.NFGSMModel, noise_ratio=0.0)  # no noise: exactly FGSM from x, clipped
    fgsm = np.clip(x.numpy() + EPS * np.sign(
        baselines.input_gradient(plain.cross_entropy_of(y), x).numpy()), 0, 1)
    np.testing.assert_allclose(plain.adversarial_examples(x, y, tf.constant(EPS)).numpy(), fgsm, atol=1e-6)


def test_fgsm_pgi_stays_in_the_ball_and_carries_its_prior_between_batches():
    model = baseline(baselines.FGSMPGIModel, prior_capacity=32)
    x, y = batch()
    first = model.prior.numpy().copy()
    assert set(np.unique(first)) <= {-1.0, 1.0}  # the authors' first start: +-eps
    x_adv = model.adversarial_examples(x, y, tf.constant(EPS)).numpy()
    assert np.abs(x_adv - x.numpy()).max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["pairing_loss"]) and logs["pairing_loss"] > 0
    prior = model.prior.numpy()
    assert not np.allclose(prior, first) and np.abs(prior).max() <= 1 + 1e-6  # moved, inside the ball
    start, _ = model.prior_start(x, EPS)
    np.testing.assert_allclose(start.numpy(), np.clip(x.numpy() + EPS * prior, np.maximum(x - EPS, 0),
                                                      np.minimum(x + EPS, 1)), atol=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError, match="prior_capacity"):
        model.prior_start(tf.zeros([33, *SHAPE]), EPS)


def test_fgsm_pgi_prior_survives_save_and_load(tmp_path):
    model = baseline(baselines.FGSMPGIModel, prior_capacity=32)
    x, y = tiny_data(32)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    model.save_weights(str(tmp_path / "w.weights.h5"))
    other = baseline(baselines.FGSMPGIModel, prior_capacity=32)
    assert not np.allclose(other.prior.numpy(), model.prior.numpy())
    other.load_weights(str(tmp_path / "w.weights.h5"))
    np.testing.assert_allclose(other.prior.numpy(), model.prior.numpy())
    np.testing.assert_allclose(other.prior_gradient.numpy(), model.prior_gradient.numpy())


def test_learned_start_lies_inside_the_ball_and_the_final_example_too():
    model = init_model()
    x, y = batch()
    start = model.start(x, model.gradient_sign(x, y), EPS, stream=0).numpy()
    assert np.abs(start - x.numpy()).max() <= EPS + 1e-6 and start.min() >= 0 and start.max() <= 1
    assert np.abs(start - x.numpy()).max() > 0  # the generator moves the start
    x_adv = model.adversarial_examples(x, y, tf.constant(EPS)).numpy()
    assert np.abs(x_adv - x.numpy()).max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    ce = lambda images: float(tf.reduce_mean(model.cross_entropy_of(y)(images)))
    assert ce(x_adv) > ce(x)


def test_generator_moves_only_every_k_steps_and_ascends_the_loss():
    model = init_model(generator_every=3)
    x, y = batch()
    weights = lambda: [v.numpy().copy() for v in model.generator.trainable_variables]
    changed = []
    for _ in range(6):
        before = weights()
        model.train_on_batch(x, y)
        changed.append(any(not np.allclose(a, b) for a, b in zip(before, weights())))
    assert changed == [True, False, False, True, False, False]  # steps 0 and 3 of the classifier


def test_generator_step_raises_the_loss_at_the_final_example():
    model = init_model(generator_every=1)
    x, y = batch()
    sign = model.gradient_sign(x, y)
    loss = lambda: float(tf.reduce_mean(model.cross_entropy_of(y)(
        model.step_from(x, y, model.start(x, sign, EPS, stream=0), EPS))))
    before = loss()
    for _ in range(5):
        model.generator_step(x, y, sign, tf.constant(EPS))
    assert loss() > before


@pytest.mark.parametrize("options", [{}, {"pairing_weight": 1.0, "ot_weight": 0.5, "label_smoothing": 0.2}])
def test_learned_init_trains_saves_reloads_and_exports(options, tmp_path):
    model = init_model(**options)
    x, y = tiny_data(64)
    before = [v.numpy().copy() for v in model.classifier.trainable_variables]
    history = model.fit(x, y, batch_size=32, epochs=2, validation_data=(x, y), verbose=0).history
    assert np.isfinite(history["loss"][-1]) and "val_fgsm_accuracy" in history
    assert any(not np.allclose(b, v.numpy()) for b, v in zip(before, model.classifier.trainable_variables))
    path = str(tmp_path / "init.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is RVSInitModel and loaded.generator_every == model.generator_every
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    for a, b in zip(loaded.generator.weights, model.generator.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy())
    version = export.export_classifier(model.classifier, str(tmp_path / "export"), "init")
    assert os.path.isdir(version)


def test_learned_init_checks_its_arguments():
    with pytest.raises(ValueError, match="generator_every"):
        init_model(generator_every=0)
    with pytest.raises(ValueError, match="generator: expected input"):
        RVSInitModel(tiny_classifier(), models.make_generator(8, SHAPE), eps=EPS)
    with pytest.raises(ValueError, match="noise_channels"):
        models.make_init_generator(SHAPE, noise_channels=-1)


def masking_classifier():
    """A constructed collapse: the logits are flat (zero input gradient) within L1 distance 1 of the
    grey image and fall steeply beyond, so FGSM from the grey image does not move it while PGD's random
    start lands outside and breaks it: FGSM accuracy 100%, PGD accuracy 0%."""
    inputs = keras.Input(SHAPE)
    distance = keras.layers.Lambda(lambda x: tf.reduce_sum(tf.abs(x - 0.5), axis=[1, 2, 3], keepdims=False))(inputs)
    beyond = keras.layers.Lambda(lambda d: tf.nn.relu(d[:, None] - 1.0), name="features")(distance)
    logits = keras.layers.Dense(4, name="logits")(beyond)
    model = keras.Model(inputs, logits)
    model.get_layer("logits").set_weights([np.array([[-100.0, 0.0, 0.0, 0.0]], "float32"),
                                           np.array([5.0, 0.0, 0.0, 0.0], "float32")])
    return model


def test_overfitting_warning_fires_on_a_constructed_collapse(monkeypatch):
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda message, *args: warnings.append(message % args))
    model = baselines.FGSMRSModel(masking_classifier(), eps=EPS, eval_pgd_steps=5)
    model.compile(optimizer=keras.optimizers.SGD(0.0))  # nothing moves: the collapse is built in
    x, y = np.full((16, *SHAPE), 0.5, "float32"), np.zeros(16, "int64")
    monitor = CatastrophicOverfittingMonitor(max_gap=0.3)
    history = model.fit(x, y, batch_size=8, epochs=2, validation_data=(x, y), callbacks=[monitor], verbose=0)
    assert history.history["val_fgsm_accuracy"][-1] == 1.0 and history.history["val_pgd_accuracy"][-1] == 0.0
    assert history.history["catastrophic_overfitting"] == [1.0, 1.0]
    assert monitor.collapsed_epochs == [1, 2]
    assert len(warnings) == 2 and "Epoch 2: catastrophic overfitting" in warnings[1]


def test_overfitting_monitor_is_quiet_on_a_healthy_gap():
    monitor = CatastrophicOverfittingMonitor(max_gap=0.3)
    logs = {"val_fgsm_accuracy": 0.66, "val_pgd_accuracy": 0.60}
    monitor.on_epoch_end(0, logs)
    assert logs["catastrophic_overfitting"] == 0.0 and logs["val_fgsm_pgd_gap"] == pytest.approx(0.06)
    assert monitor.collapsed_epochs == []
    with pytest.raises(ValueError, match="max_gap"):
        CatastrophicOverfittingMonitor(max_gap=0)


@pytest.mark.parametrize("method", ["fgsm_pgi", "rvs_init"])
def test_two_replicas_train_with_per_replica_priors_and_a_periodic_generator(method):
    from test_distribute import mirrored

    strategy = mirrored()
    with strategy.scope():
        if method == "rvs_init":
            model = init_model(generator_every=2)
        else:
            model = baseline(baselines.FGSMPGIModel, prior_capacity=8)
    x, y = tiny_data(32)
    before = [v.numpy().copy() for v in model.classifier.trainable_variables]
    history = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0).history
    assert np.isfinite(history["loss"][-1])
    assert any(not np.allclose(b, v.numpy()) for b, v in zip(before, model.classifier.trainable_variables))
    if method == "fgsm_pgi":
        replicas = model.prior.value.values  # the tf.distribute variable: one copy per replica
        assert len(replicas) == 2 and not np.allclose(replicas[0].numpy(), replicas[1].numpy())


def test_learned_nfgsm_leaves_the_ball_by_design_within_its_budget():
    model = init_model(start_ratio=2.0, project=False)
    x, y = batch()
    start = model.start(x, model.gradient_sign(x, y), EPS, stream=0).numpy()
    assert np.abs(start - x.numpy()).max() <= 2 * EPS + 1e-6
    x_adv = model.adversarial_examples(x, y, tf.constant(EPS)).numpy()
    distance = np.abs(x_adv - x.numpy())
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and EPS + 1e-3 < distance.max() <= 3 * EPS + 1e-6
    assert RVSInitModel.from_config(model.get_config()).project is False


def test_noise_under_the_learned_start_widens_it_within_its_budget():
    x, y = batch()
    sign = init_model().gradient_sign(x, y)
    plain = init_model().start(x, sign, EPS, stream=0).numpy()
    model = init_model(noise_ratio=2.0, start_ratio=0.5, project=False)
    start = model.start(x, sign, EPS, stream=0).numpy()
    distance = np.abs(start - x.numpy())
    assert start.min() >= 0 and start.max() <= 1 and distance.max() <= 2.5 * EPS + 1e-6
    assert distance.max() > 1.5 * EPS and np.abs(plain - x.numpy()).max() <= EPS + 1e-6  # the noise is there
    assert RVSInitModel.from_config(model.get_config()).noise_ratio == 2.0
    with pytest.raises(ValueError, match="noise_ratio: expected >= 0"):
        init_model(noise_ratio=-1.0)
