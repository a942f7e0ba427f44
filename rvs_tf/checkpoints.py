"""Resumable training state: a run killed at any moment (even SIGKILL mid-save) resumes from its last
finished epoch and loses nothing already saved.

Layout of a checkpoint folder:
  epoch-<N>.weights.h5       full state after N epochs (model, both optimizers, step counters)
  best-epoch-<M>.weights.h5  the state with the best monitored value so far (epoch M)
  state.json                 {"epoch": N, "last": "epoch-<N>.weights.h5", "best": {"file": ..., ...}}

Every file is written under a temporary name, read back, flushed to disk and renamed into place, and
`state.json` is switched last, so it always names files that are complete, even after a machine crash.
Files that `state.json` no longer names (the previous epoch's) are removed only after the switch. A write
error (full disk, read-only folder) raises an OSError naming the path and leaves the earlier state as it
was. Resuming from a folder whose files fail to load (a truncated copy, a state.json naming a missing
file, a corrupt state.json) warns with one line per file and falls back to the newest state that loads.
"""
import json
import math
import os
import re
import time
import warnings

import keras

from rvs_tf import guards

STATE_FILE = "state.json"
# Written into a training workdir when a run ends; what rvs-export reads.
CLASSIFIER_FILE = "best_classifier.keras"
WORKDIR_METADATA_FILE = "metadata.json"
CONFIG_FILE = "config.json"  # the run's settings (RunConfig.record), which a resumed run must match
EXPORT_RECORD_FILE = "export.json"  # where the run's best classifier was last exported, and which epoch


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


class CheckpointWarning(UserWarning):
    """A checkpoint file that does not load; an older state is used instead."""


class CheckpointError(RuntimeError):
    """No checkpoint of a run loads."""


def write_error(path, error, kept="the earlier files are kept"):
    """An OSError whose message names `path` and what was kept (errno preserved)."""
    reason = getattr(error, "strerror", None) or str(error).splitlines()[0] or type(error).__name__
    wrapped = OSError(f"cannot write {path}: {reason}; {kept}")
    wrapped.errno = getattr(error, "errno", None)
    return wrapped


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def write_json_atomic(path, data):
    temporary = f"{path}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True, default=str)
        replace_durably(temporary, path)
    except OSError as error:
        _remove(temporary)
        raise write_error(path, error, kept="its previous version is kept") from error


def read_json(path, default=None):
    """The JSON value in `path`, or `default` when the file is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return default


def save_classifier(classifier, workdir, metadata):
    """The best classifier as a .keras file and its metadata, beside the checkpoints (what rvs-export
    reads), each written to a temporary name first."""
    temporary = os.path.join(workdir, ".tmp-" + CLASSIFIER_FILE)
    path = os.path.join(workdir, CLASSIFIER_FILE)
    try:
        classifier.save(temporary)
        os.replace(temporary, path)
    except OSError as error:
        _remove(temporary)
        raise write_error(path, error, kept="its previous version is kept") from error
    write_json_atomic(os.path.join(workdir, WORKDIR_METADATA_FILE), metadata)


def read_state(directory):
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _reason(error):
    if isinstance(error, FileNotFoundError):
        return "missing"
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _read_back(path):
    """Read every array of a just-written .weights.h5 file: a write that went wrong without an error (a
    truncated file) fails here, before the file replaces anything."""
    import h5py

    def read(_, item):
        if isinstance(item, h5py.Dataset):
            item[()]

    with h5py.File(path, "r") as handle:
        handle.visititems(read)


_CHECKPOINT_NAME = re.compile(r"^(?:best-)?epoch-(\d+)\.weights\.h5$")


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
        self._state_readable = True
        try:
            state = read_state(directory)
            if state is not None and not (isinstance(state, dict) and "epoch" in state and "last" in state):
                raise ValueError("not a checkpoint state")
        except (OSError, ValueError) as error:  # ValueError: JSONDecodeError, UnicodeDecodeError
            warnings.warn(f"checkpoint state {os.path.join(directory, STATE_FILE)}: unreadable "
                          f"({_reason(error)}); looking for checkpoint files beside it", CheckpointWarning,
                          stacklevel=2)
            state, self._state_readable = None, False
        self.state = state or {"epoch": 0, "last": None, "best": None}

    def _candidates(self):
        """(epoch, file) to try, newest first: state.json's last and best, then the other checkpoint
        files of the folder (only those up to state.json's epoch when state.json is readable)."""
        found = {}
        if self.state.get("last"):
            found[self.state["last"]] = int(self.state["epoch"])
        if self.state.get("best"):
            found.setdefault(self.state["best"]["file"], int(self.state["best"]["epoch"]))
        entries = os.listdir(self.directory) if os.path.isdir(self.directory) else []
        for entry in sorted(entries):
            match = _CHECKPOINT_NAME.match(entry)
            if match and (not self._state_readable or int(match[1]) <= int(self.state["epoch"])):
                found.setdefault(entry, int(match[1]))
        # Newest first; for one epoch, the epoch file before the best file (same state).
        return sorted(found.items(), key=lambda item: (-item[1], item[0].startswith("best-")))

    def _load_first(self, model, candidates):
        """Load the first candidate that loads; warn once per one that does not."""
        failed = []
        for name, epoch in candidates:
            path = os.path.join(self.directory, name)
            try:
                _load(model, path)
            except Exception as error:  # h5py, Keras and OS errors alike: the file does not load
                warnings.warn(f"checkpoint {path}: cannot be loaded ({_reason(error)}); trying an older one",
                              CheckpointWarning, stacklevel=3)
                failed.append(name)
                continue
            return name, epoch, failed
        raise CheckpointError(f"checkpoints: none of {', '.join(failed)} in {self.directory} loads; move "
                              "the folder away (or choose another --workdir) to start the run again")

    def restore(self, model):
        """Load the newest finished epoch that loads into `model` (compiled, so optimizers are restored
        too) and return it; 0 when there is none."""
        candidates = self._candidates()
        if not candidates:
            return 0
        name, epoch, failed = self._load_first(model, candidates)
        if failed or name != self.state.get("last"):
            best = self.state.get("best")
            if best and (best["file"] in failed or not self._state_readable):
                best = None  # unknown without state.json: the next epoch sets a new best
            self.state = {**self.state, "epoch": epoch, "last": name, "best": best,
                          "history": {k: v for k, v in self.state.get("history", {}).items()
                                      if int(k) <= epoch}}
        return epoch

    def load_best(self, model):
        """Load the best state if one was kept (else the last); returns its epoch or None."""
        best = self.state.get("best")
        candidates = [(best["file"], best["epoch"])] if best else []
        candidates += [item for item in self._candidates() if item[0] != (best or {}).get("file")]
        if not candidates:
            return None
        name, epoch, _ = self._load_first(model, candidates)
        return epoch

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
        path = os.path.join(self.write_directory, name)
        try:
            self.model.save_weights(temporary, overwrite=True)
            _read_back(temporary)
            replace_durably(temporary, path)
        except (OSError, RuntimeError) as error:  # h5py reports some write failures as RuntimeError
            _remove(temporary)
            raise write_error(path, error, kept=f"the earlier checkpoints in {self.write_directory} are "
                              "kept") from error

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        finished = epoch + 1
        guards.check_finite_weights(self.model, f"epoch {finished}, checkpoint")  # never saved as good
        last = f"epoch-{finished}.weights.h5"
        written = [last]
        value = logs.get(self.monitor)
        value = None if value is None else float(value)
        record = {k: float(v) for k, v in logs.items()}
        if getattr(self, "_epoch_started", None) is not None:  # seconds of training, without validation
            record["train_seconds"] = self._train_seconds or time.perf_counter() - self._epoch_started
        state = {"epoch": finished, "last": last, "best": self.state.get("best"),
                 "monitor": self.monitor, "mode": self.mode,
                 "history": {**self.state.get("history", {}), str(finished): record}}
        try:
            self._save_weights(last)
            if self._improved(value):
                best_file = f"best-epoch-{finished}.weights.h5"
                written.append(best_file)
                self._save_weights(best_file)
                state["best"] = {"epoch": finished, "value": value, "metric": self.monitor, "file": best_file}
            write_json_atomic(os.path.join(self.write_directory, STATE_FILE), state)
        except OSError:
            for name in written:  # state.json still names the earlier files; drop this epoch's
                if name not in (self.state.get("last"), (self.state.get("best") or {}).get("file")):
                    _remove(os.path.join(self.write_directory, name))
            raise
        previous = self.state
        self.state = state
        named = {state["last"], (state.get("best") or {}).get("file")}
        for stale in (previous.get("last"), (previous.get("best") or {}).get("file")):
            if stale and stale not in named:
                try:
                    os.remove(os.path.join(self.write_directory, stale))
                except FileNotFoundError:
                    pass
