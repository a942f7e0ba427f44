"""Resumable training state: a run killed at any moment (even SIGKILL mid-save) resumes from its last
finished epoch and loses nothing already saved.

Layout of a checkpoint folder:
  epoch-<N>.weights.h5       full state after N epochs (model, both optimizers, step counters)
  best-epoch-<M>.weights.h5  the state with the best monitored value so far (epoch M)
  state.json                 {"epoch": N, "last": "epoch-<N>.weights.h5", "best": {"file": ..., ...}}

Every file is written under a temporary name, flushed to disk and renamed into place, and `state.json` is
switched last, so it always names files that are complete, even after a machine crash. Files that
`state.json` no longer names are removed only after the switch.
"""
import json
import math
import os
import time

import keras

STATE_FILE = "state.json"
# Written into a training workdir when a run ends; what rvs-export reads.
CLASSIFIER_FILE = "best_classifier.keras"
METADATA_FILE = "metadata.json"


def _fsync(path):
    """Flush a file, or a folder's entries, to disk (a rename is durable only once its folder is)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_durably(temporary, path):
    _fsync(temporary)
    os.replace(temporary, path)
    _fsync(os.path.dirname(os.path.abspath(path)))


def write_json_atomic(path, data):
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
    replace_durably(temporary, path)


def read_state(directory):
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _load(model, path):
    """load_weights, after creating the optimizer's slots (else Keras skips loading them)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)
    model.load_weights(path)


class RunCheckpoint(keras.callbacks.Callback):
    """Saves the training state at each epoch end and keeps the best by `monitor`.

    Use `initial_epoch = checkpoint.restore(model)` before `model.fit(..., initial_epoch=initial_epoch,
    callbacks=[checkpoint])`. The best value survives a restart, so a worse epoch after resuming never
    replaces a better one saved before.
    """

    def __init__(self, directory, monitor="val_pgd_accuracy", mode="max", write_directory=None):
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode: expected 'max' or 'min', got {mode!r}")
        self.directory = directory
        # Multi-worker: every worker restores from the chief's `directory` but saves (saving reads
        # synchronised variables, a collective) into its own `write_directory`, discarded on non-chiefs.
        self.write_directory = write_directory or directory
        self.monitor = monitor
        self.mode = mode
        os.makedirs(self.write_directory, exist_ok=True)
        self.state = read_state(directory) or {"epoch": 0, "last": None, "best": None}

    def restore(self, model):
        """Load the last finished epoch into `model` (compiled, so optimizers are restored too)."""
        if not self.state["last"]:
            return 0
        _load(model, os.path.join(self.directory, self.state["last"]))
        return int(self.state["epoch"])

    def load_best(self, model):
        """Load the best state if one was kept (else the last); returns its epoch or None."""
        best = self.state.get("best")
        if best:
            _load(model, os.path.join(self.directory, best["file"]))
            return best["epoch"]
        if self.state["last"]:
            _load(model, os.path.join(self.directory, self.state["last"]))
            return self.state["epoch"]
        return None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_started = time.perf_counter()
        self._train_seconds = None

    def on_test_begin(self, logs=None):  # validation starts: the epoch's training part is over
        if getattr(self, "_epoch_started", None) is not None and self._train_seconds is None:
            self._train_seconds = time.perf_counter() - self._epoch_started

    def _improved(self, value):
        best = self.state.get("best")
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        if best is None:
            return True
        return value > best["value"] if self.mode == "max" else value < best["value"]

    def _save_weights(self, name):
        temporary = os.path.join(self.write_directory, f".tmp-{name}")
        self.model.save_weights(temporary, overwrite=True)
        replace_durably(temporary, os.path.join(self.write_directory, name))

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        finished = epoch + 1
        last = f"epoch-{finished}.weights.h5"
        self._save_weights(last)
        value = logs.get(self.monitor)
        value = None if value is None else float(value)
        record = {k: float(v) for k, v in logs.items()}
        if getattr(self, "_epoch_started", None) is not None:  # seconds of training, without validation
            record["train_seconds"] = self._train_seconds or time.perf_counter() - self._epoch_started
        state = {"epoch": finished, "last": last, "best": self.state.get("best"),
                 "monitor": self.monitor, "mode": self.mode,
                 "history": {**self.state.get("history", {}), str(finished): record}}
        if self._improved(value):
            best_file = f"best-epoch-{finished}.weights.h5"
            self._save_weights(best_file)
            state["best"] = {"epoch": finished, "value": value, "metric": self.monitor, "file": best_file}
        previous = self.state
        write_json_atomic(os.path.join(self.write_directory, STATE_FILE), state)
        self.state = state
        named = {state["last"], (state.get("best") or {}).get("file")}
        for stale in (previous.get("last"), (previous.get("best") or {}).get("file")):
            if stale and stale not in named:
                try:
                    os.remove(os.path.join(self.write_directory, stale))
                except FileNotFoundError:
                    pass
