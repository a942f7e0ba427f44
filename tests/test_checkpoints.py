"""Resumable checkpoints: restart from the last finished epoch; the best state survives a restart."""
import json
import os

import keras
import numpy as np

from rvs_tf.checkpoints import STATE_FILE, RunCheckpoint


def model():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((5,))
    net = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(4, activation="relu")(inputs)))
    net.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return net


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype("float32")
    return x, (x[:, 0] > 0).astype("int64")


def test_resume_restores_weights_optimizer_and_epoch(tmp_path):
    x, y = data()
    first = model()
    checkpoint = RunCheckpoint(str(tmp_path), monitor="val_accuracy")
    first.fit(x, y, epochs=2, batch_size=16, validation_data=(x, y), callbacks=[checkpoint], verbose=0)

    second = model()
    resumed = RunCheckpoint(str(tmp_path), monitor="val_accuracy")
    assert resumed.restore(second) == 2
    for a, b in zip(first.weights, second.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(second.optimizer.iterations) == int(first.optimizer.iterations) == 8
    for a, b in zip(first.optimizer.variables, second.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    second.fit(x, y, epochs=3, initial_epoch=2, batch_size=16, validation_data=(x, y),
               callbacks=[resumed], verbose=0)
    assert resumed.state["epoch"] == 3
    kept = sorted(f for f in os.listdir(tmp_path) if f.endswith(".weights.h5"))
    assert kept == sorted({"epoch-3.weights.h5", resumed.state["best"]["file"]})  # nothing stale left


def test_best_survives_a_restart(tmp_path):
    checkpoint = RunCheckpoint(str(tmp_path), monitor="val_accuracy")
    checkpoint.set_model(model())
    checkpoint.on_epoch_end(0, {"val_accuracy": 0.8})
    best_weights = [w.numpy().copy() for w in checkpoint.model.weights]
    checkpoint.model.weights[0].assign(checkpoint.model.weights[0] + 1.0)

    restarted = RunCheckpoint(str(tmp_path), monitor="val_accuracy")
    restarted.set_model(checkpoint.model)
    restarted.on_epoch_end(1, {"val_accuracy": 0.6})  # worse than before the restart: best kept
    state = json.load(open(tmp_path / STATE_FILE))
    assert state["best"] == {"epoch": 1, "value": 0.8, "metric": "val_accuracy",
                             "file": "best-epoch-1.weights.h5"} and state["epoch"] == 2
    fresh = model()
    assert restarted.load_best(fresh) == 1
    for expected, actual in zip(best_weights, fresh.weights):
        np.testing.assert_array_equal(expected, actual.numpy())


def test_an_interrupted_save_does_not_break_resume(tmp_path):
    x, y = data()
    net = model()
    checkpoint = RunCheckpoint(str(tmp_path), monitor="val_accuracy")
    net.fit(x, y, epochs=1, batch_size=16, validation_data=(x, y), callbacks=[checkpoint], verbose=0)
    # A kill during the next epoch's save leaves a partial temporary file and the old state.
    (tmp_path / ".tmp-epoch-2.weights.h5").write_bytes(b"\x89HDF partial")
    (tmp_path / (STATE_FILE + ".tmp")).write_text("{ partial")
    resumed = RunCheckpoint(str(tmp_path), monitor="val_accuracy")
    assert resumed.restore(model()) == 1
    assert os.path.isfile(tmp_path / resumed.state["best"]["file"])
