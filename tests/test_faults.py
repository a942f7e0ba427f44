"""Training that fails loudly, never silently (issue 14): divergence, broken checkpoints, shared workdirs,
images outside [0, 1], write errors. Each case the user meets on the command line runs the real console
script; library cases run in-process."""
import errno
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from rvs_tf import baselines, export, guards
from rvs_tf.checkpoints import STATE_FILE, RunCheckpoint
from rvs_tf.training import NonFiniteError
from test_cli import BIN, snapshot
from test_data import _write_idx_dir
from test_training import tiny_classifier, tiny_data


def natural(lr=0.05):
    keras.utils.set_random_seed(0)
    model = baselines.NaturalModel(tiny_classifier(), eps=0.1, eval_pgd_steps=2)
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9))
    return model


# -- 1. divergence ------------------------------------------------------------------------------------
def test_fit_stops_at_the_first_non_finite_loss_before_any_checkpoint(tmp_path):
    model = natural(lr=1e12)
    x, y = tiny_data(64)
    checkpoint = RunCheckpoint(str(tmp_path), monitor="val_pgd_accuracy")
    with pytest.raises(NonFiniteError, match=r"epoch 1, step \d+: the training loss is nan.*--lr"):
        model.fit(x, y, batch_size=8, epochs=2, validation_data=(x, y), callbacks=[checkpoint], verbose=0)
    assert os.listdir(tmp_path) == []  # nothing saved for the diverged epoch


def test_guard_checks_weights_at_epoch_end():
    model = natural()
    model.classifier.weights[0].assign(tf.fill(model.classifier.weights[0].shape, np.inf))
    guard = guards.NonFiniteGuard()
    guard.set_model(model)
    with pytest.raises(NonFiniteError, match="epoch 3, end: non-finite weights in .*kernel"):
        guard.on_epoch_end(2)


def test_exporter_refuses_non_finite_weights(tmp_path):
    classifier = tiny_classifier()
    classifier.weights[1].assign(tf.fill(classifier.weights[1].shape, np.nan))
    with pytest.raises(ValueError, match="classifier: .*non-finite"):
        export.export_classifier(classifier, str(tmp_path), "nan")
    assert not (tmp_path / "nan").exists() or export.versions(str(tmp_path / "nan")) == []


# -- 4. images outside [0, 1] -------------------------------------------------------------------------
def test_fit_refuses_uint8_and_0_255_images():
    model = natural()
    x, y = tiny_data(32)
    with pytest.raises(ValueError, match=r"images: expected floats in \[0, 1\].*uint8.*/ 255"):
        model.fit((x * 255).astype("uint8"), y, batch_size=16, epochs=1, verbose=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"images: expected floats in \[0, 1\].*255"):
        model.fit(x * 255, y, batch_size=16, epochs=1, verbose=0)


# -- 2. checkpoints that do not load ------------------------------------------------------------------
def three_epochs(directory):
    """RunCheckpoint after epochs of val_accuracy 0.8, 0.6, 0.5 (best: epoch 1), with each epoch's weights."""
    from test_checkpoints import model

    checkpoint = RunCheckpoint(str(directory), monitor="val_accuracy")
    checkpoint.set_model(model())
    weights = {}
    for epoch, value in enumerate((0.8, 0.6, 0.5)):
        checkpoint.model.weights[0].assign(checkpoint.model.weights[0] + 1.0)
        checkpoint.on_epoch_end(epoch, {"val_accuracy": value})
        weights[epoch + 1] = [w.numpy().copy() for w in checkpoint.model.weights]
    assert sorted(os.listdir(directory)) == ["best-epoch-1.weights.h5", "epoch-3.weights.h5", STATE_FILE]
    return weights


def restored(directory):
    from test_checkpoints import model

    fresh = model()
    checkpoint = RunCheckpoint(str(directory), monitor="val_accuracy")
    return checkpoint, checkpoint.restore(fresh), fresh


@pytest.mark.parametrize("damage, reason", [("truncate", "truncated"), ("delete", "missing")])
def test_a_last_checkpoint_that_does_not_load_falls_back_to_an_older_one(tmp_path, damage, reason):
    weights = three_epochs(tmp_path)
    last = tmp_path / "epoch-3.weights.h5"
    if damage == "truncate":
        last.write_bytes(last.read_bytes()[:1000])
    else:
        last.unlink()
    with pytest.warns(guards_warning(), match=rf"checkpoint .*epoch-3.weights.h5: cannot be loaded "
                                              rf"\(.*{reason}.*\); trying an older one"):
        checkpoint, epoch, fresh = restored(tmp_path)
    assert epoch == 1 and checkpoint.state["last"] == "best-epoch-1.weights.h5"
    assert set(checkpoint.state["history"]) == {"1"}
    for expected, actual in zip(weights[1], fresh.weights):
        np.testing.assert_array_equal(expected, actual.numpy())


def guards_warning():
    from rvs_tf.checkpoints import CheckpointWarning
    return CheckpointWarning


def test_a_corrupt_state_file_falls_back_to_the_files_beside_it(tmp_path):
    weights = three_epochs(tmp_path)
    (tmp_path / STATE_FILE).write_text('{"epoch": 3, "la')
    with pytest.warns(guards_warning(), match=r"state.json: unreadable \(.*\); looking for checkpoint files"):
        checkpoint, epoch, fresh = restored(tmp_path)
    assert epoch == 3 and checkpoint.state["best"] is None
    for expected, actual in zip(weights[3], fresh.weights):
        np.testing.assert_array_equal(expected, actual.numpy())


def test_no_checkpoint_that_loads_is_a_clear_error(tmp_path):
    from rvs_tf.checkpoints import CheckpointError

    three_epochs(tmp_path)
    for name in ("epoch-3.weights.h5", "best-epoch-1.weights.h5"):
        (tmp_path / name).write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    with pytest.warns(guards_warning()), pytest.raises(CheckpointError, match="none of .* loads; move"):
        restored(tmp_path)


# -- 5. write errors ----------------------------------------------------------------------------------
def enospc_on(monkeypatch, function, name_part):
    """Make os.<function> fail with ENOSPC when its destination's name contains `name_part`."""
    real = getattr(os, function)

    def failing(src, dst, *args, **kwargs):
        if name_part in os.path.basename(str(dst)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, function, failing)


@pytest.mark.parametrize("name_part", ["epoch-2.weights.h5", STATE_FILE])
def test_a_full_disk_during_a_checkpoint_names_the_path_and_keeps_the_earlier_state(tmp_path, monkeypatch,
                                                                                   name_part):
    from test_checkpoints import model

    checkpoint = RunCheckpoint(str(tmp_path), monitor="val_accuracy")
    checkpoint.set_model(model())
    checkpoint.on_epoch_end(0, {"val_accuracy": 0.5})
    before = snapshot(tmp_path)
    enospc_on(monkeypatch, "replace", name_part)
    with pytest.raises(OSError, match=rf"cannot write .*{name_part}: No space left on device") as raised:
        checkpoint.on_epoch_end(1, {"val_accuracy": 0.9})
    assert raised.value.errno == errno.ENOSPC
    assert snapshot(tmp_path) == before  # epoch 1's files and state.json untouched, no temporary left
    assert checkpoint.state["epoch"] == 1


def test_a_full_disk_during_an_export_names_the_path_and_keeps_earlier_versions(tmp_path, monkeypatch):
    classifier = tiny_classifier()
    export.export_classifier(classifier, str(tmp_path), "m")
    before = snapshot(tmp_path)
    enospc_on(monkeypatch, "rename", "2")
    with pytest.raises(OSError, match=r"cannot write .*m/2: No space left on device; .*versions"):
        export.export_classifier(classifier, str(tmp_path), "m")
    assert snapshot(tmp_path) == before and export.versions(str(tmp_path / "m")) == [1]
