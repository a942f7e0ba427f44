"""RVSModel: the step does what DESIGN.md section 1 says, and the model behaves like any Keras model."""
import re

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from rvs_tf import models, rvs, sinkhorn
from rvs_tf.rvs import feature_spread
from rvs_tf.training import RVSModel, kernel_l2, smooth_labels

SHAPE = (12, 12, 1)
CLASSES = 4


def tiny_classifier(feature_name="features", name="tiny"):
    inputs = keras.Input(SHAPE)
    h = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(inputs)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(16, activation="relu", name=feature_name)(h)
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(h), name=name)


def tiny_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.uniform(0, 0.3, (n, *SHAPE)).astype("float32")
    for row in range(3):  # a learnable class signal: a bright band of three rows per class
        x[np.arange(n), y * 3 + row, :, 0] += 0.6
    return np.clip(x, 0, 1), y.astype("int64")


def make_model(**kwargs):
    options = dict(eps=0.1, ot_epsilon=0.1, ot_cost_scale="mean", ot_max_iters=50, eval_pgd_steps=3)
    options.update(kwargs)
    keras.utils.set_random_seed(0)
    model = RVSModel(tiny_classifier(), models.make_generator(8, SHAPE), **options)
    model.compile(classifier_optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  generator_optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    return model


def test_label_smoothing_follows_the_authors_convention():
    targets = smooth_labels(tf.constant([2]), 10, 0.5).numpy()[0]
    assert targets[2] == pytest.approx(0.5)
    np.testing.assert_allclose(np.delete(targets, 2), 0.5 / 9, rtol=1e-6)
    assert targets.sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(smooth_labels(tf.constant([1]), 3, 0.0).numpy(), [[0, 1, 0]])


def test_weight_decay_counts_kernels_only():
    classifier = tiny_classifier()
    for layer in classifier.layers:  # give biases weight so that counting them would show
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(tf.ones_like(layer.bias))
    kernels = sum(0.5 * np.sum(v.numpy() ** 2) for v in classifier.trainable_variables
                  if v.path.endswith("kernel"))
    everything = sum(0.5 * np.sum(v.numpy() ** 2) for v in classifier.trainable_variables)
    assert float(kernel_l2(classifier.trainable_variables)) == pytest.approx(kernels, rel=1e-5)
    assert everything - kernels > 1.0


def test_synthesised_batch_stays_in_the_eps_ball_and_the_image_range():
    model = make_model(eps=0.2)
    x, _ = tiny_data(16)
    for bound in ("clip", "tanh"):
        model.bound = bound
        x_adv = model.synthesize(tf.constant(x), tf.constant(0.2), stream=0).numpy()
        assert np.abs(x_adv - x).max() <= 0.2 + 1e-6
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
        assert np.abs(x_adv - x).max() > 0.05  # it is not a no-op


def test_one_step_updates_both_players_and_reports_every_term():
    model = make_model()
    x, y = tiny_data(32)
    before_c = [v.numpy().copy() for v in model.classifier.trainable_variables]
    before_g = [v.numpy().copy() for v in model.generator.trainable_variables]
    logs = model.train_on_batch(x, y, return_dict=True)
    assert {"loss", "ce_loss", "ot_loss", "generator_ot", "clean_accuracy", "adv_accuracy"} <= set(logs)
    assert all(np.isfinite(v) for v in logs.values())
    assert logs["ot_loss"] > 0 and logs["generator_ot"] > 0
    changed = lambda before, after: any(not np.allclose(b, a.numpy()) for b, a in zip(before, after))
    assert changed(before_c, model.classifier.trainable_variables)
    assert changed(before_g, model.generator.trainable_variables)
    assert int(model.generator_optimizer.iterations) == 1 and int(model.optimizer.iterations) == 1


def test_generator_step_ascends_the_transport_cost():
    """The generator's update direction increases OT(h(x), h(x_adv)) for the same noise and start."""
    model = make_model(bound="tanh")  # tanh: every pixel of delta has a gradient
    x = tf.constant(tiny_data(32)[0])
    eps = tf.constant(0.1)

    def cost():
        _, clean = model.heads(x)
        _, adversarial = model.heads(model.synthesize(x, eps, stream=0))
        return model.transport_cost(clean, adversarial)

    with tf.GradientTape() as tape:
        start = cost()
    grads = tape.gradient(start, model.generator.trainable_variables)
    for variable, grad in zip(model.generator.trainable_variables, grads):
        variable.assign_add(1e-3 * grad)  # a small ascent step
    assert float(cost()) > float(start)


def test_fit_evaluate_predict_with_plain_datasets():
    model = make_model()
    x, y = tiny_data(64)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    history = model.fit(dataset, epochs=2, validation_data=dataset, verbose=0)
    assert {"val_clean_accuracy", "val_pgd_accuracy", "loss"} <= set(history.history)
    results = model.evaluate(x, y, batch_size=32, return_dict=True, verbose=0)
    assert 0.0 <= results["pgd_accuracy"] <= results["clean_accuracy"] + 1e-6
    logits = model.predict(x[:5], verbose=0)
    np.testing.assert_allclose(logits, model.classifier(x[:5]).numpy(), atol=1e-5)


def test_training_learns_and_does_not_collapse():
    """DESIGN.md's trap: a badly scaled OT term makes the classifier collapse to a constant output."""
    model = make_model()
    x, y = tiny_data(256, seed=1)
    model.fit(x, y, batch_size=32, epochs=10, verbose=0)
    predictions = model.predict(x, verbose=0).argmax(-1)
    assert (predictions == y).mean() > 0.6
    assert len(np.unique(predictions)) == CLASSES


def test_save_and_load_round_trip(tmp_path):
    model = make_model()
    x, y = tiny_data(32)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    path = str(tmp_path / "rvs.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, RVSModel)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    assert loaded.eps == model.eps and loaded.ot_options == model.ot_options
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations)
    assert int(loaded.generator_optimizer.iterations) == int(model.generator_optimizer.iterations)
    loaded.fit(x, y, batch_size=16, epochs=1, verbose=0)  # and it trains on


def test_users_own_classifier_with_a_named_feature_layer():
    classifier = tiny_classifier(feature_name="penultimate")
    model = RVSModel(classifier, models.make_generator(8, SHAPE), eps=0.1, feature_layer="penultimate",
                     ot_epsilon=0.1, ot_cost_scale="mean")
    model.compile(classifier_optimizer="adam", generator_optimizer="adam")
    x, y = tiny_data(16)
    penultimate = keras.Model(classifier.input, classifier.get_layer("penultimate").output)(x).numpy()
    _, features = model.heads(tf.constant(x), training=False)
    np.testing.assert_allclose(features.numpy(), penultimate, atol=1e-6)  # the OT term compares that layer
    shifted = penultimate + 0.5
    factor = min(1.0, rvs.REFERENCE_SPREAD / np.trace(np.cov(penultimate, rowvar=False, bias=True)))
    assert float(model.transport_cost(tf.constant(penultimate), tf.constant(shifted))) == pytest.approx(
        float(sinkhorn.entropic_ot(penultimate, shifted, epsilon=0.1, cost_scale="mean")) * factor, rel=1e-5)
    clean_ce = lambda: float(np.mean(keras.losses.sparse_categorical_crossentropy(y, classifier(x),
                                                                                  from_logits=True)))
    before = clean_ce()
    for _ in range(15):
        model.train_on_batch(x, y)
    assert clean_ce() < before - 0.05  # the classifier learns the fixed batch through the user's layers
    with pytest.raises(ValueError, match=re.escape("feature_layer") + ".*'nope'.*penultimate"):
        RVSModel(classifier, models.make_generator(8, SHAPE), eps=0.1, feature_layer="nope")


@pytest.mark.parametrize("kwargs, message", [
    ({"eps": 0.0}, "eps"), ({"eps": 1.5}, "eps"), ({"bound": "sigmoid"}, "bound"),
    ({"ot_on": "pixels"}, "ot_on"), ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"ot_gradient": "magic"}, "gradient"), ({"ot_units": "pixels"}, "ot_units: expected one of"),
    ({"ot_share_cap": 0.0}, "ot_share_cap: expected a number > 0, or None"),
])
def test_bad_arguments_name_themselves(kwargs, message):
    options = dict(eps=0.1)
    options.update(kwargs)
    with pytest.raises(ValueError, match=message):
        RVSModel(tiny_classifier(), models.make_generator(8, SHAPE), **options)


def test_generator_shape_must_match_the_classifier():
    with pytest.raises(ValueError, match="generator"):
        RVSModel(tiny_classifier(), models.make_generator(8, (16, 16, 1)), eps=0.1)


@pytest.mark.parametrize("ot_units", ["absolute", "spread"])
def test_ot_term_matches_the_sinkhorn_module(ot_units):
    """In raw squared feature units the term is the solver's; by default it is scaled by
    min(1, REFERENCE_SPREAD / spread), the spread being the trace of the clean batch's (biased)
    covariance, computed here by numpy (about 16 for these 16-d unit normals: a factor near 1/2)."""
    model = make_model(ot_units=ot_units)
    a, b = tf.random.normal([8, 16]), tf.random.normal([8, 16])
    expected = float(sinkhorn.entropic_ot(a, b, epsilon=0.1, cost_scale="mean", max_iters=50))
    if ot_units == "spread":
        spread = np.trace(np.cov(a.numpy(), rowvar=False, bias=True))
        assert spread > rvs.REFERENCE_SPREAD
        expected *= rvs.REFERENCE_SPREAD / spread
    assert float(model.transport_cost(a, b)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("feature_distance", ["sinkhorn", "paired_mse"])
def test_default_feature_term_stops_growing_with_the_feature_scale(feature_distance):
    """Why BatchNorm classifiers train with the defaults: below the reference spread the term is the raw
    one (the default CNN trains exactly as the authors'); above it, scaling every feature by c leaves the
    term unchanged where in raw units it grows as c^2, and its gradient has no component along the
    features themselves (Euler: a function of degree 0 has a radial derivative of 0), so shrinking the
    features is no way to lower it. With the spread held fixed the radial derivative would be 2x the term."""
    a, b = tf.random.normal([16, 8], seed=1), tf.random.normal([16, 8], seed=2) + 0.5
    spread, absolute = (make_model(ot_units=units, feature_distance=feature_distance) for units in
                        ("spread", "absolute"))
    small = 0.5  # spread about 0.25 x 8 = 2: under the reference
    assert float(spread.transport_cost(small * a, small * b)) == float(absolute.transport_cost(small * a, small * b))
    a, b = 2.0 * a, 2.0 * b  # spread about 32: over the reference
    assert float(feature_spread(a)) > 2 * rvs.REFERENCE_SPREAD
    for scale in (0.8, 5.0):
        assert float(spread.transport_cost(scale * a, scale * b)) == pytest.approx(
            float(spread.transport_cost(a, b)), rel=1e-4)
        assert float(absolute.transport_cost(scale * a, scale * b)) == pytest.approx(
            scale ** 2 * float(absolute.transport_cost(a, b)), rel=1e-4)
    with tf.GradientTape() as tape:
        tape.watch([a, b])
        cost = spread.transport_cost(a, b)
    grad_a, grad_b = tape.gradient(cost, [a, b])
    radial = float(tf.reduce_sum(grad_a * a) + tf.reduce_sum(grad_b * b))
    assert abs(radial) < 1e-3 * float(cost) and float(tf.norm(grad_a) * tf.norm(a)) > 0.1 * float(cost)


def test_models_saved_before_ot_units_keep_raw_units():
    """A config without `ot_units` (written before it existed) trained in raw squared units."""
    config = make_model().get_config()
    del config["ot_units"]
    assert RVSModel.from_config(config).ot_units == "absolute"
    assert make_model().ot_units == "spread"


def start_share(model, x, y, eps, stream):
    """|d(ot_weight * OT)/dw| / |d CE/dw| over the classifier at the model's current step, computed here
    from the model's own pieces (its step-seeded synthesised batch, frozen generator: no generator step)."""
    x = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        _, clean = model.heads(x)
        logits, adversarial = model.heads(model.synthesize(x, eps, stream=stream))
        ce = model.cross_entropy(model.targets(y), logits)
        ot = model.transport_cost(clean, adversarial)
    variables = model.classifier.trainable_variables
    return model.ot_weight * float(tf.linalg.global_norm(tape.gradient(ot, variables))
                                   / tf.linalg.global_norm(tape.gradient(ce, variables)))


@pytest.mark.parametrize("update", ["alternating", "simultaneous"])
def test_ot_share_cap_scales_the_term_by_the_share_measured_at_the_start(update):
    """The start share is the batch's gradient ratio (computed independently), averaged over the first
    OT_SHARE_STEPS steps and then held; the OT term's weight is scaled to meet the cap, never raised."""
    x, y = tiny_data(32)
    model = make_model(ot_weight=3.0, rvs_update=update, ot_share_cap=0.01)
    model.generator.trainable = False
    expected = start_share(model, x, y, model.eps, stream=2 if update == "alternating" else 0)
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    assert float(model.ot_start_share) == pytest.approx(expected, rel=1e-4)
    assert float(model.ot_scale()) == pytest.approx(0.01 / expected, rel=1e-4) and expected > 0.01
    model.fit(x, y, batch_size=32, epochs=rvs.OT_SHARE_STEPS - 1, shuffle=False, verbose=0)
    held = float(model.ot_start_share)
    assert held != pytest.approx(expected, rel=1e-3)  # a mean over the steps, not the first alone
    model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    assert float(model.ot_start_share) == held  # measured on the first steps only

    uncapped = make_model(ot_weight=3.0, rvs_update=update, ot_share_cap=1e6)
    uncapped.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert float(uncapped.ot_scale()) == 1.0 and float(uncapped.ot_start_share) > 0
    off = make_model(ot_share_cap=None)
    off.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert float(off.ot_start_share) == 0.0 and float(off.ot_scale()) == 1.0


def test_a_cap_that_does_not_bind_leaves_training_bit_identical():
    """Below the cap the step is the uncapped one exactly (the default small CNN's case)."""
    x, y = tiny_data(64)
    weights = []
    for cap in (None, 1e6):
        model = make_model(ot_share_cap=cap)
        model.fit(x, y, batch_size=16, epochs=3, verbose=0)
        weights.append([v.numpy() for v in model.classifier.weights + model.generator.weights])
    for before, after in zip(*weights):
        np.testing.assert_array_equal(before, after)


def test_the_start_share_is_saved_and_old_models_keep_their_full_weight(tmp_path):
    x, y = tiny_data(32)
    model = make_model(ot_share_cap=0.01)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    model.save(tmp_path / "rvs.keras")
    loaded = keras.models.load_model(tmp_path / "rvs.keras")
    assert loaded.ot_share_cap == 0.01
    assert float(loaded.ot_start_share) == float(model.ot_start_share) > 0.01
    config = model.get_config()
    del config["ot_share_cap"]  # a config written before the cap existed: trained without it
    assert RVSModel.from_config(config).ot_share_cap is None
    assert make_model().ot_share_cap == rvs.DEFAULT_OT_SHARE_CAP

    model.save_weights(tmp_path / "state.weights.h5")  # what the training checkpoints hold
    resumed = make_model(ot_share_cap=0.01)
    resumed.load_weights(tmp_path / "state.weights.h5")
    assert float(resumed.ot_scale()) == float(model.ot_scale()) < 1.0
    with h5py.File(tmp_path / "state.weights.h5", "a") as handle:  # as written before the share existed
        del handle["vars"]["0"]
    old = make_model(ot_share_cap=0.01)
    old.load_weights(tmp_path / "state.weights.h5")
    np.testing.assert_array_equal(old.classifier.get_weights()[0], model.classifier.get_weights()[0])
    old.fit(x, y, batch_size=16, epochs=1, verbose=0)  # trained at full weight: it stays so, unmeasured
    assert float(old.ot_start_share) == 0.0 and float(old.ot_scale()) == 1.0


def test_the_start_share_is_measured_once_eps_has_reached_its_value():
    """The share grows with eps: under `eps_warmup_steps` it is measured on the first steps at full eps."""
    x, y = tiny_data(32)
    model = make_model(eps_warmup_steps=4)
    model.fit(x, y, batch_size=32, epochs=4, verbose=0)
    assert float(model.ot_share_state[1]) == 0.0
    model.fit(x, y, batch_size=32, epochs=rvs.OT_SHARE_STEPS + 3, verbose=0)
    assert float(model.ot_share_state[1]) == rvs.OT_SHARE_STEPS and float(model.ot_start_share) > 0


def test_simultaneous_update_moves_both_players_from_one_point():
    model = make_model(rvs_update="simultaneous")
    x, y = tiny_data(32)
    before_c = [v.numpy().copy() for v in model.classifier.trainable_variables]
    before_g = [v.numpy().copy() for v in model.generator.trainable_variables]
    logs = model.train_on_batch(x, y, return_dict=True)
    assert logs["generator_ot"] == pytest.approx(logs["ot_loss"])  # one OT value serves both players
    changed = lambda before, after: any(not np.allclose(b, a.numpy()) for b, a in zip(before, after))
    assert changed(before_c, model.classifier.trainable_variables)
    assert changed(before_g, model.generator.trainable_variables)
    with pytest.raises(ValueError, match="rvs_update"):
        make_model(rvs_update="sometimes")


@pytest.mark.parametrize("update", ["alternating", "simultaneous"])
def test_frozen_generator_never_changes(update):
    model = make_model(rvs_update=update)
    model.generator.trainable = False
    frozen = [v.numpy().copy() for v in model.generator.weights]
    x, y = tiny_data(32)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    for before, after in zip(frozen, model.generator.weights):
        np.testing.assert_array_equal(before, after.numpy())
    assert int(model.generator_optimizer.iterations) == 0


def test_keras_user_mistakes_get_clear_errors():
    model = make_model()
    x, y = tiny_data(16)
    with pytest.raises(ValueError, match="labels: expected integer class indices"):
        model.train_on_batch(x, np.eye(CLASSES)[y])
    with pytest.raises(ValueError, match="classifier_optimizer"):
        model.compile(optimizer="adam")
    assert np.isfinite(model.train_on_batch(x, y, sample_weight=np.ones(16), return_dict=True)["loss"])


def test_classifier_layer_regularisers_reach_the_loss():
    inputs = keras.Input(SHAPE)
    h = keras.layers.Dense(16, activation="relu", name="features")(keras.layers.Flatten()(inputs))
    outputs = keras.layers.Dense(CLASSES, kernel_regularizer=keras.regularizers.L2(10.0))(h)
    model = RVSModel(keras.Model(inputs, outputs), models.make_generator(8, SHAPE), eps=0.1)
    extra = float(tf.add_n(model.classifier.losses))
    assert extra > 0 and float(model.regularised(tf.constant(0.0))) == pytest.approx(extra, rel=1e-5)


def test_class_weight_trains_natural_models_as_keras_does():
    """fit(class_weight=...) on NaturalModel takes exactly the steps a plain Keras model compiled with
    sparse cross-entropy takes from the same weights on the same batches."""
    from rvs_tf.baselines import NaturalModel

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(64, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=64)
    class_weight = {c: (5.0 if c < 3 else 0.5) for c in range(10)}

    def classifier():
        keras.utils.set_random_seed(3)
        return models.small_cnn((28, 28, 1), 10, widths=(4,), feature_dim=8)

    plain = classifier()
    plain.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    plain.fit(x, y, batch_size=16, epochs=1, shuffle=False, class_weight=class_weight, verbose=0)
    ours = NaturalModel(classifier(), eps=0.1)
    ours.compile(optimizer=keras.optimizers.SGD(0.1))
    ours.fit(x, y, batch_size=16, epochs=1, shuffle=False, class_weight=class_weight, verbose=0)
    unweighted = NaturalModel(classifier(), eps=0.1)
    unweighted.compile(optimizer=keras.optimizers.SGD(0.1))
    unweighted.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b, c in zip(plain.get_weights(), ours.classifier.get_weights(), unweighted.classifier.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert any(not np.allclose(a, c, atol=1e-4) for a, c in zip(plain.get_weights(), unweighted.classifier.get_weights()))


@pytest.mark.parametrize("method", ["pgd", "trades", "fgsm_pgi", "rvs_init"])
def test_zero_sample_weights_leave_every_cross_entropy_method_unmoved(method):
    from rvs_tf.builder import build_model
    from rvs_tf.run_config import RunConfig

    keras.utils.set_random_seed(0)
    model = build_model(RunConfig(method=method, eps=0.1, weight_decay=0, lr=0.1, pgd_steps=2),
                        (28, 28, 1), 10, steps_per_epoch=4)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(32, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=32)
    before = [w.copy() for w in model.classifier.get_weights()]
    model.fit(x, y, sample_weight=np.zeros(32, "float32"), batch_size=16, epochs=1, verbose=0)
    for a, b in zip(before, model.classifier.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-7)
