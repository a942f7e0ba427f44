"""rvs-train: train a robust classifier, keep the best checkpoint, report its clean test accuracy and export
it (then `rvs-evaluate --model=saved_models/<name>` measures its robustness).

  rvs-train --flagfile=flags/fashion_mnist.cfg

Rerunning the same command after an interruption resumes from the last finished epoch in --workdir.
"""
import atexit
import json
import os
import re
import sys
import time
import warnings

from absl import app, flags, logging

from rvs_tf.cli.flag_types import DEFINE_fraction

FLAGS = flags.FLAGS

# Data.
flags.DEFINE_string("dataset", "fashion_mnist_idx", "Dataset: a TFDS name (cifar10, cifar100, svhn_cropped, "
                    "mnist, fashion_mnist) or fashion_mnist_idx (local IDX files, offline).")
flags.DEFINE_string("data_dir", None, "TFDS data directory (TFDS default when unset).")
flags.DEFINE_string("idx_dir", "/usr/share/datasets/fashion-mnist", "Folder of the IDX .gz files.")
flags.DEFINE_integer("validation_size", 5000, "Training examples held out for validation (each epoch "
                     "reports clean and PGD accuracy on all of them).", lower_bound=1)
flags.DEFINE_enum("augment", "default", ["default", "none", "crop", "crop_flip"],
                  "Training augmentation: 'default' is the dataset's (CIFAR: crop_flip; SVHN, MNIST, "
                  "Fashion-MNIST: none), 'crop' is a random crop after --pad pixels of zero padding.")
flags.DEFINE_integer("pad", 4, "Zero padding per side before the random crop (the RVS authors use 2).",
                     lower_bound=0)
flags.DEFINE_integer("batch_size", 128, "Global batch size.", lower_bound=2)
flags.DEFINE_integer("epochs", 10, "Training epochs.", lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", None, "Cap on steps per epoch (default: one pass over the data).",
                     lower_bound=1)
# Models.
flags.DEFINE_enum("arch", "small_cnn", ["small_cnn", "preact_resnet18", "wide_resnet"], "Classifier.")
flags.DEFINE_integer("wrn_depth", 34, "WideResNet depth (6n+4).", lower_bound=10)
flags.DEFINE_integer("wrn_width", 10, "WideResNet widening factor.", lower_bound=1)
flags.DEFINE_integer("noise_dim", None, "Generator noise size (default: the classifier's feature width, "
                     "as the authors).", lower_bound=1)
# Method.
METHODS = ("rvs", "natural", "fgsm_rs", "pgd", "trades", "nfgsm", "fgsm_pgi", "rvs_init")
flags.DEFINE_enum("method", "rvs", METHODS,
                  "Training method; everything else (data, model, optimiser, schedule) is shared. "
                  "rvs_init: a generator that sees the image and its gradient learns the start of one FGSM "
                  "step (see rvs_tf.learned_init).")
flags.DEFINE_integer("pgd_steps", 10, "Attack steps of --method=pgd and --method=trades.", lower_bound=1)
DEFINE_fraction("pgd_step_size", None, "Step size of those attacks (default: 2.5*eps/steps for pgd, "
                "eps/4 for trades, as their papers).", lower=1e-9)
flags.DEFINE_float("trades_beta", 6.0, "TRADES robustness weight.", lower_bound=0.0)
flags.DEFINE_float("fgsm_step_ratio", 1.25, "FGSM-RS step as a multiple of eps (Wong et al.: 1.25).",
                   lower_bound=1e-9)
flags.DEFINE_float("single_step_ratio", 1.0, "The signed step of nfgsm, fgsm_pgi and rvs_init as a multiple of "
                   "eps (their papers: 1).", lower_bound=1e-9)
flags.DEFINE_float("nfgsm_noise_ratio", 2.0, "N-FGSM noise U(-k eps, k eps): k (de Jorge et al.: 2). The training "
                   "perturbation exceeds eps by design; evaluation stays at eps.", lower_bound=0.0)
flags.DEFINE_float("pairing_weight", None, "Logit-pairing weight between the start and the adversarial example "
                   "(default: 10 for fgsm_pgi as its paper, 0 for rvs_init).", lower_bound=0.0)
flags.DEFINE_float("prior_momentum", 0.3, "fgsm_pgi: decay of the gradient momentum moving its prior.",
                   lower_bound=0.0, upper_bound=0.999)
flags.DEFINE_integer("generator_every", 20, "rvs_init: classifier steps per generator step (FGSM-SDI: 20).",
                     lower_bound=1)
flags.DEFINE_integer("init_generator_width", 32, "rvs_init: channels of the generator's convolutions.",
                     lower_bound=1)
flags.DEFINE_float("init_start_ratio", 1.0, "rvs_init: the learned start lies within this many eps of x.",
                   lower_bound=1e-9)
flags.DEFINE_bool("init_project", True, "rvs_init: project the final example onto the eps-ball (off, with "
                  "--init_start_ratio=2: a learned N-FGSM whose training perturbation exceeds eps by design).")
flags.DEFINE_float("init_ot_weight", 0.0, "rvs_init: weight of RVS's feature OT term (0: off).", lower_bound=0.0)
flags.DEFINE_float("overfit_gap", 0.3, "Warn of catastrophic overfitting when validation FGSM accuracy exceeds "
                   "PGD accuracy by more than this (a fraction).", lower_bound=0.01, upper_bound=1.0)
# RVS.
DEFINE_fraction("eps", 0.1, "L-inf budget for images in [0, 1]; fractions like 8/255 are accepted.",
                lower=0.0, upper=1.0)
flags.DEFINE_enum("bound", "clip", ["clip", "tanh"], "How G(z) is bounded by eps.")
flags.DEFINE_bool("random_start", True, "Uniform random start before adding G(z).")
flags.DEFINE_float("label_smoothing", None, "Mass moved from the true class to the others (default: "
                   "0.5 for rvs as the authors, 0.4 for fgsm_pgi (its authors' code keeps 0.6 on the true "
                   "class), 0 for the other methods as their papers).",
                   lower_bound=0.0, upper_bound=0.99)
flags.DEFINE_float("ot_weight", 1.0, "Weight of the OT term in the classifier loss.", lower_bound=0.0)
flags.DEFINE_enum("ot_on", "features", ["features", "logits"], "What the OT term compares.")
flags.DEFINE_float("ot_epsilon", 0.01, "Entropic regularisation of the OT term.", lower_bound=1e-6)
flags.DEFINE_string("ot_cost_scale", "mean", "How --ot_epsilon is read: 'mean' or 'max' (relative to "
                    "that statistic of the cost matrix; converges fast), 'none' (absolute, the authors'), or a "
                    "number.")
flags.DEFINE_integer("ot_max_iters", 100, "Sinkhorn iteration cap.", lower_bound=1)
flags.DEFINE_enum("ot_gradient", "implicit", ["implicit", "unrolled"], "Sinkhorn gradient mode.")
flags.DEFINE_bool("ot_debiased", False, "Use the debiased Sinkhorn divergence.")
flags.DEFINE_float("clean_ce_weight", 0.0, "Weight of a clean cross-entropy term.", lower_bound=0.0)
flags.DEFINE_enum("rvs_update", "alternating", ["alternating", "simultaneous"],
                  "alternating: the authors' generator step then classifier step; simultaneous: both "
                  "players' gradients from one forward pass (cheaper; see RVSModel).")
flags.DEFINE_enum("feature_distance", "sinkhorn", ["sinkhorn", "paired_mse"],
                  "The feature term: entropic OT (RVS) or paired mean squared distance (ablation).")
flags.DEFINE_bool("freeze_generator", False, "Keep the generator at its random initialisation (ablation: "
                  "bounded noise of the same form, no synthesis).")
flags.DEFINE_integer("eps_warmup_epochs", 0, "Epochs over which eps ramps up from 0.", lower_bound=0)
# Optimisation.
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adam"], "Classifier optimizer.")
flags.DEFINE_float("lr", 0.1, "Classifier learning rate.", lower_bound=0.0)
flags.DEFINE_list("lr_drop_epochs", [], "Epochs at which the classifier lr is multiplied by "
                  "--lr_drop_factor.")
flags.DEFINE_float("lr_drop_factor", 0.1, "Learning-rate drop factor.", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("momentum", 0.9, "SGD momentum (both players).", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("weight_decay", 2e-4, "L2 on the classifier's kernels: wd * sum ||W||^2 / 2.",
                   lower_bound=0.0)
flags.DEFINE_enum("generator_optimizer", "sgd", ["sgd", "adam"], "Generator optimizer (rvs, rvs_init; FGSM-SDI "
                  "uses adam with --generator_lr=0.001).")
flags.DEFINE_float("generator_lr", 0.01, "Generator learning rate (constant).", lower_bound=0.0)
# Evaluation, checkpoints, export.
flags.DEFINE_integer("eval_pgd_steps", 10, "PGD steps of the per-epoch validation attack.", lower_bound=1)
flags.DEFINE_string("name", None, "Run name: names the workdir and the export (default: "
                    "<dataset>_<method>).")
flags.DEFINE_string("workdir", None, "Checkpoints and TensorBoard logs (default: runs/<name>).")
flags.DEFINE_string("export_dir", "saved_models", "Root of the TF Serving exports.")
flags.DEFINE_bool("export", True, "Export the best classifier when training ends.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_bool("deterministic", False, "Deterministic TF kernels (tf.config.experimental."
                  "enable_op_determinism), for identical seeded reruns on GPUs. On CPU seeded reruns on one "
                  "machine are identical without it; it made 40 quick-start RVS steps 9% slower on 2 cores "
                  "(29.6 s against 27.2 s). Other core counts, CPU/GPU types or TF versions still change the "
                  "figures (README, Reproducibility).")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the train step (measured 1.7x slower on CPU; turned "
                  "off with a warning under several replicas).")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                  "tf.distribute strategy: one device, all local GPUs (MirroredStrategy), or several "
                  "machines (MultiWorkerMirroredStrategy from TF_CONFIG; see docs/serving_and_scale.md).")
flags.DEFINE_enum("mixed_precision", "float32", ["float32", "mixed_float16", "mixed_bfloat16"],
                  "Keras dtype policy; logits, losses and the OT term stay float32. mixed_float16 is for "
                  "GPUs (emulated, very slow on CPU).")

EXPORT_RECORD = "export.json"  # in --workdir: where this run's classifier was last exported

# Flags that define a run: resuming with different values would mix two experiments.
RUN_FLAGS = ("method", "pgd_steps", "pgd_step_size", "trades_beta", "fgsm_step_ratio", "dataset", "augment",
             "pad", "validation_size", "batch_size", "arch", "wrn_depth", "wrn_width", "noise_dim", "eps", "bound",
             "random_start", "label_smoothing", "ot_weight", "ot_on", "ot_epsilon", "ot_cost_scale",
             "ot_max_iters", "ot_gradient", "ot_debiased", "clean_ce_weight", "rvs_update",
             "feature_distance", "freeze_generator", "optimizer", "lr", "lr_drop_epochs", "lr_drop_factor",
             "momentum", "weight_decay", "generator_optimizer", "generator_lr", "seed", "steps_per_epoch",
             "eps_warmup_epochs", "mixed_precision", "eval_pgd_steps", "single_step_ratio", "nfgsm_noise_ratio",
             "pairing_weight", "prior_momentum", "generator_every", "init_generator_width", "init_ot_weight",
             "init_start_ratio", "init_project")


def parse_cost_scale(value):
    text = str(value).strip().lower()
    if text in ("none", ""):
        return None
    if text in ("mean", "max"):
        return text
    try:
        number = float(text)
    except ValueError:
        number = -1.0
    if number <= 0:
        raise ValueError("--ot_cost_scale: expected none, mean, max or a positive number, "
                         f"got {value!r}")
    return number


def _drop_epochs(values):
    try:
        epochs = sorted(int(v) for v in values)
    except ValueError:
        raise ValueError(f"--lr_drop_epochs: expected a comma-separated list of epochs, got {values}") \
            from None
    if any(e < 1 for e in epochs):
        raise ValueError(f"--lr_drop_epochs: epochs must be >= 1, got {values}")
    return epochs


flags.register_validator("dataset", lambda v: v in _dataset_names(),
                         message="--dataset: expected one of " + ", ".join(
                             ("cifar10", "cifar100", "svhn_cropped", "mnist", "fashion_mnist",
                              "fashion_mnist_idx")))
flags.register_validator("ot_cost_scale", lambda v: _valid(parse_cost_scale, v),
                         message="--ot_cost_scale: expected none, mean, max or a positive number")
flags.register_validator("lr_drop_epochs", lambda v: _valid(_drop_epochs, v),
                         message="--lr_drop_epochs: expected a comma-separated list of epochs >= 1")
flags.register_validator("eps", lambda v: v > 0, message="--eps: expected 0 < eps <= 1 (images in [0, 1])")
flags.register_validator("name", lambda v: v is None or bool(re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", v)),
                         message="--name: expected letters, digits, '_', '-' or '.' (it names a folder)")


def _dataset_names():
    from rvs_tf import data
    return data.TFDS_DATASETS + data.LOCAL_DATASETS


def _valid(parse, value):
    try:
        parse(value)
        return True
    except ValueError:
        return False


RUN_FLAGS += ("deterministic",)  # op determinism changes the kernels and so the figures


def run_config():
    return {name: FLAGS[name].value for name in RUN_FLAGS}


def _as_flag(name, value):
    """The command-line form that sets flag `name` back to a saved `value` (a resume-mismatch hint)."""
    if value is None:
        return f"no --{name} (its default)"
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    if isinstance(value, list):
        value = ",".join(str(item) for item in value)
    return f"--{name}={value}"


def build_model(info, steps_per_epoch):
    """The compiled training model of --method (with its classifier, and generator for RVS), from flags."""
    import tensorflow as tf

    from rvs_tf import baselines, models
    from rvs_tf.learned_init import RVSInitModel
    from rvs_tf.training import RVSModel

    kwargs = {"depth": FLAGS.wrn_depth, "width": FLAGS.wrn_width} if FLAGS.arch == "wide_resnet" else {}
    classifier = models.build_classifier(FLAGS.arch, info.image_shape, info.num_classes, **kwargs)
    smoothing = FLAGS.label_smoothing
    if smoothing is None:
        smoothing = {"rvs": 0.5, "fgsm_pgi": 0.4}.get(FLAGS.method, 0.0)
    common = dict(eps=FLAGS.eps, label_smoothing=smoothing, weight_decay=FLAGS.weight_decay,
                  eps_warmup_steps=FLAGS.eps_warmup_epochs * steps_per_epoch,
                  eval_pgd_steps=FLAGS.eval_pgd_steps, seed=FLAGS.seed)
    pairing = FLAGS.pairing_weight
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    method = {"fgsm_rs": dict(step_ratio=FLAGS.fgsm_step_ratio),
              "pgd": dict(steps=FLAGS.pgd_steps, step_size=FLAGS.pgd_step_size),
              "trades": dict(steps=FLAGS.pgd_steps, step_size=FLAGS.pgd_step_size, beta=FLAGS.trades_beta),
              "nfgsm": dict(step_ratio=FLAGS.single_step_ratio, noise_ratio=FLAGS.nfgsm_noise_ratio),
              "fgsm_pgi": dict(step_ratio=FLAGS.single_step_ratio, prior_momentum=FLAGS.prior_momentum,
                               pairing_weight=10.0 if pairing is None else pairing,
                               prior_capacity=-(-FLAGS.batch_size // replicas)),
              }.get(FLAGS.method, {})
    if FLAGS.method in baselines.METHODS:
        model = baselines.METHODS[FLAGS.method](classifier, **common, **method)
        model.compile(optimizer=_optimizer(FLAGS.optimizer, _classifier_lr(steps_per_epoch)),
                      jit_compile=FLAGS.jit_compile)
        return model
    generator_optimizer = _optimizer(FLAGS.generator_optimizer, FLAGS.generator_lr)
    if FLAGS.method == "rvs_init":
        generator = models.make_init_generator(info.image_shape, width=FLAGS.init_generator_width)
        generator.trainable = not FLAGS.freeze_generator
        model = RVSInitModel(
            classifier, generator, step_ratio=FLAGS.single_step_ratio, generator_every=FLAGS.generator_every,
            pairing_weight=pairing or 0.0, ot_weight=FLAGS.init_ot_weight, ot_on=FLAGS.ot_on,
            start_ratio=FLAGS.init_start_ratio, project=FLAGS.init_project,
            ot_epsilon=FLAGS.ot_epsilon, ot_cost_scale=parse_cost_scale(FLAGS.ot_cost_scale),
            ot_max_iters=FLAGS.ot_max_iters, ot_gradient=FLAGS.ot_gradient, ot_debiased=FLAGS.ot_debiased,
            feature_distance=FLAGS.feature_distance, **common)
        model.compile(classifier_optimizer=_optimizer(FLAGS.optimizer, _classifier_lr(steps_per_epoch)),
                      generator_optimizer=generator_optimizer, jit_compile=FLAGS.jit_compile)
        return model
    feature_width = classifier.get_layer(models.FEATURES_LAYER).output.shape[-1]
    generator = models.make_generator(FLAGS.noise_dim or feature_width, info.image_shape)
    generator.trainable = not FLAGS.freeze_generator
    model = RVSModel(
        classifier, generator, bound=FLAGS.bound, random_start=FLAGS.random_start,
        ot_weight=FLAGS.ot_weight, ot_on=FLAGS.ot_on, ot_epsilon=FLAGS.ot_epsilon,
        ot_cost_scale=parse_cost_scale(FLAGS.ot_cost_scale), ot_max_iters=FLAGS.ot_max_iters,
        ot_gradient=FLAGS.ot_gradient, ot_debiased=FLAGS.ot_debiased,
        clean_ce_weight=FLAGS.clean_ce_weight, rvs_update=FLAGS.rvs_update,
        feature_distance=FLAGS.feature_distance, **common)
    model.compile(classifier_optimizer=_optimizer(FLAGS.optimizer, _classifier_lr(steps_per_epoch)),
                  generator_optimizer=generator_optimizer, jit_compile=FLAGS.jit_compile)
    return model


def _classifier_lr(steps_per_epoch):
    import keras

    boundaries = [e * steps_per_epoch for e in _drop_epochs(FLAGS.lr_drop_epochs)]
    if not boundaries:
        return FLAGS.lr
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries, [FLAGS.lr * FLAGS.lr_drop_factor ** i for i in range(len(boundaries) + 1)])


def _optimizer(kind, rate):
    import keras

    if kind == "adam":
        return keras.optimizers.Adam(rate)
    return keras.optimizers.SGD(rate, momentum=FLAGS.momentum)


class ImageSummaries:
    """TensorBoard images of x, delta (mapped to [0, 1]) and x_adv (the images the method trains on) on a
    fixed batch, each epoch."""

    def __new__(cls, log_dir, images, labels, max_outputs=8):
        import keras
        import tensorflow as tf

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


def _fail(message):
    print(f"rvs-train: error: {message}", file=sys.stderr)
    sys.exit(2)


def _checked(function, *args, **kwargs):
    """function(*args, **kwargs), with a checkpoint that does not load shown as a one-line warning, and a
    write error or a run that cannot be resumed as a one-line error."""
    from rvs_tf.checkpoints import CheckpointError, CheckpointWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointWarning)
        try:
            result = function(*args, **kwargs)
        except (CheckpointError, OSError) as error:
            result = error
    for warning in caught:
        if issubclass(warning.category, CheckpointWarning):
            print(f"rvs-train: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    if isinstance(result, Exception):
        _fail(result)
    return result


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:  # TF's INFO lines drown the progress bars
        logging.set_verbosity(logging.WARNING)
    started = time.time()
    import keras
    import tensorflow as tf

    from rvs_tf import data, distribute, export, runlock
    from rvs_tf.checkpoints import RunCheckpoint, write_json_atomic
    from rvs_tf.guards import TrainingHalted

    name = FLAGS.name or f"{FLAGS.dataset}_{FLAGS.method}"
    workdir = FLAGS.workdir or os.path.join("runs", name)
    try:
        strategy = distribute.get_strategy(FLAGS.strategy)
        distribute.set_mixed_precision(FLAGS.mixed_precision)
        chief = distribute.is_chief(strategy)
        if FLAGS.export and chief:
            export.check_writable(FLAGS.export_dir)
        os.makedirs(workdir, exist_ok=True)
        if chief:  # one run per workdir; released at exit, taken over once stale after a kill
            atexit.register(runlock.RunLock(workdir).acquire().release)
        config_path = os.path.join(workdir, "config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as handle:
                saved = json.load(handle)
            # A flag added after the run was written counts as unchanged while it keeps its default.
            changed = {k: (saved.get(k), v) for k, v in run_config().items()
                       if json.loads(json.dumps(v)) != saved.get(k, json.loads(json.dumps(FLAGS[k].default)))}
            if changed:
                raise ValueError(
                    f"--workdir: {workdir!r} holds a run with other settings "
                    + ", ".join(f"--{k} (saved {a!r}, now {b!r})" for k, (a, b) in sorted(changed.items()))
                    + "; to resume it, pass " + " ".join(_as_flag(k, a) for k, (a, _) in sorted(changed.items()))
                    + ", or choose another --workdir or --name to start a new run")
        keras.utils.set_random_seed(FLAGS.seed)
        if FLAGS.deterministic:
            tf.config.experimental.enable_op_determinism()
        train_ds, val_ds, test_ds, info = data.make_datasets(
            FLAGS.dataset, batch_size=FLAGS.batch_size, validation_size=FLAGS.validation_size,
            data_dir=FLAGS.data_dir, idx_dir=FLAGS.idx_dir, seed=FLAGS.seed,
            augment=None if FLAGS.augment == "default" else FLAGS.augment, pad=FLAGS.pad)
        steps_per_epoch = FLAGS.steps_per_epoch or info.num_train // FLAGS.batch_size
        with strategy.scope():
            model = build_model(info, steps_per_epoch)
    except (ValueError, OSError, RuntimeError) as error:
        _fail(error)
    if chief and not os.path.isfile(config_path):  # only once everything above was accepted
        _checked(write_json_atomic, config_path, run_config())

    if FLAGS.strategy == "multi_worker":  # each worker reads its own share of every batch
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        train_ds = train_ds.with_options(options)
    checkpoint_dir, log_dir = os.path.join(workdir, "checkpoints"), os.path.join(workdir, "logs")
    checkpoint = _checked(RunCheckpoint, checkpoint_dir, monitor="val_pgd_accuracy",
                          write_directory=distribute.worker_dir(checkpoint_dir, strategy))
    initial_epoch = _checked(checkpoint.restore, model)
    if initial_epoch:
        print(f"Resuming {workdir} from epoch {initial_epoch}")
    sample_ds, _ = data.make_eval_dataset(FLAGS.dataset, split="validation", batch_size=8, num_examples=8,
                                          validation_size=FLAGS.validation_size, data_dir=FLAGS.data_dir,
                                          idx_dir=FLAGS.idx_dir)
    sample_images, sample_labels = next(iter(sample_ds))
    print(f"Training {FLAGS.method} on {info.name} ({info.num_train} train / {info.num_validation} validation), "
          f"{FLAGS.arch}, eps={FLAGS.eps:.4g}; val_pgd_accuracy = PGD-{FLAGS.eval_pgd_steps} (CE, random "
          f"start, 1 restart, eps={FLAGS.eps:.4g}) on the validation split")
    if FLAGS.method not in ("rvs", "fgsm_pgi") and FLAGS.label_smoothing:
        print(f"Note: --label_smoothing={FLAGS.label_smoothing:g} with --method={FLAGS.method}; its paper "
              "trains without (--label_smoothing=0), and smoothing can mask gradients")
    worker_logs = distribute.worker_dir(log_dir, strategy)
    from rvs_tf.monitors import CatastrophicOverfittingMonitor

    monitors = [] if FLAGS.method == "natural" else [CatastrophicOverfittingMonitor(FLAGS.overfit_gap)]
    callbacks = [*monitors, checkpoint, keras.callbacks.TensorBoard(worker_logs),
                 ImageSummaries(worker_logs, sample_images, sample_labels)]
    if initial_epoch < FLAGS.epochs:
        # Skip the batches already trained on: every seed is fixed, so a resumed run sees the same data
        # order and augmentations as an uninterrupted one.
        try:
            model.fit(train_ds.repeat().skip(initial_epoch * steps_per_epoch), epochs=FLAGS.epochs,
                      initial_epoch=initial_epoch,
                      steps_per_epoch=steps_per_epoch, validation_data=val_ds, callbacks=callbacks,
                      shuffle=False, verbose=1 if sys.stdout.isatty() else 2)
        except (TrainingHalted, OSError) as error:  # nothing was saved for the failed epoch, no export
            kept = checkpoint.state["epoch"]
            _fail(f"{error}. " + (f"The checkpoint of epoch {kept} in {checkpoint_dir} is kept as the "
                                  "resume point" if kept else "No checkpoint was written")
                  + "; nothing was exported" + ("; to retry with other settings, choose another --workdir "
                                                "or --name" if isinstance(error, TrainingHalted) else ""))
    if not chief:  # only the chief keeps checkpoints, logs, the best classifier and the export
        distribute.discard_worker_dir(checkpoint_dir, strategy)
        distribute.discard_worker_dir(log_dir, strategy)
        return
    best_epoch = _checked(checkpoint.load_best, model)
    minutes = (time.time() - started) / 60
    print(f"Training done in {minutes:.1f} min; best epoch by val_pgd_accuracy: {best_epoch}")
    record_path = os.path.join(workdir, EXPORT_RECORD)
    previous = _read_export_record(record_path)
    if (FLAGS.export and initial_epoch >= FLAGS.epochs and previous.get("best_epoch") == best_epoch
            and os.path.dirname(os.path.abspath(previous.get("path", "/"))) == os.path.abspath(
                os.path.join(FLAGS.export_dir, name))
            and os.path.isdir(previous["path"])):
        print(f"Nothing to do: this run's best classifier is already exported to {previous['path']}")
        return

    test_clean = _accuracy(model.classifier, test_ds)
    metadata = {
        "dataset": info.name, "image_shape": list(info.image_shape), "num_classes": info.num_classes,
        "class_names": list(info.class_names), "eps": FLAGS.eps, "method": FLAGS.method, "arch": FLAGS.arch,
        "strategy": FLAGS.strategy, "flags": run_config(), "best_epoch": best_epoch, "train_minutes": round(minutes, 2),
        "metrics": {"test_clean_accuracy": test_clean,
                    **checkpoint.state.get("history", {}).get(str(best_epoch), {})},
    }
    print(f"Test clean accuracy: {test_clean:.4f} ({info.num_test} images)")
    _checked(save_classifier, model.classifier, workdir, metadata)
    if FLAGS.export:
        try:
            path = export.export_classifier(model.classifier, FLAGS.export_dir, name, metadata=metadata)
        except (OSError, ValueError) as error:
            _fail(error)
        write_json_atomic(record_path, {"path": path, "best_epoch": best_epoch})
        print(f"Exported to {path}")


def _read_export_record(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def save_classifier(classifier, workdir, metadata):
    """The best classifier as a .keras file and its metadata, beside the checkpoints (what rvs-export
    reads), each written to a temporary name first."""
    from rvs_tf.checkpoints import CLASSIFIER_FILE, WORKDIR_METADATA_FILE, write_error, write_json_atomic

    temporary = os.path.join(workdir, ".tmp-" + CLASSIFIER_FILE)
    path = os.path.join(workdir, CLASSIFIER_FILE)
    try:
        classifier.save(temporary)
        os.replace(temporary, path)
    except OSError as error:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise write_error(path, error, kept="its previous version is kept") from error
    write_json_atomic(os.path.join(workdir, WORKDIR_METADATA_FILE), metadata)


def _accuracy(classifier, dataset):
    import keras
    metric = keras.metrics.SparseCategoricalAccuracy()
    for images, labels in dataset:
        metric.update_state(labels, classifier(images, training=False))
    return float(metric.result())


def run():
    app.run(main)


if __name__ == "__main__":
    run()
