"""Strategies, mixed precision and XLA: a mirrored step on 2 logical CPUs is the single-device step where it
must be, the OT term is per replica as RVSModel documents, metrics aggregate over replicas, and the known
MirroredStrategy pitfalls (two optimizers, jit_compile) never reach the user."""
import functools
import json
import os
import socket
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from rvs_tf import distribute, precision, rvs, sinkhorn
from rvs_tf.baselines import NaturalModel
from rvs_tf.training import RVSModel, smooth_labels
from test_training import start_share

SHAPE = (6, 6, 1)
CLASSES = 3
EPS = 0.1
OT = dict(ot_epsilon=0.5, ot_cost_scale=None, ot_max_iters=200)


def classifier(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(SHAPE)
    h = keras.layers.Flatten()(inputs)
    h = keras.layers.Dense(5, activation="tanh", name="features")(h)
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(h))


class ConstantPerturbation(keras.layers.Layer):
    """A generator that ignores z: one trainable image-shaped perturbation, so a step is deterministic."""

    def build(self, input_shape):
        self.delta = self.add_weight(shape=SHAPE, initializer=keras.initializers.RandomUniform(-0.2, 0.2,
                                                                                              seed=3))

    def call(self, z):
        return keras.ops.zeros_like(z[:, :1])[:, :, None, None] + self.delta


def constant_generator():
    z = keras.Input((4,))
    return keras.Model(z, ConstantPerturbation()(z))


def data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(n, *SHAPE)).astype("float32"), rng.integers(0, CLASSES, n).astype("int64")


@functools.cache
def mirrored():
    """One strategy for the whole module: with a second MirroredStrategy in the process, the next
    two-optimizer step failed here with "Shape mismatch in the collective instance" (their collective
    keys collide)."""
    return distribute.get_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])


# -- helpers --------------------------------------------------------------------------------------------
def test_bad_strategy_and_precision_name_the_flags(monkeypatch):
    with pytest.raises(ValueError, match="--strategy"):
        distribute.get_strategy("horovod")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="--strategy=multi_worker: TF_CONFIG"):
        distribute.get_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG: expected JSON"):
        distribute.get_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1"]},
                                                "task": {"type": "worker", "index": 4}}))
    with pytest.raises(ValueError, match="valid index"):
        distribute.get_strategy("multi_worker")
    with pytest.raises(ValueError, match="--precision"):
        precision.set_policy("float8")
    assert distribute.get_strategy("default").num_replicas_in_sync == 1
    assert mirrored().num_replicas_in_sync == 2


@pytest.mark.parametrize("cluster, task, chief", [
    (None, None, True),
    ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 0}, True),
    ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 1}, False),
    ({"chief": ["c:1"], "worker": ["a:1"]}, {"type": "worker", "index": 0}, False),
    ({"chief": ["c:1"], "worker": ["a:1"]}, {"type": "chief", "index": 0}, True),
])
def test_only_one_process_is_chief(monkeypatch, tmp_path, cluster, task, chief):
    if cluster is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
    assert distribute.is_chief() is chief
    target = str(tmp_path / "checkpoints")
    where = distribute.worker_dir(target)
    assert (where == target) is chief
    if not chief:
        assert not where.startswith(str(tmp_path))
        distribute.discard_worker_dir(target)


def test_mixed_precision_policy_and_rvs_step():
    try:
        assert precision.set_policy("mixed_float16") == "mixed_float16"
        model = RVSModel(classifier(), constant_generator(), eps=EPS, **OT)
        model.compile(classifier_optimizer=keras.optimizers.SGD(0.1), generator_optimizer="sgd")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert isinstance(model.generator_optimizer, keras.optimizers.LossScaleOptimizer)
        assert model.classifier.layers[-1].compute_dtype == "float16"
        x, y = data(16)
        logits, features = model.heads(tf.constant(x))
        assert logits.dtype == tf.float32 and features.dtype == tf.float32
        before = [v.numpy().copy() for v in model.classifier.trainable_variables]
        history = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
        assert all(np.isfinite(v[0]) for v in history.values())
        assert all(v.dtype == "float32" for v in model.classifier.trainable_variables)
        after = model.classifier.trainable_variables
        assert any(not np.allclose(a, b.numpy()) for a, b in zip(before, after))
    finally:
        precision.set_policy("float32")
    assert keras.config.dtype_policy().name == "float32"


# -- mirrored == single device where it must be ---------------------------------------------------------
def fit_natural(strategy, x, y):
    with strategy.scope():
        model = NaturalModel(classifier(), eps=EPS, label_smoothing=0.2, weight_decay=0.01)
        model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9))
    history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0).history
    return [v.numpy() for v in model.classifier.weights], history


def test_mirrored_natural_steps_match_single_device_and_metrics_aggregate():
    x, y = data(16)  # two batches of 8, 4 examples per replica
    single, single_history = fit_natural(distribute.get_strategy("default"), x, y)
    mirror, mirror_history = fit_natural(mirrored(), x, y)
    for a, b in zip(single, mirror):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert single_history.keys() == mirror_history.keys() == {"loss", "clean_accuracy"}
    for key in single_history:
        assert mirror_history[key][0] == pytest.approx(single_history[key][0], rel=1e-5), key


def test_accuracy_aggregates_over_replicas_when_a_batch_splits_unevenly():
    x, y = data(21)  # batches of 8, 8 and 5: the last one splits 3 + 2 over the replicas
    strategy = mirrored()
    with strategy.scope():
        model = NaturalModel(classifier(), eps=EPS, eval_pgd_steps=2)
        model.compile(optimizer="sgd")
    expected = float(np.mean(np.argmax(model.classifier.predict(x, verbose=0), -1) == y))
    logs = model.evaluate(x, y, batch_size=8, return_dict=True, verbose=0)
    assert logs["clean_accuracy"] == pytest.approx(expected, abs=1e-6)  # not a mean of replica means


def reference_rvs_step(model, x, y, lr_c, lr_g, shards):
    """One RVS step (plain SGD) computed by hand: OT averaged over `shards` equal slices of the batch."""
    clf, delta = model.classifier, model.generator.trainable_variables[0]
    two_headed = keras.Model(clf.inputs, [clf.outputs[0], clf.get_layer("features").output])

    def ot_mean(params_delta):
        x_adv = tf.clip_by_value(x + tf.clip_by_value(params_delta, -EPS, EPS), 0.0, 1.0)
        pieces = []
        for xs, xa in zip(tf.split(x, shards), tf.split(x_adv, shards)):
            clean, adv = two_headed(xs)[1], two_headed(xa)[1]
            pieces.append(sinkhorn.entropic_ot(clean, adv, epsilon=OT["ot_epsilon"],
                                               cost_scale=OT["ot_cost_scale"], max_iters=OT["ot_max_iters"]))
        return tf.reduce_mean(pieces), x_adv

    d = tf.Variable(delta.numpy())
    with tf.GradientTape() as tape:
        generator_ot, _ = ot_mean(d)
        generator_loss = -generator_ot
    new_delta = d.numpy() - lr_g * tape.gradient(generator_loss, d).numpy()
    with tf.GradientTape() as tape:
        ot, x_adv = ot_mean(tf.constant(new_delta))
        logits = clf(x_adv)
        ce = tf.reduce_mean(keras.losses.categorical_crossentropy(smooth_labels(y, CLASSES, 0.5), logits,
                                                                  from_logits=True))
        loss = ce + ot
    grads = tape.gradient(loss, clf.trainable_variables)
    weights = [v.numpy() - lr_c * g.numpy() for v, g in zip(clf.trainable_variables, grads)]
    return weights, new_delta, {"ot_loss": float(ot), "generator_ot": float(generator_ot),
                                "ce_loss": float(ce), "loss": float(loss)}


def test_mirrored_rvs_step_is_the_per_replica_ot_step():
    x, y = data(16, seed=1)
    strategy = mirrored()
    with strategy.scope():
        model = RVSModel(classifier(), constant_generator(), eps=EPS, random_start=False, **OT)
        model.compile(classifier_optimizer=keras.optimizers.SGD(0.3),
                      generator_optimizer=keras.optimizers.SGD(0.5))
    start = keras.models.clone_model(model.classifier)
    start.set_weights(model.classifier.get_weights())
    reference = RVSModel(start, constant_generator(), eps=EPS, **OT)
    reference.generator.set_weights(model.generator.get_weights())

    per_replica = reference_rvs_step(reference, x, y, 0.3, 0.5, shards=2)
    global_batch = reference_rvs_step(reference, x, y, 0.3, 0.5, shards=1)
    history = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0).history

    weights, delta, metrics = per_replica
    np.testing.assert_allclose(model.generator.trainable_variables[0].numpy(), delta, rtol=1e-4, atol=1e-6)
    for variable, expected in zip(model.classifier.trainable_variables, weights):
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-4, atol=1e-6)
    for key, value in metrics.items():
        assert history[key][0] == pytest.approx(value, rel=1e-4), key
    # The test can tell the two designs apart: OT on the gathered global batch is another number.
    assert abs(global_batch[2]["ot_loss"] - metrics["ot_loss"]) > 1e-3


def test_mirrored_ot_start_share_is_the_mean_of_the_replicas_shares():
    """Each replica measures its own batch's gradient share; the replicas agree on their mean (one value,
    measured on the first OT_SHARE_STEPS steps), computed here shard by shard without a strategy."""
    x, y = data(16, seed=2)
    strategy = mirrored()
    with strategy.scope():
        generator = constant_generator()
        generator.trainable = False  # no generator step: the synthesised batch is x + delta
        model = RVSModel(classifier(), generator, eps=EPS, random_start=False, ot_share_cap=1e-3, **OT)
        model.compile(classifier_optimizer=keras.optimizers.SGD(0.3), generator_optimizer=keras.optimizers.SGD(0.5))
    start = keras.models.clone_model(model.classifier)
    start.set_weights(model.classifier.get_weights())
    reference = RVSModel(start, constant_generator(), eps=EPS, random_start=False, **OT)
    reference.generator.set_weights(model.generator.get_weights())
    reference.compile(classifier_optimizer="sgd", generator_optimizer="sgd")

    expected = (start_share(reference, x[:8], y[:8], EPS, stream=2)
                + start_share(reference, x[8:], y[8:], EPS, stream=2)) / 2
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert float(model.ot_start_share) == pytest.approx(expected, rel=1e-4)
    model.fit(x, y, batch_size=16, epochs=rvs.OT_SHARE_STEPS + 2, shuffle=False, verbose=0)
    assert float(model.ot_share_state[1]) == rvs.OT_SHARE_STEPS
    assert float(model.ot_scale()) == pytest.approx(1e-3 / float(model.ot_start_share), rel=1e-5)


# -- the two known MirroredStrategy pitfalls ------------------------------------------------------------
def test_two_optimizers_and_jit_compile_under_mirrored():
    x, y = data(16)
    strategy = mirrored()
    with strategy.scope():
        model = RVSModel(classifier(), constant_generator(), eps=EPS, **OT)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.compile(classifier_optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                          generator_optimizer=keras.optimizers.Adam(0.01), jit_compile=True)
    assert any("--jit_compile" in str(w.message) for w in caught)
    assert model.jit_compile is False
    assert model.optimizer.built and model.generator_optimizer.built  # slots exist before fit
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0).history  # no placeholder/device error
    assert np.isfinite(history["loss"][0])
    assert distribute.resolve_jit_compile(True, distribute.get_strategy("default")) is True


# -- two workers on 127.0.0.1 ----------------------------------------------------------------------------
def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_end_with_identical_weights_and_only_the_chief_writes(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    script = os.path.join(os.path.dirname(__file__), "multiworker_worker.py")
    processes = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": {"worker": workers},
                                                     "task": {"type": "worker", "index": index}}))
        processes.append(subprocess.Popen([sys.executable, script, str(tmp_path)], env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    reports = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=150)
            assert process.returncode == 0, err[-3000:]
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert [r["chief"] for r in reports] == [True, False]
    assert all(r["replicas"] == 2 for r in reports)
    first, second = (np.load(tmp_path / f"weights-{i}.npz") for i in range(2))
    for key in first.files:  # trainable weights (see the worker on BatchNorm statistics)
        np.testing.assert_array_equal(first[key], second[key])
    assert any(not np.array_equal(first[f"w{i}"], first[f"init{i}"])
               for i in range(len(first.files) // 2))  # and training moved them
    # Only the chief's copies are in the shared folder; the other worker's scratch copy is gone.
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "saved_models", "weights-0.npz", "weights-1.npz"]
    assert os.listdir(tmp_path / "saved_models" / "demo") == ["1"]
    assert "epoch-1.weights.h5" in os.listdir(tmp_path / "checkpoints")
    assert reports[1]["scratch"] != str(tmp_path / "checkpoints")
    assert not os.path.exists(reports[1]["scratch"])
