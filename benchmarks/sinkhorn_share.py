"""The Sinkhorn solve inside the quick start's RVS training: its problems, its time, its share of a step.

  .venv/bin/python benchmarks/sinkhorn_share.py                          # bfloat16 and float32 steps
  .venv/bin/python benchmarks/sinkhorn_share.py --precisions=mixed_bfloat16 --rounds=10

The quick start's settings (flags/fashion_mnist.cfg: absolute epsilon 0.01, at most 100 iterations,
implicit gradients) on real Fashion-MNIST batches. Part 1 trains the RVS model for `--steps` steps and,
at a few steps, solves the clean/adversarial feature problem as the step does: iterations run, marginal
error, time of one value+gradient call, and the value's distance to POT's float64 log-domain Sinkhorn run
to convergence (1e-10). Part 2 times the alternating step round-robin against the same model with the
feature term replaced by the paired mean squared distance (no solve): the difference is the two solves'
share of the step. Prints Markdown.
"""
import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import ot  # noqa: E402
import tensorflow as tf  # noqa: E402

from rvs_tf import sinkhorn  # noqa: E402
from rvs_tf.builder import build_model  # noqa: E402
from rvs_tf.data import DEFAULT_IDX_DIR, load_idx_arrays  # noqa: E402
from rvs_tf.run_config import RunConfig  # noqa: E402
from step_time import time_steps  # noqa: E402  (benchmarks/, the script's folder)
from timing import median_seconds  # noqa: E402

QUICK_START = dict(method="rvs", eps=0.1, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=0,
                   generator_optimizer="sgd", generator_lr=0.01, ot_weight=1.0, ot_epsilon=0.01,
                   ot_cost_scale=None, bound="clip", random_start=True)


def build(x, precision, **changes):
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy(precision)
    config = RunConfig(**{**QUICK_START, "precision": precision, **changes})
    return build_model(config, x.shape[1:], 10, steps_per_epoch=1000)


def problems(x, y, precision, steps, rounds):
    """Train the quick-start model; at a few steps, the solve of its clean/adversarial features."""
    model = build(x, precision)
    options, batch = model.ot_options, QUICK_START["batch_size"]

    @tf.function
    def value_and_gradient(clean, adversarial):
        with tf.GradientTape() as tape:
            tape.watch(adversarial)
            result = sinkhorn.solve(clean, adversarial, options=options)
        return result, tape.gradient(result.cost, adversarial)

    print(f"\n### The solves of {precision} training (128 x 128 features, absolute epsilon 0.01)\n\n"
          "| step | mean cost | iterations | row-marginal error | ms per value+gradient | |value - POT| / POT |\n"
          "|---|---|---|---|---|---|")
    for step in range(steps):
        images, labels = x[step * batch:(step + 1) * batch], y[step * batch:(step + 1) * batch]
        model.train_on_batch(images, labels)
        if step in (0, 5, steps // 2, steps - 1):
            _, clean = model.heads(tf.constant(images), training=False)
            _, adversarial = model.heads(model.adversarial_examples(tf.constant(images), None, 0.1), training=False)
            result, _ = value_and_gradient(clean, adversarial)
            cost = ot.dist(clean.numpy().astype(np.float64), adversarial.numpy().astype(np.float64))
            uniform = np.full(batch, 1.0 / batch)
            reference = ot.sinkhorn2(uniform, uniform, cost, 0.01, method="sinkhorn_log", numItermax=100000,
                                     stopThr=1e-10)
            ms = 1e3 * median_seconds(
                lambda: tf.nest.map_structure(np.asarray, value_and_gradient(clean, adversarial)), rounds)
            print(f"| {step} | {cost.mean():.3f} | {int(result.iterations)} | {float(result.error):.1e} | {ms:.2f} "
                  f"| {abs(float(result.cost) - reference) / reference:.1e} |", flush=True)


def step_share(x, y, precision, rounds):
    """Median ms of the alternating step with the solve and with paired MSE in its place."""
    images, labels = x[:128], y[:128]
    models = {"sinkhorn": build(x, precision), "paired_mse": build(x, precision, feature_distance="paired_mse")}
    for model in models.values():  # past the share cap's 8 measuring steps
        for _ in range(8):
            model.train_on_batch(images, labels)
    ms = {name: 1e3 * seconds for name, seconds in time_steps(models, images, labels, rounds).items()}
    return ms["sinkhorn"], ms["paired_mse"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="mixed_bfloat16,float32")
    parser.add_argument("--steps", type=int, default=200, help="training steps of part 1")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--idx_dir", default=DEFAULT_IDX_DIR)
    args = parser.parse_args()
    x, y = load_idx_arrays(args.idx_dir, "train")
    x, y = x[:128 * args.steps], y[:128 * args.steps]
    shares = []
    for precision in args.precisions.split(","):
        problems(x, y, precision, args.steps, args.rounds)
        shares.append((precision, *step_share(x, y, precision, args.rounds)))
    print("\n### The two solves' share of an alternating step\n\n| precision | step, ms | step with paired MSE, ms "
          "| share |\n|---|---|---|---|")
    for precision, with_solve, without in shares:
        print(f"| {precision} | {with_solve:.1f} | {without:.1f} | {100 * (1 - without / with_solve):.1f}% |")


if __name__ == "__main__":
    main()
