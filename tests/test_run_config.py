"""RunConfig (what rvs-train's flags fill) and the builder the command line and the benchmarks share."""
import dataclasses
import os

import pytest

from rvs_tf import baselines, builder
from rvs_tf.learned_init import RVSInitModel
from rvs_tf.run_config import BOUNDS, RunConfig
from rvs_tf.rvs import RVSModel


def test_a_record_written_by_an_older_version_still_matches_its_run():
    config = RunConfig(lr_drop_epochs=("3", "2"), ot_cost_scale="none", eps=8 / 255)
    assert config.lr_drop_epochs == (2, 3) and config.ot_cost_scale is None
    old = config.record()
    old.update(lr_drop_epochs=["2", "3"], ot_cost_scale="none", removed_flag=1)  # flag values as text
    del old["pad"]  # a flag added after the record was written counts as unchanged at its default
    assert config.changes_from(RunConfig.from_record(old)) == {}
    assert "epochs" not in old and "workdir" not in old  # settings that may change between reruns


def test_changes_name_each_identity_field_and_ignore_settings():
    config = RunConfig(lr=0.1, epochs=3)
    assert config.changes_from(RunConfig(lr=0.2, epochs=30, workdir="elsewhere")) == {"lr": (0.2, 0.1)}


@pytest.mark.parametrize("changes, name", [(dict(method="fgsm"), "method"), (dict(dataset="imagenet"), "dataset"),
                                           (dict(lr_drop_epochs=("ten",)), "lr_drop_epochs"),
                                           (dict(ot_cost_scale="huge"), "ot_cost_scale"),
                                           (dict(name="../up"), "name"), (dict(optimizer="rmsprop"), "optimizer")])
def test_bad_values_name_the_field(changes, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        RunConfig(**changes)


def test_run_name_and_workdir_defaults():
    assert RunConfig(method="pgd").run_name == "fashion_mnist_idx_pgd"
    assert RunConfig(method="pgd").run_dir == "runs/fashion_mnist_idx_pgd"
    assert RunConfig(name="mine", workdir="/tmp/w").run_dir == "/tmp/w"
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().lr = 1.0


@pytest.mark.parametrize("method, cls, smoothing", [("rvs", RVSModel, 0.5), ("rvs_init", RVSInitModel, 0.0),
                                                    ("fgsm_pgi", baselines.FGSMPGIModel, 0.4),
                                                    ("pgd", baselines.PGDATModel, 0.0)])
def test_build_model_follows_the_config(method, cls, smoothing):
    config = RunConfig(method=method, lr=0.05, lr_drop_epochs=(2,), batch_size=16, pgd_steps=3, eps=0.2,
                       ot_max_iters=7, optimizer="adam")
    model = builder.build_model(config, (28, 28, 1), 10, steps_per_epoch=5)
    assert type(model) is cls and model.eps == pytest.approx(0.2) and model.label_smoothing == smoothing
    assert type(model.optimizer).__name__ == "Adam"
    schedule = builder.classifier_learning_rate(config, steps_per_epoch=5)  # dropped after epoch 2's 10 steps
    assert float(schedule(10)) == pytest.approx(0.05) and float(schedule(11)) == pytest.approx(0.005)
    if method == "pgd":
        assert model.steps == 3
    if method == "fgsm_pgi":
        assert model.prior_capacity == 16 and model.pairing_weight == 10.0
    if method == "rvs":
        assert model.ot_options.max_iters == 7 and model.noise_dim == 128  # the classifier's feature width


@pytest.mark.parametrize("field, value, expected", [
    ("steps_per_epoch", 0, "a number >= 1"), ("batch_size", 1, "a number >= 2"),
    ("label_smoothing", 1.5, r"a number in \[0.0, 0.99\]"), ("prior_momentum", -0.1, r"a number in \[0.0, 0.999\]")])
def test_run_config_refuses_what_the_flags_refuse(field, value, expected):
    """train_and_export(RunConfig(...)) users get the command line's bounds, not a silent fallback."""
    with pytest.raises(ValueError, match=rf"{field}: expected {expected}, got {value}"):
        RunConfig(**{field: value})
    low, high = BOUNDS[field]  # the flags take their bounds from this table (rvs_tf.cli.train._bounds)
    RunConfig(**{field: low if low is not None else high})  # the bound itself is accepted


def test_a_workdir_recorded_before_precision_was_named_so_resumes_with_its_policy():
    record = RunConfig(method="pgd").record()
    del record["precision"]
    record["mixed_precision"] = "mixed_bfloat16"
    assert RunConfig.from_record(record).precision == "mixed_bfloat16"


def test_a_workdir_recorded_before_ot_units_resumes_in_raw_feature_units():
    """Runs written before the feature term became scale-free trained in raw squared units; resuming
    one must not switch its objective, and one that names the new default is not mistaken for it."""
    record = RunConfig(method="rvs").record()
    assert record["ot_units"] == "spread"
    del record["ot_units"]
    assert RunConfig.from_record(record).ot_units == "absolute"
    assert RunConfig.from_record(RunConfig(method="rvs").record()).ot_units == "spread"
    with pytest.raises(ValueError, match="ot_units"):
        RunConfig(method="rvs", ot_units="pixels")


def test_the_ot_share_cap_reaches_the_model_and_zero_turns_it_off():
    """`--ot_share_cap=0` (the authors' flag files) builds an uncapped RVSModel; a workdir recorded before
    the cap existed resumes without it."""
    assert builder.build_model(RunConfig(method="rvs"), (28, 28, 1), 10, steps_per_epoch=5).ot_share_cap == 0.6
    off = builder.build_model(RunConfig(method="rvs", ot_share_cap=0.0), (28, 28, 1), 10, steps_per_epoch=5)
    assert off.ot_share_cap is None
    record = RunConfig(method="rvs").record()
    del record["ot_share_cap"]
    assert RunConfig.from_record(record).ot_share_cap == 0.0
    with pytest.raises(ValueError, match=r"ot_share_cap: expected a number >= 0.0, got -1"):
        RunConfig(method="rvs", ot_share_cap=-1)
    for preset in ("cifar10_paper", "cifar100"):  # the authors' recipe keeps their exact settings
        with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "flags", f"{preset}.cfg")) as handle:
            flags = dict(line.strip()[2:].split("=", 1) for line in handle if line.startswith("--") and "=" in line)
        assert float(flags["ot_share_cap"]) == 0.0 and flags["ot_units"] == "absolute"
