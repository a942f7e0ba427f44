"""Time the standard attack ensemble on 1,000 Fashion-MNIST test images with the small CNN (2 CPU cores).

    .venv/bin/python benchmarks/eval_speed.py                          # natural and fast-AT small CNNs
    .venv/bin/python benchmarks/eval_speed.py --model=saved_models/<name>/<version>   # any exported model

Without --model it trains two small CNNs (cached under runs/eval_speed/): one naturally, one with FGSM
adversarial training from a random start (Wong et al. 2020, eps 0.1) so that many examples survive the
early attacks and the expensive ones (APGD-T, Square) have real work: the natural model alone would time
only APGD-CE. Prints each report's summary and the wall time; the budget is 10 minutes per model.
"""
import os
import time

from absl import app, flags

flags.DEFINE_string("model", None, "Evaluate this model instead of training the two small CNNs.")
flags.DEFINE_float("eps", 0.1, "L-inf radius.")
flags.DEFINE_integer("num_examples", 1000, "Test images.")
flags.DEFINE_string("attacks", "standard", "Preset or list (see rvs_tf.evaluate).")
flags.DEFINE_integer("sweep_examples", 100, "Examples of the eps sweep.")
flags.DEFINE_integer("epochs", 1, "Training epochs of each small CNN.")
flags.DEFINE_list("kinds", ["natural", "fast_at"], "Which small CNNs to train and evaluate.")
flags.DEFINE_string("work_dir", "runs/eval_speed", "Cache of trained models and the reports.")
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


def main(argv):
    del argv
    from rvs_tf import evaluate
    from rvs_tf.data import make_eval_dataset

    models = {"given": FLAGS.model} if FLAGS.model else {
        kind: _train(kind, os.path.join(FLAGS.work_dir, f"{kind}.keras")) for kind in FLAGS.kinds}
    for kind, model in models.items():
        ds, _ = make_eval_dataset("fashion_mnist_idx", num_examples=FLAGS.num_examples, batch_size=250)
        t0 = time.perf_counter()
        report = evaluate.robustness_report(
            model, ds, eps=FLAGS.eps, attacks=FLAGS.attacks, num_examples=FLAGS.num_examples,
            sweep_examples=FLAGS.sweep_examples, output_dir=os.path.join(FLAGS.work_dir, f"report_{kind}"),
            dataset_name="fashion_mnist_idx", progress=False)
        seconds = time.perf_counter() - t0
        print(f"\n== {kind}: {FLAGS.attacks} ensemble, {report['num_examples']} images, {seconds:.0f} s "
              f"({'within' if seconds <= 600 else 'OVER'} the 10-minute budget)")
        print("\n".join(evaluate.format_summary(report)))
        for row in report["attacks"]:
            print(f"  {row['name']}: {row['examples_attacked']} images in {row['seconds']:.1f} s")
        if report["eps_sweep"]:
            print(f"  eps sweep ({report['eps_sweep']['num_examples']} images): "
                  f"{report['eps_sweep']['seconds']:.1f} s")


if __name__ == "__main__":
    app.run(main)
