"""Time the standard attack ensemble on 1,000 Fashion-MNIST test images with the small CNN (2 CPU cores).

    .venv/bin/python benchmarks/eval_speed.py                          # natural and fast-AT small CNNs
    .venv/bin/python benchmarks/eval_speed.py --model=saved_models/<name>/<version>   # any exported model
    .venv/bin/python benchmarks/eval_speed.py --model=... --compare_art --num_examples=500   # against ART
    .venv/bin/python benchmarks/eval_speed.py --model=... --l2_eps=1.5     # L2 against L-inf, same images
    .venv/bin/python benchmarks/eval_speed.py --model=... --compare_art --precisions=float32,mixed_bfloat16

Without --model it trains two small CNNs (cached under runs/eval_speed/): one naturally, one with FGSM
adversarial training from a random start (Wong et al. 2020, eps 0.1) so that many examples survive the
early attacks and the expensive ones (APGD-T, Square) have real work: the natural model alone would time
only APGD-CE. Prints each report's summary and the wall time; the budget is 10 minutes per model.

--compare_art runs the same cascade (APGD-CE 100 steps, then APGD-DLR 100 steps on the survivors, then
Square with --art_queries queries on theirs, 1 restart each, eps 0.1) with rvs_tf and with IBM ART
(`pip install adversarial-robustness-toolbox`: a benchmark extra, not a dependency of rvs_tf) in one
process on the same model and images, and prints both times, both worst cases and the throughput ratio.
"""
import itertools
import os
import time

from absl import app, flags

flags.DEFINE_string("model", None, "Evaluate this model instead of training the two small CNNs.")
flags.DEFINE_float("eps", 0.1, "L-inf radius.")
flags.DEFINE_float("l2_eps", None, "Also run the ensemble under L2 at this radius on the same model and images, "
                   "in the same process, and print the L2 / L-inf time ratio (issue 21: at most 1.2).")
flags.DEFINE_integer("num_examples", 1000, "Test images.")
flags.DEFINE_string("attacks", "standard", "Preset or list (see rvs_tf.evaluate).")
flags.DEFINE_integer("sweep_examples", 100, "Examples of the eps sweep.")
flags.DEFINE_integer("epochs", 1, "Training epochs of each small CNN.")
flags.DEFINE_list("kinds", ["natural", "fast_at"], "Which small CNNs to train and evaluate.")
flags.DEFINE_string("work_dir", "runs/eval_speed", "Cache of trained models and the reports.")
flags.DEFINE_bool("compare_art", False, "Time rvs_tf against IBM ART on APGD-CE, APGD-DLR and Square.")
flags.DEFINE_integer("art_queries", 1000, "Square's queries in --compare_art.")
flags.DEFINE_integer("art_batch_size", 250, "Batch size of both libraries in --compare_art.")
flags.DEFINE_string("dataset", "fashion_mnist_idx", "Test images of --compare_art (an rvs_tf.data name).")
flags.DEFINE_list("precisions", ["float32"], "What rvs_tf's attacks search in, each timed in turn on the same "
                  "model and images (float32, mixed_bfloat16, auto; verdicts are float32 either way).")
FLAGS = flags.FLAGS


def _train(kind, path):
    """The small CNN of `kind`, trained as rvs-train would (rvs_tf.builder: natural, or FGSM-RS for
    fast_at) with Adam 1e-3 and no weight decay, or loaded from `path` when cached there."""
    import keras
    import tensorflow as tf

    from rvs_tf.builder import build_model
    from rvs_tf.data import DEFAULT_IDX_DIR, load_idx_arrays
    from rvs_tf.run_config import RunConfig

    if os.path.exists(path):
        return keras.saving.load_model(path, compile=False)
    keras.utils.set_random_seed(0)
    x, y = load_idx_arrays(DEFAULT_IDX_DIR, "train")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(60000, seed=0).batch(128)
    config = RunConfig(method="natural" if kind == "natural" else "fgsm_rs", eps=FLAGS.eps, optimizer="adam",
                       lr=1e-3, weight_decay=0.0)  # fast_at: FGSM from a random start, step 1.25 eps
    model = build_model(config, x.shape[1:], 10, steps_per_epoch=len(ds))
    t0 = time.perf_counter()
    model.fit(ds, epochs=FLAGS.epochs, verbose=0)
    print(f"trained {kind} small CNN in {time.perf_counter() - t0:.0f} s")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    model.classifier.save(path)
    return model.classifier


def _art_cascade(logits_fn, x, y, eps):
    """The cascade with IBM ART's attacks: (robust mask over x, seconds)."""
    import numpy as np
    import tensorflow as tf
    from art.attacks.evasion import AutoProjectedGradientDescent, SquareAttack
    from art.estimators.classification import TensorFlowV2Classifier

    num_classes = int(logits_fn(tf.constant(x[:1])).shape[-1])
    classifier = TensorFlowV2Classifier(
        model=lambda images, training=False: logits_fn(tf.cast(images, tf.float32)), nb_classes=num_classes,
        input_shape=x.shape[1:], clip_values=(0.0, 1.0),
        loss_object=tf.keras.losses.CategoricalCrossentropy(from_logits=True))
    t0 = time.perf_counter()
    robust = np.argmax(classifier.predict(x, batch_size=FLAGS.art_batch_size), -1) == y
    attacks = [AutoProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=100,
                                            nb_random_init=1, batch_size=FLAGS.art_batch_size,
                                            loss_type=loss, verbose=False)
               for loss in ("cross_entropy", "difference_logits_ratio")]
    attacks.append(SquareAttack(classifier, norm=np.inf, eps=eps, max_iter=FLAGS.art_queries, p_init=0.8,
                                nb_restarts=1, batch_size=FLAGS.art_batch_size, verbose=False))
    for attack in attacks:
        idx = np.flatnonzero(robust)
        if len(idx):
            x_adv = attack.generate(x[idx], y=np.eye(num_classes, dtype=np.float32)[y[idx]])
            assert np.abs(x_adv - x[idx]).max() <= eps + 1e-5
            robust[idx] = np.argmax(classifier.predict(x_adv, batch_size=FLAGS.art_batch_size), -1) == y[idx]
        print(f"  ART {type(attack).__name__}: {robust.mean():.1%} left after {time.perf_counter() - t0:.0f} s",
              flush=True)
    return robust, time.perf_counter() - t0


def _compare_art():
    """rvs_tf and ART on the same cascade, model and images."""
    from rvs_tf import evaluate
    from rvs_tf.data import make_eval_dataset
    from rvs_tf.evaluate.runner import materialise

    logits_fn, _, description = evaluate.load_model(FLAGS.model)
    ds, _ = make_eval_dataset(FLAGS.dataset, num_examples=FLAGS.num_examples, batch_size=250)
    x, y = materialise(ds, FLAGS.num_examples)
    specs = [evaluate.attack_spec("APGD-CE", "apgd", steps=100, loss="ce"),
             evaluate.attack_spec("APGD-DLR", "apgd", steps=100, loss="dlr"),
             evaluate.attack_spec("Square", "square", queries=FLAGS.art_queries, p_init=0.8)]
    ours = {}
    for precision in FLAGS.precisions:
        t0 = time.perf_counter()
        report = evaluate.robustness_report(logits_fn, (x, y), eps=FLAGS.eps, attacks=specs, sweep_examples=0,
                                            batch_size=FLAGS.art_batch_size, progress=False, precision=precision)
        searched = report["precision"]["search"]
        searched = searched if searched == precision else f"{precision} -> {searched}"
        ours[searched] = (time.perf_counter() - t0, report["worst_case"]["accuracy"])
        for row in report["attacks"]:
            print(f"  rvs_tf ({searched} search) {row['name']}: {row['accuracy']:.1%} left, {row['seconds']:.0f} s")
    robust, theirs = _art_cascade(logits_fn, x, y, FLAGS.eps)
    print(f"\n== {description}, first {len(y)} test images, eps {FLAGS.eps}: APGD-CE 100 -> APGD-DLR 100 -> "
          f"Square {FLAGS.art_queries} (cascade, 1 restart each)")
    print(f"ART: {theirs:.0f} s, worst case {robust.mean():.1%}")
    for searched, (seconds, worst) in ours.items():
        print(f"rvs_tf, {searched} search: {seconds:.0f} s, worst case {worst:.1%}, throughput ratio rvs_tf / ART "
              f"{theirs / seconds:.1f}x, worst case {100 * (worst - robust.mean()):+.1f} points against ART's")


def main(argv):
    del argv
    if FLAGS.compare_art:
        if not FLAGS.model:
            raise app.UsageError("--compare_art: expected --model (an exported model or .keras file)")
        return _compare_art()
    from rvs_tf import evaluate
    from rvs_tf.data import make_eval_dataset

    models = {"given": FLAGS.model} if FLAGS.model else {
        kind: _train(kind, os.path.join(FLAGS.work_dir, f"{kind}.keras")) for kind in FLAGS.kinds}
    norms = [("linf", FLAGS.eps)] + ([("l2", FLAGS.l2_eps)] if FLAGS.l2_eps else [])
    for (kind, model), precision in itertools.product(models.items(), FLAGS.precisions):
        seconds = {}
        for norm, eps in norms:
            ds, _ = make_eval_dataset("fashion_mnist_idx", num_examples=FLAGS.num_examples, batch_size=250)
            t0 = time.perf_counter()
            report = evaluate.robustness_report(
                model, ds, eps=eps, norm=norm, attacks=FLAGS.attacks, num_examples=FLAGS.num_examples,
                sweep_examples=FLAGS.sweep_examples,
                output_dir=os.path.join(FLAGS.work_dir, f"report_{kind}" + ("_l2" if norm == "l2" else "")
                                        + ("" if precision == "float32" else f"_{precision}")),
                dataset_name="fashion_mnist_idx", progress=False, precision=precision)
            seconds[norm] = time.perf_counter() - t0
            print(f"\n== {kind}: {FLAGS.attacks} ensemble, {norm} eps {eps:g}, {report['num_examples']} images, "
                  f"{report['precision']['search']} search, "
                  f"{seconds[norm]:.0f} s ({'within' if seconds[norm] <= 600 else 'OVER'} the 10-minute budget)")
            print("\n".join(evaluate.format_summary(report)))
            for row in report["attacks"]:
                print(f"  {row['name']}: {row['examples_attacked']} images in {row['seconds']:.1f} s")
            if report["eps_sweep"]:
                print(f"  eps sweep ({report['eps_sweep']['num_examples']} images): "
                      f"{report['eps_sweep']['seconds']:.1f} s")
        if len(seconds) == 2:
            print(f"\n== {kind}, {precision} search: L2 / L-inf time, same process, model and images: "
                  f"{seconds['l2'] / seconds['linf']:.2f}x ({seconds['l2']:.0f} s / {seconds['linf']:.0f} s)")

if __name__ == "__main__":
    app.run(main)
