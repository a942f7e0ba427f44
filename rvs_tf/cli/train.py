"""rvs-train: train a robust classifier, keep the best checkpoint, report its clean test accuracy and export
it (then `rvs-evaluate --model=saved_models/<name>` measures its robustness).

  rvs-train --flagfile=flags/fashion_mnist.cfg

Rerunning the same command after an interruption resumes from the last finished epoch in --workdir.
Each flag is the field of rvs_tf.run_config.RunConfig of the same name and default; the run itself is
rvs_tf.runs.train_and_export, importable without this command line.
"""
import dataclasses

from absl import flags, logging

from rvs_tf import builder, distribute, models, precision, rvs, sinkhorn
from rvs_tf.cli import errors
from rvs_tf.cli.flag_types import DEFINE_fraction
from rvs_tf.export import NAME_PATTERN, SERVING_PRECISIONS
from rvs_tf.run_config import (AUGMENTS, BOUNDS, DATASETS, RUN_NAME, RUNS_DIR, RunConfig, parse_cost_scale,
                               parse_drop_epochs)
from rvs_tf.runs import train_and_export
from rvs_tf.threat_model import NORMS

FLAGS = flags.FLAGS
D = RunConfig()  # the defaults of every flag


def _bounds(name):
    """absl's lower_bound / upper_bound of flag `name`: RunConfig's, so both refuse the same values."""
    low, high = BOUNDS[name]
    return {key: value for key, value in (("lower_bound", low), ("upper_bound", high)) if value is not None}


# Data.
flags.DEFINE_enum("dataset", D.dataset, DATASETS, "Dataset: a TFDS name (cifar10, cifar100, svhn_cropped, "
                  "mnist, fashion_mnist) or fashion_mnist_idx (local IDX files, offline).")
flags.DEFINE_string("data_dir", D.data_dir, "TFDS data directory (TFDS default when unset).")
flags.DEFINE_string("idx_dir", D.idx_dir, "Folder of the IDX .gz files.")
flags.DEFINE_integer("validation_size", D.validation_size, "Training examples held out for validation (each "
                     "epoch reports clean and PGD accuracy on all of them).", **_bounds("validation_size"))
flags.DEFINE_enum("augment", D.augment, AUGMENTS,
                  "Training augmentation: 'default' is the dataset's (CIFAR: crop_flip; SVHN, MNIST, "
                  "Fashion-MNIST: none), 'crop' is a random crop after --pad pixels of zero padding.")
flags.DEFINE_integer("pad", D.pad, "Zero padding per side before the random crop (the RVS authors use 2).",
                     **_bounds("pad"))
flags.DEFINE_integer("batch_size", D.batch_size, "Global batch size.", **_bounds("batch_size"))
flags.DEFINE_integer("epochs", D.epochs, "Training epochs.", **_bounds("epochs"))
flags.DEFINE_integer("steps_per_epoch", D.steps_per_epoch, "Cap on steps per epoch (default: one pass over "
                     "the data).", **_bounds("steps_per_epoch"))
# Models.
flags.DEFINE_enum("arch", D.arch, models.ARCHITECTURES, "Classifier.")
flags.DEFINE_integer("wrn_depth", D.wrn_depth, "WideResNet depth (6n+4).", **_bounds("wrn_depth"))
flags.DEFINE_integer("wrn_width", D.wrn_width, "WideResNet widening factor.", **_bounds("wrn_width"))
flags.DEFINE_integer("noise_dim", D.noise_dim, "Generator noise size (default: the classifier's feature "
                     "width, as the authors).", **_bounds("noise_dim"))
# Method.
flags.DEFINE_enum("method", D.method, builder.METHODS,
                  "Training method; everything else (data, model, optimiser, schedule) is shared. "
                  "rvs_init: a generator that sees the image and its gradient learns the start of one FGSM "
                  "step (see rvs_tf.learned_init).")
flags.DEFINE_integer("pgd_steps", D.pgd_steps, "Attack steps of --method=pgd and --method=trades.",
                     **_bounds("pgd_steps"))
DEFINE_fraction("pgd_step_size", D.pgd_step_size, "Step size of those attacks (default: 2.5*eps/steps for "
                "pgd, eps/4 for trades, as their papers).", lower=1e-9)
flags.DEFINE_float("trades_beta", D.trades_beta, "TRADES robustness weight.", **_bounds("trades_beta"))
flags.DEFINE_float("fgsm_step_ratio", D.fgsm_step_ratio, "FGSM-RS step as a multiple of eps (Wong et al.: "
                   "1.25).", **_bounds("fgsm_step_ratio"))
flags.DEFINE_float("single_step_ratio", D.single_step_ratio, "The signed step of nfgsm, fgsm_pgi and rvs_init "
                   "as a multiple of eps (their papers: 1).", **_bounds("single_step_ratio"))
flags.DEFINE_float("nfgsm_noise_ratio", D.nfgsm_noise_ratio, "N-FGSM noise U(-k eps, k eps): k (de Jorge et "
                   "al.: 2). The training perturbation exceeds eps by design; evaluation stays at eps.",
                   **_bounds("nfgsm_noise_ratio"))
flags.DEFINE_float("pairing_weight", D.pairing_weight, "Logit-pairing weight between the start and the "
                   "adversarial example (default: 10 for fgsm_pgi as its paper, 0 for rvs_init).",
                   **_bounds("pairing_weight"))
flags.DEFINE_float("prior_momentum", D.prior_momentum, "fgsm_pgi: decay of the gradient momentum moving its "
                   "prior.", **_bounds("prior_momentum"))
flags.DEFINE_integer("generator_every", D.generator_every, "rvs_init: classifier steps per generator step "
                     "(FGSM-SDI: 20).", **_bounds("generator_every"))
flags.DEFINE_integer("init_generator_width", D.init_generator_width, "rvs_init: channels of the generator's "
                     "convolutions.", **_bounds("init_generator_width"))
flags.DEFINE_float("init_start_ratio", D.init_start_ratio, "rvs_init: the learned start lies within this "
                   "many eps of x.", **_bounds("init_start_ratio"))
flags.DEFINE_float("init_noise_ratio", D.init_noise_ratio, "rvs_init: uniform noise of up to this many eps "
                   "under the learned start (N-FGSM's noise; 0: none).", **_bounds("init_noise_ratio"))
flags.DEFINE_bool("init_project", D.init_project, "rvs_init: project the final example onto the eps-ball "
                  "(off, with --init_start_ratio=2: a learned N-FGSM whose training perturbation exceeds eps "
                  "by design).")
flags.DEFINE_float("init_ot_weight", D.init_ot_weight, "rvs_init: weight of RVS's feature OT term (0: off).",
                   **_bounds("init_ot_weight"))
flags.DEFINE_float("overfit_gap", D.overfit_gap, "Warn of catastrophic overfitting when validation FGSM "
                   "accuracy exceeds PGD accuracy by more than this (a fraction).", **_bounds("overfit_gap"))
flags.DEFINE_integer("collapse_guard_window", D.collapse_guard_window, "Steps per window of the check that "
                     "stops RVS when its classifier collapses or stalls near chance (rvs_tf.guards."
                     "FeatureCollapseGuard); 0 turns it off.", **_bounds("collapse_guard_window"))
# RVS.
DEFINE_fraction("eps", D.eps, "Budget in --norm's units for images in [0, 1] (L-inf: at most 1); fractions "
                "like 8/255 are accepted.", lower=0.0)
flags.DEFINE_enum("norm", D.norm, NORMS, "Threat model of training and validation: linf, or l2 (every method "
                  "but fgsm_pgi: normalised-gradient steps, noise from the L2 ball; RVS's perturbation projected "
                  "onto the ball).", case_sensitive=False)
flags.DEFINE_enum("bound", D.bound, rvs.BOUNDS, "How G(z) is bounded by eps.")
flags.DEFINE_bool("random_start", D.random_start, "Uniform random start before adding G(z).")
flags.DEFINE_float("label_smoothing", D.label_smoothing, "Mass moved from the true class to the others "
                   "(default: 0.5 for rvs as the authors, 0.4 for fgsm_pgi (its authors' code keeps 0.6 on the "
                   "true class), 0 for the other methods as their papers).", **_bounds("label_smoothing"))
flags.DEFINE_float("ot_weight", D.ot_weight, "Weight of the OT term in the classifier loss.",
                   **_bounds("ot_weight"))
flags.DEFINE_enum("ot_on", D.ot_on, rvs.OT_TARGETS, "What the OT term compares.")
flags.DEFINE_float("ot_epsilon", D.ot_epsilon, "Entropic regularisation of the OT term.",
                   **_bounds("ot_epsilon"))
flags.DEFINE_string("ot_cost_scale", D.ot_cost_scale, "How --ot_epsilon is read: 'mean' or 'max' (relative "
                    "to that statistic of the cost matrix; converges fast), 'none' (absolute, the authors'), or "
                    "a number.")
flags.DEFINE_integer("ot_max_iters", D.ot_max_iters, "Sinkhorn iteration cap.", **_bounds("ot_max_iters"))
flags.DEFINE_enum("ot_gradient", D.ot_gradient, sinkhorn.GRADIENTS, "Sinkhorn gradient mode.")
flags.DEFINE_bool("ot_debiased", D.ot_debiased, "Use the debiased Sinkhorn divergence.")
flags.DEFINE_float("clean_ce_weight", D.clean_ce_weight, "Weight of a clean cross-entropy term.",
                   **_bounds("clean_ce_weight"))
flags.DEFINE_enum("rvs_update", D.rvs_update, rvs.RVS_UPDATES,
                  "alternating: the authors' generator step then classifier step; simultaneous: both "
                  "players' gradients from one forward pass (cheaper; see RVSModel).")
flags.DEFINE_enum("feature_distance", D.feature_distance, rvs.FEATURE_DISTANCES,
                  "The feature term: entropic OT (RVS) or paired mean squared distance (ablation).")
flags.DEFINE_enum("ot_units", D.ot_units, rvs.OT_UNITS,
                  "spread: the feature term divided by the clean batch's feature spread, so it weighs the same "
                  "whatever the classifier's feature scale (BatchNorm classifiers train); absolute: raw "
                  "squared feature units, the authors' (their flag files name it).")
flags.DEFINE_float("ot_share_cap", D.ot_share_cap,
                   "--method=rvs: cap on the OT term's gradient, as a share of the cross-entropy's, measured "
                   "over the first classifier steps at full eps; the term's weight is scaled down to meet it, "
                   "then held (BatchNorm classifiers train; the default small CNN at eps 0.1 stays under it). "
                   "0: no cap, the authors' (their flag files name it).", **_bounds("ot_share_cap"))
flags.DEFINE_bool("freeze_generator", D.freeze_generator, "Keep the generator at its random initialisation "
                  "(ablation: bounded noise of the same form, no synthesis).")
flags.DEFINE_integer("eps_warmup_epochs", D.eps_warmup_epochs, "Epochs over which eps ramps up from 0.",
                     **_bounds("eps_warmup_epochs"))
# Optimisation.
flags.DEFINE_enum("optimizer", D.optimizer, builder.OPTIMIZERS, "Classifier optimizer.")
flags.DEFINE_float("lr", D.lr, "Classifier learning rate.", **_bounds("lr"))
flags.DEFINE_list("lr_drop_epochs", [str(e) for e in D.lr_drop_epochs], "Epochs at which the classifier lr "
                  "is multiplied by --lr_drop_factor.")
flags.DEFINE_float("lr_drop_factor", D.lr_drop_factor, "Learning-rate drop factor.",
                   **_bounds("lr_drop_factor"))
flags.DEFINE_float("momentum", D.momentum, "SGD momentum (both players).", **_bounds("momentum"))
flags.DEFINE_float("weight_decay", D.weight_decay, "L2 on the classifier's kernels: wd * sum ||W||^2 / 2.",
                   **_bounds("weight_decay"))
flags.DEFINE_enum("generator_optimizer", D.generator_optimizer, builder.OPTIMIZERS, "Generator optimizer "
                  "(rvs, rvs_init; FGSM-SDI uses adam with --generator_lr=0.001).")
flags.DEFINE_float("generator_lr", D.generator_lr, "Generator learning rate (constant).",
                   **_bounds("generator_lr"))
# Evaluation, checkpoints, export.
flags.DEFINE_integer("eval_pgd_steps", D.eval_pgd_steps, "PGD steps of the per-epoch validation attack.",
                     **_bounds("eval_pgd_steps"))
flags.DEFINE_string("name", D.name, "Run name: names the workdir and the export (default: "
                    f"{RUN_NAME.replace('{', '<').replace('}', '>')}).")
flags.DEFINE_string("workdir", D.workdir, f"Checkpoints and TensorBoard logs (default: {RUNS_DIR}/<name>).")
flags.DEFINE_string("export_dir", D.export_dir, "Root of the TF Serving exports.")
flags.DEFINE_bool("export", D.export, "Export the best classifier when training ends.")
flags.DEFINE_integer("seed", D.seed, "Random seed.")
flags.DEFINE_bool("deterministic", D.deterministic, "Deterministic TF kernels (tf.config.experimental."
                  "enable_op_determinism), for identical seeded reruns on GPUs. On CPU seeded reruns on one "
                  "machine are identical without it; it made 40 quick-start RVS steps 9% slower on 2 cores "
                  "(29.6 s against 27.2 s). Other core counts, CPU/GPU types or TF versions still change the "
                  "figures (README, Reproducibility).")
flags.DEFINE_bool("jit_compile", D.jit_compile, "XLA-compile the train step (measured 1.7x slower on CPU; "
                  "turned off with a warning under several replicas).")
flags.DEFINE_enum("strategy", D.strategy, distribute.STRATEGIES,
                  "tf.distribute strategy: one device, all local GPUs (MirroredStrategy), or several "
                  "machines (MultiWorkerMirroredStrategy from TF_CONFIG; see docs/serving_and_scale.md).")
flags.DEFINE_enum("precision", D.precision, precision.PRECISIONS,
                  "Keras dtype policy of the models; logits, losses and the OT term stay float32. auto: "
                  "mixed_bfloat16 on a CPU with AMX/AVX512-BF16 or a GPU of compute capability >= 8.0 where "
                  "a timing probe confirms it, else float32 (a note says why). mixed_float16 is for GPUs "
                  "(emulated, very slow on CPU).")
flags.DEFINE_enum("serving_precision", D.serving_precision, SERVING_PRECISIONS,
                  "What the export computes in (its signatures are float32 either way): float32, whatever "
                  "the model trained in, or mixed_bfloat16 (faster on AMX CPUs; see README).")


def _valid(parse, value):
    try:
        parse(value)
        return True
    except ValueError:
        return False


flags.register_validator("ot_cost_scale", lambda v: _valid(parse_cost_scale, v),
                         message="--ot_cost_scale: expected none, mean, max or a positive number")
flags.register_validator("lr_drop_epochs", lambda v: _valid(parse_drop_epochs, v),
                         message="--lr_drop_epochs: expected a comma-separated list of epochs >= 1")
flags.register_validator("eps", lambda v: v > 0, message="--eps: expected 0 < eps <= 1 (images in [0, 1])")
flags.register_validator("name", lambda v: v is None or bool(NAME_PATTERN.match(v)),
                         message="--name: expected letters, digits, '_', '-' or '.' (it names a folder)")


def config_from_flags():
    """The RunConfig the parsed flags describe (one flag per field)."""
    return RunConfig(**{field.name: FLAGS[field.name].value for field in dataclasses.fields(RunConfig)})


flags.DEFINE_bool("dry_run", False, "Check the whole run in a minute or two instead of running it: the real "
                  "model, optimisers, schedule, OT settings, precision and strategy for a few steps on data of "
                  "the dataset's shape (TFDS mocked, no download), then checkpoint, resume, evaluate a few "
                  "images and export (to --export_dir if given, else a temporary folder); prints the full "
                  "run's parameters, steps and ETA. Lower --batch_size to fit this machine.")
flags.DEFINE_integer("dry_run_steps", 3, "Training steps per dry-run epoch.", lower_bound=1)


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:  # TF's INFO lines drown the progress bars
        logging.set_verbosity(logging.WARNING)
    if FLAGS.dry_run:
        from rvs_tf.dry_run import dry_run

        dry_run(config_from_flags(), steps=FLAGS.dry_run_steps)
        return
    train_and_export(config_from_flags())


def run():
    errors.run("rvs-train", main)


if __name__ == "__main__":
    run()
