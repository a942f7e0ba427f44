"""A preset's whole path in a minute or two: `rvs-train --flagfile=FILE --dry_run`.

It runs the run's real architecture, optimisers, schedule, augmentation, OT settings, precision and
strategy for a few steps on data of the dataset's shape and class count (TFDS datasets are mocked by
`tfds.testing.mock_data`, so nothing is downloaded; the local IDX files are read as they are), then
checkpoints, resumes from that checkpoint, evaluates a few images and exports, so a wrong flag, a shape
error or an export problem shows up at once instead of hours into the real run. It ends with what the
full run would be: parameters, steps, epochs, the measured step time and an ETA on this machine.
"""
import contextlib
import dataclasses
import os
import tempfile

from rvs_tf import checkpoints, data, evaluate, export
from rvs_tf.runs import train_and_export


@dataclasses.dataclass
class DryRunResult:
    """What the dry run measured and made."""

    parameters: int
    steps_per_epoch: int
    epochs: int
    seconds_per_step: float
    eta_hours: float
    export_path: str
    worst_case: float


def _mocked(dataset, num_examples):
    """TFDS datasets mocked with random examples of their features (no download); IDX files as they are."""
    if dataset in data.LOCAL_DATASETS:
        return contextlib.nullcontext()
    import tensorflow_datasets as tfds

    return tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE)


def dry_run(config, steps=3, eval_examples=8):
    """Train `config` for 3 epochs of `steps` steps (the last two resumed from the first's checkpoint),
    evaluate `eval_examples` test images with FGSM and PGD-20, export, and return a `DryRunResult`.

    Args:
      config: the `RunConfig` of the full run (its batch size may be lowered to fit this machine).
      steps: training steps per dry epoch.
      eval_examples: test images the exported classifier is attacked on.
    """
    full = data.dataset_info(config.dataset, validation_size=config.validation_size, data_dir=config.data_dir,
                             idx_dir=config.idx_dir) if config.dataset in data.LOCAL_DATASETS else None
    num_train = full.num_train if full else data.published_train_size(config.dataset) - config.validation_size
    if num_train <= 0:
        raise ValueError(f"validation_size: expected fewer than the {num_train + config.validation_size} "
                         f"training examples of {config.dataset}, got {config.validation_size}")
    full_steps = config.steps_per_epoch or num_train // config.batch_size
    validation = 2 * config.batch_size
    with tempfile.TemporaryDirectory(prefix="rvs-dry-run-") as scratch, \
            _mocked(config.dataset, validation + (steps + 1) * config.batch_size):
        export_dir = config.export_dir if config.export_dir != export.DEFAULT_EXPORT_DIR else scratch
        small = dataclasses.replace(config, steps_per_epoch=steps, validation_size=validation,
                                    workdir=os.path.join(scratch, "run"), export_dir=export_dir,
                                    name=f"{config.run_name}_dry_run", epochs=1, export=True)
        print(f"Dry run of {config.run_name}: 3 epochs of {steps} steps, batch {config.batch_size}, "
              f"{'mocked ' if full is None else ''}{config.dataset} data")
        train_and_export(dataclasses.replace(small, export=False))
        print("Dry run: resuming from the epoch-1 checkpoint")
        result = train_and_export(dataclasses.replace(small, epochs=3))
        state = checkpoints.read_json(os.path.join(small.run_dir, "checkpoints", checkpoints.STATE_FILE))
        seconds = state["history"]["3"]["train_seconds"] / steps  # epoch 3: the resumed model is traced
        if result.best_epoch is None:
            raise RuntimeError("dry run: the resumed run did not finish")
        ds, _ = data.make_eval_dataset(config.dataset, split="test", batch_size=eval_examples,
                                       num_examples=eval_examples, data_dir=config.data_dir,
                                       idx_dir=config.idx_dir, validation_size=0)
        report = evaluate.robustness_report(result.export_path, ds, eps=config.eps, norm=config.norm, attacks="pgd20",
                                            sweep_examples=0, progress=False, precision="float32")
        parameters = _parameters(result.export_path)
        out = DryRunResult(parameters, full_steps, config.epochs, seconds,
                           seconds * full_steps * config.epochs / 3600, result.export_path,
                           report["worst_case"]["accuracy"])
        kept = export_dir != scratch
    print(f"Dry run passed: trained, checkpointed, resumed, evaluated {eval_examples} images (PGD-20 worst "
          f"case {100 * out.worst_case:.0f}%) and exported" + (f" to {out.export_path}" if kept else
                                                                " (to a temporary folder, removed)"))
    print(f"The full run: {out.parameters:,} classifier parameters, {out.epochs} epochs of {out.steps_per_epoch} "
          f"steps of batch {config.batch_size} ({out.epochs * out.steps_per_epoch:,} steps); measured "
          f"{out.seconds_per_step:.2f} s a step here, so about {out.eta_hours:.1f} h of training on this "
          "machine (validation and evaluation not counted)")
    return out


def _parameters(path):
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    return sum(int(tf.size(v)) for v in loaded.variables)
