"""The one builder of a run's compiled training model, from its `RunConfig`: rvs-train, the benchmarks and
library users call `build_model`, so a benchmark times the model a run trains, not a copy of it.

  with strategy.scope():
      model = build_model(RunConfig(method="pgd"), image_shape=(28, 28, 1), num_classes=10,
                          steps_per_epoch=430)
"""
import keras
import tensorflow as tf

from rvs_tf import baselines, models
from rvs_tf.learned_init import RVSInitModel
from rvs_tf.rvs import RVSModel

# Every training method: the generator methods and the baselines (everything else of a run is shared).
METHODS = ("rvs", *baselines.METHODS, "rvs_init")
OPTIMIZERS = ("sgd", "adam")
# Each paper's label smoothing (fgsm_pgi's authors keep 0.6 on the true class); 0 for the other methods.
LABEL_SMOOTHING = {"rvs": 0.5, "fgsm_pgi": 0.4}
PAIRING_WEIGHT = {"fgsm_pgi": 10.0}  # FGSM-PGI's paper; rvs_init pairs only when asked


def label_smoothing(config):
    """The run's label smoothing: `config.label_smoothing`, or the method's paper's when None."""
    if config.label_smoothing is not None:
        return config.label_smoothing
    return LABEL_SMOOTHING.get(config.method, 0.0)


def make_optimizer(kind, rate, momentum):
    """An optimizer of `kind` ("sgd" with `momentum`, or "adam") at `rate` (a number or a schedule)."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {kind!r}")
    if kind == "adam":
        return keras.optimizers.Adam(rate)
    return keras.optimizers.SGD(rate, momentum=momentum)


def classifier_learning_rate(config, steps_per_epoch):
    """`config.lr`, multiplied by `lr_drop_factor` at each epoch of `lr_drop_epochs` (a step schedule)."""
    boundaries = [epoch * steps_per_epoch for epoch in config.lr_drop_epochs]
    if not boundaries:
        return config.lr
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries, [config.lr * config.lr_drop_factor ** i for i in range(len(boundaries) + 1)])


def build_classifier(config, image_shape, num_classes):
    """The classifier of `config.arch` (WideResNet with `wrn_depth` and `wrn_width`)."""
    kwargs = {"depth": config.wrn_depth, "width": config.wrn_width} if config.arch == "wide_resnet" else {}
    return models.build_classifier(config.arch, image_shape, num_classes, **kwargs)


def _baseline_options(config):
    """The keyword arguments of `config.method`'s baseline model beyond the shared ones."""
    method = config.method
    if method == "fgsm_rs":
        return dict(step_ratio=config.fgsm_step_ratio)
    if method in ("pgd", "trades"):
        extra = dict(beta=config.trades_beta) if method == "trades" else {}
        return dict(steps=config.pgd_steps, step_size=config.pgd_step_size, **extra)
    if method == "nfgsm":
        return dict(step_ratio=config.single_step_ratio, noise_ratio=config.nfgsm_noise_ratio)
    if method == "fgsm_pgi":  # the prior holds one per-replica batch
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        pairing = PAIRING_WEIGHT["fgsm_pgi"] if config.pairing_weight is None else config.pairing_weight
        return dict(step_ratio=config.single_step_ratio, prior_momentum=config.prior_momentum,
                    pairing_weight=pairing, prior_capacity=-(-config.batch_size // replicas))
    return {}


def _feature_term(config):
    """The OT (or paired-MSE) feature term's options, shared by RVS and rvs_init."""
    return dict(ot_on=config.ot_on, ot_epsilon=config.ot_epsilon, ot_cost_scale=config.ot_cost_scale,
                ot_max_iters=config.ot_max_iters, ot_gradient=config.ot_gradient,
                ot_debiased=config.ot_debiased, feature_distance=config.feature_distance,
                ot_units=config.ot_units)


def _generator_model(config, classifier, image_shape, common):
    """The uncompiled RVSModel or RVSInitModel of `config`, with its generator."""
    if config.method == "rvs_init":
        generator = models.make_init_generator(image_shape, width=config.init_generator_width)
        generator.trainable = not config.freeze_generator
        return RVSInitModel(
            classifier, generator, step_ratio=config.single_step_ratio, generator_every=config.generator_every,
            pairing_weight=config.pairing_weight or 0.0,
            ot_weight=config.init_ot_weight, start_ratio=config.init_start_ratio,
            noise_ratio=config.init_noise_ratio, project=config.init_project,
            **_feature_term(config), **common)
    feature_width = classifier.get_layer(models.FEATURES_LAYER).output.shape[-1]
    generator = models.make_generator(config.noise_dim or feature_width, image_shape)
    generator.trainable = not config.freeze_generator
    return RVSModel(classifier, generator, bound=config.bound, random_start=config.random_start,
                    ot_weight=config.ot_weight, clean_ce_weight=config.clean_ce_weight,
                    rvs_update=config.rvs_update, ot_share_cap=config.ot_share_cap or None,
                    **_feature_term(config), **common)


def build_model(config, image_shape, num_classes, steps_per_epoch):
    """The compiled training model of `config.method`: its classifier (and generator), optimizers and
    schedules, as rvs-train trains it. Call it inside the strategy's scope.

    Args:
      config: a `RunConfig` (or any object with its fields).
      image_shape: (height, width, channels) of the images.
      num_classes: the classifier's outputs.
      steps_per_epoch: classifier steps per epoch (the lr drops and the eps warm-up are in epochs).
    """
    if config.method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {config.method!r}")
    classifier = build_classifier(config, image_shape, num_classes)
    common = dict(eps=config.eps, label_smoothing=label_smoothing(config), weight_decay=config.weight_decay,
                  eps_warmup_steps=config.eps_warmup_epochs * steps_per_epoch,
                  eval_pgd_steps=config.eval_pgd_steps, seed=config.seed, norm=config.norm)
    classifier_rate = classifier_learning_rate(config, steps_per_epoch)
    if config.method in baselines.METHODS:
        model = baselines.METHODS[config.method](classifier, **common, **_baseline_options(config))
        model.compile(optimizer=make_optimizer(config.optimizer, classifier_rate, config.momentum),
                      jit_compile=config.jit_compile)
        return model
    generator_optimizer = make_optimizer(config.generator_optimizer, config.generator_lr, config.momentum)
    model = _generator_model(config, classifier, image_shape, common)
    model.compile(classifier_optimizer=make_optimizer(config.optimizer, classifier_rate, config.momentum),
                  generator_optimizer=generator_optimizer, jit_compile=config.jit_compile)
    return model
