"""train_and_export(config): a whole training run (what rvs-train does) as an importable function.

  from rvs_tf.run_config import RunConfig
  from rvs_tf.runs import train_and_export
  result = train_and_export(RunConfig(method="pgd", epochs=3, name="pgd3"))

It reads as its steps: `start` (strategy, precision, output folders), `check_resumable` (a workdir
holds one experiment), `build` (seeds, data, the model from `rvs_tf.builder`), `restore` (the newest
checkpoint that loads), `fit`, `finalise` (the best epoch, its clean test accuracy, the saved classifier
and the TF Serving export). Calling it again with the same config after an interruption resumes from the
last finished epoch; once finished and exported, it exports nothing new. Errors are ValueError, OSError
or RuntimeError subclasses whose one-line message says what to change and what was kept.
"""
import contextlib
import dataclasses
import os
import sys
import time
from typing import NamedTuple, Optional

import keras
import tensorflow as tf

from rvs_tf import checkpoints, data, distribute, export, precision, runlock
from rvs_tf.builder import LABEL_SMOOTHING, build_model
from rvs_tf.guards import FeatureCollapseGuard, TrainingHalted
from rvs_tf.monitors import CatastrophicOverfittingMonitor
from rvs_tf.run_config import RunConfig

MONITOR = "val_pgd_accuracy"  # the validation figure that picks the best epoch


class RunError(RuntimeError):
    """Training stopped (diverged, collapsed, a write failed); the message says what was kept."""


class RunResult(NamedTuple):
    """What a finished run produced: its best epoch, the metadata written with the classifier, and the
    export's path (None with `export=False`)."""

    best_epoch: Optional[int]
    metadata: dict
    export_path: Optional[str]


@dataclasses.dataclass
class _Run:
    """A run under way: its config and what the steps built."""

    config: RunConfig
    strategy: tf.distribute.Strategy
    chief: bool
    datasets: tuple = ()
    info: data.DatasetInfo = None
    steps_per_epoch: int = 0
    model: keras.Model = None
    checkpoint: checkpoints.RunCheckpoint = None
    initial_epoch: int = 0


def start(config):
    """The strategy and dtype policy (before any other TensorFlow operation), and the output folders
    checked or made; returns (strategy, whether this worker is the chief)."""
    strategy = distribute.get_strategy(config.strategy)
    precision.set_policy(config.precision)  # resolved by train_and_export
    chief = distribute.is_chief(strategy)
    if config.export and chief:
        export.check_writable(config.export_dir)
    os.makedirs(config.run_dir, exist_ok=True)
    return strategy, chief


def check_resumable(config):
    """Refuse a workdir that holds a run with other settings (resuming it would mix two experiments)."""
    path = os.path.join(config.run_dir, checkpoints.CONFIG_FILE)
    if not os.path.isfile(path):
        return
    saved = checkpoints.read_json(path)
    try:
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object of settings")
        previous = RunConfig.from_record(saved)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--workdir: {path} cannot be read as a run's settings ({error}); choose another "
                         "--workdir or --name to start a new run") from None
    changed = config.changes_from(previous)
    if changed:
        raise ValueError(
            f"--workdir: {config.run_dir!r} holds a run with other settings "
            + ", ".join(f"--{k} (saved {a!r}, now {b!r})" for k, (a, b) in sorted(changed.items()))
            + "; to resume it, pass " + " ".join(_as_flag(k, a) for k, (a, _) in sorted(changed.items()))
            + ", or choose another --workdir or --name to start a new run")


def _as_flag(name, value):
    """The command-line form that sets flag `name` back to a saved `value` (a resume-mismatch hint)."""
    if value is None:
        default = {field.name: field.default for field in dataclasses.fields(RunConfig)}.get(name)
        return f"no --{name} (its default)" if default is None else f"--{name}=none"
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    if isinstance(value, (list, tuple)):
        value = ",".join(str(item) for item in value)
    return f"--{name}={value}"


def build(config, strategy, chief):
    """Seeds, the datasets and the compiled model; the config is recorded in the workdir once all of it
    was accepted."""
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    *datasets, info = data.make_datasets(
        config.dataset, batch_size=config.batch_size, validation_size=config.validation_size,
        data_dir=config.data_dir, idx_dir=config.idx_dir, seed=config.seed,
        augment=None if config.augment == "default" else config.augment, pad=config.pad)
    steps_per_epoch = config.steps_per_epoch or info.num_train // config.batch_size
    with strategy.scope():
        model = build_model(config, info.image_shape, info.num_classes, steps_per_epoch)
    config_path = os.path.join(config.run_dir, checkpoints.CONFIG_FILE)
    if chief and not os.path.isfile(config_path):
        checkpoints.write_json_atomic(config_path, config.record())
    if config.strategy == "multi_worker":  # each worker reads its own share of every batch
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        datasets[0] = datasets[0].with_options(options)
    return _Run(config, strategy, chief, tuple(datasets), info, steps_per_epoch, model)


def restore(run):
    """The checkpoint callback, with the newest finished epoch that loads restored into the model."""
    checkpoint_dir = os.path.join(run.config.run_dir, "checkpoints")
    run.checkpoint = checkpoints.RunCheckpoint(checkpoint_dir, monitor=MONITOR,
                                               write_directory=distribute.worker_dir(checkpoint_dir, run.strategy))
    run.initial_epoch = run.checkpoint.restore(run.model)
    if run.initial_epoch:
        print(f"Resuming {run.config.run_dir} from epoch {run.initial_epoch}")


def _announce(run):
    config, info = run.config, run.info
    norm = {"linf": "L-inf", "l2": "L2"}[config.norm]
    print(f"Training {config.method} on {info.name} ({info.num_train} train / {info.num_validation} "
          f"validation), {config.arch}, {norm} eps={config.eps:.4g}; {MONITOR} = PGD-{config.eval_pgd_steps} (CE, "
          f"random start, 1 restart, eps={config.eps:.4g}, {norm}) on the validation split")
    if config.method not in LABEL_SMOOTHING and config.label_smoothing:
        print(f"Note: --label_smoothing={config.label_smoothing:g} with --method={config.method}; its paper "
              "trains without (--label_smoothing=0), and smoothing can mask gradients")


def _callbacks(run):
    config = run.config
    sample_ds, _ = data.make_eval_dataset(config.dataset, split="validation", batch_size=8, num_examples=8,
                                          validation_size=config.validation_size, data_dir=config.data_dir,
                                          idx_dir=config.idx_dir)
    images, labels = next(iter(sample_ds))
    logs = distribute.worker_dir(os.path.join(config.run_dir, "logs"), run.strategy)
    monitors = [] if config.method == "natural" else [CatastrophicOverfittingMonitor(config.overfit_gap)]
    monitors.append(FeatureCollapseGuard(window=config.collapse_guard_window))  # fit would add the default
    return [*monitors, run.checkpoint, keras.callbacks.TensorBoard(logs), ImageSummaries(logs, images, labels)]


def fit(run):
    """Train from the restored epoch to `epochs`. A run that stops raises RunError saying which
    checkpoint is kept; nothing is saved for the failed epoch."""
    config, (train_ds, val_ds, _) = run.config, run.datasets
    _announce(run)
    callbacks = _callbacks(run)
    if run.initial_epoch >= config.epochs:
        return
    try:  # skip the batches already trained on: a resumed run sees the data an uninterrupted one does
        run.model.fit(train_ds.repeat().skip(run.initial_epoch * run.steps_per_epoch), epochs=config.epochs,
                      initial_epoch=run.initial_epoch, steps_per_epoch=run.steps_per_epoch,
                      validation_data=val_ds, callbacks=callbacks, shuffle=False,
                      verbose=1 if sys.stdout.isatty() else 2)
    except (TrainingHalted, OSError) as error:
        kept = run.checkpoint.state["epoch"]
        raise RunError(f"{error}. " + (f"The checkpoint of epoch {kept} in {run.checkpoint.directory} is kept "
                                       "as the resume point" if kept else "No checkpoint was written")
                       + "; nothing was exported" + ("; to retry with other settings, choose another "
                                                     "--workdir or --name" if isinstance(error, TrainingHalted)
                                                     else "")) from error


def _exported_already(run, best_epoch):
    """The path of this run's export of `best_epoch` when a finished run was rerun, else None."""
    config = run.config
    previous = checkpoints.read_json(os.path.join(config.run_dir, checkpoints.EXPORT_RECORD_FILE))
    previous = previous if isinstance(previous, dict) else {}
    path = previous.get("path", "/")
    same_place = os.path.dirname(os.path.abspath(path)) == os.path.abspath(
        os.path.join(config.export_dir, config.run_name))
    if (config.export and run.initial_epoch >= config.epochs and previous.get("best_epoch") == best_epoch
            and same_place and os.path.isdir(path)):
        return path
    return None


def _metadata(run, best_epoch, minutes, test_clean):
    config, info = run.config, run.info
    return {
        "dataset": info.name, "image_shape": list(info.image_shape), "num_classes": info.num_classes,
        "class_names": list(info.class_names), "eps": config.eps, "norm": config.norm, "method": config.method,
        "arch": config.arch,
        "strategy": config.strategy, "precision": keras.config.dtype_policy().name, "flags": config.record(), "best_epoch": best_epoch,
        "train_minutes": round(minutes, 2),
        "metrics": {"test_clean_accuracy": test_clean,
                    **run.checkpoint.state.get("history", {}).get(str(best_epoch), {})},
    }


def finalise(run, started):
    """Load the best epoch, measure its clean test accuracy, save it beside the checkpoints and export
    it (unless this run's best is already exported)."""
    config = run.config
    best_epoch = run.checkpoint.load_best(run.model)
    minutes = (time.time() - started) / 60
    print(f"Training done in {minutes:.1f} min; best epoch by {MONITOR}: {best_epoch}")
    previous = _exported_already(run, best_epoch)
    if previous:
        print(f"Nothing to do: this run's best classifier is already exported to {previous}")
        metadata = checkpoints.read_json(os.path.join(config.run_dir, checkpoints.WORKDIR_METADATA_FILE), {})
        return RunResult(best_epoch, metadata, previous)
    test_clean = accuracy(run.model.classifier, run.datasets[2])
    metadata = _metadata(run, best_epoch, minutes, test_clean)
    print(f"Test clean accuracy: {test_clean:.4f} ({run.info.num_test} images)")
    checkpoints.save_classifier(run.model.classifier, config.run_dir, metadata)
    if not config.export:
        return RunResult(best_epoch, metadata, None)
    path = export.export_classifier(run.model.classifier, config.export_dir, config.run_name, metadata=metadata,
                                    serving_precision=config.serving_precision)
    checkpoints.write_json_atomic(os.path.join(config.run_dir, checkpoints.EXPORT_RECORD_FILE),
                                  {"path": path, "best_epoch": best_epoch})
    print(f"Exported to {path}")
    return RunResult(best_epoch, metadata, path)


def train_and_export(config):
    """Train `config`'s run (resuming its workdir), keep the best epoch by validation PGD accuracy,
    report its clean test accuracy and export it for TF Serving.

    Args:
      config: a `RunConfig`.

    Returns:
      A `RunResult` on the chief; None on other workers of a multi-worker run (only the chief keeps
      checkpoints, logs, the best classifier and the export).
    """
    if not isinstance(config, RunConfig):
        raise ValueError(f"config: expected a RunConfig, got {type(config).__name__}")
    started = time.time()
    if config.precision == "auto":  # recorded as resolved: a resume on hardware that resolves otherwise is refused
        policy, note = precision.resolve("auto")
        print(note)
        config = dataclasses.replace(config, precision=policy)
    strategy, chief = start(config)
    # One run per workdir: released on return or error, taken over once stale after a kill.
    with runlock.RunLock(config.run_dir) if chief else contextlib.nullcontext():
        check_resumable(config)
        run = build(config, strategy, chief)
        restore(run)
        fit(run)
        if chief:
            return finalise(run, started)
    for folder in ("checkpoints", "logs"):
        distribute.discard_worker_dir(os.path.join(config.run_dir, folder), strategy)
    return None


def accuracy(classifier, dataset):
    """Clean accuracy of `classifier` (inference mode) over a dataset of (images, labels) batches."""
    metric = keras.metrics.SparseCategoricalAccuracy()
    for images, labels in dataset:
        metric.update_state(labels, classifier(images, training=False))
    return float(metric.result())


class ImageSummaries:
    """TensorBoard images of x, delta (mapped to [0, 1]) and x_adv (the images the method trains on) on a
    fixed batch, each epoch."""

    def __new__(cls, log_dir, images, labels, max_outputs=8):
        class _Callback(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                eps = float(self.model.eps)
                x_adv = self.model.adversarial_examples(images, labels, tf.constant(eps))
                delta = (x_adv - images) / (2 * eps) + 0.5
                with writer.as_default(step=epoch + 1):
                    tf.summary.image("x", images, max_outputs=max_outputs)
                    tf.summary.image("delta", delta, max_outputs=max_outputs)
                    tf.summary.image("x_adv", x_adv, max_outputs=max_outputs)
                writer.flush()

        writer = tf.summary.create_file_writer(os.path.join(log_dir, "images"))
        return _Callback()
