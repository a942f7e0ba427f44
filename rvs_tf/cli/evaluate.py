"""rvs-evaluate: robustness report of a SavedModel (or .keras file) under an attack ensemble.

    rvs-evaluate --model=saved_models/<name>/<version>                 # standard ensemble, 1,000 images
    rvs-evaluate --model=saved_models/<name> --attacks=pgd20           # highest version, FGSM + PGD-20
    rvs-evaluate --model=m.keras --dataset=fashion_mnist_idx --eps=0.1 --attacks=apgd-ce,square
    rvs-evaluate --model=saved_models/<name> --norm=l2 --eps=1.5        # the L2 threat model

Dataset and eps default to the model's metadata (assets.extra/rvs_metadata.json). Prints clean accuracy,
each attack with its settings and the per-example worst case with its 95% interval; writes report.json,
report.md and figures to --output_dir (default: next to the model, e.g. saved_models/<name>/eval_<version>,
eval_<version>_l2 under --norm=l2). --norm defaults to the model's training norm; under another norm --eps
must be given (the model's radius is in its own norm's units).

Resumable: progress is kept in --state_dir (default <output_dir>/state) after every batch, so the same
command again, after a crash or `kill -9`, continues where it stopped and ends with the same report. Another
command (model, data, norm, eps, attacks, seed, batch size) replaces the default state with a warning, as it
replaces the report; in an explicit --state_dir it is refused unless --restart.
Sharded: --strategy=mirrored deals the attack batches to all local GPUs, --strategy=multi_worker to every
worker of TF_CONFIG's cluster (run the same command on each; only the chief writes the report and state).
"""
import os
import sys

from absl import app, flags, logging

from rvs_tf import evaluate
from rvs_tf.cli import errors
from rvs_tf.cli.flag_types import DEFINE_fraction
from rvs_tf.data import DEFAULT_IDX_DIR
from rvs_tf.distribute import STRATEGIES
from rvs_tf.threat_model import NORMS, parse_norm

FLAGS = flags.FLAGS

flags.DEFINE_string("model", None, "SavedModel dir, folder of integer versions of one, or .keras file.")
flags.DEFINE_string("dataset", None, "Dataset name for rvs_tf.data (default: the model's metadata).")
flags.DEFINE_string("data_dir", None, "TFDS data_dir.")
flags.DEFINE_string("idx_dir", DEFAULT_IDX_DIR, "Folder of the IDX .gz files (for "
                    "--dataset=fashion_mnist_idx).")
DEFINE_fraction("eps", None, "Radius in --norm's units for images in [0, 1], fractions like 8/255 accepted "
                "(default: the model's metadata, when --norm is the model's).")
flags.DEFINE_enum("norm", None, NORMS, "Threat model: linf or l2 (default: the model's training norm, linf for "
                  "models that record none). Every attack runs in it; FGSM becomes FGM, Square its L2 form.",
                  case_sensitive=False)
flags.DEFINE_integer("num_examples", 1000, "Test examples to evaluate (the first ones of the split).")
flags.DEFINE_integer("batch_size", 500, "Images per attack batch (500: measured faster than 100 and 250 on "
                     "CPU, see benchmarks/EVAL_SPEED.md; lower it if an accelerator runs out of memory; a "
                     "saved state resumes only with the batch size it was written with).")
flags.DEFINE_string("attacks", "standard",
                    "standard | quick | pgd20 | comma-separated names from rvs_tf.evaluate.ATTACKS.")
flags.DEFINE_string("output_dir", None, "Where the report goes (default: next to the model).")
flags.DEFINE_integer("seed", 0, "Seed of the attacks' random starts and proposals.")
flags.DEFINE_integer("sweep_examples", 100, "Examples of the accuracy-against-eps sweep (0 skips it).")
flags.DEFINE_integer("radius_examples", None, "Examples whose radius (smallest breaking perturbation) the "
                     "minimum-norm attack FMN finds, in one run: median radius and accuracy against eps "
                     "(default: every example when --attacks includes FMN, as standard and quick do, none otherwise; "
                     "0 skips).")
flags.DEFINE_bool("cascade", True, "Attack only examples no earlier attack broke (as AutoAttack).")
flags.DEFINE_string("state_dir", None, "Where each attack's finished batches are kept, so rerunning the "
                    "same command resumes (default: <output_dir>/state, replaced when the command differs; "
                    "'none' keeps nothing). An explicit folder with another evaluation's state is refused.")
flags.DEFINE_bool("restart", False, "Discard the saved progress in the state folder and start over.")
flags.DEFINE_enum("strategy", "default", STRATEGIES,
                  "tf.distribute strategy: one device, all local GPUs (MirroredStrategy), or the workers of "
                  "TF_CONFIG (MultiWorkerMirroredStrategy); the per-example results are the same.")
flags.DEFINE_enum("precision", "float32", ("auto", "float32", "mixed_bfloat16"),
                  "What the attacks search in: float32 (the default: the stronger search, the same on every "
                  "machine), mixed_bfloat16 (several times faster on CPUs with AMX; every break re-checked in "
                  "float32, see README) or auto (bfloat16 where the hardware runs it fast). The reported "
                  "accuracies are float32 verdicts either way.")
flags.DEFINE_bool("progress", True, "Show a progress bar per attack (on a terminal only: Keras's bars are "
                  "escape codes, which fill logs).")
flags.mark_flags_as_required(["model"])


def _model_ok(path):
    try:
        evaluate.resolve_model_path(path)
    except (ValueError, OSError):
        return False
    return True


def _attacks_ok(value):
    try:
        evaluate.resolve_attacks(value)
    except ValueError:
        return False
    return True


flags.register_validator("model", _model_ok, "--model: expected a SavedModel directory, a folder of integer "
                         "versions of one (saved_models/<name>), or a .keras file")
flags.register_validator("eps", lambda v: v is None or v >= 0.0, "--eps: expected a number >= 0")
flags.register_multi_flags_validator(
    ["eps", "norm"], lambda f: f["eps"] is None or f["norm"] == "l2" or f["eps"] <= 1.0,
    "--eps: expected a number in [0, 1] under --norm=linf (an L2 radius? pass --norm=l2)")
flags.register_validator("num_examples", lambda v: v >= 1, "--num_examples: expected an integer >= 1")
flags.register_validator("batch_size", lambda v: v >= 1, "--batch_size: expected an integer >= 1")
flags.register_validator("seed", lambda v: v >= 0, "--seed: expected an integer >= 0")
flags.register_validator("sweep_examples", lambda v: v >= 0, "--sweep_examples: expected an integer >= 0")
flags.register_validator("radius_examples", lambda v: v is None or v >= 0,
                         "--radius_examples: expected an integer >= 0")
flags.register_validator("attacks", _attacks_ok, f"--attacks: expected one of {sorted(evaluate.PRESETS)} or a "
                         f"comma-separated list of {sorted(evaluate.ATTACKS)}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"arguments: expected flags only, got {argv[1:]}")
    if not FLAGS["verbosity"].present:  # each attack setting traces once; TF's retracing notes are noise
        logging.set_verbosity(logging.ERROR)
    from rvs_tf import distribute

    strategy = distribute.get_strategy(FLAGS.strategy)  # before any other TensorFlow operation
    _, metadata, _ = evaluate.load_model(FLAGS.model)
    dataset = FLAGS.dataset or metadata.get("dataset")
    model_norm = parse_norm(metadata.get("norm", "linf"))  # exports from before norms were L-inf
    norm = parse_norm(FLAGS.norm or model_norm)
    eps = FLAGS.eps if FLAGS.eps is not None else metadata.get("eps") if norm == model_norm else None
    if dataset is None:
        raise app.UsageError("--dataset: expected a dataset name, got none (the model's metadata names none)")
    if eps is None:
        raise app.UsageError(f"--eps: expected a {norm} radius, got none (the model's metadata gives "
                             + ("none)" if norm == model_norm else f"a {model_norm} radius only)"))
    from rvs_tf.data import make_eval_dataset

    ds, _ = make_eval_dataset(dataset, split="test", batch_size=FLAGS.batch_size,
                              num_examples=FLAGS.num_examples, data_dir=FLAGS.data_dir,
                              idx_dir=FLAGS.idx_dir, validation_size=0)  # the test split needs no hold-out
    output_dir = FLAGS.output_dir or evaluate.default_output_dir(FLAGS.model) + ("_l2" if norm == "l2" else "")
    state_dir = FLAGS.state_dir or os.path.join(output_dir, "state")
    report = evaluate.robustness_report(
        FLAGS.model, ds, eps=eps, attacks=FLAGS.attacks, num_examples=FLAGS.num_examples,
        batch_size=FLAGS.batch_size, cascade=FLAGS.cascade, sweep_examples=FLAGS.sweep_examples,
        output_dir=output_dir, seed=FLAGS.seed, progress=FLAGS.progress and sys.stdout.isatty(),
        dataset_name=dataset, state_dir=None if state_dir.lower() == "none" else state_dir,
        restart=FLAGS.restart or ("mismatched" if FLAGS.state_dir is None else False), strategy=strategy,
        precision=FLAGS.precision, norm=norm, radius_examples=FLAGS.radius_examples)
    if not distribute.is_chief(strategy):
        return
    print("\n".join([f"dataset {dataset}", *evaluate.format_summary(report),
                     f"report: {os.path.join(output_dir, 'report.md')}"]))


def run():
    errors.run("rvs-evaluate", main)


if __name__ == "__main__":
    run()
