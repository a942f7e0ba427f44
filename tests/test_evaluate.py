"""Robustness report: Clopper-Pearson against scipy, the ensemble against a gradient-masked model, a natural
Fashion-MNIST model at eps 0.3, SavedModel loading and the rvs-evaluate CLI."""
import gc
import importlib.util
import json
import os
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import app, flags
from scipy import stats

from rvs_tf import evaluate
from rvs_tf import export as export_lib
from rvs_tf.data import DEFAULT_IDX_DIR, load_idx_arrays
from rvs_tf.evaluate import attack_spec

FAST = [attack_spec("FGSM", "fgsm"), attack_spec("PGD-20", "pgd", steps=20),
        attack_spec("APGD-CE", "apgd", steps=20, loss="ce"),
        attack_spec("APGD-T", "apgd", steps=20, loss="dlr", targeted=True, num_targets=3),
        attack_spec("Square", "square", white_box=False, queries=300)]


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (10, 10), (480, 1000), (1, 7)])
def test_clopper_pearson_matches_scipy(k, n):
    lo, hi = evaluate.clopper_pearson(k, n)
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    np.testing.assert_allclose([lo, hi], [ref.low, ref.high], rtol=1e-4, atol=1e-7)
    if k == 0:  # closed form: 1 - (alpha / 2) ** (1 / n)
        np.testing.assert_allclose(hi, 1 - 0.025 ** (1 / n), rtol=1e-5)
    with pytest.raises(ValueError, match="successes"):
        evaluate.clopper_pearson(n + 1, n)


class Quantised(keras.Model):
    """A linear classifier behind input quantisation: the gradient is 0 everywhere (masked)."""

    def __init__(self, w):
        super().__init__()
        self.w = tf.constant(w, tf.float32)

    def call(self, x, training=False):
        q = tf.round(x * 64.0) / 64.0
        return tf.reshape(q, [tf.shape(x)[0], -1]) @ self.w


def test_ensemble_catches_gradient_masking_and_writes_the_report(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 10))
    x = rng.uniform(0.2, 0.8, size=(48, 8, 8, 1)).astype(np.float32)
    model = Quantised(w)
    y = np.argmax(model(x), -1)
    report = evaluate.robustness_report(model, (x, y), eps=0.03, attacks=FAST, batch_size=32,
                                        sweep_examples=16, sweep_eps=[0.015, 0.03, 0.5],
                                        output_dir=str(tmp_path), progress=False)
    rows = {r["name"]: r for r in report["attacks"]}
    assert report["clean"]["accuracy"] == 1.0
    worst = report["worst_case"]
    # PGD-CE overstates robustness; the gradient-free attack in the ensemble brings it down.
    assert rows["PGD-20"]["accuracy"] >= worst["accuracy"] + 0.3
    assert worst["accuracy"] <= min(r["accuracy"] for r in report["attacks"])
    assert worst["ci95"][0] <= worst["accuracy"] <= worst["ci95"][1]
    checks = {c["name"]: c for c in report["sanity_checks"]}
    assert checks["white_box_at_least_as_strong_as_gradient_free"]["passed"] is False
    assert "gradient masking" in checks["white_box_at_least_as_strong_as_gradient_free"]["detail"]
    assert rows["Square"]["newly_broken"] > 0 and rows["Square"]["accuracy_kind"].startswith("cumulative")
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    md = (tmp_path / "report.md").read_text()
    assert "Worst case over FGSM, PGD-20, APGD-CE, APGD-T, Square" in md and "| FAIL |" in md
    for png in ("accuracy_vs_eps.png", "examples.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def natural():
    """A small CNN trained naturally for a few hundred steps on a Fashion-MNIST subset."""
    if not os.path.isdir(DEFAULT_IDX_DIR):
        pytest.skip(f"offline Fashion-MNIST IDX files not in {DEFAULT_IDX_DIR}")
    from rvs_tf.models import small_cnn

    keras.utils.set_random_seed(0)
    x, y = load_idx_arrays(DEFAULT_IDX_DIR, "train")
    model = small_cnn(widths=(8, 16), feature_dim=32)
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x[:9600], y[:9600], batch_size=64, epochs=2, verbose=0)
    xt, yt = load_idx_arrays(DEFAULT_IDX_DIR, "test")
    return model, xt[:200], yt[:200]


def test_natural_model_breaks_at_eps_0_3_and_passes_the_checks(natural):
    model, x, y = natural
    report = evaluate.robustness_report(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(100), eps=0.3,
                                        attacks=FAST, batch_size=100, sweep_examples=40,
                                        sweep_eps=[0.02, 0.1, 0.5],
                                        progress=False)
    assert report["clean"]["accuracy"] >= 0.7
    rows = {r["name"]: r for r in report["attacks"]}
    assert rows["PGD-20"]["accuracy"] <= 0.02 and report["worst_case"]["accuracy"] <= 0.01
    assert [c["passed"] for c in report["sanity_checks"]] == [True] * 4, report["sanity_checks"]
    curve = report["eps_sweep"]["worst_case"]
    assert curve[0] > curve[1] > curve[-1] == 0.0


def export(model, directory, metadata):
    """A version folder as the serving contract of rvs_tf.export describes it, written by hand."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(export_lib.SERVING_SIGNATURE, export_lib.serving_function(model), input_signature=[
        tf.TensorSpec([None, 28, 28, 1], tf.float32, name=export_lib.IMAGES_INPUT)])
    archive.write_out(str(directory), verbose=False)
    path = directory / export_lib.VERSION_METADATA_FILE
    os.makedirs(path.parent)
    path.write_text(json.dumps(metadata))


def test_savedmodel_and_cli(natural, tmp_path, capsys):
    model, x, y = natural
    names = [f"class{i}" for i in range(10)]
    export(model, tmp_path / "tiny" / "1", {"dataset": "nonexistent", "eps": 0.5})
    export(model, tmp_path / "tiny" / "2", {"dataset": "fashion_mnist_idx", "image_shape": [28, 28, 1],
                                            "num_classes": 10, "class_names": names, "eps": 0.05})
    assert evaluate.resolve_model_path(tmp_path / "tiny") == (str(tmp_path / "tiny" / "2"), 2)
    assert evaluate.default_output_dir(str(tmp_path / "tiny")) == str(tmp_path / "tiny" / "eval_2")
    from_keras = evaluate.robustness_report(model, (x[:50], y[:50]), eps=0.05, attacks="pgd20",
                                            sweep_examples=0, progress=False, seed=1)
    from_saved = evaluate.robustness_report(str(tmp_path / "tiny"), (x[:50], y[:50]), eps=0.05,
                                            attacks="pgd20", sweep_examples=0, progress=False, seed=1)
    assert from_saved["clean"] == from_keras["clean"] and from_saved["class_names"] == names
    assert abs(from_saved["worst_case"]["accuracy"] - from_keras["worst_case"]["accuracy"]) <= 0.04

    from rvs_tf.cli import evaluate as cli

    try:
        cli.FLAGS(["rvs-evaluate", f"--model={tmp_path / 'tiny'}", "--attacks=pgd20", "--num_examples=40",
                   "--sweep_examples=0", "--batch_size=20", "--noprogress"])
        assert cli.main(["rvs-evaluate"]) is None  # absl would turn a returned value into exit status 1
    finally:
        cli.FLAGS.unparse_flags()
    out = capsys.readouterr().out
    assert ("PGD-20 (20 steps, 1 restart(s), loss=ce, step=2.5*eps/steps, random start, eps=0.05, L-inf)"
            in out)
    assert "upper bound on robust accuracy" in out and "clean accuracy" in out
    report = json.loads((tmp_path / "tiny" / "eval_2" / "report.json").read_text())
    assert report["num_examples"] == 40 and report["dataset"] == "fashion_mnist_idx"

    base = ["rvs-evaluate", f"--model={tmp_path / 'tiny'}", "--attacks=pgd20", "--num_examples=20",
            "--sweep_examples=0", "--batch_size=20", "--noprogress", "--norm=L2"]
    try:  # the metadata's eps is an L-inf radius: under L2 the user must give one
        cli.FLAGS(base)
        with pytest.raises(app.UsageError, match="--eps: expected a l2 radius, got none .*a linf radius only"):
            cli.main(["rvs-evaluate"])
        cli.FLAGS.unparse_flags()
        cli.FLAGS([*base, "--eps=1"])
        cli.main(["rvs-evaluate"])
    finally:
        cli.FLAGS.unparse_flags()
    out = capsys.readouterr().out
    assert "20 examples, L2 eps=1" in out and "eps=1, L2)" in out
    report = json.loads((tmp_path / "tiny" / "eval_2_l2" / "report.json").read_text())  # beside the L-inf one
    assert report["norm"] == "L2" and report["eps"] == 1.0


@pytest.mark.parametrize("argv, flag", [(["--eps=2"], "--eps"), (["--attacks=bogus"], "--attacks"),
                                        (["--num_examples=0"], "--num_examples"),
                                        (["--norm=l3"], r"--norm=l3: value should be one of <linf\|l2>"),
                                        (["--norm=linf", "--eps=1.5"], r"--eps.*an L2 radius\? pass --norm=l2")])
def test_cli_validators_name_the_flag(tmp_path, argv, flag):
    from rvs_tf.cli import evaluate as cli

    (tmp_path / "m.keras").write_bytes(b"")
    try:
        with pytest.raises(flags.IllegalFlagValueError, match=flag):
            cli.FLAGS(["rvs-evaluate", f"--model={tmp_path / 'm.keras'}", *argv])
    finally:
        cli.FLAGS.unparse_flags()
    with pytest.raises(ValueError, match="model: expected a SavedModel directory"):
        evaluate.resolve_model_path(tmp_path / "missing")


def test_report_rejects_bad_input():
    model = Quantised(np.zeros((64, 10)))
    x, y = np.zeros((4, 8, 8, 1), np.float32), np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="eps"):
        evaluate.robustness_report(model, (x, y), eps=-1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate.robustness_report(model, (x + 2, y), eps=0.1, progress=False)
    with pytest.raises(ValueError, match="attacks"):
        evaluate.robustness_report(model, (x, y), eps=0.1, attacks="pgd7")


def test_mixed_precision_models_are_attacked_through_a_float32_copy(tmp_path):
    from rvs_tf import models, precision
    try:
        precision.set_policy("mixed_float16")
        mixed = models.build_classifier("small_cnn", (28, 28, 1), 10)
    finally:
        precision.set_policy("float32")
    assert any(layer.compute_dtype == "float16" for layer in mixed.layers)
    path = str(tmp_path / "mixed.keras")
    mixed.save(path)
    x = tf.random.stateless_uniform([8, 28, 28, 1], seed=[1, 2])
    for source in (mixed, path):
        copy, _, name = evaluate.load_model(source)
        assert "float32 copy of its mixed_float16 weights" in name
        assert all(layer.compute_dtype == "float32" for layer in copy._flatten_layers())
        assert all(np.array_equal(a, b) for a, b in zip(copy.get_weights(), mixed.get_weights()))
        np.testing.assert_allclose(copy(x), tf.cast(mixed(x), tf.float32), atol=2e-2)
    plain = models.build_classifier("small_cnn", (28, 28, 1), 10)
    same, note = evaluate.float32_copy(plain)
    assert same is plain and note == ""
    try:
        precision.set_policy("mixed_float16")
        from rvs_tf.baselines import NaturalModel
        trainer = NaturalModel(models.build_classifier("small_cnn", (28, 28, 1), 10), eps=0.1)
    finally:
        precision.set_policy("float32")
    copy, _, name = evaluate.load_model(trainer)
    assert "float32 copy" in name and copy.dtype_policy.compute_dtype == "float32"


def test_a_new_attack_kind_runs_without_changes_elsewhere():
    """Runner, sweep and checks read the kind's properties, never its name."""
    def corner(model, x, y, *, eps, seed, tries):  # a random vertex of the eps-ball (tries: 1 only)
        sign = tf.sign(tf.random.stateless_uniform(tf.shape(x), seed) - 0.5)
        return tf.clip_by_value(x + tf.cast(eps, tf.float32) * sign, 0.0, 1.0)

    kind = evaluate.AttackKind("corner", corner, lambda p: [f"{p['tries']} try"], white_box=False)
    spec = attack_spec("Corner", kind, tries=1)
    assert evaluate.AttackSpec("Corner", kind, (("tries", 1),), white_box=False) == spec
    model = Quantised(np.random.default_rng(1).normal(size=(64, 10)))
    x = np.random.default_rng(2).uniform(0.2, 0.8, size=(16, 8, 8, 1)).astype(np.float32)
    y = np.argmax(model(x), -1)
    report = evaluate.robustness_report(model, (x, y), eps=0.05, attacks=[spec, evaluate.ATTACKS["fgsm"]],
                                        sweep_examples=8, sweep_eps=[0.05], progress=False)
    assert [r["name"] for r in report["attacks"]] == ["FGSM", "Corner"]  # white-box first
    row = report["attacks"][1]
    assert row["function"] == "corner" and row["white_box"] is False and row["params"] == {"tries": 1}
    assert row["description"] == "Corner (1 try, eps=0.05, L-inf)"
    assert report["eps_sweep"]["attacks"]["Corner"] == "Corner (1 try, L-inf)"
    assert not report["worst_case"]["is_upper_bound_only"]
    checks = {c["name"]: c["passed"] for c in report["sanity_checks"]}
    assert checks["white_box_at_least_as_strong_as_gradient_free"] is not None
    with pytest.raises(ValueError, match="fn: expected an attack of rvs_tf.attacks"):
        attack_spec("CW", "cw")
    with pytest.raises(ValueError, match="attacks: Corner cannot run under norm l2"):  # its kind names L-inf only
        evaluate.robustness_report(model, (x, y), eps=0.5, norm="l2", attacks=[spec], progress=False)


def test_models_of_one_architecture_share_traces_and_keep_their_own_results():
    """A process that evaluates several models of one architecture (checkpoints, seeds) traces each attack
    once; each model still gets exactly the results of a model traced on its own."""
    from rvs_tf.evaluate import runner
    from rvs_tf.models import small_cnn

    x, y = load_idx_arrays(DEFAULT_IDX_DIR, "test")
    x, y = x[:24], y[:24]
    models = []
    for seed in (0, 1):
        keras.utils.set_random_seed(seed)
        model = small_cnn(widths=(4,), feature_dim=16)
        model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True))
        model.fit(x, y, epochs=15, batch_size=24, verbose=0)  # above chance, so every attack has work
        models.append(model)

    def report(model):
        return evaluate.robustness_report(model, (x, y), eps=0.05, attacks=FAST, sweep_examples=0,
                                          progress=False)

    first = report(models[0])
    def tracing_counts():
        return {key: fn.experimental_get_tracing_count() for key, (_, fn) in runner._SHARED_TRACES.items()}

    traces = tracing_counts()
    assert traces and all(count == 1 for count in traces.values()), traces
    shared = report(models[1])
    assert tracing_counts() == traces
    alone = report(lambda images: models[1](images, training=False))  # a callable: traced on its own
    for got, want in zip(shared["attacks"], alone["attacks"]):
        assert got["accuracy"] == want["accuracy"], (got["name"], got["accuracy"], want["accuracy"])
    assert shared["worst_case"]["accuracy"] == alone["worst_case"]["accuracy"]
    assert shared["clean"] == alone["clean"] and shared["clean"] != first["clean"]
    # The cache holds no model: once the first is gone, its entries go too.
    first_ref = weakref.ref(models[0])
    del models[0]
    gc.collect()
    assert first_ref() is None
    report(models[0])
    assert all(users for users, _ in runner._SHARED_TRACES.values())


def test_models_whose_config_does_not_describe_them_get_traces_of_their_own():
    """A Lambda layer's function is not in its config: two models differing only there must not share."""
    from rvs_tf.evaluate import runner

    def lambda_model(offset):
        inputs = keras.Input((28, 28, 1))
        hidden = keras.layers.Lambda(lambda t: t + offset, name="shift")(inputs)
        return keras.Model(inputs, keras.layers.Dense(10, name="logits")(keras.layers.Flatten(name="flat")(hidden)))

    assert runner._architecture(lambda_model(0.0)) is None

    def activation_model(slope):  # Keras writes the activation as its name: "act" for either slope
        def act(t):
            return tf.nn.leaky_relu(t, slope)
        inputs = keras.Input((28, 28, 1))
        return keras.Model(inputs, keras.layers.Dense(10, activation=act, name="logits")(
            keras.layers.Flatten(name="flat")(inputs)))

    assert runner._architecture(activation_model(0.01)) is None
    assert runner._architecture(activation_model(0.9)) is None
    keras.utils.set_random_seed(0)
    from rvs_tf.models import small_cnn
    assert runner._architecture(small_cnn(widths=(4,))) == runner._architecture(small_cnn(widths=(4,)))
    assert runner._architecture(small_cnn(widths=(4,))) != runner._architecture(small_cnn(widths=(8,)))


def test_bfloat16_search_counts_only_float32_verdicts(natural):
    """A search model that calls every image misclassified (a worst-case disagreement with the float32
    model): none of its breaks counts unconfirmed; each is attacked again in float32, so nothing the
    float32 attack breaks is lost. (PGD from the clean image: a random start is drawn for the re-attacked
    examples alone, an independent draw of the same float32 attack, which may differ on borderline ones.)"""
    from rvs_tf.evaluate.runner import Runner

    model, x, y = natural
    x, y = x[:60], y[:60].astype(np.int64)
    liar = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(10, kernel_initializer="zeros", bias_initializer="zeros")])
    liar_class = (y[0] + 1) % 10
    liar.layers[-1].bias.assign(np.eye(10, dtype=np.float32)[liar_class] * 50)  # one constant class
    spec = attack_spec("PGD-20", "pgd", steps=20, random_start=False)
    plain = Runner(model, x.shape[1:], 30, 0, False)
    searched = Runner(model, x.shape[1:], 30, 0, False, search_model=liar)
    x_ref, wrong_ref = plain.attack(spec, x, y, 0.05, "", tag="t")
    x_adv, wrong = searched.attack(spec, x, y, 0.05, "", tag="t")
    assert searched.rechecked["PGD-20"] > 0
    float32_wrong = np.argmax(model.predict(x_adv, verbose=0), -1) != y
    np.testing.assert_array_equal(wrong, float32_wrong)  # the verdict is the float32 model's
    lied = y != liar_class  # the search "broke" all of these, whatever the image
    assert np.all(wrong[wrong_ref & lied])  # nothing the float32 attack breaks is lost
    assert np.sum(lied & ~wrong) > 0  # the search's false breaks do not count
    assert np.max(np.abs(x_adv - x)) <= 0.05 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    # An attack whose spec keeps float32 ignores the search model: the float32 attack's own result.
    kept = attack_spec("PGD-20 (float32)", "pgd", steps=20, random_start=False, float32_search=True)
    x_kept, wrong_kept = searched.attack(kept, x, y, 0.05, "", tag="t")
    np.testing.assert_array_equal(x_kept, x_ref)
    np.testing.assert_array_equal(wrong_kept, wrong_ref)
    assert searched.rechecked.get("PGD-20 (float32)", 0) == 0


def test_bfloat16_search_of_keras_models_and_exports(natural, tmp_path):
    model, x, y = natural
    x, y = x[:100], y[:100]
    kwargs = dict(eps=0.05, attacks=FAST, batch_size=50, sweep_examples=0, progress=False)
    full = evaluate.robustness_report(model, (x, y), **kwargs)
    fgsm_kept = [attack_spec("FGSM", "fgsm", float32_search=True), *FAST[1:]]  # FGSM searches in float32
    fast = evaluate.robustness_report(model, (x, y), precision="mixed_bfloat16", **{**kwargs, "attacks": fgsm_kept})
    assert full["precision"]["search"] == "float32" and fast["precision"]["search"] == "mixed_bfloat16"
    assert fast["precision"]["float32_search_attacks"] == ["FGSM"] and not full["precision"]["float32_search_attacks"]
    assert fast["attacks"][0]["accuracy"] == full["attacks"][0]["accuracy"]  # FGSM is deterministic
    assert "attacks searched in mixed_bfloat16 (except FGSM: float32)" in "\n".join(
        evaluate.format_summary(fast))
    assert fast["clean"] == full["clean"]  # verdicts are float32
    assert abs(fast["worst_case"]["accuracy"] - full["worst_case"]["accuracy"]) <= 0.03
    path = export_lib.export_classifier(model, str(tmp_path), "m", metadata={"eps": 0.05})
    from_export = evaluate.robustness_report(path, (x, y), precision="mixed_bfloat16", **kwargs)
    assert from_export["precision"]["search"] == "mixed_bfloat16"
    assert abs(from_export["worst_case"]["accuracy"] - fast["worst_case"]["accuracy"]) <= 0.02
    # benchmarks/bf16_attacks.py, which measures equal strength on the method table's exports, runs the
    # same two searches: its float32 worst case is the report's, its per-example counts add up.
    spec = importlib.util.spec_from_file_location("bf16_attacks", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bf16_attacks.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    both = bench.measure(path, FAST, len(y), 50, 0, data=(x, y.astype(np.int64)))
    assert both["float32"]["worst_case"] == full["worst_case"]["accuracy"]
    assert both["mixed_bfloat16"]["worst_case"] == from_export["worst_case"]["accuracy"]
    assert both["difference_points"] == pytest.approx(
        100 * (both["robust_in_bfloat16_only"] - both["robust_in_float32_only"]) / len(y))
    assert bench.row(both).startswith(f"| {both['model']} | L-inf 0.05 | {len(y)} |")  # its --table
    assert bench.label("benchmarks/runs/pgd_l2/export/pgd_l2") == "pgd_l2"
    rerun = {**both, "examples": 2 * len(y)}  # a rerun on more images replaces the row, in its place
    other = {**both, "model": "other"}
    assert bench.latest_per_model([both, other, rerun, both]) == [rerun, other]
    reseeded = {**both, "seed": 1, "float32": {**both["float32"], "worst_case": both["float32"]["worst_case"] + 0.01}}
    [line] = bench.seed_lines(bench.latest_per_model([both, other, reseeded]))  # the seed spread, per model
    assert line.startswith(f"{both['model']}, {len(y)} images, seeds 0, 1: float32 search ")
    assert "(spread 1.0), bfloat16 search" in line and line.endswith("(spread 0.0)")
    export(model, tmp_path / "old" / "1", {"eps": 0.05})  # an export without the search signature
    old = evaluate.robustness_report(str(tmp_path / "old"), (x, y), precision="mixed_bfloat16", **kwargs)
    assert old["precision"]["search"] == "float32" and "search_bfloat16" in old["precision"]["note"]
    with pytest.raises(ValueError, match="precision: attacks search in float32 or mixed_bfloat16"):
        evaluate.robustness_report(model, (x, y), precision="mixed_float16", **kwargs)


def test_l2_reports_name_the_norm_everywhere_and_keep_their_own_state(natural, tmp_path):
    """The ensemble, the sweep and the checks in L2 units: the sweep reaches 0.5 * sqrt(784) = 14, where
    every image can reach the same grey image; an L-inf state is never resumed as an L2 one."""
    from rvs_tf.threat_model import ThreatModelWarning

    model, x, y = natural
    report = evaluate.robustness_report(model, (x[:60], y[:60]), eps=1.5, norm="l2", attacks=FAST,
                                        batch_size=60, sweep_examples=20, output_dir=str(tmp_path / "l2"),
                                        progress=False)
    assert report["norm"] == "L2" and report["eps_sweep"]["eps"] == [0.0, 0.75, 1.5, 3.0, 14.0]
    assert all(r["description"].endswith(", eps=1.5, L2)") for r in report["attacks"])
    assert all(text.endswith(", L2)") for text in report["eps_sweep"]["attacks"].values())
    assert [c["passed"] for c in report["sanity_checks"]] == [True] * 4, report["sanity_checks"]
    assert "at eps 14 every image can reach the same grey image" in report["sanity_checks"][1]["detail"]
    rows = {r["name"]: r for r in report["attacks"]}
    assert report["worst_case"]["accuracy"] <= rows["PGD-20"]["accuracy"] <= report["clean"]["accuracy"] - 0.1
    assert "60 examples, L2 eps = 1.5" in (tmp_path / "l2" / "report.md").read_text()

    small = dict(attacks="pgd20", sweep_examples=0, progress=False, state_dir=str(tmp_path / "state"))
    evaluate.robustness_report(model, (x[:20], y[:20]), eps=0.1, **small)
    with pytest.raises(ValueError, match="norm: 'linf' in the state, 'l2' now"):
        evaluate.robustness_report(model, (x[:20], y[:20]), eps=0.1, norm="l2", **small)
    with pytest.warns(ThreatModelWarning, match="eps=0.03 is unusual for norm l2 .*reads like a linf radius"):
        evaluate.robustness_report(model, (x[:20], y[:20]), eps=0.03, norm="l2", **{**small, "restart": True})
    with pytest.raises(ValueError, match=r"eps: expected a number in \[0, 1\].*pass norm='l2'"):
        evaluate.robustness_report(model, (x[:20], y[:20]), eps=1.5, attacks="pgd20")
    with pytest.raises(ValueError, match=r"eps: expected at most 28 for l2"):
        evaluate.robustness_report(model, (x[:20], y[:20]), eps=30.0, norm="l2", attacks="pgd20")
